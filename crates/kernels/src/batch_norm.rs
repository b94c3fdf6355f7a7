//! BatchNorm training forward and backward on contiguous `[batch, channels, spatial]` f32
//! slices, channels in parallel: the forward pass reads its input once per statistic and once
//! more to write; the backward pass reads the output gradient and the input once for both of its
//! sums and once more to write (through the ReLU's mask, where there is one, on the fly both
//! times, not from a masked copy); outputs are written without zero-filling them first.
//!
//! Burn's default (`ModuleOps::batch_norm_train` and its backward) builds the statistics from
//! swapped-and-reshaped copies and separate reductions; here each channel's plane is read in
//! place. The arithmetic matches PyTorch's CPU kernel: the mean first, then the biased variance
//! as the mean of squared deviations (two passes, no cancellation), sums of f32 lanes gathered
//! in f64 per plane.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use rayon::prelude::*;

/// The shape of a BatchNorm input seen as `[batch, channels, spatial]` (spatial = the product
/// of the dimensions after the channel dimension; 1 for a `[batch, channels]` input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planes {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
}

impl Planes {
    /// From a tensor shape `[batch, channels, ...]` (rank 2 or more).
    pub fn from_dims(dims: &[usize]) -> Self {
        assert!(
            dims.len() >= 2,
            "BatchNorm input must have rank 2 or more, got {dims:?}"
        );
        Self {
            batch: dims[0],
            channels: dims[1],
            spatial: dims[2..].iter().product(),
        }
    }

    fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    /// Values per channel.
    fn count(&self) -> usize {
        self.batch * self.spatial
    }

    /// Where the plane of batch item `n`, channel `c` lies.
    fn plane(&self, n: usize, c: usize) -> std::ops::Range<usize> {
        let start = (n * self.channels + c) * self.spatial;
        start..start + self.spatial
    }

    /// The planes of channel `c`, one per batch item.
    fn planes<'a>(&self, values: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> {
        (0..self.batch).map(move |n| &values[self.plane(n, c)])
    }
}

/// The f32 partial sums a plane's sums run in: enough independent additions in flight to keep
/// up with the loads from cache (eight lanes, one chain of dependent adds per register, ran the
/// passes at a quarter of the cache's speed).
const LANES: usize = 32;

/// Sum of `f(x)` over a slice in [`LANES`] f32 lanes (so it vectorises), returned as f64.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    let mut tail = 0f32;
    for &v in rest {
        tail += f(v);
    }
    total(lanes) + tail as f64
}

/// The lanes' sum in f64.
#[inline(always)]
fn total(lanes: [f32; LANES]) -> f64 {
    let mut sum = 0.0;
    for lane in lanes {
        sum += lane as f64;
    }
    sum
}

/// `(sum of dy, sum of dy · (x - m))` over one plane, in [`LANES`] f32 lanes each, returned
/// as f64.
#[inline(always)]
fn gradient_sums(dy: &[f32], x: &[f32], m: f32) -> (f64, f64) {
    let (mut sum, mut centred) = ([0f32; LANES], [0f32; LANES]);
    let whole = dy.len() / LANES * LANES;
    for (dy, x) in dy[..whole]
        .chunks_exact(LANES)
        .zip(x[..whole].chunks_exact(LANES))
    {
        for lane in 0..LANES {
            sum[lane] += dy[lane];
            centred[lane] += dy[lane] * (x[lane] - m);
        }
    }
    for k in whole..dy.len() {
        sum[0] += dy[k];
        centred[0] += dy[k] * (x[k] - m);
    }
    (total(sum), total(centred))
}

