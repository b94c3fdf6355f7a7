//! Image folders: `<dir>/<class>/<image>`, classes numbered by their sorted folder names
//! (torchvision's `ImageFolder` rule), and the flat validation folder as ImageNet ships it (all
//! images in one folder, labels in a separate file). Files without an image extension are
//! ignored; files are read and decoded only when an example is asked for.
//!
//! The file list is held compactly (one string of relative paths and a label per file, about
//! 40 bytes per image: 50 MiB for ImageNet's 1.28M), and nothing else grows with the folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, Encoded, Sample};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The file list of an image folder; images are decoded on demand by [`Dataset::get`].
#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    /// Every file's path relative to `root`, one after another.
    names: String,
    /// Where each file's name ends in `names`.
    ends: Vec<usize>,
    labels: Vec<u32>,
    empty_classes: Vec<String>,
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut paths = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| DataError::io(dir, e)))
        .collect::<Result<Vec<_>, _>>()?;
    paths.sort();
    Ok(paths)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// The image files directly inside `dir`, sorted.
fn images_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| is_image(p) && p.is_file())
        .collect())
}

impl ImageFolder {
    pub(crate) fn empty(root: &Path, classes: Vec<String>) -> Self {
        Self {
            root: root.to_path_buf(),
            classes,
            names: String::new(),
            ends: Vec::new(),
            labels: Vec::new(),
            empty_classes: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, relative: &str, label: usize) {
        self.names.push_str(relative);
        self.ends.push(self.names.len());
        self.labels
            .push(u32::try_from(label).expect("fewer than 2^32 classes"));
    }

    pub(crate) fn check_not_empty(&self) -> Result<(), DataError> {
        if self.labels.is_empty() {
            return Err(DataError::Corrupt {
                path: self.root.clone(),
                reason: "no images found (expected <class>/<image>.jpg|jpeg|png)".into(),
            });
        }
        Ok(())
    }

    /// Lists `dir/<class>/*`. With `classes`, those names define the label numbering (a
    /// validation split uses the training split's classes); a class folder not among them is
    /// an error. A class folder without images keeps its label (so the numbering matches
    /// torchvision's) and is listed by [`ImageFolder::empty_classes`].
    pub fn open(dir: &Path, classes: Option<&[String]>) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::Missing {
                dataset: "image folder",
                path: dir.to_path_buf(),
                hint:
                    "expected one folder per class with .jpg/.jpeg/.png files inside; set data.root"
                        .into(),
            });
        }
        let class_dirs: Vec<PathBuf> = read_dir_sorted(dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        let names: Vec<String> = class_dirs.iter().map(|p| file_name(p)).collect();
        let classes: Vec<String> = classes.map_or_else(|| names.clone(), <[String]>::to_vec);
        let mut folder = Self::empty(dir, classes);
        for (path, name) in class_dirs.iter().zip(&names) {
            let label = folder
                .classes
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| DataError::Corrupt {
                    path: path.clone(),
                    reason: "class folder not present in the training split".into(),
                })?;
            let images = images_in(path)?;
            if images.is_empty() {
                folder.empty_classes.push(name.clone());
            }
            for image in images {
                folder.push(&format!("{name}/{}", file_name(&image)), label);
            }
        }
        folder.check_not_empty()?;
        Ok(folder)
    }

    /// A flat folder of images (ImageNet's `val/` as shipped) labelled by `labels_file`, whose
    /// lines are `<file> <class>` (whitespace or a comma between; the file name with or without
    /// its extension; only the first word of the class field counts, so Kaggle's
    /// `LOC_val_solution.csv` works as it is, header line included). Classes are `classes`'
    /// names (the training split's). Every image needs a line, and every line an image.
    pub fn open_flat(
        dir: &Path,
        labels_file: &Path,
        classes: &[String],
    ) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::Missing {
                dataset: "validation folder",
                path: dir.to_path_buf(),
                hint: "set data.root to the folder holding train/ and val/".into(),
            });
        }
        let text =
            std::fs::read_to_string(labels_file).map_err(|e| DataError::io(labels_file, e))?;
        let index: HashMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let mut labels: HashMap<String, (usize, usize)> = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (number == 0 && line.starts_with("ImageId")) {
                continue;
            }
            let bad = |reason: String| DataError::Corrupt {
                path: labels_file.to_path_buf(),
                reason: format!("line {}: {reason}", number + 1),
            };
            let mut fields = line.splitn(2, [',', ' ', '\t']);
            let file = fields.next().unwrap_or_default();
            let class = fields
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .ok_or_else(|| bad(format!("expected `<file> <class>`, found `{line}`")))?;
            let label = *index.get(class).ok_or_else(|| {
                bad(format!(
                    "class `{class}` is not one of the training split's classes"
                ))
            })?;
            let stem = Path::new(file).file_stem().unwrap_or_default();
            if let Some((_, first)) =
                labels.insert(stem.to_string_lossy().into_owned(), (label, number + 1))
            {
                return Err(bad(format!(
                    "`{file}` is labelled twice (first on line {first})"
                )));
            }
        }
        let mut folder = Self::empty(dir, classes.to_vec());
        let mut used = std::collections::HashSet::new();
        for image in images_in(dir)? {
            let stem = image.file_stem().unwrap_or_default().to_string_lossy();
            let (label, _) = labels
                .get(stem.as_ref())
                .ok_or_else(|| DataError::Corrupt {
                    path: image.clone(),
                    reason: format!("no line for this image in {}", labels_file.display()),
                })?;
            folder.push(&file_name(&image), *label);
            used.insert(stem.into_owned());
        }
        if used.len() < labels.len() {
            let (stem, (_, line)) = labels
                .iter()
                .filter(|(stem, _)| !used.contains(*stem))
                .min_by_key(|(_, (_, line))| *line)
                .expect("a label without an image");
            return Err(DataError::Corrupt {
                path: labels_file.to_path_buf(),
                reason: format!("line {line}: no image `{stem}` in {}", dir.display()),
            });
        }
        folder.check_not_empty()?;
        Ok(folder)
    }

    /// Every image directly in `dir` or in its immediate subfolders, all labelled 0 (an
    /// out-of-distribution set as ODIN distributes them, e.g. `Imagenet_resize/Imagenet/*.jpg`).
    pub fn open_unlabelled(dir: &Path) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::Missing {
                dataset: "image folder",
                path: dir.to_path_buf(),
                hint: "expected a folder of .jpg/.jpeg/.png files (or of folders of them)".into(),
            });
        }
        let mut folder = Self::empty(dir, vec!["images".into()]);
        for image in images_in(dir)? {
            folder.push(&file_name(&image), 0);
        }
        for sub in read_dir_sorted(dir)?.into_iter().filter(|p| p.is_dir()) {
            for image in images_in(&sub)? {
                folder.push(&format!("{}/{}", file_name(&sub), file_name(&image)), 0);
            }
        }
        folder.check_not_empty()?;
        Ok(folder)
    }

    /// The sorted names of the class folders in `dir` (their files are not listed).
    pub fn class_names(dir: &Path) -> Result<Vec<String>, DataError> {
        if !dir.is_dir() {
            return Err(DataError::Missing {
                dataset: "image folder",
                path: dir.to_path_buf(),
                hint: "expected one folder per class; set data.root".into(),
            });
        }
        Ok(read_dir_sorted(dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .map(|p| file_name(&p))
            .collect())
    }

    /// Class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Class folders that hold no image.
    pub fn empty_classes(&self) -> &[String] {
        &self.empty_classes
    }

    /// Example `index`'s file, relative to the folder (`class/file.jpg`, or `file.jpg` in a
    /// flat folder).
    pub fn name(&self, index: usize) -> &str {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        &self.names[start..self.ends[index]]
    }

    /// The label of example `index`.
    pub fn label(&self, index: usize) -> usize {
        self.labels[index] as usize
    }

    /// The path of example `index`.
    pub fn path(&self, index: usize) -> PathBuf {
        self.root.join(self.name(index))
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn get(&self, index: usize) -> Result<(Sample, usize), DataError> {
        let file = Encoded::read(&self.path(index))?;
        Ok((Sample::File(file), self.labels[index] as usize))
    }

    fn label(&self, index: usize) -> Option<usize> {
        Some(self.labels[index] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save_png(dir: &Path, name: &str, value: u8) {
        image::RgbImage::from_pixel(5, 4, image::Rgb([value, 0, 0]))
            .save(dir.join(name))
            .unwrap();
    }

    #[test]
    fn classes_are_sorted_folder_names_and_non_images_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for (class, value) in [("dog", 10u8), ("cat", 200)] {
            let class_dir = dir.path().join(class);
            std::fs::create_dir(&class_dir).unwrap();
            save_png(&class_dir, "a.png", value);
            std::fs::write(class_dir.join("notes.txt"), "not an image").unwrap();
        }
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let folder = ImageFolder::open(dir.path(), None).unwrap();
        assert_eq!(folder.classes(), &["cat", "dog", "empty"]);
        assert_eq!(folder.empty_classes(), &["empty"]);
        assert_eq!(folder.len(), 2);
        let (sample, label) = folder.get(1).unwrap();
        let image = sample.decode(1).unwrap();
        assert_eq!((image.width, image.height, label), (5, 4, 1));
        assert_eq!(&image.pixels[..3], &[10, 0, 0]);
        assert_eq!(folder.path(0), dir.path().join("cat/a.png"));
    }

    #[test]
    fn a_flat_folder_takes_its_labels_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let classes = vec!["n01".to_string(), "n02".to_string()];
        for (i, value) in [(1, 10u8), (2, 20), (3, 30)] {
            save_png(dir.path(), &format!("val_{i:04}.png"), value);
        }
        std::fs::write(dir.path().join("readme.txt"), "ignored").unwrap();
        let labels = dir.path().join("labels.csv");
        // Kaggle's LOC_val_solution.csv: header, stem, class then boxes.
        std::fs::write(
            &labels,
            "ImageId,PredictionString\nval_0002,n01 1 2 3 4\nval_0001,n02 5 6 7 8\nval_0003.png,n02\n",
        )
        .unwrap();
        let folder = ImageFolder::open_flat(dir.path(), &labels, &classes).unwrap();
        let got: Vec<usize> = (0..3).map(|i| folder.get(i).unwrap().1).collect();
        assert_eq!(got, [1, 0, 1]);

        std::fs::write(&labels, "val_0001.png n02\nval_0002.png n01\n").unwrap();
        let error = ImageFolder::open_flat(dir.path(), &labels, &classes)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("val_0003.png") && error.contains("no line"),
            "{error}"
        );

        std::fs::write(&labels, "val_0001.png n02\nval_0002.png n09\n").unwrap();
        let error = ImageFolder::open_flat(dir.path(), &labels, &classes)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("labels.csv: line 2") && error.contains("n09"),
            "{error}"
        );

        std::fs::write(
            &labels,
            "val_0001 n02\nval_0002 n01\nval_0003 n01\nval_0004 n01\n",
        )
        .unwrap();
        let error = ImageFolder::open_flat(dir.path(), &labels, &classes)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("line 4: no image `val_0004`"), "{error}");

        std::fs::write(&labels, "val_0001 n02\nval_0002 n01\nval_0001.png n01\n").unwrap();
        let error = ImageFolder::open_flat(dir.path(), &labels, &classes)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("line 3: `val_0001.png` is labelled twice (first on line 1)"),
            "{error}"
        );
    }
}
