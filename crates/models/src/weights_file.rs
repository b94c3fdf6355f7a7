//! Weights files: safetensors (read and write), PyTorch checkpoints (`.pth`, `.pt`,
//! `.pth.tar`, including the CutMix reference's `{"state_dict": ...}` with DataParallel's
//! `module.` prefix) and Burn's burnpack (`.bpk`, read).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::state_dict::{HostData, HostTensor, StateDict};

/// The formats [`read_weights`] understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    Pytorch,
    /// Burn's burnpack: tensors under Burn's module paths (see
    /// [`burn_paths_to_torch`](crate::burn_paths_to_torch)).
    Burnpack,
}

/// A weights file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        // Not named `source`: the message carries it, and error chains would print it twice.
        error: std::io::Error,
    },
    #[error("{}: the folder {} does not exist", path.display(), folder.display())]
    NoFolder { path: PathBuf, folder: PathBuf },
    #[error("{}: not a readable {format} file: {message}", path.display())]
    Format {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("{}: tensor {name} has element type {dtype}, which is not a number type", path.display())]
    DType {
        path: PathBuf,
        name: String,
        dtype: String,
    },
}

/// Tells the format from the file's first bytes (a JSON header after the length is
/// safetensors', a ZIP or pickle is PyTorch's), falling back to the extension.
fn sniff(path: &Path, head: &[u8]) -> Option<WeightsFormat> {
    // safetensors: an 8-byte little-endian header length, then the JSON header. Checked first:
    // the length's low byte can be anything, 0x80 (a pickle's first byte) included.
    if head.len() >= 9 && head[8] == b'{' {
        return Some(WeightsFormat::Safetensors);
    }
    if head.starts_with(b"PK") || head.first() == Some(&0x80) {
        return Some(WeightsFormat::Pytorch);
    }
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    if name.ends_with(".safetensors") {
        Some(WeightsFormat::Safetensors)
    } else if name.ends_with(".bpk") || name.ends_with(".burnpack") {
        Some(WeightsFormat::Burnpack)
    } else if [".pth", ".pt", ".tar", ".bin", ".ckpt"]
        .iter()
        .any(|ext| name.ends_with(ext))
    {
        Some(WeightsFormat::Pytorch)
    } else {
        None
    }
}

/// Reads every tensor of a weights file into host memory. Names are as stored, except that a
/// PyTorch checkpoint's `state_dict` entry is used when there is one and DataParallel's
/// `module.` prefix is dropped; floats of any width become f32, integers i64.
pub fn read_weights(path: &Path) -> Result<(WeightsFormat, StateDict), WeightsError> {
    let io = |error| WeightsError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut head = [0u8; 16];
    let read = {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(io)?;
        file.read(&mut head).map_err(io)?
    };
    let format = sniff(path, &head[..read]).ok_or_else(|| WeightsError::Format {
        path: path.to_path_buf(),
        format: "weights",
        message: "expected .safetensors, .pth / .pt / .pth.tar or .bpk".into(),
    })?;
    let tensors = match format {
        WeightsFormat::Safetensors => read_safetensors(path)?,
        WeightsFormat::Pytorch => read_pytorch(path)?,
        WeightsFormat::Burnpack => read_burnpack(path)?,
    };
    Ok((format, tensors))
}

/// Converts little-endian element bytes to host values.
fn host_data(path: &Path, name: &str, dtype: &str, bytes: &[u8]) -> Result<HostData, WeightsError> {
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes
            .chunks_exact(N)
            .map(|c| c.try_into().expect("exact chunk"))
    }
    Ok(match dtype {
        "F32" => HostData::F32(chunks(bytes).map(f32::from_le_bytes).collect()),
        "F64" => HostData::F32(
            chunks(bytes)
                .map(|b| f64::from_le_bytes(b) as f32)
                .collect(),
        ),
        "F16" => HostData::F32(
            chunks(bytes)
                .map(|b| half::f16::from_le_bytes(b).to_f32())
                .collect(),
        ),
        "BF16" => HostData::F32(
            chunks(bytes)
                .map(|b| half::bf16::from_le_bytes(b).to_f32())
                .collect(),
        ),
        "I64" => HostData::I64(chunks(bytes).map(i64::from_le_bytes).collect()),
        "I32" => HostData::I64(
            chunks(bytes)
                .map(|b| i64::from(i32::from_le_bytes(b)))
                .collect(),
        ),
        "U8" | "BOOL" => HostData::I64(bytes.iter().map(|&b| i64::from(b)).collect()),
        other => {
            return Err(WeightsError::DType {
                path: path.to_path_buf(),
                name: name.to_string(),
                dtype: other.to_string(),
            });
        }
    })
}

