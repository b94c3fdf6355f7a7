//! Convolutions whose output maps have fewer than [`SMALL_MAP`] pixels (ResNet-18's 4x4 on
//! CIFAR, the 7x7 of ImageNet networks' last stage), and the 8x8 maps of wide layers (256
//! channels: [`WIDE_CHANNELS`]): several batch items per GEMM.
//!
//! One item's forward GEMM, `[out_channels, pixels]`, is one `gemm` transposes to make its
//! output column-major, so its register tiles run down the pixels: on 16 pixels that is one
//! 16-lane AVX-512 tile of the kernel's four (`gemm`'s `x1x6` edge kernel, which took 16% of
//! ResNet-18's CIFAR step, loads per fused multiply-add four times the main kernel's). Here a
//! group of items is unfolded side by side, `cols` `[rows, items * pixels]`, multiplied once
//! into a staging buffer `[out_channels, items * pixels]` and copied into each item's output;
//! with stride 1 and enough items, each output only by the kernel taps that read its input
//! ([`ValidTaps`]: on a 4x4 map a 3x3 kernel's padding is 31% of im2col's products). The input
//! gradient is, for stride 1, the same forward pass of the output gradient by the
//! flipped weight; for other strides it gathers the group's output gradients the same way,
//! multiplies once and folds each item's columns back. The weight gradient of those maps runs
//! on the valid taps too (elsewhere as [`super::weight_grad`]'s chunks of im2col).

use std::ops::Range;

use rayon::prelude::*;

use super::{
    ConvShape, copy_short, flipped, fold, matmul, row_stride, split, sum, unfold, valid_outputs,
    zeroed_chunks,
};

/// Output maps with fewer pixels than this run in groups of items.
pub(super) const SMALL_MAP: usize = 64;

/// A group's GEMM spans at least this many columns (items times pixels) where the batch
/// allows it while every thread still has a group.
const GROUP_COLUMNS: usize = 128;

/// Stride-1 maps of up to this many pixels (CIFAR's 8x8) run in groups too (on their valid
/// taps) ...
const WIDE_MAP: usize = 64;

/// ... where the layer has at least this many channels in and out. On an Intel Xeon (2
/// threads, least of 7, two or three rounds, against one image per GEMM): 64x256x8x8 input
/// gradient 17.9-18.5 -> 14.9-15.9 ms, weight gradient 17.9-18.7 -> 15.4-15.7, forward pass
/// 14.9-15.8 -> 14.5-15.1 (even before [`by_tap`] ran on every thread); 64 channels were slower
/// in groups (weight gradient 1.07-1.09 -> 1.38-1.60). Each image's GEMM reads the whole
/// weight (2.4 MiB at 256 channels, past the L2 cache) for 64 pixels; a group's reads it once
/// for all of its items.
const WIDE_CHANNELS: usize = 128;

