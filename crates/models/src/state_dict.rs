//! A model's tensors under PyTorch's names and layouts (torchvision's for ResNets, the CutMix
//! reference's `pyramidnet.py` for PyramidNets), and loading such tensors back into a model.
//!
//! Burn and PyTorch differ in three places: BatchNorm's `gamma`/`beta` are PyTorch's
//! `weight`/`bias`, a Linear weight is stored `[in, out]` in Burn and `[out, in]` in PyTorch,
//! and PyTorch's BatchNorm has a `num_batches_tracked` buffer. Every other name is the module
//! path itself (`layer1.0.downsample.0.weight`), without the [`Model`](crate::Model) variant.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};

use crate::registry::Model;

/// A tensor on the host, in PyTorch's layout.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// The values of a [`HostTensor`]: floats, or integers (BatchNorm's `num_batches_tracked`).
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Tensors by PyTorch name, sorted.
pub type StateDict = BTreeMap<String, HostTensor>;

/// Where one model tensor sits under both naming schemes.
#[derive(Clone, Debug)]
struct Entry {
    /// Burn's module path, with the model variant (`ResNet.layer1.0.bn1.gamma`).
    burn_path: String,
    /// PyTorch's name (`layer1.0.bn1.weight`).
    torch_name: String,
    /// Linear weights are transposed between the two.
    transposed: bool,
    /// Shape in PyTorch's layout.
    shape: Vec<usize>,
    /// The BatchNorm this tensor belongs to, if it is a BatchNorm's running variance (the
    /// point where PyTorch's `num_batches_tracked` follows).
    batch_norm_end: Option<String>,
}

/// Tracks the module path while a visitor or mapper walks the model.
#[derive(Default)]
struct PathTracker {
    /// (name, container type) from the root down.
    stack: Vec<(String, String)>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container: &str) {
        self.stack.push((name.to_string(), container.to_string()));
    }

    fn exit(&mut self) {
        self.stack.pop();
    }

    fn burn_path(&self) -> String {
        let names: Vec<&str> = self.stack.iter().map(|(name, _)| name.as_str()).collect();
        names.join(".")
    }

    fn entry(&self, dims: &[usize]) -> Entry {
        let (leaf, container) = self.stack.last().cloned().unwrap_or_default();
        let mut parts: Vec<String> = self
            .stack
            .iter()
            .filter(|(_, container)| !container.starts_with("Enum:"))
            .map(|(name, _)| name.clone())
            .collect();
        let batch_norm = container == "Struct:BatchNorm";
        if batch_norm && let Some(last) = parts.last_mut() {
            match leaf.as_str() {
                "gamma" => *last = "weight".into(),
                "beta" => *last = "bias".into(),
                _ => {}
            }
        }
        let transposed = container == "Struct:Linear" && leaf == "weight" && dims.len() == 2;
        let shape = if transposed {
            vec![dims[1], dims[0]]
        } else {
            dims.to_vec()
        };
        let batch_norm_end =
            (batch_norm && leaf == "running_var").then(|| parts[..parts.len() - 1].join("."));
        Entry {
            burn_path: self.burn_path(),
            torch_name: parts.join("."),
            transposed,
            shape,
            batch_norm_end,
        }
    }
}

/// Lists the model's tensors in visiting order.
fn entries(model: &Model) -> Vec<Entry> {
    entries_with_ids(model)
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

/// The model's tensors with their parameter ids, in visiting order.
fn entries_with_ids(model: &Model) -> Vec<(ParamId, Entry)> {
    struct Lister {
        path: PathTracker,
        entries: Vec<(ParamId, Entry)>,
    }
    impl ModuleVisitor for Lister {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dims = param.lazy_shape().to_vec();
            self.entries.push((param.id, self.path.entry(&dims)));
        }
    }
    let mut lister = Lister {
        path: PathTracker::default(),
        entries: Vec::new(),
    };
    model.visit(&mut lister);
    lister.entries
}

/// Swaps the two axes of a row-major matrix.
fn transpose(shape: &[usize], data: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (rows, cols) = (shape[0], shape[1]);
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    (vec![cols, rows], out)
}

