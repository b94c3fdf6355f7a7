//! The training loop, top to bottom: data, model, loss, optimizer, schedule, then per epoch
//! `train_one_epoch`, `evaluate`, metrics and checkpoints.

use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::loss::cross_entropy_with_logits;
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;

use cutmix_augment::{
    CutMix, CutMixOrMixup, Cutout, Mixing, Mixup, Mode, Partner, one_hot, smooth_targets,
};
use cutmix_data::{Batch, Loader, Stream, keyed_rng};
use cutmix_models::{Arch, Model, count_params};

use crate::backend::{self, Backend};
use crate::checkpoint::{self, TrainState};
use crate::config::{Config, MixMethod, MixMode, PartnerKind, TrainSection};
use crate::datasets::{self, Datasets};
use crate::ema::Ema;
use crate::metrics::{EpochMetrics, MetricsLog, Tally, peak_rss_mib};
use crate::plots;
use crate::schedule::learning_rate;
use crate::weights;

/// How to run: fresh or resumed, and a flag that asks the run to stop (Ctrl-C).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue `<output_dir>/<name>` from its newest complete checkpoint.
    pub resume: bool,
    /// Set from a signal handler: the run saves a checkpoint after the current step and returns
    /// with `interrupted` set.
    pub stop: Arc<AtomicBool>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    /// The run stopped early on request, with a checkpoint to resume from.
    pub interrupted: bool,
    pub metrics: Vec<EpochMetrics>,
    pub best_val_top1_err: f64,
    pub best_epoch: usize,
}

/// SGD as PyTorch's `torch.optim.SGD(momentum, nesterov, weight_decay, dampening=0)`.
/// Parameters that `train.decay_bn_and_bias = false` leaves out of weight decay: BatchNorm's
/// weight (gamma) and bias (beta), and every bias.
const NO_DECAY: &str = r"(^|\.)(gamma|beta|bias)$";

/// SGD as `torch.optim.SGD` with the run's momentum, Nesterov and weight decay (optionally not
/// on BatchNorm parameters and biases).
pub fn sgd(train: &TrainSection) -> ModuleOptimizer {
    let config = |weight_decay: f64| {
        let momentum = (train.momentum > 0.0).then_some(MomentumConfig {
            momentum: train.momentum,
            dampening: 0.0,
            nesterov: train.nesterov,
        });
        SgdConfig::new()
            .with_momentum(momentum)
            .with_weight_decay((weight_decay > 0.0).then_some(WeightDecayConfig {
                penalty: weight_decay as f32,
            }))
    };
    let optimizer = config(train.weight_decay).init();
    if train.decay_bn_and_bias || train.weight_decay == 0.0 {
        return optimizer;
    }
    let no_decay = ParamGroup::from_regex(NO_DECAY).expect("a valid pattern");
    optimizer.with_group(no_decay, config(0.0).build(), None)
}

pub fn mixing(config: &Config) -> Mixing {
    let a = &config.augment;
    let mode = match a.mode {
        MixMode::Batch => Mode::Batch,
        MixMode::Elem => Mode::Elem,
    };
    let partner = match a.partner {
        PartnerKind::Permutation => Partner::Permutation,
        PartnerKind::Flip => Partner::Flip,
        PartnerKind::Roll => Partner::Roll,
    };
    let cutmix = CutMix {
        beta: a.beta,
        prob: a.prob,
        mode,
        partner,
    };
    let mixup = Mixup {
        alpha: a.mixup_alpha,
        prob: a.prob,
        mode,
        partner,
    };
    match a.method {
        MixMethod::None => Mixing::None,
        MixMethod::Cutmix => Mixing::CutMix(cutmix),
        MixMethod::Mixup => Mixing::Mixup(mixup),
        MixMethod::Cutout => Mixing::Cutout(Cutout {
            size: a.cutout_size,
            prob: a.prob,
        }),
        MixMethod::CutmixMixup => Mixing::CutMixOrMixup(CutMixOrMixup {
            cutmix,
            mixup,
            switch_prob: a.switch_prob,
        }),
    }
}

/// Uploads a host batch's images as an NCHW tensor; returns it with the labels.
pub fn images_tensor(batch: Batch, device: &Device) -> (Tensor<4>, Vec<usize>) {
    let shape = [batch.len(), 3, batch.size, batch.size];
    let images = Tensor::from_data(TensorData::new(batch.images, shape), device);
    (images, batch.labels)
}

