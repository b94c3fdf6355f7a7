//! Stride-1 convolutions without unfolding, on a padded grid.
//!
//! A run of batch items is laid channel-major on a grid of lines `w + gw` wide, each input row
//! followed by `gw` zeros and each item's `h` rows by `gh` zero lines, where the gap is the
//! widest padding of its dimension (`max(begin, end)`): the zeros after one row are the end
//! padding of that row and the start padding of the next, the zero lines after one item the
//! bottom padding of that item and the top padding of the next (`[channel, item, line, column]`,
//! each channel one flat row of `len` floats, after `ph` lines and `pw` zeros that pad the
//! first item's top). Read from offset `kh * (w + gw) + kw`, a channel's row is that channel
//! shifted by tap `(kh, kw)`: at grid point `(r, c)` it holds input `(r + kh - ph, c + kw - pw)`.
//! So, with `j` running over the grid points:
//! - forward: `y[co][j] = sum over (ci, tap) of W[co, ci, tap] · x[ci][j + shift(tap)]`, a
//!   [`rows_dot::combine`] over the points with `r < oh`, `c < ow` only, a run of up to 16 of
//!   an output row's points at a time, written straight into the output;
//! - input gradient: the forward pass of the output gradient laid on the input's grid (padded
//!   by `kh - 1 - ph`, `kw - 1 - pw`) by the flipped, transposed weight;
//! - weight gradient: `dW[co, ci, tap] = sum over j of dy[co][j] · x[ci][j + shift(tap)]`, a
//!   [`rows_dot::Sums`] over the output's points only, the output gradient read in place.
//!
//! The grid is larger than the map it holds (for a 3x3 kernel by 6% at 32x32, 13% at 16x16,
//! 27% at 8x8, 56% at 4x4), so this runs where it is at most 25% larger
//! ([`ConvShape::runs_on_grid`]).

use std::ops::Range;

use rayon::prelude::*;

use super::{ConvShape, flipped, split, sum};
use crate::rows_dot::{self, Rows, Sums};

/// The floats of every row's block kept in cache while [`Sums::add`] runs over it (512 KiB, an
/// L2 cache, for all the rows of `a` and `b` together; blocks of a quarter of that measured
/// 10-40% slower on the AMD EPYC here).
const BLOCK_FLOATS: usize = 1 << 17;

/// ... but at most this many values of each row per block: on an Intel Xeon CIFAR's 16-channel
/// 32x32 weight gradient (4096 values a row by [`BLOCK_FLOATS`]) ran 2.23-2.25 -> 1.75-1.90 ms
/// with 2048, while wider layers, at 2048 and under already, were even or slower with half
/// their blocks.
const MAX_BLOCK: usize = 2048;

/// The forward pass and the input gradient run on the grid up to this many output channels:
/// there the im2col GEMM (16 output rows, or an inner dimension of 16) ran at a third of its
/// speed on wider layers, and the grid 1.1-1.5x faster on CIFAR's 16-channel 32x32 layers;
/// from 32 channels up the GEMM was 5-25% faster (the grid's extra points cost more than the
/// copies it saves). On AMD EPYCs with AVX2.
const FEW_CHANNELS: usize = 24;

/// ... and this many where [`rows_dot::combine`] runs AVX-512 (8 output rows per register
/// tile): on an Intel Xeon CIFAR's 32-channel 16x16 layers ran 1.1-1.2x faster on the grid
/// than through the GEMM (forward 1.26-1.36 against 1.48-1.52 ms), 48 channels at 32x32 even
/// or slower.
const FEW_CHANNELS_AVX512: usize = 32;

/// [`FEW_CHANNELS`] or [`FEW_CHANNELS_AVX512`], by the kernel this CPU runs.
fn few_channels() -> usize {
    if rows_dot::Kernel::detect() == rows_dot::Kernel::Avx512 {
        FEW_CHANNELS_AVX512
    } else {
        FEW_CHANNELS
    }
}

/// The weight gradient runs on the grid up to this many output channels where the GEMMs run
/// AVX-512, and at every width where they run AVX2 ([`ConvShape::weight_grad_runs_on_grid`]).
const WEIGHT_GRAD_CHANNELS: usize = 64;

/// Where the GEMMs run AVX-512, the weight gradient leaves the grid for the by-pixel unfolding
/// from this many output channels ([`ConvShape::weight_grad_runs_on_grid`]) ...
const BY_PIXEL_CHANNELS: usize = 40;

/// ... where an item's unfolded input is at most this many floats (4 MiB: a 32x32 map of 64
/// channels by a 3x3 kernel is 2.25 MiB) ...
const BY_PIXEL_FLOATS: usize = 1 << 20;

/// ... and each thread has at least this many items.
const BY_PIXEL_ITEMS: usize = 8;

