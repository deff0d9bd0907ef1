use std::path::PathBuf;

use thiserror::Error;

/// Errors from loading, converting or running a model. Every file error names the file.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its contents are not what was expected (truncated, bad magic, bad JSON...).
    #[error("{path}: malformed file: {msg}")]
    Malformed { path: PathBuf, msg: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: unsupported {what}: {value}")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        value: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("asset: {0}")]
    Asset(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Quant(#[from] quant_core::QuantError),
}

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn malformed(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Malformed {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
