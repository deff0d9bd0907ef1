//! Dequantizing matrix products `y = x · Ŵᵀ` straight from AdaDim's packed weights
//! ([`quant_core::PackedLinear`]), per-IC and per-OC.
//!
//! * [`cpu`]: SIMD Rust for CPUs (decode-sized M).
//! * `cube` (features `wgpu`/`cuda`): CubeCL kernels for GPUs.

pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
