//! The training loop, laid out as torchvision's `references/classification/train.py`:
//! [`train`] (in `run.rs`) reads top to bottom: set up data, model and device, open or resume
//! the run folder, then per epoch train, validate, checkpoint. One epoch is `epoch.rs`, one
//! step's parts are `step.rs`, the state a run carries is `state.rs`.

mod batches;
mod epoch;
mod progress;
mod run;
mod state;
mod stats;
mod step;

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use anyhow::{Result, anyhow};
use burn::tensor::Device;
use indicatif::ProgressBar;

use cutmix_augment::Mixing;
use cutmix_data::{Stream, keyed_rng};
use cutmix_models::{Arch, Model, ModelConfig, count_params};

pub use epoch::evaluate;
pub use progress::progress_bar;
pub use run::train;
pub use stats::{DeviceTally, batch_stats, host_reads};
pub use step::{
    StepOutput, Update, apply_step, backward, clip_global_norm, images_tensor, loss_and_grads,
    mixed_forward, mixing, prob_factor, sgd, train_step,
};

use crate::backend::{self, Backend};
use crate::config::Config;
use crate::datasets::{self, Datasets};
use crate::world::World;
use cutmix_data::Shard;
use state::RunState;

/// Why a run was asked to stop before its end; each saves a checkpoint after the current step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Ctrl-C (SIGINT).
    Interrupt = 1,
    /// SIGTERM: what Slurm and Kubernetes send before SIGKILL.
    Terminate = 2,
    /// SIGUSR1: Slurm's warning before the time limit (`#SBATCH --signal=USR1@120`); the run is
    /// to be requeued.
    Requeue = 3,
}

impl StopReason {
    fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::Interrupt),
            2 => Some(Self::Terminate),
            3 => Some(Self::Requeue),
            _ => None,
        }
    }

    /// The process's exit status after the checkpoint: 128 + the signal's number for Ctrl-C and
    /// SIGTERM, as a shell reports them; 75 (EX_TEMPFAIL, "try again") for a requeue, the value
    /// for Slurm's `RequeueExit`.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
            Self::Requeue => 75,
        }
    }
}

/// A request to stop, set from a signal handler and read by the training loop.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    /// Asks the run to stop; returns the reason already asked for, if any (the first one wins).
    pub fn request(&self, reason: StopReason) -> Option<StopReason> {
        let before = self
            .0
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst)
            .unwrap_or_else(|current| current);
        StopReason::from_code(u64::from(before))
    }

    pub fn reason(&self) -> Option<StopReason> {
        StopReason::from_code(u64::from(self.0.load(Ordering::Relaxed)))
    }

    fn code(&self) -> u64 {
        u64::from(self.0.load(Ordering::Relaxed))
    }
}

/// How to run: fresh or resumed, a flag that asks the run to stop (a signal), and the processes
/// that train together.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Continue `<output_dir>/<name>` from its newest complete checkpoint.
    pub resume: bool,
    /// Set from a signal handler: the run saves a checkpoint after the current step and returns
    /// with `stopped` set.
    pub stop: StopFlag,
    /// One process, or the ranks of `mpirun`.
    pub world: Rc<World>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// The run stopped early on request, with a checkpoint to resume from.
    pub stopped: Option<StopReason>,
    pub metrics: Vec<crate::metrics::EpochMetrics>,
    pub best_val_top1_err: f64,
    pub best_epoch: usize,
}

/// What a run trains with and never changes: the config, the device, the data, the network's
/// description and the mixing.
pub struct Setup<'a> {
    pub config: &'a Config,
    pub world: &'a World,
    pub backend: Backend,
    /// The backend's device with autodiff.
    pub train_device: Device,
    pub data: Datasets,
    pub model_config: ModelConfig,
    pub mixing: Mixing,
    warm_up: WarmUp,
}

impl<'a> Setup<'a> {
    /// Everything that can fail on user input fails here, before a run folder is made. With
    /// several ranks, each trains on its part of every epoch (padded so all take the same
    /// number of steps) and validates on its part of the validation split.
    pub fn new(config: &'a Config, world: &'a World) -> Result<Self> {
        let backend = if world.size() > 1 {
            backend::select_for_rank(config.backend, world.local_rank())?
        } else {
            backend::select(config.backend)?
        };
        let mut data = datasets::build(config)?;
        if world.size() > 1 {
            let (rank, count) = (world.rank(), world.size());
            data.train = data.train.sharded(Shard {
                rank,
                count,
                pad: true,
            });
            data.val = data.val.sharded(Shard {
                rank,
                count,
                pad: false,
            });
        }
        let model_config = config.model_config()?;
        if config.train.sync_bn && world.size() > 1 {
            if backend.name != "flex" {
                anyhow::bail!(
                    "config key train.sync_bn: SyncBatchNorm runs on the flex backend only (its all-reduce is a flex kernel); this run is on {}",
                    backend.name
                );
            }
            cutmix_kernels::sync_batch_norm(world.reducer());
        }
        Ok(Self {
            train_device: backend.device.clone().autodiff(),
            warm_up: WarmUp::new(backend.name == "wgpu" && world.is_primary()),
            backend,
            data,
            model_config,
            mixing: step::mixing(config),
            config,
            world,
        })
    }

