//! conv2d without groups on contiguous NCHW f32 slices, as im2col + GEMM: the forward pass,
//! the input gradient and the weight gradient.
//!
//! A batch item's input is unfolded (im2col) into `cols`, `[ci * kh * kw, oh * ow]`, with
//! `cols[(ci, kh, kw), (oh, ow)] = x[ci, oh * stride - pad + kh * dilation, ...]` (zero outside
//! the image). Then:
//! - forward: `y_n = W · cols_n`, unfolded a band of output rows at a time (about 1 MiB, so it
//!   is still in cache for the GEMM), each GEMM writing straight into its columns of the output
//!   tensor (flex converts the input to NHWC, runs one GEMM per tile of 512 pixels into a fresh
//!   buffer and copies each result into place);
//! - input gradient: `dcols_n = Wᵀ · dy_n`, folded back (col2im) into `dx_n` (flex runs a
//!   transposed convolution);
//! - weight gradient: `dW = sum over n of dy_n · cols_nᵀ`, with the batch cut into chunks whose
//!   unfolded inputs sit side by side, so each GEMM's inner dimension is a chunk's pixels
//!   rather than one image's (Burn's default convolves the input by the output gradient with
//!   batch and channels swapped, which flex runs as one small GEMM per input channel).
//!
//! Stride-1 convolutions on maps of 16x16 and up skip the unfolding ([`grid`]): the input is
//! zero-padded to a grid where each kernel tap is the same channel read from a shifted
//! offset. The weight gradient (at any width where the GEMMs run AVX2; with AVX-512 GEMMs they
//! are faster on layers of more than 64 output channels) and, for layers with few output
//! channels, the forward pass and input gradient are then products of shifted rows
//! ([`crate::rows_dot`]).
//!
//! Other weight gradients (up to 256 channels of a 3x3 kernel, not 1x1) unfold the input by
//! pixel, `[depth, kh * kw * ci]` ([`by_pixel`]): the layout `gemm` reads without packing it,
//! each pixel's row copied from a channels-last copy of the input in runs of `kw * ci` values.
//! So do stride-1 forward passes and input gradients on maps whose pixels do not fill whole
//! AVX-512 registers (14x14), multiplied into `[pixels, out_channels]` and put in place.
//!
//! Other stride-1 convolutions run the forward pass and input gradient unfolded along the
//! kernel's width only, as one GEMM per kernel row over shifted windows of that buffer
//! ([`shifted`]: a third of im2col's copies for 3x3).
//!
//! Maps of fewer than 64 pixels (and 8x8 maps of 128 channels and more) run the forward pass
//! and input gradient a group of batch items per GEMM ([`small`]), so the GEMM's tiles are not
//! one map's few pixels wide (nor its weight read again for each map); with stride 1
//! (and the weight gradient too) without the products by the padding, a third of a 4x4 map's.
//!
//! 1x1 convolutions with stride 1 and no padding skip the unfolding: `cols_n` is `x_n`.
//! Batch items run in parallel; with fewer items than threads the GEMM itself takes the threads.

use std::mem::MaybeUninit;

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

mod by_pixel;
mod grid;
mod shifted;
mod small;

/// The geometry of a 2-D convolution without groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Output height and width (from the output gradient; end padding only changes these).
    pub output: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Padding at the start of each spatial dimension.
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl ConvShape {
    fn rows(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    fn output_pixels(&self) -> usize {
        self.output[0] * self.output[1]
    }

    fn input_len(&self) -> usize {
        self.in_channels * self.input[0] * self.input[1]
    }
}

/// The forward pass unfolds whole output rows at a time, about this many floats (1 MiB).
const TILE_FLOATS: usize = 1 << 18;

/// The unfolded input of one weight-gradient chunk is kept under about this many floats (512 KiB,
/// so it is still in L2 when the GEMM packs it; 8 MiB chunks made CIFAR ResNet-20's step ~5% slower).
const CHUNK_FLOATS: usize = 1 << 17;

/// ... but spans at least this many pixels (the GEMM's inner dimension), so that on small maps
/// each GEMM does not read and write the whole weight gradient for a few products per value
/// (one 4x4 map per GEMM: 512-channel weight gradient 16.5 -> 14.1 ms, 64-channel 8x8 1.55 ->
/// 1.13 ms, on a Zen 5 EPYC).
const MIN_DEPTH: usize = 256;

impl ConvShape {
    /// Whether [`unfold_rows`] and [`fold`] go through a zero-padded copy (stride 1, no
    /// dilation, a kernel wider than one pixel) rather than clipping each tap.
    fn unfolds_padded(&self) -> bool {
        self.stride == [1, 1] && self.dilation == [1, 1] && self.kernel != [1, 1]
    }

    /// Whether `cols` is the input itself (1x1, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.padding == [0, 0]
            && self.input == self.output
    }

    fn output_len(&self) -> usize {
        self.out_channels * self.output_pixels()
    }
}

impl ConvShape {
    /// The convolution whose forward pass is this one's input gradient, for stride 1 without
    /// dilation: of the output gradient, channels swapped, padded by `k - 1 - p`, by the
    /// [`flipped`] weight; none for other strides or where `p >= k`.
    fn transposed(&self) -> Option<ConvShape> {
        if self.stride != [1, 1] || self.dilation != [1, 1] {
            return None;
        }
        let padding = [0, 1].map(|d| (self.kernel[d] - 1).checked_sub(self.padding[d]));
        Some(ConvShape {
            in_channels: self.out_channels,
            out_channels: self.in_channels,
            input: self.output,
            output: self.input,
            padding: [padding[0]?, padding[1]?],
            ..*self
        })
    }
}

/// The weight of [`ConvShape::transposed`]: `weight` flipped in both spatial dimensions with its
/// channel axes swapped, `flipped[ci, co, a, b] = weight[co, ci, kh - 1 - a, kw - 1 - b]`.
/// On every thread, an input channel's row at a time.
fn flipped(weight: &[f32], s: ConvShape) -> Vec<f32> {
    let taps = s.kernel[0] * s.kernel[1];
    let mut flipped = vec![0f32; weight.len()];
    flipped
        .par_chunks_mut(s.out_channels * taps)
        .enumerate()
        .for_each(|(ci, row)| {
            for (co, to) in row.chunks_exact_mut(taps).enumerate() {
                let from = &weight[(co * s.in_channels + ci) * taps..][..taps];
                for (to, &w) in to.iter_mut().rev().zip(from) {
                    *to = w;
                }
            }
        });
    flipped
}

/// Calls `f(index, [co, ci, tap])` for every value of a weight `[out_channels, in_channels,
/// kh * kw]`, in order (the weight permutations' tests).
#[cfg(test)]
fn for_each_weight(s: ConvShape, mut f: impl FnMut(usize, [usize; 3])) {
    let taps = s.kernel[0] * s.kernel[1];
    for co in 0..s.out_channels {
        for ci in 0..s.in_channels {
            for tap in 0..taps {
                f((co * s.in_channels + ci) * taps + tap, [co, ci, tap]);
            }
        }
    }
}