/// Extra floats after a grid so a shifted row, read in whole registers, stays in the buffer.
const SLACK: usize = 16;

/// Whether a map of `pixels` points on a grid of `grid` points is worth the grid's extra work:
/// at most 25% more points. CIFAR's 8x8 maps (27% more with a 3x3 kernel) ran slower there on
/// an Intel Xeon, the 64-channel weight gradient 1.23 -> 1.54 ms against im2col + GEMM.
fn small_grid(grid: usize, pixels: usize) -> bool {
    grid * 4 <= pixels * 5
}

impl ConvShape {
    /// The padding after each dimension's end: how far the kernel reads past the input's last
    /// row or column; `None` where it stops short of them.
    fn end_padding(&self) -> [Option<usize>; 2] {
        [0, 1].map(|d| {
            (self.output[d] + self.kernel[d] - 1).checked_sub(self.padding[d] + self.input[d])
        })
    }

    /// The zeros after each row and each item's rows ([`Grid`]): the wider of the two paddings
    /// of each dimension, and at least what the output reaches past the input.
    fn gap(&self) -> [usize; 2] {
        let end = self.end_padding();
        [0, 1].map(|d| {
            self.padding[d]
                .max(end[d].unwrap_or(0))
                .max(self.output[d].saturating_sub(self.input[d]))
        })
    }

    /// An item's lines and their width on the grid.
    fn grid(&self) -> [usize; 2] {
        let gap = self.gap();
        [0, 1].map(|d| self.input[d] + gap[d])
    }

    /// The zeros before a grid's first channel: the first item's top and left padding.
    fn lead(&self) -> usize {
        self.padding[0] * self.grid()[1] + self.padding[1]
    }

    /// Whether the forward pass and the weight gradient run on the grid: stride 1, no dilation,
    /// a kernel wider than one pixel, the end padding not negative (the kernel reads every
    /// input row and column), a grid at most 25% larger than the output.
    pub(super) fn runs_on_grid(&self) -> bool {
        let grid = self.grid();
        self.unfolds_padded()
            && self.end_padding().iter().all(Option::is_some)
            && small_grid(grid[0] * grid[1], self.output_pixels())
    }

    /// Whether the weight gradient runs on the grid: where [`ConvShape::runs_on_grid`] and
    /// the layer has at most [`WEIGHT_GRAD_CHANNELS`] output channels, or at any width where
    /// the GEMMs run AVX2 (or plain Rust). Where they run AVX-512 the GEMM wins on wider layers,
    /// whichever width the grid's dot products run: on an Intel Xeon (AVX-512 dot products, 2
    /// threads, the grid against im2col + GEMM) 8x64x56x56 8.9 against 13.2 ms, 64x48x32x32
    /// 15.1-15.7 against 16.1, 64x64x32x32 and 64x32x16x16 even, but 64x128x16x16 28.5 against
    /// 18.6 and 8x128x28x28 10.3 against 7.6; on an AMD Zen 4 (AVX2 dot products, minimum of 11
    /// runs, three rounds) 64x128x16x16 33-38 against 29-30, 64x96x16x16 30-34 against 18-19,
    /// 8x128x28x28 15-16 against 12-13, 8x256x14x14 22-26 against 13-19, while 64 channels
    /// stayed even or better on the grid (8x64x56x56 12.5-14.9 against 15.9-16.9).
    ///
    /// Where they run AVX-512, layers from [`BY_PIXEL_CHANNELS`] output channels up leave the
    /// grid for [`super::by_pixel`]'s unfolding, if an item's unfolded input fits
    /// [`BY_PIXEL_FLOATS`] and each thread has [`BY_PIXEL_ITEMS`] items: on an AMD Zen 5 (2
    /// threads, minimum of 11 runs, three or four rounds, `gemm` reading its left operand in
    /// place) 64x64x32x32 14.3-15.7 against 17.7-18.8 ms on the grid, 64x48x32x32 7.9-8.8
    /// against 9.2-10.8, 64x64x16x16 3.5-3.7 against 4.0-4.3, 16x64x32x32 3.3-3.5 against
    /// 3.5-3.8, CIFAR's 3 -> 64 stem 1.3-1.8 against 1.7-2.2; but 64x32x16x16 0.96-1.07 against
    /// 0.89-0.95 and 64x16x32x32 1.36-1.42 against 0.95-1.01, 8x64x32x32 1.74-2.11 against
    /// 1.60-1.94 and 8x64x56x56 (3136 pixels of 576 values an item) 5.5-5.7 against 4.9-5.2.
    /// (Unmeasured on the Intel Xeon and the Zen 4.)
    pub(super) fn weight_grad_runs_on_grid(&self) -> bool {
        if !self.runs_on_grid() {
            return false;
        }
        if !crate::cpu::gemm_runs_avx512() {
            return true;
        }
        let items_per_task = self.batch / split(self.batch).0;
        let by_pixel = self.out_channels >= BY_PIXEL_CHANNELS
            && self.weight_grad_runs_by_pixel()
            && self.output_pixels() * self.rows() <= BY_PIXEL_FLOATS
            && items_per_task >= BY_PIXEL_ITEMS;
        self.out_channels <= WEIGHT_GRAD_CHANNELS && !by_pixel
    }

