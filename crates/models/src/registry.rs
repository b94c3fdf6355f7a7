//! Builds any model from its [`ModelConfig`]: the depth tables live here.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use rand::Rng;

use crate::pyramidnet::PyramidNet;
use crate::resnet::{Layout, ResNet, Stem};

/// The architecture families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// torchvision's ImageNet ResNet: depth 18, 34 (basic), 50, 101, 152 (bottleneck).
    ResNet,
    /// The same ResNets with a stem for 32x32 inputs (3x3 stride-1 conv, no max pool; the
    /// "ResNet-18 for CIFAR" of pytorch-cifar and many papers' baselines).
    ResNetCifarStem,
    /// The reference's CIFAR ResNet: depth 6n+2 (basic) or 9n+2 (bottleneck).
    CifarResNet,
    /// The reference's CIFAR PyramidNet: depth 6n+2 (basic) or 9n+2 (bottleneck), any alpha.
    PyramidNet,
}

impl Arch {
    /// The config spelling of each architecture.
    pub const NAMES: [&'static str; 4] =
        ["resnet", "resnet_cifar_stem", "cifar_resnet", "pyramidnet"];

    /// Parses the config spelling (`resnet`, `resnet_cifar_stem`, `cifar_resnet`,
    /// `pyramidnet`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "resnet" => Some(Self::ResNet),
            "resnet_cifar_stem" => Some(Self::ResNetCifarStem),
            "cifar_resnet" => Some(Self::CifarResNet),
            "pyramidnet" => Some(Self::PyramidNet),
            _ => None,
        }
    }
}

/// What is wrong with a model description.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("depth {depth} is not a {arch} depth: {expected}")]
    InvalidDepth {
        arch: &'static str,
        depth: usize,
        expected: String,
    },
    #[error("alpha must be a finite number >= 0, got {0}")]
    InvalidAlpha(f64),
    #[error("num_classes must be at least 1")]
    NoClasses,
    #[error("shakedrop must be a probability in [0, 1], got {0}")]
    InvalidShakeDrop(f64),
    #[error("last_stride must be 1 or 2 (and 2 except for ImageNet ResNets), got {0}")]
    InvalidLastStride(usize),
}

/// Which network to build. `alpha` and `shakedrop` apply to PyramidNet only and `bottleneck`
/// to the CIFAR families only (ImageNet ResNets use bottlenecks from depth 50, as torchvision).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub depth: usize,
    pub alpha: f64,
    pub bottleneck: bool,
    /// ShakeDrop's drop probability at the last block (0 = off; 0.5 in the paper), decaying
    /// linearly to 0 towards the first.
    pub shakedrop: f64,
    pub num_classes: usize,
    /// The stride of an ImageNet ResNet's `layer4` (2 as torchvision; 1 for weakly-supervised
    /// localization, the paper's Section 4.2: a 14x14 last map at 224, the same weights).
    pub last_stride: usize,
}

/// A built network, ready to train or evaluate.
// A run holds one model: the size difference between variants costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model {
    ResNet(ResNet),
    PyramidNet(PyramidNet),
}

