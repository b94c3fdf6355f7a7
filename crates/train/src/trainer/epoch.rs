//! One epoch: [`train_one_epoch`] feeds every batch through the model (an optimiser step every
//! `train.accumulate` batches), [`evaluate`] runs the validation split with BatchNorm's running
//! statistics. Neither reads from the device per batch: their numbers stay there until a read
//! every `train.log_every` batches (see [`stats`](super::stats)).

use std::time::{Duration, Instant};

use anyhow::Result;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::loss::cross_entropy_with_logits;
use burn::tensor::{Device, Int, Tensor};
use indicatif::ProgressBar;

use cutmix_augment::{Mixing, one_hot, smooth_targets};
use cutmix_data::{Loader, Stream, keyed_rng};
use cutmix_models::Model;

use super::batches::{DeviceBatch, Uploads};
use super::progress::{PlainProgress, duration, progress_bar};
use super::state::RunState;
use super::stats::{DeviceTally, NonFinite, batch_stats};
use super::step::{Update, loss_and_grads, mixed_forward, prob_factor};
use super::{Setup, StopFlag, StopReason};
use crate::config::TrainSection;
use crate::metrics::Tally;
use crate::schedule::learning_rate;
use crate::world::{World, rank_seed};

/// What one epoch of training gave.
pub struct EpochRun {
    /// Loss and errors over the batches as fed (over every rank; with the batches before a
    /// resume in the middle of the epoch).
    pub tally: Tally,
    pub images_per_sec: f64,
    /// The batch a stop request (a signal) ended the epoch at, and why.
    pub stopped_at: Option<(usize, StopReason)>,
    /// Seconds in the model step: mixing, forward, backward, optimiser, and the reads of the
    /// numbers (which wait for the device to finish the steps queued before them).
    pub step_seconds: f64,
    /// Seconds the training thread waited for the loader's next batch.
    pub loader_wait_seconds: f64,
}

/// Trains epoch `run.epoch` from batch `run.batch` on.
pub fn train_one_epoch(run: &mut RunState, setup: &Setup, stop: &StopFlag) -> Result<EpochRun> {
    let mut epoch = EpochLoop::start(run, setup);
    let batches = setup.data.train.epoch_from(epoch.epoch as u64, epoch.first);
    let (mut uploads, waited) = Uploads::new(batches, &setup.train_device, 2);
    epoch.numbers.loader_wait_seconds += waited;
    let mut index = epoch.first;
    while let Some(batch) = uploads.current() {
        // A stop or a checkpoint waits for the end of an accumulation, so a checkpoint never
        // holds half of one; every rank stops (or saves) at the same batch.
        if epoch.accumulation.is_empty()
            && let Some(reason) = epoch.stop_or_save(run, stop, index)?
        {
            return Ok(epoch.numbers.finish(Some((index, reason)), setup.world));
        }
        let stepping = Instant::now();
        epoch.feed(run, batch?, index, stepping)?;
        // Read and upload the next batch while the device runs this one.
        let waited = uploads.advance();
        index += 1;
        epoch.after_batch(index, stepping, waited)?;
    }
    epoch.finish(run)
}

/// What one epoch's loop carries from batch to batch.
struct EpochLoop<'a> {
    setup: &'a Setup<'a>,
    /// The epoch (0-based), the batch it starts at (after a resume inside it), its batches.
    epoch: usize,
    first: usize,
    steps: usize,
    progress: EpochProgress,
    numbers: Numbers,
    accumulation: Accumulation,
    saves: PeriodicSaves,
}

impl<'a> EpochLoop<'a> {
    fn start(run: &mut RunState, setup: &'a Setup<'a>) -> Self {
        let config = setup.config;
        let (epoch, first) = (run.epoch, std::mem::take(&mut run.batch));
        let steps = setup.data.train.num_batches();
        Self {
            progress: EpochProgress::new(
                format!("epoch {}/{}", epoch + 1, config.train.epochs),
                steps,
                first,
                setup.world.is_primary(),
            ),
            numbers: Numbers::new(config.train.log_every, run.partial.take()),
            accumulation: Accumulation::new(config.train.accumulate),
            saves: PeriodicSaves::new(&config.train, run.step),
            setup,
            epoch,
            first,
            steps,
        }
    }

