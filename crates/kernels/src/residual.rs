//! A residual block's join, `relu(a + b)`, and its backward, on both threads: flex's elementwise
//! ops run on one thread below 4M values (its parallel threshold), so at CIFAR's maps (1M values
//! at 64x16x32x32) the add, the ReLU and the ReLU's backward ran while the other thread waited,
//! 8% of CIFAR ResNet-20's step. The same operations per value as flex's (`a + b`, then
//! [`relu`]; [`relu_grad`] backward), so the same results.
//!
//! PyramidNet's join adds a shortcut with fewer channels, zero-padded to the branch's
//! ([`add_leading`]), and its backward takes the gradient's leading channels ([`leading`]):
//! without them the shortcut is padded with a fresh tensor of zeros, concatenated into
//! another and added into a third, on one thread (12% of the PyramidNet-110 step's time on an
//! AMD Zen 3, the main thread's copies and fills while both workers waited).

use rayon::prelude::*;

use crate::batch_norm::{relu, relu_grad};

/// Values per parallel task (64 KiB).
const CHUNK: usize = 1 << 14;

/// The join of one value of each operand: `relu(a + b)`.
#[inline(always)]
pub fn add_relu(a: f32, b: f32) -> f32 {
    relu(a + b)
}

/// The gradient through a ReLU whose output was `output`: `grad` where `output` is positive
/// (or NaN), zero elsewhere (the gradient first, as [`zip_in_place`] writes over it).
#[inline(always)]
pub fn relu_backward(grad: f32, output: f32) -> f32 {
    relu_grad(output, grad)
}

/// `dst[i] = op(dst[i], other[i])` for every `i`, on every thread.
pub fn zip_in_place(dst: &mut [f32], other: &[f32], op: impl Fn(f32, f32) -> f32 + Sync) {
    assert_eq!(dst.len(), other.len(), "zip: operand lengths");
    dst.par_chunks_mut(CHUNK)
        .zip(other.par_chunks(CHUNK))
        .for_each(|(dst, other)| {
            for (x, &y) in dst.iter_mut().zip(other) {
                *x = op(*x, y);
            }
        });
}

/// `op(a[i], b[i])` for every `i`, into a new buffer, on every thread.
pub fn zip(a: &[f32], b: &[f32], op: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "zip: operand lengths");
    let mut out = Vec::new();
    a.par_iter()
        .zip(b)
        .with_min_len(CHUNK)
        .map(|(&x, &y)| op(x, y))
        .collect_into_vec(&mut out);
    out
}

/// Adds each item's `shortcut` values (`shortcut.len() / items` of them) to the first values
/// of its `dst` values (`dst.len() / items`), on every thread: a shortcut of fewer channels,
/// zero-padded, added to a branch's `[items, channels, pixels]` output (the padding adds
/// nothing, so those values are left as they are).
pub fn add_leading(dst: &mut [f32], shortcut: &[f32], items: usize) {
    let (per_item, leading) = per_item(dst.len(), shortcut.len(), items);
    dst.par_chunks_mut(per_item.max(1))
        .zip(shortcut.par_chunks(leading.max(1)))
        .for_each(|(dst, shortcut)| zip_in_place(&mut dst[..leading], shortcut, |a, b| a + b));
}

/// The first `leading` of each item's values of `src` (`[items, ...]`), on every thread: the
/// gradient of [`add_leading`]'s shortcut.
pub fn leading(src: &[f32], items: usize, leading: usize) -> Vec<f32> {
    let (per_item, leading) = per_item(src.len(), leading * items, items);
    let mut out = Vec::with_capacity(items * leading);
    out.spare_capacity_mut()[..items * leading]
        .par_chunks_mut(leading.max(1))
        .zip(src.par_chunks(per_item.max(1)))
        .for_each(|(out, src)| {
            for (o, &v) in out.iter_mut().zip(&src[..leading]) {
                o.write(v);
            }
        });
    // SAFETY: every item's `leading` values were written above.
    unsafe { out.set_len(items * leading) };
    out
}

/// Each item's values in a buffer of `total` and in one of `leading_total`, checked to divide
/// into `items` with the leading part no longer than the item.
fn per_item(total: usize, leading_total: usize, items: usize) -> (usize, usize) {
    let items = items.max(1);
    assert!(
        total.is_multiple_of(items)
            && leading_total.is_multiple_of(items)
            && leading_total <= total,
        "residual: {leading_total} leading values of {total} do not split into {items} items"
    );
    (total / items, leading_total / items)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In place and not, forward and backward, against the per-value definition, across
    /// several chunks and a partial one, with NaN, signed zeros and infinities.
    #[test]
    fn matches_the_definition() {
        let n = 3 * CHUNK + 5;
        let special = [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-40];
        let value = |i: usize, seed: usize| {
            let k = (i * 7919 + seed * 104729) % 1000;
            if k < special.len() {
                special[k]
            } else {
                k as f32 / 500.0 - 1.0
            }
        };
        let a: Vec<f32> = (0..n).map(|i| value(i, 1)).collect();
        let b: Vec<f32> = (0..n).map(|i| value(i, 2)).collect();
        let g: Vec<f32> = (0..n).map(|i| value(i, 3)).collect();
        let want: Vec<f32> = a.iter().zip(&b).map(|(&x, &y)| relu(x + y)).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&zip(&a, &b, add_relu)), bits(&want));
        let mut in_place = a.clone();
        zip_in_place(&mut in_place, &b, add_relu);
        assert_eq!(bits(&in_place), bits(&want));
        let want_grad: Vec<f32> = want
            .iter()
            .zip(&g)
            .map(|(&o, &d)| relu_grad(o, d))
            .collect();
        assert_eq!(bits(&zip(&g, &want, relu_backward)), bits(&want_grad));
        let mut grad = g.clone();
        zip_in_place(&mut grad, &want, relu_backward);
        assert_eq!(bits(&grad), bits(&want_grad));
        assert!(want.iter().any(|v| v.is_nan()) && want_grad.contains(&0.0));
    }

    /// The padded join and its gradient against the definition, one item per task and items
    /// of several chunks each.
    #[test]
    fn padded_join_matches_the_definition() {
        for (items, channels, leading_channels, pixels) in [(3, 5, 2, 7), (2, 4, 3, CHUNK + 3)] {
            let value = |i: usize, seed: usize| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0;
            let per_item = channels * pixels;
            let lead = leading_channels * pixels;
            let branch: Vec<f32> = (0..items * per_item).map(|i| value(i, 1)).collect();
            let shortcut: Vec<f32> = (0..items * lead).map(|i| value(i, 2)).collect();
            let mut joined = branch.clone();
            add_leading(&mut joined, &shortcut, items);
            for (i, &got) in joined.iter().enumerate() {
                let (n, at) = (i / per_item, i % per_item);
                let want = if at < lead {
                    branch[i] + shortcut[n * lead + at]
                } else {
                    branch[i]
                };
                assert_eq!(got.to_bits(), want.to_bits(), "item {n}, value {at}");
            }
            let grad = leading(&branch, items, lead);
            let want: Vec<f32> = (0..items)
                .flat_map(|n| branch[n * per_item..][..lead].to_vec())
                .collect();
            assert_eq!(grad, want);
        }
    }
}