fn read_safetensors(path: &Path) -> Result<StateDict, WeightsError> {
    let bytes = std::fs::read(path).map_err(|error| WeightsError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Format {
        path: path.to_path_buf(),
        format: "safetensors",
        message: e.to_string(),
    })?;
    let mut out = StateDict::new();
    for (name, view) in file.iter() {
        let dtype = format!("{:?}", view.dtype());
        let data = host_data(path, name, &dtype, view.data())?;
        out.insert(
            name.to_string(),
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

fn read_pytorch(path: &Path) -> Result<StateDict, WeightsError> {
    use pytorch_reader::{DType, PytorchReader};
    let format_error = |message: String| WeightsError::Format {
        path: path.to_path_buf(),
        format: "PyTorch",
        message,
    };
    // A training checkpoint keeps the weights under "state_dict"; a bare state dict is the
    // top level itself.
    let reader = match PytorchReader::with_top_level_key(path, "state_dict") {
        Ok(reader) if !reader.is_empty() => reader,
        _ => PytorchReader::new(path).map_err(|e| format_error(e.to_string()))?,
    };
    let mut out = StateDict::new();
    for (name, tensor) in reader.into_tensors() {
        let dtype = match tensor.dtype() {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::U8 | DType::Bool => "U8",
            other => {
                return Err(WeightsError::DType {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        let bytes = tensor.read().map_err(|e| format_error(e.to_string()))?;
        let bytes = if cfg!(target_endian = "little") {
            bytes
        } else {
            return Err(format_error("big-endian hosts are not supported".into()));
        };
        let data = host_data(path, &name, dtype, &bytes)?;
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        out.insert(
            name,
            HostTensor {
                shape: tensor.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

fn read_burnpack(path: &Path) -> Result<StateDict, WeightsError> {
    use burn_pack::Reader;
    let format_error = |message: String| WeightsError::Format {
        path: path.to_path_buf(),
        format: "burnpack",
        message,
    };
    let reader = Reader::from_file(path).map_err(|e| format_error(e.to_string()))?;
    let mut out = StateDict::new();
    for tensor in reader
        .into_tensors()
        .map_err(|e| format_error(e.to_string()))?
    {
        let dtype = format!("{:?}", tensor.dtype).to_uppercase();
        let shape = tensor.shape.to_vec();
        let name = tensor.name.clone();
        let bytes = tensor
            .into_bytes()
            .map_err(|e| format_error(e.to_string()))?;
        let data = host_data(path, &name, &dtype, &bytes)?;
        out.insert(name, HostTensor { shape, data });
    }
    Ok(out)
}

/// Writes `tensors` as a safetensors file with `metadata`, through a temporary file in the same
/// folder renamed into place, so an existing file is never left half-written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, HostTensor)],
    metadata: HashMap<String, String>,
) -> Result<(), WeightsError> {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, tensor)| {
            let (dtype, bytes) = match &tensor.data {
                HostData::F32(values) => (
                    Dtype::F32,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
                HostData::I64(values) => (
                    Dtype::I64,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            };
            (name.clone(), dtype, tensor.shape.clone(), bytes)
        })
        .collect();
    let views = bytes.iter().map(|(name, dtype, shape, data)| {
        let view = TensorView::new(*dtype, shape.clone(), data).expect("bytes match the shape");
        (name.as_str(), view)
    });
    let serialized =
        safetensors::serialize(views, Some(metadata)).map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            format: "safetensors",
            message: e.to_string(),
        })?;
    let io = |error: std::io::Error| WeightsError::Io {
        path: path.to_path_buf(),
        // tempfile's messages name its temporary file; the destination is what matters.
        error: std::io::Error::new(error.kind(), error.kind().to_string()),
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(WeightsError::NoFolder {
            path: path.to_path_buf(),
            folder: dir,
        });
    }
    let mut temp = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
    temp.write_all(&serialized).map_err(io)?;
    temp.as_file().sync_all().map_err(io)?;
    temp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_names_shapes_and_integers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensors = vec![
            (
                "fc.weight".to_string(),
                HostTensor {
                    shape: vec![2, 3],
                    data: HostData::F32(vec![0.5, -1.0, 2.0, 3.25, 0.0, -0.125]),
                },
            ),
            (
                "bn1.num_batches_tracked".to_string(),
                HostTensor {
                    shape: vec![],
                    data: HostData::I64(vec![42]),
                },
            ),
        ];
        write_safetensors(&path, &tensors, HashMap::new()).unwrap();
        let (format, read) = read_weights(&path).unwrap();
        assert_eq!(format, WeightsFormat::Safetensors);
        assert_eq!(read.len(), 2);
        assert_eq!(read["fc.weight"], tensors[0].1);
        assert_eq!(read["bn1.num_batches_tracked"], tensors[1].1);
    }

    #[test]
    fn a_safetensors_header_length_with_a_pickle_like_first_byte_is_still_safetensors() {
        let mut head = 0x80u64.to_le_bytes().to_vec();
        head.push(b'{');
        let path = Path::new("weights.bin");
        assert_eq!(sniff(path, &head), Some(WeightsFormat::Safetensors));
        assert_eq!(
            sniff(path, &[0x80, 0x02, 0x8a]),
            Some(WeightsFormat::Pytorch)
        );
        assert_eq!(sniff(path, b"PK\x03\x04"), Some(WeightsFormat::Pytorch));
    }

    #[test]
    fn unreadable_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "hello").unwrap();
        let error = read_weights(&path).unwrap_err().to_string();
        assert!(error.contains("notes.txt"), "{error}");
        let missing = read_weights(&dir.path().join("gone.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("gone.safetensors"), "{missing}");
        let broken = dir.path().join("broken.safetensors");
        std::fs::write(&broken, [9u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'x']).unwrap();
        let error = read_weights(&broken).unwrap_err().to_string();
        assert!(error.contains("broken.safetensors"), "{error}");
    }
}
