//! A residual block's join, `relu(a + b)`, and its backward, on both threads: flex's elementwise
//! ops run on one thread below 4M values (its parallel threshold), so at CIFAR's maps (1M values
//! at 64x16x32x32) the add, the ReLU and the ReLU's backward ran while the other thread waited,
//! 8% of CIFAR ResNet-20's step. The same operations per value as flex's (`a + b`, then
//! [`relu`]; [`relu_grad`] backward), so the same results.

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
}
