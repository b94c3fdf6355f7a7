//! Batch mixing on device tensors: CutMix (Yun et al., 2019) as the reference does it and per
//! image, Mixup and Cutout (the paper's baselines), and timm's switch between CutMix and Mixup,
//! returning mixed images and soft targets with lambda corrected to the exact pasted area.
//!
//! Every random draw (whether to mix, lambdas, partners, boxes) is made on the host from the
//! caller's seeded generator, so a seed gives the same mixing on every backend; the pixels are
//! moved on the device, with one batched mask for per-image boxes.

mod cutmix;
mod cutout;
mod mask;
mod mixup;
mod partner;
#[cfg(test)]
mod properties;

pub use cutmix::{Centre, CutBox, CutMix, Targets, Variant};
pub use cutout::Cutout;
pub use mask::box_masks;
pub use mixup::Mixup;
pub use partner::Partner;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, RngExt};

/// Whether one draw serves the whole batch or each image draws its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// One decision, lambda and box per batch (the reference).
    #[default]
    Batch,
    /// An independent decision, lambda and box per image.
    Elem,
}

/// A mixed batch.
#[derive(Debug, Clone)]
pub struct Mixed {
    /// `[batch, channels, h, w]` images after mixing.
    pub images: Tensor<4>,
    /// `[batch, num_classes]` soft targets; every row sums to 1.
    pub targets: Tensor<2>,
    /// Per image, the weight of its own label in its target (1 when not mixed).
    pub lambdas: Vec<f32>,
}

impl Mixed {
    /// The batch as it is, with one-hot targets.
    pub fn unmixed(images: Tensor<4>, labels: &[usize], num_classes: usize) -> Self {
        let targets = one_hot(labels, num_classes, &images.device());
        Self {
            images,
            targets,
            lambdas: vec![1.0; labels.len()],
        }
    }
}

/// The host-side draws of one mixed batch, whatever the method: image `i` keeps
/// `blends[i]` of itself outside `boxes[i]` and nothing inside it, and takes the rest from
/// image `partners[i]` (or from zeros with `zero_fill`, Cutout's case); its target is
/// `lambdas[i] * own + (1 - lambdas[i]) * partner`.
#[derive(Clone, Debug, PartialEq)]
pub struct Draw {
    pub partners: Vec<usize>,
    pub boxes: Vec<CutBox>,
    pub blends: Vec<f32>,
    pub lambdas: Vec<f32>,
    pub zero_fill: bool,
}

impl Draw {
    /// Nothing mixed.
    pub fn identity(batch: usize) -> Self {
        Self {
            partners: (0..batch).collect(),
            boxes: vec![CutBox::EMPTY; batch],
            blends: vec![1.0; batch],
            lambdas: vec![1.0; batch],
            zero_fill: false,
        }
    }

    /// Applies the draw to a batch.
    ///
    /// # Shapes
    /// - `images`: `[batch, channels, h, w]`
    /// - returned images `[batch, channels, h, w]`, targets `[batch, num_classes]`
    pub fn apply(&self, images: Tensor<4>, labels: &[usize], num_classes: usize) -> Mixed {
        let [batch, channels, height, width] = images.dims();
        let device = images.device();
        let partner_labels: Vec<usize> = self.partners.iter().map(|&p| labels[p]).collect();
        let targets = soft_targets(labels, &partner_labels, &self.lambdas, num_classes, &device);
        let identity_partners = self.partners.iter().enumerate().all(|(i, &p)| i == p);
        let no_boxes = self.boxes.iter().all(|b| b.area() == 0);
        let no_blend = self.blends.iter().all(|&b| b == 1.0);
        let images = if no_boxes && no_blend || identity_partners && !self.zero_fill {
            images
        } else if !self.zero_fill && no_blend && self.boxes.iter().all(|b| *b == self.boxes[0]) {
            // The reference's form: one box for the batch, pasted with a gather and a slice.
            let cut = self.boxes[0];
            let partners = self.partner_images(images.clone(), &device);
            let region = [0..batch, 0..channels, cut.y1..cut.y2, cut.x1..cut.x2];
            images.slice_assign(region.clone(), partners.slice(region))
        } else {
            // Per-image boxes and blends as one batched weight map.
            let inside = box_masks(&self.boxes, height, width, &device);
            let blends = Tensor::<4>::from_data(
                TensorData::new(self.blends.clone(), [batch, 1, 1, 1]),
                &device,
            );
            let own = (inside.neg() + 1.0) * blends;
            if self.zero_fill {
                images * own
            } else {
                let partners = self.partner_images(images.clone(), &device);
                images * own.clone() + partners * (own.neg() + 1.0)
            }
        };
        Mixed {
            images,
            targets,
            lambdas: self.lambdas.clone(),
        }
    }

    fn partner_images(&self, images: Tensor<4>, device: &Device) -> Tensor<4> {
        let order: Vec<i64> = self.partners.iter().map(|&p| p as i64).collect();
        let order =
            Tensor::<1, Int>::from_data(TensorData::new(order, [self.partners.len()]), device);
        images.select(0, order)
    }
}

