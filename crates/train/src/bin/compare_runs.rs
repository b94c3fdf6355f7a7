//! `compare_runs`: several runs on one PNG figure (validation top-1 error, training loss,
//! validation loss by epoch), e.g. the baseline against CutMix.
//!
//! ```text
//! compare_runs runs/cifar100_baseline runs/cifar100_cutmix --out comparison.png
//! ```

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;

use cutmix_train::metrics::MetricsLog;
use cutmix_train::plots::write_comparison;

#[derive(Parser)]
#[command(about = "Plot several runs' metrics on one PNG figure")]
struct Args {
    /// Run folders (each with a metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long, default_value = "comparison.png")]
    out: PathBuf,
}

fn run(args: &Args) -> Result<()> {
    let mut runs = Vec::new();
    for dir in &args.runs {
        let metrics = MetricsLog::new(dir).read()?;
        if metrics.is_empty() {
            bail!(
                "{}: no finished epoch yet",
                dir.join("metrics.jsonl").display()
            );
        }
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        runs.push((name, metrics));
    }
    write_comparison(&runs, &args.out)?;
    for (name, metrics) in &runs {
        let best = metrics
            .iter()
            .min_by(|a, b| a.val_top1_err.total_cmp(&b.val_top1_err))
            .expect("at least one epoch");
        println!(
            "{name}: {} epochs, best val top-1 error {:.2}% at epoch {}",
            metrics.len(),
            best.val_top1_err,
            best.epoch
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn main() {
    let args = cutmix_train::cli::parse::<Args>();
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
