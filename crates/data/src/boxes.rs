//! Ground-truth boxes for localization, in the pixel coordinates of the original images, with
//! both corners inclusive (`x0 y0 x1 y1`), from the formats they are distributed in:
//!
//! - a plain text file, one box per line, `<image> x0 y0 x1 y1` (an image may have several
//!   lines; blank lines and `#` comments are skipped);
//! - CUB-200-2011's `images.txt` (`<id> <path>`) and `bounding_boxes.txt` (`<id> <x> <y> <w>
//!   <h>`, floats): `x1 = x + w`, `y1 = y + h`, as wsolevaluation reads them;
//! - ImageNet's `LOC_val_solution.csv` (`ImageId,PredictionString`, the string repeating
//!   `wnid xmin ymin xmax ymax`).
//!
//! Every malformed line is an error naming the file and the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::DataError;

/// `[x0, y0, x1, y1]` with inclusive corners, in the original image's pixels.
pub type RawBox = [f32; 4];

/// Ground-truth boxes by image: the plain file's image name, CUB's `images.txt` path, or
/// ImageNet's `ImageId`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BoxTable {
    pub boxes: BTreeMap<String, Vec<RawBox>>,
    /// The file the boxes came from (for messages).
    pub source: PathBuf,
}

pub(crate) fn corrupt(path: &Path, line: usize, reason: String) -> DataError {
    DataError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("line {line}: {reason}"),
    }
}

fn read(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Four numbers, `what` naming them in the error.
fn numbers(fields: &[&str], path: &Path, line: usize, what: &str) -> Result<RawBox, DataError> {
    let parsed: Vec<f32> = fields
        .iter()
        .map(|f| f.parse::<f32>().ok().filter(|v| v.is_finite()))
        .collect::<Option<_>>()
        .filter(|v: &Vec<f32>| v.len() == 4)
        .ok_or_else(|| {
            corrupt(
                path,
                line,
                format!("expected {what}, got `{}`", fields.join(" ")),
            )
        })?;
    Ok([parsed[0], parsed[1], parsed[2], parsed[3]])
}

/// Rejects boxes whose far corner is before the near one.
fn ordered(b: RawBox, path: &Path, line: usize) -> Result<RawBox, DataError> {
    if b[2] < b[0] || b[3] < b[1] {
        return Err(corrupt(
            path,
            line,
            format!("box {b:?} has x1 < x0 or y1 < y0"),
        ));
    }
    Ok(b)
}

impl BoxTable {
    /// A plain box file: `<image> x0 y0 x1 y1` per line.
    pub fn read_plain(path: &Path) -> Result<Self, DataError> {
        let text = read(path)?;
        let mut table = BoxTable {
            source: path.to_path_buf(),
            ..Default::default()
        };
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.len() != 5 {
                return Err(corrupt(
                    path,
                    line_no,
                    format!("expected `<image> x0 y0 x1 y1`, got `{content}`"),
                ));
            }
            let b = numbers(&fields[1..], path, line_no, "`<image> x0 y0 x1 y1`")?;
            let b = ordered(b, path, line_no)?;
            table
                .boxes
                .entry(fields[0].to_string())
                .or_default()
                .push(b);
        }
        Ok(table)
    }

    /// CUB-200-2011's boxes, keyed by the image paths of `images.txt` (relative to `images/`).
    pub fn read_cub(root: &Path) -> Result<Self, DataError> {
        let images = cub_ids(&root.join("images.txt"))?;
        let path = root.join("bounding_boxes.txt");
        let text = read(&path)?;
        let mut table = BoxTable {
            source: path.clone(),
            ..Default::default()
        };
        for (i, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            if fields.len() != 5 {
                return Err(corrupt(
                    &path,
                    i + 1,
                    format!("expected `<image_id> <x> <y> <width> <height>`, got `{line}`"),
                ));
            }
            let [x, y, w, h] = numbers(&fields[1..], &path, i + 1, "`<x> <y> <width> <height>`")?;
            let b = ordered([x, y, x + w, y + h], &path, i + 1)?;
            let image = images.get(fields[0]).ok_or_else(|| {
                corrupt(
                    &path,
                    i + 1,
                    format!("image id {} is not in images.txt", fields[0]),
                )
            })?;
            table.boxes.entry(image.clone()).or_default().push(b);
        }
        Ok(table)
    }

    /// ImageNet's `LOC_val_solution.csv`, keyed by `ImageId` (e.g. `ILSVRC2012_val_00000001`).
    pub fn read_imagenet(path: &Path) -> Result<Self, DataError> {
        let text = read(path)?;
        let mut table = BoxTable {
            source: path.to_path_buf(),
            ..Default::default()
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (i == 0 && line.starts_with("ImageId")) {
                continue;
            }
            let Some((id, boxes)) = line.split_once(',') else {
                return Err(corrupt(
                    path,
                    i + 1,
                    format!("expected `ImageId,PredictionString`, got `{line}`"),
                ));
            };
            let fields: Vec<&str> = boxes.split_whitespace().collect();
            if fields.is_empty() || !fields.len().is_multiple_of(5) {
                return Err(corrupt(
                    path,
                    i + 1,
                    format!("expected `wnid xmin ymin xmax ymax` repeated, got `{boxes}`"),
                ));
            }
            let entry = table.boxes.entry(id.to_string()).or_default();
            for group in fields.chunks_exact(5) {
                let b = numbers(&group[1..], path, i + 1, "`xmin ymin xmax ymax`")?;
                entry.push(ordered(b, path, i + 1)?);
            }
        }
        Ok(table)
    }

    /// The boxes of `image`, or an error naming the box file when it has none for it.
    pub fn get(&self, image: &str) -> Result<&[RawBox], DataError> {
        self.boxes
            .get(image)
            .map(Vec::as_slice)
            .ok_or_else(|| DataError::Corrupt {
                path: self.source.clone(),
                reason: format!("no box for image `{image}`"),
            })
    }
}

