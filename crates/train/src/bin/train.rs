//! `train`: runs a training recipe from a TOML config.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::Context;
use burn::tensor::Device;
use clap::Parser;
use rand::SeedableRng;
use rand::rngs::StdRng;

use cutmix_models::{Arch, Variant, count_params};
use cutmix_train::backend;
use cutmix_train::config::{BackendChoice, Config};
use cutmix_train::trainer::{self, RunOptions};

/// Train an image classifier with CutMix from a TOML recipe.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The recipe, e.g. configs/cifar100_cutmix.toml.
    #[arg(long, required_unless_present = "list_models")]
    config: Option<PathBuf>,
    /// Overrides the config's `backend`.
    #[arg(long, value_enum)]
    backend: Option<BackendChoice>,
    /// Overrides any config key by its dotted path, e.g. --set train.epochs=1 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continues the run folder <output_dir>/<name> from its newest complete checkpoint.
    #[arg(long)]
    resume: bool,
    /// Lists the model zoo with parameter counts and multiply-accumulates per image, and exits.
    #[arg(long)]
    list_models: bool,
}

/// Prints every named model with the `[model]` keys that build it.
fn list_models() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:>12} {:>9} {:>6} {:>8}  [model] keys",
        "name", "parameters", "GMACs", "input", "classes"
    )?;
    let device = Device::flex();
    for variant in Variant::all() {
        let config = &variant.config;
        let model = config
            .init(&mut StdRng::seed_from_u64(0), &device)
            .expect("the zoo's configs are valid");
        let macs = model.macs([variant.input_size; 2]);
        let keys = match config.arch {
            Arch::ResNet => format!("arch=\"resnet\" depth={}", config.depth),
            Arch::ResNetCifarStem => {
                format!("arch=\"resnet_cifar_stem\" depth={}", config.depth)
            }
            Arch::CifarResNet => format!(
                "arch=\"cifar_resnet\" depth={} bottleneck={}",
                config.depth, config.bottleneck
            ),
            Arch::PyramidNet => format!(
                "arch=\"pyramidnet\" depth={} alpha={} bottleneck={}",
                config.depth, config.alpha, config.bottleneck
            ),
        };
        writeln!(
            out,
            "{:<20} {:>12} {:>9.3} {:>6} {:>8}  {keys}",
            variant.name,
            count_params(&model),
            macs as f64 / 1e9,
            format!("{0}x{0}", variant.input_size),
            config.num_classes,
        )?;
    }
    writeln!(
        out,
        "GMACs: multiply-accumulates of the convolutions and the classifier per image (torchvision's \"GFLOPS\"; FLOPs are twice this)."
    )
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.list_models {
        return match list_models() {
            // `train --list-models | head` closes the pipe early: not an error.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(()),
        };
    }
    let path = args.config.expect("clap requires --config");
    let mut config = Config::load(&path, &args.sets)?;
    if let Some(backend) = args.backend {
        config.backend = backend;
    }
    let options = RunOptions {
        resume: args.resume,
        ..RunOptions::default()
    };
    // The first Ctrl-C asks the run to save a checkpoint and stop; a second one exits at once.
    let stop = options.stop.clone();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to quit without a checkpoint)");
    })
    .context("cannot install the Ctrl-C handler")?;
    let summary = trainer::train(&config, &options)?;
    if summary.interrupted {
        std::process::exit(130);
    }
    Ok(())
}

fn main() -> ExitCode {
    backend::quiet_mesa();
    backend::keep_freed_memory();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