    /// Between two accumulations: the reason to stop when a rank was asked to (the numbers
    /// read back first), or a checkpoint when one is due.
    fn stop_or_save(
        &mut self,
        run: &RunState,
        stop: &StopFlag,
        index: usize,
    ) -> Result<Option<StopReason>> {
        let world = self.setup.world;
        let due = world.is_primary() && self.saves.due(run.step) && index > self.first;
        let (stopping, saving) = agree(world, stop, due);
        if stopping.is_some() {
            self.progress.bar.abandon();
            self.numbers.read(self.epoch, &mut self.progress)?;
        } else if saving {
            self.numbers.read(self.epoch, &mut self.progress)?;
            let mut all = self.numbers.tally.counts();
            all.reduce(world);
            save_mid_epoch(run, self.setup, index, all)?;
            self.saves.saved(run.step);
        }
        Ok(stopping)
    }

    /// Batch `index` through the model (started at `stepping`).
    fn feed(
        &mut self,
        run: &mut RunState,
        mut batch: DeviceBatch,
        index: usize,
        stepping: Instant,
    ) -> Result<()> {
        let (setup, epoch) = (self.setup, self.epoch);
        self.numbers.tally.skipped.append(&mut batch.skipped);
        let Some((images, label_ids)) = batch.tensors.take() else {
            if setup.world.size() > 1 {
                // The other ranks step on this batch and wait for this rank's gradients.
                anyhow::bail!(
                    "rank {}: batch {index} of epoch {} has {} readable image(s), too few to train on, while the other ranks train on theirs; remove the unreadable files",
                    setup.world.rank(),
                    epoch + 1,
                    batch.labels.len()
                );
            }
            return Ok(());
        };
        let lr = learning_rate(&setup.config.train, epoch, index, self.steps);
        // The optimiser step (1-based) this batch's gradients go into.
        let feeds = run.step + 1;
        let fed = Fed {
            epoch,
            index,
            lr,
            images,
            labels: &batch.labels,
            label_ids,
        };
        let stats = train_batch(run, setup, fed, &mut self.accumulation);
        self.numbers
            .pending
            .push(stats, batch.labels.len(), feeds, lr);
        setup
            .warm_up
            .after_step(&setup.backend.device, stepping, &self.progress.bar)
    }

    /// After `done` batches: where the time went, and the numbers read back at the progress
    /// interval.
    fn after_batch(&mut self, done: usize, stepping: Instant, waited: f64) -> Result<()> {
        let numbers = &mut self.numbers;
        numbers.loader_wait_seconds += waited;
        numbers.step_seconds += stepping.elapsed().as_secs_f64() - waited;
        if numbers.pending.len() >= numbers.read_every || done == self.steps {
            numbers.read(self.epoch, &mut self.progress)?;
            self.progress.report(
                done,
                &numbers.tally,
                numbers.fed_images(),
                numbers.pending_lr,
            );
        }
        self.progress.bar.inc(1);
        Ok(())
    }

    /// The end of the epoch: a step with the last batches of an incomplete accumulation, and
    /// the numbers.
    fn finish(mut self, run: &mut RunState) -> Result<EpochRun> {
        if !self.accumulation.is_empty() {
            // The epoch's last batches, fewer than `accumulate`: one step with what they summed.
            let stepping = Instant::now();
            self.accumulation.step(run, self.setup);
            self.numbers.step_seconds += stepping.elapsed().as_secs_f64();
        }
        self.numbers.read(self.epoch, &mut self.progress)?;
        self.setup.warm_up.finish_epoch(&self.progress.bar);
        self.progress.bar.finish_and_clear();
        Ok(self.numbers.finish(None, self.setup.world))
    }
}