/// A channel's plane of the input gradient in [`backward`]: the masked output gradient already
/// written into it (with a ReLU), or not yet written.
enum Plane<'a> {
    Written(&'a mut [f32]),
    Unwritten(&'a mut [MaybeUninit<f32>]),
}

/// Per-channel work that [`per_channel`] runs in parallel over the channels.
trait ChannelPass: Sync {
    type Out: Send;

    /// The work on channel `c` (`#[inline(always)]`, so [`wide`] compiles it for AVX2).
    fn channel(&self, c: usize) -> Self::Out;
}

/// `pass.channel(c)` for every channel, in parallel, compiled for AVX2 where the CPU has it
/// (this crate targets baseline x86-64, whose loops are SSE, four lanes): the same operations in
/// the same order, so the same results, at twice the width.
fn per_channel<P: ChannelPass>(pass: &P, channels: usize) -> Vec<P::Out> {
    let avx2 = has_avx2();
    (0..channels)
        .into_par_iter()
        .map(|c| {
            if avx2 {
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe { wide(pass, c) }
            } else {
                pass.channel(c)
            }
        })
        .collect()
}

/// Whether [`wide`] runs here.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`ChannelPass::channel`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 ([`has_avx2`]).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2"))]
unsafe fn wide<P: ChannelPass>(pass: &P, c: usize) -> P::Out {
    pass.channel(c)
}

/// [`forward`]'s work on one channel: its statistics, then its output planes.
struct ForwardPass<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    epsilon: f64,
    shape: Planes,
    relu: bool,
    count: f64,
    planes: PlaneWriter<'a>,
}

impl ChannelPass for ForwardPass<'_> {
    type Out = (f32, f32);

    #[inline(always)]
    fn channel(&self, c: usize) -> (f32, f32) {
        let ForwardPass {
            x,
            gamma,
            beta,
            epsilon,
            shape,
            relu,
            count,
            ref planes,
        } = *self;
        // Plain loops rather than iterator chains here and below: a chain's `fold` is a
        // function of its own that need not be inlined, and would not be compiled for AVX2.
        let mut sum = 0.0;
        for p in shape.planes(x, c) {
            sum += lane_sum(p, |v| v);
        }
        let mean = (sum / count) as f32;
        let mut squares = 0.0;
        for p in shape.planes(x, c) {
            squares += lane_sum(p, |v| (v - mean) * (v - mean));
        }
        let variance = (squares / count) as f32;
        // y = (x - mean) * scale + beta. Not `x * scale + shift`: when the mean is large
        // against the spread, `x * scale` and `mean * scale` nearly cancel in f32.
        let scale = (gamma[c] as f64 / (variance as f64 + epsilon).sqrt()) as f32;
        let (m, a, b) = (mean, scale, beta[c]);
        for n in 0..shape.batch {
            let x = &x[shape.plane(n, c)];
            // SAFETY: each task writes only its own channel's planes.
            let out = unsafe { planes.plane(n, c) };
            if relu {
                for (o, &v) in out.iter_mut().zip(x) {
                    o.write(self::relu((v - m) * a + b));
                }
            } else {
                for (o, &v) in out.iter_mut().zip(x) {
                    o.write((v - m) * a + b);
                }
            }
        }
        (mean, variance)
    }
}

/// The outputs of [`forward`].
pub struct Forward {
    pub output: Vec<f32>,
    /// Per channel.
    pub mean: Vec<f32>,
    /// Per channel, biased (divided by the count, as Burn's `batch_norm_train` returns it).
    pub variance: Vec<f32>,
}

/// ReLU as flex computes it: NaN passes through (as in PyTorch), everything else `max(x, 0)`.
#[inline(always)]
pub(crate) fn relu(v: f32) -> f32 {
    if v.is_nan() || v > 0.0 { v } else { 0.0 }
}

/// The gradient through a ReLU whose output was `out`, as flex's `relu_backward`.
#[inline(always)]
pub(crate) fn relu_grad(out: f32, dy: f32) -> f32 {
    if out.is_nan() || out > 0.0 { dy } else { 0.0 }
}

/// Normalises `x` with its own batch statistics: `(x - mean) / sqrt(var + eps) * gamma + beta`,
/// followed by a ReLU in the same pass when `relu` is set.
pub fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    shape: Planes,
    relu: bool,
) -> Forward {
    assert_eq!(x.len(), shape.len(), "BatchNorm input length");
    assert_eq!(gamma.len(), shape.channels, "BatchNorm gamma length");
    assert_eq!(beta.len(), shape.channels, "BatchNorm beta length");
    let count = shape.count().max(1) as f64;

    // One task per channel: its statistics, then its output planes, while the channel's
    // planes are still in cache (a channel of 64 CIFAR planes is 256 KiB).
    let mut output = Vec::with_capacity(x.len());
    let planes = PlaneWriter::new(&mut output.spare_capacity_mut()[..x.len()], shape);
    let pass = ForwardPass {
        x,
        gamma,
        beta,
        epsilon,
        shape,
        relu,
        count,
        planes,
    };
    let stats = per_channel(&pass, shape.channels);
    // SAFETY: the channels' planes cover all `x.len()` values and each was written above.
    unsafe { output.set_len(x.len()) };
    let (mean, variance): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
    Forward {
        output,
        mean,
        variance,
    }
}

