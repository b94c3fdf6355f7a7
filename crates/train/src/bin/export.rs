//! `export`: writes a run's checkpoint as safetensors under PyTorch's names, loadable with
//! `model.load_state_dict(safetensors.torch.load_file(FILE))` in torchvision (ResNets) or the
//! CutMix reference's `pyramidnet.py`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use cutmix_train::weights::{self, Which};

/// Export a run's weights to safetensors with torchvision's tensor names and layouts.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The run folder, e.g. runs/quickstart.
    #[arg(long)]
    run: PathBuf,
    /// Which checkpoint: the best by validation top-1 error, or the last.
    #[arg(long, value_enum, default_value = "best")]
    which: Which,
    /// Export the moving average of the weights (`train.ema_decay`) instead of the raw weights.
    #[arg(long)]
    ema: bool,
    /// The file to write (default: <run>/export-<which>[-ema].safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = cutmix_train::cli::parse::<Args>();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| weights::default_export_path(&args.run, args.which, args.ema));
    match weights::export(&args.run, args.which, args.ema, &out) {
        Ok(count) => {
            println!("wrote {count} tensors to {}", out.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
