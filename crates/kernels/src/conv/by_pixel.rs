//! The weight gradient (and, on 14x14 maps, the forward pass and input gradient) with the
//! input unfolded by pixel: `cols` `[depth, kh * kw * in_channels]`, one row of every kernel
//! tap's channels per output pixel, rather than im2col's `[rows, depth]`.
//!
//! The GEMM `dW = dy · cols` then reads its left operand, `colsᵀ`, down contiguous columns, the
//! layout `gemm`'s micro-kernel reads without packing it first. One thread of `gemm` on a Zen 5
//! EPYC, the weight-gradient GEMM of 64 channels at 8x8 (576 x 64 x 256) ran 182-185 GFLOP/s on
//! im2col's layout and 214-218 on this one; 32 channels (288 x 32 x 1024) 126-142 against
//! 199-221, 256 channels (2304 x 256 x 256) 224-227 against 230-234.
//!
//! The unfolding is cheaper too: each item is first laid out channels-last with its padding,
//! `[rows read, columns read, in_channels]`, so that one kernel row's taps at one output pixel
//! are a single run of `kw * in_channels` values (the kernel's columns are consecutive pixels
//! for any stride), where im2col copies `ow` values per tap and output row. The gradient comes
//! out by tap, `[out_channels, kh, kw, in_channels]`, and is put back in the weight's layout as
//! the threads' partial sums are added.
//!
//! The forward pass multiplies a tile of `cols` by the weight laid out `[kh, kw, in_channels,
//! out_channels]` into `[pixels, out_channels]`: the output channels are then `gemm`'s vector
//! dimension, so a 14x14 map's 196 pixels (12 registers and 4 pixels) no longer end every run of
//! the GEMM in an edge tile. One thread of `gemm` on an Intel Xeon, 256 channels by 196 pixels
//! by 2304: 146-157 GFLOP/s with the pixels as the vector dimension, 173-185 this way. The
//! stride-1 input gradient is the same forward pass of the output gradient
//! ([`ConvShape::transposed`]).

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::{Chunks, ConvShape, TILE_FLOATS, copy_short, matmul, row_stride, split};

impl ConvShape {
    /// Whether the weight gradient runs unfolded by pixel: a kernel wider than one pixel whose
    /// columns are next to each other (no dilation along the width), with at most
    /// [`MAX_ROWS`] values a pixel. (1x1 convolutions with a stride ran slower this way:
    /// 64x256x16x16 to 512 channels at stride 2, 4.1-4.8 ms against 5.2-5.9.)
    pub(super) fn weight_grad_runs_by_pixel(&self) -> bool {
        self.kernel != [1, 1] && self.dilation[1] == 1 && self.rows() <= MAX_ROWS
    }

    /// Whether the forward pass runs unfolded by pixel: stride 1 where the GEMMs run AVX-512
    /// and [`super::forward`]'s GEMM would end each run down an output map's pixels in a
    /// partial register (ResNet-50's 14x14 maps, 196 pixels: `gemm`'s `x1x6` edge kernel) while
    /// the output channels fill whole ones, for a kernel that
    /// [`Self::weight_grad_runs_by_pixel`] unfolds. On an Intel Xeon (2 threads, least of 7,
    /// old and new alternated, three to five rounds): 8x256x14x14 6.59-7.43 -> 6.45-7.08 ms.
    /// Elsewhere this way was even or slower: where the pixels fill whole registers
    /// (8x64x56x56 6.35-6.86 against 6.81-7.17, 64x128x16x16 14.4-15.0 against 15.8-17.6,
    /// 64x64x32x32 15.4-16.0 against 25.4-26.2: the unfolding copies 9 values per product
    /// where [`super::shifted`] copies 3), and at stride 2 (8x256x28x28 to 14x14: 6.56-6.87
    /// against 7.17-7.39).
    pub(super) fn forward_runs_by_pixel(&self) -> bool {
        crate::cpu::gemm_runs_avx512()
            && self.stride == [1, 1]
            && self.rows() > 0
            && !self.output_pixels().is_multiple_of(16)
            && self.out_channels.is_multiple_of(16)
            && self.weight_grad_runs_by_pixel()
    }

    /// Whether the input gradient runs unfolded by pixel: a stride-1 convolution whose
    /// [`ConvShape::transposed`] forward pass does ([`Self::forward_runs_by_pixel`]; 8x256x14x14
    /// 7.33-8.02 -> 6.58-7.38 ms on the Xeon, least of 7, five rounds).
    pub(super) fn input_grad_runs_by_pixel(&self) -> bool {
        self.transposed().is_some_and(|t| t.forward_runs_by_pixel())
    }