/// How many tasks to cut `batch` items into, and the GEMM's own parallelism: the threads go to
/// the batch items, or to the GEMM when there are fewer items than threads.
fn split(batch: usize) -> (usize, Parallelism) {
    let threads = rayon::current_num_threads().max(1);
    let tasks = threads.min(batch).max(1);
    let parallelism = if tasks < threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    (tasks, parallelism)
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with each matrix given by its pointer and its
/// (row, column) strides.
///
/// # Safety
/// Every pointer must address a buffer holding its matrix at the given strides; `dst` must not
/// overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, [usize; 2]),
    accumulate: bool,
    lhs: (*const f32, [usize; 2]),
    rhs: (*const f32, [usize; 2]),
    parallelism: Parallelism,
) {
    crate::cpu::tune_gemm();
    let stride = |s: usize| s as isize;
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.0,
            stride(dst.1[1]),
            stride(dst.1[0]),
            accumulate,
            lhs.0,
            stride(lhs.1[1]),
            stride(lhs.1[0]),
            rhs.0,
            stride(rhs.1[1]),
            stride(rhs.1[0]),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The output, `[batch, out_channels, out_h, out_w]` row-major, of a convolution by `weight`
/// (`[out_channels, in_channels, kh, kw]`).
pub fn forward(x: &[f32], weight: &[f32], shape: ConvShape) -> Vec<f32> {
    let s = shape;
    assert_eq!(x.len(), s.batch * s.input_len(), "conv input length");
    assert_eq!(
        weight.len(),
        s.out_channels * s.rows(),
        "conv weight length"
    );
    if s.batch * s.output_len() == 0 {
        return Vec::new();
    }
    if s.forward_runs_on_grid() {
        return grid::forward(x, weight, s);
    }
    if s.runs_in_groups() {
        return small::forward(x, weight, s);
    }
    if s.forward_runs_by_pixel() {
        return by_pixel::forward(x, weight, s);
    }
    let total = s.batch * s.output_len();
    let mut output = Vec::with_capacity(total);
    let (_, parallelism) = split(s.batch);
    let pixels = s.output_pixels();
    // Stride 1 unfolds along the kernel's width only; other shapes unfold every tap.
    let (weight_rows, rows) = if s.unfolds_padded() {
        (shifted::by_kernel_row(weight, s), shifted::unfolded_rows(s))
    } else {
        (Vec::new(), s.rows())
    };
    output.spare_capacity_mut()[..total]
        .par_chunks_mut(s.output_len())
        .enumerate()
        .for_each_init(Vec::new, |cols, (n, out)| {
            // Every GEMM below that writes a value first overwrites it (`accumulate` false),
            // so the output is not zeroed first (that was 4% of ResNet-18's evaluation); with
            // no inner dimension the GEMMs would write nothing.
            if rows == 0 {
                out.fill(MaybeUninit::new(0.0));
                return;
            }
            let image = &x[n * s.input_len()..(n + 1) * s.input_len()];
            if s.is_pointwise() {
                // SAFETY: out is [out_channels, pixels], weight [out_channels, rows] and the
                // image [rows, pixels], all row-major; out is a buffer of its own, which the
                // GEMM only writes.
                unsafe {
                    matmul(
                        [s.out_channels, pixels, rows],
                        (out.as_mut_ptr().cast(), [pixels, 1]),
                        false,
                        (weight.as_ptr(), [rows, 1]),
                        (image.as_ptr(), [pixels, 1]),
                        parallelism,
                    );
                }
                return;
            }
            // A few output rows at a time, so the unfolded tile is still in cache when the
            // GEMM reads it; each tile's result lands in its columns of the output.
            let ow = s.output[1].max(1);
            let tiles = (rows * pixels)
                .div_ceil(TILE_FLOATS)
                .clamp(1, s.output[0].max(1));
            // Whole registers of pixels per tile where the map allows it: `gemm` copies all of
            // a tile's columns first where their count is not a multiple of 16.
            let whole = 16 / gcd(ow, 16);
            let tile_rows = s.output[0]
                .div_ceil(tiles)
                .next_multiple_of(whole)
                .min(s.output[0])
                .max(1);
            for first in (0..s.output[0]).step_by(tile_rows) {
                let tile = first..(first + tile_rows).min(s.output[0]);
                if s.unfolds_padded() {
                    shifted::forward_tile(image, &weight_rows, s, cols, out, tile, parallelism);
                    continue;
                }
                let width = tile.len() * ow;
                cols.resize(rows * width, 0.0);
                unfold_rows(image, s, cols, width, 0, tile);
                // SAFETY: out is [out_channels, pixels] row-major and this tile writes its
                // columns first * ow .. first * ow + width; weight is [out_channels, rows] and
                // cols [rows, width], row-major; out is a buffer of its own, which the GEMM
                // only writes.
                unsafe {
                    matmul(
                        [s.out_channels, width, rows],
                        (out.as_mut_ptr().cast::<f32>().add(first * ow), [pixels, 1]),
                        false,
                        (weight.as_ptr(), [rows, 1]),
                        (cols.as_ptr(), [width, 1]),
                        parallelism,
                    );
                }
            }
        });
    // SAFETY: the tiles' first GEMMs wrote every value of every image's output above.
    unsafe { output.set_len(total) };
    output
}

/// The greatest common divisor of `a` and `b`.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The gradient of the input, `[batch, in_channels, h, w]`, given the output gradient.
pub fn input_grad(weight: &[f32], output_grad: &[f32], shape: ConvShape) -> Vec<f32> {
    let s = shape;
    assert_eq!(
        weight.len(),
        s.out_channels * s.rows(),
        "conv weight length"
    );
    assert_eq!(
        output_grad.len(),
        s.batch * s.output_len(),
        "conv output gradient length"
    );
    if s.batch * s.input_len() == 0 || s.output_pixels() == 0 {
        return vec![0f32; s.batch * s.input_len()];
    }
    if s.input_grad_runs_on_grid() {
        return grid::input_grad(weight, output_grad, s);
    }
    if s.runs_in_groups() {
        return small::input_grad(weight, output_grad, s);
    }
    if s.input_grad_runs_by_pixel() {
        return by_pixel::input_grad(weight, output_grad, s);
    }
    let (_, parallelism) = split(s.batch);
    let (rows, pixels) = (s.rows(), s.output_pixels());
    let weight_rows = if s.unfolds_padded() {
        shifted::by_kernel_row(weight, s)
    } else {
        Vec::new()
    };
    zeroed_chunks(
        s.batch * s.input_len(),
        s.input_len(),
        Vec::new,
        |dcols, n, dx| {
            let dy = &output_grad[n * s.output_len()..(n + 1) * s.output_len()];
            if s.unfolds_padded() {
                shifted::input_grad_image(&weight_rows, dy, s, dcols, dx, parallelism);
                return;
            }
            let pointwise = s.is_pointwise();
            let dst: &mut [f32] = if pointwise {
                dx
            } else {
                dcols.resize(rows * pixels, 0.0);
                dcols
            };
            // SAFETY: dst is [rows, pixels] row-major, weight [out_channels, rows] read as its
            // transpose [rows, out_channels], dy [out_channels, pixels]; dst is a buffer of its
            // own.
            unsafe {
                matmul(
                    [rows, pixels, s.out_channels],
                    (dst.as_mut_ptr(), [pixels, 1]),
                    false,
                    (weight.as_ptr(), [1, rows]),
                    (dy.as_ptr(), [pixels, 1]),
                    parallelism,
                );
            }
            if !pointwise {
                fold(dcols, s, dx);
            }
        },
    )
}

/// Zeroes `values` and returns them as floats: done by the thread that then fills them, while
/// they are in its cache (a `vec![0.0; n]` of the whole output is one thread's memset first,
/// 1.4% of ResNet-50's step).
fn zeroed(values: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    values.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every value was just written; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(values as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// `total` floats, `chunk` at a time on every thread: each chunk zeroed ([`zeroed`]) by the
/// thread that then runs `fill(state, its index, it)`, with a `state` per rayon job from
/// `init`, as `for_each_init`.
fn zeroed_chunks<S>(
    total: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut values = Vec::with_capacity(total);
    values.spare_capacity_mut()[..total]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each_init(init, |state, (i, chunk)| fill(state, i, zeroed(chunk)));
    // SAFETY: every chunk of the `total` values was zeroed above.
    unsafe { values.set_len(total) };
    values
}

/// The gradient of the weight, `[out_channels, in_channels, kernel_h, kernel_w]` row-major.
pub fn weight_grad(x: &[f32], output_grad: &[f32], shape: ConvShape) -> Vec<f32> {
    let s = shape;
    assert_eq!(x.len(), s.batch * s.input_len(), "conv input length");
    assert_eq!(
        output_grad.len(),
        s.batch * s.output_len(),
        "conv output gradient length"
    );
    let weight_len = s.out_channels * s.rows();
    if s.batch == 0 || s.output_pixels() == 0 {
        return vec![0.0; weight_len];
    }
    if s.weight_grad_runs_on_grid() {
        return grid::weight_grad(x, output_grad, s);
    }
    if s.weight_grad_runs_on_valid_taps() {
        return small::weight_grad(x, output_grad, s);
    }
    if s.weight_grad_runs_by_pixel() {
        return by_pixel::weight_grad(x, output_grad, s);
    }
    unfolded_weight_grad(x, output_grad, s)
}

/// How a weight gradient cuts the batch: a task per thread (each summing a partial gradient),
/// each task's items in chunks whose unfolded inputs fit [`CHUNK_FLOATS`] and span at least
/// [`MIN_DEPTH`] pixels, and the GEMMs' own parallelism.
struct Chunks {
    batch: usize,
    tasks: usize,
    per_task: usize,
    chunk: usize,
    parallelism: Parallelism,
}

impl Chunks {
    fn new(s: ConvShape) -> Chunks {
        let (tasks, parallelism) = split(s.batch);
        let per_task = s.batch.div_ceil(tasks);
        let chunk = (CHUNK_FLOATS / (s.rows() * s.output_pixels()).max(1))
            .max(MIN_DEPTH.div_ceil(s.output_pixels()))
            .clamp(1, per_task);
        Chunks {
            batch: s.batch,
            tasks,
            per_task,
            chunk,
            parallelism,
        }
    }

    /// Task `task`'s chunks of items, each with whether it is the task's first.
    fn of(&self, task: usize) -> impl Iterator<Item = (std::ops::Range<usize>, bool)> + use<> {
        let begin = task * self.per_task;
        let end = ((task + 1) * self.per_task).min(self.batch);
        let chunk = self.chunk;
        (begin..end)
            .step_by(chunk)
            .map(move |start| (start..(start + chunk).min(end), start == begin))
    }
}

/// [`weight_grad`] as im2col + GEMM, for any shape.
fn unfolded_weight_grad(x: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    let weight_len = s.out_channels * s.rows();
    let chunks = Chunks::new(s);
    let partials: Vec<Vec<f32>> = (0..chunks.tasks)
        .into_par_iter()
        .map(|task| {
            let mut grad = vec![0f32; weight_len];
            let mut cols = Vec::new();
            let mut dy = Vec::new();
            for (items, first) in chunks.of(task) {
                accumulate_chunk(
                    x,
                    output_grad,
                    s,
                    items,
                    &mut cols,
                    &mut dy,
                    &mut grad,
                    first,
                    chunks.parallelism,
                );
            }
            grad
        })
        .collect();
    sum(partials)
}

/// The element-wise sum of the tasks' partial gradients (in task order), on every thread: a
/// 512-channel 3x3 weight gradient is 2.4M values, whose sum on the calling thread was 0.6%
/// of ResNet-50's training step with the other thread waiting.
fn sum(partials: Vec<Vec<f32>>) -> Vec<f32> {
    /// Values per parallel task (64 KiB).
    const CHUNK: usize = 1 << 14;
    let mut partials = partials.into_iter();
    let mut grad = partials.next().expect("at least one task");
    let rest: Vec<Vec<f32>> = partials.collect();
    grad.par_chunks_mut(CHUNK).enumerate().for_each(|(i, g)| {
        for partial in &rest {
            for (g, p) in g.iter_mut().zip(&partial[i * CHUNK..]) {
                *g += p;
            }
        }
    });
    grad
}

/// Adds the gradient of batch items `items` to `grad` (overwrites it when `first`).
#[allow(clippy::too_many_arguments)]
fn accumulate_chunk(
    x: &[f32],
    output_grad: &[f32],
    s: ConvShape,
    items: std::ops::Range<usize>,
    cols: &mut Vec<f32>,
    dy: &mut Vec<f32>,
    grad: &mut [f32],
    first: bool,
    parallelism: Parallelism,
) {
    let pixels = s.output_pixels();
    let rows = s.rows();
    if s.is_pointwise() && pixels >= MIN_DEPTH && row_stride(pixels) == pixels {
        // The input is its own unfolding and one image is deep enough: a GEMM per image
        // straight from the tensors, without copying either (ResNet-50's 1x1 layers at 56x56
        // and 28x28; maps of a multiple of 256 pixels keep the copies at a padded stride).
        for (i, n) in items.enumerate() {
            let image = &x[n * s.input_len()..(n + 1) * s.input_len()];
            let plane = &output_grad[n * s.output_len()..(n + 1) * s.output_len()];
            // SAFETY: grad is [out_channels, rows] row-major, the image [rows, pixels] and the
            // output gradient [out_channels, pixels] row-major (the image read as its
            // transpose); grad is a buffer of its own.
            unsafe {
                matmul(
                    [rows, s.out_channels, pixels],
                    (grad.as_mut_ptr(), [1, rows]),
                    !(first && i == 0),
                    (image.as_ptr(), [pixels, 1]),
                    (plane.as_ptr(), [1, pixels]),
                    parallelism,
                );
            }
        }
        return;
    }
    let depth = items.len() * pixels; // the GEMM's inner dimension
    let stride = row_stride(depth);
    cols.resize(rows * stride, 0.0);
    dy.resize(s.out_channels * stride, 0.0);

    for (i, n) in items.clone().enumerate() {
        let image = &x[n * s.input_len()..(n + 1) * s.input_len()];
        unfold(image, s, cols, stride, i * pixels);
        let plane = &output_grad[n * s.out_channels * pixels..(n + 1) * s.out_channels * pixels];
        for co in 0..s.out_channels {
            dy[co * stride + i * pixels..co * stride + (i + 1) * pixels]
                .copy_from_slice(&plane[co * pixels..(co + 1) * pixels]);
        }
    }

    // grad[co, r] (+)= sum over k of dy[co, k] * cols[r, k]
    // SAFETY: grad is [out_channels, rows] row-major, dy [out_channels, depth] and cols
    // [rows, depth] row-major at row stride `stride` (cols read as its transpose [depth,
    // rows]); grad is a buffer of its own.
    unsafe {
        matmul(
            [rows, s.out_channels, depth],
            (grad.as_mut_ptr(), [1, rows]),
            !first,
            (cols.as_ptr(), [stride, 1]),
            (dy.as_ptr(), [1, stride]),
            parallelism,
        );
    }
}

/// The row stride of a `[rows, depth]` buffer whose rows a GEMM reads across (packing it
/// transposed): `depth` plus a cache line where `depth` floats are a multiple of 1 KiB, so
/// the rows it gathers from do not all fall in the same cache sets (one CIFAR 32x32 map per
/// weight-gradient chunk, a 4 KiB stride, ran `gemm`'s packing at a third of its speed:
/// 64x64x32x32 46 -> 17 ms on a Zen 5 EPYC).
fn row_stride(depth: usize) -> usize {
    if depth.is_multiple_of(256) {
        depth + 16
    } else {
        depth
    }
}

/// The range of output positions `o` whose input position `o * stride + offset - pad` lies in
/// `[0, len)`.
fn valid_outputs(
    offset: usize,
    pad: usize,
    stride: usize,
    len: usize,
    outputs: usize,
) -> (usize, usize) {
    // o * stride + offset >= pad  <=>  o >= ceil((pad - offset) / stride)
    let low = pad.saturating_sub(offset).div_ceil(stride);
    // o * stride + offset - pad <= len - 1  <=>  o <= (len - 1 + pad - offset) / stride
    let high = if len + pad > offset {
        ((len - 1 + pad - offset) / stride + 1).min(outputs)
    } else {
        0
    };
    (low.min(high), high)
}

/// Writes one image's unfolded input into columns `column..column + pixels` of `cols`, a
/// `[in_channels * kh * kw, depth]` row-major buffer.
fn unfold(image: &[f32], s: ConvShape, cols: &mut [f32], depth: usize, column: usize) {
    unfold_rows(image, s, cols, depth, column, 0..s.output[0]);
}

/// As [`unfold`], for output rows `output_rows` only: columns `column..column + rows * ow`,
/// copied from the [`Band`] of input rows they read.
fn unfold_rows(
    image: &[f32],
    s: ConvShape,
    cols: &mut [f32],
    depth: usize,
    column: usize,
    output_rows: std::ops::Range<usize>,
) {
    if output_rows.is_empty() {
        return;
    }
    PADDED.with_borrow_mut(|padded| {
        let band = Band::lay(image, s, output_rows.clone(), padded);
        band.unfold(s, (cols, depth, column), output_rows.len());
    });
}

thread_local! {
    /// The zero-padded band of input rows [`unfold_rows`] copies from (and [`fold_padded`]
    /// adds into), per thread.
    static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The input rows some output rows read, zero-padded and split into the column stride's
/// phases: `[in_channels, stride, rows, len]`, phase `p` of padded row `r` holding padded
/// columns `p, p + stride, ...`. Every kernel tap's row of `cols` is then plain copies of `ow`
/// values, one per output row, without bounds or zero fills: tap `(kh, kw)` of output row
/// `i` (counted from the first) reads phase `kw * dw % stride` of padded row `i * sh + kh *
/// dh` from value `kw * dw / stride` on. With stride 1 there is one phase, the padded rows
/// themselves (on 8x8 maps, copies bounded per tap spent most of their time in calls to copy
/// 8 floats and zero 1); with stride 2 each row was also copied in pieces of `ow` values
/// bounded per tap, a third of the 3x3/2 forward pass at 32x32 on an Intel Xeon.
struct Band<'a> {
    values: &'a [f32],
    rows: usize,
    len: usize,
    stride: usize,
}

impl<'a> Band<'a> {
    /// Lays the band of output rows `output_rows` of `image` (`[in_channels, h, w]`) out in
    /// `buffer`: rows and phases no tap reads (a 1x1 kernel's with stride 2) stay zero.
    fn lay(
        image: &[f32],
        s: ConvShape,
        output_rows: std::ops::Range<usize>,
        buffer: &'a mut Vec<f32>,
    ) -> Band<'a> {
        let [h, w] = s.input;
        let [_, ow] = s.output;
        let [kh_len, kw_len] = s.kernel;
        let [sh, stride] = s.stride;
        let [ph, pw] = s.padding;
        let [dh, dw] = s.dilation;
        let rows = (output_rows.len() - 1) * sh + (kh_len - 1) * dh + 1;
        let len = ow + (kw_len - 1) * dw / stride;
        let row_read: Vec<bool> = (0..rows)
            .map(|r| {
                (0..kh_len).any(|kh| {
                    r.checked_sub(kh * dh)
                        .is_some_and(|d| d % sh == 0 && d / sh < output_rows.len())
                })
            })
            .collect();
        // The phases some tap reads, each with the values of it that come from the input:
        // value j of phase p is padded column j * stride + p, input column j * stride + p - pw.
        let phases_read: Vec<(usize, std::ops::Range<usize>)> = (0..stride)
            .filter(|&p| (0..kw_len).any(|kw| kw * dw % stride == p))
            .map(|p| {
                let (low, high) = valid_outputs(p, pw, stride, w, len);
                (p, low..high)
            })
            .filter(|(_, values)| !values.is_empty())
            .collect();
        let both_of_two = stride == 2 && phases_read.len() == 2;
        buffer.clear();
        buffer.resize(s.in_channels * stride * rows * len, 0.0);
        for (ci, phases) in buffer.chunks_exact_mut(stride * rows * len).enumerate() {
            let channel = &image[ci * h * w..(ci + 1) * h * w];
            for r in (0..rows).filter(|&r| row_read[r]) {
                // Padded row r is input row output_rows.start * sh + r - ph.
                let Some(ih) = (output_rows.start * sh + r)
                    .checked_sub(ph)
                    .filter(|&ih| ih < h)
                else {
                    continue;
                };
                let input = &channel[ih * w..(ih + 1) * w];
                if both_of_two {
                    let (even, odd) = phases.split_at_mut(rows * len);
                    let at = r * len..(r + 1) * len;
                    deinterleave(input, pw, [&mut even[at.clone()], &mut odd[at]]);
                    continue;
                }
                for (p, values) in &phases_read {
                    let first = values.start * stride + p - pw;
                    let row = &mut phases[(p * rows + r) * len..][values.clone()];
                    if stride == 1 {
                        row.copy_from_slice(&input[first..first + row.len()]);
                        continue;
                    }
                    // Chunks rather than `step_by`, whose steps are calls here.
                    for (v, columns) in row.iter_mut().zip(input[first..].chunks(stride)) {
                        *v = columns[0];
                    }
                }
            }
        }
        Band {
            values: buffer,
            rows,
            len,
            stride,
        }
    }

    /// Writes the band's `outputs` output rows, unfolded, into columns `column..` of `cols` (a
    /// `[in_channels * kh * kw, depth]` row-major buffer).
    fn unfold(
        &self,
        s: ConvShape,
        (cols, depth, column): (&mut [f32], usize, usize),
        outputs: usize,
    ) {
        let [_, ow] = s.output;
        let [kh_len, kw_len] = s.kernel;
        let sh = s.stride[0];
        let [dh, dw] = s.dilation;
        let phase_len = self.rows * self.len;
        for ci in 0..s.in_channels {
            for kh in 0..kh_len {
                for kw in 0..kw_len {
                    let (phase, shift) = (kw * dw % self.stride, kw * dw / self.stride);
                    let plane = &self.values[(ci * self.stride + phase) * phase_len..][..phase_len];
                    let row = (ci * kh_len + kh) * kw_len + kw;
                    let out = &mut cols[row * depth + column..][..outputs * ow];
                    for (i, out_row) in out.chunks_exact_mut(ow).enumerate() {
                        let start = (i * sh + kh * dh) * self.len + shift;
                        copy_short(out_row, &plane[start..start + ow]);
                    }
                }
            }
        }
    }
}

/// An input row's values into the two column phases of its padded row (stride 2, `pad`
/// columns of padding in front): value `c` to phase `(c + pad) % 2` at `(c + pad) / 2`, those
/// past a phase's end dropped. In pairs, which compile to vector shuffles (`step_by` took
/// about 3 cycles a value, a fifth of the 3x3/2 forward pass at 32x32 on an Intel Xeon).
fn deinterleave(input: &[f32], pad: usize, [even, odd]: [&mut [f32]; 2]) {
    // Even input columns land in `a` from `pad / 2` on, odd ones in `b` from `(pad + 1) / 2`.
    let (a, b) = if pad.is_multiple_of(2) {
        (even, odd)
    } else {
        (odd, even)
    };
    let (a_len, b_len) = (a.len(), b.len());
    let a = &mut a[(pad / 2).min(a_len)..];
    let b = &mut b[pad.div_ceil(2).min(b_len)..];
    let pairs = (input.len() / 2).min(a.len()).min(b.len());
    for ((x, y), pair) in a[..pairs]
        .iter_mut()
        .zip(&mut b[..pairs])
        .zip(input.chunks_exact(2))
    {
        *x = pair[0];
        *y = pair[1];
    }
    for (c, &value) in input.iter().enumerate().skip(2 * pairs) {
        let phase = if c % 2 == 0 { &mut *a } else { &mut *b };
        if let Some(v) = phase.get_mut(c / 2) {
            *v = value;
        }
    }
}

/// `dst.copy_from_slice(src)` in fixed blocks of 8, which compile to vector moves where a
/// short `copy_from_slice` is a call to `memcpy`.
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d8, s8) in (&mut d).zip(&mut s) {
        let block: &[f32; 8] = s8.try_into().expect("8 values");
        d8.copy_from_slice(block);
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = *s;
    }
}

