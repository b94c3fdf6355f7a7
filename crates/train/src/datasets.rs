//! Builds the training and validation loaders a config asks for.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rand::seq::SliceRandom;

use cutmix_data::{
    CIFAR_MEAN, CIFAR_STD, Cifar, CifarKind, ColorAugment, Dataset, IMAGENET_MEAN, IMAGENET_STD,
    ImageFolder, Loader, LoaderConfig, Pad, Split, Stream, Transform, keyed_rng, open_cub,
};

use crate::config::{Config, DatasetKind, PadMode, TransformKind};

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

fn cifar_kind(dataset: DatasetKind) -> CifarKind {
    if dataset == DatasetKind::Cifar10 {
        CifarKind::Cifar10
    } else {
        CifarKind::Cifar100
    }
}

/// Opens one CIFAR split, with coarse labels when the config asks.
fn open_cifar(config: &Config, split: Split) -> Result<Cifar> {
    let data = &config.data;
    let cifar = Cifar::load(cifar_kind(data.dataset), &data.root, split)?;
    Ok(if data.coarse_labels {
        cifar.with_coarse_labels()?
    } else {
        cifar
    })
}

/// Opens `root/val`: class folders numbered as `classes`, or a flat folder labelled by
/// `data.val_labels`.
fn open_val_folder(config: &Config, classes: &[String]) -> Result<ImageFolder> {
    let data = &config.data;
    let val_dir = data.root.join("val");
    Ok(match &data.val_labels {
        Some(labels) => ImageFolder::open_flat(&val_dir, labels, classes)
            .context("config key data.val_labels")?,
        None => ImageFolder::open(&val_dir, Some(classes)).map_err(|e| {
            let flat = val_dir.is_dir()
                && std::fs::read_dir(&val_dir)
                    .is_ok_and(|entries| entries.flatten().any(|e| e.path().is_file()));
            if flat {
                anyhow!(
                    "{e}; {} holds images directly: set data.val_labels to the file of `<image> <class>` lines that labels them",
                    val_dir.display()
                )
            } else {
                e.into()
            }
        })?,
    })
}

/// The training and validation transforms and the normalisation.
fn transforms(config: &Config) -> (Transform, Transform, [f32; 3], [f32; 3]) {
    let data = &config.data;
    let size = data.image_size;
    match data.transform_kind() {
        TransformKind::Cifar => (
            Transform::CifarTrain {
                size,
                padding: 4,
                pad: match data.pad_mode {
                    PadMode::Zeros => Pad::Zeros,
                    PadMode::Mean => Pad::Mean,
                    PadMode::Reflect => Pad::Reflect,
                    PadMode::Edge => Pad::Edge,
                },
            },
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
        TransformKind::Wsol => (
            Transform::WsolTrain { size },
            Transform::WsolEval { size },
            IMAGENET_MEAN,
            IMAGENET_STD,
        ),
    }
}

fn loader_config(config: &Config, shuffle: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size: config.train.batch_size,
        shuffle,
        drop_last: false,
        workers: config.data.workers,
        prefetch: config.data.prefetch,
        seed: config.seed,
        strict: config.data.strict,
    }
}

fn check_classes(config: &Config, num_classes: usize) -> Result<()> {
    if num_classes > config.model.num_classes {
        bail!(
            "config key model.num_classes: the dataset at {} has {num_classes} classes, the model only {}",
            config.data.root.display(),
            config.model.num_classes
        );
    }
    Ok(())
}

fn val_loader(config: &Config, val: Arc<dyn Dataset>) -> Loader {
    let indices = val_subset(config, val.len());
    val_loader_over(config, val, indices)
}

/// The validation examples `data.val_limit` keeps (`None`: all of them, in order).
pub fn val_subset(config: &Config, len: usize) -> Option<Vec<usize>> {
    subset(config.seed, 1, len, config.data.val_limit)
}

/// A loader over `indices` of `val` (all of them when `None`), in order, with the config's
/// evaluation transform and batch size.
pub fn val_loader_over(
    config: &Config,
    val: Arc<dyn Dataset>,
    indices: Option<Vec<usize>>,
) -> Loader {
    let (transform, mean, std) = eval_transform(config);
    Loader::new(
        val,
        indices,
        transform,
        mean,
        std,
        loader_config(config, false),
    )
}

