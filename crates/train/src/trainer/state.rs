//! The run state: model, optimiser, moving average, progress and the run folder they are saved
//! in, opened fresh or resumed from the folder's newest complete checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};

use cutmix_models::{LoadSummary, Model};

use super::step::{Update, apply_step, sgd};
use super::{RunSummary, Setup};
use crate::checkpoint::{self, RunLock, TrainState};
use crate::config::Config;
use crate::ema::Ema;
use crate::metrics::{EpochMetrics, MetricsLog, Tally};
use crate::weights;
use crate::world::World;

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
    /// The training numbers of epoch `epoch`'s first `batch` batches (a checkpoint saved in
    /// the middle of an epoch), to add the rest to.
    pub partial: Option<Tally>,
    /// How many processes train the run.
    pub world_size: usize,
    /// Held by the process that writes the folder (rank 0, or the only process); `None` on the
    /// other ranks.
    lock: Option<RunLock>,
}

/// What rank 0 tells the other ranks when it has opened the run: the folder, and the
/// checkpoint to continue from.
#[derive(serde::Serialize, serde::Deserialize)]
struct Opened {
    run_dir: PathBuf,
    checkpoint: Option<PathBuf>,
}

impl RunState {
    /// Opens the run folder `config` names, holding its lock: a new one (`<name>-2`, ... when
    /// the name is taken), or with `resume` the existing one, restored from its newest complete
    /// checkpoint (or started over in place when it stopped before its first).
    ///
    /// With several ranks, rank 0 does this and tells the others the folder and checkpoint,
    /// which they restore from too (the run folder must be on a filesystem every machine sees).
    pub fn open(setup: &Setup, resume: bool) -> Result<Self> {
        let world = setup.world;
        if !world.is_primary() {
            return Self::follow(setup);
        }
        let (mut run, checkpoint) = Self::open_primary(setup, resume)?;
        run.world_size = world.size();
        if world.size() > 1 {
            let opened = Opened {
                run_dir: run.run_dir.clone(),
                checkpoint,
            };
            let mut bytes = serde_json::to_vec(&opened).expect("serialises");
            world.broadcast_bytes(&mut bytes);
        }
        Ok(run)
    }

    /// A rank other than 0: the folder and checkpoint rank 0 opened; it writes nothing.
    fn follow(setup: &Setup) -> Result<Self> {
        let config = setup.config;
        let mut bytes = Vec::new();
        setup.world.broadcast_bytes(&mut bytes);
        let opened: Opened = serde_json::from_slice(&bytes).expect("rank 0 sent the run");
        let model = setup.init_model()?;
        let mut run = match &opened.checkpoint {
            Some(folder) => {
                let state = checkpoint::read_state(folder).with_context(|| {
                    format!(
                        "rank {}: cannot read rank 0's checkpoint (the run folder must be on a filesystem every machine sees)",
                        setup.world.rank()
                    )
                })?;
                let loaded = load_checkpoint(config, model, folder)?;
                Self::restored(opened.run_dir, loaded, state, setup.world, None, Vec::new())?
            }
            None => {
                let (model, _) = init_from(config, model)?;
                Self::fresh(config, opened.run_dir, model, None, None)
            }
        };
        run.world_size = setup.world.size();
        run.start_average(config);
        Ok(run)
    }

    /// The run folder opened by the process that writes it, and the checkpoint it was restored
    /// from.
    fn open_primary(setup: &Setup, resume: bool) -> Result<(Self, Option<PathBuf>)> {
        let config = setup.config;
        let model = setup.init_model()?;
        let (checkpoint, lock) = if resume {
            let (checkpoint, lock) = resumable(config)?;
            (checkpoint, Some(lock))
        } else {
            (None, None)
        };
        let restored_from = checkpoint.as_ref().map(|(folder, _)| folder.clone());
        let mut run = match checkpoint {
            Some((folder, state)) => restore(config, model, &folder, state, setup.world, lock)?,
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
                Self::fresh(config, run_dir, model, init_from, Some(lock))
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
        Ok((run, restored_from))
    }

    fn fresh(
        config: &Config,
        run_dir: PathBuf,
        model: Model,
        init_from: Option<(PathBuf, LoadSummary)>,
        lock: Option<RunLock>,
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
            partial: None,
            world_size: 1,
            lock,
        }
    }

