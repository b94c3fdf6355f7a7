//! The kernels against flex's own ops (Burn's defaults) on random shapes: values, gradients
//! through autodiff, and the BatchNorm running statistics.

use burn::backend::ops::ConvOptions;
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, DeviceKind, Distribution, Tensor};
use cutmix_kernels::sgd::Sgd;
use cutmix_kernels::{
    add_padded_channels, add_relu, batch_norm, batch_norm_relu, conv2d, conv2d_weight_grad, on_flex,
};

fn random<const D: usize>(dims: [usize; D], offset: f32, device: &Device) -> Tensor<D> {
    Tensor::random(dims, Distribution::Uniform(-1.0, 1.0), device).add_scalar(offset)
}

fn assert_close<const D: usize>(got: Tensor<D>, want: Tensor<D>, tolerance: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got: Vec<f32> = got.into_data().try_to_vec::<f32>().unwrap();
    let want: Vec<f32> = want.into_data().try_to_vec::<f32>().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

fn batch_norm_layer(channels: usize, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels).init(device);
    bn.gamma = Param::from_tensor(random([channels], 1.0, device));
    bn.beta = Param::from_tensor(random([channels], 0.0, device));
    bn
}

const BN_SHAPES: [&[usize]; 7] = [
    &[2, 3, 5, 7],
    &[8, 16, 8, 8],
    &[1, 4, 9, 9],
    &[5, 6],
    &[3, 2, 11],
    &[16, 64, 1, 1],
    &[8, 16, 32, 32],
];

#[test]
fn batch_norm_forward_matches_flex() {
    let device = Device::flex();
    for dims in BN_SHAPES {
        let x: Tensor<4> = random(pad4(dims), 2.0, &device);
        let bn = batch_norm_layer(dims[1], &device);
        let want = burn::tensor::module::batch_norm_train(
            x.clone(),
            bn.gamma.val(),
            bn.beta.val(),
            bn.epsilon,
        );
        let (output, mean, variance) =
            <burn::backend::Dispatch as cutmix_kernels::CpuKernels>::fused_batch_norm_train(
                x.into_dispatch(),
                bn.gamma.val().into_dispatch(),
                bn.beta.val().into_dispatch(),
                bn.epsilon,
                false,
            );
        assert_close(
            Tensor::<4>::from_dispatch(output),
            want.output,
            1e-5,
            "output",
        );
        assert_close(Tensor::<1>::from_dispatch(mean), want.mean, 1e-5, "mean");
        assert_close(
            Tensor::<1>::from_dispatch(variance),
            want.variance,
            1e-5,
            "variance",
        );
    }
}

/// A fresh layer with `bn`'s gamma and beta (not `bn.clone()`: a clone shares its running
/// statistics with the original).
fn twin(bn: &BatchNorm, device: &Device) -> BatchNorm {
    let [channels] = bn.gamma.shape().dims();
    let mut twin = BatchNormConfig::new(channels).init(device);
    twin.gamma = Param::from_tensor(bn.gamma.val().detach());
    twin.beta = Param::from_tensor(bn.beta.val().detach());
    twin
}

/// The input, gamma and beta gradients of two BatchNorm layers' backward passes agree.
fn assert_same_grads(
    (x_ours, ours, g_ours): (&Tensor<4>, &BatchNorm, &burn::tensor::Gradients),
    (x_burn, burn, g_burn): (&Tensor<4>, &BatchNorm, &burn::tensor::Gradients),
) {
    assert_close(
        x_ours.grad(g_ours).unwrap(),
        x_burn.grad(g_burn).unwrap(),
        1e-4,
        "x grad",
    );
    assert_close(
        ours.gamma.grad(g_ours).unwrap(),
        burn.gamma.grad(g_burn).unwrap(),
        1e-4,
        "gamma grad",
    );
    assert_close(
        ours.beta.grad(g_ours).unwrap(),
        burn.beta.grad(g_burn).unwrap(),
        1e-4,
        "beta grad",
    );
}

/// A `[b, c, ...]` shape as rank 4 (trailing ones), so one test covers ranks 2 to 4.
fn pad4(dims: &[usize]) -> [usize; 4] {
    let mut out = [1; 4];
    out[..dims.len()].copy_from_slice(dims);
    out
}

