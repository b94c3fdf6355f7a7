//! One epoch: [`train_one_epoch`] feeds every batch through the model (an optimiser step every
//! `train.accumulate` batches), [`evaluate`] runs the validation split with BatchNorm's running
//! statistics. Neither reads from the device per batch: their numbers stay there until a read
//! every `train.log_every` batches (see [`stats`](super::stats)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::loss::cross_entropy_with_logits;
use burn::tensor::{Device, Int, Tensor};
use indicatif::ProgressBar;

use cutmix_augment::{Mixing, one_hot, smooth_targets};
use cutmix_data::{Loader, Stream, keyed_rng};
use cutmix_models::Model;

use super::Setup;
use super::batches::Uploads;
use super::progress::{PlainProgress, duration, progress_bar};
use super::state::RunState;
use super::stats::{DeviceTally, NonFinite, batch_stats};
use super::step::{loss_and_grads, mixed_forward};
use crate::metrics::Tally;
use crate::schedule::learning_rate;

/// What one epoch of training gave.
pub struct EpochRun {
    /// Loss and errors over the batches as fed.
    pub tally: Tally,
    pub images_per_sec: f64,
    /// The batch a stop request (Ctrl-C) ended the epoch at.
    pub stopped_at: Option<usize>,
    /// Seconds in the model step: mixing, forward, backward, optimiser, and the reads of the
    /// numbers (which wait for the device to finish the steps queued before them).
    pub step_seconds: f64,
    /// Seconds the training thread waited for the loader's next batch.
    pub loader_wait_seconds: f64,
}

/// Trains epoch `run.epoch` from batch `run.batch` on.
pub fn train_one_epoch(run: &mut RunState, setup: &Setup, stop: &AtomicBool) -> Result<EpochRun> {
    let config = setup.config;
    let (epoch, first) = (run.epoch, std::mem::take(&mut run.batch));
    let steps = setup.data.train.num_batches();
    let mut progress = EpochProgress::new(
        format!("epoch {}/{}", epoch + 1, config.train.epochs),
        steps,
        first,
    );
    let mut numbers = Numbers::new(config.train.log_every);
    let mut accumulation = Accumulation::new(config.train.accumulate);
    let batches = setup.data.train.epoch_from(epoch as u64, first);
    let (mut uploads, waited) = Uploads::new(batches, &setup.train_device, 2);
    numbers.loader_wait_seconds += waited;
    let mut index = first;
    while let Some(batch) = uploads.current() {
        // A stop waits for the end of an accumulation, so a checkpoint never holds half of one.
        if accumulation.is_empty() && stop.load(Ordering::Relaxed) {
            progress.bar.abandon();
            numbers.read(epoch, &mut progress)?;
            return Ok(numbers.finish(Some(index)));
        }
        let mut batch = batch?;
        numbers.tally.skipped.append(&mut batch.skipped);
        let stepping = Instant::now();
        if let Some((images, label_ids)) = batch.tensors.take() {
            let lr = learning_rate(&config.train, epoch, index, steps);
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
            let stats = train_batch(run, setup, fed, &mut accumulation);
            numbers.pending.push(stats, batch.labels.len(), feeds, lr);
            setup
                .warm_up
                .after_step(&setup.backend.device, stepping, &progress.bar)?;
        }
        // Read and upload the next batch while the device runs this one.
        let waited = uploads.advance();
        index += 1;
        numbers.loader_wait_seconds += waited;
        numbers.step_seconds += stepping.elapsed().as_secs_f64() - waited;
        if numbers.pending.len() >= numbers.read_every || index == steps {
            numbers.read(epoch, &mut progress)?;
            progress.report(index, &numbers.tally, numbers.pending_lr);
        }
        progress.bar.inc(1);
    }
    if !accumulation.is_empty() {
        // The epoch's last batches, fewer than `accumulate`: one step with what they summed.
        let stepping = Instant::now();
        accumulation.step(run, config.train.clip_grad_norm);
        numbers.step_seconds += stepping.elapsed().as_secs_f64();
    }
    numbers.read(epoch, &mut progress)?;
    setup.warm_up.finish_epoch(&progress.bar);
    progress.bar.finish_and_clear();
    Ok(numbers.finish(None))
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
    let mut mix_rng = keyed_rng(config.seed, Stream::Mix, epoch, index);
    let mut model_rng = keyed_rng(config.seed, Stream::Regularize, epoch, index);
    let mixing_off = config.augment.off_epoch > 0 && fed.epoch >= config.augment.off_epoch;
    let mixing = if mixing_off {
        &Mixing::None
    } else {
        &setup.mixing
    };
    let (logits, targets) = mixed_forward(
        run.model(),
        fed.images,
        fed.labels,
        setup.num_classes(),
        mixing,
        config.augment.at.stage(),
        &mut mix_rng,
        &mut model_rng,
    );
    let targets = smooth_targets(targets, config.train.label_smoothing);
    let seen = logits.clone().detach();
    let scale = 1.0 / config.train.accumulate as f32;
    let (grads, loss) = loss_and_grads(run.model(), logits, targets, scale);
    if accumulation.add(run.model(), grads, fed.lr) {
        accumulation.step(run, config.train.clip_grad_norm);
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

    /// One optimiser step with what was summed.
    fn step(&mut self, run: &mut RunState, clip: f64) {
        run.optimizer_step(self.grads.grads(), self.lr, clip);
        self.pending = 0;
    }
}

/// The epoch's numbers: the host tally, the batches still on the device, and where the time
/// went.
struct Numbers {
    tally: Tally,
    pending: DeviceTally,
    read_every: usize,
    /// The learning rate of the last batch read back, for the progress line.
    pending_lr: f64,
    started: Instant,
    step_seconds: f64,
    loader_wait_seconds: f64,
}

impl Numbers {
    fn new(read_every: usize) -> Self {
        Self {
            tally: Tally::default(),
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

    fn finish(self, stopped_at: Option<usize>) -> EpochRun {
        let images_per_sec = match stopped_at {
            Some(_) => 0.0,
            None => self.tally.images as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
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
    fn new(prefix: String, steps: usize, first: usize) -> Self {
        let bar = progress_bar(steps, prefix.clone());
        bar.set_position(first as u64);
        Self {
            bar,
            plain: PlainProgress::new(steps, first),
            prefix,
            steps,
            first,
            started: Instant::now(),
        }
    }

    /// The numbers read back so far, after `done` batches of the epoch.
    fn report(&mut self, done: usize, tally: &Tally, lr: f64) {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = tally.images as f64 / elapsed;
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

/// Loss, top-1 and top-5 over the validation loader, with BatchNorm's running statistics.
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
            let logits = model.forward(images);
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