    pub fn num_classes(&self) -> usize {
        self.model_config.num_classes
    }

    /// The network as the seed initialises it, on the training device.
    pub fn init_model(&self) -> Result<Model> {
        let mut rng = keyed_rng(self.config.seed, Stream::Init, 0, 0);
        Ok(self.model_config.init(&mut rng, &self.train_device)?)
    }

    /// The lines that open a run's log: device, network, data, loader, run folder (with
    /// several ranks, each prints its device line and rank 0 the rest).
    fn print_header(&self, run: &RunState) {
        let config = self.config;
        let world = self.world;
        if world.size() > 1 {
            println!("{}: {}", world.describe(), self.backend.description);
            if !world.is_primary() {
                return;
            }
        } else {
            println!("backend: {}", self.backend.description);
        }
        if let Some(cache) = &self.backend.gpu_cache {
            println!(
                "GPU kernels and autotune results are cached in {}",
                cache.display()
            );
        }
        let alpha = if self.model_config.arch == Arch::PyramidNet {
            format!(" alpha {}", config.model.alpha)
        } else {
            String::new()
        };
        println!(
            "model: {} depth {}{alpha} ({} parameters), {} classes",
            config.model.arch,
            config.model.depth,
            count_params(run.model()),
            self.num_classes()
        );
        if let Some((path, summary)) = &run.init_from {
            println!("init from {}: {summary}", path.display());
        }
        let data = &self.data;
        println!(
            "data: {} training and {} validation images ({} classes) from {}, batch {}",
            data.train.total_len(),
            data.val.total_len(),
            data.num_classes,
            config.data.root.display(),
            config.train.batch_size
        );
        if world.size() > 1 && config.train.sync_bn {
            println!(
                "BatchNorm: statistics over the batches of all {} ranks (train.sync_bn)",
                world.size()
            );
        }
        if world.size() > 1 {
            let (total, padded) = (
                data.train.total_len(),
                data.train.shard().padded_len(data.train.total_len()),
            );
            println!(
                "data-parallel over {} ranks: batch {} per rank, {} in all; each rank trains on {} images an epoch ({} repeated to make the parts equal) and validates on a part of the validation images",
                world.size(),
                config.train.batch_size,
                config.train.batch_size * world.size(),
                data.train.len(),
                padded - total
            );
        }
        let batch_mib = (config.train.batch_size * 3 * config.data.image_size.pow(2) * 4) as f64
            / (1024.0 * 1024.0);
        println!(
            "loader: {} worker thread(s), at most {} batches in memory ({:.0} MiB)",
            config.data.workers,
            config.data.prefetch + 1,
            (config.data.prefetch + 1) as f64 * batch_mib
        );
        for warning in &data.warnings {
            println!("{warning}");
        }
        println!("run folder: {}", run.run_dir.display());
    }
}

/// The first steps of a process on a GPU, each waited for and timed: they compile the kernels
/// and autotune them, which later steps (and later runs, through the cache) do not pay again.
struct WarmUp {
    /// Timing still to do (wgpu, until the report is out).
    pending: Cell<bool>,
    seconds: RefCell<Vec<f64>>,
}

impl WarmUp {
    /// Steps timed one by one.
    const STEPS: usize = 3;

    fn new(enabled: bool) -> Self {
        Self {
            pending: Cell::new(enabled),
            seconds: RefCell::new(Vec::new()),
        }
    }

    /// Waits for the step started at `started` to finish and times it, for the first
    /// [`STEPS`](Self::STEPS) steps; then says what they cost.
    fn after_step(&self, device: &Device, started: Instant, bar: &ProgressBar) -> Result<()> {
        if !self.pending.get() {
            return Ok(());
        }
        let mut seconds = self.seconds.borrow_mut();
        device
            .sync()
            .map_err(|e| anyhow!("the GPU failed to run a training step: {e:?}"))?;
        seconds.push(started.elapsed().as_secs_f64());
        if seconds.len() == Self::STEPS {
            self.report(&seconds, bar);
        }
        Ok(())
    }

    /// At the end of an epoch: the report, if the epoch had fewer steps than are timed.
    fn finish_epoch(&self, bar: &ProgressBar) {
        let seconds = self.seconds.borrow();
        if self.pending.get() && !seconds.is_empty() {
            self.report(&seconds, bar);
        }
    }

    fn report(&self, seconds: &[f64], bar: &ProgressBar) {
        self.pending.set(false);
        let each: Vec<String> = seconds.iter().map(|s| format!("{s:.2} s")).collect();
        progress::say(
            bar,
            format!(
                "GPU warm-up: the first {} steps took {} (kernel compilation and autotuning; later steps and runs reuse them)",
                seconds.len(),
                each.join(", ")
            ),
        );
    }
}