/// The outputs of [`backward`].
pub struct Backward {
    pub x_grad: Vec<f32>,
    pub gamma_grad: Vec<f32>,
    pub beta_grad: Vec<f32>,
}

/// What [`backward`] needs of the forward pass.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub x: &'a [f32],
    pub gamma: &'a [f32],
    /// The statistics [`forward`] returned.
    pub mean: &'a [f32],
    pub variance: &'a [f32],
    pub epsilon: f64,
    /// The output of a forward with `relu` set (the gradient is zero where it is), else `None`.
    pub relu_output: Option<&'a [f32]>,
}

/// Gradients of [`forward`] given the gradient of its output and what it saved.
///
/// With `xhat = (x - mean) * inv_std`, `M` values per channel and `dy` the output gradient
/// (through the ReLU first when there is one):
/// `beta_grad = sum(dy)`, `gamma_grad = sum(dy * xhat)`,
/// `x_grad = gamma * inv_std * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)`,
/// written as `x_grad = k1 * dy + k2 * (x - mean) + k3` per channel (with `x - mean`, not `x`:
/// `k2 * x` and `k2 * mean` would nearly cancel in f32 when the mean dwarfs the spread).
pub fn backward(saved: Saved<'_>, output_grad: &[f32], shape: Planes) -> Backward {
    let Saved { x, relu_output, .. } = saved;
    assert_eq!(x.len(), shape.len(), "BatchNorm input length");
    assert_eq!(
        output_grad.len(),
        shape.len(),
        "BatchNorm output gradient length"
    );
    if let Some(out) = relu_output {
        assert_eq!(out.len(), shape.len(), "BatchNorm output length");
    }
    let count = shape.count().max(1) as f64;

    // One task per channel, over its planes while they are still in cache: the output gradient
    // through the ReLU (where there is one) into the input gradient's planes, both sums in one
    // pass over that and the input, then the input gradient (in place over the masked one).
    let mut x_grad = Vec::with_capacity(x.len());
    let planes = PlaneWriter::new(&mut x_grad.spare_capacity_mut()[..x.len()], shape);
    let pass = BackwardPass {
        saved,
        output_grad,
        shape,
        count,
        planes,
    };
    let grads = per_channel(&pass, shape.channels);
    // SAFETY: the channels' planes cover all `x.len()` values and each was written above.
    unsafe { x_grad.set_len(x.len()) };
    let (gamma_grad, beta_grad): (Vec<f32>, Vec<f32>) = grads.into_iter().unzip();
    Backward {
        x_grad,
        gamma_grad,
        beta_grad,
    }
}

/// [`backward`]'s work on one channel: the masked output gradient, both sums, then the input
/// gradient's planes.
struct BackwardPass<'a> {
    saved: Saved<'a>,
    output_grad: &'a [f32],
    shape: Planes,
    count: f64,
    planes: PlaneWriter<'a>,
}