#[test]
fn batch_norm_training_matches_burn_with_gradients_and_running_statistics() {
    let device = Device::flex().autodiff();
    for dims in BN_SHAPES {
        let x: Tensor<4> = random(pad4(dims), -1.5, &device);
        let weights: Tensor<4> = random(pad4(dims), 0.0, &device);
        let burn_bn = batch_norm_layer(dims[1], &device);
        let ours_bn = twin(&burn_bn, &device);
        // Two steps, so the running statistics are updated twice.
        for step in 0..2 {
            let x = x.clone().mul_scalar(step as f32 + 1.0);
            let x_burn = x.clone().detach().require_grad();
            let x_ours = x.detach().require_grad();
            let y_burn = burn_bn.forward(x_burn.clone());
            let y_ours = batch_norm(&ours_bn, x_ours.clone());
            assert_close(y_ours.clone(), y_burn.clone(), 1e-5, "output");
            let g_burn = (y_burn * weights.clone()).sum().backward();
            let g_ours = (y_ours * weights.clone()).sum().backward();
            assert_same_grads((&x_ours, &ours_bn, &g_ours), (&x_burn, &burn_bn, &g_burn));
        }
        assert_close(
            ours_bn.running_mean.value_sync(),
            burn_bn.running_mean.value_sync(),
            1e-5,
            "running mean",
        );
        // Burn moves the running variance towards the biased batch variance, PyTorch (and
        // `batch_norm`) towards the unbiased one, n / (n - 1) times it. From 1, after two steps
        // of momentum m: running = (1 - m)^2 + (weighted variances), the second part scaled.
        let n = (dims.iter().product::<usize>() / dims[1]) as f32;
        let start = (1.0f32 - 0.1).powi(2);
        let expected = (burn_bn.running_var.value_sync() - start) * (n / (n - 1.0)) + start;
        assert_close(
            ours_bn.running_var.value_sync(),
            expected,
            1e-5,
            "running var (unbiased, as PyTorch)",
        );
    }
}

/// BatchNorm + ReLU fused in training: the output and every gradient equal Burn's BatchNorm
/// followed by Burn's ReLU (the gradient masked where the output is zero).
#[test]
fn batch_norm_relu_training_matches_burn_with_gradients() {
    let device = Device::flex().autodiff();
    for dims in BN_SHAPES {
        let x: Tensor<4> = random(pad4(dims), 0.5, &device);
        let weights: Tensor<4> = random(pad4(dims), 0.0, &device);
        let mut burn_bn = batch_norm_layer(dims[1], &device);
        // A beta at or below zero (gamma is positive), so every channel's values below its
        // mean are clipped, whatever the draws (a positive beta with a small gamma clipped
        // nothing on 33 values a channel once other tests took other draws first).
        let beta = Tensor::random([dims[1]], Distribution::Uniform(-1.0, 0.0), &device);
        burn_bn.beta = Param::from_tensor(beta);
        let ours_bn = twin(&burn_bn, &device);
        let x_burn = x.clone().detach().require_grad();
        let x_ours = x.detach().require_grad();
        let y_burn = relu(burn_bn.forward(x_burn.clone()));
        let y_ours = batch_norm_relu(&ours_bn, x_ours.clone());
        assert_close(y_ours.clone(), y_burn.clone(), 1e-5, "relu output");
        let zeros = y_ours
            .clone()
            .equal_elem(0.0)
            .int()
            .sum()
            .into_scalar::<i64>();
        assert!(
            zeros > 0,
            "{dims:?}: the ReLU clipped nothing, the test would not see it"
        );
        let g_burn = (y_burn * weights.clone()).sum().backward();
        let g_ours = (y_ours * weights).sum().backward();
        assert_same_grads((&x_ours, &ours_bn, &g_ours), (&x_burn, &burn_bn, &g_burn));
    }
}

/// Training steps on different threads (a step run on whichever of rayon's threads is free,
/// `on_cpu_threads`) move the running statistics exactly as the same steps on one thread:
/// Burn keeps an update per thread and averages them, which the kernels' update must not leave
/// pending.
#[test]
fn running_statistics_do_not_depend_on_the_thread_a_step_runs_on() {
    let device = Device::flex().autodiff();
    let inputs: Vec<Tensor<4>> = (0..3)
        .map(|i| random([4, 3, 5, 5], i as f32, &device))
        .collect();
    let one_thread = batch_norm_layer(3, &device);
    for x in &inputs {
        batch_norm(&one_thread, x.clone());
    }
    let threads = batch_norm_layer(3, &device);
    for x in &inputs {
        std::thread::scope(|scope| {
            scope.spawn(|| batch_norm(&threads, x.clone()));
        });
    }
    for (what, a, b) in [
        ("mean", &one_thread.running_mean, &threads.running_mean),
        ("variance", &one_thread.running_var, &threads.running_var),
    ] {
        assert_eq!(
            bits(a.value_sync()),
            bits(b.value_sync()),
            "running {what} after steps on three threads"
        );
    }
}

