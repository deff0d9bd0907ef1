//! Group quantization for AdaDim: asymmetric RTN and GPTQ, per output channel (OC) or per
//! input channel (IC), and the packed format the kernels read.
//!
//! Every algorithm is written once for the *grouped layout*: a `rows × cols` matrix whose groups
//! run along `cols`. Per-OC uses `W` itself; per-IC uses `Wᵀ` (see [`QuantDim::grouped_shape`]).

mod config;
mod error;
pub mod packing;
mod quantized;

pub use config::{QuantConfig, QuantDim};
pub use error::QuantError;
pub use quantized::{PackedLinear, Quantized, from_grouped, to_grouped, transpose};
