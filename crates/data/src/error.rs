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

/// The message a panic carried (`panic!("...")` or `panic!("{}", ..)`), if it carried text.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}

impl DataError {
    /// The file an example could not be read or decoded from, when that is what went wrong:
    /// such an example can be skipped instead of stopping the run.
    pub fn unreadable_file(&self) -> Option<&std::path::Path> {
        match self {
            Self::Io { path, .. } | Self::Decode { path, .. } => Some(path),
            _ => None,
        }
    }

    /// What went wrong, without the path.
    pub fn reason(&self) -> String {
        match self {
            Self::Io { source, .. } => source.to_string(),
            Self::Decode { reason, .. } | Self::Corrupt { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