/// Evaluation: the one-pass kernel (in place when it may be) equals Burn's BatchNorm with the
/// running statistics, with and without the ReLU, on a shared input (left untouched), a
/// transposed view, and a rank-2 input; on an autodiff device it stays differentiable.
#[test]
fn batch_norm_outside_training_uses_the_running_statistics() {
    let device = Device::flex();
    let mut bn = batch_norm_layer(3, &device);
    bn.running_mean = burn::module::RunningState::new(random([3], 0.5, &device));
    bn.running_var = burn::module::RunningState::new(random([3], 1.5, &device));
    let x: Tensor<4> = random([2, 3, 4, 5], 1.0, &device);
    let kept = x.clone().into_data();
    assert_close(
        batch_norm(&bn, x.clone()),
        bn.forward(x.clone()),
        1e-6,
        "inference",
    );
    assert_close(
        batch_norm_relu(&bn, x.clone()),
        relu(bn.forward(x.clone())),
        1e-6,
        "inference + relu",
    );
    assert_eq!(
        x.clone().into_data(),
        kept,
        "a shared input was written over"
    );
    let view = x.swap_dims(2, 3);
    assert_close(
        batch_norm(&bn, view.clone()),
        bn.forward(view),
        1e-6,
        "view",
    );
    let flat: Tensor<2> = random([5, 3], 0.0, &device);
    assert_close(
        batch_norm_relu(&bn, flat.clone()),
        relu(bn.forward(flat)),
        1e-6,
        "rank 2",
    );

    let autodiff = Device::flex().autodiff();
    let bn = burn::module::Module::freeze(batch_norm_layer(3, &autodiff));
    let x = random::<4>([2, 3, 4, 4], 0.0, &autodiff).require_grad();
    let grads = batch_norm_relu(&bn, x.clone()).sum().backward();
    assert!(
        x.grad(&grads).is_some(),
        "no input gradient through an evaluation BatchNorm"
    );
}

/// (batch, in, out, input h/w, kernel, stride, padding top/left/bottom/right, dilation)
type ConvCase = (
    usize,
    usize,
    usize,
    [usize; 2],
    [usize; 2],
    [usize; 2],
    [usize; 4],
    [usize; 2],
);

