//! Weakly-supervised localization of a model on a validation folder with ground-truth boxes:
//! the class activation map of each image's ground-truth class, its boxes, and the metrics of
//! `cutmix_analysis::localization` (the paper's Table 9, wsolevaluation's MaxBoxAcc).

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

use cutmix_analysis::boxes::{PixelBox, Select, boxes_from_map};
use cutmix_analysis::cam;
use cutmix_analysis::localization::{LocalizationSummary, LocalizationTally};
use cutmix_data::BoxTable;
use cutmix_models::Model;

use crate::cam_figure::{CamRow, to_rgb};
use crate::config::Config;
use crate::datasets::{ValImages, val_images_with_files};
use crate::trainer::images_tensor;

/// The knobs of a localization pass.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// CAM threshold of top-1 / GT-known localization, a fraction of the map's maximum.
    pub threshold: f32,
    /// Spacing of MaxBoxAcc's threshold sweep in `[0, 1)`.
    pub sweep_step: f32,
    /// How many of the first images to keep for a figure ([`crate::cam_figure`]).
    pub figure_images: usize,
}

/// What a localization pass found.
pub struct Localization {
    pub summary: LocalizationSummary,
    /// Images with a ground-truth box that reached outside the evaluated crop (clipped to it).
    pub clipped: Vec<String>,
    /// The first `figure_images` images, for [`crate::cam_figure::write`].
    pub figure: Vec<CamRow>,
    /// The side of the evaluated crop.
    pub size: usize,
}

/// The boxes of image `name` (its path relative to the validation folder): looked up by that
/// path, then by its file name, then by its file name without the extension (ImageNet's
/// `ImageId`).
fn boxes_of<'a>(table: &'a BoxTable, name: &str) -> Result<&'a [[f32; 4]]> {
    let file = name.rsplit('/').next().unwrap_or(name);
    let stem = file.rsplit_once('.').map_or(file, |(stem, _)| stem);
    for key in [name, file, stem] {
        if let Some(boxes) = table.boxes.get(key) {
            return Ok(boxes);
        }
    }
    Ok(table.get(name)?)
}

/// The classifier's weight as `[classes, channels]` on the host (Burn keeps `[channels,
/// classes]`).
fn classifier_weight(model: &Model) -> (Vec<f32>, usize) {
    let weight = model.classifier().weight.val().transpose();
    let [classes, _] = weight.dims();
    let values = weight
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 weights");
    (values, classes)
}

/// Localizes every validation image of `config` with `model` (in evaluation mode) against
/// `boxes`.
pub fn localize(
    model: &Model,
    config: &Config,
    boxes: &BoxTable,
    options: Options,
    device: &Device,
) -> Result<Localization> {
    let ValImages {
        folder,
        order,
        loader,
        transform,
        mean,
        std,
    } = val_images_with_files(config)?;
    let size = transform.size();
    let (weight, classes) = classifier_weight(model);
    let mut tally = LocalizationTally::new(options.threshold, options.sweep_step);
    let mut clipped = Vec::new();
    let mut figure = Vec::new();
    let mut next = 0;
    for batch in loader.epoch(0) {
        let batch = crate::analyze::readable(batch?)?;
        let pixels = 3 * size * size;
        let wanted = options
            .figure_images
            .saturating_sub(figure.len())
            .min(batch.len());
        let shown: Vec<Vec<u8>> = (0..wanted)
            .map(|i| to_rgb(&batch.images[i * pixels..(i + 1) * pixels], size, mean, std))
            .collect();
        let (images, labels) = images_tensor(batch, device);
        let features = cutmix_kernels::on_cpu_threads(device, || model.features(images));
        let [n, channels, h, w] = features.dims();
        let pooled: Tensor<2> = features
            .clone()
            .mean_dim(3)
            .mean_dim(2)
            .reshape([n, channels]);
        let logits = model.classifier().forward(pooled);
        let predicted = logits
            .argmax(1)
            .into_data()
            .try_into_vec_as::<i64>()
            .expect("indices");
        let features = features
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 features");
        let plane = channels * h * w;
        let mut images = Vec::with_capacity(labels.len());
        for (i, &label) in labels.iter().enumerate() {
            let index = order[next];
            next += 1;
            let name = folder.name(index);
            let truth = truth_boxes(&folder, index, boxes, &transform, &mut clipped)
                .with_context(|| format!("image {name}"))?;
            if label >= classes {
                bail!("image {name}: label {label} is not a class of the model ({classes})");
            }
            images.push((i, label, truth));
        }
        // The maps and the threshold sweep, image by image in parallel, counted in order.
        let scores: Vec<_> = images
            .par_iter()
            .map(|(i, label, truth)| {
                let features = &features[i * plane..(i + 1) * plane];
                let map = cam::cam(features, [channels, h, w], &weight, *label, [size, size]);
                tally.score(&map, [size, size], truth, predicted[*i] as usize == *label)
            })
            .collect();
        for score in &scores {
            tally.add_score(score);
        }
        for (image, (i, label, truth)) in shown.into_iter().zip(&images) {
            let features = &features[i * plane..(i + 1) * plane];
            let map = |class| cam::cam(features, [channels, h, w], &weight, class, [size, size]);
            let truth_map = map(*label);
            let found =
                boxes_from_map(&truth_map, [size, size], options.threshold, Select::Largest);
            let name = |class: usize| {
                folder
                    .classes()
                    .get(class)
                    .cloned()
                    .unwrap_or_else(|| class.to_string())
            };
            figure.push(CamRow {
                image,
                predicted_map: map(predicted[*i] as usize),
                truth_map,
                truth: truth.clone(),
                found: found.first().copied(),
                truth_class: name(*label),
                predicted_class: name(predicted[*i] as usize),
            });
        }
    }
    Ok(Localization {
        summary: tally.summary(),
        clipped,
        figure,
        size,
    })
}

/// Image `index`'s ground-truth boxes in the pixels of the evaluated crop (clipped to it; the
/// image's name is pushed on `clipped` when that changed a box).
fn truth_boxes(
    folder: &cutmix_data::ImageFolder,
    index: usize,
    table: &BoxTable,
    transform: &cutmix_data::Transform,
    clipped: &mut Vec<String>,
) -> Result<Vec<PixelBox>> {
    use cutmix_data::Dataset;
    let name = folder.name(index);
    let raw = boxes_of(table, name)?;
    let (sample, _) = folder.get(index)?;
    let (width, height) = sample.dimensions()?;
    let size = transform.size();
    let mut out = Vec::with_capacity(raw.len());
    for &b in raw {
        if b[0] < 0.0 || b[1] < 0.0 || b[2] > width as f32 || b[3] > height as f32 {
            clipped.push(format!(
                "{name} (box {b:?} outside its {width}x{height} image)"
            ));
        }
        let Some([x0, y0, x1, y1]) = transform.map_box(b, width, height) else {
            bail!("localization needs an evaluation transform with a fixed crop");
        };
        let (inside, changed) = PixelBox::new(x0, y0, x1, y1).clipped(size, size);
        if changed && !clipped.last().is_some_and(|c| c.starts_with(name)) {
            clipped.push(format!(
                "{name} (box reaches outside the {size}x{size} crop)"
            ));
        }
        out.push(inside);
    }
    Ok(out)
}