/// What one optimisation step saw.
pub struct StepOutput {
    pub loss: f32,
    /// `[batch][classes]` logits, row-major.
    pub logits: Vec<f32>,
}

/// One SGD step from a forward pass already made: soft-target cross-entropy of `logits`
/// against `targets`, backward, update.
/// Backward pass of one batch: the gradients of its loss times `loss_scale` (1 / the number
/// of accumulated batches), and its (unscaled) loss and logits.
pub fn backward(
    model: &Model,
    logits: Tensor<2>,
    targets: Tensor<2>,
    loss_scale: f32,
) -> (GradientsParams, StepOutput) {
    let loss = cross_entropy_with_logits(logits.clone(), targets);
    let loss_value = loss.clone().into_scalar::<f32>();
    let logits: Vec<f32> = logits
        .detach()
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 logits");
    let loss = if loss_scale == 1.0 {
        loss
    } else {
        loss * loss_scale
    };
    let grads = GradientsParams::from_grads(loss.backward(), model);
    (
        grads,
        StepOutput {
            loss: loss_value,
            logits,
        },
    )
}

/// One optimiser step with `grads`, their global norm clipped to `clip` first (0 = no clip).
pub fn apply_step(
    model: Model,
    optimizer: &mut ModuleOptimizer,
    mut grads: GradientsParams,
    lr: f64,
    clip: f64,
) -> Model {
    if clip > 0.0 {
        clip_global_norm(&model, &mut grads, clip);
    }
    optimizer.step(lr, model, grads)
}