/// Adds one image's unfolded gradient `dcols` (`[in_channels * kh * kw, oh * ow]`) back into
/// its input gradient `dx` (`[in_channels, h, w]`): the transpose of [`unfold`].
fn fold(dcols: &[f32], s: ConvShape, dx: &mut [f32]) {
    if s.unfolds_padded() {
        PADDED.with_borrow_mut(|padded| fold_padded(dcols, s, padded, dx));
    } else {
        fold_clipped(dcols, s, dx);
    }
}

/// [`fold`] for stride 1 and no dilation, the transpose of [`Band::unfold`]: every tap
/// adds its row of `dcols` into a zero-padded copy of one channel's gradient
/// (`[oh + kh - 1, ow + kw - 1]`) without bounds, and the interior is then added to `dx`.
fn fold_padded(dcols: &[f32], s: ConvShape, padded: &mut Vec<f32>, dx: &mut [f32]) {
    let [h, w] = s.input;
    let [oh, ow] = s.output;
    let [kh_len, kw_len] = s.kernel;
    let [ph, pw] = s.padding;
    let (band, width) = (oh + kh_len - 1, ow + kw_len - 1);
    let pixels = oh * ow;
    for ci in 0..s.in_channels {
        padded.clear();
        padded.resize(band * width, 0.0);
        for kh in 0..kh_len {
            for kw in 0..kw_len {
                let row = (ci * kh_len + kh) * kw_len + kw;
                let grads = &dcols[row * pixels..(row + 1) * pixels];
                for (i, span) in grads.chunks_exact(ow).enumerate() {
                    let start = (i + kh) * width + kw;
                    for (p, &g) in padded[start..start + ow].iter_mut().zip(span) {
                        *p += g;
                    }
                }
            }
        }
        // Padded row r, column j is input row r - ph, column j - pw.
        let channel = &mut dx[ci * h * w..(ci + 1) * h * w];
        for (ih, dx_row) in channel.chunks_exact_mut(w).enumerate() {
            let r = ih + ph;
            if r >= band || pw >= width {
                continue;
            }
            let len = w.min(width - pw);
            let src = &padded[r * width + pw..r * width + pw + len];
            for (x, &g) in dx_row[..len].iter_mut().zip(src) {
                *x += g;
            }
        }
    }
}

