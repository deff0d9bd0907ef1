use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AdadimError {
    #[error(transparent)]
    Model(#[from] model_llama::ModelError),
    #[error("{context}: {source}")]
    Quant {
        context: String,
        #[source]
        source: quant_core::QuantError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("empty calibration: {0}")]
    EmptyCalibration(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = AdadimError> = std::result::Result<T, E>;
