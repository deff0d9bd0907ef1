use burn::prelude::*;
use kernels::QuantBackend;

use super::linear::Linear;

/// SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp<B: QuantBackend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: QuantBackend> Mlp<B> {
    /// The input of `down_proj`.
    pub fn hidden<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        B::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x))
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.down_proj.forward(self.hidden(x))
    }
}
