//! A loader that prepares batches on background threads, in a fixed order for a given seed and
//! epoch whatever the number of threads.
//!
//! Workers claim batch numbers in order, at most `prefetch` ahead of the consumer, and the
//! consumer puts finished batches back in order; every example's transform draws from a
//! generator keyed by (seed, epoch, position in the epoch), not by the thread that ran it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;

use crate::error::panic_message;
use crate::{DataError, Dataset, Stream, Transform, keyed_rng};

/// How batches are cut and prepared.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Reshuffle the examples every epoch (from the seed and the epoch number).
    pub shuffle: bool,
    /// Leave out a last, smaller batch.
    pub drop_last: bool,
    /// Background threads preparing batches; 0 prepares them on the calling thread.
    pub workers: usize,
    /// How many batches may be prepared ahead of the one being consumed: with the batch being
    /// consumed, the loader holds at most `prefetch + 1` batches (plus one image being decoded
    /// per worker), however large the dataset.
    pub prefetch: usize,
    pub seed: u64,
    /// Stop at the first file that cannot be read or decoded, instead of leaving it out of its
    /// batch and reporting it in [`Batch::skipped`].
    pub strict: bool,
}

/// An example left out of its batch: its file could not be read or decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// A prepared batch: normalised images, channel-major, and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[len][3][size][size]` values.
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    /// Side of each image.
    pub size: usize,
    /// Examples of this batch left out because their files are unreadable (the batch is that
    /// much smaller).
    pub skipped: Vec<Skipped>,
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

#[derive(Clone)]
struct Shared {
    dataset: Arc<dyn Dataset>,
    indices: Vec<usize>,
    transform: Transform,
    mean: [f32; 3],
    std: [f32; 3],
    config: LoaderConfig,
    shard: Shard,
}

/// This process's part of every epoch when several processes train together, as PyTorch's
/// `DistributedSampler`: the epoch's order (the same on every process) is cut into `count`
/// interleaved parts, part `rank` taking positions `rank, rank + count, ...`. With `pad`, the
/// order is first extended by repeating its start until `count` divides it, so every part has
/// the same length (training: every process takes the same number of steps); without it the
/// parts differ by at most one example (validation: nothing counted twice).
///
/// Interleaving keeps batches aligned across counts: batch `k` of every part together holds
/// exactly batch `k` of one process at `count` times the batch size, and each example's
/// transform is keyed by its position in the whole epoch, so those examples are prepared the
/// same way too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub count: usize,
    pub pad: bool,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            rank: 0,
            count: 1,
            pad: false,
        }
    }
}

impl Shard {
    /// Examples of an epoch of `len` after padding (`len` itself without padding).
    pub fn padded_len(&self, len: usize) -> usize {
        if self.pad {
            len.div_ceil(self.count) * self.count
        } else {
            len
        }
    }

    /// How many examples of an epoch of `len` this part takes.
    pub fn part_len(&self, len: usize) -> usize {
        let total = self.padded_len(len);
        total / self.count + usize::from(self.rank < total % self.count)
    }
}

/// Batches of a dataset (or of a subset of its indices), epoch after epoch.
pub struct Loader {
    shared: Arc<Shared>,
}

impl Loader {
    /// A loader over `indices` of `dataset` (all of them when `None`).
    pub fn new(
        dataset: Arc<dyn Dataset>,
        indices: Option<Vec<usize>>,
        transform: Transform,
        mean: [f32; 3],
        std: [f32; 3],
        config: LoaderConfig,
    ) -> Self {
        assert!(config.batch_size > 0, "batch size must be positive");
        let indices = indices.unwrap_or_else(|| (0..dataset.len()).collect());
        Self {
            shared: Arc::new(Shared {
                dataset,
                indices,
                transform,
                mean,
                std,
                config,
                shard: Shard::default(),
            }),
        }
    }

