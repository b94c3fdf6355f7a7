//! Loss and error counts kept on the device, read back a few times an epoch.
//!
//! A read from a GPU waits for every step queued before it. So each batch's loss and its top-1
//! and top-5 mistakes stay on the device as one small tensor, and [`DeviceTally::flush`] reads
//! the batches gathered since the last read in one transfer, at the progress interval and at the
//! end of an epoch, then adds them into a host [`Tally`] in batch order with the same f64
//! arithmetic as before (so the metrics are bit for bit those of a read per batch).
//! [`host_reads`] counts the reads.

use std::cell::Cell;

use burn::tensor::{Int, Tensor, TensorData};

use crate::metrics::Tally;

thread_local! {
    /// Reads from the device made by training and validation on this thread.
    static HOST_READS: Cell<usize> = const { Cell::new(0) };
}

/// How many times training and validation have read their numbers back from the device on
/// this thread (the one that runs the loop).
pub fn host_reads() -> usize {
    HOST_READS.get()
}

/// `[3]` on the device: a batch's mean loss, its top-1 and its top-5 mistakes against `labels`.
///
/// A mistake is counted as [`Tally::add`] counts it: the true class's rank is the number of
/// classes scoring higher, plus those scoring the same that come before it.
///
/// # Shapes
/// - `logits`: `[batch, classes]`; `loss`: `[1]`; `labels`: `[batch]`
pub fn batch_stats(logits: Tensor<2>, loss: Tensor<1>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [batch, classes] = logits.dims();
    let device = logits.device();
    let labels = labels.reshape([batch, 1]);
    let own = logits
        .clone()
        .gather(1, labels.clone())
        .expand([batch, classes]);
    let higher = logits.clone().greater(own.clone()).int();
    let columns = Tensor::<1, Int>::arange(0..classes as i64, &device)
        .reshape([1, classes])
        .expand([batch, classes]);
    let before = columns.lower(labels.expand([batch, classes]));
    let tied_before = logits.equal(own).bool_and(before).int();
    let rank = (higher + tied_before).sum_dim(1);
    let top1 = rank.clone().greater_equal_elem(1).int().sum();
    let top5 = rank.greater_equal_elem(classes.min(5) as i64).int().sum();
    Tensor::cat(vec![loss.reshape([1]), top1.float(), top5.float()], 0)
}

/// One batch waiting to be read back.
struct Pending {
    stats: Tensor<1>,
    images: usize,
    /// Where the batch was, for a diverged run's message.
    step: usize,
    lr: f64,
}

/// A training loss that is not a finite number, and where it first appeared.
#[derive(Debug, Clone, Copy)]
pub struct NonFinite {
    pub loss: f32,
    /// The optimiser step (1-based) the batch fed.
    pub step: usize,
    pub lr: f64,
}

/// Batches whose numbers are still on the device.
#[derive(Default)]
pub struct DeviceTally {
    pending: Vec<Pending>,
}

impl DeviceTally {
    /// Keeps a batch's [`batch_stats`] on the device.
    pub fn push(&mut self, stats: Tensor<1>, images: usize, step: usize, lr: f64) {
        self.pending.push(Pending {
            stats,
            images,
            step,
            lr,
        });
    }

    /// Batches not read back yet.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The learning rate of the last batch pushed, if any is pending.
    pub fn last_lr(&self) -> Option<f64> {
        self.pending.last().map(|p| p.lr)
    }

    /// Reads the pending batches back in one transfer and adds them to `tally` in order;
    /// returns the first batch whose loss is not a finite number, if any.
    pub fn flush(&mut self, tally: &mut Tally) -> Option<NonFinite> {
        if self.pending.is_empty() {
            return None;
        }
        let pending = std::mem::take(&mut self.pending);
        let all = Tensor::cat(pending.iter().map(|p| p.stats.clone()).collect(), 0);
        let values = read_floats(all);
        let mut first_non_finite = None;
        for (batch, numbers) in pending.iter().zip(values.chunks_exact(3)) {
            let loss = numbers[0];
            if !loss.is_finite() && first_non_finite.is_none() {
                first_non_finite = Some(NonFinite {
                    loss,
                    step: batch.step,
                    lr: batch.lr,
                });
            }
            tally.add_counts(
                f64::from(loss),
                batch.images,
                numbers[1] as usize,
                numbers[2] as usize,
            );
        }
        first_non_finite
    }
}

/// The one place training and validation read tensors back, counted.
fn read_floats(tensor: Tensor<1>) -> Vec<f32> {
    HOST_READS.set(HOST_READS.get() + 1);
    tensor
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 statistics")
}

/// Uploads labels as an integer tensor.
pub fn labels_tensor(labels: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let values: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::from_data(TensorData::new(values, [labels.len()]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn device_counts_equal_the_host_tally_ties_included() {
        let device = Device::flex();
        // 6 classes; true class ranks 1st, 2nd (tie before it), 6th, and a tie after it.
        let logits = [
            9.0, 1.0, 2.0, 3.0, 4.0, 5.0, //
            5.0, 9.0, 2.0, 3.0, 4.0, 5.0, //
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, //
            7.0, 7.0, 2.0, 3.0, 4.0, 5.0,
        ];
        let labels = [0, 5, 0, 0];
        let mut host = Tally::default();
        host.add(1.5, &logits, &labels);

        let mut device_tally = DeviceTally::default();
        let stats = batch_stats(
            Tensor::from_data(TensorData::new(logits.to_vec(), [4, 6]), &device),
            Tensor::from_data(TensorData::new(vec![1.5f32], [1]), &device),
            labels_tensor(&labels, &device),
        );
        device_tally.push(stats, 4, 1, 0.1);
        let reads = host_reads();
        let mut tally = Tally::default();
        assert!(device_tally.flush(&mut tally).is_none());
        assert!(host_reads() > reads);
        assert_eq!(tally.images, host.images);
        assert_eq!(tally.top1_err(), host.top1_err());
        assert_eq!(tally.top5_err(), host.top5_err());
        assert_eq!(tally.loss(), host.loss());
        assert!(device_tally.is_empty());
    }

    #[test]
    fn a_non_finite_loss_names_its_step() {
        let device = Device::flex();
        let mut pending = DeviceTally::default();
        for (step, loss) in [(1, 2.0f32), (2, f32::NAN), (3, 1.0)] {
            let stats = Tensor::from_data(TensorData::new(vec![loss, 0.0, 0.0], [3]), &device);
            pending.push(stats, 8, step, 0.5);
        }
        let mut tally = Tally::default();
        let error = pending.flush(&mut tally).unwrap();
        assert_eq!(error.step, 2);
        assert!(error.loss.is_nan());
        assert_eq!(tally.images, 24, "every batch is counted");
        assert!(tally.loss().is_nan());
    }
}
