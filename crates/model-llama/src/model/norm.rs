use burn::prelude::*;
use kernels::QuantBackend;

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) · weight`.
#[derive(Clone, Debug)]
pub struct RmsNorm<B: QuantBackend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: QuantBackend> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        B::rms_norm(x, self.weight.clone(), self.eps)
    }
}