    /// The same loader, yielding only `shard`'s part of each epoch.
    pub fn sharded(self, shard: Shard) -> Self {
        assert!(
            shard.count >= 1 && shard.rank < shard.count,
            "shard {} of {}",
            shard.rank,
            shard.count
        );
        let mut shared = Arc::unwrap_or_clone(self.shared);
        shared.shard = shard;
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Which part of each epoch this loader yields.
    pub fn shard(&self) -> Shard {
        self.shared.shard
    }

    /// Examples of the whole dataset (subset) per epoch, over all shards, before padding.
    pub fn total_len(&self) -> usize {
        self.shared.indices.len()
    }

    /// Number of examples per epoch (this shard's part).
    pub fn len(&self) -> usize {
        self.shared.shard.part_len(self.shared.indices.len())
    }

    /// Whether an epoch is empty.
    pub fn is_empty(&self) -> bool {
        self.num_batches() == 0
    }

    /// Number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.len(), self.shared.config.batch_size);
        if self.shared.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The batches of `epoch`, in order.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on: the same batches `epoch` yields at those
    /// positions, without preparing the earlier ones (a run resumed in the middle of an epoch).
    pub fn epoch_from(&self, epoch: u64, first: usize) -> EpochIter {
        let shared = &self.shared;
        let mut order = shared.indices.clone();
        if shared.config.shuffle {
            order.shuffle(&mut keyed_rng(shared.config.seed, Stream::Order, epoch, 0));
        }
        let shard = shared.shard;
        if shard.count > 1 {
            let total = shard.padded_len(order.len());
            let repeated: Vec<usize> = order.iter().copied().cycle().take(total).collect();
            order = repeated
                .into_iter()
                .skip(shard.rank)
                .step_by(shard.count)
                .collect();
        }
        let plan = Arc::new(Plan {
            shared: shared.clone(),
            order,
            epoch,
            batches: self.num_batches(),
        });
        EpochIter::start(plan, first)
    }
}

/// One epoch's order of examples.
struct Plan {
    shared: Arc<Shared>,
    order: Vec<usize>,
    epoch: u64,
    batches: usize,
}

impl Plan {
    fn build(&self, batch: usize) -> Result<Batch, DataError> {
        let s = &self.shared;
        let b = s.config.batch_size;
        let positions = batch * b..((batch + 1) * b).min(self.order.len());
        let size = s.transform.size();
        let per_image = 3 * size * size;
        let mut images = vec![0.0; positions.len() * per_image];
        let mut labels = Vec::with_capacity(positions.len());
        let mut skipped = Vec::new();
        for position in positions {
            // Keyed by the position in the whole epoch, whatever the shard.
            let in_epoch = position * s.shard.count + s.shard.rank;
            let mut rng = keyed_rng(
                s.config.seed,
                Stream::Transform,
                self.epoch,
                in_epoch as u64,
            );
            let slot = labels.len();
            let prepared = s
                .dataset
                .get(self.order[position])
                .and_then(|(sample, label)| {
                    let out = &mut images[slot * per_image..(slot + 1) * per_image];
                    s.transform
                        .apply(&sample, &mut rng, s.mean, s.std, out)
                        .map(|()| label)
                });
            match prepared {
                Ok(label) => labels.push(label),
                Err(error) => match error.unreadable_file() {
                    Some(path) if !s.config.strict => skipped.push(Skipped {
                        path: path.to_path_buf(),
                        reason: error.reason(),
                    }),
                    _ => return Err(error),
                },
            }
        }
        images.truncate(labels.len() * per_image);
        Ok(Batch {
            images,
            labels,
            size,
            skipped,
        })
    }
}

/// Claims of batch numbers, shared by the workers and the consumer.
struct Claims {
    next: usize,
    consumed: usize,
}

struct Workers {
    claims: Mutex<Claims>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The batches of one epoch; dropping it stops its workers.
pub struct EpochIter {
    plan: Arc<Plan>,
    expected: usize,
    ready: BTreeMap<usize, Result<Batch, DataError>>,
    receiver: Option<Receiver<(usize, Result<Batch, DataError>)>>,
    workers: Arc<Workers>,
    handles: Vec<JoinHandle<()>>,
}

impl EpochIter {
    fn start(plan: Arc<Plan>, first: usize) -> Self {
        let workers = Arc::new(Workers {
            claims: Mutex::new(Claims {
                next: first,
                consumed: first,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let threads = plan.shared.config.workers;
        let capacity = plan.shared.config.prefetch.max(1);
        let (sender, receiver) = channel();
        let handles = (0..threads)
            .map(|_| {
                let (plan, workers, sender) = (plan.clone(), workers.clone(), sender.clone());
                std::thread::spawn(move || {
                    loop {
                        let batch = {
                            let mut claims = workers.claims.lock().expect("loader lock");
                            loop {
                                if workers.stop.load(Ordering::Relaxed)
                                    || claims.next >= plan.batches
                                {
                                    return;
                                }
                                if claims.next < claims.consumed + capacity {
                                    break;
                                }
                                claims = workers.wake.wait(claims).expect("loader lock");
                            }
                            claims.next += 1;
                            claims.next - 1
                        };
                        // A panic must reach the consumer as an error, not leave it waiting.
                        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            plan.build(batch)
                        }))
                        .unwrap_or_else(|panic| {
                            let message = panic_message(&*panic).unwrap_or_default();
                            Err(DataError::WorkerPanic { batch, message })
                        });
                        if sender.send((batch, built)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Self {
            plan,
            expected: first,
            ready: BTreeMap::new(),
            receiver: (threads > 0).then_some(receiver),
            workers,
            handles,
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.expected >= self.plan.batches {
            return None;
        }
        let batch = match &self.receiver {
            None => self.plan.build(self.expected),
            Some(receiver) => loop {
                if let Some(batch) = self.ready.remove(&self.expected) {
                    break batch;
                }
                let (index, batch) = receiver.recv().expect("loader workers stopped early");
                self.ready.insert(index, batch);
            },
        };
        self.expected += 1;
        self.workers.claims.lock().expect("loader lock").consumed = self.expected;
        self.workers.wake.notify_all();
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.plan.batches - self.expected;
        (left, Some(left))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.workers.stop.store(true, Ordering::Relaxed);
        self.workers.wake.notify_all();
        self.receiver = None;
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RgbImage, Sample};

    /// Images whose pixels encode their index, so batches can be told apart.
    struct Numbered(usize);

    impl Dataset for Numbered {
        fn len(&self) -> usize {
            self.0
        }
        fn num_classes(&self) -> usize {
            10
        }
        fn get(&self, index: usize) -> Result<(Sample, usize), DataError> {
            let pixels = (0..8 * 8 * 3)
                .map(|i| ((index * 31 + i) % 256) as u8)
                .collect();
            Ok((
                Sample::Pixels(RgbImage {
                    width: 8,
                    height: 8,
                    pixels,
                }),
                index % 10,
            ))
        }
    }

    fn small_loader(workers: usize) -> Loader {
        Loader::new(
            Arc::new(Numbered(37)),
            None,
            Transform::CifarTrain {
                size: 8,
                padding: 2,
                pad: crate::Pad::Zeros,
            },
            [0.5; 3],
            [0.25; 3],
            LoaderConfig {
                batch_size: 5,
                shuffle: true,
                drop_last: false,
                workers,
                prefetch: 2,
                seed: 11,
                strict: false,
            },
        )
    }

    fn epochs(workers: usize) -> Vec<Batch> {
        let loader = small_loader(workers);
        assert_eq!(loader.num_batches(), 8);
        (0..2)
            .flat_map(|e| loader.epoch(e).map(Result::unwrap).collect::<Vec<_>>())
            .collect()
    }

    /// The batches of `epoch` as (label, image) pairs per batch.
    fn examples(loader: &Loader, epoch: u64) -> Vec<Vec<(usize, Vec<u32>)>> {
        loader
            .epoch(epoch)
            .map(|batch| {
                let batch = batch.unwrap();
                let per_image = batch.images.len() / batch.len().max(1);
                batch
                    .labels
                    .iter()
                    .zip(batch.images.chunks(per_image))
                    .map(|(&l, img)| (l, img.iter().map(|v| v.to_bits()).collect()))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn shards_together_are_one_process_at_the_whole_batch() {
        // 37 examples, 3 shards of batch 5 against one loader of batch 15: batch k of the three
        // shards holds batch k of the one loader, transforms included; padding repeats the
        // epoch's first two examples.
        let whole = {
            let mut shared = Arc::unwrap_or_clone(small_loader(0).shared);
            shared.config.batch_size = 15;
            Loader {
                shared: Arc::new(shared),
            }
        };
        let parts: Vec<Loader> = (0..3)
            .map(|rank| {
                small_loader(1).sharded(Shard {
                    rank,
                    count: 3,
                    pad: true,
                })
            })
            .collect();
        for part in &parts {
            assert_eq!(part.len(), 13);
            assert_eq!(part.num_batches(), 3);
        }
        for epoch in [0, 4] {
            let one = examples(&whole, epoch);
            let each: Vec<_> = parts.iter().map(|p| examples(p, epoch)).collect();
            for k in 0..3 {
                let mut together: Vec<_> = each.iter().flat_map(|e| e[k].clone()).collect();
                let mut expected = one[k].clone();
                if k == 2 {
                    // The padding: the epoch's first two examples again.
                    expected.extend(one[0][..2].iter().cloned());
                }
                together.sort();
                expected.sort();
                // Padded examples are transformed at their padded position, so compare labels
                // only for them, everything for the rest.
                if k < 2 {
                    assert_eq!(together, expected, "epoch {epoch} batch {k}");
                } else {
                    let labels = |v: &[(usize, Vec<u32>)]| {
                        let mut l: Vec<usize> = v.iter().map(|e| e.0).collect();
                        l.sort();
                        l
                    };
                    assert_eq!(labels(&together), labels(&expected));
                }
            }
        }
        // Without padding, the parts cover the epoch once: 13 + 12 + 12.
        let lens: Vec<usize> = (0..3)
            .map(|rank| {
                small_loader(0)
                    .sharded(Shard {
                        rank,
                        count: 3,
                        pad: false,
                    })
                    .len()
            })
            .collect();
        assert_eq!(lens, vec![13, 12, 12]);
    }

    #[test]
    fn batches_are_the_same_whatever_the_number_of_workers() {
        let reference = epochs(0);
        assert_eq!(reference.len(), 16);
        assert_eq!(reference[7].len(), 2);
        for workers in [1, 3] {
            assert_eq!(epochs(workers), reference, "{workers} workers");
        }
    }

    #[test]
    fn an_epoch_started_part_way_yields_the_same_remaining_batches() {
        for workers in [0, 2] {
            let loader = small_loader(workers);
            let all: Vec<Batch> = loader.epoch(3).map(Result::unwrap).collect();
            let rest: Vec<Batch> = loader.epoch_from(3, 2).map(Result::unwrap).collect();
            assert_eq!(rest, all[2..], "workers {workers}");
        }
    }

    #[test]
    fn every_example_appears_once_per_epoch_in_a_new_order() {
        let batches = epochs(2);
        let labels = |range: std::ops::Range<usize>| -> Vec<usize> {
            batches[range]
                .iter()
                .flat_map(|b| b.labels.clone())
                .collect()
        };
        let (first, second) = (labels(0..8), labels(8..16));
        assert_ne!(first, second);
        let mut counts = [0; 10];
        first.iter().for_each(|&l| counts[l] += 1);
        assert_eq!(counts, [4, 4, 4, 4, 4, 4, 4, 3, 3, 3]);
    }

    /// Unshuffled batches of 4 untransformed images from two workers.
    fn in_order(dataset: Arc<dyn Dataset>, prefetch: usize) -> Loader {
        Loader::new(
            dataset,
            None,
            Transform::CifarEval { size: 8 },
            [0.0; 3],
            [1.0; 3],
            LoaderConfig {
                batch_size: 4,
                shuffle: false,
                drop_last: false,
                workers: 2,
                prefetch,
                seed: 0,
                strict: false,
            },
        )
    }

    /// Panics on one example, as a bug in a reader or transform would.
    struct Faulty;

    impl Dataset for Faulty {
        fn len(&self) -> usize {
            40
        }
        fn num_classes(&self) -> usize {
            10
        }
        fn get(&self, index: usize) -> Result<(Sample, usize), DataError> {
            assert_ne!(index, 9, "planted failure");
            Numbered(40).get(index)
        }
    }

    #[test]
    fn a_panic_in_a_worker_reaches_the_consumer_as_an_error() {
        let loader = in_order(Arc::new(Faulty), 1);
        let results: Vec<_> = loader.epoch(0).collect();
        assert_eq!(results.len(), 10);
        let error = results[2].as_ref().unwrap_err().to_string();
        assert!(
            error.contains("batch 2") && error.contains("planted failure"),
            "{error}"
        );
        assert!(results[3].is_ok());
    }

    #[test]
    fn dropping_an_epoch_early_stops_its_workers() {
        let loader = in_order(Arc::new(Numbered(1000)), 2);
        let mut epoch = loader.epoch(0);
        assert_eq!(epoch.next().unwrap().unwrap().labels, vec![0, 1, 2, 3]);
        drop(epoch);
    }

    /// Examples 3 and 6 are files that cannot be decoded.
    struct WithBadFiles;

    impl Dataset for WithBadFiles {
        fn len(&self) -> usize {
            12
        }
        fn num_classes(&self) -> usize {
            10
        }
        fn get(&self, index: usize) -> Result<(Sample, usize), DataError> {
            if index == 3 || index == 6 {
                let file = crate::Encoded::new(format!("bad/{index}.jpg"), b"not a jpeg".to_vec());
                return Ok((Sample::File(file), 0));
            }
            Numbered(12).get(index)
        }
    }

    #[test]
    fn unreadable_files_are_left_out_and_reported_or_stop_a_strict_loader() {
        let loader = in_order(Arc::new(WithBadFiles), 2);
        let batches: Vec<Batch> = loader.epoch(0).map(Result::unwrap).collect();
        let labels: Vec<Vec<usize>> = batches.iter().map(|b| b.labels.clone()).collect();
        assert_eq!(labels, [vec![0, 1, 2], vec![4, 5, 7], vec![8, 9, 0, 1]]);
        assert_eq!(batches[0].images.len(), 3 * 3 * 64);
        let skipped: Vec<String> = batches
            .iter()
            .flat_map(|b| &b.skipped)
            .map(|s| format!("{}: {}", s.path.display(), s.reason))
            .collect();
        assert_eq!(skipped.len(), 2);
        assert!(skipped[0].starts_with("bad/3.jpg: "), "{skipped:?}");
        assert!(skipped[1].starts_with("bad/6.jpg: "), "{skipped:?}");

        let mut strict = in_order(Arc::new(WithBadFiles), 2);
        Arc::get_mut(&mut strict.shared).unwrap().config.strict = true;
        let results: Vec<_> = strict.epoch(0).collect();
        let error = results[0].as_ref().unwrap_err().to_string();
        assert!(error.contains("bad/3.jpg"), "{error}");
    }
}
