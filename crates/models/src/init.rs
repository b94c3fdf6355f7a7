//! Host-side weight initialisation, so that a seed means the same weights on every backend.
//!
//! Burn's own initialisers draw from the backend's generator, which differs between flex and
//! wgpu; these draw from the caller's seeded generator and upload the result.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, RngExt};
use rand_distr::{Distribution, Normal};

/// A bias-free `k x k` convolution with padding `k / 2`, weights drawn from
/// N(0, sqrt(2 / (k * k * out))) as the reference and torchvision (`kaiming_normal_`,
/// `mode="fan_out"`) do.
pub(crate) fn conv(
    channels_in: usize,
    channels_out: usize,
    kernel: usize,
    stride: usize,
    rng: &mut impl Rng,
    device: &Device,
) -> Conv2d {
    let mut conv = Conv2dConfig::new([channels_in, channels_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            kernel / 2,
            kernel / 2,
            kernel / 2,
            kernel / 2,
        ))
        .with_bias(false)
        .with_initializer(Initializer::Zeros)
        .init(device);
    let std = (2.0 / (kernel * kernel * channels_out) as f64).sqrt();
    let normal = Normal::new(0.0, std).expect("a positive standard deviation");
    let shape = [channels_out, channels_in, kernel, kernel];
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| normal.sample(rng) as f32)
        .collect();
    conv.weight = Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device));
    conv
}

/// Batch normalisation with gamma 1, beta 0, momentum 0.1 and epsilon 1e-5 (PyTorch's defaults).
pub(crate) fn batch_norm(features: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(features).init(device)
}

/// A linear layer initialised as PyTorch's `nn.Linear`: weight and bias from
/// U(-1/sqrt(in), 1/sqrt(in)).
pub(crate) fn linear(
    features_in: usize,
    features_out: usize,
    rng: &mut impl Rng,
    device: &Device,
) -> Linear {
    let mut linear = LinearConfig::new(features_in, features_out)
        .with_initializer(Initializer::Zeros)
        .init(device);
    let bound = 1.0 / (features_in as f32).sqrt();
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
    let weight = uniform(features_in * features_out);
    let bias = uniform(features_out);
    linear.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(weight, [features_in, features_out]),
        device,
    ));
    linear.bias = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(bias, [features_out]),
        device,
    )));
    linear
}
