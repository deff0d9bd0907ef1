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
        let [gate, up] = Linear::forward_many(x, &[&self.gate_proj, &self.up_proj])
            .try_into()
            .expect("two projections");
        B::swiglu(gate, up)
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.down_proj.forward(self.hidden(x))
    }
}
