//! PyramidNet (Han et al., 2017) as the CutMix reference's `pyramidnet.py` builds it for CIFAR.
//!
//! The width grows by `alpha / (3 n)` at every block; block `k` has `round(16 + k * alpha / 3n)`
//! planes (Python's round half to even, on the running float sum as the reference accumulates
//! it), and a bottleneck block outputs 4x that. Blocks are pre-activation without the first
//! ReLU and without a ReLU after the addition; the shortcut is identity, or a 2x2 average pool
//! when strided, with missing channels zero-padded. With ShakeDrop, each residual branch is
//! gated before the addition (see [`ShakeDrop`]).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear};
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use burn::tensor::{Device, Tensor};
use cutmix_kernels::{add_padded_channels, batch_norm, batch_norm_relu, conv2d};
use rand::Rng;

use crate::cost::{conv_macs, linear_macs};
use crate::init;
use crate::resnet::global_average_pool;
use crate::shakedrop::ShakeDrop;

/// One PyramidNet block: BN, conv, BN, ReLU, conv, BN (basic) or BN, conv1x1, BN, ReLU,
/// conv3x3 (stride), BN, ReLU, conv1x1 (4x), BN (bottleneck); then the zero-padded shortcut is
/// added.
#[derive(Module, Debug)]
pub struct PyramidBlock {
    pub bn1: BatchNorm,
    pub conv1: Conv2d,
    pub bn2: BatchNorm,
    pub conv2: Conv2d,
    pub bn3: BatchNorm,
    pub conv3: Option<Conv2d>,
    pub bn4: Option<BatchNorm>,
    /// Spatial stride of the block; the shortcut average-pools when it is 2.
    pub stride: usize,
    /// The branch's ShakeDrop gate (`drop_prob` 0 without ShakeDrop).
    pub shakedrop: ShakeDrop,
}

impl PyramidBlock {
    fn new(
        inplanes: usize,
        planes: usize,
        stride: usize,
        bottleneck: bool,
        shakedrop: ShakeDrop,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        if bottleneck {
            Self {
                bn1: init::batch_norm(inplanes, device),
                conv1: init::conv(inplanes, planes, 1, 1, rng, device),
                bn2: init::batch_norm(planes, device),
                conv2: init::conv(planes, planes, 3, stride, rng, device),
                bn3: init::batch_norm(planes, device),
                conv3: Some(init::conv(planes, planes * 4, 1, 1, rng, device)),
                bn4: Some(init::batch_norm(planes * 4, device)),
                stride,
                shakedrop,
            }
        } else {
            Self {
                bn1: init::batch_norm(inplanes, device),
                conv1: init::conv(inplanes, planes, 3, stride, rng, device),
                bn2: init::batch_norm(planes, device),
                conv2: init::conv(planes, planes, 3, 1, rng, device),
                bn3: init::batch_norm(planes, device),
                conv3: None,
                bn4: None,
                stride,
                shakedrop,
            }
        }
    }

    /// Evaluation forward pass (ShakeDrop, if any, scales by its keep probability).
    ///
    /// # Shapes
    /// - `x`: `[batch, inplanes, h, w]`
    /// - output: `[batch, outplanes, h / stride, w / stride]`, `outplanes >= inplanes`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let branch = self.shakedrop.forward_eval(self.branch(x.clone()));
        self.add_shortcut(branch, x)
    }

    /// Training forward pass: ShakeDrop draws its gate and scales from `rng`.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward).
    pub fn forward_train(&self, x: Tensor<4>, rng: &mut impl Rng) -> Tensor<4> {
        let branch = self.shakedrop.forward_train(self.branch(x.clone()), rng);
        self.add_shortcut(branch, x)
    }

    /// The residual branch, up to its last BatchNorm.
    fn branch(&self, x: Tensor<4>) -> Tensor<4> {
        let out = conv2d(&self.conv1, batch_norm(&self.bn1, x));
        let out = conv2d(&self.conv2, batch_norm_relu(&self.bn2, out));
        match (&self.conv3, &self.bn4) {
            (Some(conv3), Some(bn4)) => {
                batch_norm(bn4, conv2d(conv3, batch_norm_relu(&self.bn3, out)))
            }
            _ => batch_norm(&self.bn3, out),
        }
    }

    /// Adds the shortcut: `x` itself, or 2x2-average-pooled when strided, zero-padded to the
    /// branch's channels.
    fn add_shortcut(&self, branch: Tensor<4>, x: Tensor<4>) -> Tensor<4> {
        let shortcut = if self.stride == 1 {
            x
        } else {
            avg_pool2d(
                x,
                AvgPoolOptions::new([2, 2])
                    .with_stride([2, 2])
                    .with_ceil_mode(true),
            )
        };
        add_padded_channels(branch, shortcut)
    }

    /// Multiply-accumulates of the convolutions for an `[h, w]` input; returns them with the
    /// output size.
    fn macs(&self, hw: [usize; 2]) -> (u64, [usize; 2]) {
        let (mut total, mut hw) = conv_macs(&self.conv1, hw);
        for conv in std::iter::once(&self.conv2).chain(&self.conv3) {
            let (macs, next) = conv_macs(conv, hw);
            total += macs;
            hw = next;
        }
        (total, hw)
    }
}

