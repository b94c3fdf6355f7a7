//! The weight gradient with the input unfolded by pixel: `cols` `[depth, kh * kw * in_channels]`,
//! one row of every kernel tap's channels per output pixel, rather than im2col's `[rows,
//! depth]`.
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

use rayon::prelude::*;

use super::{Chunks, ConvShape, copy_short, matmul, row_stride};

impl ConvShape {
    /// Whether the weight gradient runs unfolded by pixel: a kernel wider than one pixel whose
    /// columns are next to each other (no dilation along the width), with at most
    /// [`MAX_ROWS`] values a pixel. (1x1 convolutions with a stride ran slower this way:
    /// 64x256x16x16 to 512 channels at stride 2, 4.1-4.8 ms against 5.2-5.9.)
    pub(super) fn weight_grad_runs_by_pixel(&self) -> bool {
        self.kernel != [1, 1] && self.dilation[1] == 1 && self.rows() <= MAX_ROWS
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

/// One task's buffers: an item laid out channels-last, a chunk's unfolded inputs and output
/// gradients, and its partial gradient by tap.
struct Task {
    s: ConvShape,
    padded: Vec<f32>,
    cols: Vec<f32>,
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
                s,
                padded: Vec::new(),
                cols: Vec::new(),
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

impl Task {
    /// Adds the gradient of batch items `items` to the task's (overwrites it when `first`).
    fn accumulate(
        &mut self,
        x: &[f32],
        output_grad: &[f32],
        items: std::ops::Range<usize>,
        first: bool,
        parallelism: gemm::Parallelism,
    ) {
        let s = self.s;
        let pixels = s.output_pixels();
        let rows = s.gemm_rows();
        let depth = items.len() * pixels;
        let stride = row_stride(depth);
        self.cols.resize(depth * s.pixel_stride(), 0.0);
        self.dy.resize(s.out_channels * stride, 0.0);
        for (i, n) in items.enumerate() {
            let image = &x[n * s.input_len()..(n + 1) * s.input_len()];
            self.unfold(image, i * pixels);
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
                (self.cols.as_ptr(), [1, s.pixel_stride()]),
                (self.dy.as_ptr(), [1, stride]),
                parallelism,
            );
        }
    }

    /// Writes one image's input unfolded by pixel into rows `first_row..first_row + pixels` of
    /// `cols`: row `(oy, ox)` holds, for each kernel tap `(kh, kw)` in turn, the channels of
    /// the input pixel it reads (zero in the padding).
    fn unfold(&mut self, image: &[f32], first_row: usize) {
        let s = self.s;
        let [reach_h, reach_w] = s.reach();
        let channels = s.in_channels;
        self.lay_out(image);
        let stride = s.pixel_stride();
        let run = s.kernel[1] * channels; // one kernel row's taps at one output pixel
        let line = reach_w * channels;
        let [oh, ow] = s.output;
        let cols = &mut self.cols[first_row * stride..(first_row + oh * ow) * stride];
        for (p, out) in cols.chunks_exact_mut(stride).enumerate() {
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