    /// The run as `loaded` from a checkpoint whose progress is `state`, trained now by `world`.
    fn restored(
        run_dir: PathBuf,
        loaded: Loaded,
        state: TrainState,
        world: &World,
        lock: Option<RunLock>,
        metrics: Vec<EpochMetrics>,
    ) -> Result<Self> {
        let batch = batches_for(&state, world.size(), &run_dir)?;
        Ok(RunState {
            log: MetricsLog::new(&run_dir),
            run_dir,
            model: Some(loaded.model),
            optimizer: loaded.optimizer,
            ema: loaded.ema,
            step: state.step,
            epoch: state.epoch,
            batch,
            best_val_top1_err: state.best_val_top1_err,
            best_epoch: state.best_epoch,
            metrics,
            init_from: None,
            partial: state.partial.filter(|_| world.is_primary() && batch > 0),
            world_size: world.size(),
            lock,
        })
    }

    /// The moving average (`train.ema_decay`): the checkpoint's when it has one, else a new one
    /// from the current weights.
    fn start_average(&mut self, config: &Config) {
        let decay = config.train.ema_decay;
        if decay > 0.0 && self.ema.is_none() {
            self.ema = Some(Ema::new(self.model(), decay));
        }
    }

    /// Whether this process writes the run folder and the log (rank 0, or the only process).
    pub fn primary(&self) -> bool {
        self.lock.is_some()
    }

    pub fn model(&self) -> &Model {
        self.model.as_ref().expect("the model is in place")
    }

