//! [`QuantLinear`]: a linear layer whose weight stays in its compact form on the device (packed
//! codes, f16 or bf16) and is multiplied through [`QuantBackend::quant_matmul`].

use burn::prelude::*;
use half::{bf16, f16};
use quant_core::{PackedLinear, QuantError};
use thiserror::Error;

use crate::{DeviceLimitError, QuantBackend, WeightKind};

/// Errors of uploading or applying a quantized linear layer.
#[derive(Debug, Error)]
pub enum QuantLinearError {
    #[error("invalid packed linear: {0}")]
    Packed(#[from] QuantError),
    #[error("an f16 weight of {len} values is not [{out_features}, {in_features}]")]
    F16Shape {
        len: usize,
        out_features: usize,
        in_features: usize,
    },
    #[error("a bf16 weight of {len} values is not [{out_features}, {in_features}]")]
    Bf16Shape {
        len: usize,
        out_features: usize,
        in_features: usize,
    },
    #[error("quantized linear expects {expected} input features, the input has shape {shape:?}")]
    InputShape { expected: usize, shape: Vec<usize> },
    /// A buffer of the weight is larger than the device holds (named by its part: `qweight`,
    /// `scales+zeros` or `weight`; callers that know the checkpoint's name rename it).
    #[error(transparent)]
    DeviceLimit(#[from] DeviceLimitError),
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

/// Checks that `w` holds `out_features × in_features` values.
pub(crate) fn check_f16_shape(
    w: &[f16],
    [out_features, in_features]: [usize; 2],
) -> Result<(), QuantLinearError> {
    if w.len() == out_features * in_features {
        Ok(())
    } else {
        Err(QuantLinearError::F16Shape {
            len: w.len(),
            out_features,
            in_features,
        })
    }
}

/// Checks that `w` holds `out_features × in_features` values.
pub(crate) fn check_bf16_shape(
    w: &[bf16],
    [out_features, in_features]: [usize; 2],
) -> Result<(), QuantLinearError> {
    if w.len() == out_features * in_features {
        Ok(())
    } else {
        Err(QuantLinearError::Bf16Shape {
            len: w.len(),
            out_features,
            in_features,
        })
    }
}

/// `Wᵀ [in, out]` in f32 of a dense f16 `W [out, in]` (shape checked by the caller): the right
/// operand of the dense paths.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn widened_transposed(w: &[f16], [out_features, in_features]: [usize; 2]) -> Vec<f32> {
    let mut w_t = vec![0f32; w.len()];
    crate::cpu::widen::f16_t(w, out_features, &mut w_t).expect("shape checked at upload");
    debug_assert_eq!(w_t.len(), out_features * in_features);
    w_t
}

/// [`widened_transposed`] of a bf16 weight.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn widened_transposed_bf16(
    w: &[bf16],
    [out_features, in_features]: [usize; 2],
) -> Vec<f32> {
    let mut w_t = vec![0f32; w.len()];
    crate::cpu::widen::bf16_t(w, out_features, &mut w_t).expect("shape checked at upload");
    debug_assert_eq!(w_t.len(), out_features * in_features);
    w_t
}

/// `Ŵᵀ [IC, OC]`: the right operand of `x · Ŵᵀ` for the dense paths.
pub(crate) fn dense_transposed(packed: &PackedLinear) -> Vec<f32> {
    quant_core::transpose(
        &packed.dequantize(),
        packed.out_features,
        packed.in_features,
    )
}

/// A linear layer `y = x · Ŵᵀ` (no bias, as in LLaMA) on a packed weight, or on a dense
/// weight kept in f16 or bf16.
#[derive(Clone, Debug)]
pub struct QuantLinear<B: QuantBackend> {
    weight: B::Weight,
    device: B::Device,
}

impl<B: QuantBackend> QuantLinear<B> {
    /// Uploads `packed` to `device`.
    pub fn new(packed: &PackedLinear, device: &B::Device) -> Result<Self, QuantLinearError> {
        Ok(Self {
            weight: B::upload(packed, device)?,
            device: device.clone(),
        })
    }

    /// Uploads a dense `W [out, in]` given in f16: backends that multiply it in 16 bits keep it
    /// so (a decode step then reads half the bytes of its f32 copy), others widen it.
    pub fn from_f16(
        w: &[f16],
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Self, QuantLinearError> {
        Ok(Self {
            weight: B::upload_f16(w, shape, device)?,
            device: device.clone(),
        })
    }

    /// [`Self::from_f16`] for a weight given in bf16 (LLaMA-3 and later checkpoints).
    pub fn from_bf16(
        w: &[bf16],
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Self, QuantLinearError> {
        Ok(Self {
            weight: B::upload_bf16(w, shape, device)?,
            device: device.clone(),
        })
    }

    pub fn in_features(&self) -> usize {
        B::weight_shape(&self.weight).1
    }

    pub fn out_features(&self) -> usize {
        B::weight_shape(&self.weight).0
    }

    /// The device-resident weight, for calling [`QuantBackend::quant_matmul`] directly.
    pub fn weight(&self) -> &B::Weight {
        &self.weight
    }

    /// The device the weight is on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The form the weight is stored in.
    pub fn kind(&self) -> WeightKind {
        B::weight_kind(&self.weight)
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
        self.check_input(&x.dims())?;
        Ok(B::quant_linear(x, &self.weight))
    }

    /// [`Self::forward`] of each of `layers` on the same `x` (a layer's q, k and v, say), the
    /// same results; see [`QuantBackend::quant_linear_many`] for why. Panics if the last
    /// dimension of `x` is not every layer's `in_features`.
    pub fn forward_many<const D: usize>(x: Tensor<B, D>, layers: &[&Self]) -> Vec<Tensor<B, D>> {
        let dims = x.dims();
        for layer in layers {
            layer.check_input(&dims).unwrap_or_else(|e| panic!("{e}"));
        }
        let weights: Vec<&B::Weight> = layers.iter().map(|l| &l.weight).collect();
        B::quant_linear_many(x, &weights)
    }

    fn check_input(&self, dims: &[usize]) -> Result<(), QuantLinearError> {
        let k = self.in_features();
        if dims.last() != Some(&k) {
            return Err(QuantLinearError::InputShape {
                expected: k,
                shape: dims.to_vec(),
            });
        }
        Ok(())
    }
}
