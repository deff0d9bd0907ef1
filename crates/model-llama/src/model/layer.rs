use burn::prelude::*;
use kernels::QuantBackend;

use super::attention::{Attention, KvCache};
use super::linear::Linear;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::{Rope, RowPositions};
use crate::linear_kind::LinearKind;

/// One pre-norm decoder layer: `h = x + attn(norm₁(x))`, `out = h + mlp(norm₂(h))`.
#[derive(Clone, Debug)]
pub struct DecoderLayer<B: QuantBackend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

/// The inputs of a layer's linears, captured during a forward pass.
#[derive(Clone, Debug)]
pub struct LayerInputs<B: QuantBackend> {
    /// Input of q, k and v (and of the attention sub-block): `norm₁(x)`.
    pub attn_in: Tensor<B, 3>,
    /// Input of `o_proj`.
    pub o_in: Tensor<B, 3>,
    /// Input of gate and up (and of the MLP sub-block): `norm₂(h)`.
    pub mlp_in: Tensor<B, 3>,
    /// Input of `down_proj`.
    pub down_in: Tensor<B, 3>,
}

impl<B: QuantBackend> LayerInputs<B> {
    /// The input tensor of a given linear.
    pub fn of(&self, kind: LinearKind) -> &Tensor<B, 3> {
        match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => &self.attn_in,
            LinearKind::O => &self.o_in,
            LinearKind::Gate | LinearKind::Up => &self.mlp_in,
            LinearKind::Down => &self.down_in,
        }
    }
}

impl<B: QuantBackend> DecoderLayer<B> {
    pub fn linear(&self, kind: LinearKind) -> &Linear<B> {
        match kind {
            LinearKind::Q => &self.self_attn.q_proj,
            LinearKind::K => &self.self_attn.k_proj,
            LinearKind::V => &self.self_attn.v_proj,
            LinearKind::O => &self.self_attn.o_proj,
            LinearKind::Gate => &self.mlp.gate_proj,
            LinearKind::Up => &self.mlp.up_proj,
            LinearKind::Down => &self.mlp.down_proj,
        }
    }

    pub fn linear_mut(&mut self, kind: LinearKind) -> &mut Linear<B> {
        match kind {
            LinearKind::Q => &mut self.self_attn.q_proj,
            LinearKind::K => &mut self.self_attn.k_proj,
            LinearKind::V => &mut self.self_attn.v_proj,
            LinearKind::O => &mut self.self_attn.o_proj,
            LinearKind::Gate => &mut self.mlp.gate_proj,
            LinearKind::Up => &mut self.mlp.up_proj,
            LinearKind::Down => &mut self.mlp.down_proj,
        }
    }

    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.residual(x, |a| self.self_attn.context(a, rope, cache))
    }

    /// New tokens of several sequences, `spans[i]` consecutive rows of `x: [1, R, hidden]`
    /// continuing `caches[i]` (see [`Attention::context_batch`]).
    pub fn forward_batch(
        &self,
        x: Tensor<B, 3>,
        rows: &RowPositions<B>,
        caches: &mut [&mut KvCache<B>],
        spans: &[usize],
    ) -> Tensor<B, 3> {
        self.residual(x, |a| self.self_attn.context_batch(a, rows, caches, spans))
    }

    /// The layer around its attention context `context(norm₁(x))` (the input of `o_proj`).
    fn residual(
        &self,
        x: Tensor<B, 3>,
        context: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let attn_out =
            (self.self_attn.o_proj).forward(context(self.input_layernorm.forward(x.clone())));
        let h = x.add(attn_out);
        h.clone()
            .add(self.mlp.forward(self.post_attention_layernorm.forward(h)))
    }

    /// Forward pass (no cache, positions from 0) that also returns every linear's input and the
    /// intermediate projections (what a pipeline scoring weight changes needs).
    pub fn forward_captured(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
    ) -> (Tensor<B, 3>, LayerTrace<B>) {
        let attn = &self.self_attn;
        let attn_in = self.input_layernorm.forward(x.clone());
        let (q, k, v) = attn.qkv(attn_in.clone(), rope, 0);
        let o_in = attn.attend(q.clone(), k.clone(), v.clone());
        let attn_out = attn.o_proj.forward(o_in.clone());
        let h = x.add(attn_out.clone());
        let mlp_in = self.post_attention_layernorm.forward(h.clone());
        let gate = self.mlp.gate_proj.forward(mlp_in.clone());
        let up = self.mlp.up_proj.forward(mlp_in.clone());
        let down_in = B::swiglu(gate.clone(), up.clone());
        let mlp_out = self.mlp.down_proj.forward(down_in.clone());
        let out = h.add(mlp_out.clone());
        let trace = LayerTrace {
            inputs: LayerInputs {
                attn_in,
                o_in,
                mlp_in,
                down_in,
            },
            q,
            k,
            v,
            attn_out,
            gate,
            up,
            mlp_out,
        };
        (out, trace)
    }
}

/// Everything [`DecoderLayer::forward_captured`] saw: the linears' inputs and the intermediate
/// projections and sub-block outputs.
#[derive(Clone, Debug)]
pub struct LayerTrace<B: QuantBackend> {
    pub inputs: LayerInputs<B>,
    /// Rotated queries `[b, t, heads·d]`, keys and values `[b, t, kv_heads·d]`.
    pub q: Tensor<B, 3>,
    pub k: Tensor<B, 3>,
    pub v: Tensor<B, 3>,
    /// Attention sub-block output (`o_proj`'s output).
    pub attn_out: Tensor<B, 3>,
    /// `gate_proj` and `up_proj` outputs (before the activation).
    pub gate: Tensor<B, 3>,
    pub up: Tensor<B, 3>,
    /// MLP sub-block output (`down_proj`'s output).
    pub mlp_out: Tensor<B, 3>,
}
