//! Batch-level mixing on device tensors: CutMix (Yun et al., 2019) as the reference does it,
//! with lambda corrected to the exact pasted area, returning mixed images and soft targets.
//!
//! The random draws (whether to mix, lambda, partners, box) are made on the host from the
//! caller's seeded generator, so a seed gives the same mixing on every backend; the pixels are
//! moved on the device.

mod cutmix;

pub use cutmix::{CutBox, CutMix, CutMixDraw};

use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;

/// A mixed batch.
#[derive(Debug, Clone)]
pub struct Mixed {
    /// `[batch, channels, h, w]` images after mixing.
    pub images: Tensor<4>,
    /// `[batch, num_classes]` soft targets; every row sums to 1.
    pub targets: Tensor<2>,
    /// Share of each image that is its own (1 when the batch was not mixed).
    pub lambda: f32,
}

impl Mixed {
    /// The batch as it is, with one-hot targets.
    pub fn unmixed(images: Tensor<4>, labels: &[usize], num_classes: usize) -> Self {
        let targets = soft_targets(labels, labels, 1.0, num_classes, &images.device());
        Self {
            images,
            targets,
            lambda: 1.0,
        }
    }
}

/// Which mixing a run applies to each training batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Mixing {
    /// No mixing: one-hot targets.
    None,
    CutMix(CutMix),
}

impl Mixing {
    /// Mixes a batch of `images` with host `labels` (`0..num_classes`).
    ///
    /// # Shapes
    /// - `images`: `[batch, channels, h, w]`
    /// - returned images `[batch, channels, h, w]`, targets `[batch, num_classes]`
    pub fn apply(
        &self,
        images: Tensor<4>,
        labels: &[usize],
        num_classes: usize,
        rng: &mut impl Rng,
    ) -> Mixed {
        match self {
            Self::None => Mixed::unmixed(images, labels, num_classes),
            Self::CutMix(cutmix) => cutmix.apply(images, labels, num_classes, rng),
        }
    }
}

/// `lambda * onehot(labels) + (1 - lambda) * onehot(partner_labels)`, built on the host.
///
/// # Shapes
/// - output: `[labels.len(), num_classes]`
pub fn soft_targets(
    labels: &[usize],
    partner_labels: &[usize],
    lambda: f32,
    num_classes: usize,
    device: &Device,
) -> Tensor<2> {
    let mut values = vec![0.0f32; labels.len() * num_classes];
    for (row, (&own, &partner)) in labels.iter().zip(partner_labels).enumerate() {
        values[row * num_classes + own] += lambda;
        values[row * num_classes + partner] += 1.0 - lambda;
    }
    Tensor::from_data(TensorData::new(values, [labels.len(), num_classes]), device)
}
