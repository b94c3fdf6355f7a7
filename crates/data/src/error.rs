use std::path::PathBuf;

/// Why a dataset could not be read. Every variant names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{dataset} not found: looked for {path}; {hint}")]
    Missing {
        dataset: &'static str,
        path: PathBuf,
        hint: String,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot decode image: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("a loader thread panicked while preparing batch {batch}: {message}")]
    WorkerPanic { batch: usize, message: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
