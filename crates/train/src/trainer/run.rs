//! A whole run: [`train`], and what happens at the end of each epoch.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, anyhow};

use super::epoch::{Diverged, EpochRun, evaluate, save_mid_epoch, train_one_epoch};
use super::progress::time_left;
use super::state::RunState;
use super::{RunOptions, RunSummary, Setup, StopReason};
use crate::checkpoint;
use crate::config::Config;
use crate::metrics::{EpochMetrics, Tally, peak_rss_mib};
use crate::plots;
use crate::schedule::learning_rate;

/// Runs a whole training as `config` describes, printing progress, and returns its summary.
/// With `resume`, continues the run folder `<output_dir>/<name>` from its newest complete
/// checkpoint instead of starting a new one: every random stream is keyed by seed, epoch and
/// step, so the resumed run equals an uninterrupted one.
///
/// With several ranks (`options.world`), each runs this on its part of the data: gradients are
/// averaged after every backward pass, validation numbers summed, and rank 0 alone writes the
/// run folder and the log.
pub fn train(config: &Config, options: &RunOptions) -> Result<RunSummary> {
    let setup = Setup::new(config, &options.world)?;
    let mut run = RunState::open(&setup, options.resume)?;
    setup.print_header(&run);
    let (run_start, first_epoch) = (Instant::now(), run.epoch);
    while run.epoch < config.train.epochs {
        let started = Instant::now();
        let trained = train_one_epoch(&mut run, &setup, &options.stop)
            .map_err(|e| name_last_good_checkpoint(e, &run.run_dir))?;
        if let Some((batch, reason)) = trained.stopped_at {
            save_interrupted(&run, &setup, batch, reason, trained.tally)?;
            return Ok(run.summary(Some(reason)));
        }
        let metrics = finish_epoch(&mut run, &setup, trained, started)?;
        if run.primary() {
            let left = time_left(
                run_start.elapsed(),
                metrics.epoch - first_epoch,
                config.train.epochs - first_epoch,
            );
            print_epoch(&metrics, config.train.epochs, &left);
            keep_metrics(&mut run, config, metrics)?;
        }
    }
    if run.primary() {
        println!(
            "done: best val top-1 error {:.2}% at epoch {}; metrics in {}, checkpoints in {}",
            run.best_val_top1_err,
            run.best_epoch,
            run.log.path().display(),
            run.run_dir.join("checkpoints").display()
        );
    }
    Ok(run.summary(None))
}

/// Validates the epoch just trained, writes its checkpoints and its line of `metrics.jsonl`,
/// and returns its metrics.
fn finish_epoch(
    run: &mut RunState,
    setup: &Setup,
    trained: EpochRun,
    started: Instant,
) -> Result<EpochMetrics> {
    let (config, epoch) = (setup.config, run.epoch);
    for line in trained
        .tally
        .skipped_report(&format!("epoch {}", epoch + 1))
    {
        println!("{line}");
    }
    let world = setup.world;
    if let Some(checksum) = run.synchronise(world, &format!("after epoch {}", epoch + 1))?
        && run.primary()
    {
        println!(
            "weights identical on all {} ranks after epoch {} (checksum {checksum:016x})",
            world.size(),
            epoch + 1
        );
    }
    let evaluating = Instant::now();
    let (val_loader, classes, device) =
        (&setup.data.val, setup.num_classes(), &setup.backend.device);
    let mut val = evaluate(run.model(), val_loader, classes, device)?;
    val.reduce(world);
    let ema_val = match &run.ema {
        Some(ema) => {
            let mut tally = evaluate(&ema.model, val_loader, classes, device)?;
            tally.reduce(world);
            Some(tally)
        }
        None => None,
    };
    let eval_seconds = evaluating.elapsed().as_secs_f64();
    for line in val.skipped_report("validation") {
        println!("{line}");
    }
    let steps = setup.data.train.num_batches();
    let train = &trained.tally;
    let mut metrics = EpochMetrics {
        epoch: epoch + 1,
        lr: learning_rate(&config.train, epoch, steps.saturating_sub(1), steps),
        train_loss: train.loss(),
        train_top1_err: train.top1_err(),
        val_loss: val.loss(),
        val_top1_err: val.top1_err(),
        val_top5_err: val.top5_err(),
        images_per_sec: trained.images_per_sec,
        epoch_seconds: started.elapsed().as_secs_f64(),
        backend: setup.backend.name.to_string(),
        peak_rss_mib: peak_rss_mib(),
        step_seconds: trained.step_seconds,
        loader_wait_seconds: trained.loader_wait_seconds,
        eval_seconds,
        checkpoint_seconds: 0.0,
        skipped_images: train.skipped.len() + val.skipped.len(),
        ema_val_loss: ema_val.as_ref().map(Tally::loss),
        ema_val_top1_err: ema_val.as_ref().map(Tally::top1_err),
        ema_val_top5_err: ema_val.as_ref().map(Tally::top5_err),
    };
    let is_best = run.record_best(&metrics);
    let state = run.train_state(config, epoch + 1, 0, Some(metrics.clone()));
    let saving = Instant::now();
    run.save(config, &state, is_best)?;
    run.epoch += 1;
    metrics.checkpoint_seconds = saving.elapsed().as_secs_f64();
    metrics.epoch_seconds = started.elapsed().as_secs_f64();
    if run.primary() {
        run.log.append(&metrics)?;
    }
    Ok(metrics)
}

