//! CUB-200-2011 as distributed (`CUB_200_2011/`): `images.txt` (`<id> <path>`, paths under
//! `images/`), `image_class_labels.txt` (`<id> <class id>`, 1-based), `train_test_split.txt`
//! (`<id> <1 = train, 0 = test>`) and `classes.txt` (`<class id> <name>`). The official split
//! is 5,994 training and 5,794 test images of 200 classes. Examples are in `images.txt`'s
//! order and named by its paths, which are also the keys of [`crate::BoxTable::read_cub`].

use std::collections::HashMap;
use std::path::Path;

use crate::boxes::{corrupt, id_lines};
use crate::{DataError, ImageFolder, Split};

/// Opens one split of the CUB-200-2011 folder `root` as an image list over `root/images`.
pub fn open_cub(root: &Path, split: Split) -> Result<ImageFolder, DataError> {
    let images_txt = root.join("images.txt");
    if !images_txt.is_file() {
        return Err(DataError::Missing {
            dataset: "CUB-200-2011",
            path: images_txt,
            hint: "set data.root to the CUB_200_2011 folder (images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/)".into(),
        });
    }
    let classes = class_names(&root.join("classes.txt"))?;
    let labels_txt = root.join("image_class_labels.txt");
    let labels = by_id(&labels_txt, "class id")?;
    let split_txt = root.join("train_test_split.txt");
    let splits = by_id(&split_txt, "is_training_image")?;
    let want = if split == Split::Train { "1" } else { "0" };
    let mut folder = ImageFolder::empty(&root.join("images"), classes);
    for image in id_lines(&images_txt, "path")? {
        let missing = |file: &Path| {
            corrupt(
                &images_txt,
                image.line,
                format!("image id {} has no line in {}", image.id, file.display()),
            )
        };
        let (flag, flag_line) = splits.get(&image.id).ok_or_else(|| missing(&split_txt))?;
        if flag != "0" && flag != "1" {
            return Err(corrupt(
                &split_txt,
                *flag_line,
                format!("expected 1 (train) or 0 (test), got `{flag}`"),
            ));
        }
        let (class, class_line) = labels.get(&image.id).ok_or_else(|| missing(&labels_txt))?;
        let label = class
            .parse::<usize>()
            .ok()
            .filter(|c| (1..=folder.classes().len()).contains(c))
            .ok_or_else(|| {
                corrupt(
                    &labels_txt,
                    *class_line,
                    format!(
                        "class id `{class}` is not one of classes.txt's 1..={}",
                        folder.classes().len()
                    ),
                )
            })?;
        if flag == want {
            folder.push(&image.value, label - 1);
        }
    }
    folder.check_not_empty()?;
    Ok(folder)
}

/// `<id> <value>` lines by id, with the line number of each.
fn by_id(path: &Path, value: &str) -> Result<HashMap<String, (String, usize)>, DataError> {
    Ok(id_lines(path, value)?
        .into_iter()
        .map(|l| (l.id, (l.value, l.line)))
        .collect())
}

/// The class names of `classes.txt`, whose ids must run 1, 2, ... in order.
fn class_names(path: &Path) -> Result<Vec<String>, DataError> {
    let lines = id_lines(path, "class name")?;
    for (i, line) in lines.iter().enumerate() {
        if line.id != (i + 1).to_string() {
            return Err(corrupt(
                path,
                line.line,
                format!("expected class id {}, got {}", i + 1, line.id),
            ));
        }
    }
    if lines.is_empty() {
        return Err(DataError::Corrupt {
            path: path.to_path_buf(),
            reason: "no classes".into(),
        });
    }
    Ok(lines.into_iter().map(|l| l.value).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dataset;
    use std::path::PathBuf;

    /// A CUB-layout folder of three classes and five images (files not written: opening
    /// lists them, reading decodes them).
    fn cub(dir: &Path) -> PathBuf {
        let root = dir.join("CUB_200_2011");
        std::fs::create_dir_all(&root).unwrap();
        let write = |name: &str, text: &str| std::fs::write(root.join(name), text).unwrap();
        write(
            "classes.txt",
            "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n3 003.Sooty_Albatross\n",
        );
        write(
            "images.txt",
            "1 001.Black_footed_Albatross/a.jpg\n2 001.Black_footed_Albatross/b.jpg\n\
             3 002.Laysan_Albatross/c.jpg\n4 003.Sooty_Albatross/d.jpg\n10 003.Sooty_Albatross/e.jpg\n",
        );
        write("image_class_labels.txt", "1 1\n2 1\n3 2\n4 3\n10 3\n");
        write("train_test_split.txt", "1 1\n2 0\n3 1\n4 0\n10 1\n");
        root
    }

    #[test]
    fn the_official_split_keeps_images_txt_order_and_one_based_classes() {
        let dir = tempfile::tempdir().unwrap();
        let root = cub(dir.path());
        let train = open_cub(&root, Split::Train).unwrap();
        let test = open_cub(&root, Split::Test).unwrap();
        assert_eq!(train.num_classes(), 3);
        assert_eq!(train.classes()[1], "002.Laysan_Albatross");
        let names = |f: &ImageFolder| {
            (0..f.len())
                .map(|i| f.name(i).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&train),
            [
                "001.Black_footed_Albatross/a.jpg",
                "002.Laysan_Albatross/c.jpg",
                "003.Sooty_Albatross/e.jpg"
            ]
        );
        assert_eq!(names(&test).len(), 2);
        let labels = |f: &ImageFolder| (0..f.len()).map(|i| f.label(i)).collect::<Vec<_>>();
        assert_eq!(labels(&train), [0, 1, 2]);
        assert_eq!(labels(&test), [0, 2]);
        assert_eq!(
            train.path(0),
            root.join("images/001.Black_footed_Albatross/a.jpg")
        );
    }

    #[test]
    fn malformed_files_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let root = cub(dir.path());
        let err = |file: &str, text: &str| {
            let saved = std::fs::read_to_string(root.join(file)).unwrap();
            std::fs::write(root.join(file), text).unwrap();
            let e = open_cub(&root, Split::Train).unwrap_err().to_string();
            std::fs::write(root.join(file), saved).unwrap();
            e
        };
        for (file, text, needle) in [
            (
                "image_class_labels.txt",
                "1 1\n2 1\n3 4\n4 3\n10 3\n",
                "line 3: class id `4`",
            ),
            (
                "image_class_labels.txt",
                "1 1\n2 1\n3 2\n4 3\n",
                "images.txt: line 5: image id 10 has no line",
            ),
            (
                "train_test_split.txt",
                "1 1\n2 0\n3 yes\n4 0\n10 1\n",
                "line 3: expected 1 (train) or 0",
            ),
            (
                "images.txt",
                "1 a.jpg\n1 b.jpg\n",
                "line 2: id 1 is listed twice",
            ),
            ("classes.txt", "1 a\n3 c\n", "line 2: expected class id 2"),
            (
                "images.txt",
                "1 a.jpg extra\n",
                "line 1: expected `<id> <path>`",
            ),
        ] {
            let e = err(file, text);
            assert!(e.contains(file) || e.contains("images.txt"), "{e}");
            assert!(e.contains(needle), "{file}: {e}");
        }
        let missing = open_cub(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            missing.contains("images.txt") && missing.contains("data.root"),
            "{missing}"
        );
    }
}