impl ChannelPass for BackwardPass<'_> {
    type Out = (f32, f32);

    #[inline(always)]
    fn channel(&self, c: usize) -> (f32, f32) {
        let BackwardPass {
            saved,
            output_grad,
            shape,
            count,
            ref planes,
        } = *self;
        let Saved {
            x,
            gamma,
            mean,
            variance,
            epsilon,
            relu_output,
        } = saved;
        let m = mean[c];
        // Plain loops, as in the forward pass.
        let mut dx: Vec<Plane> = Vec::with_capacity(shape.batch);
        for n in 0..shape.batch {
            // SAFETY: each task takes only its own channel's planes, each once.
            let plane = unsafe { planes.plane(n, c) };
            let Some(out) = relu_output else {
                dx.push(Plane::Unwritten(plane));
                continue;
            };
            let range = shape.plane(n, c);
            let (out, g) = (&out[range.clone()], &output_grad[range]);
            for ((d, &o), &g) in plane.iter_mut().zip(out).zip(g) {
                d.write(relu_grad(o, g));
            }
            // SAFETY: every value of the plane was written just above.
            dx.push(Plane::Written(unsafe {
                &mut *(plane as *mut [MaybeUninit<f32>] as *mut [f32])
            }));
        }
        let (mut sum_dy, mut sum_dy_centred) = (0.0, 0.0);
        for (n, plane) in dx.iter().enumerate() {
            let range = shape.plane(n, c);
            let dy: &[f32] = match plane {
                Plane::Written(dy) => dy,
                Plane::Unwritten(_) => &output_grad[range.clone()],
            };
            let (sum, centred) = gradient_sums(dy, &x[range], m);
            sum_dy += sum;
            sum_dy_centred += centred;
        }
        let inv_std = 1.0 / (variance[c] as f64 + epsilon).sqrt();
        let k1 = gamma[c] as f64 * inv_std;
        let k2 = -k1 * inv_std * inv_std * sum_dy_centred / count;
        let k3 = -k1 * sum_dy / count;
        let (k1, k2, k3) = (k1 as f32, k2 as f32, k3 as f32);
        let value = |dy: f32, x: f32| k1 * dy + k2 * (x - m) + k3;
        for (n, plane) in dx.iter_mut().enumerate() {
            let range = shape.plane(n, c);
            let x = &x[range.clone()];
            match plane {
                Plane::Written(dx) => {
                    for (d, &x) in dx.iter_mut().zip(x) {
                        *d = value(*d, x);
                    }
                }
                Plane::Unwritten(dx) => {
                    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(&output_grad[range]) {
                        d.write(value(g, x));
                    }
                }
            }
        }
        ((sum_dy_centred * inv_std) as f32, sum_dy as f32)
    }
}

/// The per-channel statistics and affine parameters of a BatchNorm in evaluation.
#[derive(Clone, Copy)]
pub struct Running<'a> {
    pub mean: &'a [f32],
    pub variance: &'a [f32],
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub epsilon: f64,
}

/// BatchNorm with fixed statistics: `out = (x - mean) * gamma / sqrt(var + eps) + beta` per
/// channel, then a ReLU when `relu` is set, in one pass (Burn's default makes four broadcast
/// passes, each with a fresh output). `x: None` reads `out` itself: in place.
pub fn inference(
    x: Option<&[f32]>,
    out: &mut [f32],
    running: Running<'_>,
    shape: Planes,
    relu: bool,
) {
    assert_eq!(out.len(), shape.len(), "BatchNorm output length");
    assert!(
        x.is_none_or(|x| x.len() == out.len()),
        "BatchNorm input length"
    );
    for (what, len) in [
        ("mean", running.mean.len()),
        ("variance", running.variance.len()),
        ("gamma", running.gamma.len()),
        ("beta", running.beta.len()),
    ] {
        assert_eq!(len, shape.channels, "BatchNorm {what} length");
    }
    let scale: Vec<f32> = (0..shape.channels)
        .map(|c| {
            (running.gamma[c] as f64 / (running.variance[c] as f64 + running.epsilon).sqrt()) as f32
        })
        .collect();
    let affine = |c: usize, dst: &mut [f32], src: Option<&[f32]>| {
        let (m, a, b) = (running.mean[c], scale[c], running.beta[c]);
        let y = move |v: f32| {
            let y = (v - m) * a + b;
            if relu { self::relu(y) } else { y }
        };
        match src {
            Some(src) => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = y(v)),
            None => dst.iter_mut().for_each(|d| *d = y(*d)),
        }
    };
    match x {
        Some(x) => for_each_plane(out, x, None, shape, |c, dst, src, _| {
            affine(c, dst, Some(src))
        }),
        None => for_each_plane_mut(out, shape, |plane, dst| {
            affine(plane % shape.channels, dst, None)
        }),
    }
}

/// An output buffer whose `[batch, channel]` planes parallel tasks write, one channel each (a
/// channel's planes are strided through the buffer, so it cannot be split into slices).
struct PlaneWriter<'a> {
    start: *mut MaybeUninit<f32>,
    shape: Planes,
    buffer: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: tasks write disjoint planes (the callers of `plane` promise it).
unsafe impl Sync for PlaneWriter<'_> {}

impl<'a> PlaneWriter<'a> {
    fn new(buffer: &'a mut [MaybeUninit<f32>], shape: Planes) -> Self {
        assert_eq!(buffer.len(), shape.len(), "BatchNorm output length");
        PlaneWriter {
            start: buffer.as_mut_ptr(),
            shape,
            buffer: PhantomData,
        }
    }

