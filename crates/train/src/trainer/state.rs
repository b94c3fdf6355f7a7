//! The run state: model, optimiser, moving average, progress and the run folder they are saved
//! in, opened fresh or resumed from the folder's newest complete checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};

use cutmix_models::{LoadSummary, Model};

use super::step::{apply_step, sgd};
use super::{RunSummary, Setup};
use crate::checkpoint::{self, RunLock, TrainState};
use crate::config::Config;
use crate::ema::Ema;
use crate::metrics::{EpochMetrics, MetricsLog};
use crate::weights;

/// Everything a run changes as it trains, and where it keeps it.
pub struct RunState {
    pub run_dir: PathBuf,
    /// Always `Some` between calls: taken out only while the optimiser moves it.
    model: Option<Model>,
    pub optimizer: ModuleOptimizer,
    pub ema: Option<Ema>,
    /// Optimiser steps taken.
    pub step: usize,
    /// Epochs complete.
    pub epoch: usize,
    /// Batches of epoch `epoch` already trained (a checkpoint saved in the middle of an epoch).
    pub batch: usize,
    pub best_val_top1_err: f64,
    pub best_epoch: usize,
    /// One entry per epoch complete, as in `metrics.jsonl`.
    pub metrics: Vec<EpochMetrics>,
    pub log: MetricsLog,
    /// What `model.init_from` loaded (a fresh run only), for the log.
    pub init_from: Option<(PathBuf, LoadSummary)>,
    _lock: RunLock,
}

impl RunState {
    /// Opens the run folder `config` names, holding its lock: a new one (`<name>-2`, ... when
    /// the name is taken), or with `resume` the existing one, restored from its newest complete
    /// checkpoint (or started over in place when it stopped before its first).
    pub fn open(setup: &Setup, resume: bool) -> Result<Self> {
        let config = setup.config;
        let model = setup.init_model()?;
        let (checkpoint, lock) = if resume {
            let (checkpoint, lock) = resumable(config)?;
            (checkpoint, Some(lock))
        } else {
            (None, None)
        };
        let mut run = match checkpoint {
            Some((folder, state)) => restore(config, model, &folder, state, lock)?,
            None => {
                // Loaded before the folder is made: a bad file leaves nothing behind.
                let (model, init_from) = init_from(config, model)?;
                let run_dir = if resume {
                    restart_in_place(config)?
                } else {
                    new_run_dir(config)?
                };
                let lock = match lock {
                    Some(lock) => lock,
                    None => checkpoint::lock_run_dir(&run_dir)?,
                };
                Self::fresh(config, run_dir, model, init_from, lock)
            }
        };
        run.start_average(config);
        checkpoint::write_atomically(
            &run.run_dir.join("config.toml"),
            config.to_toml().as_bytes(),
        )?;
        if let Some(classes) = &setup.data.classes {
            checkpoint::write_atomically(
                &run.run_dir.join("classes.txt"),
                classes.join("\n").as_bytes(),
            )?;
        }
        Ok(run)
    }

    fn fresh(
        config: &Config,
        run_dir: PathBuf,
        model: Model,
        init_from: Option<(PathBuf, LoadSummary)>,
        lock: RunLock,
    ) -> Self {
        Self {
            log: MetricsLog::new(&run_dir),
            run_dir,
            model: Some(model),
            optimizer: sgd(&config.train),
            ema: None,
            step: 0,
            epoch: 0,
            batch: 0,
            best_val_top1_err: f64::INFINITY,
            best_epoch: 0,
            metrics: Vec::new(),
            init_from,
            _lock: lock,
        }
    }

    /// The moving average (`train.ema_decay`): the checkpoint's when it has one, else a new one
    /// from the current weights.
    fn start_average(&mut self, config: &Config) {
        let decay = config.train.ema_decay;
        if decay > 0.0 && self.ema.is_none() {
            self.ema = Some(Ema::new(self.model(), decay));
        }
    }

    pub fn model(&self) -> &Model {
        self.model.as_ref().expect("the model is in place")
    }

