//! Faster CPU kernels for Burn's flex backend, as a Burn backend extension (`#[backend_extension]`):
//! a fused BatchNorm training forward and backward (optionally with the ReLU after it), a
//! one-pass BatchNorm (+ ReLU) for evaluation, and conv2d (forward, input gradient, weight
//! gradient) as im2col + GEMMs that write in place, the weight gradient over chunks of the
//! batch; stride-1 convolutions on larger maps skip im2col and run as products of shifted rows
//! ([`rows_dot`]). [`batch_norm`], [`batch_norm_relu`] and [`conv2d`] take Burn's own `nn` modules and use
//! the kernels on flex (with or without autodiff); every other backend runs Burn's ops, with one
//! change everywhere: BatchNorm's running variance follows PyTorch's rule (the unbiased batch
//! variance), not Burn's. [`add_relu`] joins a residual block on both threads, and
//! [`add_padded_channels`] a PyramidNet block. [`sgd::Sgd`] is Burn's SGD with its step
//! in one pass on every thread. [`cpu`] says which CPU and which GEMM instruction set run.
//! [`alloc::CacheLineAligned`] is a global allocator that starts large buffers on a cache line,
//! as the matrix products read them best.

pub mod alloc;
mod autodiff;
pub mod batch_norm;
pub mod conv;
pub mod cpu;
mod flex;
pub mod residual;
pub mod rows_dot;
pub mod sgd;

use burn::backend::backend_extension;
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