    /// The plane of batch item `n`, channel `c`.
    ///
    /// # Safety
    /// No two live results may be the same plane.
    #[allow(clippy::mut_from_ref)]
    unsafe fn plane(&self, n: usize, c: usize) -> &mut [MaybeUninit<f32>] {
        assert!(
            n < self.shape.batch && c < self.shape.channels,
            "plane ({n}, {c})"
        );
        let range = self.shape.plane(n, c);
        // SAFETY: the range lies in the buffer (checked above); the caller keeps it unaliased.
        unsafe { std::slice::from_raw_parts_mut(self.start.add(range.start), range.len()) }
    }
}

/// Calls `f(channel, out_plane, x_plane, other_plane)` for every `[batch, channel]` plane, in
/// parallel over groups of planes large enough to be worth a task.
fn for_each_plane<T: Send>(
    out: &mut [T],
    x: &[f32],
    other: Option<&[f32]>,
    shape: Planes,
    f: impl Fn(usize, &mut [T], &[f32], Option<&[f32]>) + Sync,
) {
    let spatial = shape.spatial.max(1);
    for_each_plane_mut(out, shape, |plane, out| {
        let range = plane * spatial..(plane + 1) * spatial;
        let other = other.map(|o| &o[range.clone()]);
        f(plane % shape.channels, out, &x[range], other);
    });
}

