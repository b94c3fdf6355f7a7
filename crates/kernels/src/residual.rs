//! A residual block's join, `relu(a + b)`, and its backward, on both threads: flex's elementwise
//! ops run on one thread below 4M values (its parallel threshold), so at CIFAR's maps (1M values
//! at 64x16x32x32) the add, the ReLU and the ReLU's backward ran while the other thread waited,
//! 8% of CIFAR ResNet-20's step. The same operations per value as flex's (`a + b`, then
//! [`relu`]; [`relu_grad`] backward), so the same results.

use rayon::prelude::*;

use crate::batch_norm::{relu, relu_grad};

/// Values per parallel task (64 KiB).
const CHUNK: usize = 1 << 14;

/// `a[i] = relu(a[i] + b[i])`.
pub fn add_relu_in_place(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add_relu: operand lengths");
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = relu(*x + y);
            }
        });
}

/// `relu(a[i] + b[i])` for every `i`.
pub fn add_relu(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "add_relu: operand lengths");
    let mut out = Vec::new();
    a.par_iter()
        .zip(b)
        .with_min_len(CHUNK)
        .map(|(&x, &y)| relu(x + y))
        .collect_into_vec(&mut out);
    out
}

/// The gradient through a ReLU whose output was `output`: `grad[i]` where `output[i]` is
/// positive (or NaN), zero elsewhere, written over `grad`.
pub fn relu_backward_in_place(output: &[f32], grad: &mut [f32]) {
    assert_eq!(output.len(), grad.len(), "relu_backward: lengths");
    grad.par_chunks_mut(CHUNK)
        .zip(output.par_chunks(CHUNK))
        .for_each(|(grad, output)| {
            for (g, &out) in grad.iter_mut().zip(output) {
                *g = relu_grad(out, *g);
            }
        });
}

/// [`relu_backward_in_place`] into a new buffer.
pub fn relu_backward(output: &[f32], grad: &[f32]) -> Vec<f32> {
    assert_eq!(output.len(), grad.len(), "relu_backward: lengths");
    let mut out = Vec::new();
    output
        .par_iter()
        .zip(grad)
        .with_min_len(CHUNK)
        .map(|(&out, &g)| relu_grad(out, g))
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
        assert_eq!(bits(&add_relu(&a, &b)), bits(&want));
        let mut in_place = a.clone();
        add_relu_in_place(&mut in_place, &b);
        assert_eq!(bits(&in_place), bits(&want));
        let want_grad: Vec<f32> = want
            .iter()
            .zip(&g)
            .map(|(&o, &d)| relu_grad(o, d))
            .collect();
        assert_eq!(bits(&relu_backward(&want, &g)), bits(&want_grad));
        let mut grad = g.clone();
        relu_backward_in_place(&want, &mut grad);
        assert_eq!(bits(&grad), bits(&want_grad));
        assert!(want.iter().any(|v| v.is_nan()) && want_grad.contains(&0.0));
    }
}
