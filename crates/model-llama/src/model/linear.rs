use burn::prelude::*;
use kernels::{QuantBackend, QuantLinear};

/// A bias-free linear layer `y = x · Wᵀ`, dense or on packed quantized weights.
#[derive(Clone, Debug)]
pub enum Linear<B: QuantBackend> {
    /// The weight kept transposed (`[in, out]`) so the forward is a plain row-major matmul.
    Dense { weight_t: Tensor<B, 2> },
    /// Packed codes multiplied by the dequantizing kernel of the backend.
    Quant(QuantLinear<B>),
}

impl<B: QuantBackend> Linear<B> {
    /// From a row-major `W: [out, in]` in host memory.
    pub fn from_host_weight(w: &[f32], [out, inp]: [usize; 2], device: &B::Device) -> Self {
        // Stored transposed and contiguous: a strided `transpose` view would be copied by every
        // matmul (that copy dominated decoding), and a view read out element by element is
        // slow, so the transpose is done once with a cache-blocked copy.
        let w_t = quant_core::transpose(w, out, inp);
        Self::Dense {
            weight_t: Tensor::from_data(TensorData::new(w_t, [inp, out]), device),
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Self::Dense { weight_t } => weight_t.dims()[0],
            Self::Quant(q) => q.in_features(),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Self::Dense { weight_t } => weight_t.dims()[1],
            Self::Quant(q) => q.out_features(),
        }
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Quant(q) => q.forward(x),
            Self::Dense { weight_t } => B::dense_linear(x, weight_t.clone()),
        }
    }
}
