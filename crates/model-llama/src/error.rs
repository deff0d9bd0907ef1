use std::path::PathBuf;

use thiserror::Error;

/// Errors from loading, converting or running a model. Every file error names the file.
///
/// A variant with a `#[source]` leaves the cause out of its own message: reporters that walk
/// the chain (anyhow's `{:#}`) would otherwise print it twice.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}")]
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
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Quant(#[from] quant_core::QuantError),
    /// A tensor larger than the device can hold (its message names the tensor and the limit).
    #[error(transparent)]
    DeviceLimit(#[from] kernels::DeviceLimitError),
}

/// An option value that cannot work, caught before any work starts. `option` is the field's
/// name; a front end may show it under its own spelling (a command-line flag).
#[derive(Clone, Debug, Error, PartialEq)]
#[error("invalid {option}: {reason}")]
pub struct InvalidOption {
    pub option: &'static str,
    pub reason: String,
}

impl InvalidOption {
    pub fn new(option: &'static str, reason: impl Into<String>) -> Self {
        Self {
            option,
            reason: reason.into(),
        }
    }

    /// The error as a command line shows it, under the flag that set the option (`flags`:
    /// `(option, flag)` pairs; an option not listed keeps its own name).
    pub fn under_flag(&self, flags: &[(&str, &str)]) -> String {
        let flag = flags
            .iter()
            .find(|(option, _)| *option == self.option)
            .map_or(self.option, |(_, flag)| flag);
        format!("invalid {flag}: {}", self.reason)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The message and its sources joined as anyhow's `{:#}` shows them.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push_str(": ");
            out.push_str(&s.to_string());
            cur = s.source();
        }
        out
    }

    #[test]
    fn io_error_states_its_cause_once() {
        let e = ModelError::io("/x/out", std::io::Error::from_raw_os_error(20));
        let cause = std::io::Error::from_raw_os_error(20).to_string();
        let shown = chain(&e);
        assert_eq!(shown.matches(&cause).count(), 1, "{shown}");
        assert!(shown.starts_with("/x/out: "), "{shown}");
    }

    #[test]
    fn quant_error_states_its_cause_once() {
        let e = ModelError::from(quant_core::QuantError::UnsupportedBits(5));
        let shown = chain(&e);
        assert_eq!(
            shown.matches("unsupported bit width 5").count(),
            1,
            "{shown}"
        );
    }
}