/// The operations this crate implements for flex. Each has a differentiable implementation for
/// `Autodiff<Flex>` with its own backward pass.
#[backend_extension(Flex, Autodiff)]
pub trait CpuKernels: Backend {
    /// BatchNorm with the batch's own statistics: `(output, mean, biased variance)`, as Burn's
    /// `ModuleOps::batch_norm_train`; with `relu`, the output goes through a ReLU in the same
    /// pass.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients of [`fused_batch_norm_train`](CpuKernels::fused_batch_norm_train) without the
    /// ReLU: `(x_grad, gamma_grad, beta_grad)`, as Burn's `ModuleOps::batch_norm_train_backward`.
    fn fused_batch_norm_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The same with the ReLU: `output` is the forward's (the gradient is zero where it is).
    fn fused_batch_norm_relu_train_backward(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// BatchNorm with given statistics (evaluation), as Burn's `ModuleOps::batch_norm`, with a
    /// ReLU in the same pass when `relu` is set; on flex one pass, in place when `x` is not
    /// shared.
    fn batch_norm_inference(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self>;

    /// A conv2d without bias, differentiated through
    /// [`conv2d_input_grad`](CpuKernels::conv2d_input_grad) and
    /// [`conv2d_weight_grad`](CpuKernels::conv2d_weight_grad).
    fn conv2d_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// The gradient of a conv2d's input, as Burn's `ModuleOps::conv2d_x_backward`.
    fn conv2d_input_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// The gradient of a conv2d's weight, as Burn's `ModuleOps::conv2d_weight_backward`.
    fn conv2d_weight_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// `relu(a + b)` for `a` and `b` of one shape (a residual block's join), differentiated
    /// through [`relu_backward_fused`](CpuKernels::relu_backward_fused) into both; on flex one
    /// pass on every thread, in place when `a` is not shared.
    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient through a ReLU whose output was `output`, as Burn's
    /// `ActivationOps::relu_backward`; on flex on every thread, in place when `grad` is not
    /// shared.
    fn relu_backward_fused(output: FloatTensor<Self>, grad: FloatTensor<Self>)
    -> FloatTensor<Self>;

    /// `a` (`[batch, channels, ...]`) plus `b` (`[batch, fewer channels, ...]`, the rest of
    /// the dimensions as `a`'s) zero-padded along the channels to `a`'s shape: `b` added to
    /// `a`'s leading channels (PyramidNet's shortcut join). Differentiated into `a` as the
    /// output gradient itself and into `b` as its leading channels
    /// ([`leading_channels`](CpuKernels::leading_channels)); on flex f32 only, on every
    /// thread, in place when `a` is not shared.
    fn add_padded_channels(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The first `channels` channels (dimension 1) of `x`, as a contiguous tensor; on flex f32
    /// only, on every thread.
    fn leading_channels(x: FloatTensor<Self>, channels: usize) -> FloatTensor<Self>;

    /// One parameter's SGD step with momentum ([`sgd::step`]): the parameter and the velocity
    /// after it. On flex f32 only, one pass on every thread, in place where the tensors are
    /// not shared; not differentiable.
    fn sgd_momentum_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        rule: sgd::SgdRule,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The same without momentum: the parameter after the step.
    fn sgd_plain_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        rule: sgd::SgdRule,
    ) -> FloatTensor<Self>;

    /// `x` summed element by element over the processes of a data-parallel run, with the
    /// [`sync_batch_norm`] reducer (`x` itself when none is set); differentiated by summing the
    /// incoming gradient the same way (every process's loss depends on every `x`).
    fn all_reduce_sum(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Sums a buffer in place over the processes of a data-parallel run (an MPI all-reduce).
pub type Reducer = Box<dyn Fn(&mut [f32]) + Send + Sync>;

static SYNC_BATCH_NORM: std::sync::RwLock<Option<std::sync::Arc<Reducer>>> =
    std::sync::RwLock::new(None);

/// Makes [`batch_norm`] in training normalise by the statistics of the batches of all the
/// processes together (PyTorch's `SyncBatchNorm`), summed with `reducer`; `None` turns it off.
/// Every process must then run the same BatchNorm layers in the same order. On flex only.
pub fn sync_batch_norm(reducer: Option<Reducer>) {
    *SYNC_BATCH_NORM.write().expect("sync lock") = reducer.map(std::sync::Arc::new);
}

/// The reducer [`sync_batch_norm`] set, if any.
pub fn batch_norm_reducer() -> Option<std::sync::Arc<Reducer>> {
    SYNC_BATCH_NORM.read().expect("sync lock").clone()
}

/// Per-channel sums of `x` (channels on dimension 1) over all processes, differentiably.
fn channel_sums<const D: usize>(x: Tensor<D>, channels: usize) -> Tensor<1> {
    let sums = x
        .swap_dims(0, 1)
        .reshape([channels as i32, -1])
        .sum_dim(1)
        .reshape([channels]);
    Tensor::from_dispatch(Dispatch::all_reduce_sum(sums.into_dispatch()))
}

/// SyncBatchNorm's training forward: the mean and biased variance of the batches of every
/// process (two all-reduces: the mean first, then the squares about it), the output
/// normalised by them, and the number of values per channel over all processes. Autodiff
/// differentiates through the all-reduces, which is PyTorch's SyncBatchNorm backward.
fn synced_batch_norm<const D: usize>(
    bn: &BatchNorm,
    x: Tensor<D>,
    reducer: &Reducer,
) -> (Tensor<D>, Tensor<1>, Tensor<1>, usize) {
    let channels = x.dims()[1];
    let mut count = [(x.shape().num_elements() / channels) as f32];
    reducer(&mut count);
    let count = count[0].round() as usize;
    let mut shape = [1usize; D];
    shape[1] = channels;
    let mean = channel_sums(x.clone(), channels) / count as f32;
    let centred = x - mean.clone().reshape(shape);
    let variance = channel_sums(centred.clone().powi_scalar(2), channels) / count as f32;
    let inv_std = (variance.clone() + bn.epsilon as f32).sqrt().recip();
    let output = centred * inv_std.reshape(shape) * bn.gamma.val().reshape(shape)
        + bn.beta.val().reshape(shape);
    (output, mean, variance, count)
}

/// Whether a tensor on `device` runs on flex (with or without autodiff).
pub fn on_flex(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// Runs `work` on one of rayon's threads where `device` is flex, on this thread otherwise.
///
/// Every parallel kernel called from outside rayon's pool hands its loop to the pool's threads
/// (waking them through the kernel) and sleeps until they are done, a round trip per op, some
/// hundred a training step. Called from a thread of the pool, the kernel runs its loop there,
/// with the other threads joining from their queues, and the thread that called it stays busy.
/// On an Intel Xeon (2 threads) CIFAR ResNet-20's training step ran 103.7-108.2 -> 101.0-102.3 ms
/// (medians of 12 steps, four rounds alternated; BENCHMARKS.md).
/// Keep what must stay on the calling thread (MPI, which is initialised for the main thread
/// alone) out of `work`.
pub fn on_cpu_threads<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    if on_flex(device) {
        rayon::scope(|_| work())
    } else {
        work()
    }
}

/// `bn.forward(x)`, through the fused kernels on flex (training and evaluation). The semantics
/// of Burn's `BatchNorm::forward` (batch statistics and a running-statistics update when the
/// device is an autodiff device and the layer is not frozen, the running statistics otherwise)
/// except for one thing, on every backend: the running variance moves towards the batch's
/// *unbiased* variance (`n / (n - 1)` times the biased one the normalisation divides by, `n` the
/// values per channel), as PyTorch's `BatchNorm2d` does; Burn's moves towards the biased one.
pub fn batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    normalise(bn, x, false)
}

/// `relu(batch_norm(bn, x))`, the ReLU fused into the BatchNorm's pass on flex (and into its
/// backward in training).
pub fn batch_norm_relu<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    normalise(bn, x, true)
}

fn normalise<const D: usize>(bn: &BatchNorm, x: Tensor<D>, relu: bool) -> Tensor<D> {
    let device = x.device();
    let activation = |y: Tensor<D>| {
        if relu {
            burn::tensor::activation::relu(y)
        } else {
            y
        }
    };
    if !(device.is_autodiff() && bn.training.is_enabled()) {
        return if device == Device::flex() {
            batch_norm_inference(bn, x, relu)
        } else {
            activation(bn.forward(x))
        };
    }
    let [channels] = bn.gamma.shape().dims();
    assert!(
        D >= 2 && x.dims()[1] == channels,
        "BatchNorm over {channels} channels got an input of shape {:?}",
        x.dims()
    );
    let per_channel = x.shape().num_elements() / channels;
    let synced = batch_norm_reducer().filter(|_| on_flex(&device));
    let (output, mean, variance, per_channel) = if let Some(reducer) = synced {
        let (output, mean, variance, count) = synced_batch_norm(bn, x, &reducer);
        (activation(output), mean, variance, count)
    } else if on_flex(&device) {
        let (output, mean, variance) = Dispatch::fused_batch_norm_train(
            x.into_dispatch(),
            bn.gamma.val().into_dispatch(),
            bn.beta.val().into_dispatch(),
            bn.epsilon,
            relu,
        );
        (
            Tensor::from_dispatch(output),
            Tensor::<1>::from_dispatch(mean),
            Tensor::<1>::from_dispatch(variance),
            per_channel,
        )
    } else {
        let result =
            burn::tensor::module::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon);
        (
            activation(result.output),
            result.mean,
            result.variance,
            per_channel,
        )
    };
    let unbiased = per_channel as f64 / per_channel.saturating_sub(1).max(1) as f64;
    let variance = variance.detach().mul_scalar(unbiased);

    // running = (1 - momentum) * running + momentum * batch.
    let momentum = bn.momentum;
    for (running, batch) in [
        (&bn.running_mean, mean.detach()),
        (&bn.running_var, variance),
    ] {
        let value = running.value_sync().to_device(&device);
        running.update(
            value
                .mul_scalar(1.0 - momentum)
                .add(batch.mul_scalar(momentum))
                .detach(),
        );
        // Made the value at once: Burn keeps an update per thread until the next `value_sync`
        // on that thread, and averages the updates of all threads then. A step run on another
        // of rayon's threads than the last ([`on_cpu_threads`]) would start from a stale value
        // and later be averaged with it.
        running.value_sync();
    }
    output
}

/// BatchNorm (+ ReLU) with the running statistics, through the one-pass kernel (flex, no
/// autodiff).
fn batch_norm_inference<const D: usize>(bn: &BatchNorm, x: Tensor<D>, relu: bool) -> Tensor<D> {
    let device = x.device();
    let running = |state: &burn::module::RunningState<Tensor<1>>| {
        state.value().to_device(&device).into_dispatch()
    };
    Tensor::from_dispatch(Dispatch::batch_norm_inference(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        running(&bn.running_mean),
        running(&bn.running_var),
        bn.epsilon,
        relu,
    ))
}

/// `relu(a + b)`, a residual block's join, in one pass on every thread on flex (its backward
/// too); Burn's ops elsewhere, and where the shapes differ (broadcasting).
pub fn add_relu<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    if !on_flex(&a.device()) || a.dims() != b.dims() {
        return burn::tensor::activation::relu(a + b);
    }
    Tensor::from_dispatch(Dispatch::add_relu(a.into_dispatch(), b.into_dispatch()))
}

