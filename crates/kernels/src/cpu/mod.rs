//! CPU kernels (SIMD).