    /// The rows of the GEMM's output, `kh * kw * in_channels` rounded up to a whole 16-float
    /// register: `gemm` copies its whole left operand first where they are not (the 7x7/2
    /// stem's 147). The rows past `kh * kw * in_channels` multiply zeros, and are dropped.
    fn gemm_rows(&self) -> usize {
        self.rows().next_multiple_of(16)
    }

    /// The distance between two pixels' rows of `cols`: [`row_stride`] of their
    /// [`Self::gemm_rows`] values.
    fn pixel_stride(&self) -> usize {
        row_stride(self.gemm_rows())
    }

    /// The rows and columns of the input (with its padding) that the kernel reads.
    fn reach(&self) -> [usize; 2] {
        [0, 1].map(|d| {
            (self.output[d] - 1) * self.stride[d] + (self.kernel[d] - 1) * self.dilation[d] + 1
        })
    }
}

/// The widest unfolding that runs by pixel, 256 channels of a 3x3 kernel. With 512 channels
/// (Zen 5, 2 threads, minimum of 9 runs) im2col's layout was faster at 8x512x7x7 (5.1-5.4
/// against 5.5 ms) and even at 8x512x14x14 with stride 2.
const MAX_ROWS: usize = 2304;

/// An item's input laid out channels-last with its padding, and pixels of it unfolded.
struct Unfolding {
    s: ConvShape,
    padded: Vec<f32>,
    cols: Vec<f32>,
}

/// One task's buffers: its unfolding, a chunk's output gradients, and its partial gradient by
/// tap.
struct Task {
    unfolding: Unfolding,
    dy: Vec<f32>,
    grad: Vec<f32>,
}

/// The gradient of the weight, `[out_channels, in_channels, kh, kw]` row-major.
pub(super) fn weight_grad(x: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    let chunks = Chunks::new(s);
    let partials: Vec<Vec<f32>> = (0..chunks.tasks)
        .into_par_iter()
        .map(|task| {
            let mut task_state = Task {
                unfolding: Unfolding::new(s),
                dy: Vec::new(),
                grad: vec![0f32; s.out_channels * s.gemm_rows()],
            };
            for (items, first) in chunks.of(task) {
                task_state.accumulate(x, output_grad, items, first, chunks.parallelism);
            }
            task_state.grad
        })
        .collect();
    by_weight(partials, s)
}

/// The forward pass, `[batch, out_channels, oh, ow]`, by `weight` (`[out_channels, in_channels,
/// kh, kw]`), a tile of an item's output pixels per GEMM.
pub(super) fn forward(x: &[f32], weight: &[f32], s: ConvShape) -> Vec<f32> {
    forward_by(x, &by_tap_columns(weight, s, false), s)
}

/// The input gradient of a stride-1 convolution: [`forward`] of the output gradient through
/// the [`ConvShape::transposed`] convolution.
pub(super) fn input_grad(weight: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    let transposed = s.transposed().expect("a stride-1 convolution");
    forward_by(output_grad, &by_tap_columns(weight, s, true), transposed)
}

/// The weight as the forward GEMM's left operand read in place, `[kh, kw, in_channels,
/// out_channels]`: row `(tap, ci)` (in the order [`Unfolding::unfold`] writes a pixel's values)
/// holds that value of every output channel's filter. With `flip`, of the
/// [`ConvShape::transposed`] convolution's weight ([`super::flipped`]):
/// `[kh, kw, out_channels, in_channels]`, tap `t` from `weight`'s tap `kh * kw - 1 - t`.
///
/// First `[in, tap, out]`, a task per input channel reading whole filters' taps, then its rows
/// in order, a copy of `out` values each (a value at a time straight into place read a cache
/// line per value).
fn by_tap_columns(weight: &[f32], s: ConvShape, flip: bool) -> Vec<f32> {
    let taps = s.kernel[0] * s.kernel[1];
    let (ins, outs) = if flip {
        (s.out_channels, s.in_channels)
    } else {
        (s.in_channels, s.out_channels)
    };
    let mut by_input = vec![0f32; weight.len()];
    by_input
        .par_chunks_mut((taps * outs).max(1))
        .enumerate()
        .for_each(|(i, block)| {
            for o in 0..outs {
                let (co, ci) = if flip { (i, o) } else { (o, i) };
                let filter = &weight[(co * s.in_channels + ci) * taps..][..taps];
                for (t, &value) in filter.iter().enumerate() {
                    let t = if flip { taps - 1 - t } else { t };
                    block[t * outs + o] = value;
                }
            }
        });
    let mut columns = vec![0f32; weight.len()];
    columns
        .par_chunks_mut(outs.max(1))
        .enumerate()
        .for_each(|(row, to)| {
            let (t, i) = (row / ins, row % ins);
            to.copy_from_slice(&by_input[(i * taps + t) * outs..][..outs]);
        });
    columns
}