    /// One optimiser step with `grads` (their global norm clipped to `clip` first, 0 = no
    /// clip), counted, and the moving average moved after it.
    pub fn optimizer_step(&mut self, grads: GradientsParams, lr: f64, clip: f64) {
        let model = self.model.take().expect("the model is in place");
        let model = apply_step(model, &mut self.optimizer, grads, lr, clip);
        self.step += 1;
        if let Some(ema) = &mut self.ema {
            ema.update(&model);
        }
        self.model = Some(model);
    }

    /// The progress to store with a checkpoint taken after `batch` batches of epoch `epoch`
    /// (`batch` 0: the epoch is complete and `metrics` are its numbers).
    pub fn train_state(
        &self,
        config: &Config,
        epoch: usize,
        batch: usize,
        metrics: Option<EpochMetrics>,
    ) -> TrainState {
        TrainState {
            epoch,
            step: self.step,
            seed: config.seed,
            batch,
            val_top1_err: metrics
                .as_ref()
                .or(self.metrics.last())
                .map_or(f64::NAN, |m| m.val_top1_err),
            best_val_top1_err: self.best_val_top1_err,
            best_epoch: self.best_epoch,
            metrics,
        }
    }

    /// Writes the checkpoints of `state` (`last`, `best` when `is_best`, `epoch-NNNN`).
    pub fn save(&self, config: &Config, state: &TrainState, is_best: bool) -> Result<()> {
        checkpoint::save(
            &self.run_dir,
            self.model(),
            self.ema.as_ref().map(|e| &e.model),
            &self.optimizer,
            state,
            is_best,
            config.train.keep_last,
        )
        .context("saving the checkpoint")
    }

    /// Keeps `metrics` as the best epoch's when its error is the lowest so far.
    pub fn record_best(&mut self, metrics: &EpochMetrics) -> bool {
        let is_best = metrics.val_top1_err < self.best_val_top1_err;
        if is_best {
            self.best_val_top1_err = metrics.val_top1_err;
            self.best_epoch = metrics.epoch;
        }
        is_best
    }

    pub fn summary(self, interrupted: bool) -> RunSummary {
        RunSummary {
            run_dir: self.run_dir,
            interrupted,
            metrics: self.metrics,
            best_val_top1_err: self.best_val_top1_err,
            best_epoch: self.best_epoch,
        }
    }
}

/// A new run folder; says so when the config's name was taken.
fn new_run_dir(config: &Config) -> Result<PathBuf> {
    let (run_dir, renamed) = checkpoint::create_run_dir(&config.output_dir, &config.name)?;
    if renamed {
        println!(
            "{} exists; this run writes to {} (continue the old one with --resume)",
            config.output_dir.join(&config.name).display(),
            run_dir.display()
        );
    }
    Ok(run_dir)
}

/// `--resume` of a run killed before its first checkpoint: it starts over in its folder.
fn restart_in_place(config: &Config) -> Result<PathBuf> {
    let run_dir = config.output_dir.join(&config.name);
    println!(
        "--resume: {} stopped before its first checkpoint; starting it from the beginning",
        run_dir.display()
    );
    fs::create_dir_all(run_dir.join("checkpoints"))
        .with_context(|| format!("cannot create {}", run_dir.join("checkpoints").display()))?;
    MetricsLog::new(&run_dir).truncate_to(0)?;
    Ok(run_dir)
}

/// The weights `model.init_from` names loaded into `model` (the classifier re-initialised when
/// the class count differs), or `model` as it is.
fn init_from(config: &Config, model: Model) -> Result<(Model, Option<(PathBuf, LoadSummary)>)> {
    if config.model.init_from.is_empty() {
        return Ok((model, None));
    }
    let path = PathBuf::from(&config.model.init_from);
    let (model, summary) = weights::load(model, &path).context("config key model.init_from")?;
    Ok((model, Some((path, summary))))
}