/// `a + b` with `b` zero-padded along dimension 1 (the channels) to `a`'s size: `b` added to
/// `a`'s leading channels, the rest of `a` as it is (PyramidNet's shortcut join, where the
/// branch has more channels than the block's input). One pass on every thread on flex f32,
/// in place when `a` is not shared, and its backward without a copy for `a` (Burn's ops
/// elsewhere: a tensor of zeros, a concatenation and an add).
///
/// # Panics
/// Where `b` has more channels than `a` or its other dimensions differ from `a`'s.
pub fn add_padded_channels<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    let (a_dims, b_dims) = (a.dims(), b.dims());
    assert!(
        D >= 2 && a_dims[0] == b_dims[0] && a_dims[2..] == b_dims[2..] && b_dims[1] <= a_dims[1],
        "add_padded_channels: {b_dims:?} does not pad to {a_dims:?} along dimension 1"
    );
    let f32s = a.dtype() == burn::tensor::DType::F32 && b.dtype() == burn::tensor::DType::F32;
    if !on_flex(&a.device()) || !f32s {
        if b_dims[1] == a_dims[1] {
            return a + b;
        }
        let mut padding = a_dims;
        padding[1] -= b_dims[1];
        let zeros = Tensor::<D>::zeros(padding, &b.device()).cast(b.dtype());
        return a + Tensor::cat(vec![b, zeros], 1);
    }
    Tensor::from_dispatch(Dispatch::add_padded_channels(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

/// `conv.forward(x)`, through this crate's conv kernels on flex. Convolutions with a bias,
/// groups, or `Same` padding run Burn's op everywhere.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Same => return conv.forward(x),
    };
    if conv.bias.is_some() || conv.groups != 1 {
        return conv.forward(x);
    }
    let options = ConvOptions::new_with_padding(conv.stride, padding, conv.dilation, 1);
    conv2d_no_bias(x, conv.weight.val(), options)
}