/// [`forward`] by the weight's [`by_tap_columns`]: each item laid out channels-last, then a
/// tile of its output pixels (about [`TILE_FLOATS`] unfolded) at a time unfolded and multiplied
/// into `[pixels, out_channels]`, output channels contiguous (the GEMM's vector dimension,
/// where in [`super::forward`]'s GEMMs the pixels are, which end in an edge tile on 14x14
/// maps), and that put in place in the item's output. `s` must have input channels (a GEMM
/// with no inner dimension writes nothing).
fn forward_by(x: &[f32], columns: &[f32], s: ConvShape) -> Vec<f32> {
    let total = s.batch * s.output_len();
    let mut output = Vec::with_capacity(total);
    let (_, parallelism) = split(s.batch);
    let pixels = s.output_pixels();
    let tile = (TILE_FLOATS / s.pixel_stride()).clamp(1, pixels);
    output.spare_capacity_mut()[..total]
        .par_chunks_mut(s.output_len())
        .enumerate()
        .for_each_init(
            || (Unfolding::new(s), Vec::new()),
            |(unfolding, product), (n, out)| {
                unfolding.lay_out(&x[n * s.input_len()..(n + 1) * s.input_len()]);
                for first in (0..pixels).step_by(tile) {
                    let tile = first..(first + tile).min(pixels);
                    unfolding.cols.resize(tile.len() * s.pixel_stride(), 0.0);
                    unfolding.unfold(tile.clone(), 0);
                    product.resize(tile.len() * s.out_channels, 0.0);
                    // product[p, co] = sum over r of cols[p, r] * columns[r, co]
                    // SAFETY: product is [tile, out_channels] row-major (read as its transpose
                    // [out_channels, tile], column-major), columns [rows, out_channels] row-major
                    // (its transpose, column-major), cols [tile, rows] at row stride
                    // `pixel_stride` (its transpose); product is a buffer of its own.
                    unsafe {
                        matmul(
                            [s.out_channels, tile.len(), s.rows()],
                            (product.as_mut_ptr(), [1, s.out_channels]),
                            false,
                            (columns.as_ptr(), [1, s.out_channels]),
                            (unfolding.cols.as_ptr(), [1, s.pixel_stride()]),
                            parallelism,
                        );
                    }
                    put(product, s.out_channels, tile, out);
                }
            },
        );
    // SAFETY: every item's tiles wrote every value of its output above.
    unsafe { output.set_len(total) };
    output
}

/// Writes `product` (`[pixels.len(), channels]`) into columns `pixels` of `out` (`[channels,
/// all pixels]`), 16 channels at a time: 16 rows of `out` written in order, 16 values (a cache
/// line) read of `product` at a time.
fn put(product: &[f32], channels: usize, pixels: Range<usize>, out: &mut [MaybeUninit<f32>]) {
    const BLOCK: usize = 16;
    let plane = out.len() / channels;
    for c0 in (0..channels).step_by(BLOCK) {
        let block = BLOCK.min(channels - c0);
        for (p, values) in pixels.clone().zip(product.chunks_exact(channels)) {
            for (c, &value) in values[c0..c0 + block].iter().enumerate() {
                out[(c0 + c) * plane + p] = MaybeUninit::new(value);
            }
        }
    }
}

impl Task {
    /// Adds the gradient of batch items `items` to the task's (overwrites it when `first`).
    fn accumulate(
        &mut self,
        x: &[f32],
        output_grad: &[f32],
        items: Range<usize>,
        first: bool,
        parallelism: gemm::Parallelism,
    ) {
        let s = self.unfolding.s;
        let pixels = s.output_pixels();
        let rows = s.gemm_rows();
        let depth = items.len() * pixels;
        let stride = row_stride(depth);
        self.unfolding.cols.resize(depth * s.pixel_stride(), 0.0);
        self.dy.resize(s.out_channels * stride, 0.0);
        for (i, n) in items.enumerate() {
            let image = &x[n * s.input_len()..(n + 1) * s.input_len()];
            self.unfolding.lay_out(image);
            self.unfolding.unfold(0..pixels, i * pixels);
            let plane =
                &output_grad[n * s.out_channels * pixels..(n + 1) * s.out_channels * pixels];
            for (co, values) in plane.chunks_exact(pixels).enumerate() {
                self.dy[co * stride + i * pixels..][..pixels].copy_from_slice(values);
            }
        }
        // grad[co, r] (+)= sum over k of dy[co, k] * cols[k, r]
        // SAFETY: grad is [out_channels, rows] row-major, dy [out_channels, depth] at row stride
        // `stride` and cols [depth, rows] at row stride `pixel_stride` >= rows (read as its
        // transpose [rows, depth]; each pixel's values past `s.rows()` are the zeros `resize`
        // wrote, which `unfold` leaves); grad is a buffer of its own.
        unsafe {
            matmul(
                [rows, s.out_channels, depth],
                (self.grad.as_mut_ptr(), [1, rows]),
                !first,
                (self.unfolding.cols.as_ptr(), [1, s.pixel_stride()]),
                (self.dy.as_ptr(), [1, stride]),
                parallelism,
            );
        }
    }
}

