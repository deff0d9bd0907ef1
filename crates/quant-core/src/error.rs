use thiserror::Error;

/// Everything that can go wrong when quantizing or packing a weight matrix.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    #[error("unsupported bit width {0}: expected 2, 3, 4 or 8")]
    UnsupportedBits(u32),
    #[error("invalid group size {0}: expected a positive size or -1 (whole dimension)")]
    InvalidGroupSize(i64),
    #[error("group size {group_size} does not divide the grouped dimension ({dim_name} = {len})")]
    GroupSizeDoesNotDivide {
        group_size: usize,
        len: usize,
        dim_name: &'static str,
    },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("weight contains a non-finite value (NaN or Inf) at index {index}")]
    NonFiniteWeight { index: usize },
    #[error("calibration input contains a non-finite value (NaN or Inf)")]
    NonFiniteInput,
    #[error("empty calibration: the Hessian was built from no samples")]
    EmptyCalibration,
    #[error(
        "Cholesky failed: the Hessian is not positive definite even with damping {damp} × mean(diag(H))"
    )]
    Cholesky { damp: f32 },
    #[error("invalid GPTQ options: {0}")]
    InvalidOptions(String),
    #[error("reading a tensor from the backend failed: {0}")]
    Backend(String),
}
