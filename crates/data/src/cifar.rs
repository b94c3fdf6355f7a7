//! CIFAR-10 and CIFAR-100 in their binary formats, as the official archives unpack them.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, records of one label
//! byte and 3072 pixel bytes (1024 R, 1024 G, 1024 B, row-major 32x32). CIFAR-100: `train.bin`
//! and `test.bin`, records of a coarse-label byte, a fine-label byte and 3072 pixel bytes. Any
//! whole number of records per file is accepted; a partial record is an error naming the file.

use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, RgbImage, Sample};

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

/// A CIFAR split read from its files: labels are held in memory (one or two bytes per
/// example), pixels are read from the file when an example is asked for (the operating
/// system's page cache keeps them hot), so memory does not grow with the split.
pub struct Cifar {
    kind: CifarKind,
    files: Vec<RecordFile>,
    labels: Vec<u8>,
    coarse_labels: Option<Vec<u8>>,
    /// Train on CIFAR-100's 20 superclasses instead of its 100 classes.
    coarse: bool,
}

/// One `.bin` file and the number of the first record it holds.
struct RecordFile {
    path: PathBuf,
    file: std::fs::File,
    first: usize,
}

/// Reads exactly `buf.len()` bytes at `offset`, without moving a shared cursor (so any
/// number of loader threads can read one file at once).
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

impl Cifar {
    /// Opens the files of `split` in `root`, checking their sizes and labels.
    pub fn load(kind: CifarKind, root: &Path, split: Split) -> Result<Self, DataError> {
        let paths: Vec<PathBuf> = kind.files(split).iter().map(|f| root.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(DataError::Missing {
                dataset: kind.name(),
                path: missing.clone(),
                hint: kind.fetch_hint(root),
            });
        }
        Self::load_files(kind, &paths)
    }

    /// Opens one CIFAR binary file of either kind, told apart by its record size (3,073 bytes
    /// for CIFAR-10, 3,074 for CIFAR-100): an out-of-distribution set, say.
    pub fn open_file(path: &Path) -> Result<Self, DataError> {
        let size = std::fs::metadata(path)
            .map_err(|e| DataError::io(path, e))?
            .len() as usize;
        let fits = |kind: CifarKind| size > 0 && size.is_multiple_of(kind.label_bytes() + PIXELS);
        let kind = match (fits(CifarKind::Cifar10), fits(CifarKind::Cifar100)) {
            (true, false) => CifarKind::Cifar10,
            (false, true) => CifarKind::Cifar100,
            _ => {
                return Err(DataError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!(
                        "{size} bytes is a whole number of neither CIFAR-10's 3073-byte nor CIFAR-100's 3074-byte records"
                    ),
                });
            }
        };
        Self::load_files(kind, &[path.to_path_buf()])
    }

    fn load_files(kind: CifarKind, paths: &[PathBuf]) -> Result<Self, DataError> {
        let record = kind.label_bytes() + PIXELS;
        let mut dataset = Self {
            kind,
            files: Vec::new(),
            labels: Vec::new(),
            coarse_labels: (kind == CifarKind::Cifar100).then(Vec::new),
            coarse: false,
        };
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
            let size = file.metadata().map_err(|e| DataError::io(path, e))?.len() as usize;
            if !size.is_multiple_of(record) {
                return Err(DataError::Corrupt {
                    path: path.clone(),
                    reason: format!(
                        "{size} bytes is not a whole number of {record}-byte {} records ({} whole records and {} bytes left over); the file is truncated or not in the binary format",
                        kind.name(),
                        size / record,
                        size % record
                    ),
                });
            }
            let first = dataset.labels.len();
            // One pass over the file for its labels, a few records at a time.
            let mut reader = std::io::BufReader::with_capacity(64 * record, &file);
            let mut buffer = vec![0u8; record];
            for i in 0..size / record {
                std::io::Read::read_exact(&mut reader, &mut buffer)
                    .map_err(|e| DataError::io(path, e))?;
                let labels = &buffer[..kind.label_bytes()];
                let fine = *labels.last().expect("one label byte at least");
                let coarse = labels[0];
                if usize::from(fine) >= kind.num_classes()
                    || (kind == CifarKind::Cifar100 && usize::from(coarse) >= COARSE_CLASSES)
                {
                    return Err(DataError::Corrupt {
                        path: path.clone(),
                        reason: format!(
                            "record {i} has label {labels:?}, but {} has {} classes",
                            kind.name(),
                            kind.num_classes()
                        ),
                    });
                }
                dataset.labels.push(fine);
                if let Some(coarse_labels) = &mut dataset.coarse_labels {
                    coarse_labels.push(coarse);
                }
            }
            dataset.files.push(RecordFile {
                path: path.clone(),
                file,
                first,
            });
        }
        Ok(dataset)
    }

    /// Labels examples by CIFAR-100's 20 superclasses (coarse labels) instead of its 100
    /// classes; an error for CIFAR-10, which has none.
    pub fn with_coarse_labels(mut self) -> Result<Self, DataError> {
        if self.coarse_labels.is_none() {
            return Err(DataError::Corrupt {
                path: self.files[0].path.clone(),
                reason: "CIFAR-10 has no coarse labels (only CIFAR-100 has superclasses)".into(),
            });
        }
        self.coarse = true;
        Ok(self)
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

/// CIFAR-100's number of superclasses.
pub const COARSE_CLASSES: usize = 20;

impl Dataset for Cifar {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        if self.coarse {
            COARSE_CLASSES
        } else {
            self.kind.num_classes()
        }
    }

    fn get(&self, index: usize) -> Result<(Sample, usize), DataError> {
        let at = self.files.partition_point(|f| f.first <= index) - 1;
        let file = &self.files[at];
        let record = self.kind.label_bytes() + PIXELS;
        let offset = ((index - file.first) * record + self.kind.label_bytes()) as u64;
        let mut planar = vec![0u8; PIXELS];
        read_at(&file.file, &mut planar, offset).map_err(|e| DataError::io(&file.path, e))?;
        let plane = SIDE * SIDE;
        let pixels = (0..plane)
            .flat_map(|p| [planar[p], planar[plane + p], planar[2 * plane + p]])
            .collect();
        let image = RgbImage {
            width: SIDE,
            height: SIDE,
            pixels,
        };
        Ok((Sample::Pixels(image), self.label_of(index)))
    }

    fn label(&self, index: usize) -> Option<usize> {
        Some(self.label_of(index))
    }
}

