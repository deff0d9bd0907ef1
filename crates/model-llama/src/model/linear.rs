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
    /// From a Hugging Face weight `W: [out, in]`.
    pub fn from_weight(weight: Tensor<B, 2>) -> Self {
        // `transpose` is a strided view; materialise it once so that every matmul does not copy
        // the whole weight into a contiguous buffer first (that copy dominated decoding).
        let device = weight.device();
        Self::Dense {
            weight_t: Tensor::from_data(weight.transpose().into_data(), &device),
        }
    }

    /// `W: [out, in]` of a dense layer (`None` for a packed one).
    pub fn dense_weight(&self) -> Option<Tensor<B, 2>> {
        match self {
            Self::Dense { weight_t } => Some(weight_t.clone().transpose()),
            Self::Quant(_) => None,
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
            Self::Dense { weight_t } => {
                let dims = x.dims();
                let rows: usize = dims[..D - 1].iter().product();
                let y = x.reshape([rows, dims[D - 1]]).matmul(weight_t.clone());
                let mut out = dims;
                out[D - 1] = self.out_features();
                y.reshape(out)
            }
        }
    }
}
