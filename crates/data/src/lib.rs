//! Datasets and batches on the host: CIFAR-10/100 binary readers, an image-folder reader, a
//! CUB-200-2011 reader,
//! the training transforms (the reference's colour jitter and PCA lighting among them), and a loader that prepares batches on background threads.
//!
//! Nothing here knows about Burn: a batch is plain `f32` NCHW data plus labels. Every random
//! draw comes from a generator keyed by (seed, stream, epoch, index), so the same seed gives the
//! same batches whatever the number of worker threads.

mod boxes;
mod cifar;
mod color;
mod cub;
mod decode;
mod error;
mod image_folder;
mod loader;
mod seed;
mod transforms;

pub use boxes::{BoxTable, RawBox};
pub use cifar::{Cifar, CifarKind, Split};
pub use color::{ColorAugment, IMAGENET_EIGVAL, IMAGENET_EIGVEC};
pub use cub::open_cub;
pub use decode::{Encoded, MAX_PIXELS, Sample};
pub use error::DataError;
pub use image_folder::ImageFolder;
pub use loader::{Batch, EpochIter, Loader, LoaderConfig, Shard, Skipped};
pub use seed::{Stream, keyed_rng};
pub use transforms::{
    CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, MAX_REDUCTION, Pad, Transform,
};

/// The process's peak resident set size in MiB, from `/proc/self/status` (`VmHWM`; Linux,
/// `None` elsewhere): what the loader's memory bound is checked against.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// An RGB image, 8 bits per channel, stored row-major as `[height][width][3]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// A labelled dataset that can hand out any example by index, from any thread.
pub trait Dataset: Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Whether there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes (labels are `0..num_classes`).
    fn num_classes(&self) -> usize;
    /// Example `index` (its pixels, or its file to decode) and its label.
    fn get(&self, index: usize) -> Result<(Sample, usize), DataError>;
    /// Example `index`'s label without reading the example, when the dataset holds its labels
    /// (CIFAR files and image folders do); `None` otherwise.
    fn label(&self, index: usize) -> Option<usize> {
        let _ = index;
        None
    }
}
