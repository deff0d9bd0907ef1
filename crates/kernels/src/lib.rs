//! Dequantizing matrix products `y = x · Ŵᵀ` straight from AdaDim's packed weights
//! ([`quant_core::PackedLinear`]), per-IC and per-OC.
//!
//! * [`cpu`]: SIMD Rust for CPUs (decode-sized M).
//! * `cube` (features `wgpu`/`cuda`): CubeCL kernels for GPUs; their design is in that module's docs.
//! * [`quant_linear`]: [`QuantLinear`] and the [`QuantBackend`] extension trait, the Burn op that
//!   model code calls (CubeCL kernels on wgpu/cuda, dequantize-then-matmul on ndarray).

pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
pub mod quant_linear;

pub use quant_linear::{QuantBackend, QuantLinear, QuantLinearError};