impl Model {
    /// The forward pass without stochastic regularisation (evaluation; also training when
    /// there is no ShakeDrop). BatchNorm uses batch statistics on an autodiff device in training
    /// mode and its running statistics otherwise.
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, h, w]` (normalised images)
    /// - output: `[batch, num_classes]` (logits)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            Self::ResNet(model) => model.forward(x),
            Self::PyramidNet(model) => model.forward(x),
        }
    }

    /// The last feature map (evaluation), which global average pooling and
    /// [`classifier`](Self::classifier) turn into the logits.
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, h, w]`
    /// - output: `[batch, channels, h', w']`
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::ResNet(model) => model.features(x),
            Self::PyramidNet(model) => model.features(x),
        }
    }

    /// The final linear layer (`fc`, weight `[channels, classes]` in Burn's layout).
    pub fn classifier(&self) -> &burn::nn::Linear {
        match self {
            Self::ResNet(model) => &model.fc,
            Self::PyramidNet(model) => &model.fc,
        }
    }

    /// The training forward pass: stochastic layers (ShakeDrop) draw from `rng`.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward).
    pub fn forward_train(&self, x: Tensor<4>, rng: &mut impl Rng) -> Tensor<2> {
        match self {
            Self::ResNet(model) => model.forward(x),
            Self::PyramidNet(model) => model.forward_train(x, rng),
        }
    }

    /// The training forward pass with `mix` applied to the feature map after stage `stage`
    /// (1-based: `layer1` .. `layer4`), for feature-level mixing; stochastic layers draw from
    /// `rng`.
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
        match self {
            Self::ResNet(model) => model.forward_mixed(x, stage, mix),
            Self::PyramidNet(model) => model.forward_train_mixed(x, stage, rng, mix),
        }
    }

    /// Number of stages (`layer1` .. `layerN`): 4 for ImageNet ResNets, 3 for CIFAR networks.
    pub fn num_stages(&self) -> usize {
        match self {
            Self::ResNet(model) => model.stages().len(),
            Self::PyramidNet(_) => 3,
        }
    }

    /// Multiply-accumulates per `[h, w]` image over convolutions and the classifier (what
    /// torchvision's tables call GFLOPS).
    pub fn macs(&self, hw: [usize; 2]) -> u64 {
        match self {
            Self::ResNet(model) => model.macs(hw),
            Self::PyramidNet(model) => model.macs(hw),
        }
    }
}

/// A named model of the zoo: the networks the paper and its baselines use.
#[derive(Clone, Debug)]
pub struct Variant {
    pub name: &'static str,
    pub config: ModelConfig,
    /// The input side the network is laid out for (224 ImageNet, 32 CIFAR).
    pub input_size: usize,
}

impl Variant {
    /// Every named model, smallest family first.
    pub fn all() -> Vec<Variant> {
        let resnet = |name, depth| Variant {
            name,
            config: ModelConfig {
                arch: Arch::ResNet,
                depth,
                alpha: 0.0,
                bottleneck: depth >= 50,
                shakedrop: 0.0,
                num_classes: 1000,
                last_stride: 2,
            },
            input_size: 224,
        };
        let cifar = |name, arch, depth, alpha, bottleneck, classes| Variant {
            name,
            config: ModelConfig {
                arch,
                depth,
                alpha,
                bottleneck,
                shakedrop: 0.0,
                num_classes: classes,
                last_stride: 2,
            },
            input_size: 32,
        };
        vec![
            resnet("resnet18", 18),
            resnet("resnet34", 34),
            resnet("resnet50", 50),
            resnet("resnet101", 101),
            resnet("resnet152", 152),
            Variant {
                name: "resnet18_cifar_stem",
                config: ModelConfig {
                    arch: Arch::ResNetCifarStem,
                    depth: 18,
                    alpha: 0.0,
                    bottleneck: false,
                    shakedrop: 0.0,
                    num_classes: 10,
                    last_stride: 2,
                },
                input_size: 32,
            },
            cifar("cifar_resnet20", Arch::CifarResNet, 20, 0.0, false, 10),
            cifar("cifar_resnet56", Arch::CifarResNet, 56, 0.0, false, 10),
            cifar("cifar_resnet110", Arch::CifarResNet, 110, 0.0, false, 10),
            cifar("cifar_resnet164", Arch::CifarResNet, 164, 0.0, true, 100),
            cifar("pyramidnet110_a48", Arch::PyramidNet, 110, 48.0, false, 100),
            cifar(
                "pyramidnet110_a270",
                Arch::PyramidNet,
                110,
                270.0,
                false,
                100,
            ),
            cifar(
                "pyramidnet164_a270",
                Arch::PyramidNet,
                164,
                270.0,
                true,
                100,
            ),
            cifar(
                "pyramidnet200_a240",
                Arch::PyramidNet,
                200,
                240.0,
                true,
                100,
            ),
            cifar(
                "pyramidnet272_a200",
                Arch::PyramidNet,
                272,
                200.0,
                true,
                100,
            ),
        ]
    }
}