const CONV_CASES: [ConvCase; 12] = [
    (2, 3, 4, [7, 9], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    (1, 5, 2, [6, 5], [1, 1], [1, 1], [0, 0, 0, 0], [1, 1]),
    (3, 4, 6, [11, 10], [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
    (2, 3, 8, [17, 15], [7, 7], [2, 2], [3, 3, 3, 3], [1, 1]),
    (4, 6, 3, [8, 8], [1, 1], [2, 2], [0, 0, 0, 0], [1, 1]),
    (2, 2, 3, [9, 7], [3, 2], [1, 2], [2, 1, 0, 2], [2, 1]),
    (1, 16, 32, [8, 8], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    (5, 64, 16, [4, 4], [1, 1], [1, 1], [0, 0, 0, 0], [1, 1]),
    (6, 8, 8, [5, 5], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    // several forward tiles of whole output rows, the last one partial
    (2, 32, 4, [37, 90], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    // the CIFAR ResNet's stem and first block at batch 8 (the PyTorch training-step fixture)
    (8, 3, 16, [32, 32], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    (8, 16, 16, [32, 32], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
];

fn conv_layer(case: &ConvCase, device: &Device) -> Conv2d {
    let &(_, ci, co, _, kernel, stride, [top, left, bottom, right], dilation) = case;
    let mut conv = Conv2dConfig::new([ci, co], kernel)
        .with_stride(stride)
        .with_dilation(dilation)
        .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
        .with_bias(false)
        .init(device);
    conv.weight = Param::from_tensor(random([co, ci, kernel[0], kernel[1]], 0.0, device));
    conv
}

#[test]
fn conv2d_matches_burn_with_gradients() {
    let device = Device::flex().autodiff();
    for case in &CONV_CASES {
        let &(batch, ci, _, [h, w], ..) = case;
        let conv = conv_layer(case, &device);
        let x: Tensor<4> = random([batch, ci, h, w], 0.5, &device);
        let x_burn = x.clone().detach().require_grad();
        let x_ours = x.detach().require_grad();
        let y_burn = conv.forward(x_burn.clone());
        let y_ours = conv2d(&conv, x_ours.clone());
        assert_close(y_ours.clone(), y_burn.clone(), 1e-5, "output");
        let weights = random(y_burn.dims(), 0.0, &device);
        let g_burn = (y_burn * weights.clone()).sum().backward();
        let g_ours = (y_ours * weights).sum().backward();
        let what = format!("{case:?}");
        assert_close(
            x_ours.grad(&g_ours).unwrap(),
            x_burn.grad(&g_burn).unwrap(),
            1e-5,
            &format!("x grad {what}"),
        );
        assert_close(
            conv.weight.grad(&g_ours).unwrap(),
            conv.weight.grad(&g_burn).unwrap(),
            1e-5,
            &format!("weight grad {what}"),
        );
    }
}

#[test]
fn conv2d_weight_grad_matches_flex_on_a_large_batch() {
    // Enough batch items to be cut into several chunks per thread.
    let device = Device::flex();
    let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    let x: Tensor<4> = random([64, 16, 32, 32], 0.0, &device);
    let w: Tensor<4> = random([16, 16, 3, 3], 0.0, &device);
    let g: Tensor<4> = random([64, 16, 32, 32], 0.0, &device);
    let want = burn::tensor::module::conv2d_weight_backward(
        x.clone(),
        w.clone(),
        g.clone(),
        options.clone(),
    );
    let got = conv2d_weight_grad(x, w, g, options);
    assert_close(got, want, 1e-5, "weight grad");
}

#[test]
fn conv2d_with_bias_or_groups_is_burn_s() {
    let device = Device::flex().autodiff();
    let conv = Conv2dConfig::new([4, 6], [3, 3])
        .with_groups(2)
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let x: Tensor<4> = random([2, 4, 6, 6], 0.0, &device);
    assert_close(
        conv2d(&conv, x.clone()),
        conv.forward(x),
        0.0,
        "grouped conv with bias",
    );
}

#[test]
fn only_flex_devices_take_the_kernels() {
    assert!(on_flex(&Device::flex()));
    assert!(on_flex(&Device::flex().autodiff()));
    assert!(!on_flex(&Device::wgpu(DeviceKind::Cpu)));
    assert!(!on_flex(&Device::wgpu(DeviceKind::Cpu).autodiff()));
}

#[test]
fn non_contiguous_inputs_are_read_correctly() {
    // A transposed view: the kernels must not read its storage in memory order.
    let device = Device::flex();
    let x: Tensor<4> = random([3, 4, 5, 6], 1.0, &device).swap_dims(2, 3);
    let bn = batch_norm_layer(4, &device);
    let want =
        burn::tensor::module::batch_norm_train(x.clone(), bn.gamma.val(), bn.beta.val(), 1e-5);
    let (output, ..) =
        <burn::backend::Dispatch as cutmix_kernels::CpuKernels>::fused_batch_norm_train(
            x.into_dispatch(),
            bn.gamma.val().into_dispatch(),
            bn.beta.val().into_dispatch(),
            1e-5,
            false,
        );
    assert_close(
        Tensor::<4>::from_dispatch(output),
        want.output,
        1e-5,
        "transposed input",
    );
}

fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
    let values: Vec<f32> = t.into_data().try_to_vec::<f32>().unwrap();
    values.iter().map(|v| v.to_bits()).collect()
}

/// A residual join on flex equals flex's `relu(a + b)` bit for bit, forward and both inputs'
/// gradients: with `a` unshared (written in place) and shared (kept, a new output), `b` a
/// transposed view, maps large enough for several parallel chunks, and the join's inputs used
/// again after it (each gradient the sum of two paths).
#[test]
fn add_relu_equals_flex_with_gradients() {
    let device = Device::flex().autodiff();
    for dims in [[2, 3, 5, 7], [4, 16, 32, 32]] {
        let a = random(dims, 0.0, &device).require_grad();
        let [n, c, h, w] = dims;
        let b = random([n, c, w, h], 0.0, &device)
            .swap_dims(2, 3)
            .require_grad();
        let g = random(dims, 0.0, &device);
        let ours = add_relu(a.clone() * 1.5, b.clone());
        let theirs = relu(a.clone() * 1.5 + b.clone());
        assert_eq!(
            bits(ours.clone()),
            bits(theirs.clone()),
            "{dims:?}: forward"
        );
        let (grads_ours, grads_theirs) = (
            (ours * g.clone() + a.clone() * b.clone()).sum().backward(),
            (theirs * g.clone() + a.clone() * b.clone())
                .sum()
                .backward(),
        );
        for (what, x) in [("a", &a), ("b", &b)] {
            assert_eq!(
                bits(x.grad(&grads_ours).unwrap()),
                bits(x.grad(&grads_theirs).unwrap()),
                "{dims:?}: {what} grad"
            );
        }
        // `a` shared with the caller: its values stay as they were.
        let plain = random(dims, 0.0, &Device::flex());
        let before = bits(plain.clone());
        let joined = add_relu(plain.clone(), plain.clone());
        assert_eq!(
            bits(plain.clone()),
            before,
            "{dims:?}: a shared operand kept"
        );
        assert_eq!(
            bits(joined),
            bits(relu(plain.clone() + plain)),
            "{dims:?}: shared"
        );
    }
}

/// PyramidNet's padded join on flex equals flex's `a + cat([b, zeros])` bit for bit (up to the
/// sign of zero: the padding's `x + 0.0` turns `-0.0` into `0.0`, the join leaves it), forward
/// and both inputs' gradients: fewer channels and as many, `b` a transposed view, `a` unshared
/// (written in place) and shared (kept), the inputs used again after the join.
#[test]
fn add_padded_channels_equals_flex_with_gradients() {
    let device = Device::flex().autodiff();
    let zero_sign = |v: Vec<u32>| -> Vec<u32> {
        v.into_iter()
            .map(|b| if b == (-0.0f32).to_bits() { 0 } else { b })
            .collect()
    };
    for (dims, b_channels) in [([2, 5, 3, 7], 3), ([4, 24, 32, 32], 16), ([2, 3, 4, 4], 3)] {
        let [n, c, h, w] = dims;
        let a = random(dims, 0.0, &device).require_grad();
        let b = random([n, b_channels, w, h], 0.0, &device)
            .swap_dims(2, 3)
            .require_grad();
        let g = random(dims, 0.0, &device);
        let ours = add_padded_channels(a.clone() * 1.5, b.clone());
        let padded = if b_channels < c {
            let zeros = Tensor::zeros([n, c - b_channels, h, w], &device);
            Tensor::cat(vec![b.clone(), zeros], 1)
        } else {
            b.clone()
        };
        let theirs = a.clone() * 1.5 + padded;
        assert_eq!(
            zero_sign(bits(ours.clone())),
            zero_sign(bits(theirs.clone())),
            "{dims:?} + {b_channels} channels: forward"
        );
        let reuse = |x: Tensor<4>| x.clone().sum() * 0.5;
        let (grads_ours, grads_theirs) = (
            ((ours * g.clone()).sum() + reuse(a.clone()) + reuse(b.clone())).backward(),
            ((theirs * g.clone()).sum() + reuse(a.clone()) + reuse(b.clone())).backward(),
        );
        for (what, x) in [("a", &a), ("b", &b)] {
            assert_eq!(
                bits(x.grad(&grads_ours).unwrap()),
                bits(x.grad(&grads_theirs).unwrap()),
                "{dims:?} + {b_channels} channels: {what} grad"
            );
        }
        // `a` shared with the caller: its values stay as they were.
        let plain = random(dims, 0.0, &Device::flex());
        let short = random([n, b_channels, h, w], 0.0, &Device::flex());
        let before = bits(plain.clone());
        let joined = add_padded_channels(plain.clone(), short.clone());
        assert_eq!(
            bits(plain.clone()),
            before,
            "{dims:?}: a shared operand kept"
        );
        let want = plain.clone().slice_assign(
            [0..n, 0..b_channels, 0..h, 0..w],
            plain.slice([0..n, 0..b_channels, 0..h, 0..w]) + short,
        );
        assert_eq!(bits(joined), bits(want), "{dims:?}: shared");
    }
}

/// A shortcut that does not pad to the branch is refused with the shapes in the message.
#[test]
#[should_panic(expected = "does not pad to")]
fn add_padded_channels_refuses_a_wider_shortcut() {
    let device = Device::flex();
    let a = random([2, 3, 4, 4], 0.0, &device);
    let b = random([2, 4, 4, 4], 0.0, &device);
    let _ = add_padded_channels(a, b);
}

/// A conv layer with a bias for the optimiser tests: its weight (32 x 64 x 3 x 3, 18432 values)
/// takes two parallel tasks, its bias (64) runs on the calling thread.
fn sgd_layer(device: &Device) -> Conv2d {
    Conv2dConfig::new([32, 64], [3, 3])
        .with_bias(true)
        .init(device)
}

/// The gradients of a random linear function of the layer's output at a random input.
fn sgd_grads(layer: &Conv2d, x: &Tensor<4>, g: &Tensor<4>) -> GradientsParams {
    let grads = (layer.forward(x.clone()) * g.clone()).sum().backward();
    GradientsParams::from_grads(grads, layer)
}

/// SGD's settings as Burn's `SgdConfig` takes them.
fn burn_sgd(momentum: &Option<MomentumConfig>, decay: f32) -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(momentum.clone())
        .with_weight_decay((decay > 0.0).then_some(WeightDecayConfig { penalty: decay }))
        .init()
}

fn layer_bits(layer: &Conv2d) -> (Vec<u32>, Vec<u32>) {
    let bias = layer.bias.as_ref().expect("a bias").val();
    (bits(layer.weight.val()), bits(bias))
}

/// Steps `layers` (all equal) once each with their optimisers and the same gradient inputs,
/// and checks that they are still equal.
fn sgd_steps_agree(
    layers: Vec<Conv2d>,
    optimizers: &mut [ModuleOptimizer],
    lr: f64,
    what: &str,
) -> Vec<Conv2d> {
    let device = layers[0].weight.val().device();
    let x = random([2, 32, 6, 6], 0.0, &device);
    let g = random([2, 64, 4, 4], 0.0, &device);
    let stepped: Vec<Conv2d> = layers
        .into_iter()
        .zip(optimizers.iter_mut())
        .map(|(layer, optimizer)| {
            let grads = sgd_grads(&layer, &x, &g);
            optimizer.step(lr, layer, grads)
        })
        .collect();
    for (i, layer) in stepped.iter().enumerate().skip(1) {
        assert_eq!(
            layer_bits(layer),
            layer_bits(&stepped[0]),
            "{what}: optimiser {i}"
        );
    }
    stepped
}

/// The fused SGD equals Burn's `Sgd` bit for bit over steps with and without momentum,
/// dampening, Nesterov and weight decay, and either's record resumes with the other.
#[test]
fn sgd_equals_burn_s_and_resumes_from_its_record() {
    let momentum = |dampening: f64, nesterov: bool| {
        Some(MomentumConfig {
            momentum: 0.9,
            dampening,
            nesterov,
        })
    };
    let cases = [
        (None, 0.0),
        (None, 5e-4),
        (momentum(0.0, false), 1e-4),
        (momentum(0.1, false), 0.0),
        (momentum(0.0, true), 5e-4),
    ];
    let device = Device::flex().autodiff();
    for (momentum, decay) in cases {
        let what = format!("momentum {momentum:?}, decay {decay}");
        let ours = || ModuleOptimizer::from(Sgd::new(momentum.clone(), decay));
        let layer = sgd_layer(&device);
        let mut optimizers = vec![burn_sgd(&momentum, decay), ours()];
        let mut layers = vec![layer.clone(), layer];
        for (step, lr) in [0.1, 0.05, 0.1].into_iter().enumerate() {
            layers = sgd_steps_agree(layers, &mut optimizers, lr, &format!("{what}, step {step}"));
        }
        let records: Vec<_> = optimizers
            .iter()
            .map(|o| o.into_bytes().expect("a record"))
            .collect();
        optimizers.push(
            ours()
                .from_bytes(records[0].clone())
                .expect("Burn's record"),
        );
        optimizers.push(
            burn_sgd(&momentum, decay)
                .from_bytes(records[1].clone())
                .expect("our record"),
        );
        layers.extend(layers.clone());
        sgd_steps_agree(layers, &mut optimizers, 0.1, &format!("{what}, resumed"));
    }
}

/// Off flex (wgpu) the same optimiser runs Burn's ops, with Burn's results.
#[test]
fn sgd_off_flex_equals_burn_s() {
    let device = Device::wgpu(DeviceKind::Cpu).autodiff();
    let momentum = Some(MomentumConfig {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
    });
    let layer = sgd_layer(&device);
    let mut optimizers = vec![
        burn_sgd(&momentum, 5e-4),
        ModuleOptimizer::from(Sgd::new(momentum, 5e-4)),
    ];
    let mut layers = vec![layer.clone(), layer];
    for step in 0..2 {
        layers = sgd_steps_agree(layers, &mut optimizers, 0.1, &format!("wgpu, step {step}"));
    }
}
