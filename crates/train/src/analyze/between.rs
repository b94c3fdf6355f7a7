//! In-between-class samples (the paper's Figure 5b): two validation images of different
//! classes mixed by Mixup (`lam x_A + (1 - lam) x_B`) or by CutMix (x_A with a centred square
//! of x_B covering `1 - lam` of it); the measure is the rate of predicting neither class.

use serde::Serialize;

use cutmix_data::{Loader, Stream, keyed_rng};
use rand::RngExt;

use super::occlusion::centred;
use crate::config::Config;
use crate::datasets;

/// How a pair is mixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    Mixup,
    Cutmix,
}

/// The side of the centred square of image B that leaves `lam` of a `size` image to A
/// (`round(size * sqrt(1 - lam))`).
pub fn cutmix_side(size: usize, lam: f64) -> usize {
    ((size as f64) * (1.0 - lam).clamp(0.0, 1.0).sqrt()).round() as usize
}

/// The pair `a`, `b` (each `[n][3][size][size]`, normalised) mixed at `lam`, in `a`'s place.
/// Normalisation is affine, so mixing normalised images equals normalising mixed pixels.
pub fn mix(a: &mut [f32], b: &[f32], size: usize, lam: f64, how: Mix) {
    match how {
        Mix::Mixup => {
            let lam = lam as f32;
            for (x, y) in a.iter_mut().zip(b) {
                *x = lam * *x + (1.0 - lam) * y;
            }
        }
        Mix::Cutmix => {
            let (start, end) = centred(size, cutmix_side(size, lam));
            for (plane_a, plane_b) in a
                .chunks_exact_mut(size * size)
                .zip(b.chunks_exact(size * size))
            {
                for y in start..end {
                    plane_a[y * size + start..y * size + end]
                        .copy_from_slice(&plane_b[y * size + start..y * size + end]);
                }
            }
        }
    }
}

/// The rate (a fraction) of predicting neither class of a pair, per method and lambda.
#[derive(Clone, Debug, PartialEq)]
pub struct BetweenSweep {
    /// Pairs of different classes counted (pairs of one class, drawn only from datasets that
    /// do not hold their labels, are not counted).
    pub pairs: usize,
    pub neither: Vec<(Mix, Vec<f64>)>,
}

/// Pairs `(a[i], b[i])` of the images the two loaders visit in step (the same batch size),
/// mixed by each method at each lambda.
pub fn between_sweep(
    subject: &super::Subject,
    (first, second): (&cutmix_data::Loader, &cutmix_data::Loader),
    methods: &[Mix],
    lambdas: &[f64],
) -> anyhow::Result<BetweenSweep> {
    let mut neither = vec![vec![0usize; lambdas.len()]; methods.len()];
    let mut pairs = 0;
    let mut partners = second.epoch(0);
    super::each_batch(first, "in-between pairs", |a| {
        let b = partners
            .next()
            .ok_or_else(|| anyhow::anyhow!("the two pair loaders differ in length"))??;
        let b = super::readable(b)?;
        let (n, size) = (a.len(), a.size);
        let keep: Vec<bool> = a
            .labels
            .iter()
            .zip(&b.labels)
            .map(|(x, y)| x != y)
            .collect();
        for (method, counts) in methods.iter().zip(&mut neither) {
            for (&lam, count) in lambdas.iter().zip(counts.iter_mut()) {
                let mut mixed = a.images.clone();
                mix(&mut mixed, &b.images, size, lam, *method);
                let predicted =
                    super::predictions(&subject.logits(mixed, n, size), subject.classes);
                *count += (0..n)
                    .filter(|&i| {
                        keep[i] && predicted[i] != a.labels[i] && predicted[i] != b.labels[i]
                    })
                    .count();
            }
        }
        pairs += keep.iter().filter(|&&k| k).count();
        Ok(())
    })?;
    Ok(BetweenSweep {
        pairs,
        neither: super::rates(methods, neither, pairs),
    })
}

/// Two loaders over `pairs` random validation pairs (0: as many as the validation split, after
/// `data.val_limit`), drawn from the config's seed: image `i` of the first is paired with image
/// `i` of the second. When the dataset knows its labels without reading images (CIFAR, image
/// folders, CUB) every pair is of two classes; otherwise pairs of one class are drawn too, and
/// [`between_sweep`] does not count them.
pub fn pair_loaders(config: &Config, pairs: usize) -> anyhow::Result<(Loader, Loader)> {
    let val = datasets::val_dataset(config)?;
    let pool = datasets::val_subset(config, val.len()).unwrap_or_else(|| (0..val.len()).collect());
    let count = if pairs == 0 { pool.len() } else { pairs };
    let classes: std::collections::BTreeSet<_> = pool.iter().map(|&i| val.label(i)).collect();
    anyhow::ensure!(
        classes.len() != 1 || classes.contains(&None),
        "in-between pairs need validation images of two classes at least"
    );
    let mut rng = keyed_rng(config.seed, Stream::Analysis, 2, 0);
    let (mut a, mut b) = (Vec::with_capacity(count), Vec::with_capacity(count));
    while a.len() < count {
        let (i, j) = (
            pool[rng.random_range(0..pool.len())],
            pool[rng.random_range(0..pool.len())],
        );
        let same = matches!((val.label(i), val.label(j)), (Some(x), Some(y)) if x == y);
        if !same {
            a.push(i);
            b.push(j);
        }
    }
    Ok((
        datasets::val_loader_over(config, val.clone(), Some(a)),
        datasets::val_loader_over(config, val, Some(b)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixup_blends_and_cutmix_pastes_a_centred_square_of_the_right_area() {
        let size = 8;
        let a = vec![1.0f32; 3 * size * size];
        let b = vec![3.0f32; 3 * size * size];
        let mut m = a.clone();
        mix(&mut m, &b, size, 0.25, Mix::Mixup);
        assert!(m.iter().all(|&v| (v - 2.5).abs() < 1e-6));
        for (lam, side) in [(1.0, 0), (0.75, 4), (0.0, 8)] {
            assert_eq!(cutmix_side(size, lam), side);
            let mut c = a.clone();
            mix(&mut c, &b, size, lam, Mix::Cutmix);
            let from_b = c.iter().filter(|&&v| v == 3.0).count();
            assert_eq!(from_b, 3 * side * side, "lam {lam}");
            let (start, _) = centred(size, side);
            if side > 0 {
                assert_eq!(c[start * size + start], 3.0);
            }
        }
    }
}
