//! Per-epoch metrics and the accuracy counts behind them.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cutmix_data::Skipped;
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl` (errors in percent, as the paper reports them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    /// Top-1 error on the training batches as fed (after mixing), against the original labels.
    pub train_top1_err: f64,
    pub val_loss: f64,
    pub val_top1_err: f64,
    pub val_top5_err: f64,
    pub images_per_sec: f64,
    pub epoch_seconds: f64,
    pub backend: String,
    /// The process's peak resident memory so far, in MiB (Linux; absent elsewhere).
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// Where the epoch's time went: inside the model step (mixing, forward, backward,
    /// optimiser), waiting for the loader, validating, writing the checkpoint; the rest
    /// (logging, figures, moving batches to the device) is `epoch_seconds` minus these.
    #[serde(default)]
    pub step_seconds: f64,
    #[serde(default)]
    pub loader_wait_seconds: f64,
    #[serde(default)]
    pub eval_seconds: f64,
    #[serde(default)]
    pub checkpoint_seconds: f64,
    /// Image files left out of this epoch's training and validation batches (unreadable).
    #[serde(default)]
    pub skipped_images: usize,
    /// Validation of the weights' moving average (`train.ema_decay`), when it is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_top1_err: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_top5_err: Option<f64>,
}

impl EpochMetrics {
    /// The share of the epoch spent outside the model step, in percent.
    pub fn outside_step_percent(&self) -> f64 {
        100.0 * (1.0 - self.step_seconds / self.epoch_seconds.max(1e-9))
    }

    /// One line: the shares of the epoch outside the model step.
    pub fn time_line(&self) -> String {
        let share = |s: f64| 100.0 * s / self.epoch_seconds.max(1e-9);
        let other = self.epoch_seconds
            - self.step_seconds
            - self.loader_wait_seconds
            - self.eval_seconds
            - self.checkpoint_seconds;
        format!(
            "           time outside the model step: {:.1}% (loader wait {:.1}%, validation {:.1}%, checkpoint {:.1}%, other {:.1}%)",
            self.outside_step_percent(),
            share(self.loader_wait_seconds),
            share(self.eval_seconds),
            share(self.checkpoint_seconds),
            share(other.max(0.0))
        )
    }
}

pub use cutmix_data::peak_rss_mib;

/// The columns of `metrics.csv`, in order.
const CSV_COLUMNS: &str = "epoch,lr,train_loss,train_top1_err,val_loss,val_top1_err,val_top5_err,images_per_sec,epoch_seconds,backend,peak_rss_mib,step_seconds,loader_wait_seconds,eval_seconds,checkpoint_seconds,skipped_images,ema_val_loss,ema_val_top1_err,ema_val_top5_err";

impl EpochMetrics {
    fn csv_row(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.epoch,
            self.lr,
            self.train_loss,
            self.train_top1_err,
            self.val_loss,
            self.val_top1_err,
            self.val_top5_err,
            self.images_per_sec,
            self.epoch_seconds,
            self.backend,
            optional(self.peak_rss_mib),
            self.step_seconds,
            self.loader_wait_seconds,
            self.eval_seconds,
            self.checkpoint_seconds,
            self.skipped_images,
            optional(self.ema_val_loss),
            optional(self.ema_val_top1_err),
            optional(self.ema_val_top5_err)
        )
    }
}

/// A CSV cell: the number, or nothing.
fn optional(value: Option<f64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Appends one JSON object per line to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            path: run_dir.join("metrics.jsonl"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every epoch's metrics in the log; a line that is not an epoch's metrics is an error
    /// naming the file and line.
    pub fn read(&self) -> Result<Vec<EpochMetrics>> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{} line {}", self.path.display(), i + 1))
            })
            .collect()
    }

    /// Keeps the epochs up to `epoch` (a resumed run drops the lines of epochs whose checkpoint
    /// a crash lost) and returns them; a missing file is an empty log.
    pub fn truncate_to(&self, epoch: usize) -> Result<Vec<EpochMetrics>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path.display()));
            }
        };
        let kept: Vec<EpochMetrics> = text
            .lines()
            .filter_map(|line| serde_json::from_str::<EpochMetrics>(line).ok())
            .filter(|m| m.epoch <= epoch)
            .collect();
        let mut out = String::new();
        for metrics in &kept {
            out.push_str(&serde_json::to_string(metrics).expect("metrics serialise"));
            out.push('\n');
        }
        crate::checkpoint::write_atomically(&self.path, out.as_bytes())?;
        Ok(kept)
    }

    /// Rewrites `metrics.csv` beside the JSON lines: a header and one row per epoch.
    pub fn write_csv(&self, all: &[EpochMetrics]) -> Result<()> {
        let mut out = format!("{CSV_COLUMNS}\n");
        for metrics in all {
            out.push_str(&metrics.csv_row());
            out.push('\n');
        }
        crate::checkpoint::write_atomically(&self.path.with_extension("csv"), out.as_bytes())
    }

    pub fn append(&self, metrics: &EpochMetrics) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let line = serde_json::to_string(metrics).expect("metrics serialise");
        writeln!(file, "{line}").with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Running sums for loss and top-k accuracy over an epoch (stored in a checkpoint taken in the
/// middle of one; the loss sum as its bits, so a resumed epoch adds on to exactly the same
/// number).
#[derive(Default, Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    pub images: usize,
    #[serde(with = "f64_bits")]
    loss_sum: f64,
    top1_wrong: usize,
    top5_wrong: usize,
    /// Files left out of the batches because they could not be read or decoded.
    #[serde(skip)]
    pub skipped: Vec<Skipped>,
}

/// An f64 stored as the integer of its bits (JSON's decimal form need not read back exactly).
mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(f64::from_bits(u64::deserialize(deserializer)?))
    }
}

impl Tally {
    /// The sums over every rank of a data-parallel run (the files skipped stay each rank's).
    pub fn reduce(&mut self, world: &crate::world::World) {
        if world.size() == 1 {
            return;
        }
        let mut sums = [
            self.images as f64,
            self.loss_sum,
            self.top1_wrong as f64,
            self.top5_wrong as f64,
        ];
        world.sum_f64(&mut sums);
        self.images = sums[0] as usize;
        self.loss_sum = sums[1];
        self.top1_wrong = sums[2] as usize;
        self.top5_wrong = sums[3] as usize;
    }

    /// The numbers alone, without the skipped files (for a checkpoint).
    pub fn counts(&self) -> Tally {
        Tally {
            skipped: Vec::new(),
            ..self.clone()
        }
    }

    /// The log lines about skipped files: the count, then `skipped: <path>: <reason>` for
    /// the first 20 (none when nothing was skipped).
    pub fn skipped_report(&self, what: &str) -> Vec<String> {
        const NAMED: usize = 20;
        if self.skipped.is_empty() {
            return Vec::new();
        }
        let mut lines = vec![format!(
            "{what}: skipped {} image file(s) that could not be read or decoded",
            self.skipped.len()
        )];
        lines.extend(
            self.skipped
                .iter()
                .take(NAMED)
                .map(|s| format!("skipped: {}: {}", s.path.display(), s.reason)),
        );
        if self.skipped.len() > NAMED {
            lines.push(format!(
                "skipped: ... and {} more",
                self.skipped.len() - NAMED
            ));
        }
        lines
    }

    /// Adds a batch: its mean loss, its logits (`[labels.len()][classes]`, row-major) and labels.
    pub fn add(&mut self, mean_loss: f64, logits: &[f32], labels: &[usize]) {
        let classes = logits.len() / labels.len().max(1);
        let k = classes.min(5);
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            let own = row[label];
            // Rank of the true class: classes that score higher (ties counted against it
            // only when they come first, as a stable sort would place them).
            let higher = row
                .iter()
                .enumerate()
                .filter(|&(c, &v)| v > own || (v == own && c < label))
                .count();
            self.top1_wrong += usize::from(higher >= 1);
            self.top5_wrong += usize::from(higher >= k);
        }
        self.loss_sum += mean_loss * labels.len() as f64;
        self.images += labels.len();
    }

    /// Adds a batch counted elsewhere (on the device): its mean loss, its size and its top-1 and
    /// top-5 mistakes, with the same arithmetic as [`add`](Self::add).
    pub fn add_counts(
        &mut self,
        mean_loss: f64,
        images: usize,
        top1_wrong: usize,
        top5_wrong: usize,
    ) {
        self.top1_wrong += top1_wrong;
        self.top5_wrong += top5_wrong;
        self.loss_sum += mean_loss * images as f64;
        self.images += images;
    }

    pub fn loss(&self) -> f64 {
        self.loss_sum / self.images.max(1) as f64
    }

    pub fn top1_err(&self) -> f64 {
        100.0 * self.top1_wrong as f64 / self.images.max(1) as f64
    }

    pub fn top5_err(&self) -> f64 {
        100.0 * self.top5_wrong as f64 / self.images.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts_by_rank_of_the_true_class() {
        let mut tally = Tally::default();
        // 6 classes; true class ranks 1st, 2nd and 6th.
        let logits = [
            9.0, 1.0, 2.0, 3.0, 4.0, 5.0, //
            1.0, 9.0, 2.0, 3.0, 4.0, 5.0, //
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0,
        ];
        tally.add(2.0, &logits, &[0, 5, 0]);
        assert_eq!(tally.images, 3);
        assert!((tally.top1_err() - 200.0 / 3.0).abs() < 1e-9);
        assert!((tally.top5_err() - 100.0 / 3.0).abs() < 1e-9);
        assert!((tally.loss() - 2.0).abs() < 1e-12);
    }
}