/// The model's tensors under PyTorch's names and layouts, with each BatchNorm's
/// `num_batches_tracked` set to `batches_tracked` (the optimiser steps taken), in the order
/// PyTorch's `state_dict()` lists them.
pub fn state_dict(model: &Model, batches_tracked: i64) -> Vec<(String, HostTensor)> {
    struct Reader {
        path: PathTracker,
        out: Vec<(String, HostTensor)>,
        batches_tracked: i64,
    }
    impl ModuleVisitor for Reader {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = param.val();
            let dims = tensor.dims().to_vec();
            let entry = self.path.entry(&dims);
            let data = tensor
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("float parameters");
            let data = if entry.transposed {
                transpose(&dims, &data).1
            } else {
                data
            };
            self.out.push((
                entry.torch_name,
                HostTensor {
                    shape: entry.shape,
                    data: HostData::F32(data),
                },
            ));
            if let Some(batch_norm) = entry.batch_norm_end {
                self.out.push((
                    format!("{batch_norm}.num_batches_tracked"),
                    HostTensor {
                        shape: Vec::new(),
                        data: HostData::I64(vec![self.batches_tracked]),
                    },
                ));
            }
        }
    }
    let mut reader = Reader {
        path: PathTracker::default(),
        out: Vec::new(),
        batches_tracked,
    };
    model.visit(&mut reader);
    reader.out
}

/// Every parameter's id with its PyTorch name and whether Burn stores it transposed (a Linear
/// weight), in visiting order: names for what is kept per parameter id, as an optimiser's
/// momentum buffers.
pub fn param_names(model: &Model) -> Vec<(ParamId, String, bool)> {
    entries_with_ids(model)
        .into_iter()
        .map(|(id, entry)| (id, entry.torch_name, entry.transposed))
        .collect()
}

/// Renames tensors saved under Burn's module paths (a `.bpk` checkpoint) to PyTorch's names
/// and layouts, using `model`'s structure to tell which path is which. Paths the model does not
/// have keep their names (and are then reported unused).
pub fn burn_paths_to_torch(model: &Model, tensors: StateDict) -> StateDict {
    let mut by_path: HashMap<String, Entry> = HashMap::new();
    for entry in entries(model) {
        // Accept the path with and without the model variant in front.
        let without_variant = entry
            .burn_path
            .split_once('.')
            .map(|(_, rest)| rest.to_string());
        if let Some(short) = without_variant {
            by_path.insert(short, entry.clone());
        }
        by_path.insert(entry.burn_path.clone(), entry);
    }
    tensors
        .into_iter()
        .map(|(name, tensor)| match by_path.get(&name) {
            Some(entry) => {
                let tensor = match (&tensor.data, entry.transposed && tensor.shape.len() == 2) {
                    (HostData::F32(data), true) => {
                        let (shape, data) = transpose(&tensor.shape, data);
                        HostTensor {
                            shape,
                            data: HostData::F32(data),
                        }
                    }
                    _ => tensor,
                };
                (entry.torch_name.clone(), tensor)
            }
            None => (name, tensor),
        })
        .collect()
}

/// What [`load_state_dict`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSummary {
    /// Tensors taken from the file.
    pub loaded: usize,
    /// Classifier tensors kept at their fresh initialisation, with the file's shape and the
    /// model's (a different number of classes).
    pub reinitialised: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensors in the file the model has no place for (`num_batches_tracked` aside).
    pub unused: Vec<String>,
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loaded {} tensors", self.loaded)?;
        if self.reinitialised.is_empty() {
            write!(f, ", re-initialised none")?;
        } else {
            let names: Vec<String> = self
                .reinitialised
                .iter()
                .map(|(name, file, model)| format!("{name} ({file:?} in the file, {model:?} here)"))
                .collect();
            write!(f, ", re-initialised {}", names.join(", "))?;
        }
        if self.unused.is_empty() {
            write!(f, ", unused none")
        } else {
            let shown: Vec<&str> = self.unused.iter().take(8).map(String::as_str).collect();
            let more = self.unused.len().saturating_sub(shown.len());
            write!(f, ", unused {} ({}", self.unused.len(), shown.join(", "))?;
            if more > 0 {
                write!(f, ", ...")?;
            }
            write!(f, ")")
        }
    }
}