impl Unfolding {
    fn new(s: ConvShape) -> Unfolding {
        Unfolding {
            s,
            padded: Vec::new(),
            cols: Vec::new(),
        }
    }

    /// Writes output pixels `pixels` of the image [`Self::lay_out`] laid out, unfolded, into
    /// rows `first_row..` of `cols` (at row stride [`ConvShape::pixel_stride`]): row `(oy, ox)`
    /// holds, for each kernel tap `(kh, kw)` in turn, the channels of the input pixel it reads
    /// (zero in the padding).
    fn unfold(&mut self, pixels: Range<usize>, first_row: usize) {
        let s = self.s;
        let [reach_h, reach_w] = s.reach();
        let channels = s.in_channels;
        let stride = s.pixel_stride();
        let run = s.kernel[1] * channels; // one kernel row's taps at one output pixel
        let line = reach_w * channels;
        let ow = s.output[1];
        let cols = &mut self.cols[first_row * stride..(first_row + pixels.len()) * stride];
        for (p, out) in pixels.zip(cols.chunks_exact_mut(stride)) {
            let out = &mut out[..s.rows()];
            let (oy, ox) = (p / ow, p % ow);
            for (kh, taps) in out.chunks_exact_mut(run).enumerate() {
                let r = oy * s.stride[0] + kh * s.dilation[0];
                debug_assert!(r < reach_h);
                let start = r * line + ox * s.stride[1] * channels;
                let src = &self.padded[start..start + run];
                if run >= 64 {
                    taps.copy_from_slice(src);
                } else {
                    copy_short(taps, src);
                }
            }
        }
    }

    /// Lays `image` (`[in_channels, h, w]`) out channels-last with its padding in `padded`:
    /// `[reach_h, reach_w, in_channels]`, padded row `r` and column `c` from input row `r - ph`
    /// and column `c - pw` (zero outside the image).
    fn lay_out(&mut self, image: &[f32]) {
        let s = self.s;
        let [h, w] = s.input;
        let [ph, pw] = s.padding;
        let [reach_h, reach_w] = s.reach();
        let channels = s.in_channels;
        self.padded.clear();
        self.padded.resize(reach_h * reach_w * channels, 0.0);
        let first_col = pw.min(reach_w);
        let cols = w.min(reach_w - first_col);
        for r in ph..reach_h.min(h + ph) {
            let iy = r - ph;
            let line = &mut self.padded[(r * reach_w + first_col) * channels..][..cols * channels];
            for (ci, channel) in image.chunks_exact(h * w).enumerate() {
                let src = &channel[iy * w..iy * w + cols];
                for (ix, &value) in src.iter().enumerate() {
                    line[ix * channels + ci] = value;
                }
            }
        }
    }
}

/// The sum of the tasks' partial gradients (each `[out_channels, kh, kw, in_channels]`, at row
/// stride [`ConvShape::gemm_rows`]) in the weight's layout `[out_channels, in_channels, kh,
/// kw]`, in the first partial's buffer, a task per output channel: its rows of the partials are
/// summed in order into a buffer, then put in place from there. (Summed straight into place,
/// the partials' rows were read a tap's run at a time, which on 512-channel layers, partials
/// out of cache, took a third of the weight gradient.)
fn by_weight(mut partials: Vec<Vec<f32>>, s: ConvShape) -> Vec<f32> {
    let taps = s.kernel[0] * s.kernel[1];
    let (rows, stride) = (s.rows(), s.gemm_rows());
    let mut grad = partials.remove(0);
    grad.par_chunks_mut(stride).enumerate().for_each_init(
        Vec::new,
        |summed: &mut Vec<f32>, (co, out)| {
            summed.clear();
            summed.extend_from_slice(&out[..rows]);
            for partial in &partials {
                for (sum, &value) in summed.iter_mut().zip(&partial[co * stride..][..rows]) {
                    *sum += value;
                }
            }
            for (t, channels) in summed.chunks_exact(s.in_channels).enumerate() {
                for (ci, &value) in channels.iter().enumerate() {
                    out[ci * taps + t] = value;
                }
            }
        },
    );
    // Each output channel's `rows` values to its place in `[out_channels, rows]`, in order
    // (each moves down, so none overwrites one not yet moved).
    if stride != rows {
        for co in 1..s.out_channels {
            grad.copy_within(co * stride..co * stride + rows, co * rows);
        }
        grad.truncate(s.out_channels * rows);
    }
    grad
}
