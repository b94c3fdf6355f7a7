//! `train`: runs a training recipe from a TOML config.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use burn::tensor::Device;
use clap::Parser;
use rand::SeedableRng;
use rand::rngs::StdRng;

use cutmix_models::{Arch, Variant, count_params};
use cutmix_train::backend;
use cutmix_train::config::{BackendChoice, Config};
use cutmix_train::trainer::{self, RunOptions, StopFlag, StopReason};
use cutmix_train::world::{EveryRank, World};

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

/// Turns signals into stop requests: Ctrl-C, SIGTERM (Slurm's and Kubernetes' notice before
/// SIGKILL) and SIGUSR1 (Slurm's `--signal=USR1@<seconds>` before the time limit) each save a
/// checkpoint after the current step; a second Ctrl-C quits at once, without one.
#[cfg(unix)]
fn handle_signals(stop: StopFlag) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])
        .map_err(|e| anyhow::anyhow!("cannot install the signal handlers: {e}"))?;
    std::thread::spawn(move || {
        for signal in signals.forever() {
            let (reason, name) = match signal {
                SIGINT => (StopReason::Interrupt, "Ctrl-C"),
                SIGTERM => (StopReason::Terminate, "SIGTERM"),
                _ => (StopReason::Requeue, "SIGUSR1"),
            };
            match stop.request(reason) {
                None => eprintln!(
                    "\n{name}: stopping after this step with a checkpoint{}",
                    if signal == SIGINT {
                        " (Ctrl-C again to quit without one)"
                    } else {
                        ""
                    }
                ),
                Some(_) if signal == SIGINT => std::process::exit(130),
                Some(_) => {}
            }
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn handle_signals(stop: StopFlag) -> anyhow::Result<()> {
    ctrlc::set_handler(move || {
        if stop.request(StopReason::Interrupt).is_some() {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to quit without a checkpoint)");
    })
    .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))
}

/// After SIGUSR1 under Slurm: asks Slurm to put the job back in the queue (as Lightning's Slurm
/// support does), so it continues with `--resume` from the checkpoint just saved.
fn requeue() {
    let Ok(job) = std::env::var("SLURM_JOB_ID") else {
        println!("SIGUSR1: not a Slurm job; exiting with status 75 for whatever restarts it");
        return;
    };
    match std::process::Command::new("scontrol")
        .args(["requeue", &job])
        .status()
    {
        Ok(status) if status.success() => println!("SIGUSR1: requeued Slurm job {job}"),
        Ok(status) => println!("SIGUSR1: `scontrol requeue {job}` failed ({status})"),
        Err(e) => println!("SIGUSR1: cannot run `scontrol requeue {job}`: {e}"),
    }
}

fn run(args: Args, world: &Rc<World>) -> anyhow::Result<ExitCode> {
    if args.list_models {
        return match list_models() {
            // `train --list-models | head` closes the pipe early: not an error.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(ExitCode::SUCCESS),
        };
    }
    let path = args.config.expect("clap requires --config");
    let mut config = Config::load(&path, &args.sets)?;
    if let Some(backend) = args.backend {
        config.backend = backend;
    }
    let options = RunOptions {
        resume: args.resume,
        world: world.clone(),
        ..RunOptions::default()
    };
    handle_signals(options.stop.clone())?;
    let summary = trainer::train(&config, &options)?;
    Ok(match summary.stopped {
        None => ExitCode::SUCCESS,
        Some(reason) => {
            if reason == StopReason::Requeue && world.is_primary() {
                requeue();
            }
            ExitCode::from(reason.exit_code())
        }
    })
}

fn main() -> ExitCode {
    backend::quiet_mesa();
    backend::keep_freed_memory();
    let world = match World::init() {
        Ok(world) => Rc::new(world),
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(cutmix_train::cli::parse::<Args>(), &world) {
        Ok(code) => code,
        Err(error) if world.size() > 1 => {
            if error.downcast_ref::<EveryRank>().is_some() {
                // Every rank met it: rank 0 says it, and all exit.
                if world.is_primary() {
                    eprintln!("error: {error:#}");
                }
            } else {
                eprintln!("error (rank {}): {error:#}", world.rank());
                // The other ranks may be waiting for this one in a collective: end them too.
                world.abort(1);
            }
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    };
    // MPI is finalised when the last reference goes.
    drop(world);
    code
}