impl ConvShape {
    /// Whether the forward pass and input gradient run in groups of items: maps of fewer than
    /// [`SMALL_MAP`] pixels, and the stride-1 8x8 maps of wide layers ([`WIDE_MAP`],
    /// [`WIDE_CHANNELS`]).
    pub(super) fn runs_in_groups(&self) -> bool {
        let wide = self.unfolds_padded()
            && self.output_pixels() <= WIDE_MAP
            && self.in_channels.min(self.out_channels) >= WIDE_CHANNELS;
        (self.output_pixels() < SMALL_MAP || wide) && self.batch > 1
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

/// [`super::forward`] in groups of items ([`ConvShape::runs_in_groups`]): with stride 1 on
/// each output's valid taps only where the batch is large enough ([`ValidTaps`]), else
/// through im2col.
pub(super) fn forward(x: &[f32], weight: &[f32], s: ConvShape) -> Vec<f32> {
    match ValidTaps::new(s) {
        Some(valid_taps) => valid_taps.forward(x, &by_tap(weight, s)),
        None => unfolded_forward(x, (weight, [s.rows(), 1]), s),
    }
}

/// [`forward`] through im2col, a group of items per GEMM, with the weight `[out_channels,
/// rows]` given by its values and (row, column) strides.
fn unfolded_forward(x: &[f32], (weight, strides): (&[f32], [usize; 2]), s: ConvShape) -> Vec<f32> {
    let group = s.group();
    let (_, parallelism) = split(s.batch.div_ceil(group));
    let (rows, pixels) = (s.rows(), s.output_pixels());
    zeroed_chunks(
        s.batch * s.output_len(),
        group * s.output_len(),
        || (Vec::new(), Vec::new()),
        |(cols, staged), g, out| {
            let items = out.len() / s.output_len();
            let width = items * pixels;
            cols.resize(rows * width, 0.0);
            for i in 0..items {
                let n = g * group + i;
                let image = &x[n * s.input_len()..(n + 1) * s.input_len()];
                unfold(image, s, cols, width, i * pixels);
            }
            staged.resize(s.out_channels * width, 0.0);
            // SAFETY: staged is [out_channels, width] and cols [rows, width], row-major,
            // weight [out_channels, rows] at its strides (the caller's); staged is a buffer
            // of its own.
            unsafe {
                matmul(
                    [s.out_channels, width, rows],
                    (staged.as_mut_ptr(), [width, 1]),
                    false,
                    (weight.as_ptr(), strides),
                    (cols.as_ptr(), [width, 1]),
                    parallelism,
                );
            }
            scatter(staged, s.out_channels, pixels, out);
        },
    )
}

/// [`super::input_grad`] in groups of items ([`ConvShape::runs_in_groups`]): for stride 1 the
/// forward pass of the [`ConvShape::transposed`] convolution, else `Wᵀ · dy` folded back. On an
/// AMD Zen 4 (minimum of 11 runs, three rounds) the transposed forward pass took 29-31 ms at
/// 64x512x4x4 against 35-41 for the product and fold, which writes and reads back nine times
/// the gradient's values; 14-16 against 19-20 at 8x512x7x7.
pub(super) fn input_grad(weight: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    if let Some(transposed) = s.transposed() {
        return match ValidTaps::new(transposed) {
            Some(valid_taps) => valid_taps.forward(output_grad, &flipped_by_tap(weight, s)),
            // A 1x1 kernel's flipped weight is its transpose: read in place (copying
            // ResNet-50's last stage's 1x1 weights, 2048 by 512, a value at a time took 2% of
            // its step).
            None if s.kernel == [1, 1] => {
                unfolded_forward(output_grad, (weight, [1, s.in_channels]), transposed)
            }
            None => unfolded_forward(
                output_grad,
                (&flipped(weight, s), [transposed.rows(), 1]),
                transposed,
            ),
        };
    }
    let group = s.group();
    let (_, parallelism) = split(s.batch.div_ceil(group));
    let (rows, pixels) = (s.rows(), s.output_pixels());
    let pointwise = s.is_pointwise();
    zeroed_chunks(
        s.batch * s.input_len(),
        group * s.input_len(),
        || (Vec::new(), Vec::new(), Vec::new()),
        |(dy, dcols, item_cols), g, dx| {
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
    )
}

/// Output columns `ox` that read the same kernel columns `kw` (all of the input: stride 1).
struct Columns {
    ox: Range<usize>,
    kw: Range<usize>,
}

/// One kernel row's GEMM of one part ([`ValidTaps::for_each_product`]), by where its operands
/// start: columns `staged .. staged + columns` of the staged output (or its gradient), the
/// weight's columns `tap .. tap + depth` (`(kh, kw, ci)` from the part's first `kw`), the
/// band's `depth` rows at `stride` from column `band`.
struct Product {
    staged: usize,
    columns: usize,
    depth: usize,
    tap: usize,
    band: usize,
    stride: usize,
}

/// The stride-1 forward pass and weight gradient of groups of items without the products by
/// padding: on a 4x4 map a 3x3 kernel reads padding at 31% of its taps (16% on 8x8, 10% on
/// 7x7), which im2col multiplies as zeros.
///
/// The output columns are cut into [`Columns`] (for a 3x3 kernel padded by 1: the first, the
/// inner ones, the last). For each, a band holds the group's input at the kernel columns it
/// reads, rows `(kw, ci)` by columns `(iy, item, ox)` over every input row `iy`; kernel row `kh`
/// is then one GEMM over the output rows that read an input row, `oy` in [`valid_outputs`],
/// with the band's columns at `iy = oy + kh - ph` and the weight's `(kh, kw, ci)` columns (the
/// weight laid out `[co, kh, kw, ci]`, [`by_tap`]). The output (or its gradient) is staged with
/// columns `(oy, item, ox)` per part, the parts one after another.
struct ValidTaps {
    s: ConvShape,
    parts: Vec<Columns>,
}

/// [`ValidTaps`] runs where each thread's items times the narrowest part's columns are at
/// least this many: the columns of that part's GEMMs per output row. On an AMD Zen 4 (minimum
/// of 21 runs, four rounds, forward pass against im2col): 64x512x4x4 (32 items a thread, 32
/// columns) 30.6-32.6 -> 26.4-29.0 ms, 64x256x4x4 7.6-7.9 -> 6.5-7.3, 32x512x7x7 46-49 -> 35-40,
/// 16x512x7x7 (8 columns) 24-26 -> 19-21, 16x512x4x4 even, 8x512x7x7 (4 columns) 10.5-11.2 ->
/// 10.9-12.2. (On 8x8 maps, outside this module, it ran even or slower than one image per GEMM:
/// 64x256x8x8 forward 26.7-27.7 against 27.0-29.2.)
const MIN_PART_COLUMNS: usize = 8;

impl ConvShape {
    /// Whether the weight gradient runs on the valid taps only ([`ValidTaps`]).
    pub(super) fn weight_grad_runs_on_valid_taps(&self) -> bool {
        self.runs_in_groups() && ValidTaps::new(*self).is_some()
    }
}

/// `[out_channels, in_channels, kh, kw]` as `[out_channels, kh, kw, in_channels]`, a filter
/// per task on every thread (on one thread, 512 channels' 2.4M values were about a seventh of
/// ResNet-18's 64x512x4x4 forward pass).
pub(super) fn by_tap(weight: &[f32], s: ConvShape) -> Vec<f32> {
    transpose_filters(weight, [s.in_channels, s.kernel[0] * s.kernel[1]])
}

/// Each `[rows, columns]` block of `values` (a filter) transposed, a block per task on every
/// thread.
fn transpose_filters(values: &[f32], [rows, columns]: [usize; 2]) -> Vec<f32> {
    let block = (rows * columns).max(1);
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(block)
        .zip(values.par_chunks(block))
        .for_each(|(to, from)| {
            for (c, row) in to.chunks_exact_mut(rows).enumerate() {
                for (r, value) in row.iter_mut().enumerate() {
                    *value = from[r * columns + c];
                }
            }
        });
    out
}

/// [`by_tap`] of [`flipped`] (the weight of [`ConvShape::transposed`]) in one pass, a task per
/// output row: `[in_channels, kh, kw, out_channels]`, tap `t` from `weight`'s tap
/// `kh * kw - 1 - t`. (The two passes, one thread each, were 6% and 3% of the 64x512x4x4 input
/// gradient's profile.)
fn flipped_by_tap(weight: &[f32], s: ConvShape) -> Vec<f32> {
    let taps = s.kernel[0] * s.kernel[1];
    let mut out = vec![0f32; weight.len()];
    out.par_chunks_mut(taps * s.out_channels)
        .enumerate()
        .for_each(|(ci, row)| {
            // An output channel's taps at a time, one read of `taps` values (tap by tap, each
            // pass over the output channels read a line per value: 64x512x4x4 input gradient
            // 12.6-13.8 -> 12.3-12.4 ms on an Intel Xeon, least of 7, three rounds).
            for co in 0..s.out_channels {
                let taps_of = &weight[(co * s.in_channels + ci) * taps..][..taps];
                for (t, &value) in taps_of.iter().rev().enumerate() {
                    row[t * s.out_channels + co] = value;
                }
            }
        });
    out
}

/// The inverse of [`by_tap`], a filter per task on every thread.
pub(super) fn from_tap(by_tap: &[f32], s: ConvShape) -> Vec<f32> {
    transpose_filters(by_tap, [s.kernel[0] * s.kernel[1], s.in_channels])
}

impl ValidTaps {
    /// For stride 1 without dilation, a kernel wider than one pixel, and a batch large enough
    /// for [`MIN_PART_COLUMNS`]; else none.
    fn new(s: ConvShape) -> Option<ValidTaps> {
        if !s.unfolds_padded() {
            return None;
        }
        let parts = Self::parts(s);
        let narrowest = parts.iter().map(|part| part.ox.len()).min().unwrap_or(0);
        let taps = ValidTaps { s, parts };
        (taps.group() * narrowest >= MIN_PART_COLUMNS).then_some(taps)
    }

    /// The output columns as runs that read the same kernel columns.
    fn parts(s: ConvShape) -> Vec<Columns> {
        let kw_len = s.kernel[1];
        let valid: Vec<(usize, usize)> = (0..kw_len)
            .map(|kw| valid_outputs(kw, s.padding[1], 1, s.input[1], s.output[1]))
            .collect();
        let mut parts: Vec<Columns> = Vec::new();
        for ox in 0..s.output[1] {
            let first = valid.iter().position(|&(lo, hi)| lo <= ox && ox < hi);
            let kw = first.map_or(0..0, |first| {
                let end = (first..kw_len)
                    .find(|&kw| !(valid[kw].0 <= ox && ox < valid[kw].1))
                    .unwrap_or(kw_len);
                first..end
            });
            match parts.last_mut() {
                Some(last) if last.kw == kw => last.ox.end = ox + 1,
                _ => parts.push(Columns { ox: ox..ox + 1, kw }),
            }
        }
        parts
    }

    /// Items per group: one group per thread.
    fn group(&self) -> usize {
        let (tasks, _) = split(self.s.batch);
        self.s.batch.div_ceil(tasks)
    }

    /// The kernel rows that some output row reads an input row with, each with those output
    /// rows.
    fn kernel_rows(&self) -> impl Iterator<Item = (usize, Range<usize>)> {
        let s = self.s;
        (0..s.kernel[0]).filter_map(move |kh| {
            let (low, high) = valid_outputs(kh, s.padding[0], 1, s.input[0], s.output[0]);
            (low < high).then_some((kh, low..high))
        })
    }

    /// The output of every item, `[batch, out_channels, oh, ow]`, by `weight` ([`by_tap`]).
    fn forward(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let s = self.s;
        let group = self.group();
        let (_, parallelism) = split(s.batch);
        zeroed_chunks(
            s.batch * s.output_len(),
            group * s.output_len(),
            || (Vec::new(), Vec::new()),
            |(band, staged), g, out| {
                let items = out.len() / s.output_len();
                let first = g * group * s.input_len();
                let x = &x[first..first + items * s.input_len()];
                staged.clear();
                staged.resize(s.out_channels * items * s.output_pixels(), 0.0);
                self.multiply(x, items, weight, band, staged, parallelism);
                self.scatter(staged, items, out);
            },
        )
    }

    /// The weight gradient, `[out_channels, in_channels, kh, kw]`: one partial sum per group.
    fn weight_grad(&self, x: &[f32], output_grad: &[f32]) -> Vec<f32> {
        let s = self.s;
        let group = self.group();
        let (_, parallelism) = split(s.batch);
        let partials: Vec<Vec<f32>> = (0..s.batch.div_ceil(group))
            .into_par_iter()
            .map(|g| {
                let items = group.min(s.batch - g * group);
                let x = &x[g * group * s.input_len()..][..items * s.input_len()];
                let dy = &output_grad[g * group * s.output_len()..][..items * s.output_len()];
                let mut staged = Vec::new();
                self.gather(dy, items, &mut staged);
                let mut grad = vec![0f32; s.out_channels * s.rows()];
                self.accumulate(x, items, &staged, &mut Vec::new(), &mut grad, parallelism);
                grad
            })
            .collect();
        from_tap(&sum(partials), s)
    }

    /// Unfolds each part's band of `items` items (`x`, `[items, in_channels, h, w]`) in turn
    /// and calls `f` with it for each of the part's kernel rows ([`Product`]).
    fn for_each_product(
        &self,
        x: &[f32],
        items: usize,
        band: &mut Vec<f32>,
        mut f: impl FnMut(&[f32], Product),
    ) {
        let s = self.s;
        let mut column = 0;
        for part in &self.parts {
            let span = items * part.ox.len();
            let depth = part.kw.len() * s.in_channels;
            let stride = self.unfold(x, part, span, band);
            for (kh, rows) in self.kernel_rows().filter(|_| depth > 0) {
                let product = Product {
                    staged: column + rows.start * span,
                    columns: rows.len() * span,
                    depth,
                    tap: (kh * s.kernel[1] + part.kw.start) * s.in_channels,
                    band: (rows.start + kh - s.padding[0]) * span,
                    stride,
                };
                f(band, product);
            }
            column += s.output[0] * span;
        }
    }

    /// The products of `items` items (`x`, `[items, in_channels, h, w]`) by `weight`
    /// ([`by_tap`]) added to `staged`, `[out_channels, oh * items * ow]`, each part's columns
    /// `(oy, item, ox)` after the parts before it.
    fn multiply(
        &self,
        x: &[f32],
        items: usize,
        weight: &[f32],
        band: &mut Vec<f32>,
        staged: &mut [f32],
        parallelism: gemm::Parallelism,
    ) {
        let s = self.s;
        let width = items * s.output_pixels();
        self.for_each_product(x, items, band, |band, p| {
            // SAFETY: staged is [out_channels, width] row-major, and p's columns lie in it
            // (inside their part's); the weight's columns p.tap .. + p.depth of [out_channels,
            // rows]; the band's p.columns columns from p.band of [p.depth, p.stride] (its
            // input rows from the first the output rows read to the last); staged is a buffer
            // of its own.
            unsafe {
                matmul(
                    [s.out_channels, p.columns, p.depth],
                    (staged.as_mut_ptr().add(p.staged), [width, 1]),
                    true,
                    (weight.as_ptr().add(p.tap), [s.rows(), 1]),
                    (band.as_ptr().add(p.band), [p.stride, 1]),
                    parallelism,
                );
            }
        });
    }

    /// The weight gradient of `items` items (`x`, `[items, in_channels, h, w]`) given their
    /// output gradient `staged` (as [`Self::gather`] lays it) added to `grad` ([`by_tap`]).
    fn accumulate(
        &self,
        x: &[f32],
        items: usize,
        staged: &[f32],
        band: &mut Vec<f32>,
        grad: &mut [f32],
        parallelism: gemm::Parallelism,
    ) {
        let s = self.s;
        let width = items * s.output_pixels();
        self.for_each_product(x, items, band, |band, p| {
            // grad[co, p.tap + r] += sum over j of staged[co, p.staged + j] * band[r, p.band + j]
            // SAFETY: grad is [out_channels, rows] row-major and this adds to its columns
            // p.tap .. + p.depth; staged's p.columns columns from p.staged of [out_channels,
            // width]; the band [p.depth, p.stride] read as its transpose from column p.band;
            // grad is a buffer of its own.
            unsafe {
                matmul(
                    [s.out_channels, p.depth, p.columns],
                    (grad.as_mut_ptr().add(p.tap), [s.rows(), 1]),
                    true,
                    (staged.as_ptr().add(p.staged), [width, 1]),
                    (band.as_ptr().add(p.band), [1, p.stride]),
                    parallelism,
                );
            }
        });
    }

    /// The band of `part`: `band[(kw, ci), (iy, item, ox)] = x[item, ci, iy, ox + kw - pw]`
    /// over the part's kernel columns `kw` and output columns `ox` (`span` items times those),
    /// its rows at the returned stride ([`row_stride`]: the weight gradient's GEMM reads
    /// across them).
    fn unfold(&self, x: &[f32], part: &Columns, span: usize, band: &mut Vec<f32>) -> usize {
        let [h, w] = self.s.input;
        let ci_len = self.s.in_channels;
        let stride = row_stride(h * span);
        band.resize(part.kw.len() * ci_len * stride, 0.0);
        for (r, row) in band.chunks_exact_mut(stride).enumerate() {
            let (kw, ci) = (part.kw.start + r / ci_len, r % ci_len);
            let start = part.ox.start + kw - self.s.padding[1];
            for (iy, line) in row[..h * span].chunks_exact_mut(span).enumerate() {
                for (item, dst) in line.chunks_exact_mut(part.ox.len()).enumerate() {
                    let plane = (item * ci_len + ci) * h * w;
                    copy_tiny(dst, &x[plane + iy * w + start..][..part.ox.len()]);
                }
            }
        }
        stride
    }

    /// `staged` (from [`Self::multiply`]) into each item's output, `[items, out_channels, oh,
    /// ow]`.
    fn scatter(&self, staged: &[f32], items: usize, out: &mut [f32]) {
        self.each_run(items, |staged_at, out_at, len| {
            copy_tiny(
                &mut out[out_at..out_at + len],
                &staged[staged_at..staged_at + len],
            );
        });
    }

    /// The inverse of [`Self::scatter`]: the output gradient of `items` items into `staged`.
    fn gather(&self, output_grad: &[f32], items: usize, staged: &mut Vec<f32>) {
        staged.resize(self.s.out_channels * items * self.s.output_pixels(), 0.0);
        self.each_run(items, |staged_at, out_at, len| {
            copy_tiny(
                &mut staged[staged_at..staged_at + len],
                &output_grad[out_at..out_at + len],
            );
        });
    }

    /// Calls `f(staged, output, len)` for each run of `len` values at `staged` in the staging
    /// layout and at `output` in `[items, out_channels, oh, ow]`.
    fn each_run(&self, items: usize, mut f: impl FnMut(usize, usize, usize)) {
        let s = self.s;
        let [oh, ow] = s.output;
        let width = items * s.output_pixels();
        let mut column = 0;
        for part in &self.parts {
            let len = part.ox.len();
            for co in 0..s.out_channels {
                for oy in 0..oh {
                    for item in 0..items {
                        let staged = co * width + column + (oy * items + item) * len;
                        let out = ((item * s.out_channels + co) * oh + oy) * ow + part.ox.start;
                        f(staged, out, len);
                    }
                }
            }
            column += oh * items * len;
        }
    }
}

/// `dst = src` for the few values of a part's row (1 or 2 on a 4x4 map): a value at a time up
/// to 2 (as a loop, the compiler called `memmove` for each, 11% of the 64x512x4x4 input
/// gradient), [`copy_short`] above.
#[inline(always)]
fn copy_tiny(dst: &mut [f32], src: &[f32]) {
    match (dst, src) {
        ([d], [s]) => *d = *s,
        ([d0, d1], [s0, s1]) => {
            *d0 = *s0;
            *d1 = *s1;
        }
        (dst, src) => copy_short(dst, src),
    }
}

/// [`super::weight_grad`] on the valid taps only
/// ([`ConvShape::weight_grad_runs_on_valid_taps`]).
pub(super) fn weight_grad(x: &[f32], output_grad: &[f32], s: ConvShape) -> Vec<f32> {
    ValidTaps::new(s)
        .expect("weight_grad_runs_on_valid_taps")
        .weight_grad(x, output_grad)
}
