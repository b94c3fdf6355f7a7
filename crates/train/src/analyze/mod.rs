//! The paper's robustness and uncertainty analyses (its Section 4.4, Tables 11 and 12, Figure
//! 5) on a weights file and a config's validation split: FGSM, centre and boundary occlusion,
//! in-between-class samples, out-of-distribution detection and calibration. The metric code
//! lives in `cutmix-analysis` (plain slices, checked against scikit-learn and PyTorch); this
//! module feeds it: it loads the images, perturbs them (on the host, in normalised pixels, or on
//! the device for the gradient-based attacks) and runs the model.

pub mod attack;
pub mod between;
pub mod figures;
pub mod occlusion;
pub mod ood;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use cutmix_data::{Batch, Loader};
use cutmix_models::Model;

use crate::config::Config;
use crate::trainer::progress_bar;

/// A model to analyse: its inference copy on the device (running BatchNorm statistics), and
/// the normalisation its inputs take.
pub struct Subject {
    pub model: Model,
    pub device: Device,
    pub classes: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Subject {
    /// `model` (loaded on `device`) in evaluation mode, with `config`'s normalisation.
    pub fn new(model: &Model, config: &Config, device: &Device) -> Self {
        let (_, mean, std) = crate::datasets::eval_transform(config);
        Self {
            model: model.valid(),
            device: device.clone(),
            classes: config.model.num_classes,
            mean,
            std,
        }
    }

    /// The logits tensor of `n` normalised `[3][size][size]` images, on the device.
    fn forward(&self, images: Vec<f32>, n: usize, size: usize) -> Tensor<2> {
        let input =
            Tensor::<4>::from_data(TensorData::new(images, [n, 3, size, size]), &self.device);
        cutmix_kernels::on_cpu_threads(&self.device, || self.model.forward(input))
    }

    /// `[n][classes]` logits of `n` normalised `[3][size][size]` images.
    pub fn logits(&self, images: Vec<f32>, n: usize, size: usize) -> Vec<f32> {
        host(self.forward(images, n, size))
    }

    /// `[n][classes]` softmax probabilities of `logits / temperature`, on the device.
    pub fn probabilities(
        &self,
        images: Vec<f32>,
        n: usize,
        size: usize,
        temperature: f32,
    ) -> Vec<f32> {
        let logits = self.forward(images, n, size);
        host(softmax(logits.div_scalar(temperature), 1))
    }

    /// The normalised value of a black pixel, per channel.
    pub fn black(&self) -> [f32; 3] {
        std::array::from_fn(|c| -self.mean[c] / self.std[c])
    }
}

/// A tensor's values on the host.
pub fn host<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 tensors")
}

/// The predicted class (first maximum) of each `[classes]` row.
pub fn predictions(logits: &[f32], classes: usize) -> Vec<usize> {
    logits
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// `batch`, or an error naming its first unreadable image: an analysis compares the same
/// images across settings and files, so it cannot skip one.
pub fn readable(batch: Batch) -> Result<Batch> {
    if let Some(skipped) = batch.skipped.first() {
        bail!(
            "{}: unreadable ({}); the analyses need every image (remove it, or set data.strict = true to stop at the first)",
            skipped.path.display(),
            skipped.reason
        );
    }
    Ok(batch)
}

/// Every batch of `loader` (a progress bar on the terminal, labelled `what`); an unreadable
/// image is an error, since an analysis compares the same images across settings and files.
pub fn each_batch(
    loader: &Loader,
    what: &str,
    mut visit: impl FnMut(Batch) -> Result<()>,
) -> Result<()> {
    let bar = progress_bar(loader.num_batches(), format!("  {what}"));
    for batch in loader.epoch(0) {
        visit(readable(batch?)?)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Each key's counts as fractions of `total` (0 when `total` is 0).
pub fn rates<K: Copy>(keys: &[K], counts: Vec<Vec<usize>>, total: usize) -> Vec<(K, Vec<f64>)> {
    keys.iter()
        .zip(counts)
        .map(|(&key, counts)| {
            let share = |c: usize| c as f64 / total.max(1) as f64;
            (key, counts.into_iter().map(share).collect())
        })
        .collect()
}

/// Percent with two decimals, as the other tools print them.
pub fn percent(fraction: f64) -> f64 {
    (fraction * 10000.0).round() / 100.0
}

/// The logits and labels of every image of `loader`, in order.
pub fn logits_of(subject: &Subject, loader: &Loader) -> Result<(Vec<f32>, Vec<usize>)> {
    let (mut logits, mut labels) = (Vec::new(), Vec::new());
    each_batch(loader, "forward", |batch| {
        let (n, size) = (batch.len(), batch.size);
        logits.extend(subject.logits(batch.images, n, size));
        labels.extend(batch.labels);
        Ok(())
    })?;
    Ok((logits, labels))
}

/// How many of `logits`' top-1 predictions miss `labels`.
pub fn top1_wrong(logits: &[f32], classes: usize, labels: &[usize]) -> usize {
    predictions(logits, classes)
        .iter()
        .zip(labels)
        .filter(|(p, l)| p != l)
        .count()
}
