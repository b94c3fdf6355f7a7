//! Stride-1 convolutions unfolded along the kernel's width only.
//!
//! With stride 1 and no dilation, kernel row `kh` of a tap reads the same input row as kernel
//! row 0 does for the output row `kh` below. So `cols` need only hold, for each
//! `(ci, kw)`, the band of padded input rows the output rows read (`band = rows + kh - 1` rows
//! of `ow` values, the input shifted by `kw`), and kernel row `kh`'s part of the product reads
//! that buffer from `kh * ow` values on: a product of `kh` GEMMs over shifted windows of one
//! buffer, each of inner dimension `in_channels * kw`, with a third of im2col's copies for a
//! 3x3 kernel. (Three such GEMMs ran as fast as the one of thrice the inner dimension, or
//! faster: 32 channels at 16x16 1.32 -> 1.18 ms a thread on an Intel Xeon.)
//!
//! The weight is read per kernel row ([`by_kernel_row`]).

use std::mem::MaybeUninit;
use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{ConvShape, copy_short, matmul, valid_outputs};

/// `[kh, out_channels, in_channels * kw]`: the weight (`[out_channels, in_channels, kh, kw]`)
/// one kernel row at a time, an output channel's row per task on every thread.
pub(super) fn by_kernel_row(weight: &[f32], s: ConvShape) -> Vec<f32> {
    let [kh_len, kw_len] = s.kernel;
    let mut rows = vec![0f32; weight.len()];
    let per_row = s.in_channels * kw_len;
    rows.par_chunks_mut(per_row.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let (kh, co) = (i / s.out_channels, i % s.out_channels);
            for (ci, taps) in row.chunks_exact_mut(kw_len).enumerate() {
                let start = ((co * s.in_channels + ci) * kh_len + kh) * kw_len;
                taps.copy_from_slice(&weight[start..start + kw_len]);
            }
        });
    rows
}

/// Rows of the width-unfolded buffer: one per `(ci, kw)`.
pub(super) fn unfolded_rows(s: ConvShape) -> usize {
    s.in_channels * s.kernel[1]
}

/// Writes into `cols` (`[in_channels * kw, band * ow]` row-major) the width-unfolded band of
/// input rows that output rows `output_rows` read: row `(ci, kw)`, band row `r`, column `ox`
/// is input `(ci, output_rows.start + r - ph, ox + kw - pw)`, zero outside the image.
fn unfold_band(image: &[f32], s: ConvShape, cols: &mut Vec<f32>, output_rows: Range<usize>) {
    let [h, w] = s.input;
    let [_, ow] = s.output;
    let [kh_len, kw_len] = s.kernel;
    let [ph, pw] = s.padding;
    let band = output_rows.len() + kh_len - 1;
    cols.resize(unfolded_rows(s) * band * ow, 0.0);
    for (row, out) in cols.chunks_exact_mut(band * ow).enumerate() {
        let (ci, kw) = (row / kw_len, row % kw_len);
        let (low, high) = valid_outputs(kw, pw, 1, w, ow);
        for (r, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let input_row = (output_rows.start + r).checked_sub(ph).filter(|&ih| ih < h);
            let Some(ih) = input_row.filter(|_| low < high) else {
                out_row.fill(0.0);
                continue;
            };
            // Output column `ox` reads input column `ox + kw - pw`: the whole row is one copy
            // of `ow` values (spilling into the neighbouring rows, or channels, where it
            // reaches past the row's ends), those outside the row then zeroed. On small maps
            // a copy of only the valid values and fills of one value each were calls to
            // `memcpy` and `memset` (a quarter of 64 channels at 8x8).
            let first = ((ci * h + ih) * w + kw).checked_sub(pw);
            match first.filter(|&first| first + ow <= image.len()) {
                Some(first) => {
                    copy_short(out_row, &image[first..first + ow]);
                    zero_short(&mut out_row[..low]);
                    zero_short(&mut out_row[high..]);
                }
                None => {
                    // The first channel's first row or the last one's last: copied as it is.
                    out_row[..low].fill(0.0);
                    out_row[high..].fill(0.0);
                    let first = (ci * h + ih) * w + low + kw - pw;
                    out_row[low..high].copy_from_slice(&image[first..first + high - low]);
                }
            }
        }
    }
}

/// `values.fill(0.0)` for the few values at a row's ends, as stores: a `fill` of zeros is a
/// call to `memset`, whatever its length.
#[inline(always)]
fn zero_short(values: &mut [f32]) {
    // An opaque zero, so the loop is not turned back into `memset`.
    let zero = std::hint::black_box(0.0);
    for v in values {
        *v = zero;
    }
}

