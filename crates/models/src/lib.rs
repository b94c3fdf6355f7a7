//! Image classifiers for the CutMix recipes: ResNet (torchvision layout, ImageNet and CIFAR
//! stems) and PyramidNet (the CutMix reference's `pyramidnet.py`), built from a [`ModelConfig`].
//!
//! Architectures are data (depth tables, widening rules); every weight is drawn from a host-side
//! generator the caller seeds, so the same seed gives the same network on every backend.

mod init;
mod pyramidnet;
mod registry;
mod resnet;

pub use pyramidnet::{PyramidBlock, PyramidNet};
pub use registry::{Arch, Model, ModelConfig, ModelError, count_params};
pub use resnet::{ResNet, ResidualBlock};
