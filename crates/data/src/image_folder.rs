//! Image folders: `<dir>/<class>/<image>`, classes numbered by their sorted folder names
//! (torchvision's `ImageFolder` rule). Files without an image extension are ignored.

use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, RgbImage};

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The file list of an image folder; images are decoded on demand by [`Dataset::get`].
pub struct ImageFolder {
    classes: Vec<String>,
    items: Vec<(PathBuf, usize)>,
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

impl ImageFolder {
    /// Lists `dir/<class>/*`. With `classes`, those names define the label numbering (a
    /// validation split uses the training split's classes); a class folder not among them is
    /// an error.
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
        let names: Vec<String> = class_dirs
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let classes: Vec<String> = classes.map_or_else(|| names.clone(), <[String]>::to_vec);
        let mut items = Vec::new();
        for (path, name) in class_dirs.iter().zip(&names) {
            let label =
                classes
                    .iter()
                    .position(|c| c == name)
                    .ok_or_else(|| DataError::Corrupt {
                        path: path.clone(),
                        reason: "class folder not present in the training split".into(),
                    })?;
            items.extend(
                read_dir_sorted(path)?
                    .into_iter()
                    .filter(|p| p.is_file() && is_image(p))
                    .map(|p| (p, label)),
            );
        }
        if items.is_empty() {
            return Err(DataError::Corrupt {
                path: dir.to_path_buf(),
                reason: "no images found (expected <class>/<image>.jpg|jpeg|png)".into(),
            });
        }
        Ok(Self { classes, items })
    }

    /// Class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn get(&self, index: usize) -> Result<(RgbImage, usize), DataError> {
        let (path, label) = &self.items[index];
        let decoded = image::ImageReader::open(path)
            .map_err(|e| DataError::io(path, e))?
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))?
            .decode()
            .map_err(|e| DataError::Decode {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .into_rgb8();
        let (width, height) = decoded.dimensions();
        let image = RgbImage {
            width: width as usize,
            height: height as usize,
            pixels: decoded.into_raw(),
        };
        Ok((image, *label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_sorted_folder_names_and_non_images_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for (class, value) in [("dog", 10u8), ("cat", 200)] {
            let class_dir = dir.path().join(class);
            std::fs::create_dir(&class_dir).unwrap();
            image::RgbImage::from_pixel(5, 4, image::Rgb([value, 0, 0]))
                .save(class_dir.join("a.png"))
                .unwrap();
            std::fs::write(class_dir.join("notes.txt"), "not an image").unwrap();
        }
        let folder = ImageFolder::open(dir.path(), None).unwrap();
        assert_eq!(folder.classes(), &["cat".to_string(), "dog".to_string()]);
        assert_eq!(folder.len(), 2);
        let (image, label) = folder.get(1).unwrap();
        assert_eq!((image.width, image.height, label), (5, 4, 1));
        assert_eq!(&image.pixels[..3], &[10, 0, 0]);
    }
}