impl Cifar {
    /// Example `index`'s label: fine, or coarse with [`Cifar::with_coarse_labels`].
    fn label_of(&self, index: usize) -> usize {
        let label = match (&self.coarse_labels, self.coarse) {
            (Some(coarse), true) => coarse[index],
            _ => self.labels[index],
        };
        usize::from(label)
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
        let (sample, label) = data.get(1).unwrap();
        let image = sample.decode(1).unwrap();
        assert_eq!(label, 99);
        assert_eq!(&image.pixels[..3], &[99, 100, 101]);
        assert_eq!(image.pixels.len(), PIXELS);
        assert_eq!(data.label(1), Some(99));
        let coarse = data.with_coarse_labels().unwrap();
        assert_eq!(coarse.num_classes(), 20);
        assert_eq!(coarse.get(1).unwrap().1, 19);
        assert_eq!(coarse.label(1), Some(19));
    }

    #[test]
    fn a_single_file_is_told_apart_by_its_record_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ood.bin");
        for (kind, classes) in [(CifarKind::Cifar10, 10), (CifarKind::Cifar100, 100)] {
            let bytes: Vec<u8> = (0..4).flat_map(|l| record(kind, l, l)).collect();
            std::fs::write(&path, bytes).unwrap();
            let data = Cifar::open_file(&path).unwrap();
            assert_eq!(
                (data.kind(), data.len(), data.num_classes()),
                (kind, 4, classes)
            );
        }
        std::fs::write(&path, [0u8; 100]).unwrap();
        let err = Cifar::open_file(&path).err().unwrap().to_string();
        assert!(err.contains("ood.bin") && err.contains("neither"), "{err}");
    }

    #[test]
    fn records_are_read_from_every_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (k, name) in CifarKind::Cifar10.files(Split::Train).iter().enumerate() {
            let bytes: Vec<u8> = (0..3)
                .flat_map(|r| {
                    record(
                        CifarKind::Cifar10,
                        (k * 3 + r) as u8 % 10,
                        (k * 3 + r) as u8,
                    )
                })
                .collect();
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let data = Cifar::load(CifarKind::Cifar10, dir.path(), Split::Train).unwrap();
        assert_eq!(data.len(), 15);
        for index in 0..15 {
            let (sample, label) = data.get(index).unwrap();
            assert_eq!(label, index % 10);
            assert_eq!(
                sample.decode(1).unwrap().pixels[0],
                index as u8,
                "example {index}"
            );
        }
        assert!(data.with_coarse_labels().is_err());
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