/// torchvision's ImageNet ResNet table: blocks per stage and whether blocks are bottlenecks.
fn imagenet_resnet_table(depth: usize) -> Option<(&'static [usize], bool)> {
    match depth {
        18 => Some((&[2, 2, 2, 2], false)),
        34 => Some((&[3, 4, 6, 3], false)),
        50 => Some((&[3, 4, 6, 3], true)),
        101 => Some((&[3, 4, 23, 3], true)),
        152 => Some((&[3, 8, 36, 3], true)),
        _ => None,
    }
}

/// Blocks per stage of a CIFAR-style network: (depth - 2) / 6 for basic blocks, / 9 for
/// bottlenecks; the depth must fit exactly and give at least one block.
fn cifar_blocks_per_stage(depth: usize, bottleneck: bool) -> Option<usize> {
    let per_block = if bottleneck { 9 } else { 6 };
    (depth > 2 && (depth - 2).is_multiple_of(per_block)).then(|| (depth - 2) / per_block)
}

impl ModelConfig {
    /// Checks the description without building anything.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.num_classes == 0 {
            return Err(ModelError::NoClasses);
        }
        let strides: &[usize] = if self.arch == Arch::ResNet {
            &[1, 2]
        } else {
            &[2]
        };
        if !strides.contains(&self.last_stride) {
            return Err(ModelError::InvalidLastStride(self.last_stride));
        }
        match self.arch {
            Arch::ResNet | Arch::ResNetCifarStem => {
                if imagenet_resnet_table(self.depth).is_none() {
                    return Err(ModelError::InvalidDepth {
                        arch: if self.arch == Arch::ResNet {
                            "resnet"
                        } else {
                            "resnet_cifar_stem"
                        },
                        depth: self.depth,
                        expected: "one of 18, 34, 50, 101, 152".into(),
                    });
                }
            }
            Arch::CifarResNet | Arch::PyramidNet => {
                if cifar_blocks_per_stage(self.depth, self.bottleneck).is_none() {
                    let (form, examples) = if self.bottleneck {
                        ("9n+2 with bottleneck = true", "e.g. 164, 200, 272")
                    } else {
                        ("6n+2 with bottleneck = false", "e.g. 20, 56, 110")
                    };
                    return Err(ModelError::InvalidDepth {
                        arch: if self.arch == Arch::PyramidNet {
                            "pyramidnet"
                        } else {
                            "cifar_resnet"
                        },
                        depth: self.depth,
                        expected: format!("{form} ({examples})"),
                    });
                }
                if self.arch == Arch::PyramidNet && !(self.alpha.is_finite() && self.alpha >= 0.0) {
                    return Err(ModelError::InvalidAlpha(self.alpha));
                }
                if self.arch == Arch::PyramidNet && !(0.0..=1.0).contains(&self.shakedrop) {
                    return Err(ModelError::InvalidShakeDrop(self.shakedrop));
                }
            }
        }
        Ok(())
    }

    /// Builds the network on `device`, drawing every weight from `rng`.
    pub fn init(&self, rng: &mut impl Rng, device: &Device) -> Result<Model, ModelError> {
        self.validate()?;
        let classes = self.num_classes;
        Ok(match self.arch {
            Arch::ResNet | Arch::ResNetCifarStem => {
                let (blocks, bottleneck) =
                    imagenet_resnet_table(self.depth).expect("validated depth");
                Model::ResNet(ResNet::new(
                    Layout {
                        stem: if self.arch == Arch::ResNet {
                            Stem::ImageNet
                        } else {
                            Stem::SmallImage
                        },
                        blocks,
                        bottleneck,
                        last_stride: self.last_stride,
                    },
                    classes,
                    rng,
                    device,
                ))
            }
            Arch::CifarResNet => {
                let n = cifar_blocks_per_stage(self.depth, self.bottleneck).expect("validated");
                Model::ResNet(ResNet::new(
                    Layout {
                        stem: Stem::Cifar,
                        blocks: &[n, n, n],
                        bottleneck: self.bottleneck,
                        last_stride: 2,
                    },
                    classes,
                    rng,
                    device,
                ))
            }
            Arch::PyramidNet => {
                let n = cifar_blocks_per_stage(self.depth, self.bottleneck).expect("validated");
                Model::PyramidNet(PyramidNet::new(
                    n,
                    self.alpha,
                    self.bottleneck,
                    self.shakedrop,
                    classes,
                    rng,
                    device,
                ))
            }
        })
    }
}