/// timm's switch: each mixed batch (or image, in `Elem` mode) uses CutMix with probability
/// `switch_prob`, else Mixup; `cutmix.prob` is the share mixed at all; mode and partners are
/// CutMix's.
#[derive(Clone, Debug, PartialEq)]
pub struct CutMixOrMixup {
    pub cutmix: CutMix,
    pub mixup: Mixup,
    pub switch_prob: f64,
}

impl CutMixOrMixup {
    /// The draws for a `batch` of `height x width` images.
    pub fn draw(&self, batch: usize, height: usize, width: usize, rng: &mut impl Rng) -> Draw {
        let mut draw = Draw::identity(batch);
        draw.partners = self.cutmix.partner.draw(batch, rng);
        let decisions = match self.cutmix.mode {
            Mode::Batch => 1,
            Mode::Elem => batch,
        };
        for i in 0..decisions {
            if rng.random::<f64>() >= self.cutmix.prob {
                continue;
            }
            let rows = match self.cutmix.mode {
                Mode::Batch => 0..batch,
                Mode::Elem => i..i + 1,
            };
            if rng.random::<f64>() < self.switch_prob {
                let (cut, lambda) = self.cutmix.draw_box(height, width, rng);
                for row in rows {
                    draw.boxes[row] = cut;
                    draw.lambdas[row] = lambda;
                }
            } else {
                let lambda = self.mixup.draw_lambda(rng);
                for row in rows {
                    draw.blends[row] = lambda;
                    draw.lambdas[row] = lambda;
                }
            }
        }
        draw
    }
}

/// Which mixing a run applies to each training batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Mixing {
    /// No mixing: one-hot targets.
    None,
    CutMix(CutMix),
    Mixup(Mixup),
    Cutout(Cutout),
    CutMixOrMixup(CutMixOrMixup),
}

impl Mixing {
    /// The same mixing applied to `factor` times as many batches (or images): every
    /// probability of mixing at all scaled (scheduled CutMix ramps it over training).
    pub fn with_prob_scaled(&self, factor: f64) -> Mixing {
        let mut scaled = self.clone();
        match &mut scaled {
            Self::None => {}
            Self::CutMix(m) => m.prob *= factor,
            Self::Mixup(m) => m.prob *= factor,
            Self::Cutout(m) => m.prob *= factor,
            Self::CutMixOrMixup(m) => m.cutmix.prob *= factor,
        }
        scaled
    }

    /// The draws for a `batch` of `height x width` images.
    pub fn draw(&self, batch: usize, height: usize, width: usize, rng: &mut impl Rng) -> Draw {
        match self {
            Self::None => Draw::identity(batch),
            Self::CutMix(cutmix) => cutmix.draw(batch, height, width, rng),
            Self::Mixup(mixup) => mixup.draw(batch, rng),
            Self::Cutout(cutout) => cutout.draw(batch, height, width, rng),
            Self::CutMixOrMixup(switch) => switch.draw(batch, height, width, rng),
        }
    }

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
        let [batch, _, height, width] = images.dims();
        self.draw(batch, height, width, rng)
            .apply(images, labels, num_classes)
    }
}

/// `lambdas[i] * onehot(labels[i]) + (1 - lambdas[i]) * onehot(partner_labels[i])`, built on
/// the host.
///
/// # Shapes
/// - output: `[labels.len(), num_classes]`
pub fn soft_targets(
    labels: &[usize],
    partner_labels: &[usize],
    lambdas: &[f32],
    num_classes: usize,
    device: &Device,
) -> Tensor<2> {
    let mut values = vec![0.0f32; labels.len() * num_classes];
    for (row, ((&own, &partner), &lambda)) in
        labels.iter().zip(partner_labels).zip(lambdas).enumerate()
    {
        values[row * num_classes + own] += lambda;
        values[row * num_classes + partner] += 1.0 - lambda;
    }
    Tensor::from_data(TensorData::new(values, [labels.len(), num_classes]), device)
}

/// One-hot targets for `labels`.
///
/// # Shapes
/// - output: `[labels.len(), num_classes]`
pub fn one_hot(labels: &[usize], num_classes: usize, device: &Device) -> Tensor<2> {
    soft_targets(
        labels,
        labels,
        &vec![1.0; labels.len()],
        num_classes,
        device,
    )
}

/// Label smoothing applied to (soft) targets: `targets * (1 - epsilon) + epsilon / classes`,
/// the same as smoothing each one-hot before mixing (timm's order).
pub fn smooth_targets(targets: Tensor<2>, epsilon: f64) -> Tensor<2> {
    if epsilon == 0.0 {
        return targets;
    }
    let classes = targets.dims()[1] as f64;
    targets
        .mul_scalar(1.0 - epsilon)
        .add_scalar(epsilon / classes)
}