/// Calls `f(plane_index, plane)` for every `[batch, channel]` plane of `out`, in parallel over
/// groups of planes of about 16 K values each.
fn for_each_plane_mut<T: Send>(out: &mut [T], shape: Planes, f: impl Fn(usize, &mut [T]) + Sync) {
    let spatial = shape.spatial.max(1);
    let planes_per_task = (16_384 / spatial).max(1);
    out.par_chunks_mut(planes_per_task * spatial)
        .enumerate()
        .for_each(|(task, block)| {
            for (i, plane) in block.chunks_mut(spatial).enumerate() {
                f(task * planes_per_task + i, plane);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [-1, 1) plus an offset.
    fn values(len: usize, seed: u64, offset: f32) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + offset
            })
            .collect()
    }

    /// The textbook formulas in f64, one value at a time.
    fn naive(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        dy: &[f32],
        eps: f64,
        s: Planes,
    ) -> [Vec<f64>; 6] {
        let idx = |n: usize, c: usize, i: usize| (n * s.channels + c) * s.spatial + i;
        let m = (s.batch * s.spatial) as f64;
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let (mut means, mut vars, mut dgamma, mut dbeta) = (vec![], vec![], vec![], vec![]);
        for c in 0..s.channels {
            let all: Vec<(usize, f64)> = (0..s.batch)
                .flat_map(|n| (0..s.spatial).map(move |i| idx(n, c, i)))
                .map(|j| (j, x[j] as f64))
                .collect();
            let mean = all.iter().map(|&(_, v)| v).sum::<f64>() / m;
            let var = all.iter().map(|&(_, v)| (v - mean).powi(2)).sum::<f64>() / m;
            let inv = 1.0 / (var + eps).sqrt();
            let g = gamma[c] as f64;
            let sdy: f64 = all.iter().map(|&(j, _)| dy[j] as f64).sum();
            let sdyx: f64 = all
                .iter()
                .map(|&(j, v)| dy[j] as f64 * (v - mean) * inv)
                .sum();
            for &(j, v) in &all {
                let xhat = (v - mean) * inv;
                y[j] = xhat * g + beta[c] as f64;
                dx[j] = g * inv * (dy[j] as f64 - sdy / m - xhat * sdyx / m);
            }
            means.push(mean);
            vars.push(var);
            dgamma.push(sdyx);
            dbeta.push(sdy);
        }
        [y, means, vars, dx, dgamma, dbeta]
    }

    fn saved<'a>(
        x: &'a [f32],
        gamma: &'a [f32],
        f: &'a Forward,
        epsilon: f64,
        relu_output: Option<&'a [f32]>,
    ) -> Saved<'a> {
        Saved {
            x,
            gamma,
            mean: &f.mean,
            variance: &f.variance,
            epsilon,
            relu_output,
        }
    }

    fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: got {g}, want {w}"
            );
        }
    }

    #[test]
    fn matches_the_formulas_on_odd_shapes() {
        for (dims, offset) in [
            (vec![1, 3, 5, 7], 0.0),
            (vec![4, 16, 8, 8], 3.0),
            (vec![3, 5], -2.0),
            (vec![2, 7, 13], 0.5),
            (vec![5, 2, 1, 1], 0.0),
        ] {
            let s = Planes::from_dims(&dims);
            let x = values(s.len(), 1, offset);
            let dy = values(s.len(), 2, 0.1);
            let gamma = values(s.channels, 3, 1.0);
            let beta = values(s.channels, 4, 0.0);
            let eps = 1e-5;
            let [y, mean, var, dx, dgamma, dbeta] = naive(&x, &gamma, &beta, &dy, eps, s);
            let f = forward(&x, &gamma, &beta, eps, s, false);
            close(&f.output, &y, 1e-4, "output");
            close(&f.mean, &mean, 1e-5, "mean");
            close(&f.variance, &var, 1e-5, "variance");
            let b = backward(saved(&x, &gamma, &f, eps, None), &dy, s);
            close(&b.x_grad, &dx, 1e-3, "x_grad");
            close(&b.gamma_grad, &dgamma, 1e-4, "gamma_grad");
            close(&b.beta_grad, &dbeta, 1e-4, "beta_grad");
        }
    }

    /// Values far from zero with a tiny spread (a channel whose mean is 300,000 of its standard
    /// deviations): the output and the input gradient stay as precise as the formulas in f64.
    /// Written as `x * scale + shift` and `k2 * x + k3` (the kernels before 2026-12), the
    /// output lost more than 0.1% here.
    #[test]
    fn keeps_its_precision_when_the_mean_dwarfs_the_spread() {
        let s = Planes::from_dims(&[8, 4, 6, 6]);
        let x: Vec<f32> = values(s.len(), 5, 0.0)
            .iter()
            .map(|v| 40.0 + 2e-4 * v)
            .collect();
        let dy = values(s.len(), 6, 0.1);
        let gamma = values(s.channels, 7, 1.0);
        let beta = values(s.channels, 8, 0.0);
        let eps = 1e-5;
        let [y, _, _, dx, _, _] = naive(&x, &gamma, &beta, &dy, eps, s);
        let f = forward(&x, &gamma, &beta, eps, s, false);
        let b = backward(saved(&x, &gamma, &f, eps, None), &dy, s);
        let worst = |got: &[f32], want: &[f64]| {
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let error = got
                .iter()
                .zip(want)
                .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
            error / scale
        };
        assert!(
            worst(&f.output, &y) < 1e-3,
            "output {}",
            worst(&f.output, &y)
        );
        assert!(
            worst(&b.x_grad, &dx) < 1e-3,
            "x_grad {}",
            worst(&b.x_grad, &dx)
        );
    }

    /// `pass` on every channel, one after another, in the AVX2 build or the baseline one.
    fn each_channel<P: ChannelPass>(pass: &P, channels: usize, wide_build: bool) -> Vec<P::Out> {
        let run = |c| {
            if wide_build {
                // SAFETY: the callers check that the CPU has AVX2.
                unsafe { wide(pass, c) }
            } else {
                pass.channel(c)
            }
        };
        (0..channels).map(run).collect()
    }

    /// The bits of a buffer every value of which is written (here: NaN before the passes).
    fn bits(values: &[MaybeUninit<f32>]) -> Vec<u32> {
        // SAFETY: every value was initialised.
        values
            .iter()
            .map(|v| unsafe { v.assume_init() }.to_bits())
            .collect()
    }

    /// The AVX2 build of each pass gives the baseline build's results bit for bit.
    #[test]
    fn wide_passes_match_the_baseline_bit_for_bit() {
        if !has_avx2() {
            return;
        }
        let s = Planes::from_dims(&[3, 4, 11, 13]);
        let x = values(s.len(), 21, 0.4);
        let dy = values(s.len(), 22, 0.1);
        let gamma = values(s.channels, 23, 1.0);
        let beta = values(s.channels, 24, 0.2);
        let count = s.count() as f64;
        for relu in [false, true] {
            let run_forward = |wide_build: bool| {
                let mut out = vec![MaybeUninit::new(f32::NAN); s.len()];
                let planes = PlaneWriter::new(&mut out, s);
                let pass = ForwardPass {
                    x: &x,
                    gamma: &gamma,
                    beta: &beta,
                    epsilon: 1e-5,
                    shape: s,
                    relu,
                    count,
                    planes,
                };
                let stats = each_channel(&pass, s.channels, wide_build);
                (stats, bits(&out))
            };
            let (narrow, wide_fwd) = (run_forward(false), run_forward(true));
            assert_eq!(narrow.1, wide_fwd.1, "forward output, relu {relu}");
            assert_eq!(narrow.0, wide_fwd.0, "forward statistics, relu {relu}");
            let f = forward(&x, &gamma, &beta, 1e-5, s, relu);
            let relu_output = relu.then_some(&f.output[..]);
            let run_backward = |wide_build: bool| {
                let mut dx = vec![MaybeUninit::new(f32::NAN); s.len()];
                let planes = PlaneWriter::new(&mut dx, s);
                let pass = BackwardPass {
                    saved: saved(&x, &gamma, &f, 1e-5, relu_output),
                    output_grad: &dy,
                    shape: s,
                    count,
                    planes,
                };
                let grads = each_channel(&pass, s.channels, wide_build);
                (grads, bits(&dx))
            };
            let (narrow, wide_bwd) = (run_backward(false), run_backward(true));
            assert_eq!(narrow.1, wide_bwd.1, "input gradient, relu {relu}");
            assert_eq!(
                narrow.0, wide_bwd.0,
                "gamma and beta gradients, relu {relu}"
            );
        }
    }

    /// BatchNorm + ReLU in one pass: the output is the f64 formula's clipped at zero, and the
    /// gradients are the f64 formulas' with the output gradient zeroed where the output is.
    #[test]
    fn fused_relu_matches_the_formulas() {
        for dims in [vec![4, 16, 8, 8], vec![3, 5], vec![2, 7, 13]] {
            let s = Planes::from_dims(&dims);
            let x = values(s.len(), 11, 0.3);
            let dy = values(s.len(), 12, 0.1);
            let gamma = values(s.channels, 13, 1.0);
            let beta = values(s.channels, 14, 0.2);
            let eps = 1e-5;
            let f = forward(&x, &gamma, &beta, eps, s, true);
            let [y, ..] = naive(&x, &gamma, &beta, &dy, eps, s);
            let clipped: Vec<f64> = y.iter().map(|&v| v.max(0.0)).collect();
            close(&f.output, &clipped, 1e-4, "relu output");
            assert!(f.output.contains(&0.0) && f.output.iter().any(|&v| v > 0.0));
            let masked: Vec<f32> = f
                .output
                .iter()
                .zip(&dy)
                .map(|(&o, &g)| if o > 0.0 { g } else { 0.0 })
                .collect();
            let [_, _, _, dx, dgamma, dbeta] = naive(&x, &gamma, &beta, &masked, eps, s);
            let b = backward(saved(&x, &gamma, &f, eps, Some(&f.output)), &dy, s);
            close(&b.x_grad, &dx, 1e-3, "relu x_grad");
            close(&b.gamma_grad, &dgamma, 1e-4, "relu gamma_grad");
            close(&b.beta_grad, &dbeta, 1e-4, "relu beta_grad");
        }
    }

    /// Evaluation with running statistics, in place, with and without the ReLU, against f64.
    #[test]
    fn inference_matches_the_formula() {
        let s = Planes::from_dims(&[3, 6, 5, 7]);
        let x = values(s.len(), 21, 0.5);
        let mean = values(s.channels, 22, 0.0);
        let variance: Vec<f32> = values(s.channels, 23, 1.5);
        let gamma = values(s.channels, 24, 1.0);
        let beta = values(s.channels, 25, 0.0);
        let running = Running {
            mean: &mean,
            variance: &variance,
            gamma: &gamma,
            beta: &beta,
            epsilon: 1e-5,
        };
        for relu in [false, true] {
            let want: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let c = (i / s.spatial) % s.channels;
                    let y = (v as f64 - mean[c] as f64) / (variance[c] as f64 + 1e-5).sqrt()
                        * gamma[c] as f64
                        + beta[c] as f64;
                    if relu { y.max(0.0) } else { y }
                })
                .collect();
            let mut got = x.clone();
            inference(None, &mut got, running, s, relu);
            close(&got, &want, 1e-5, "inference in place");
            let mut got = vec![0f32; x.len()];
            inference(Some(&x), &mut got, running, s, relu);
            close(&got, &want, 1e-5, "inference");
        }
    }
}