/// `burn::tensor::module::conv2d(x, weight, None, options)`, through this crate's kernels on
/// flex (differentiable on an autodiff device).
pub fn conv2d_no_bias(x: Tensor<4>, weight: Tensor<4>, options: ConvOptions<2>) -> Tensor<4> {
    if !on_flex(&x.device()) {
        return burn::tensor::module::conv2d(x, weight, None, options);
    }
    Tensor::from_dispatch(Dispatch::conv2d_no_bias(
        x.into_dispatch(),
        weight.into_dispatch(),
        options,
    ))
}

/// The gradient of a conv2d's input (Burn's `ModuleOps::conv2d_x_backward`), through this
/// crate's kernel on flex.
pub fn conv2d_input_grad(
    x: Tensor<4>,
    weight: Tensor<4>,
    output_grad: Tensor<4>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if !on_flex(&x.device()) {
        return Tensor::from_dispatch(<Dispatch as ModuleOps<Dispatch>>::conv2d_x_backward(
            x.into_dispatch(),
            weight.into_dispatch(),
            output_grad.into_dispatch(),
            options,
        ));
    }
    Tensor::from_dispatch(Dispatch::conv2d_input_grad(
        x.into_dispatch(),
        weight.into_dispatch(),
        output_grad.into_dispatch(),
        options,
    ))
}

/// The gradient of a conv2d's weight (`burn::tensor::module::conv2d_weight_backward`), through
/// this crate's kernel on flex.
pub fn conv2d_weight_grad(
    x: Tensor<4>,
    weight: Tensor<4>,
    output_grad: Tensor<4>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if !on_flex(&x.device()) {
        return burn::tensor::module::conv2d_weight_backward(x, weight, output_grad, options);
    }
    Tensor::from_dispatch(Dispatch::conv2d_weight_grad(
        x.into_dispatch(),
        weight.into_dispatch(),
        output_grad.into_dispatch(),
        options,
    ))
}
