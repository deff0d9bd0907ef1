use std::path::PathBuf;

use thiserror::Error;

/// A variant with a `#[source]` leaves the cause out of its own message: reporters that walk
/// the chain (anyhow's `{:#}`) would otherwise print it twice.
#[derive(Debug, Error)]
pub enum AdadimError {
    #[error(transparent)]
    Model(#[from] model_llama::ModelError),
    #[error("{context}")]
    Quant {
        context: String,
        #[source]
        source: quant_core::QuantError,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("empty calibration: {0}")]
    EmptyCalibration(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    InvalidOption(#[from] model_llama::InvalidOption),
    /// A tensor of the run is larger than the device's largest buffer.
    #[error(transparent)]
    DeviceLimit(#[from] kernels::DeviceLimitError),
}

pub type Result<T, E = AdadimError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

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
    fn causes_are_stated_once() {
        let e = AdadimError::Quant {
            context: "quantization options".into(),
            source: quant_core::QuantError::UnsupportedBits(5),
        };
        let shown = chain(&e);
        assert_eq!(
            shown,
            "quantization options: unsupported bit width 5: expected 2, 3, 4 or 8"
        );
        let e = AdadimError::Io {
            path: "/x/calib.txt".into(),
            source: std::io::Error::from_raw_os_error(20),
        };
        let cause = std::io::Error::from_raw_os_error(20).to_string();
        let shown = chain(&e);
        assert_eq!(shown, format!("/x/calib.txt: {cause}"));
    }
}
