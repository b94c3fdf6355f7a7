//! `train`: runs a training recipe from a TOML config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use cutmix_train::config::{BackendChoice, Config};
use cutmix_train::trainer;

/// Train an image classifier with CutMix from a TOML recipe.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The recipe, e.g. configs/cifar100_cutmix.toml.
    #[arg(long)]
    config: PathBuf,
    /// Overrides the config's `backend`.
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Overrides any config key by its dotted path, e.g. --set train.epochs=1 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Backend {
    Auto,
    Wgpu,
    Flex,
    Ndarray,
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config, &args.sets)?;
    if let Some(backend) = args.backend {
        config.backend = match backend {
            Backend::Auto => BackendChoice::Auto,
            Backend::Wgpu => BackendChoice::Wgpu,
            Backend::Flex => BackendChoice::Flex,
            Backend::Ndarray => BackendChoice::Ndarray,
        };
    }
    trainer::train(&config)?;
    Ok(())
}

fn main() -> ExitCode {
    // Mesa's Vulkan drivers open a Wayland connection when wgpu lists adapters, and print an
    // error line when XDG_RUNTIME_DIR is unset (headless servers, containers). Give them a
    // folder without a display in it.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
