//! The loader's batches on the device, one batch ahead of the step that uses them.

use std::time::Instant;

use burn::tensor::{Device, Int, Tensor};

use cutmix_data::{Batch, DataError, EpochIter, Skipped};

use super::stats::labels_tensor;
use super::step::images_tensor;

/// One batch as the step takes it: images and labels uploaded, labels also on the host (the
/// mixing draws partners' labels there).
pub struct DeviceBatch {
    pub labels: Vec<usize>,
    /// Images and labels on the device; `None` for a batch too small to use (BatchNorm cannot
    /// normalise one image; validation skips empty batches), which is not uploaded.
    pub tensors: Option<(Tensor<4>, Tensor<1, Int>)>,
    /// Files left out of the batch because they could not be read.
    pub skipped: Vec<Skipped>,
}

/// An epoch's batches, each read from the loader and uploaded one step early: the loop takes
/// the batch uploaded last ([`current`](Self::current)), queues its step, then calls
/// [`advance`](Self::advance), so on a GPU the next batch is read and copied while the device
/// still runs the step just queued.
pub struct Uploads {
    batches: EpochIter,
    device: Device,
    /// Batches smaller than this are not uploaded.
    min_len: usize,
    next: Option<Result<DeviceBatch, DataError>>,
}

impl Uploads {
    /// Starts the epoch: the first batch is read and uploaded at once. Returns the seconds
    /// spent waiting for the loader with it.
    pub fn new(batches: EpochIter, device: &Device, min_len: usize) -> (Self, f64) {
        let mut uploads = Self {
            batches,
            device: device.clone(),
            min_len,
            next: None,
        };
        let waited = uploads.advance();
        (uploads, waited)
    }

    /// The batch uploaded last, or `None` at the end of the epoch.
    pub fn current(&mut self) -> Option<Result<DeviceBatch, DataError>> {
        self.next.take()
    }

    /// Reads the next batch from the loader and uploads it; returns the seconds spent waiting
    /// for the loader (the upload itself is not counted).
    pub fn advance(&mut self) -> f64 {
        let waiting = Instant::now();
        let batch = self.batches.next();
        let waited = waiting.elapsed().as_secs_f64();
        self.next = batch.map(|batch| batch.map(|batch| self.upload(batch)));
        waited
    }

    fn upload(&self, mut batch: Batch) -> DeviceBatch {
        let skipped = std::mem::take(&mut batch.skipped);
        if batch.len() < self.min_len {
            return DeviceBatch {
                labels: batch.labels,
                tensors: None,
                skipped,
            };
        }
        let (images, labels) = images_tensor(batch, &self.device);
        let ids = labels_tensor(&labels, &self.device);
        DeviceBatch {
            labels,
            tensors: Some((images, ids)),
            skipped,
        }
    }
}
