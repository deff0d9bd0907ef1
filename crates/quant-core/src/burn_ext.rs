//! Burn-tensor entry points, generic over the backend (`ndarray` on the CPU, the CubeCL `wgpu` and
//! `cuda` backends on accelerators).
//!
//! What runs where, deliberately:
//! * **On the backend**: the Hessian's `XᵀX`, the one big product of the calibration stage
//!   (`tokens × IC²` multiply-adds, ~2 TFLOP for 65k tokens and IC = 4096). A GPU does it at
//!   matmul speed and only the `IC × IC` result crosses to the host.
//! * **On the host**: GPTQ's column loop, which is sequential over input channels (each column
//!   waits for the previous one's error), and the Cholesky of `H`, a latency-bound chain of small
//!   dependent steps that a GPU would spend mostly in launches and synchronization. Both are fast
//!   on the CPU (see `benches/quant_core.rs`) and need f64, which consumer GPUs and `wgpu` lack.
//! * **RTN on the host** too: it is a single memory-bound pass whose codes are needed on the host
//!   for packing anyway, and it must round bit-exactly like the reference. WGSL allows division to
//!   be off by 2.5 ULP, which would move values sitting on a rounding tie (`w / scale = k + 0.5`)
//!   to the other code; the host's IEEE division does not.
//!
//! Use an f32 backend for the Hessian: summing `xᵀx` over tens of thousands of tokens overflows f16.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::hessian::Hessian;
use crate::rtn::quantize_rtn;
use crate::{QuantConfig, QuantError, Quantized};

/// Running-mean Hessian accumulator whose `XᵀX` products run on the backend `B`.
///
/// Same counting as [`Hessian::add_batch`]: each call is one calibration sample (sequence).
pub struct HessianAccumulator<B: Backend> {
    in_features: usize,
    nsamples: usize,
    h: Option<Tensor<B, 2>>,
}

impl<B: Backend> HessianAccumulator<B> {
    pub fn new(in_features: usize) -> Self {
        Self {
            in_features,
            nsamples: 0,
            h: None,
        }
    }

    /// Adds one calibration sample `x: [tokens, in_features]`.
    pub fn add_batch(&mut self, x: Tensor<B, 2>) -> Result<(), QuantError> {
        self.add_samples(x, 1)
    }

    /// Adds `samples` sequences whose tokens are the rows of `x: [tokens, in_features]`.
    /// A call with no rows is ignored. NaN/Inf inputs are detected in [`Self::finish`], since they
    /// always reach the diagonal of `H`.
    pub fn add_samples(&mut self, x: Tensor<B, 2>, samples: usize) -> Result<(), QuantError> {
        let [rows, cols] = x.dims();
        if cols != self.in_features {
            return Err(QuantError::Shape(format!(
                "calibration input has {cols} features, expected {}",
                self.in_features
            )));
        }
        if rows == 0 || samples == 0 {
            return Ok(());
        }
        let total = (self.nsamples + samples) as f32;
        let xtx = x.clone().transpose().matmul(x).mul_scalar(2.0 / total);
        self.h = Some(match self.h.take() {
            Some(h) => h.mul_scalar(self.nsamples as f32 / total).add(xtx),
            None => xtx,
        });
        self.nsamples += samples;
        Ok(())
    }

    /// Brings `H` to the host. Errors if no sample was added or `H` is not finite.
    pub fn finish(self) -> Result<Hessian, QuantError> {
        let h = self.h.ok_or(QuantError::EmptyCalibration)?;
        Hessian::from_matrix(tensor_to_vec(h)?, self.in_features, self.nsamples)
    }
}

/// The Hessian of one calibration sample `x: [tokens, in_features]`, computed on `B`.
pub fn hessian_from_tensor<B: Backend>(x: Tensor<B, 2>) -> Result<Hessian, QuantError> {
    let mut acc = HessianAccumulator::new(x.dims()[1]);
    acc.add_batch(x)?;
    acc.finish()
}

/// RTN of a weight tensor `[out_features, in_features]` (see the module docs for why on the host).
pub fn quantize_rtn_tensor<B: Backend>(
    w: Tensor<B, 2>,
    config: QuantConfig,
) -> Result<Quantized, QuantError> {
    let [out_features, in_features] = w.dims();
    quantize_rtn(&tensor_to_vec(w)?, out_features, in_features, config)
}

/// The dequantized weight `[out_features, in_features]` as an f32 tensor on `device`
/// (fake quantization: a drop-in replacement for the original weight).
pub fn dequantized_tensor<B: Backend>(q: &Quantized, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(q.dequantize(), [q.out_features, q.in_features]),
        device,
    )
}

fn tensor_to_vec<B: Backend>(t: Tensor<B, 2>) -> Result<Vec<f32>, QuantError> {
    t.try_into_data()
        .map_err(|e| QuantError::Backend(e.to_string()))?
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| QuantError::Backend(e.to_string()))
}