/// Opens the datasets and wraps them in loaders.
pub fn build(config: &Config) -> Result<Datasets> {
    let data = &config.data;
    let mut warnings = Vec::new();
    let (train, val, classes): (Arc<dyn Dataset>, Arc<dyn Dataset>, _) = match data.dataset {
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => (
            Arc::new(open_cifar(config, Split::Train)?),
            Arc::new(open_cifar(config, Split::Test)?),
            None,
        ),
        DatasetKind::Imagefolder => {
            let train = ImageFolder::open(&data.root.join("train"), None)?;
            let classes = train.classes().to_vec();
            let val = open_val_folder(config, &classes)?;
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
        DatasetKind::Cub => {
            let train = open_cub(&data.root, Split::Train)?;
            let classes = train.classes().to_vec();
            let val = open_cub(&data.root, Split::Test)?;
            (Arc::new(train), Arc::new(val), Some(classes))
        }
    };
    let num_classes = train.num_classes();
    check_classes(config, num_classes)?;
    let (train_transform, _, mean, std) = transforms(config);
    let train_indices = subset(config.seed, 0, train.len(), data.train_limit);
    Ok(Datasets {
        train: Loader::new(
            train,
            train_indices,
            train_transform,
            mean,
            std,
            loader_config(config, true),
        ),
        val: val_loader(config, val),
        num_classes,
        classes,
        warnings,
    })
}

/// The validation loader alone (what `eval` needs): CIFAR's test file, or `root/val` with the
/// class numbering taken from the names of `root/train`'s class folders (their files are not
/// listed), or from `root/val`'s own folders when there is no `root/train`.
pub fn build_val(config: &Config) -> Result<Loader> {
    Ok(val_loader(config, val_dataset(config)?))
}

/// The validation split [`build_val`] loads, unsubsampled (`data.val_limit` not applied).
pub fn val_dataset(config: &Config) -> Result<Arc<dyn Dataset>> {
    let val: Arc<dyn Dataset> = match config.data.dataset {
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => Arc::new(open_cifar(config, Split::Test)?),
        DatasetKind::Imagefolder | DatasetKind::Cub => Arc::new(val_images(config)?),
    };
    check_classes(config, val.num_classes())?;
    Ok(val)
}

/// The evaluation transform of a config and its normalisation (mean, std).
pub fn eval_transform(config: &Config) -> (Transform, [f32; 3], [f32; 3]) {
    let (_, transform, mean, std) = transforms(config);
    (transform, mean, std)
}

/// `root/val` of an `imagefolder` config, classes numbered as [`build_val`] numbers them, or
/// CUB's test split.
fn val_images(config: &Config) -> Result<ImageFolder> {
    let root = &config.data.root;
    if config.data.dataset == DatasetKind::Cub {
        return Ok(open_cub(root, Split::Test)?);
    }
    let train_dir = root.join("train");
    let classes = if train_dir.is_dir() {
        ImageFolder::class_names(&train_dir)?
    } else {
        ImageFolder::class_names(&root.join("val"))?
    };
    open_val_folder(config, &classes)
}

/// The validation images of an `imagefolder` config with what an analysis needs to know of
/// each (its file, for names and sizes), and the loader over them: the loader visits
/// `order`, batch after batch.
pub struct ValImages {
    pub folder: Arc<ImageFolder>,
    pub order: Vec<usize>,
    pub loader: Loader,
    /// The evaluation transform the loader applies, and its normalisation.
    pub transform: Transform,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// [`ValImages`] of an `imagefolder` or `cub` config (the analyses that need image files:
/// boxes).
pub fn val_images_with_files(config: &Config) -> Result<ValImages> {
    if !matches!(
        config.data.dataset,
        DatasetKind::Imagefolder | DatasetKind::Cub
    ) {
        bail!(
            "config key data.dataset: localization reads its images' files and sizes, which needs dataset = \"imagefolder\" or \"cub\" (got {:?})",
            config.data.dataset
        );
    }
    let folder = Arc::new(val_images(config)?);
    check_classes(config, folder.num_classes())?;
    let indices = val_subset(config, folder.len());
    let order = indices
        .clone()
        .unwrap_or_else(|| (0..folder.len()).collect());
    let loader = val_loader_over(config, folder.clone(), indices);
    let (transform, mean, std) = eval_transform(config);
    Ok(ValImages {
        folder,
        order,
        loader,
        transform,
        mean,
        std,
    })
}