/// Whether any rank was asked to stop (and why), and whether rank 0 asks for a checkpoint: the
/// same answer on every rank.
fn agree(world: &World, stop: &StopFlag, save_due: bool) -> (Option<StopReason>, bool) {
    let mut flags = [stop.code(), u64::from(save_due)];
    if world.size() > 1 {
        world.max_u64(&mut flags);
    }
    (StopReason::from_code(flags[0]), flags[1] == 1)
}

/// A checkpoint in the middle of epoch `run.epoch`, before batch `batch`: `last` only, with the
/// epoch's numbers so far over all ranks (`all`), after checking that every rank holds the
/// same weights.
pub fn save_mid_epoch(run: &RunState, setup: &Setup, batch: usize, all: Tally) -> Result<()> {
    let at = format!("in epoch {} before batch {batch}", run.epoch + 1);
    setup.world.check_same_weights(run.model(), &at)?;
    let mut state = run.train_state(setup.config, run.epoch, batch, None);
    state.partial = Some(all.counts());
    run.save(setup.config, &state, false)
}

/// `train.checkpoint_minutes` and `train.checkpoint_steps`: when a checkpoint inside an epoch
/// is due.
struct PeriodicSaves {
    every: Option<Duration>,
    steps: usize,
    last_time: Instant,
    last_step: usize,
}

impl PeriodicSaves {
    fn new(train: &TrainSection, step: usize) -> Self {
        Self {
            every: (train.checkpoint_minutes > 0.0)
                .then(|| Duration::from_secs_f64(train.checkpoint_minutes * 60.0)),
            steps: train.checkpoint_steps,
            last_time: Instant::now(),
            last_step: step,
        }
    }

    fn due(&self, step: usize) -> bool {
        let by_time = self
            .every
            .is_some_and(|every| self.last_time.elapsed() >= every);
        let by_steps = self.steps > 0 && step >= self.last_step + self.steps;
        by_time || by_steps
    }

    fn saved(&mut self, step: usize) {
        self.last_time = Instant::now();
        self.last_step = step;
    }
}

/// One batch as it is fed: where it is in the run, and its tensors.
struct Fed<'a> {
    epoch: usize,
    index: usize,
    lr: f64,
    images: Tensor<4>,
    labels: &'a [usize],
    label_ids: Tensor<1, Int>,
}

/// One batch through the model: mixing, forward, loss, backward, and an optimiser step once
/// `train.accumulate` batches are summed. Returns the batch's numbers, left on the device.
fn train_batch(
    run: &mut RunState,
    setup: &Setup,
    fed: Fed,
    accumulation: &mut Accumulation,
) -> Tensor<1> {
    let config = setup.config;
    let (epoch, index) = (fed.epoch as u64, fed.index as u64);
    // Each rank draws its own mixing and ShakeDrop gates (rank 0 the draws of one process).
    let seed = rank_seed(config.seed, setup.world.rank());
    let mut mix_rng = keyed_rng(seed, Stream::Mix, epoch, index);
    let mut model_rng = keyed_rng(seed, Stream::Regularize, epoch, index);
    let mixing_off = config.augment.off_epoch > 0 && fed.epoch >= config.augment.off_epoch;
    let factor = prob_factor(config.augment.prob_schedule, fed.epoch, config.train.epochs);
    let scheduled;
    let mixing = if mixing_off {
        &Mixing::None
    } else if factor < 1.0 {
        scheduled = setup.mixing.with_prob_scaled(factor);
        &scheduled
    } else {
        &setup.mixing
    };
    let model = run.model();
    let (images, labels) = (fed.images, fed.labels);
    let (num_classes, stage) = (setup.num_classes(), config.augment.at.stage());
    let train = &config.train;
    let device = images.device();
    let (seen, grads, loss) = cutmix_kernels::on_cpu_threads(&device, || {
        let (logits, targets) = mixed_forward(
            model,
            images,
            labels,
            num_classes,
            mixing,
            stage,
            &mut mix_rng,
            &mut model_rng,
        );
        let targets = smooth_targets(targets, train.label_smoothing);
        let seen = logits.clone().detach();
        let scale = 1.0 / train.accumulate as f32;
        let (grads, loss) = loss_and_grads(model, logits, targets, scale);
        (seen, grads, loss)
    });
    if accumulation.add(run.model(), grads, fed.lr) {
        accumulation.step(run, setup);
    }
    batch_stats(seen, loss, fed.label_ids)
}