/// The epoch's line (and the moving average's, and where the time went).
fn print_epoch(metrics: &EpochMetrics, epochs: usize, run_left: &str) {
    println!(
        "epoch {:>3}/{epochs}  lr {:.4}  train loss {:.4} err {:5.2}%  val loss {:.4} top-1 {:5.2}% top-5 {:5.2}%  {:.1} img/s  {:.1}s  run left {run_left}",
        metrics.epoch,
        metrics.lr,
        metrics.train_loss,
        metrics.train_top1_err,
        metrics.val_loss,
        metrics.val_top1_err,
        metrics.val_top5_err,
        metrics.images_per_sec,
        metrics.epoch_seconds,
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
}

/// Adds the epoch to the run's metrics, `metrics.csv` and `curves.png` (a figure that cannot
/// be drawn is a warning).
fn keep_metrics(run: &mut RunState, config: &Config, metrics: EpochMetrics) -> Result<()> {
    run.metrics.push(metrics);
    run.log.write_csv(&run.metrics)?;
    let curves = run.run_dir.join("curves.png");
    if let Err(e) = plots::write_run_curves(&config.name, &run.metrics, &curves) {
        println!("warning: {e:#}");
    }
    Ok(())
}

/// A stop request in the middle of epoch `run.epoch`, before batch `batch`: a checkpoint of
/// that point (with the epoch's numbers so far, `tally`), to resume from.
fn save_interrupted(
    run: &RunState,
    setup: &Setup,
    batch: usize,
    reason: StopReason,
    tally: crate::metrics::Tally,
) -> Result<()> {
    save_mid_epoch(run, setup, batch, tally)?;
    if run.primary() {
        let why = match reason {
            StopReason::Interrupt => "Ctrl-C",
            StopReason::Terminate => "SIGTERM",
            StopReason::Requeue => "SIGUSR1",
        };
        println!(
            "interrupted in epoch {} after batch {batch} (step {}, {why}): saved {}; continue with --resume",
            run.epoch + 1,
            run.step,
            run.run_dir.join("checkpoints/last").display()
        );
    }
    Ok(())
}

/// A diverged run's error, with the checkpoint to continue from.
fn name_last_good_checkpoint(error: anyhow::Error, run_dir: &Path) -> anyhow::Error {
    let Some(diverged) = error.downcast_ref::<Diverged>() else {
        return error;
    };
    match checkpoint::latest(run_dir) {
        Ok(Some((last, state))) => anyhow!(
            "{diverged} and continue from the last good checkpoint, {} (epoch {}), with --resume",
            last.display(),
            state.epoch
        ),
        _ => anyhow!("{diverged} and start the run again (it has no checkpoint yet)"),
    }
}