/// Why a state dict does not fit a model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoadError {
    #[error(
        "tensor {name} has shape {file:?} in the file but {model:?} in this model: the file is for another architecture or depth"
    )]
    ShapeMismatch {
        name: String,
        file: Vec<usize>,
        model: Vec<usize>,
    },
    #[error(
        "{missing} of the model's {total} tensors are not in the file (first: {}){}: the file is for another architecture, or its names are not PyTorch's",
        first.join(", "),
        similar.as_ref().map(|s| format!("; the file has e.g. {s}")).unwrap_or_default()
    )]
    Missing {
        missing: usize,
        total: usize,
        first: Vec<String>,
        similar: Option<String>,
    },
    #[error("tensor {0} holds integers, not floats")]
    NotFloat(String),
}

/// Loads `tensors` (PyTorch names and layouts) into `model`. Every tensor must be present with
/// its shape, except the classifier's (`classifier` is its name prefix, `fc.`): a classifier of
/// another shape or a missing one keeps its fresh initialisation, for fine-tuning on a new
/// number of classes.
pub fn load_state_dict(
    model: Model,
    tensors: &StateDict,
    classifier: &str,
) -> Result<(Model, LoadSummary), LoadError> {
    let entries = entries(&model);
    let mut summary = LoadSummary::default();
    let mut replacements: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    let mut missing = Vec::new();
    for entry in &entries {
        let is_classifier = entry.torch_name.starts_with(classifier);
        match tensors.get(&entry.torch_name) {
            Some(tensor) if tensor.shape == entry.shape => {
                let HostData::F32(data) = &tensor.data else {
                    return Err(LoadError::NotFloat(entry.torch_name.clone()));
                };
                let (shape, data) = if entry.transposed {
                    transpose(&tensor.shape, data)
                } else {
                    (tensor.shape.clone(), data.clone())
                };
                replacements.insert(entry.burn_path.clone(), (shape, data));
                summary.loaded += 1;
            }
            Some(tensor) if is_classifier => summary.reinitialised.push((
                entry.torch_name.clone(),
                tensor.shape.clone(),
                entry.shape.clone(),
            )),
            Some(tensor) => {
                return Err(LoadError::ShapeMismatch {
                    name: entry.torch_name.clone(),
                    file: tensor.shape.clone(),
                    model: entry.shape.clone(),
                });
            }
            None if is_classifier => summary.reinitialised.push((
                entry.torch_name.clone(),
                Vec::new(),
                entry.shape.clone(),
            )),
            None => missing.push(entry.torch_name.clone()),
        }
    }
    let known: std::collections::HashSet<&str> =
        entries.iter().map(|e| e.torch_name.as_str()).collect();
    summary.unused = tensors
        .keys()
        .filter(|name| !known.contains(name.as_str()) && !name.ends_with(".num_batches_tracked"))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(LoadError::Missing {
            missing: missing.len(),
            total: entries.len(),
            first: missing.into_iter().take(3).collect(),
            similar: summary.unused.first().cloned(),
        });
    }

    struct Replacer {
        path: PathTracker,
        replacements: HashMap<String, (Vec<usize>, Vec<f32>)>,
    }
    impl ModuleMapper for Replacer {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            match self.replacements.remove(&self.path.burn_path()) {
                Some((shape, data)) => param.map(|old| {
                    let require_grad = old.is_require_grad();
                    Tensor::from_data(TensorData::new(data, shape), &old.device())
                        .set_require_grad(require_grad)
                }),
                None => param,
            }
        }
    }
    let mut replacer = Replacer {
        path: PathTracker::default(),
        replacements,
    };
    let model = model.map(&mut replacer);
    Ok((model, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Arch, ModelConfig};
    use burn::tensor::Device;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn model(arch: Arch, depth: usize, classes: usize, seed: u64) -> Model {
        ModelConfig {
            arch,
            depth,
            alpha: 12.0,
            bottleneck: false,
            shakedrop: 0.0,
            num_classes: classes,
            last_stride: 2,
        }
        .init(&mut StdRng::seed_from_u64(seed), &Device::flex())
        .unwrap()
    }

    fn logits(model: &Model) -> Vec<f32> {
        let device = Device::flex();
        let x = Tensor::<4>::from_data(
            TensorData::new(
                (0..2 * 3 * 32 * 32)
                    .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                    .collect::<Vec<f32>>(),
                [2, 3, 32, 32],
            ),
            &device,
        );
        model
            .valid()
            .forward(x)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    }

    #[test]
    fn resnet_18_names_are_torchvisions() {
        let names: Vec<String> = state_dict(&model(Arch::ResNet, 18, 10, 0), 0)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        // torchvision's resnet18().state_dict() has 122 entries, beginning and ending so.
        assert_eq!(names.len(), 122);
        assert_eq!(
            &names[..6],
            [
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var",
                "bn1.num_batches_tracked"
            ]
        );
        assert!(names.contains(&"layer2.0.downsample.0.weight".to_string()));
        assert!(names.contains(&"layer2.0.downsample.1.running_var".to_string()));
        assert_eq!(&names[120..], ["fc.weight", "fc.bias"]);
    }

    #[test]
    fn linear_weights_are_out_by_in() {
        let dict: StateDict = state_dict(&model(Arch::ResNet, 18, 10, 0), 0)
            .into_iter()
            .collect();
        assert_eq!(dict["fc.weight"].shape, vec![10, 512]);
        assert_eq!(dict["conv1.weight"].shape, vec![64, 3, 7, 7]);
    }

    #[test]
    fn a_state_dict_round_trips_into_a_fresh_model() {
        let source = model(Arch::PyramidNet, 8, 10, 1);
        let dict: StateDict = state_dict(&source, 5).into_iter().collect();
        let (loaded, summary) =
            load_state_dict(model(Arch::PyramidNet, 8, 10, 2), &dict, "fc.").unwrap();
        assert!(summary.reinitialised.is_empty() && summary.unused.is_empty());
        assert_eq!(logits(&loaded), logits(&source));
        assert_ne!(logits(&model(Arch::PyramidNet, 8, 10, 2)), logits(&source));
    }

    #[test]
    fn a_new_number_of_classes_reinitialises_the_classifier_only() {
        let dict: StateDict = state_dict(&model(Arch::CifarResNet, 8, 10, 1), 0)
            .into_iter()
            .collect();
        let fresh = model(Arch::CifarResNet, 8, 4, 2);
        let fresh_fc = state_dict(&fresh, 0)
            .into_iter()
            .find(|(name, _)| name == "fc.weight")
            .unwrap();
        let (loaded, summary) = load_state_dict(fresh, &dict, "fc.").unwrap();
        let names: Vec<&str> = summary
            .reinitialised
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect();
        assert_eq!(names, ["fc.weight", "fc.bias"]);
        assert_eq!(summary.loaded, dict.len() - 2 - 9); // less fc and 9 num_batches_tracked
        let after: StateDict = state_dict(&loaded, 0).into_iter().collect();
        assert_eq!(after["fc.weight"], fresh_fc.1);
        assert_eq!(after["conv1.weight"], dict["conv1.weight"]);
    }

    #[test]
    fn another_architecture_is_refused_with_the_tensor_named() {
        let dict: StateDict = state_dict(&model(Arch::CifarResNet, 8, 10, 1), 0)
            .into_iter()
            .collect();
        let error = load_state_dict(model(Arch::ResNet, 18, 10, 1), &dict, "fc.").unwrap_err();
        assert!(error.to_string().contains("conv1.weight"), "{error}");
        let error = load_state_dict(model(Arch::PyramidNet, 8, 10, 1), &dict, "fc.").unwrap_err();
        assert!(matches!(
            error,
            LoadError::Missing { .. } | LoadError::ShapeMismatch { .. }
        ));
    }

    #[test]
    fn burn_paths_map_to_torch_names() {
        let source = model(Arch::CifarResNet, 8, 10, 3);
        let torch: StateDict = state_dict(&source, 0).into_iter().collect();
        // The same tensors as a burnpack would name them: variant first, gamma/beta, [in, out].
        let mut burn = StateDict::new();
        for entry in entries(&source) {
            let tensor = &torch[&entry.torch_name];
            let tensor = match (&tensor.data, entry.transposed) {
                (HostData::F32(data), true) => {
                    let (shape, data) = transpose(&tensor.shape, data);
                    HostTensor {
                        shape,
                        data: HostData::F32(data),
                    }
                }
                _ => tensor.clone(),
            };
            burn.insert(entry.burn_path, tensor);
        }
        assert!(burn.contains_key("ResNet.bn1.gamma"));
        let renamed = burn_paths_to_torch(&source, burn);
        let (loaded, summary) =
            load_state_dict(model(Arch::CifarResNet, 8, 10, 4), &renamed, "fc.").unwrap();
        assert!(summary.unused.is_empty());
        assert_eq!(logits(&loaded), logits(&source));
    }
}