/// Gradients summed over `train.accumulate` batches before each optimiser step.
struct Accumulation {
    every: usize,
    pending: usize,
    grads: GradientsAccumulator<Model>,
    /// The learning rate of the last batch summed: the step takes it.
    lr: f64,
}

impl Accumulation {
    fn new(every: usize) -> Self {
        Self {
            every,
            pending: 0,
            grads: GradientsAccumulator::new(),
            lr: 0.0,
        }
    }

    fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Adds a batch's gradients; true when `every` batches are summed.
    fn add(&mut self, model: &Model, grads: GradientsParams, lr: f64) -> bool {
        self.grads.accumulate(model, grads);
        self.pending += 1;
        self.lr = lr;
        self.pending == self.every
    }

    /// One optimiser step with what was summed (averaged over the ranks first).
    fn step(&mut self, run: &mut RunState, setup: &Setup) {
        let mut grads = self.grads.grads();
        setup.world.average_gradients(run.model(), &mut grads);
        let train = &setup.config.train;
        let update = Update {
            lr: self.lr,
            clip: train.clip_grad_norm,
            classifier_scale: train.classifier_scale(),
        };
        run.optimizer_step(grads, update);
        self.pending = 0;
    }
}

/// The epoch's numbers: the host tally, the batches still on the device, and where the time
/// went.
struct Numbers {
    tally: Tally,
    /// Images in `tally` from before a resume in the middle of the epoch.
    images_before: usize,
    pending: DeviceTally,
    read_every: usize,
    /// The learning rate of the last batch read back, for the progress line.
    pending_lr: f64,
    started: Instant,
    step_seconds: f64,
    loader_wait_seconds: f64,
}

impl Numbers {
    /// With `partial`, the numbers of the epoch's batches trained before a resume.
    fn new(read_every: usize, partial: Option<Tally>) -> Self {
        let tally = partial.unwrap_or_default();
        Self {
            images_before: tally.images,
            tally,
            pending: DeviceTally::default(),
            read_every: read_every.max(1),
            pending_lr: 0.0,
            started: Instant::now(),
            step_seconds: 0.0,
            loader_wait_seconds: 0.0,
        }
    }

    /// Reads the pending batches back (waiting for the device); a loss that is not finite ends
    /// the run.
    fn read(&mut self, epoch: usize, progress: &mut EpochProgress) -> Result<()> {
        let reading = Instant::now();
        let lr = self.pending.last_lr();
        let non_finite = self.pending.flush(&mut self.tally);
        self.step_seconds += reading.elapsed().as_secs_f64();
        self.pending_lr = lr.unwrap_or(self.pending_lr);
        match non_finite {
            None => Ok(()),
            Some(bad) => {
                progress.bar.abandon();
                Err(Diverged {
                    bad,
                    epoch: epoch + 1,
                }
                .into())
            }
        }
    }

    /// Images fed since this process started the epoch (or resumed it).
    fn fed_images(&self) -> usize {
        self.tally.images - self.images_before
    }

    /// The epoch's numbers, summed over the ranks.
    fn finish(mut self, stopped_at: Option<(usize, StopReason)>, world: &World) -> EpochRun {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let mut fed = [self.fed_images() as f64];
        world.sum_f64(&mut fed);
        self.tally.reduce(world);
        let images_per_sec = match stopped_at {
            Some(_) => 0.0,
            None => fed[0] / seconds,
        };
        EpochRun {
            tally: self.tally,
            images_per_sec,
            stopped_at,
            step_seconds: self.step_seconds,
            loader_wait_seconds: self.loader_wait_seconds,
        }
    }
}

