//! Occlusion (the paper's Figure 5a): a centred `s x s` hole whose pixels are filled (centre
//! occlusion), or everything outside it filled (boundary occlusion).

use serde::Serialize;

/// Which part of the image is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Occlusion {
    /// Fill the centred hole.
    Centre,
    /// Fill everything outside the centred hole.
    Boundary,
}

/// What "zero" means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Raw black pixels (0 before normalisation).
    Black,
    /// The normalisation's mean (0 after normalisation), what zeroing the network's input does.
    Mean,
}

impl Fill {
    /// The normalised value per channel.
    pub fn value(self, black: [f32; 3]) -> [f32; 3] {
        match self {
            Fill::Black => black,
            Fill::Mean => [0.0; 3],
        }
    }
}

/// The rows and columns `[start, end)` of the centred `side x side` hole of a `size` image.
pub fn centred(size: usize, side: usize) -> (usize, usize) {
    let side = side.min(size);
    let start = (size - side) / 2;
    (start, start + side)
}

/// Occludes every `[3][size][size]` image of `images` in place.
pub fn occlude(images: &mut [f32], size: usize, side: usize, kind: Occlusion, fill: [f32; 3]) {
    let (start, end) = centred(size, side);
    for (k, channel) in images.chunks_exact_mut(size * size).enumerate() {
        let value = fill[k % 3];
        for (y, row) in channel.chunks_exact_mut(size).enumerate() {
            for (x, v) in row.iter_mut().enumerate() {
                let inside = (start..end).contains(&y) && (start..end).contains(&x);
                if inside == (kind == Occlusion::Centre) {
                    *v = value;
                }
            }
        }
    }
}

/// Top-1 error (a fraction) per occlusion kind and hole side.
#[derive(Clone, Debug, PartialEq)]
pub struct OcclusionSweep {
    pub images: usize,
    pub errors: Vec<(Occlusion, Vec<f64>)>,
}

/// Every `kinds` x `sides` occlusion of the images of `loader`, filled with `fill`: each batch
/// is decoded once and occluded in every way.
pub fn occlusion_sweep(
    subject: &super::Subject,
    loader: &cutmix_data::Loader,
    kinds: &[Occlusion],
    sides: &[usize],
    fill: Fill,
) -> anyhow::Result<OcclusionSweep> {
    let value = fill.value(subject.black());
    let mut wrong = vec![vec![0usize; sides.len()]; kinds.len()];
    let mut images = 0;
    super::each_batch(loader, "occlusion", |batch| {
        let (n, size) = (batch.len(), batch.size);
        for (kind, counts) in kinds.iter().zip(&mut wrong) {
            for (&side, count) in sides.iter().zip(counts.iter_mut()) {
                let mut occluded = batch.images.clone();
                occlude(&mut occluded, size, side, *kind, value);
                let logits = subject.logits(occluded, n, size);
                *count += super::top1_wrong(&logits, subject.classes, &batch.labels);
            }
        }
        images += n;
        Ok(())
    })?;
    Ok(OcclusionSweep {
        images,
        errors: super::rates(kinds, wrong, images),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hole_is_centred_and_the_two_kinds_are_complements() {
        assert_eq!(centred(32, 0), (16, 16));
        assert_eq!(centred(32, 5), (13, 18));
        assert_eq!(centred(32, 32), (0, 32));
        let size = 6;
        let image: Vec<f32> = (0..3 * size * size).map(|v| v as f32 + 1.0).collect();
        let fill = [-1.0, -2.0, -3.0];
        let mut centre = image.clone();
        occlude(&mut centre, size, 2, Occlusion::Centre, fill);
        let mut boundary = image.clone();
        occlude(&mut boundary, size, 2, Occlusion::Boundary, fill);
        let mut filled = 0;
        for i in 0..image.len() {
            let (c, y, x) = (i / 36, i / 6 % 6, i % 6);
            let inside = (2..4).contains(&y) && (2..4).contains(&x);
            assert_eq!(centre[i], if inside { fill[c] } else { image[i] });
            assert_eq!(boundary[i], if inside { image[i] } else { fill[c] });
            filled += usize::from(inside);
        }
        assert_eq!(filled, 12);
        let mut none = image.clone();
        occlude(&mut none, size, 0, Occlusion::Centre, fill);
        assert_eq!(none, image);
        assert_eq!(Fill::Mean.value([0.5; 3]), [0.0; 3]);
    }
}
