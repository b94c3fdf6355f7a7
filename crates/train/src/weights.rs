//! Weights in and out of a run: loading a weights file into a model (fine-tuning, `eval`) and
//! exporting a run's checkpoint under PyTorch's names (`export`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::tensor::Device;

use cutmix_data::{Stream, keyed_rng};
use cutmix_models::{
    LoadSummary, Model, WeightsFormat, burn_paths_to_torch, load_state_dict, read_weights,
    state_dict, write_safetensors,
};

use crate::checkpoint::{self, TrainState};
use crate::config::Config;

/// The classifier's name prefix: re-initialised when the number of classes differs.
const CLASSIFIER: &str = "fc.";

/// Loads a weights file (safetensors or PyTorch under PyTorch's names, or one of this project's
/// burnpacks) into `model`. A classifier of another shape keeps its fresh initialisation; any
/// other difference is an error naming the file and the tensor.
pub fn load(model: Model, path: &Path) -> Result<(Model, LoadSummary)> {
    load_keeping(model, path, true)
}

/// [`load`] without the file's classifier, which keeps its fresh initialisation whatever its
/// shape (`model.reinit_classifier`: fine-tuning on the same classes with a new classifier,
/// as the paper's ImageNet localization recipe does).
pub fn load_backbone(model: Model, path: &Path) -> Result<(Model, LoadSummary)> {
    load_keeping(model, path, false)
}

fn load_keeping(model: Model, path: &Path, classifier: bool) -> Result<(Model, LoadSummary)> {
    let (format, tensors) = read_weights(path)?;
    let mut tensors = match format {
        WeightsFormat::Burnpack => burn_paths_to_torch(&model, tensors),
        WeightsFormat::Safetensors | WeightsFormat::Pytorch => tensors,
    };
    let mut dropped = std::collections::HashMap::new();
    if !classifier {
        tensors.retain(|name, tensor| {
            let keep = !name.starts_with(CLASSIFIER);
            if !keep {
                dropped.insert(name.clone(), tensor.shape.clone());
            }
            keep
        });
    }
    let (model, mut summary) = load_state_dict(model, &tensors, CLASSIFIER)
        .with_context(|| format!("{}", path.display()))?;
    for (name, file_shape, _) in &mut summary.reinitialised {
        if let Some(shape) = dropped.get(name) {
            file_shape.clone_from(shape);
        }
    }
    Ok((model, summary))
}

/// `config`'s model on `device` with the weights of `path`, whose classifier must fit
/// `model.num_classes` (what `eval`, `localize` and `analyze` take); the summary goes to
/// stderr.
pub fn load_for(
    config: &crate::config::Config,
    device: &burn::tensor::Device,
    path: &Path,
) -> Result<Model> {
    let model_config = config.model_config()?;
    let mut rng = cutmix_data::keyed_rng(config.seed, cutmix_data::Stream::Init, 0, 0);
    let model = model_config.init(&mut rng, device)?;
    let (model, summary) = load(model, path)?;
    if !summary.reinitialised.is_empty() {
        anyhow::bail!(
            "{}: the classifier does not fit model.num_classes = {} ({summary}); set model.num_classes to the file's",
            path.display(),
            model_config.num_classes
        );
    }
    eprintln!("{}: {summary}", path.display());
    Ok(model)
}

/// Which checkpoint of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Best,
    Last,
}

impl Which {
    fn folder(self) -> &'static str {
        match self {
            Which::Best => "best",
            Which::Last => "last",
        }
    }
}

/// A run's model as one of its checkpoints holds it, on `device`, with the run's config and
/// training state.
pub fn load_run(
    run: &Path,
    which: Which,
    average: bool,
    device: &Device,
) -> Result<(Config, Model, TrainState)> {
    let config_path = run.join("config.toml");
    if !config_path.is_file() {
        bail!(
            "{} is not a run folder: it has no config.toml",
            run.display()
        );
    }
    let config = Config::load(&config_path, &[])?;
    let checkpoint = run.join("checkpoints").join(which.folder());
    if average && checkpoint.join("model.bpk").is_file() && !checkpoint.join("ema.bpk").is_file() {
        bail!(
            "{} has no moving average of the weights (ema.bpk): the run was trained without train.ema_decay",
            checkpoint.display()
        );
    }
    let weights = checkpoint.join(if average { "ema.bpk" } else { "model.bpk" });
    if !weights.is_file() {
        bail!(
            "{} has no {} checkpoint yet ({} is missing)",
            run.display(),
            which.folder(),
            weights.display()
        );
    }
    let state = checkpoint::read_state(&checkpoint)?;
    let mut rng = keyed_rng(config.seed, Stream::Init, 0, 0);
    let model = config.model_config()?.init(&mut rng, device)?;
    let model = model
        .try_load_file(&weights)
        .map_err(|e| anyhow!("{}: not this run's model: {e}", weights.display()))?;
    Ok((config, model, state))
}

/// Writes a run's checkpoint to `out` as safetensors under PyTorch's names and layouts
/// (torchvision's for ResNets, the reference's for PyramidNets), BatchNorm's
/// `num_batches_tracked` included, with the architecture in the file's metadata. Returns the
/// number of tensors written.
pub fn export(run: &Path, which: Which, average: bool, out: &Path) -> Result<usize> {
    let (config, model, state) = load_run(run, which, average, &Device::flex())?;
    let tensors = state_dict(&model, state.step as i64);
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("arch".to_string(), config.model.arch.clone()),
        ("depth".to_string(), config.model.depth.to_string()),
        ("alpha".to_string(), config.model.alpha.to_string()),
        (
            "bottleneck".to_string(),
            config.model.bottleneck.to_string(),
        ),
        (
            "num_classes".to_string(),
            config.model.num_classes.to_string(),
        ),
        ("epoch".to_string(), state.epoch.to_string()),
        (
            "weights".to_string(),
            if average { "ema" } else { "raw" }.to_string(),
        ),
        ("run".to_string(), run.display().to_string()),
    ]);
    write_safetensors(out, &tensors, metadata)?;
    Ok(tensors.len())
}

/// Where `export` writes when `--out` is not given: `<run>/export-<which>.safetensors`.
pub fn default_export_path(run: &Path, which: Which, average: bool) -> PathBuf {
    let ema = if average { "-ema" } else { "" };
    run.join(format!("export-{}{ema}.safetensors", which.folder()))
}
