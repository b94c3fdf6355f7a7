//! Image classifiers for the CutMix recipes: ResNet (torchvision layout, ImageNet and CIFAR
//! stems) and PyramidNet with optional ShakeDrop (the CutMix reference's `pyramidnet.py`), built
//! from a [`ModelConfig`], with their weights under PyTorch's names in safetensors, PyTorch and
//! burnpack files. Architectures are data (depth tables, widening rules); every weight is drawn
//! from a host-side generator the caller seeds, so a seed means one network on every backend.

mod cost;
mod init;
mod pyramidnet;
mod registry;
mod resnet;
mod shakedrop;
mod state_dict;
mod weights_file;

pub use pyramidnet::{PyramidBlock, PyramidNet};
pub use registry::{Arch, Model, ModelConfig, ModelError, Variant, count_params};
pub use resnet::{ResNet, ResidualBlock};
pub use shakedrop::ShakeDrop;
pub use state_dict::{
    HostData, HostTensor, LoadError, LoadSummary, StateDict, burn_paths_to_torch, load_state_dict,
    param_names, state_dict,
};
pub use weights_file::{WeightsError, WeightsFormat, read_weights, write_safetensors};
