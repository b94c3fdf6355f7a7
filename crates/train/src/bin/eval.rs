//! `eval`: evaluates a weights file on a config's validation split and prints one JSON line,
//! `{"loss": .., "top1_err": .., "top5_err": .., "images": ..}` (errors in percent).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use burn::module::Module;
use clap::Parser;

use cutmix_models::{HostData, HostTensor, write_safetensors};
use cutmix_train::backend;
use cutmix_train::config::{BackendChoice, Config};
use cutmix_train::datasets;
use cutmix_train::trainer::{evaluate, images_tensor};
use cutmix_train::weights;

/// Evaluate weights on the validation split of a recipe.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The recipe whose model and validation data to use.
    #[arg(long)]
    config: PathBuf,
    /// Weights: safetensors or PyTorch (PyTorch names), or a run's model.bpk.
    #[arg(long)]
    weights: PathBuf,
    /// Overrides any config key by its dotted path (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Overrides the config's `backend`.
    #[arg(long, value_enum)]
    backend: Option<BackendChoice>,
    /// Also writes the first validation batch as fed to the model (`input`, NCHW f32) and its
    /// logits (`logits`) to this safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    dump: Option<PathBuf>,
}

fn run(args: Args) -> Result<()> {
    let mut config = Config::load(&args.config, &args.sets)?;
    if let Some(backend) = args.backend {
        config.backend = backend;
    }
    let backend = backend::select(config.backend)?;
    let num_classes = config.model.num_classes;
    let model = weights::load_for(&config, &backend.device, &args.weights)?;
    let val = datasets::build_val(&config)?;
    let model = model.valid();
    if let Some(path) = &args.dump {
        let batch = val
            .epoch(0)
            .next()
            .context("the validation split is empty")??;
        let (images, _) = images_tensor(batch, &backend.device);
        let logits = model.forward(images.clone());
        let host = |tensor: burn::tensor::TensorData| HostTensor {
            shape: tensor.shape().to_vec(),
            data: HostData::F32(tensor.try_into_vec_as::<f32>().expect("f32 tensors")),
        };
        let tensors = vec![
            ("input".to_string(), host(images.into_data())),
            ("logits".to_string(), host(logits.into_data())),
        ];
        write_safetensors(path, &tensors, HashMap::new())?;
        eprintln!(
            "wrote the first validation batch and its logits to {}",
            path.display()
        );
    }
    let tally = evaluate(&model, &val, num_classes, &backend.device)?;
    for line in tally.skipped_report("validation") {
        eprintln!("{line}");
    }
    println!(
        "{}",
        serde_json::json!({
            "loss": tally.loss(),
            "top1_err": tally.top1_err(),
            "top5_err": tally.top5_err(),
            "images": tally.images,
        })
    );
    Ok(())
}

fn main() -> ExitCode {
    cutmix_train::backend::quiet_mesa();
    cutmix_train::backend::keep_freed_memory();
    match run(cutmix_train::cli::parse::<Args>()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
