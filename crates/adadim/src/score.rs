//! Output errors of candidate weights, measured where SPEC §4 says: q, k, v on the attention
//! sub-block output, gate and up on the MLP sub-block output, o and down on their own output.
//!
//! The projections of the current layer state are cached, so scoring a candidate recomputes only
//! what depends on it (one projection and what lies downstream), never the whole block.

use burn::prelude::*;
use kernels::QuantBackend;
use model_llama::model::Rope;
use model_llama::{DecoderLayer, LayerInputs, LayerTrace, Linear, LinearKind};

/// Cached intermediate tensors of the layer's current (partly quantized) state.
pub struct SubBlockState<B: QuantBackend> {
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    attn_out: Tensor<B, 3>,
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    mlp_out: Tensor<B, 3>,
}

/// A candidate's error and what it changes in the cached state (kept so that the winner need
/// not be recomputed).
pub struct Scored<B: QuantBackend> {
    pub error: f64,
    update: Update<B>,
}

enum Update<B: QuantBackend> {
    Attention {
        proj: Tensor<B, 3>,
        out: Tensor<B, 3>,
    },
    Mlp {
        proj: Tensor<B, 3>,
        out: Tensor<B, 3>,
    },
    Nothing,
}

fn mean_square<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    let v: f32 = t.square().mean().into_scalar().elem();
    v as f64
}

impl<B: QuantBackend> SubBlockState<B> {
    /// The state of a layer straight after its full-precision forward.
    pub fn new(trace: &LayerTrace<B>) -> Self {
        let t = trace.clone();
        Self {
            q: t.q,
            k: t.k,
            v: t.v,
            attn_out: t.attn_out,
            gate: t.gate,
            up: t.up,
            mlp_out: t.mlp_out,
        }
    }

    /// Output error of replacing `kind` by `candidate` in the current state of `layer`.
    pub fn score(
        &self,
        layer: &DecoderLayer<B>,
        inputs: &LayerInputs<B>,
        rope: &Rope<B>,
        kind: LinearKind,
        candidate: &Linear<B>,
    ) -> Scored<B> {
        let attn = &layer.self_attn;
        match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => {
                let p = attn.project(kind, candidate, inputs.attn_in.clone(), rope, 0);
                let (q, k, v) = match kind {
                    LinearKind::Q => (p.clone(), self.k.clone(), self.v.clone()),
                    LinearKind::K => (self.q.clone(), p.clone(), self.v.clone()),
                    _ => (self.q.clone(), self.k.clone(), p.clone()),
                };
                let out = attn.o_proj.forward(attn.attend(q, k, v));
                Scored {
                    error: mean_square(out.clone().sub(self.attn_out.clone())),
                    update: Update::Attention { proj: p, out },
                }
            }
            LinearKind::Gate | LinearKind::Up => {
                let p = candidate.forward(inputs.mlp_in.clone());
                let (g, u) = match kind {
                    LinearKind::Gate => (p.clone(), self.up.clone()),
                    _ => (self.gate.clone(), p.clone()),
                };
                let out = layer.mlp.down_proj.forward(B::swiglu(g, u));
                Scored {
                    error: mean_square(out.clone().sub(self.mlp_out.clone())),
                    update: Update::Mlp { proj: p, out },
                }
            }
            LinearKind::O | LinearKind::Down => {
                // The linear's own output: mean((X·(Ŵ − W)ᵀ)²), one product instead of two.
                let delta = Linear::Dense {
                    weight_t: dense_t(candidate).sub(dense_t(layer.linear(kind))),
                };
                let diff = delta.forward(inputs.of(kind).clone());
                Scored {
                    error: mean_square(diff),
                    update: Update::Nothing,
                }
            }
        }
    }

    /// Whether the quantized state of `kind` changes a later score. o and down are scored on
    /// their own output, which no later linear of the layer reads.
    pub fn carries(kind: LinearKind) -> bool {
        !matches!(kind, LinearKind::O | LinearKind::Down)
    }

    /// Makes a scored candidate part of the current state.
    pub fn commit(&mut self, kind: LinearKind, scored: Scored<B>) {
        match (kind, scored.update) {
            (LinearKind::Q, Update::Attention { proj, out }) => {
                (self.q, self.attn_out) = (proj, out)
            }
            (LinearKind::K, Update::Attention { proj, out }) => {
                (self.k, self.attn_out) = (proj, out)
            }
            (LinearKind::V, Update::Attention { proj, out }) => {
                (self.v, self.attn_out) = (proj, out)
            }
            (LinearKind::Gate, Update::Mlp { proj, out }) => {
                (self.gate, self.mlp_out) = (proj, out)
            }
            (LinearKind::Up, Update::Mlp { proj, out }) => (self.up, self.mlp_out) = (proj, out),
            _ => {}
        }
    }
}

/// The pipeline quantizes a dense copy of each layer, so every linear it scores is dense.
/// `Wᵀ` of a dense layer: differences of candidates are taken in the stored layout, so no
/// weight is transposed to score them.
fn dense_t<B: QuantBackend>(linear: &Linear<B>) -> Tensor<B, 2> {
    match linear {
        Linear::Dense { weight_t } => weight_t.clone(),
        Linear::Quant(_) => panic!("the pipeline scores dense layers only"),
    }
}
