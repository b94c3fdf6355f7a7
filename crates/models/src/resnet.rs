//! ResNet in torchvision's layout (stride on the 3x3 conv, downsample = conv1x1 + BN, `fc`
//! last), with the ImageNet stem (7x7/2 conv, 3x3/2 max pool, four stages) or the CIFAR stem of
//! the CutMix reference's `resnet.py` (3x3 conv, three stages of 16/32/64 planes).
//!
//! Parameter names follow torchvision: `conv1`, `bn1`, `layer1.0.conv1`,
//! `layer1.0.downsample.0`, ..., `fc`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear};
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor};
use cutmix_kernels::{add_relu, batch_norm, batch_norm_relu, conv2d};
use rand::Rng;

use crate::cost::{conv_macs, linear_macs};
use crate::init;

/// One residual block. Basic (two 3x3 convs) when `conv3` is absent, bottleneck
/// (1x1, 3x3 with the stride, 1x1 to 4x the planes) when present.
#[derive(Module, Debug)]
pub struct ResidualBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub conv3: Option<Conv2d>,
    pub bn3: Option<BatchNorm>,
    /// Projection shortcut (conv1x1 with the block's stride, then BN) when the shape changes.
    pub downsample: Option<(Conv2d, BatchNorm)>,
}

impl ResidualBlock {
    /// Builds a block taking `inplanes` channels to `planes * expansion`.
    fn new(
        inplanes: usize,
        planes: usize,
        stride: usize,
        bottleneck: bool,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        let expansion = if bottleneck { 4 } else { 1 };
        let outplanes = planes * expansion;
        let (conv1, conv2, conv3) = if bottleneck {
            (
                init::conv(inplanes, planes, 1, 1, rng, device),
                init::conv(planes, planes, 3, stride, rng, device),
                Some(init::conv(planes, outplanes, 1, 1, rng, device)),
            )
        } else {
            (
                init::conv(inplanes, planes, 3, stride, rng, device),
                init::conv(planes, planes, 3, 1, rng, device),
                None,
            )
        };
        let downsample = (stride != 1 || inplanes != outplanes).then(|| {
            (
                init::conv(inplanes, outplanes, 1, stride, rng, device),
                init::batch_norm(outplanes, device),
            )
        });
        Self {
            conv1,
            bn1: init::batch_norm(planes, device),
            conv2,
            bn2: init::batch_norm(if bottleneck { planes } else { outplanes }, device),
            conv3,
            bn3: bottleneck.then(|| init::batch_norm(outplanes, device)),
            downsample,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, inplanes, h, w]`
    /// - output: `[batch, planes * expansion, h / stride, w / stride]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some((conv, bn)) => batch_norm(bn, conv2d(conv, x.clone())),
            None => x.clone(),
        };
        let out = batch_norm_relu(&self.bn1, conv2d(&self.conv1, x));
        let out = match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => {
                let out = batch_norm_relu(&self.bn2, conv2d(&self.conv2, out));
                batch_norm(bn3, conv2d(conv3, out))
            }
            _ => batch_norm(&self.bn2, conv2d(&self.conv2, out)),
        };
        add_relu(out, shortcut)
    }

    /// Multiply-accumulates of the convolutions for an `[h, w]` input; returns them with the
    /// output size.
    fn macs(&self, hw: [usize; 2]) -> (u64, [usize; 2]) {
        let shortcut = self
            .downsample
            .as_ref()
            .map_or(0, |(conv, _)| conv_macs(conv, hw).0);
        let (mut total, mut out) = conv_macs(&self.conv1, hw);
        for conv in std::iter::once(&self.conv2).chain(&self.conv3) {
            let (macs, next) = conv_macs(conv, out);
            total += macs;
            out = next;
        }
        (total + shortcut, out)
    }
}

/// The stem of a ResNet: which dataset family it was laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stem {
    /// 7x7/2 conv, BN, ReLU, 3x3/2 max pool; stages of 64, 128, 256, 512 planes.
    ImageNet,
    /// 3x3 conv, BN, ReLU; stages of 16, 32, 64 planes (32x32 inputs).
    Cifar,
    /// 3x3 stride-1 conv, BN, ReLU, no max pool; the ImageNet stages of 64 .. 512 planes
    /// (ImageNet depths on 32x32 inputs).
    SmallImage,
}

/// A ResNet (see the module docs). `layer4` is empty for the CIFAR stem.
#[derive(Module, Debug)]
pub struct ResNet {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub layer1: Vec<ResidualBlock>,
    pub layer2: Vec<ResidualBlock>,
    pub layer3: Vec<ResidualBlock>,
    pub layer4: Vec<ResidualBlock>,
    pub fc: Linear,
    /// Whether the stem max-pools (ImageNet stem).
    pub max_pool: bool,
}

/// The shape of a ResNet: its stem, `blocks[i]` blocks in stage `i`, bottleneck or basic
/// blocks, and the stride of the fourth stage (`layer4`; 2 as torchvision, 1 for the
/// localization backbone).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout<'a> {
    pub stem: Stem,
    pub blocks: &'a [usize],
    pub bottleneck: bool,
    pub last_stride: usize,
}