    /// One optimiser step with `grads` (their global norm clipped to `clip` first, 0 = no
    /// clip), counted, and the moving average moved after it.
    pub fn optimizer_step(&mut self, grads: GradientsParams, update: Update) {
        let model = self.model.take().expect("the model is in place");
        let model = apply_step(model, &mut self.optimizer, grads, update);
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
            world_size: self.world_size,
            partial: None,
            files: Default::default(),
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

    /// Writes the checkpoints of `state` (`last`, `best` when `is_best`, `epoch-NNNN`); only
    /// the process that writes the run folder does.
    pub fn save(&self, config: &Config, state: &TrainState, is_best: bool) -> Result<()> {
        if !self.primary() {
            return Ok(());
        }
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

    /// Makes every rank hold rank 0's BatchNorm running statistics and moving average, after
    /// checking that the trained weights are the same everywhere; returns their checksum.
    pub fn synchronise(&mut self, world: &World, where_: &str) -> Result<Option<u64>> {
        let checksum = world.check_same_weights(self.model(), where_)?;
        if world.size() > 1 {
            let model = self.model.take().expect("the model is in place");
            self.model = Some(world.broadcast_buffers(model, false));
            if let Some(ema) = &mut self.ema {
                let average = ema.model.clone();
                ema.model = world.broadcast_buffers(average, true);
            }
        }
        Ok(checksum)
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

    pub fn summary(self, stopped: Option<super::StopReason>) -> RunSummary {
        RunSummary {
            run_dir: self.run_dir,
            stopped,
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
/// the class count differs or `model.reinit_classifier` is set), or `model` as it is.
fn init_from(config: &Config, model: Model) -> Result<(Model, Option<(PathBuf, LoadSummary)>)> {
    if config.model.init_from.is_empty() {
        return Ok((model, None));
    }
    let path = PathBuf::from(&config.model.init_from);
    let (model, summary) = if config.model.reinit_classifier {
        weights::load_backbone(model, &path)
    } else {
        weights::load(model, &path)
    }
    .context("config key model.init_from")?;
    Ok((model, Some((path, summary))))
}

/// The checkpoint `--resume` continues from: the newest intact one (a damaged one is named and
/// passed over); `None` when the run folder exists but stopped before its first checkpoint; an
/// error when there is no run folder at all.
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
    let mut damaged = Vec::new();
    let mut chosen = None;
    for candidate in checkpoint::candidates(&run_dir)? {
        match candidate.state {
            Ok(state) if chosen.is_none() => chosen = Some((candidate.folder, state)),
            Ok(_) => {}
            Err(e) => damaged.push(format!("{e:#}")),
        }
    }
    for reason in &damaged {
        println!("--resume: passing over a damaged checkpoint: {reason}");
    }
    match &chosen {
        Some((folder, _)) if !damaged.is_empty() => {
            println!(
                "--resume: continuing from the newest intact checkpoint, {}",
                folder.display()
            )
        }
        None if !damaged.is_empty() => bail!(
            "--resume: every checkpoint of {} is damaged ({}); start the run again without --resume",
            run_dir.display(),
            damaged.join("; ")
        ),
        _ => {}
    }
    Ok((chosen, lock))
}

/// The batches of the checkpoint's epoch each of `world_size` ranks has already trained: the
/// checkpoint counts its own ranks' batches, so another number of ranks continues at the same
/// image when it falls on one of its batch boundaries.
fn batches_for(state: &TrainState, world_size: usize, run_dir: &Path) -> Result<usize> {
    if state.batch == 0 || state.world_size == world_size {
        return Ok(state.batch);
    }
    let done = state.batch * state.world_size;
    if !done.is_multiple_of(world_size) {
        bail!(
            "--resume: the checkpoint of {} was taken in the middle of epoch {} by {} process(es) after {} batches each, which {world_size} processes cannot continue from (it is not a whole number of their batches); resume with {} process(es), or from an epoch's end",
            run_dir.display(),
            state.epoch + 1,
            state.world_size,
            state.batch,
            state.world_size
        );
    }
    Ok(done / world_size)
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

/// What a checkpoint folder holds: weights, optimiser and moving average.
struct Loaded {
    model: Model,
    optimizer: ModuleOptimizer,
    ema: Option<Ema>,
}

/// Reads the checkpoint in `folder` into `model` and a new optimiser.
fn load_checkpoint(config: &Config, model: Model, folder: &Path) -> Result<Loaded> {
    let model = model
        .try_load_file(folder.join("model.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: not this config's model: {e}", folder.display()))?;
    let optimizer = sgd(&config.train)
        .load(folder.join("optimizer.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", folder.join("optimizer.bpk").display()))?;
    let ema_file = folder.join("ema.bpk");
    let ema = if config.train.ema_decay > 0.0 && ema_file.is_file() {
        let average = model
            .valid()
            .try_load_file(&ema_file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ema_file.display()))?;
        Some(Ema::from_average(average, config.train.ema_decay))
    } else {
        None
    };
    Ok(Loaded {
        model,
        optimizer,
        ema,
    })
}

/// The run restored from `checkpoint` of its folder: model, optimiser, moving average,
/// progress and metrics.
fn restore(
    config: &Config,
    model: Model,
    checkpoint: &Path,
    state: TrainState,
    world: &World,
    lock: Option<RunLock>,
) -> Result<RunState> {
    let run_dir = config.output_dir.join(&config.name);
    report_config_changes(config, &run_dir);
    let loaded = load_checkpoint(config, model, checkpoint)?;
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
    let at = if state.batch > 0 {
        format!("in epoch {} after batch {}", state.epoch + 1, state.batch)
    } else {
        format!("after epoch {}", state.epoch)
    };
    println!(
        "resuming {} {at} (step {}) from {}",
        run_dir.display(),
        state.step,
        checkpoint.display()
    );
    if config.train.ema_decay > 0.0 && loaded.ema.is_none() {
        println!(
            "train.ema_decay: the checkpoint has no moving average; it starts from the current weights"
        );
    }
    let lock = match lock {
        Some(lock) => lock,
        None => checkpoint::lock_run_dir(&run_dir)?,
    };
    RunState::restored(run_dir, loaded, state, world, Some(lock), metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mid_epoch(batch: usize, world_size: usize) -> TrainState {
        TrainState {
            epoch: 3,
            step: 40,
            seed: 0,
            batch,
            val_top1_err: 50.0,
            best_val_top1_err: 50.0,
            best_epoch: 3,
            metrics: None,
            world_size,
            partial: None,
            files: Default::default(),
        }
    }

    #[test]
    fn a_checkpoint_inside_an_epoch_continues_at_the_same_image_on_another_number_of_ranks() {
        let dir = Path::new("runs/x");
        // 6 batches on each of 2 ranks = 12 batches of one process = 3 on each of 4 ranks.
        assert_eq!(batches_for(&mid_epoch(6, 2), 1, dir).unwrap(), 12);
        assert_eq!(batches_for(&mid_epoch(6, 2), 4, dir).unwrap(), 3);
        assert_eq!(batches_for(&mid_epoch(6, 2), 3, dir).unwrap(), 4);
        assert_eq!(batches_for(&mid_epoch(6, 2), 2, dir).unwrap(), 6);
        // At an epoch's end any number of ranks goes on.
        assert_eq!(batches_for(&mid_epoch(0, 2), 3, dir).unwrap(), 0);
        // 5 batches on 2 ranks = 10, not a whole number of 4 ranks' batches.
        let error = batches_for(&mid_epoch(5, 2), 4, dir)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("in the middle of epoch 4") && error.contains("resume with 2"),
            "{error}"
        );
    }
}