/// The checkpoint `--resume` continues from: `None` when the run folder exists but stopped before
/// its first checkpoint; an error when there is no run folder at all.
fn resumable(config: &Config) -> Result<(Option<(PathBuf, TrainState)>, RunLock)> {
    let run_dir = config.output_dir.join(&config.name);
    // `checkpoints/` is made with the folder, before config.toml: a run killed between the two
    // is still a run folder.
    if !run_dir.join("config.toml").is_file() && !run_dir.join("checkpoints").is_dir() {
        bail!(
            "--resume: {} is not a run folder (no config.toml); start the run without --resume",
            run_dir.display()
        );
    }
    let lock = checkpoint::lock_run_dir(&run_dir)?;
    Ok((checkpoint::latest(&run_dir)?, lock))
}

/// The dotted keys whose values differ between two configs (as TOML), with both values.
fn config_changes(before: &toml::Value, after: &toml::Value) -> Vec<String> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    flatten(&path, value, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let (mut old, mut new) = (Vec::new(), Vec::new());
    flatten("", before, &mut old);
    flatten("", after, &mut new);
    let old: std::collections::BTreeMap<_, _> = old.into_iter().collect();
    let new: std::collections::BTreeMap<_, _> = new.into_iter().collect();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            format!("{k} {} -> {}", show(old.get(k)), show(new.get(k)))
        })
        .collect()
}

/// Says which config keys differ from the run's `config.toml` (a resumed run may change them:
/// a longer schedule, say).
fn report_config_changes(config: &Config, run_dir: &Path) {
    if let Ok(text) = fs::read_to_string(run_dir.join("config.toml"))
        && let (Ok(before), Ok(after)) = (
            text.parse::<toml::Table>(),
            config.to_toml().parse::<toml::Table>(),
        )
    {
        let changes = config_changes(&toml::Value::Table(before), &toml::Value::Table(after));
        if !changes.is_empty() {
            println!(
                "--resume with a config that differs from the run's config.toml: {}",
                changes.join(", ")
            );
        }
    }
}

/// The run restored from `checkpoint` of its folder: model, optimiser, moving average,
/// progress and metrics.
fn restore(
    config: &Config,
    model: Model,
    checkpoint: &Path,
    state: TrainState,
    lock: Option<RunLock>,
) -> Result<RunState> {
    let run_dir = config.output_dir.join(&config.name);
    report_config_changes(config, &run_dir);
    let model = model
        .try_load_file(checkpoint.join("model.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: not this config's model: {e}", checkpoint.display()))?;
    let optimizer = sgd(&config.train)
        .load(checkpoint.join("optimizer.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", checkpoint.join("optimizer.bpk").display()))?;
    let ema_file = checkpoint.join("ema.bpk");
    let ema = if config.train.ema_decay > 0.0 && ema_file.is_file() {
        let average = model
            .valid()
            .try_load_file(&ema_file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ema_file.display()))?;
        Some(Ema::from_average(average, config.train.ema_decay))
    } else {
        None
    };
    let log = MetricsLog::new(&run_dir);
    let mut metrics = log.truncate_to(state.epoch)?;
    // A crash between the checkpoint and its metrics line: the checkpoint carries the line.
    if let Some(lost) = &state.metrics
        && metrics.last().is_none_or(|m| m.epoch < lost.epoch)
    {
        log.append(lost)?;
        metrics.push(lost.clone());
    }
    log.write_csv(&metrics)?;
    println!(
        "resuming {} after epoch {} (step {}) from {}",
        run_dir.display(),
        state.epoch,
        state.step,
        checkpoint.display()
    );
    if config.train.ema_decay > 0.0 && ema.is_none() {
        println!(
            "train.ema_decay: the checkpoint has no moving average; it starts from the current weights"
        );
    }
    let lock = match lock {
        Some(lock) => lock,
        None => checkpoint::lock_run_dir(&run_dir)?,
    };
    Ok(RunState {
        run_dir,
        model: Some(model),
        optimizer,
        ema,
        step: state.step,
        epoch: state.epoch,
        batch: state.batch,
        best_val_top1_err: state.best_val_top1_err,
        best_epoch: state.best_epoch,
        metrics,
        log,
        init_from: None,
        _lock: lock,
    })
}
