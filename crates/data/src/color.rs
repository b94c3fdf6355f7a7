//! The CutMix reference's ImageNet colour augmentation (its `utils.py`, ported from
//! fb.resnet.torch), on `[0, 1]` float images before normalisation, without clamping:
//!
//! - colour jitter: brightness, contrast and saturation in a random order, each blending the
//!   image with a target (black, the mean grey, the pixel's grey) by alpha ~ U(-var, var):
//!   `img + alpha * (target - img)`; grey is 0.299 R + 0.587 G + 0.114 B;
//! - PCA lighting (AlexNet): adds `eigvec * (alpha * eigval)` to every pixel, alpha ~ N(0, std)
//!   per component, with ImageNet's RGB eigenvalues and eigenvectors.

use rand::seq::SliceRandom;
use rand::{Rng, RngExt};
use rand_distr::{Distribution, Normal};

/// ImageNet's RGB covariance eigenvalues (the reference's `__imagenet_pca`).
pub const IMAGENET_EIGVAL: [f32; 3] = [0.2175, 0.0188, 0.0045];
/// ImageNet's RGB covariance eigenvectors, one per column.
pub const IMAGENET_EIGVEC: [[f32; 3]; 3] = [
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
];

/// Colour augmentation strengths; zero turns a part off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ColorAugment {
    /// Brightness, contrast and saturation strength (0.4 in the reference).
    pub jitter: f32,
    /// PCA lighting's alpha standard deviation (0.1 in the reference).
    pub lighting: f32,
}

/// One colour operation with its drawn strength.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Brightness(f32),
    Contrast(f32),
    Saturation(f32),
    /// The RGB offset added to every pixel.
    Lighting([f32; 3]),
}

impl ColorAugment {
    /// Whether anything is applied.
    pub fn is_off(&self) -> bool {
        self.jitter == 0.0 && self.lighting == 0.0
    }

    /// Draws the operations for one image: the jitter order (a shuffle of brightness,
    /// contrast, saturation), each one's alpha in that order, then lighting's three alphas.
    fn draw(&self, rng: &mut impl Rng) -> Vec<Op> {
        let mut ops = Vec::with_capacity(4);
        if self.jitter > 0.0 {
            let mut order = [0, 1, 2];
            order.shuffle(rng);
            for kind in order {
                let alpha = rng.random_range(-self.jitter..=self.jitter);
                ops.push(match kind {
                    0 => Op::Brightness(alpha),
                    1 => Op::Contrast(alpha),
                    _ => Op::Saturation(alpha),
                });
            }
        }
        if self.lighting > 0.0 {
            let normal = Normal::new(0.0, self.lighting).expect("a positive standard deviation");
            let alpha: [f32; 3] = std::array::from_fn(|_| normal.sample(rng));
            let offset = std::array::from_fn(|row| {
                (0..3)
                    .map(|col| IMAGENET_EIGVEC[row][col] * alpha[col] * IMAGENET_EIGVAL[col])
                    .sum()
            });
            ops.push(Op::Lighting(offset));
        }
        ops
    }

    /// Applies the augmentation in place to a channel-major `[3][pixels]` image in `[0, 1]`.
    pub fn apply(&self, image: &mut [f32], rng: &mut impl Rng) {
        for op in self.draw(rng) {
            apply_op(op, image);
        }
    }
}

/// 0.299 R + 0.587 G + 0.114 B of pixel `i`.
fn grey(image: &[f32], plane: usize, i: usize) -> f32 {
    0.299 * image[i] + 0.587 * image[plane + i] + 0.114 * image[2 * plane + i]
}

fn apply_op(op: Op, image: &mut [f32]) {
    let plane = image.len() / 3;
    match op {
        Op::Brightness(alpha) => image.iter_mut().for_each(|v| *v += alpha * (0.0 - *v)),
        Op::Contrast(alpha) => {
            let mean = (0..plane).map(|i| grey(image, plane, i)).sum::<f32>() / plane as f32;
            image.iter_mut().for_each(|v| *v += alpha * (mean - *v));
        }
        Op::Saturation(alpha) => {
            for i in 0..plane {
                let g = grey(image, plane, i);
                for c in 0..3 {
                    let v = &mut image[c * plane + i];
                    *v += alpha * (g - *v);
                }
            }
        }
        Op::Lighting(offset) => {
            for (c, delta) in offset.into_iter().enumerate() {
                image[c * plane..(c + 1) * plane]
                    .iter_mut()
                    .for_each(|v| *v += delta);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// A 2x2 image: red, green, blue and grey pixels.
    fn image() -> Vec<f32> {
        vec![
            0.9, 0.1, 0.2, 0.5, // R
            0.1, 0.8, 0.3, 0.5, // G
            0.0, 0.2, 0.7, 0.5, // B
        ]
    }

    #[test]
    fn each_operation_blends_towards_its_target() {
        let mut bright = image();
        apply_op(Op::Brightness(0.25), &mut bright);
        for (after, before) in bright.iter().zip(image()) {
            assert!((after - before * 0.75).abs() < 1e-6);
        }

        let mut saturated = image();
        apply_op(Op::Saturation(1.0), &mut saturated);
        // alpha 1 is the greyscale image: all three planes equal the grey of each pixel.
        for i in 0..4 {
            let g = grey(&image(), 4, i);
            for c in 0..3 {
                assert!((saturated[c * 4 + i] - g).abs() < 1e-6);
            }
        }

        let mut contrast = image();
        apply_op(Op::Contrast(1.0), &mut contrast);
        let mean = (0..4).map(|i| grey(&image(), 4, i)).sum::<f32>() / 4.0;
        assert!(contrast.iter().all(|v| (v - mean).abs() < 1e-6));

        let mut lit = image();
        apply_op(Op::Lighting([0.1, -0.2, 0.0]), &mut lit);
        assert!((lit[0] - 1.0).abs() < 1e-6 && (lit[5] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn a_grey_pixel_stays_grey_under_jitter_and_strengths_stay_in_range() {
        let augment = ColorAugment {
            jitter: 0.4,
            lighting: 0.0,
        };
        for seed in 0..50 {
            let ops = augment.draw(&mut StdRng::seed_from_u64(seed));
            assert_eq!(ops.len(), 3);
            let kinds: std::collections::BTreeSet<u8> = ops
                .iter()
                .map(|op| match op {
                    Op::Brightness(a) | Op::Contrast(a) | Op::Saturation(a) => {
                        assert!((-0.4..=0.4).contains(a));
                        match op {
                            Op::Brightness(_) => 0,
                            Op::Contrast(_) => 1,
                            _ => 2,
                        }
                    }
                    Op::Lighting(_) => unreachable!(),
                })
                .collect();
            assert_eq!(kinds.len(), 3, "each jitter once per image");
            let mut grey_image = vec![0.5; 12];
            augment.apply(&mut grey_image, &mut StdRng::seed_from_u64(seed));
            assert!(grey_image.iter().all(|v| (v - grey_image[0]).abs() < 1e-6));
        }
    }

    #[test]
    fn lighting_adds_the_same_offset_to_every_pixel_of_a_channel() {
        let augment = ColorAugment {
            jitter: 0.0,
            lighting: 0.1,
        };
        let mut lit = image();
        augment.apply(&mut lit, &mut StdRng::seed_from_u64(3));
        for c in 0..3 {
            let delta = lit[c * 4] - image()[c * 4];
            assert!(delta != 0.0);
            for i in 1..4 {
                assert!((lit[c * 4 + i] - image()[c * 4 + i] - delta).abs() < 1e-6);
            }
        }
        assert!(ColorAugment::default().is_off());
    }
}