    /// Whether the forward pass runs on the grid: where [`ConvShape::runs_on_grid`], with at most
    /// [`few_channels`] output channels.
    pub(super) fn forward_runs_on_grid(&self) -> bool {
        self.out_channels <= few_channels() && self.runs_on_grid()
    }

    /// Whether the input gradient runs on the input's grid: the [`Self::transposed`]
    /// convolution runs on its grid, and its GEMM's inner dimension (the output channels) is at
    /// most [`few_channels`].
    pub(super) fn input_grad_runs_on_grid(&self) -> bool {
        self.out_channels <= few_channels() && self.transposed().is_some_and(|t| t.runs_on_grid())
    }
}

/// Items `items` of `[batch, channels, h, w]` values laid channel-major on a grid of
/// `[rows, width]` points per item, each map at its top left, zero elsewhere: `lead` zeros,
/// `channels` rows of `items.len() * rows * width` floats, then [`SLACK`] plus `tail` zeros.
struct Grid {
    values: Vec<f32>,
    /// One channel's floats.
    len: usize,
    width: usize,
}

impl Grid {
    fn lay(
        src: &[f32],
        [channels, h, w]: [usize; 3],
        items: Range<usize>,
        [rows, width]: [usize; 2],
        lead: usize,
        tail: usize,
    ) -> Grid {
        let len = items.len() * rows * width;
        // Built in order, so only the padding is written with zeros (not the whole grid first).
        let mut values = Vec::with_capacity(lead + channels * len + tail + SLACK);
        let zeros = |values: &mut Vec<f32>, count: usize| values.resize(values.len() + count, 0.0);
        zeros(&mut values, lead);
        for c in 0..channels {
            for n in items.clone() {
                let map = &src[(n * channels + c) * h * w..][..h * w];
                for src_row in map.chunks_exact(w) {
                    values.extend_from_slice(src_row);
                    zeros(&mut values, width - w);
                }
                zeros(&mut values, (rows - h) * width);
            }
        }
        zeros(&mut values, tail + SLACK);
        Grid { values, len, width }
    }

    /// The start of each `(channel, kh, kw)` row: the channel shifted by the tap (from a grid
    /// laid after [`ConvShape::lead`] zeros).
    fn tap_rows(&self, channels: usize, [kh, kw]: [usize; 2]) -> Vec<usize> {
        let taps = kh * kw;
        (0..channels * taps)
            .map(|r| (r / taps) * self.len + (r % taps / kw) * self.width + r % kw)
            .collect()
    }
}

/// How far the last tap's row reaches past the last channel's end.
fn reach([kh, kw]: [usize; 2], width: usize) -> usize {
    (kh - 1) * width + kw - 1
}

/// Where each output row of `items` items lies on the grid and in the output
/// (`[items, channels, h, w]`), cut into [`rows_dot::Run`]s of up to 16 positions.
fn output_runs(
    items: usize,
    [channels, h, w]: [usize; 3],
    [rows, width]: [usize; 2],
) -> Vec<rows_dot::Run> {
    let mut runs = Vec::with_capacity(items * h * w.div_ceil(rows_dot::RUN));
    for n in 0..items {
        for y in 0..h {
            for x in (0..w).step_by(rows_dot::RUN) {
                runs.push(rows_dot::Run {
                    input: (n * rows + y) * width + x,
                    output: n * channels * h * w + y * w + x,
                    len: (w - x).min(rows_dot::RUN),
                });
            }
        }
    }
    runs
}

/// A run of items' output gradient as [`rows_dot::Sums`] reads it beside their input's grid:
/// in place, an output row at a time, where the rows are whole registers (16, 32 wide); on the
/// same grid (zero outside the map) where they are not, whose flat runs of 16 cross from row
/// to row (a 56-wide map in runs of 16, 16, 16, 8 read 8x64x56x56's weight gradient 6.9-7.1 ->
/// 7.7-8.5 ms on an Intel Xeon; its grid is 4% larger than the map).
struct OutputGrad<'a> {
    values: Values<'a>,
    /// The start of each channel.
    rows: Vec<usize>,
    runs: Vec<rows_dot::Run>,
}

/// Where [`OutputGrad`]'s values lie.
enum Values<'a> {
    InPlace(&'a [f32]),
    Laid(Grid),
}