/// One training step on one batch: backward, then the optimiser.
pub fn train_step(
    model: Model,
    optimizer: &mut ModuleOptimizer,
    logits: Tensor<2>,
    targets: Tensor<2>,
    lr: f64,
) -> (Model, StepOutput) {
    let (grads, out) = backward(&model, logits, targets, 1.0);
    (apply_step(model, optimizer, grads, lr, 0.0), out)
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))`, `norm` being the L2 norm of all
/// gradients together, as `torch.nn.utils.clip_grad_norm_` (on the device, no read-back).
/// Returns the norm before clipping.
pub fn clip_global_norm(model: &Model, grads: &mut GradientsParams, max_norm: f64) -> Tensor<1> {
    struct SquaredSum<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredSum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                let squares = grad.powi_scalar(2).sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + squares,
                    None => squares,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: Tensor<1>,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.remove::<D>(param.id) {
                let factor = self.factor.clone().reshape([1; D]);
                self.grads.register(param.id, grad * factor);
            }
        }
    }
    let mut sum = SquaredSum { grads, total: None };
    model.visit(&mut sum);
    let Some(total) = sum.total else {
        return Tensor::zeros([1], &Device::default());
    };
    let norm = total.sqrt();
    let factor = ((norm.clone() + 1e-6).recip() * max_norm).clamp_max(1.0);
    model.visit(&mut Scale { grads, factor });
    norm
}

/// The training forward pass of one batch with its mixing: on the input images, or on the
/// feature map after a stage (`augment.at`). Returns the logits and the soft targets.
#[allow(clippy::too_many_arguments)]
pub fn mixed_forward(
    model: &Model,
    images: Tensor<4>,
    labels: &[usize],
    num_classes: usize,
    mixing: &Mixing,
    at: Option<usize>,
    mix_rng: &mut StdRng,
    model_rng: &mut StdRng,
) -> (Tensor<2>, Tensor<2>) {
    match at {
        None => {
            let mixed = mixing.apply(images, labels, num_classes, mix_rng);
            (model.forward_train(mixed.images, model_rng), mixed.targets)
        }
        Some(stage) => {
            let mut targets = None;
            let logits = model.forward_train_mixed(images, stage, model_rng, &mut |features| {
                let mixed = mixing.apply(features, labels, num_classes, mix_rng);
                targets = Some(mixed.targets);
                mixed.images
            });
            (logits, targets.expect("the model ran the mixing stage"))
        }
    }
}

fn progress_bar(len: usize, prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:28.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// The rest of the run at the pace so far, as `1h02m`, `3m05s` or `12s`.
fn time_left(elapsed: std::time::Duration, done: usize, total: usize) -> String {
    duration(elapsed.as_secs_f64() / done as f64 * (total - done) as f64)
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
fn duration(seconds: f64) -> String {
    match seconds.round() as u64 {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// A non-finite training loss: the run stops instead of training on NaN.
#[derive(Debug)]
struct Diverged {
    loss: f32,
    epoch: usize,
    step: usize,
    lr: f64,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training loss is {} at epoch {} step {}: the run diverged; lower train.lr (now {})",
            self.loss,
            self.epoch,
            self.step,
            if (1e-4..1e4).contains(&self.lr) {
                self.lr.to_string()
            } else {
                format!("{:e}", self.lr)
            }
        )
    }
}

impl std::error::Error for Diverged {}

/// What one epoch of training gave.
struct EpochRun {
    model: Model,
    /// Loss and errors over the batches as fed.
    tally: Tally,
    images_per_sec: f64,
    /// The batch a stop request (Ctrl-C) ended the epoch at.
    stopped_at: Option<usize>,
    /// Seconds inside the model step (mixing, forward, backward, optimiser; the loss read back
    /// waits for the device, so this is device time too).
    step_seconds: f64,
    /// Seconds the training thread waited for the loader's next batch.
    loader_wait_seconds: f64,
}

/// Progress lines for logs: when stderr is not a terminal the bar draws nothing, so a line is
/// printed about every tenth of the epoch and at least once a minute.
struct PlainProgress {
    every: usize,
    last: Instant,
}

impl PlainProgress {
    fn new(steps: usize) -> Option<Self> {
        (!std::io::stderr().is_terminal()).then(|| Self {
            every: steps.div_ceil(10).max(1),
            last: Instant::now(),
        })
    }

    fn tick(&mut self, done: usize, steps: usize, line: impl FnOnce() -> String) {
        if done.is_multiple_of(self.every) || done == steps || self.last.elapsed().as_secs() >= 60 {
            println!("{}", line());
            self.last = Instant::now();
        }
    }
}

/// One optimiser step with the accumulated gradients (clipped as the config says), counted in
/// `step`, and the moving average of the weights moved after it.
fn optimizer_step(
    model: Model,
    optimizer: &mut ModuleOptimizer,
    accumulator: &mut GradientsAccumulator<Model>,
    lr: f64,
    config: &Config,
    step: &mut usize,
    ema: &mut Option<Ema>,
) -> Model {
    let grads = accumulator.grads();
    let model = apply_step(model, optimizer, grads, lr, config.train.clip_grad_norm);
    *step += 1;
    if let Some(ema) = ema {
        ema.update(&model);
    }
    model
}

/// Trains for one epoch.
#[allow(clippy::too_many_arguments)]
fn train_one_epoch(
    mut model: Model,
    optimizer: &mut ModuleOptimizer,
    loader: &Loader,
    mixing: &Mixing,
    config: &Config,
    num_classes: usize,
    epoch: usize,
    first_batch: usize,
    step: &mut usize,
    ema: &mut Option<Ema>,
    device: &Device,
    stop: &AtomicBool,
) -> Result<EpochRun> {
    let steps_per_epoch = loader.num_batches();
    let prefix = format!("epoch {}/{}", epoch + 1, config.train.epochs);
    let bar = progress_bar(steps_per_epoch, prefix.clone());
    bar.set_position(first_batch as u64);
    let mut plain = PlainProgress::new(steps_per_epoch);
    let mut tally = Tally::default();
    let (mut step_seconds, mut loader_wait_seconds) = (0.0, 0.0);
    let start = Instant::now();
    let accumulate = config.train.accumulate;
    let mut accumulator = GradientsAccumulator::<Model>::new();
    let mut pending = 0;
    let mut last_lr = 0.0;
    let mut batches = loader.epoch_from(epoch as u64, first_batch).enumerate();
    loop {
        let waited = Instant::now();
        let Some((offset, batch)) = batches.next() else {
            break;
        };
        loader_wait_seconds += waited.elapsed().as_secs_f64();
        let index = first_batch + offset;
        // A stop waits for the end of an accumulation, so a checkpoint never holds half of one.
        if pending == 0 && stop.load(Ordering::Relaxed) {
            bar.abandon();
            return Ok(EpochRun {
                model,
                tally,
                images_per_sec: 0.0,
                stopped_at: Some(index),
                step_seconds,
                loader_wait_seconds,
            });
        }
        let mut batch = batch?;
        tally.skipped.append(&mut batch.skipped);
        // BatchNorm cannot normalise over a single image (PyTorch refuses it too).
        if batch.len() < 2 {
            bar.inc(1);
            continue;
        }
        let stepping = Instant::now();
        let lr = learning_rate(&config.train, epoch, index, steps_per_epoch);
        let mut rng = keyed_rng(config.seed, Stream::Mix, epoch as u64, index as u64);
        let (images, labels) = images_tensor(batch, device);
        let mut model_rng = keyed_rng(config.seed, Stream::Regularize, epoch as u64, index as u64);
        let mixing_off = config.augment.off_epoch > 0 && epoch >= config.augment.off_epoch;
        let (logits, targets) = mixed_forward(
            &model,
            images,
            &labels,
            num_classes,
            if mixing_off { &Mixing::None } else { mixing },
            config.augment.at.stage(),
            &mut rng,
            &mut model_rng,
        );
        let targets = smooth_targets(targets, config.train.label_smoothing);
        let (grads, out) = backward(&model, logits, targets, 1.0 / accumulate as f32);
        accumulator.accumulate(&model, grads);
        pending += 1;
        last_lr = lr;
        if pending == accumulate {
            model = optimizer_step(model, optimizer, &mut accumulator, lr, config, step, ema);
            pending = 0;
        }
        step_seconds += stepping.elapsed().as_secs_f64();
        if !out.loss.is_finite() {
            bar.abandon();
            return Err(Diverged {
                loss: out.loss,
                epoch: epoch + 1,
                step: *step + 1,
                lr,
            }
            .into());
        }
        tally.add(f64::from(out.loss), &out.logits, &labels);
        let elapsed = start.elapsed().as_secs_f64().max(1e-9);
        let rate = tally.images as f64 / elapsed;
        bar.set_message(format!(
            "loss {:.4} lr {lr:.4} {rate:.1} img/s",
            tally.loss()
        ));
        bar.inc(1);
        if let Some(plain) = &mut plain {
            let done = index + 1;
            plain.tick(done, steps_per_epoch, || {
                let left = elapsed / (done - first_batch) as f64 * (steps_per_epoch - done) as f64;
                format!(
                    "{prefix} step {done}/{steps_per_epoch}  loss {:.4}  lr {lr:.4}  {rate:.1} img/s  epoch left {}",
                    tally.loss(),
                    duration(left)
                )
            });
        }
    }
    if pending > 0 {
        // The epoch's last batches, fewer than `accumulate`: one step with what they summed.
        let stepping = Instant::now();
        model = optimizer_step(
            model,
            optimizer,
            &mut accumulator,
            last_lr,
            config,
            step,
            ema,
        );
        step_seconds += stepping.elapsed().as_secs_f64();
    }
    bar.finish_and_clear();
    let images_per_sec = tally.images as f64 / start.elapsed().as_secs_f64().max(1e-9);
    Ok(EpochRun {
        model,
        tally,
        images_per_sec,
        stopped_at: None,
        step_seconds,
        loader_wait_seconds,
    })
}

/// Loss, top-1 and top-5 over the validation loader, with BatchNorm's running statistics.
pub fn evaluate(
    model: &Model,
    loader: &Loader,
    num_classes: usize,
    device: &Device,
) -> Result<Tally> {
    let model = model.valid();
    let mut tally = Tally::default();
    let bar = progress_bar(loader.num_batches(), "  validate".into());
    for batch in loader.epoch(0) {
        let mut batch = batch?;
        tally.skipped.append(&mut batch.skipped);
        if batch.is_empty() {
            bar.inc(1);
            continue;
        }
        let (images, labels) = images_tensor(batch, device);
        let logits = model.forward(images);
        let targets = one_hot(&labels, num_classes, device);
        let loss = cross_entropy_with_logits(logits.clone(), targets).into_scalar::<f32>();
        let logits: Vec<f32> = logits
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 logits");
        tally.add(f64::from(loss), &logits, &labels);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(tally)
}

/// Where a run starts: a fresh run folder, or a resumed one at its last complete checkpoint.
struct Start {
    run_dir: PathBuf,
    model: Model,
    /// The weights' moving average from the checkpoint (`ema.bpk`), when it has one.
    ema: Option<Model>,
    optimizer: ModuleOptimizer,
    state: Option<TrainState>,
    metrics: Vec<EpochMetrics>,
}

/// The checkpoint `--resume` continues from: `None` when the run folder exists but stopped before
/// its first checkpoint (the run then starts from the beginning in that folder); an error when
/// there is no run folder at all.
fn resumable(config: &Config) -> Result<(Option<(PathBuf, TrainState)>, checkpoint::RunLock)> {
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

/// Restores model, optimiser, progress and metrics from `checkpoint` of the run folder.
fn restore(config: &Config, model: Model, checkpoint: &Path, state: TrainState) -> Result<Start> {
    let run_dir = config.output_dir.join(&config.name);
    // A resumed run with another config is allowed (a longer schedule, say), but said out loud.
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
    let model = model
        .try_load_file(checkpoint.join("model.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: not this config's model: {e}", checkpoint.display()))?;
    let optimizer = sgd(&config.train)
        .load(checkpoint.join("optimizer.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", checkpoint.join("optimizer.bpk").display()))?;
    let ema_file = checkpoint.join("ema.bpk");
    let ema = if config.train.ema_decay > 0.0 && ema_file.is_file() {
        Some(
            model
                .valid()
                .try_load_file(&ema_file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", ema_file.display()))?,
        )
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
    Ok(Start {
        run_dir,
        model,
        ema,
        optimizer,
        state: Some(state),
        metrics,
    })
}

/// Runs a whole training as `config` describes, printing progress, and returns its summary.
/// With `resume`, continues the run folder `<output_dir>/<name>` from its newest complete
/// checkpoint instead of starting a new one: every random stream is keyed by seed, epoch and
/// step, so the resumed run equals an uninterrupted one.
pub fn train(config: &Config, options: &RunOptions) -> Result<RunSummary> {
    let resume_run = options.resume;
    // Everything that can fail on user input fails here, before the run folder is made.
    let Backend {
        device,
        name: backend_name,
        description,
    } = backend::select(config.backend)?;
    let Datasets {
        train: train_loader,
        val: val_loader,
        num_classes: dataset_classes,
        classes,
        warnings: data_warnings,
    } = datasets::build(config)?;
    let model_config = config.model_config()?;
    let train_device = device.clone().autodiff();
    let mut init_rng = keyed_rng(config.seed, Stream::Init, 0, 0);
    let mut model = model_config.init(&mut init_rng, &train_device)?;
    let (checkpoint, mut lock) = if resume_run {
        let (checkpoint, lock) = resumable(config)?;
        (checkpoint, Some(lock))
    } else {
        (None, None)
    };
    let mut init_summary = None;
    if !config.model.init_from.is_empty() && checkpoint.is_none() {
        let path = PathBuf::from(&config.model.init_from);
        let (loaded, summary) =
            weights::load(model, &path).context("config key model.init_from")?;
        model = loaded;
        init_summary = Some((path, summary));
    }

    let fresh = |run_dir: PathBuf, model: Model| Start {
        run_dir,
        model,
        ema: None,
        optimizer: sgd(&config.train),
        state: None,
        metrics: Vec::new(),
    };
    let start = match checkpoint {
        Some((checkpoint, state)) => restore(config, model, &checkpoint, state)?,
        None if resume_run => {
            let run_dir = config.output_dir.join(&config.name);
            println!(
                "--resume: {} stopped before its first checkpoint; starting it from the beginning",
                run_dir.display()
            );
            fs::create_dir_all(run_dir.join("checkpoints")).with_context(|| {
                format!("cannot create {}", run_dir.join("checkpoints").display())
            })?;
            MetricsLog::new(&run_dir).truncate_to(0)?;
            fresh(run_dir, model)
        }
        None => {
            let (run_dir, renamed) = checkpoint::create_run_dir(&config.output_dir, &config.name)?;
            if renamed {
                println!(
                    "{} exists; this run writes to {} (continue the old one with --resume)",
                    config.output_dir.join(&config.name).display(),
                    run_dir.display()
                );
            }
            fresh(run_dir, model)
        }
    };
    if lock.is_none() {
        lock = Some(checkpoint::lock_run_dir(&start.run_dir)?);
    }
    let _lock = lock;
    let Start {
        run_dir,
        mut model,
        ema: saved_average,
        mut optimizer,
        state: resumed,
        metrics: mut all_metrics,
    } = start;
    let decay = config.train.ema_decay;
    let mut ema = (decay > 0.0).then(|| match saved_average {
        Some(average) => Ema::from_average(average, decay),
        None => {
            if resumed.is_some() {
                println!(
                    "train.ema_decay: the checkpoint has no moving average; it starts from the current weights"
                );
            }
            Ema::new(&model, decay)
        }
    });
    checkpoint::write_atomically(&run_dir.join("config.toml"), config.to_toml().as_bytes())?;
    if let Some(classes) = &classes {
        checkpoint::write_atomically(&run_dir.join("classes.txt"), classes.join("\n").as_bytes())?;
    }
    println!("backend: {description}");
    println!(
        "model: {} depth {}{} ({} parameters), {} classes",
        config.model.arch,
        config.model.depth,
        if model_config.arch == Arch::PyramidNet {
            format!(" alpha {}", config.model.alpha)
        } else {
            String::new()
        },
        count_params(&model),
        model_config.num_classes
    );
    if let Some((path, summary)) = &init_summary {
        println!("init from {}: {summary}", path.display());
    }
    println!(
        "data: {} training and {} validation images ({} classes) from {}, batch {}",
        train_loader.len(),
        val_loader.len(),
        dataset_classes,
        config.data.root.display(),
        config.train.batch_size
    );
    let batch_mib = (config.train.batch_size * 3 * config.data.image_size.pow(2) * 4) as f64
        / (1024.0 * 1024.0);
    println!(
        "loader: {} worker thread(s), at most {} batches in memory ({:.0} MiB)",
        config.data.workers,
        config.data.prefetch + 1,
        (config.data.prefetch + 1) as f64 * batch_mib
    );
    for warning in &data_warnings {
        println!("{warning}");
    }
    println!("run folder: {}", run_dir.display());

    let mixing = mixing(config);
    let metrics_log = MetricsLog::new(&run_dir);
    let num_classes = model_config.num_classes;
    let (first_epoch, mut first_batch, mut step, mut best_err, mut best_epoch) = match &resumed {
        Some(state) => (
            state.epoch,
            state.batch,
            state.step,
            state.best_val_top1_err,
            state.best_epoch,
        ),
        None => (0, 0, 0, f64::INFINITY, 0),
    };
    let run_start = Instant::now();
    for epoch in first_epoch..config.train.epochs {
        let start = Instant::now();
        let EpochRun {
            model: next,
            tally: train_tally,
            images_per_sec,
            stopped_at,
            step_seconds,
            loader_wait_seconds,
        } = train_one_epoch(
            model,
            &mut optimizer,
            &train_loader,
            &mixing,
            config,
            num_classes,
            epoch,
            first_batch,
            &mut step,
            &mut ema,
            &train_device,
            &options.stop,
        )
        .map_err(|e| match e.downcast_ref::<Diverged>() {
            Some(diverged) => match checkpoint::latest(&run_dir) {
                Ok(Some((last, state))) => anyhow::anyhow!(
                    "{diverged} and continue from the last good checkpoint, {} (epoch {}), with --resume",
                    last.display(),
                    state.epoch
                ),
                _ => anyhow::anyhow!("{diverged} and start the run again (it has no checkpoint yet)"),
            },
            None => e,
        })?;
        first_batch = 0;
        if let Some(batch) = stopped_at {
            let state = TrainState {
                epoch,
                step,
                seed: config.seed,
                batch,
                val_top1_err: all_metrics.last().map_or(f64::NAN, |m| m.val_top1_err),
                best_val_top1_err: best_err,
                best_epoch,
                metrics: None,
            };
            checkpoint::save(
                &run_dir,
                &next,
                ema.as_ref().map(|e| &e.model),
                &optimizer,
                &state,
                false,
                config.train.keep_last,
            )
            .context("saving the checkpoint")?;
            println!(
                "interrupted in epoch {} after batch {batch} (step {step}): saved {}; continue with --resume",
                epoch + 1,
                run_dir.join("checkpoints/last").display()
            );
            return Ok(RunSummary {
                run_dir,
                interrupted: true,
                metrics: all_metrics,
                best_val_top1_err: best_err,
                best_epoch,
            });
        }
        model = next;
        for line in train_tally.skipped_report(&format!("epoch {}", epoch + 1)) {
            println!("{line}");
        }
        let evaluating = Instant::now();
        let val = evaluate(&model, &val_loader, num_classes, &device)?;
        let ema_val = match &ema {
            Some(ema) => Some(evaluate(&ema.model, &val_loader, num_classes, &device)?),
            None => None,
        };
        let eval_seconds = evaluating.elapsed().as_secs_f64();
        for line in val.skipped_report("validation") {
            println!("{line}");
        }
        let mut metrics = EpochMetrics {
            epoch: epoch + 1,
            lr: learning_rate(
                &config.train,
                epoch,
                train_loader.num_batches().saturating_sub(1),
                train_loader.num_batches(),
            ),
            train_loss: train_tally.loss(),
            train_top1_err: train_tally.top1_err(),
            val_loss: val.loss(),
            val_top1_err: val.top1_err(),
            val_top5_err: val.top5_err(),
            images_per_sec,
            epoch_seconds: start.elapsed().as_secs_f64(),
            backend: backend_name.to_string(),
            peak_rss_mib: peak_rss_mib(),
            step_seconds,
            loader_wait_seconds,
            eval_seconds,
            checkpoint_seconds: 0.0,
            skipped_images: train_tally.skipped.len() + val.skipped.len(),
            ema_val_loss: ema_val.as_ref().map(Tally::loss),
            ema_val_top1_err: ema_val.as_ref().map(Tally::top1_err),
            ema_val_top5_err: ema_val.as_ref().map(Tally::top5_err),
        };
        let is_best = metrics.val_top1_err < best_err;
        if is_best {
            best_err = metrics.val_top1_err;
            best_epoch = epoch + 1;
        }
        let state = TrainState {
            epoch: epoch + 1,
            step,
            seed: config.seed,
            batch: 0,
            val_top1_err: metrics.val_top1_err,
            best_val_top1_err: best_err,
            best_epoch,
            metrics: Some(metrics.clone()),
        };
        let saving = Instant::now();
        checkpoint::save(
            &run_dir,
            &model,
            ema.as_ref().map(|e| &e.model),
            &optimizer,
            &state,
            is_best,
            config.train.keep_last,
        )
        .context("saving the checkpoint")?;
        metrics.checkpoint_seconds = saving.elapsed().as_secs_f64();
        metrics.epoch_seconds = start.elapsed().as_secs_f64();
        metrics_log.append(&metrics)?;
        println!(
            "epoch {:>3}/{}  lr {:.4}  train loss {:.4} err {:5.2}%  val loss {:.4} top-1 {:5.2}% top-5 {:5.2}%  {:.1} img/s  {:.1}s  run left {}",
            epoch + 1,
            config.train.epochs,
            metrics.lr,
            metrics.train_loss,
            metrics.train_top1_err,
            metrics.val_loss,
            metrics.val_top1_err,
            metrics.val_top5_err,
            metrics.images_per_sec,
            metrics.epoch_seconds,
            time_left(
                run_start.elapsed(),
                epoch + 1 - first_epoch,
                config.train.epochs - first_epoch
            )
        );
        if let (Some(loss), Some(top1), Some(top5)) = (
            metrics.ema_val_loss,
            metrics.ema_val_top1_err,
            metrics.ema_val_top5_err,
        ) {
            println!(
                "           moving average of the weights: val loss {loss:.4} top-1 {top1:5.2}% top-5 {top5:5.2}%"
            );
        }
        println!("{}", metrics.time_line());
        all_metrics.push(metrics);
        metrics_log.write_csv(&all_metrics)?;
        let curves = run_dir.join("curves.png");
        if let Err(e) = plots::write_run_curves(&config.name, &all_metrics, &curves) {
            println!("warning: {e:#}");
        }
    }
    println!(
        "done: best val top-1 error {best_err:.2}% at epoch {best_epoch}; metrics in {}, checkpoints in {}",
        metrics_log.path().display(),
        run_dir.join("checkpoints").display()
    );
    Ok(RunSummary {
        run_dir,
        interrupted: false,
        metrics: all_metrics,
        best_val_top1_err: best_err,
        best_epoch,
    })
}
