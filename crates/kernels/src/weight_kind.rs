//! [`WeightKind`]: the form a linear layer's weight is stored in on its device.

use quant_core::QuantDim;

/// How a linear layer's weight is stored. Each weight is held once, in one of these forms; a
/// product that needs another form builds it for that product only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightKind {
    /// Integer codes of `bits` bits, one scale and zero point per group of `group_size` weights
    /// along `dim` (docs/method.md §1 and §6), read by a dequantizing kernel.
    Packed {
        dim: QuantDim,
        bits: u32,
        group_size: usize,
    },
    /// Dense f16.
    F16,
    /// Dense bf16.
    Bf16,
    /// Dense f32: a 16-bit weight widened, or packed codes dequantized, where the backend has
    /// no kernel reading them.
    F32,
}
