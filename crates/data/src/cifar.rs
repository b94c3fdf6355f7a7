//! CIFAR-10 and CIFAR-100 in their binary formats, as the official archives unpack them.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, records of one label
//! byte and 3072 pixel bytes (1024 R, 1024 G, 1024 B, row-major 32x32). CIFAR-100: `train.bin`
//! and `test.bin`, records of a coarse-label byte, a fine-label byte and 3072 pixel bytes. Any
//! whole number of records per file is accepted; a partial record is an error naming the file.

use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, RgbImage};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;

/// Which CIFAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    Cifar100,
}

/// Training or test files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl CifarKind {
    fn name(self) -> &'static str {
        match self {
            Self::Cifar10 => "CIFAR-10",
            Self::Cifar100 => "CIFAR-100",
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }

    /// Number of (fine) classes.
    pub fn num_classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }

    /// The files of a split, in the order their records are numbered.
    pub fn files(self, split: Split) -> Vec<&'static str> {
        match (self, split) {
            (Self::Cifar10, Split::Train) => vec![
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (Self::Cifar10, Split::Test) => vec!["test_batch.bin"],
            (Self::Cifar100, Split::Train) => vec!["train.bin"],
            (Self::Cifar100, Split::Test) => vec!["test.bin"],
        }
    }

    fn fetch_hint(self, root: &Path) -> String {
        let which = match self {
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
        };
        let parent = root
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        format!(
            "download it with `scripts/fetch_cifar.sh {which} {}` or point data.root at the folder that holds the .bin files",
            parent.display()
        )
    }
}

/// A CIFAR split held in memory (about 150 MiB for a whole training set).
pub struct Cifar {
    kind: CifarKind,
    /// `len * 3072` bytes, each record's pixels as stored (planar R, G, B).
    pixels: Vec<u8>,
    labels: Vec<u8>,
    coarse_labels: Option<Vec<u8>>,
}

impl Cifar {
    /// Reads the files of `split` from `root`.
    pub fn load(kind: CifarKind, root: &Path, split: Split) -> Result<Self, DataError> {
        let paths: Vec<PathBuf> = kind.files(split).iter().map(|f| root.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(DataError::Missing {
                dataset: kind.name(),
                path: missing.clone(),
                hint: kind.fetch_hint(root),
            });
        }
        let record = kind.label_bytes() + PIXELS;
        let mut dataset = Self {
            kind,
            pixels: Vec::new(),
            labels: Vec::new(),
            coarse_labels: (kind == CifarKind::Cifar100).then(Vec::new),
        };
        for path in &paths {
            let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
            if bytes.len() % record != 0 {
                return Err(DataError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "{} bytes is not a whole number of {record}-byte {} records ({} whole records and {} bytes left over); the file is truncated or not in the binary format",
                        bytes.len(),
                        kind.name(),
                        bytes.len() / record,
                        bytes.len() % record
                    ),
                });
            }
            for (i, chunk) in bytes.chunks_exact(record).enumerate() {
                let (labels, pixels) = chunk.split_at(kind.label_bytes());
                let fine = *labels.last().expect("one label byte at least");
                if usize::from(fine) >= kind.num_classes() {
                    return Err(DataError::Corrupt {
                        path: path.clone(),
                        reason: format!(
                            "record {i} has label {fine}, but {} has {} classes",
                            kind.name(),
                            kind.num_classes()
                        ),
                    });
                }
                dataset.labels.push(fine);
                if let Some(coarse) = &mut dataset.coarse_labels {
                    coarse.push(labels[0]);
                }
                dataset.pixels.extend_from_slice(pixels);
            }
        }
        Ok(dataset)
    }

    /// The CIFAR-100 superclass of each example (`None` for CIFAR-10).
    pub fn coarse_labels(&self) -> Option<&[u8]> {
        self.coarse_labels.as_deref()
    }

    /// Which CIFAR this is.
    pub fn kind(&self) -> CifarKind {
        self.kind
    }
}

impl Dataset for Cifar {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.kind.num_classes()
    }

    fn get(&self, index: usize) -> Result<(RgbImage, usize), DataError> {
        let planar = &self.pixels[index * PIXELS..(index + 1) * PIXELS];
        let plane = SIDE * SIDE;
        let pixels = (0..plane)
            .flat_map(|p| [planar[p], planar[plane + p], planar[2 * plane + p]])
            .collect();
        let image = RgbImage {
            width: SIDE,
            height: SIDE,
            pixels,
        };
        Ok((image, usize::from(self.labels[index])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: CifarKind, label: u8, value: u8) -> Vec<u8> {
        let mut bytes = match kind {
            CifarKind::Cifar10 => vec![label],
            CifarKind::Cifar100 => vec![label / 5, label],
        };
        bytes.extend((0..PIXELS).map(|i| value.wrapping_add((i / 1024) as u8)));
        bytes
    }

    #[test]
    fn reads_any_whole_number_of_records_and_converts_planes_to_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = [3u8, 99, 42]
            .iter()
            .flat_map(|&l| record(CifarKind::Cifar100, l, l))
            .collect();
        std::fs::write(dir.path().join("train.bin"), bytes).unwrap();
        let data = Cifar::load(CifarKind::Cifar100, dir.path(), Split::Train).unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data.coarse_labels().unwrap(), &[0, 19, 8]);
        let (image, label) = data.get(1).unwrap();
        assert_eq!(label, 99);
        assert_eq!(&image.pixels[..3], &[99, 100, 101]);
    }

    #[test]
    fn a_partial_record_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = record(CifarKind::Cifar10, 1, 0);
        bytes.extend_from_slice(&[0; 100]);
        for name in CifarKind::Cifar10.files(Split::Test) {
            std::fs::write(dir.path().join(name), &bytes).unwrap();
        }
        let error = Cifar::load(CifarKind::Cifar10, dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("test_batch.bin"), "{error}");
        assert!(error.contains("100 bytes left over"), "{error}");
    }

    #[test]
    fn a_missing_file_says_where_it_looked_and_how_to_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let error = Cifar::load(CifarKind::Cifar10, dir.path(), Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("data_batch_1.bin"), "{error}");
        assert!(error.contains("fetch_cifar.sh cifar10"), "{error}");
    }
}