/// [`fold`] for any stride and dilation, bounds computed per kernel tap.
fn fold_clipped(dcols: &[f32], s: ConvShape, dx: &mut [f32]) {
    let [h, w] = s.input;
    let [oh_len, ow_len] = s.output;
    let [kh_len, kw_len] = s.kernel;
    let [sh, sw] = s.stride;
    let [ph, pw] = s.padding;
    let [dh, dw] = s.dilation;
    let pixels = oh_len * ow_len;
    for ci in 0..s.in_channels {
        let channel = &mut dx[ci * h * w..(ci + 1) * h * w];
        for kh in 0..kh_len {
            let (oh_low, oh_high) = valid_outputs(kh * dh, ph, sh, h, oh_len);
            for kw in 0..kw_len {
                let (ow_low, ow_high) = valid_outputs(kw * dw, pw, sw, w, ow_len);
                if ow_low >= ow_high {
                    continue;
                }
                let row = (ci * kh_len + kh) * kw_len + kw;
                let grads = &dcols[row * pixels..(row + 1) * pixels];
                for oh in oh_low..oh_high {
                    let ih = oh * sh + kh * dh - ph;
                    let input_row = &mut channel[ih * w..(ih + 1) * w];
                    let first = ow_low * sw + kw * dw - pw;
                    let span = &grads[oh * ow_len + ow_low..oh * ow_len + ow_high];
                    if sw == 1 {
                        for (x, &g) in input_row[first..first + span.len()].iter_mut().zip(span) {
                            *x += g;
                        }
                    } else {
                        for (i, &g) in span.iter().enumerate() {
                            input_row[first + i * sw] += g;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_add(0x9E3779B97F4A7C15);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn output_len(
        input: usize,
        kernel: usize,
        stride: usize,
        pad: (usize, usize),
        dilation: usize,
    ) -> usize {
        (input + pad.0 + pad.1 - dilation * (kernel - 1) - 1) / stride + 1
    }

    /// Output, input gradient and weight gradient from the definition, one product at a time,
    /// in f64.
    fn naive(x: &[f32], w: &[f32], dy: &[f32], s: ConvShape) -> [Vec<f64>; 3] {
        let mut y = vec![0f64; s.batch * s.output_len()];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        for n in 0..s.batch {
            for co in 0..s.out_channels {
                for ci in 0..s.in_channels {
                    for kh in 0..s.kernel[0] {
                        for kw in 0..s.kernel[1] {
                            let wi =
                                ((co * s.in_channels + ci) * s.kernel[0] + kh) * s.kernel[1] + kw;
                            for oh in 0..s.output[0] {
                                for ow in 0..s.output[1] {
                                    let ih = (oh * s.stride[0] + kh * s.dilation[0]) as isize
                                        - s.padding[0] as isize;
                                    let iw = (ow * s.stride[1] + kw * s.dilation[1]) as isize
                                        - s.padding[1] as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= s.input[0] as isize
                                        || iw >= s.input[1] as isize
                                    {
                                        continue;
                                    }
                                    let xi = ((n * s.in_channels + ci) * s.input[0] + ih as usize)
                                        * s.input[1]
                                        + iw as usize;
                                    let yi = ((n * s.out_channels + co) * s.output[0] + oh)
                                        * s.output[1]
                                        + ow;
                                    y[yi] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += dy[yi] as f64 * w[wi] as f64;
                                    dw[wi] += dy[yi] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        [y, dx, dw]
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what} [{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn matches_the_definition() {
        // (batch, ci, co, input, kernel, stride, padding begin/end, dilation)
        let cases = [
            (2, 3, 4, [7, 9], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            (1, 5, 2, [6, 5], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            (3, 4, 6, [11, 10], [3, 3], [2, 2], [(1, 1), (1, 1)], [1, 1]),
            (2, 3, 5, [15, 13], [7, 7], [2, 2], [(3, 3), (3, 3)], [1, 1]),
            (4, 6, 3, [8, 8], [1, 1], [2, 2], [(0, 0), (0, 0)], [1, 1]),
            (2, 2, 3, [9, 7], [3, 2], [1, 2], [(2, 0), (1, 2)], [2, 1]),
            (5, 1, 1, [1, 1], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            (3, 2, 2, [4, 4], [3, 3], [1, 1], [(3, 3), (3, 3)], [1, 1]),
            (1, 3, 2, [5, 5], [1, 1], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            // large enough for two forward tiles, too wide for the grid: 23 output rows a
            // tile, rounded up to 32 (whole registers of 61-pixel rows), and 13
            (
                1,
                32,
                40,
                [45, 61],
                [3, 3],
                [1, 1],
                [(1, 1), (1, 1)],
                [1, 1],
            ),
            // stride 1 through the padded unfold/fold: no padding, uneven padding, a kernel
            // wider than the image's padding, CIFAR's 8x8 and 16x16 maps
            (2, 3, 4, [9, 8], [3, 3], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            (2, 3, 2, [7, 6], [5, 3], [1, 1], [(2, 0), (0, 2)], [1, 1]),
            (1, 2, 3, [3, 4], [5, 5], [1, 1], [(4, 1), (3, 2)], [1, 1]),
            (3, 16, 8, [8, 8], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            (2, 8, 8, [16, 16], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            // on the grid: uneven padding on a 5x3 kernel, 5 output
            // channels (a partial tile of 4) and 8 rows (a partial tile of 3), the end padding
            // larger than the start
            (2, 3, 5, [30, 26], [5, 3], [1, 1], [(2, 1), (0, 2)], [1, 1]),
            (3, 2, 5, [24, 24], [2, 2], [1, 1], [(1, 0), (0, 1)], [1, 1]),
            (1, 4, 3, [20, 17], [3, 3], [1, 1], [(0, 2), (1, 1)], [1, 1]),
            // rows of two whole runs of 16, the output gradient read in place by the weight
            // gradient; 6 output channels (a partial tile of 8)
            (4, 5, 6, [12, 32], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            // padding wider than the kernel's reach: an output larger than its input, the
            // grid's gaps set by the output
            (2, 3, 4, [20, 18], [3, 3], [1, 1], [(2, 2), (2, 1)], [1, 1]),
            // in groups of items (maps under 64 pixels): ResNet-18's 4x4 on CIFAR in uneven
            // groups, a 1x1 on 7x7 maps, many groups of 2x2 maps
            (5, 8, 6, [4, 4], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            (5, 6, 4, [7, 7], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            (40, 3, 4, [2, 2], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            // their stride-1 input gradient as the transposed convolution's forward pass:
            // uneven padding on a 3x2 kernel; and where there is none (padding as wide as
            // the kernel, a dilation), through the fold
            (3, 4, 5, [5, 6], [3, 2], [1, 1], [(2, 0), (0, 1)], [1, 1]),
            (2, 3, 2, [3, 3], [3, 3], [1, 1], [(3, 3), (0, 0)], [1, 1]),
            (3, 2, 3, [6, 6], [3, 3], [1, 1], [(2, 2), (2, 2)], [2, 2]),
            // the same on their valid taps only (enough items a thread, with up to 4 threads):
            // a 3x2 kernel padded unevenly; output columns and rows that read no input
            (40, 4, 5, [5, 6], [3, 2], [1, 1], [(2, 0), (0, 1)], [1, 1]),
            (40, 2, 3, [3, 3], [3, 3], [1, 1], [(1, 3), (3, 0)], [1, 1]),
            // 8x8 maps of a wide layer: the input and weight gradients in groups, on their
            // valid taps (16 items a thread with 2 threads)
            (
                32,
                128,
                128,
                [8, 8],
                [3, 3],
                [1, 1],
                [(1, 1), (1, 1)],
                [1, 1],
            ),
            // weight-gradient chunks of 16 4x4 maps (256 pixels, a padded row stride), the
            // last one short; a 16x16 map alone is 256 pixels too
            (70, 2, 3, [4, 4], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            (1, 2, 3, [16, 16], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            // a 7x7/2 stem over several forward tiles (8, of 15 output rows), its rows split
            // into phases per tile; an odd width, stride 3
            (
                1,
                3,
                2,
                [230, 229],
                [7, 7],
                [2, 2],
                [(3, 3), (3, 3)],
                [1, 1],
            ),
            (2, 2, 3, [13, 14], [3, 4], [2, 3], [(1, 0), (2, 1)], [1, 2]),
            // stride 2 with padding wider than the image: output rows that read no input row
            (2, 2, 3, [2, 3], [3, 3], [2, 2], [(4, 4), (4, 4)], [1, 1]),
            // a 1x1 weight gradient straight from the tensors (323 pixels per image), and one
            // at 256 pixels through the copies
            (3, 5, 4, [17, 19], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            (2, 3, 2, [16, 16], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            // unfolded by pixel: stride 2 leaving the last input row and column unread;
            // 256 values a pixel (a padded row stride); 4 chunks of 64 pixels a task
            (3, 4, 5, [11, 10], [3, 3], [2, 2], [(1, 0), (1, 0)], [1, 1]),
            (2, 16, 3, [9, 9], [4, 4], [2, 2], [(1, 1), (1, 1)], [1, 1]),
            (32, 3, 4, [8, 8], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            // the forward pass and input gradient by pixel (routed there where the GEMMs run
            // AVX-512; below, every shape that unfolds by pixel runs it): a 14x14 map of 16
            // channels; two tiles of a 40x37 map (910 pixels a tile); stride 2
            (
                2,
                16,
                16,
                [14, 14],
                [3, 3],
                [1, 1],
                [(1, 1), (1, 1)],
                [1, 1],
            ),
            (
                1,
                32,
                16,
                [40, 37],
                [3, 3],
                [1, 1],
                [(1, 1), (1, 1)],
                [1, 1],
            ),
            (
                2,
                16,
                32,
                [27, 28],
                [3, 3],
                [2, 2],
                [(1, 1), (1, 1)],
                [1, 1],
            ),
        ];
        for (batch, ci, co, input, kernel, stride, pad, dilation) in cases {
            let output =
                [0, 1].map(|d| output_len(input[d], kernel[d], stride[d], pad[d], dilation[d]));
            let s = ConvShape {
                batch,
                in_channels: ci,
                out_channels: co,
                input,
                output,
                kernel,
                stride,
                padding: [pad[0].0, pad[1].0],
                dilation,
            };
            let x = values(batch * s.input_len(), 1);
            let w = values(co * s.rows(), 3);
            let dy = values(batch * s.output_len(), 2);
            let [y, dx, dw] = naive(&x, &w, &dy, s);
            assert_close(&forward(&x, &w, s), &y, &format!("{s:?} output"));
            assert_close(&input_grad(&w, &dy, s), &dx, &format!("{s:?} input grad"));
            assert_close(&weight_grad(&x, &dy, s), &dw, &format!("{s:?} weight grad"));
            // Both ways of the weight gradient, whichever this CPU's routing picks.
            let unfolded = unfolded_weight_grad(&x, &dy, s);
            assert_close(&unfolded, &dw, &format!("{s:?} unfolded weight grad"));
            if s.runs_on_grid() {
                let on_grid = grid::weight_grad(&x, &dy, s);
                assert_close(&on_grid, &dw, &format!("{s:?} weight grad on the grid"));
            }
            if s.weight_grad_runs_by_pixel() {
                let by_pixel = by_pixel::weight_grad(&x, &dy, s);
                assert_close(&by_pixel, &dw, &format!("{s:?} weight grad by pixel"));
                let by_pixel = by_pixel::forward(&x, &w, s);
                assert_close(&by_pixel, &y, &format!("{s:?} output by pixel"));
            }
            if s.transposed()
                .is_some_and(|t| t.weight_grad_runs_by_pixel())
            {
                let by_pixel = by_pixel::input_grad(&w, &dy, s);
                assert_close(&by_pixel, &dx, &format!("{s:?} input grad by pixel"));
            }
        }
    }

    /// The grid takes ResNet's 16x16 and larger stride-1 maps (and some of the cases above),
    /// im2col + GEMM the rest, in groups of items on maps under 64 pixels.
    #[test]
    fn convolutions_run_on_the_grid_where_it_is_small() {
        let shape = |side: usize, kernel: usize, stride: usize| ConvShape {
            batch: 2,
            in_channels: 4,
            out_channels: 4,
            input: [side; 2],
            output: [(side + 2 * (kernel / 2) - kernel) / stride + 1; 2],
            kernel: [kernel; 2],
            stride: [stride; 2],
            padding: [kernel / 2; 2],
            dilation: [1; 2],
        };
        for side in [16, 32, 56] {
            assert!(shape(side, 3, 1).runs_on_grid(), "{side}x{side} 3x3");
            assert!(
                shape(side, 3, 1).input_grad_runs_on_grid(),
                "{side}x{side} 3x3"
            );
        }
        assert!(shape(32, 3, 1).forward_runs_on_grid(), "4 channels");
        let wide = ConvShape {
            out_channels: 128,
            ..shape(32, 3, 1)
        };
        assert!(wide.runs_on_grid(), "the weight gradient at any width");
        assert_eq!(
            wide.weight_grad_runs_on_grid(),
            !crate::cpu::gemm_runs_avx512(),
            "the weight gradient on the grid with {} GEMMs",
            crate::cpu::gemm_isa()
        );
        assert!(shape(32, 3, 1).weight_grad_runs_on_grid(), "4 channels");
        let sixty_four = ConvShape {
            out_channels: 64,
            ..shape(56, 3, 1)
        };
        assert!(
            sixty_four.weight_grad_runs_on_grid(),
            "64 channels, 2 items"
        );
        // With AVX-512 GEMMs, ResNet-18's 64-channel 32x32 layers unfold by pixel at batch 64,
        // CIFAR ResNet-20's 32 channels and ResNet-50's 56x56 maps stay on the grid.
        let resnet18 = ConvShape {
            batch: 64,
            in_channels: 64,
            ..sixty_four
        };
        let avx512 = crate::cpu::gemm_runs_avx512();
        let at = |side: usize| ConvShape {
            input: [side; 2],
            output: [side; 2],
            ..resnet18
        };
        assert_eq!(at(32).weight_grad_runs_on_grid(), !avx512, "64x64x32x32");
        let narrow = ConvShape {
            in_channels: 32,
            out_channels: 32,
            ..at(16)
        };
        assert!(narrow.weight_grad_runs_on_grid(), "64x32x16x16");
        let imagenet = ConvShape { batch: 8, ..at(56) };
        assert!(imagenet.weight_grad_runs_on_grid(), "8x64x56x56");
        assert!(
            ConvShape { batch: 8, ..at(32) }.weight_grad_runs_on_grid(),
            "8x64x32x32"
        );
        assert!(
            !sixty_four.forward_runs_on_grid() && !sixty_four.input_grad_runs_on_grid(),
            "64 channels"
        );
        assert!(!shape(8, 3, 1).runs_on_grid(), "8x8 3x3");
        assert!(!shape(8, 3, 1).runs_in_groups(), "8x8 3x3: 64 pixels");
        let wide_8x8 = ConvShape {
            batch: 64,
            in_channels: 256,
            out_channels: 256,
            ..shape(8, 3, 1)
        };
        assert!(
            wide_8x8.runs_in_groups() && wide_8x8.weight_grad_runs_on_valid_taps(),
            "8x8 3x3, 256 channels"
        );
        assert!(shape(4, 3, 1).runs_in_groups(), "4x4 3x3");
        assert!(shape(14, 3, 2).runs_in_groups(), "7x7 outputs");
        assert!(!shape(32, 3, 2).runs_on_grid(), "stride 2");
        assert!(!shape(56, 1, 1).runs_on_grid(), "1x1");
        assert!(!shape(224, 7, 2).runs_on_grid(), "7x7/2 stem");
        assert!(shape(224, 7, 2).weight_grad_runs_by_pixel(), "7x7/2 stem");
        assert!(shape(32, 3, 2).weight_grad_runs_by_pixel(), "stride 2");
        assert!(!shape(32, 1, 2).weight_grad_runs_by_pixel(), "1x1 stride 2");
        let wide = |channels| ConvShape {
            in_channels: channels,
            ..shape(14, 3, 2)
        };
        assert!(wide(256).weight_grad_runs_by_pixel(), "256 channels");
        assert!(!wide(512).weight_grad_runs_by_pixel(), "512 channels");
        // The forward pass and input gradient by pixel: 196 pixels a map, with AVX-512 GEMMs.
        let layer3 = |side| ConvShape {
            batch: 8,
            in_channels: 256,
            out_channels: 256,
            ..shape(side, 3, 1)
        };
        let avx512 = crate::cpu::gemm_runs_avx512();
        assert_eq!(layer3(14).forward_runs_by_pixel(), avx512, "14x14");
        assert_eq!(layer3(14).input_grad_runs_by_pixel(), avx512, "14x14");
        assert!(!layer3(16).forward_runs_by_pixel(), "16x16: 256 pixels");
        assert!(!layer3(16).input_grad_runs_by_pixel(), "16x16: 256 pixels");
    }

    #[test]
    fn flipped_weights_and_summed_partials_match_their_definitions() {
        let s = ConvShape {
            batch: 1,
            in_channels: 5,
            out_channels: 3,
            input: [8, 8],
            output: [8, 9],
            kernel: [3, 2],
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
        };
        let weight = values(s.out_channels * s.in_channels * 6, 7);
        let got = flipped(&weight, s);
        for_each_weight(s, |at, [co, ci, tap]| {
            assert_eq!(
                got[(ci * 3 + co) * 6 + 5 - tap],
                weight[at],
                "{co} {ci} {tap}"
            );
        });
        // The per-tap and per-kernel-row layouts, and back.
        let by_tap = small::by_tap(&weight, s);
        let rows = shifted::by_kernel_row(&weight, s);
        let per_row = s.in_channels * s.kernel[1];
        for_each_weight(s, |at, [co, ci, tap]| {
            assert_eq!(by_tap[(co * 6 + tap) * 5 + ci], weight[at], "by tap");
            let (kh, kw) = (tap / 2, tap % 2);
            let row = (kh * s.out_channels + co) * per_row;
            assert_eq!(rows[row + ci * 2 + kw], weight[at], "by kernel row");
        });
        assert_eq!(small::from_tap(&by_tap, s), weight, "from tap");
        // Three partials of two parallel tasks and a tail, summed in task order.
        let partials: Vec<Vec<f32>> = (0..3).map(|i| values((1 << 15) + 5, i)).collect();
        let want: Vec<u32> = (0..partials[0].len())
            .map(|i| (partials[0][i] + partials[1][i] + partials[2][i]).to_bits())
            .collect();
        let got: Vec<u32> = sum(partials).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want);
    }

    /// Both phases of a padded row against the definition, for even and odd padding and
    /// widths, phases shorter than the row (values past them dropped) and longer (zeros left).
    #[test]
    fn deinterleave_splits_padded_columns() {
        for pad in 0..5usize {
            for w in 0..10usize {
                for len in [0, 1, 3, (w + pad).div_ceil(2), 7] {
                    let input: Vec<f32> = (1..=w).map(|v| v as f32).collect();
                    let mut phases = [vec![0f32; len], vec![0f32; len]];
                    let [even, odd] = &mut phases;
                    deinterleave(&input, pad, [even, odd]);
                    for (p, phase) in phases.iter().enumerate() {
                        for (j, &v) in phase.iter().enumerate() {
                            let want = (j * 2 + p)
                                .checked_sub(pad)
                                .and_then(|c| input.get(c))
                                .copied()
                                .unwrap_or(0.0);
                            assert_eq!(v, want, "pad {pad}, width {w}, phase {p} [{j}]");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn valid_output_ranges() {
        // kernel offset 0, pad 1, stride 1, input 4, 4 outputs: o=0 reads -1
        assert_eq!(valid_outputs(0, 1, 1, 4, 4), (1, 4));
        // offset 2 (last tap of a 3x3), pad 1: o=3 reads 4, out of range
        assert_eq!(valid_outputs(2, 1, 1, 4, 4), (0, 3));
        // stride 2, pad 3, offset 0, input 7, 4 outputs: o=0 reads -3, o=1 reads -1, o=2 reads 1
        assert_eq!(valid_outputs(0, 3, 2, 7, 4), (2, 4));
        // padding larger than the image: nothing valid for that tap
        let (low, high) = valid_outputs(0, 3, 1, 1, 1);
        assert!(low >= high);
    }
}