impl ResNet {
    /// Builds a ResNet laid out as `layout` with a `num_classes` classifier.
    pub(crate) fn new(
        layout: Layout<'_>,
        num_classes: usize,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        let Layout {
            stem,
            blocks,
            bottleneck,
            last_stride,
        } = layout;
        let (stem_planes, stem_kernel, stem_stride, stage_planes): (usize, usize, usize, &[usize]) =
            match stem {
                Stem::ImageNet => (64, 7, 2, &[64, 128, 256, 512]),
                Stem::Cifar => (16, 3, 1, &[16, 32, 64]),
                Stem::SmallImage => (64, 3, 1, &[64, 128, 256, 512]),
            };
        let conv1 = init::conv(3, stem_planes, stem_kernel, stem_stride, rng, device);
        let bn1 = init::batch_norm(stem_planes, device);
        let expansion = if bottleneck { 4 } else { 1 };
        let mut inplanes = stem_planes;
        let mut stages: Vec<Vec<ResidualBlock>> = Vec::new();
        for (stage, (&planes, &count)) in stage_planes.iter().zip(blocks).enumerate() {
            let stride = match stage {
                0 => 1,
                3 => last_stride,
                _ => 2,
            };
            let layer = (0..count)
                .map(|i| {
                    let block = ResidualBlock::new(
                        inplanes,
                        planes,
                        if i == 0 { stride } else { 1 },
                        bottleneck,
                        rng,
                        device,
                    );
                    inplanes = planes * expansion;
                    block
                })
                .collect();
            stages.push(layer);
        }
        stages.resize_with(4, Vec::new);
        let fc = init::linear(inplanes, num_classes, rng, device);
        let mut stages = stages.into_iter();
        let mut next = || stages.next().unwrap_or_default();
        Self {
            conv1,
            bn1,
            layer1: next(),
            layer2: next(),
            layer3: next(),
            layer4: next(),
            fc,
            max_pool: stem == Stem::ImageNet,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, 3, h, w]`
    /// - output: `[batch, num_classes]` (logits)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_mixed(x, 0, &mut |features| features)
    }

    /// The forward pass with `mix` applied to the feature map after stage `stage` (1-based,
    /// `layer{stage}`; 0 = nowhere), as feature-level CutMix does.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward); `mix` maps `[batch, c, h, w]` to the same shape.
    pub fn forward_mixed(
        &self,
        x: Tensor<4>,
        stage: usize,
        mix: &mut dyn FnMut(Tensor<4>) -> Tensor<4>,
    ) -> Tensor<2> {
        let x = self.features_mixed(x, stage, mix);
        self.fc.forward(global_average_pool(x))
    }

    /// The last feature map, the one global average pooling and `fc` turn into the logits
    /// (what class activation maps weigh).
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, h, w]`
    /// - output: `[batch, channels, h / 32, w / 32]` (`h / 8` with the CIFAR stem)
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        self.features_mixed(x, 0, &mut |features| features)
    }

    fn features_mixed(
        &self,
        x: Tensor<4>,
        stage: usize,
        mix: &mut dyn FnMut(Tensor<4>) -> Tensor<4>,
    ) -> Tensor<4> {
        let mut x = self.stem(x);
        for (index, layer) in self.stages().into_iter().enumerate() {
            for block in layer {
                x = block.forward(x);
            }
            if index + 1 == stage {
                x = mix(x);
            }
        }
        x
    }

    /// conv1, bn1, ReLU and, with the ImageNet stem, the 3x3/2 max pool.
    fn stem(&self, x: Tensor<4>) -> Tensor<4> {
        let x = batch_norm_relu(&self.bn1, conv2d(&self.conv1, x));
        if self.max_pool {
            max_pool2d(
                x,
                MaxPoolOptions::new([3, 3])
                    .with_stride([2, 2])
                    .with_padding([1, 1]),
            )
        } else {
            x
        }
    }

    /// The stages that have blocks (three for the CIFAR stem, four for ImageNet's).
    pub fn stages(&self) -> Vec<&[ResidualBlock]> {
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .into_iter()
            .filter(|layer| !layer.is_empty())
            .map(Vec::as_slice)
            .collect()
    }

    fn blocks(&self) -> impl Iterator<Item = &ResidualBlock> {
        self.layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
    }

    /// Multiply-accumulates of the convolutions and the classifier for one `[h, w]` image.
    pub fn macs(&self, hw: [usize; 2]) -> u64 {
        let (mut total, mut hw) = conv_macs(&self.conv1, hw);
        if self.max_pool {
            hw = hw.map(|size| (size + 2 - 3) / 2 + 1);
        }
        for block in self.blocks() {
            let (macs, next) = block.macs(hw);
            total += macs;
            hw = next;
        }
        total + linear_macs(&self.fc)
    }
}

/// Mean over the spatial dimensions.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]`
/// - output: `[batch, channels]`
pub(crate) fn global_average_pool(x: Tensor<4>) -> Tensor<2> {
    let [batch, channels, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([batch, channels])
}