/// CUB's `images.txt`: id -> path.
fn cub_ids(path: &Path) -> Result<BTreeMap<String, String>, DataError> {
    Ok(id_lines(path, "path")?
        .into_iter()
        .map(|line| (line.id, line.value))
        .collect())
}

/// A line `<id> <value>` of one of CUB's files, with its line number.
pub(crate) struct IdLine {
    pub line: usize,
    pub id: String,
    pub value: String,
}

/// The `<id> <value>` lines of one of CUB's files, in file order (`value` names the second
/// field in the error a malformed line gets). An id listed twice is an error.
pub(crate) fn id_lines(path: &Path, value: &str) -> Result<Vec<IdLine>, DataError> {
    let text = read(path)?;
    let mut lines = Vec::new();
    let mut seen = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [] => continue,
            [id, v] => {
                if let Some(first) = seen.insert(id.to_string(), i + 1) {
                    return Err(corrupt(
                        path,
                        i + 1,
                        format!("id {id} is listed twice (first on line {first})"),
                    ));
                }
                lines.push(IdLine {
                    line: i + 1,
                    id: id.to_string(),
                    value: v.to_string(),
                });
            }
            _ => {
                return Err(corrupt(
                    path,
                    i + 1,
                    format!("expected `<id> <{value}>`, got `{line}`"),
                ));
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn plain_files_hold_several_boxes_per_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "boxes.txt",
            "# image x0 y0 x1 y1\na.jpg 1 2 30 40\n\nb.png 0 0 5.5 6\na.jpg 10 10 12 12  # second\n",
        );
        let table = BoxTable::read_plain(&path).unwrap();
        assert_eq!(
            table.get("a.jpg").unwrap(),
            &[[1.0, 2.0, 30.0, 40.0], [10.0, 10.0, 12.0, 12.0]]
        );
        assert_eq!(table.get("b.png").unwrap(), &[[0.0, 0.0, 5.5, 6.0]]);
        let missing = table.get("c.jpg").unwrap_err().to_string();
        assert!(
            missing.contains("boxes.txt") && missing.contains("c.jpg"),
            "{missing}"
        );
    }

    #[test]
    fn malformed_lines_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in [
            ("a.jpg 1 2 3\n", "line 1: expected `<image> x0 y0 x1 y1`"),
            ("a.jpg 1 2 3 4\nb.jpg 1 two 3 4\n", "line 2: expected"),
            (
                "a.jpg 5 5 4 9\n",
                "line 1: box [5.0, 5.0, 4.0, 9.0] has x1 < x0",
            ),
            ("a.jpg 1 2 inf 4\n", "line 1"),
        ] {
            let path = write(dir.path(), "bad.txt", text);
            let err = BoxTable::read_plain(&path).unwrap_err().to_string();
            assert!(err.contains("bad.txt") && err.contains(needle), "{err}");
        }
        let err = BoxTable::read_plain(&dir.path().join("none.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.txt"), "{err}");
    }

    #[test]
    fn cub_boxes_are_x_y_width_height_by_image_id() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "images.txt",
            "1 001.Black_footed_Albatross/a.jpg\n2 002.Laysan_Albatross/b.jpg\n",
        );
        write(
            dir.path(),
            "bounding_boxes.txt",
            "1 60.0 27.0 325.0 304.0\n2 139.0 30.0 153.0 264.0\n",
        );
        let table = BoxTable::read_cub(dir.path()).unwrap();
        assert_eq!(
            table.get("001.Black_footed_Albatross/a.jpg").unwrap(),
            &[[60.0, 27.0, 385.0, 331.0]]
        );
        write(
            dir.path(),
            "bounding_boxes.txt",
            "1 60 27 325 304\n3 1 1 2 2\n",
        );
        let err = BoxTable::read_cub(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("bounding_boxes.txt") && err.contains("line 2") && err.contains("id 3"),
            "{err}"
        );
    }

    #[test]
    fn imagenet_solutions_hold_several_boxes_per_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "LOC_val_solution.csv",
            "ImageId,PredictionString\nILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295 \nILSVRC2012_val_00020130,n03584829 95 151 345 281 \n",
        );
        let table = BoxTable::read_imagenet(&path).unwrap();
        assert_eq!(
            table.get("ILSVRC2012_val_00008726").unwrap(),
            &[[255.0, 142.0, 454.0, 329.0], [44.0, 21.0, 322.0, 295.0]]
        );
        let bad = write(
            dir.path(),
            "bad.csv",
            "ImageId,PredictionString\nX,n1 1 2 3\n",
        );
        let err = BoxTable::read_imagenet(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.csv") && err.contains("line 2"), "{err}");
    }
}
