//! CubeCL kernels.