/// PyramidNet for 32x32 inputs: conv3x3(3 -> 16) + BN stem (no ReLU), three stages of `n`
/// blocks, then BN, ReLU, global average pool and `fc`.
#[derive(Module, Debug)]
pub struct PyramidNet {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub layer1: Vec<PyramidBlock>,
    pub layer2: Vec<PyramidBlock>,
    pub layer3: Vec<PyramidBlock>,
    pub bn_final: BatchNorm,
    pub fc: Linear,
}

impl PyramidNet {
    /// Builds a PyramidNet with `n` blocks per stage and total widening `alpha`; `shakedrop`
    /// is the last block's drop probability (0 = no ShakeDrop).
    pub(crate) fn new(
        n: usize,
        alpha: f64,
        bottleneck: bool,
        shakedrop: f64,
        num_classes: usize,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        let expansion = if bottleneck { 4 } else { 1 };
        let add_rate = alpha / (3 * n) as f64;
        let conv1 = init::conv(3, 16, 3, 1, rng, device);
        let bn1 = init::batch_norm(16, device);
        // The reference keeps a running float width and rounds it per block.
        let mut width = 16.0_f64;
        let mut inplanes = 16;
        let mut stages = Vec::with_capacity(3);
        for stage in 0..3 {
            let stride = if stage == 0 { 1 } else { 2 };
            let mut layer = Vec::with_capacity(n);
            for i in 0..n {
                width += add_rate;
                let planes = width.round_ties_even() as usize;
                let block_stride = if i == 0 { stride } else { 1 };
                layer.push(PyramidBlock::new(
                    inplanes,
                    planes,
                    block_stride,
                    bottleneck,
                    ShakeDrop::linear_decay(shakedrop, stage * n + i, 3 * n),
                    rng,
                    device,
                ));
                inplanes = planes * expansion;
            }
            stages.push(layer);
        }
        let bn_final = init::batch_norm(inplanes, device);
        let fc = init::linear(inplanes, num_classes, rng, device);
        let [layer1, layer2, layer3]: [Vec<PyramidBlock>; 3] =
            stages.try_into().expect("three stages");
        Self {
            conv1,
            bn1,
            layer1,
            layer2,
            layer3,
            bn_final,
            fc,
        }
    }

    /// Evaluation forward pass.
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, h, w]`
    /// - output: `[batch, num_classes]` (logits)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.fc.forward(global_average_pool(self.features(x)))
    }

    /// The last feature map (after the final BatchNorm and ReLU), the one global average
    /// pooling and `fc` turn into the logits (what class activation maps weigh).
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, h, w]`
    /// - output: `[batch, channels, h / 4, w / 4]`
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = batch_norm(&self.bn1, conv2d(&self.conv1, x));
        for block in self.blocks() {
            x = block.forward(x);
        }
        batch_norm_relu(&self.bn_final, x)
    }

    /// Training forward pass: ShakeDrop draws from `rng` block by block.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward).
    pub fn forward_train(&self, x: Tensor<4>, rng: &mut impl Rng) -> Tensor<2> {
        self.forward_train_mixed(x, 0, rng, &mut |features| features)
    }

    /// The training forward pass with `mix` applied to the feature map after stage `stage`
    /// (1-based, `layer{stage}`; 0 = nowhere), as feature-level CutMix does.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward); `mix` maps `[batch, c, h, w]` to the same shape.
    pub fn forward_train_mixed(
        &self,
        x: Tensor<4>,
        stage: usize,
        rng: &mut impl Rng,
        mix: &mut dyn FnMut(Tensor<4>) -> Tensor<4>,
    ) -> Tensor<2> {
        let mut x = batch_norm(&self.bn1, conv2d(&self.conv1, x));
        for (index, layer) in [&self.layer1, &self.layer2, &self.layer3]
            .into_iter()
            .enumerate()
        {
            for block in layer {
                x = block.forward_train(x, rng);
            }
            if index + 1 == stage {
                x = mix(x);
            }
        }
        self.head(x)
    }

    fn blocks(&self) -> impl Iterator<Item = &PyramidBlock> {
        self.layer1.iter().chain(&self.layer2).chain(&self.layer3)
    }

    fn head(&self, x: Tensor<4>) -> Tensor<2> {
        let x = batch_norm_relu(&self.bn_final, x);
        self.fc.forward(global_average_pool(x))
    }

    /// Multiply-accumulates of the convolutions and the classifier for one `[h, w]` image.
    pub fn macs(&self, hw: [usize; 2]) -> u64 {
        let (mut total, mut hw) = conv_macs(&self.conv1, hw);
        for block in self.blocks() {
            let (macs, next) = block.macs(hw);
            total += macs;
            hw = next;
        }
        total + linear_macs(&self.fc)
    }
}
