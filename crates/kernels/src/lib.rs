//! Dequantizing matrix products `y = x · Ŵᵀ` straight from AdaDim's packed weights
//! ([`quant_core::PackedLinear`]), per-IC and per-OC, and the few fused ops a LLaMA forward
//! needs on the CPU.
//!
//! * [`cpu`]: SIMD Rust for CPUs: the packed GEMV (decode-sized M), and host attention,
//!   softmax and dense products.
//! * `cube` (features `wgpu`/`cuda`): CubeCL kernels for GPUs; their design is in that module's docs.
//! * [`QuantBackend`]: the Burn backend extension that model code calls (CubeCL kernels on
//!   wgpu/cuda, the host kernels on ndarray), and [`QuantLinear`], a layer on packed weights.
//! * [`generic`]: the same ops composed from Burn tensor ops (defaults and test reference).
//! * [`limits`]: the largest buffer a device holds, checked before every upload.
//! * [`WeightKind`]: the form a layer's weight is stored in (packed codes, f16, bf16, f32).

mod backend;
pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
pub mod generic;
pub mod kv;
pub mod limits;
#[cfg(feature = "ndarray")]
mod ndarray;
pub mod quant_linear;
mod weight_kind;

pub use backend::QuantBackend;
pub use kv::{KvDtype, KvStore, TensorKv};
pub use limits::{DeviceLimitError, DeviceLimits};
#[cfg(feature = "ndarray")]
pub use ndarray::NdArrayWeight;
pub use quant_linear::{QuantLinear, QuantLinearError};
pub use weight_kind::WeightKind;