/// The bar of an epoch, and plain lines instead when stderr is not a terminal.
struct EpochProgress {
    bar: ProgressBar,
    plain: Option<PlainProgress>,
    prefix: String,
    steps: usize,
    first: usize,
    started: Instant,
}

impl EpochProgress {
    /// The bar (or plain lines) of an epoch; `shown` false: none (ranks other than 0).
    fn new(prefix: String, steps: usize, first: usize, shown: bool) -> Self {
        let bar = if shown {
            progress_bar(steps, prefix.clone())
        } else {
            ProgressBar::hidden()
        };
        bar.set_position(first as u64);
        Self {
            bar,
            plain: PlainProgress::new(steps, first).filter(|_| shown),
            prefix,
            steps,
            first,
            started: Instant::now(),
        }
    }

    /// The numbers read back so far, after `done` batches of the epoch (`fed` images of them
    /// by this process since it started the epoch).
    fn report(&mut self, done: usize, tally: &Tally, fed: usize, lr: f64) {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = fed as f64 / elapsed;
        self.bar.set_message(format!(
            "loss {:.4} lr {lr:.4} {rate:.1} img/s",
            tally.loss()
        ));
        let (prefix, steps, first) = (&self.prefix, self.steps, self.first);
        if let Some(plain) = &mut self.plain {
            plain.tick(done, steps, || {
                let left = elapsed / (done - first) as f64 * (steps - done) as f64;
                format!(
                    "{prefix} step {done}/{steps}  loss {:.4}  lr {lr:.4}  {rate:.1} img/s  epoch left {}",
                    tally.loss(),
                    duration(left)
                )
            });
        }
    }
}

/// A non-finite training loss: the run stops instead of training on NaN.
#[derive(Debug)]
pub struct Diverged {
    bad: NonFinite,
    /// 1-based.
    epoch: usize,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lr = self.bad.lr;
        write!(
            f,
            "training loss is {} at epoch {} step {}: the run diverged; lower train.lr (now {})",
            self.bad.loss,
            self.epoch,
            self.bad.step,
            if (1e-4..1e4).contains(&lr) {
                lr.to_string()
            } else {
                format!("{lr:e}")
            }
        )
    }
}

impl std::error::Error for Diverged {}

/// Batches of validation whose numbers are read back at once.
const EVAL_READ_EVERY: usize = 50;

/// Loss, top-1 and top-5 over the validation loader, with BatchNorm's running statistics (this
/// process's part of it; [`Tally::reduce`] sums the ranks').
pub fn evaluate(
    model: &Model,
    loader: &Loader,
    num_classes: usize,
    device: &Device,
) -> Result<Tally> {
    let model = model.valid();
    let mut tally = Tally::default();
    let mut pending = DeviceTally::default();
    let bar = progress_bar(loader.num_batches(), "  validate".into());
    let (mut uploads, _) = Uploads::new(loader.epoch(0), device, 1);
    while let Some(batch) = uploads.current() {
        let mut batch = batch?;
        tally.skipped.append(&mut batch.skipped);
        if let Some((images, label_ids)) = batch.tensors.take() {
            let logits = cutmix_kernels::on_cpu_threads(device, || model.forward(images));
            let targets = one_hot(&batch.labels, num_classes, device);
            let loss = cross_entropy_with_logits(logits.clone(), targets);
            pending.push(
                batch_stats(logits, loss, label_ids),
                batch.labels.len(),
                0,
                0.0,
            );
        }
        uploads.advance();
        if pending.len() >= EVAL_READ_EVERY {
            pending.flush(&mut tally);
        }
        bar.inc(1);
    }
    pending.flush(&mut tally);
    bar.finish_and_clear();
    Ok(tally)
}
