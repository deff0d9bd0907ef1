//! kernels' integration tests.
//!
//! One test binary for the crate's integration tests: each file below was its own binary,
//! and each linked and compiled the same generic model code again.

#[path = "../cube_common/mod.rs"]
mod cube_common;

mod cpu_gemm;
mod cpu_int8;
mod cube_quant_matmul;
mod ndarray_fused_ops;
mod quant_linear_ndarray;
