//! [`QuantLinear`]: a linear layer whose weight stays packed on the device, and
//! [`QuantBackend`], the Burn backend extension that multiplies by packed weights.
//!
//! Following Burn's custom-kernel pattern, the product is a backend op on float primitives:
//! CubeCL backends (`CubeBackend<R, F, I, BT>`: wgpu, cuda) run the dequantizing kernels of
//! `crate::cube`; [`burn::backend::NdArray`] dequantizes once at upload and multiplies densely.

use burn::prelude::*;
use burn::tensor::{TensorPrimitive, ops::FloatTensor};
use quant_core::{PackedLinear, QuantError};
use thiserror::Error;

/// Errors of uploading or applying a quantized linear layer.
#[derive(Debug, Error)]
pub enum QuantLinearError {
    #[error("invalid packed linear: {0}")]
    Packed(#[from] QuantError),
    #[error("quantized linear expects {expected} input features, the input has shape {shape:?}")]
    InputShape { expected: usize, shape: Vec<usize> },
}

/// A Burn backend that can multiply activations by a [`PackedLinear`] held on its device.
pub trait QuantBackend: Backend {
    /// The device-resident weight.
    type Packed: Clone + Send + Sync + std::fmt::Debug;

    /// Uploads (and validates) a packed weight.
    fn upload(
        packed: &PackedLinear,
        device: &Self::Device,
    ) -> Result<Self::Packed, QuantLinearError>;

    /// `x [M, IC] · Ŵᵀ → [M, OC]`, in `x`'s float type. Panics if `x` is not `[M, IC]`, like
    /// Burn's own matmul on mismatched shapes; [`QuantLinear::try_forward`] checks first.
    fn quant_matmul(x: FloatTensor<Self>, w: &Self::Packed) -> FloatTensor<Self>;

    /// `(out_features, in_features)` of an uploaded weight.
    fn packed_shape(w: &Self::Packed) -> (usize, usize);
}

/// Checks that `shape` is `[M, in_features]`.
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

/// The ndarray weight: `Ŵᵀ [IC, OC]`, dequantized at upload.
#[cfg(feature = "ndarray")]
#[derive(Clone, Debug)]
pub struct NdArrayPacked {
    weight_t: Tensor<burn::backend::NdArray<f32>, 2>,
    /// The SIMD kernel's layout, when it supports the layer (group size a multiple of 32).
    simd: Option<crate::cpu::CpuPacked>,
    out_features: usize,
    in_features: usize,
}

#[cfg(feature = "ndarray")]
impl QuantBackend for burn::backend::NdArray<f32> {
    type Packed = NdArrayPacked;

    fn upload(
        packed: &PackedLinear,
        device: &Self::Device,
    ) -> Result<Self::Packed, QuantLinearError> {
        packed.validate()?;
        let data = TensorData::new(
            dense_transposed(packed),
            [packed.in_features, packed.out_features],
        );
        Ok(NdArrayPacked {
            weight_t: Tensor::from_data(data, device),
            simd: crate::cpu::CpuPacked::new(packed).ok(),
            out_features: packed.out_features,
            in_features: packed.in_features,
        })
    }

    fn quant_matmul(x: FloatTensor<Self>, w: &Self::Packed) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        if let Err(e) = check_input(&x.dims(), w.in_features) {
            panic!("{e}");
        }
        let dtype = x.dtype();
        let m = x.dims()[0];
        // Decode-sized M reads the packed codes once (SIMD kernel); larger M re-reads them per
        // 8 rows, where the dense matmul on the dequantized weight wins.
        if let Some(simd) = w.simd.as_ref().filter(|_| m <= crate::cpu::MAX_M_PER_PASS)
            && let Ok(xs) = x.clone().into_data().convert::<f32>().into_vec::<f32>()
        {
            let mut y = vec![0f32; m * w.out_features];
            if crate::cpu::gemm(&xs, m, simd, &mut y).is_ok() {
                let y = TensorData::new(y, [m, w.out_features]);
                return Tensor::<Self, 2>::from_data(y, &x.device())
                    .cast(dtype)
                    .into_primitive()
                    .tensor();
            }
        }
        x.matmul(w.weight_t.clone().cast(dtype))
            .into_primitive()
            .tensor()
    }

    fn packed_shape(w: &Self::Packed) -> (usize, usize) {
        (w.out_features, w.in_features)
    }
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
        let m: usize = dims[..D - 1].iter().product();
        let x2 = x.reshape([m, k]).into_primitive().tensor();
        let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::quant_matmul(
            x2,
            &self.weight,
        )));
        let mut out = dims;
        out[D - 1] = self.out_features();
        Ok(y.reshape(out))
    }
}
