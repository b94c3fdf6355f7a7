//! Builds the training and validation loaders a config asks for.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rand::seq::SliceRandom;

use cutmix_data::{
    CIFAR_MEAN, CIFAR_STD, Cifar, CifarKind, ColorAugment, Dataset, IMAGENET_MEAN, IMAGENET_STD,
    ImageFolder, Loader, LoaderConfig, Split, Stream, Transform, keyed_rng,
};

use crate::config::{Config, DatasetKind, TransformKind};

/// The loaders of a run.
pub struct Datasets {
    pub train: Loader,
    pub val: Loader,
    pub num_classes: usize,
    /// Class names, when the dataset has them (image folders).
    pub classes: Option<Vec<String>>,
    /// Things the user should know about the data that do not stop the run (empty class
    /// folders), one line each.
    pub warnings: Vec<String>,
}

/// A seeded random subset of `limit` indices out of `len` (all of them when `limit` is 0 or
/// not smaller than `len`).
fn subset(seed: u64, which: u64, len: usize, limit: usize) -> Option<Vec<usize>> {
    if limit == 0 || limit >= len {
        return None;
    }
    let mut indices: Vec<usize> = (0..len).collect();
    let mut rng = keyed_rng(seed, Stream::Subset, which, 0);
    let (chosen, _) = indices.partial_shuffle(&mut rng, limit);
    Some(chosen.to_vec())
}

/// Opens the datasets and wraps them in loaders.
pub fn build(config: &Config) -> Result<Datasets> {
    let data = &config.data;
    let mut warnings = Vec::new();
    let (train, val, classes): (Arc<dyn Dataset>, Arc<dyn Dataset>, _) = match data.dataset {
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let kind = if data.dataset == DatasetKind::Cifar10 {
                CifarKind::Cifar10
            } else {
                CifarKind::Cifar100
            };
            let mut train = Cifar::load(kind, &data.root, Split::Train)?;
            let mut val = Cifar::load(kind, &data.root, Split::Test)?;
            if data.coarse_labels {
                train = train.with_coarse_labels()?;
                val = val.with_coarse_labels()?;
            }
            (Arc::new(train), Arc::new(val), None)
        }
        DatasetKind::Imagefolder => {
            let train = ImageFolder::open(&data.root.join("train"), None)?;
            let classes = train.classes().to_vec();
            let val_dir = data.root.join("val");
            let val = match &data.val_labels {
                Some(labels) => ImageFolder::open_flat(&val_dir, labels, &classes)
                    .context("config key data.val_labels")?,
                None => ImageFolder::open(&val_dir, Some(&classes)).map_err(|e| {
                    let flat = val_dir.is_dir()
                        && std::fs::read_dir(&val_dir).is_ok_and(|entries| {
                            entries.flatten().any(|e| e.path().is_file())
                        });
                    if flat {
                        anyhow!(
                            "{e}; {} holds images directly: set data.val_labels to the file of `<image> <class>` lines that labels them",
                            val_dir.display()
                        )
                    } else {
                        e.into()
                    }
                })?,
            };
            for (split, folder) in [("train", &train), ("val", &val)] {
                for class in folder.empty_classes() {
                    warnings.push(format!(
                        "warning: {} has no images (the class keeps its label)",
                        data.root.join(split).join(class).display()
                    ));
                }
            }
            (Arc::new(train), Arc::new(val), Some(classes))
        }
    };
    let num_classes = train.num_classes();
    if num_classes > config.model.num_classes {
        bail!(
            "config key model.num_classes: the dataset at {} has {num_classes} classes, the model only {}",
            data.root.display(),
            config.model.num_classes
        );
    }
    let size = data.image_size;
    let (train_transform, val_transform, mean, std) = match data.transform_kind() {
        TransformKind::Cifar => (
            Transform::CifarTrain { size, padding: 4 },
            Transform::CifarEval { size },
            CIFAR_MEAN,
            CIFAR_STD,
        ),
        TransformKind::Imagenet => (
            Transform::ImageNetTrain {
                size,
                color: ColorAugment {
                    jitter: data.color_jitter,
                    lighting: data.lighting,
                },
            },
            Transform::ImageNetEval { size },
            IMAGENET_MEAN,
            IMAGENET_STD,
        ),
    };
    let loader_config = |shuffle: bool| LoaderConfig {
        batch_size: config.train.batch_size,
        shuffle,
        drop_last: false,
        workers: data.workers,
        prefetch: data.prefetch,
        seed: config.seed,
        strict: data.strict,
    };
    let train_indices = subset(config.seed, 0, train.len(), data.train_limit);
    let val_indices = subset(config.seed, 1, val.len(), data.val_limit);
    Ok(Datasets {
        train: Loader::new(
            train,
            train_indices,
            train_transform,
            mean,
            std,
            loader_config(true),
        ),
        val: Loader::new(
            val,
            val_indices,
            val_transform,
            mean,
            std,
            loader_config(false),
        ),
        num_classes,
        classes,
        warnings,
    })
}