/// The forward pass of one image's output rows `tile` into `out` (the image's
/// `[out_channels, oh * ow]` output, the tile's columns written, not read, by kernel row 0's
/// GEMM), with `weight_rows` from [`by_kernel_row`].
pub(super) fn forward_tile(
    image: &[f32],
    weight_rows: &[f32],
    s: ConvShape,
    cols: &mut Vec<f32>,
    out: &mut [MaybeUninit<f32>],
    tile: Range<usize>,
    parallelism: Parallelism,
) {
    let ow = s.output[1];
    let (rows, pixels) = (unfolded_rows(s), s.output_pixels());
    let band_len = (tile.len() + s.kernel[0] - 1) * ow;
    let width = tile.len() * ow;
    unfold_band(image, s, cols, tile.clone());
    for kh in 0..s.kernel[0] {
        // SAFETY: out is [out_channels, pixels] row-major and this tile writes its columns
        // tile.start * ow .. + width; the weight's kernel row kh is [out_channels, rows]
        // row-major; cols is [rows, band_len] row-major and the window from kh * ow holds
        // width <= band_len - kh * ow columns; out is a buffer of its own, written by kernel
        // row 0 before the others add to it.
        unsafe {
            matmul(
                [s.out_channels, width, rows],
                (
                    out.as_mut_ptr().cast::<f32>().add(tile.start * ow),
                    [pixels, 1],
                ),
                kh > 0,
                (
                    weight_rows.as_ptr().add(kh * s.out_channels * rows),
                    [rows, 1],
                ),
                (cols.as_ptr().add(kh * ow), [band_len, 1]),
                parallelism,
            );
        }
    }
}

/// One image's input gradient into `dx` (`[in_channels, h, w]`, zero on entry) from its output
/// gradient `dy` (`[out_channels, oh * ow]`), with `weight_rows` from [`by_kernel_row`]: the
/// width-unfolded gradient `dcols` (`[in_channels * kw, (oh + kh - 1) * ow]`) is the sum of
/// each kernel row's transposed product, written into its shifted window, then folded back
/// along the width.
pub(super) fn input_grad_image(
    weight_rows: &[f32],
    dy: &[f32],
    s: ConvShape,
    dcols: &mut Vec<f32>,
    dx: &mut [f32],
    parallelism: Parallelism,
) {
    let [oh, ow] = s.output;
    let rows = unfolded_rows(s);
    let pixels = oh * ow;
    let band_len = (oh + s.kernel[0] - 1) * ow;
    dcols.resize(rows * band_len, 0.0);
    // Kernel row 0 writes each row's first `pixels` columns; the rest start from zero.
    for row in dcols.chunks_exact_mut(band_len) {
        row[pixels..].fill(0.0);
    }
    for kh in 0..s.kernel[0] {
        // SAFETY: dcols is [rows, band_len] row-major and the window from kh * ow holds
        // pixels <= band_len - kh * ow columns; kernel row kh of the weight, [out_channels,
        // rows] row-major, is read as its transpose; dy is [out_channels, pixels] row-major;
        // dcols is a buffer of its own.
        unsafe {
            matmul(
                [rows, pixels, s.out_channels],
                (dcols.as_mut_ptr().add(kh * ow), [band_len, 1]),
                kh > 0,
                (
                    weight_rows.as_ptr().add(kh * s.out_channels * rows),
                    [1, rows],
                ),
                (dy.as_ptr(), [pixels, 1]),
                parallelism,
            );
        }
    }
    fold_band(dcols, s, dx);
}

/// The transpose of [`unfold_band`] for a whole image: adds each `(ci, kw)` row's band row
/// `ih + ph` into input row `ih`, shifted back by `kw - pw`.
fn fold_band(dcols: &[f32], s: ConvShape, dx: &mut [f32]) {
    let [h, w] = s.input;
    let [oh, ow] = s.output;
    let [kh_len, kw_len] = s.kernel;
    let [ph, pw] = s.padding;
    let band = oh + kh_len - 1;
    for (row, grads) in dcols.chunks_exact(band * ow).enumerate() {
        let (ci, kw) = (row / kw_len, row % kw_len);
        let (low, high) = valid_outputs(kw, pw, 1, w, ow);
        if low >= high {
            continue;
        }
        let channel = &mut dx[ci * h * w..(ci + 1) * h * w];
        for (ih, dx_row) in channel.chunks_exact_mut(w).enumerate() {
            let r = ih + ph;
            if r >= band {
                break;
            }
            let first = low + kw - pw;
            let src = &grads[r * ow + low..r * ow + high];
            for (x, &g) in dx_row[first..first + src.len()].iter_mut().zip(src) {
                *x += g;
            }
        }
    }
}
