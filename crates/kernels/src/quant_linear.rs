//! [`QuantLinear`]: a linear layer whose weight stays packed on the device and is multiplied
//! through [`QuantBackend::quant_matmul`].

use burn::prelude::*;
use quant_core::{PackedLinear, QuantError};
use thiserror::Error;

use crate::QuantBackend;

/// Errors of uploading or applying a quantized linear layer.
#[derive(Debug, Error)]
pub enum QuantLinearError {
    #[error("invalid packed linear: {0}")]
    Packed(#[from] QuantError),
    #[error("quantized linear expects {expected} input features, the input has shape {shape:?}")]
    InputShape { expected: usize, shape: Vec<usize> },
}

/// Checks that `shape` is `[M, in_features]`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn check_input(shape: &[usize], in_features: usize) -> Result<(), QuantLinearError> {
    match shape {
        [_, k] if *k == in_features => Ok(()),
        _ => Err(QuantLinearError::InputShape {
            expected: in_features,
            shape: shape.to_vec(),
        }),
    }
}

/// `Ŵᵀ [IC, OC]`: the right operand of `x · Ŵᵀ` for the dense paths.
pub(crate) fn dense_transposed(packed: &PackedLinear) -> Vec<f32> {
    quant_core::transpose(
        &packed.dequantize(),
        packed.out_features,
        packed.in_features,
    )
}

/// A linear layer `y = x · Ŵᵀ` (no bias, as in LLaMA) on a packed weight.
#[derive(Clone, Debug)]
pub struct QuantLinear<B: QuantBackend> {
    weight: B::Packed,
}

impl<B: QuantBackend> QuantLinear<B> {
    /// Uploads `packed` to `device`.
    pub fn new(packed: &PackedLinear, device: &B::Device) -> Result<Self, QuantLinearError> {
        Ok(Self {
            weight: B::upload(packed, device)?,
        })
    }

    pub fn in_features(&self) -> usize {
        B::packed_shape(&self.weight).1
    }

    pub fn out_features(&self) -> usize {
        B::packed_shape(&self.weight).0
    }

    /// The device-resident weight, for calling [`QuantBackend::quant_matmul`] directly.
    pub fn packed(&self) -> &B::Packed {
        &self.weight
    }

    /// `x [..., IC] → [..., OC]`; panics if the last dimension is not `in_features`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.try_forward(x).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::forward`] that reports a wrong input shape instead of panicking.
    pub fn try_forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, QuantLinearError> {
        let dims = x.dims();
        let k = self.in_features();
        if D == 0 || dims[D - 1] != k {
            return Err(QuantLinearError::InputShape {
                expected: k,
                shape: dims.to_vec(),
            });
        }
        Ok(B::quant_linear(x, &self.weight))
    }
}