impl<'a> OutputGrad<'a> {
    fn new(output_grad: &'a [f32], s: ConvShape, items: Range<usize>, grid: [usize; 2]) -> Self {
        let output = [s.out_channels, s.output[0], s.output[1]];
        if s.output[1].is_multiple_of(rows_dot::RUN) {
            // Each output row of these items where the items' gradient lies in all of it.
            let mut runs = output_runs(items.len(), output, grid);
            for run in &mut runs {
                run.output += items.start * s.output_len();
            }
            return OutputGrad {
                values: Values::InPlace(output_grad),
                rows: (0..s.out_channels).map(|c| c * s.output_pixels()).collect(),
                runs,
            };
        }
        let laid = Grid::lay(output_grad, output, items, grid, 0, 0);
        let runs = (0..laid.len)
            .step_by(rows_dot::RUN)
            .map(|k| rows_dot::Run {
                input: k,
                output: k,
                len: (laid.len - k).min(rows_dot::RUN),
            })
            .collect();
        OutputGrad {
            rows: (0..s.out_channels).map(|c| c * laid.len).collect(),
            values: Values::Laid(laid),
            runs,
        }
    }

    fn values(&self) -> &[f32] {
        match &self.values {
            Values::InPlace(values) => values,
            Values::Laid(grid) => &grid.values,
        }
    }
}

/// The batch cut into one run of items per thread.
fn runs(batch: usize) -> Vec<Range<usize>> {
    let (tasks, _) = split(batch);
    let per_task = batch.div_ceil(tasks);
    (0..tasks)
        .map(|t| t * per_task..((t + 1) * per_task).min(batch))
        .filter(|run| !run.is_empty())
        .collect()
}

/// [`super::forward`] on the grid: the output of `s` (`[batch, out_channels, oh, ow]`) of `x`
/// by `weight` (`[out_channels, rows]`), for [`ConvShape::runs_on_grid`].
pub(super) fn forward(x: &[f32], weight: &[f32], s: ConvShape) -> Vec<f32> {
    let total = s.batch * s.output_len();
    let mut out = Vec::with_capacity(total);
    let grid = s.grid();
    let kernel = rows_dot::Kernel::detect();
    let runs = runs(s.batch);
    let per_run = runs[0].len() * s.output_len();
    out.spare_capacity_mut()[..total]
        .par_chunks_mut(per_run)
        .zip(runs)
        .for_each(|(out, items)| {
            let channels = [s.in_channels, s.input[0], s.input[1]];
            let reach = reach(s.kernel, grid[1]);
            let laid = Grid::lay(x, channels, items.clone(), grid, s.lead(), reach);
            let rows = laid.tap_rows(s.in_channels, s.kernel);
            let output = [s.out_channels, s.output[0], s.output[1]];
            let runs = output_runs(items.len(), output, grid);
            let input = rows_dot::Shifted {
                values: &laid.values,
                rows: &rows,
                runs: &runs,
            };
            let stride = s.output_pixels();
            rows_dot::combine(weight, s.out_channels, input, out, stride, kernel);
        });
    // SAFETY: the runs' chunks cover the `total` values, and `combine` wrote every one: each
    // output row of every item is a run's positions of every channel.
    unsafe { out.set_len(total) };
    out
}

/// [`super::input_grad`] on the input's grid: the output gradient convolved
/// ([`ConvShape::transposed`]) by the weight flipped in both spatial dimensions with its
/// channel axes swapped.
pub(super) fn input_grad(weight: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    let transposed = s.transposed().expect("input_grad_runs_on_grid");
    forward(output_grad, &flipped(weight, s), transposed)
}

/// [`super::weight_grad`] on the grid: one run of items per thread, each summing the dot
/// products of every output-gradient channel with every shifted input channel.
pub(super) fn weight_grad(x: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    let grid = s.grid();
    let kernel = rows_dot::Kernel::detect();
    let partials: Vec<Vec<f32>> = runs(s.batch)
        .into_par_iter()
        .map(|items| {
            let channels = [s.in_channels, s.input[0], s.input[1]];
            let reach = reach(s.kernel, grid[1]);
            let input = Grid::lay(x, channels, items.clone(), grid, s.lead(), reach);
            let dy = OutputGrad::new(output_grad, s, items, grid);
            let b_rows = input.tap_rows(s.in_channels, s.kernel);
            let mut sums = Sums::new(s.out_channels, s.rows(), kernel);
            let rows = Rows {
                a: dy.values(),
                a_rows: &dy.rows,
                b: &input.values,
                b_rows: &b_rows,
                runs: &dy.runs,
            };
            let block = (BLOCK_FLOATS / (s.in_channels + s.out_channels)).min(MAX_BLOCK);
            sums.add(rows, (block / rows_dot::RUN).max(1));
            sums.finish()
        })
        .collect();
    sum(partials)
}