/// Counts trainable parameters as PyTorch's `sum(p.numel() for p in model.parameters())` does:
/// BatchNorm running statistics are buffers, not parameters, and are left out.
pub fn count_params<M: Module>(module: &M) -> usize {
    struct Counter {
        path: Vec<String>,
        count: usize,
    }
    impl ModuleVisitor for Counter {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let is_buffer = matches!(
                self.path.last().map(String::as_str),
                Some("running_mean" | "running_var")
            );
            if !is_buffer {
                self.count += param.lazy_shape().num_elements();
            }
        }
    }
    let mut counter = Counter {
        path: Vec::new(),
        count: 0,
    };
    module.visit(&mut counter);
    counter.count
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn params(arch: Arch, depth: usize, alpha: f64, bottleneck: bool, classes: usize) -> usize {
        let config = ModelConfig {
            arch,
            depth,
            alpha,
            bottleneck,
            shakedrop: 0.0,
            num_classes: classes,
            last_stride: 2,
        };
        let model = config
            .init(&mut StdRng::seed_from_u64(0), &Device::flex())
            .unwrap();
        count_params(&model)
    }

    #[test]
    fn pyramidnet_200_alpha_240_has_the_reference_parameter_count() {
        assert_eq!(params(Arch::PyramidNet, 200, 240.0, true, 100), 26_844_952);
        assert_eq!(params(Arch::PyramidNet, 200, 240.0, true, 10), 26_752_702);
    }

    #[test]
    fn imagenet_resnets_have_torchvisions_parameter_counts() {
        assert_eq!(params(Arch::ResNet, 18, 0.0, false, 1000), 11_689_512);
        assert_eq!(params(Arch::ResNet, 34, 0.0, false, 1000), 21_797_672);
        assert_eq!(params(Arch::ResNet, 50, 0.0, false, 1000), 25_557_032);
        assert_eq!(params(Arch::ResNet, 101, 0.0, false, 1000), 44_549_160);
        assert_eq!(params(Arch::ResNet, 152, 0.0, false, 1000), 60_192_808);
        // pytorch-cifar's ResNet18 (kuangliu): 11,173,962 parameters at 10 classes.
        assert_eq!(
            params(Arch::ResNetCifarStem, 18, 0.0, false, 10),
            11_173_962
        );
    }

    #[test]
    fn multiply_accumulates_match_torchvisions_tables() {
        let macs = |depth| {
            let config = ModelConfig {
                arch: Arch::ResNet,
                depth,
                alpha: 0.0,
                bottleneck: false,
                shakedrop: 0.0,
                num_classes: 1000,
                last_stride: 2,
            };
            let model = config
                .init(&mut StdRng::seed_from_u64(0), &Device::flex())
                .unwrap();
            model.macs([224, 224])
        };
        // torchvision's model tables: 1.81, 4.09 and 7.80 "GFLOPS"; exact values from PyTorch
        // forward hooks over Conv2d and Linear (scripts/check_torch_interop.py counts the same).
        assert_eq!(macs(18), 1_814_073_344);
        assert_eq!(macs(50), 4_089_184_256);
        assert_eq!(macs(101), 7_801_405_440);
    }

    #[test]
    fn mixing_after_a_stage_sees_that_stages_features_and_identity_changes_nothing() {
        let device = Device::flex();
        for (arch, depth, stage, expected) in [
            (Arch::ResNet, 18, 2, [2, 128, 8, 8]),
            (Arch::CifarResNet, 8, 3, [2, 64, 8, 8]),
            (Arch::PyramidNet, 8, 1, [2, 16, 32, 32]),
        ] {
            let config = ModelConfig {
                arch,
                depth,
                alpha: 0.0,
                bottleneck: false,
                shakedrop: 0.0,
                num_classes: 5,
                last_stride: 2,
            };
            let model = config.init(&mut StdRng::seed_from_u64(2), &device).unwrap();
            let side = if arch == Arch::ResNet { 64 } else { 32 };
            let x = Tensor::<4>::ones([2, 3, side, side], &device);
            let mut seen = None;
            let mixed = model.forward_train_mixed(
                x.clone(),
                stage,
                &mut StdRng::seed_from_u64(0),
                &mut |features| {
                    seen = Some(features.dims());
                    features
                },
            );
            assert_eq!(seen, Some(expected), "{arch:?}");
            let plain = model.forward(x);
            mixed.into_data().assert_eq(&plain.into_data(), true);
        }
    }

    #[test]
    fn every_named_variant_builds_and_validates() {
        let names: Vec<&str> = Variant::all().iter().map(|v| v.name).collect();
        assert!(names.contains(&"pyramidnet200_a240") && names.contains(&"resnet50"));
        for variant in Variant::all() {
            variant.config.validate().unwrap();
        }
    }

    #[test]
    fn cifar_resnet_20_has_the_option_b_parameter_count() {
        // 0.27M for the 6n+2 network with projection shortcuts (conv1x1 + BN) at the two
        // stage changes: 16*32 + 2*32 and 32*64 + 2*64 beyond the option-A count of 269,722.
        assert_eq!(
            params(Arch::CifarResNet, 20, 0.0, false, 10),
            269_722 + 576 + 2_176
        );
    }

    #[test]
    fn invalid_depths_are_rejected_with_the_rule() {
        let config = ModelConfig {
            arch: Arch::PyramidNet,
            depth: 201,
            alpha: 240.0,
            bottleneck: true,
            shakedrop: 0.0,
            num_classes: 100,
            last_stride: 2,
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("9n+2"), "{error}");
        let resnet = ModelConfig {
            arch: Arch::ResNet,
            depth: 20,
            ..config
        };
        assert!(resnet.validate().is_err());
    }

    #[test]
    fn forward_gives_one_row_of_logits_per_image() {
        let device = Device::flex();
        for (arch, depth, bottleneck) in [
            (Arch::CifarResNet, 8, false),
            (Arch::CifarResNet, 11, true),
            (Arch::PyramidNet, 8, false),
            (Arch::PyramidNet, 11, true),
        ] {
            let config = ModelConfig {
                arch,
                depth,
                alpha: 12.0,
                bottleneck,
                shakedrop: 0.5,
                num_classes: 7,
                last_stride: 2,
            };
            let model = config.init(&mut StdRng::seed_from_u64(1), &device).unwrap();
            let logits = model.forward(Tensor::zeros([2, 3, 32, 32], &device));
            assert_eq!(logits.dims(), [2, 7]);
        }
    }

    /// `last_stride = 1` keeps every parameter (so torchvision's weights load unchanged) and
    /// doubles the last feature map's side; other families refuse it, naming the key's value.
    #[test]
    fn last_stride_one_doubles_the_last_map_and_keeps_the_parameters() {
        let device = Device::flex();
        let config = |last_stride| ModelConfig {
            arch: Arch::ResNet,
            depth: 18,
            alpha: 0.0,
            bottleneck: false,
            shakedrop: 0.0,
            num_classes: 5,
            last_stride,
        };
        let build = |last_stride| {
            config(last_stride)
                .init(&mut StdRng::seed_from_u64(1), &device)
                .unwrap()
        };
        let (usual, wsol) = (build(2), build(1));
        assert_eq!(usual.num_params(), wsol.num_params());
        let x = || Tensor::<4>::zeros([1, 3, 64, 64], &device);
        assert_eq!(usual.features(x()).dims(), [1, 512, 2, 2]);
        assert_eq!(wsol.features(x()).dims(), [1, 512, 4, 4]);
        assert_eq!(wsol.forward(x()).dims(), [1, 5]);
        assert_eq!(config(3).validate(), Err(ModelError::InvalidLastStride(3)));
        let cifar = ModelConfig {
            arch: Arch::CifarResNet,
            depth: 8,
            ..config(1)
        };
        assert_eq!(cifar.validate(), Err(ModelError::InvalidLastStride(1)));
    }
}
