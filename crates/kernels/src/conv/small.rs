//! Convolutions whose output maps have fewer than [`SMALL_MAP`] pixels (ResNet-18's 4x4 on
//! CIFAR, the 7x7 of ImageNet networks' last stage): several batch items per GEMM.
//!
//! One item's forward GEMM, `[out_channels, pixels]`, is one `gemm` transposes to make its
//! output column-major, so its register tiles run down the pixels: on 16 pixels that is one
//! 16-lane AVX-512 tile of the kernel's four (`gemm`'s `x1x6` edge kernel, which took 16% of
//! ResNet-18's CIFAR step, loads per fused multiply-add four times the main kernel's). Here a
//! group of items is unfolded side by side, `cols` `[rows, items * pixels]`, multiplied once
//! into a staging buffer `[out_channels, items * pixels]` and copied into each item's output.
//! The input gradient is, for stride 1, the same forward pass of the output gradient by the
//! flipped weight; for other strides it gathers the group's output gradients the same way,
//! multiplies once and folds each item's columns back.

use rayon::prelude::*;

use super::{ConvShape, flipped, fold, matmul, split, unfold};

/// Output maps with fewer pixels than this run in groups of items.
pub(super) const SMALL_MAP: usize = 64;

/// A group's GEMM spans at least this many columns (items times pixels) where the batch
/// allows it while every thread still has a group.
const GROUP_COLUMNS: usize = 128;

impl ConvShape {
    /// Whether the forward pass and input gradient run in groups of items.
    pub(super) fn runs_in_groups(&self) -> bool {
        self.output_pixels() < SMALL_MAP && self.batch > 1
    }

    /// Items per group: as many groups as possible, a multiple of the threads, each spanning
    /// [`GROUP_COLUMNS`] columns; one group per thread where the batch is too small for that.
    fn group(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        let pixels = self.output_pixels().max(1);
        let mut groups = threads.min(self.batch).max(1);
        while groups + threads <= self.batch
            && self.batch.div_ceil(groups + threads) * pixels >= GROUP_COLUMNS
        {
            groups += threads;
        }
        self.batch.div_ceil(groups)
    }
}

/// `[items, channels, pixels]` (items side by side in `src`) into `[channels, items * pixels]`.
fn gather(src: &[f32], channels: usize, pixels: usize, dst: &mut Vec<f32>) {
    let items = src.len() / (channels * pixels).max(1);
    let width = items * pixels;
    dst.resize(channels * width, 0.0);
    for (i, item) in src.chunks_exact(channels * pixels).enumerate() {
        for (c, plane) in item.chunks_exact(pixels).enumerate() {
            dst[c * width + i * pixels..][..pixels].copy_from_slice(plane);
        }
    }
}

/// The inverse of [`gather`]: `[channels, items * pixels]` into `[items, channels, pixels]`.
fn scatter(src: &[f32], channels: usize, pixels: usize, dst: &mut [f32]) {
    let width = src.len() / channels.max(1);
    for (i, item) in dst.chunks_exact_mut(channels * pixels).enumerate() {
        for (c, plane) in item.chunks_exact_mut(pixels).enumerate() {
            plane.copy_from_slice(&src[c * width + i * pixels..][..pixels]);
        }
    }
}

/// [`super::forward`] in groups of items ([`ConvShape::runs_in_groups`]).
pub(super) fn forward(x: &[f32], weight: &[f32], s: ConvShape) -> Vec<f32> {
    let mut output = vec![0f32; s.batch * s.output_len()];
    let group = s.group();
    let (_, parallelism) = split(s.batch.div_ceil(group));
    let (rows, pixels) = (s.rows(), s.output_pixels());
    output
        .par_chunks_mut(group * s.output_len())
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(cols, staged), (g, out)| {
                let items = out.len() / s.output_len();
                let width = items * pixels;
                cols.resize(rows * width, 0.0);
                for i in 0..items {
                    let n = g * group + i;
                    let image = &x[n * s.input_len()..(n + 1) * s.input_len()];
                    unfold(image, s, cols, width, i * pixels);
                }
                staged.resize(s.out_channels * width, 0.0);
                // SAFETY: staged is [out_channels, width], weight [out_channels, rows] and cols
                // [rows, width], all row-major; staged is a buffer of its own.
                unsafe {
                    matmul(
                        [s.out_channels, width, rows],
                        (staged.as_mut_ptr(), [width, 1]),
                        false,
                        (weight.as_ptr(), [rows, 1]),
                        (cols.as_ptr(), [width, 1]),
                        parallelism,
                    );
                }
                scatter(staged, s.out_channels, pixels, out);
            },
        );
    output
}

/// [`super::input_grad`] in groups of items ([`ConvShape::runs_in_groups`]): for stride 1 the
/// forward pass of the [`ConvShape::transposed`] convolution, else `Wᵀ · dy` folded back. On an
/// AMD Zen 4 (minimum of 11 runs, three rounds) the transposed forward pass took 29-31 ms at
/// 64x512x4x4 against 35-41 for the product and fold, which writes and reads back nine times
/// the gradient's values; 14-16 against 19-20 at 8x512x7x7.
pub(super) fn input_grad(weight: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    if let Some(transposed) = s.transposed() {
        return forward(output_grad, &flipped(weight, s), transposed);
    }
    let mut x_grad = vec![0f32; s.batch * s.input_len()];
    let group = s.group();
    let (_, parallelism) = split(s.batch.div_ceil(group));
    let (rows, pixels) = (s.rows(), s.output_pixels());
    let pointwise = s.is_pointwise();
    x_grad
        .par_chunks_mut(group * s.input_len())
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(dy, dcols, item_cols), (g, dx)| {
                let items = dx.len() / s.input_len();
                let width = items * pixels;
                let first = g * group * s.output_len();
                gather(
                    &output_grad[first..first + items * s.output_len()],
                    s.out_channels,
                    pixels,
                    dy,
                );
                dcols.resize(rows * width, 0.0);
                // SAFETY: dcols is [rows, width] row-major, weight [out_channels, rows] read as
                // its transpose [rows, out_channels], dy [out_channels, width]; dcols is a
                // buffer of its own.
                unsafe {
                    matmul(
                        [rows, width, s.out_channels],
                        (dcols.as_mut_ptr(), [width, 1]),
                        false,
                        (weight.as_ptr(), [1, rows]),
                        (dy.as_ptr(), [width, 1]),
                        parallelism,
                    );
                }
                if pointwise {
                    scatter(dcols, rows, pixels, dx);
                    return;
                }
                // Each item's columns, contiguous, folded into its gradient.
                for (i, dx) in dx.chunks_exact_mut(s.input_len()).enumerate() {
                    item_cols.resize(rows * pixels, 0.0);
                    for (r, row) in item_cols.chunks_exact_mut(pixels).enumerate() {
                        row.copy_from_slice(&dcols[r * width + i * pixels..][..pixels]);
                    }
                    fold(item_cols, s, dx);
                }
            },
        );
    x_grad
}
