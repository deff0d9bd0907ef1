//! Output errors of candidate weights, measured where SPEC §4 says: q, k, v on the attention
//! sub-block output, gate and up on the MLP sub-block output, o and down on their own output.
//!
//! The layer's current (partly quantized) state is cached up to the input of the sub-block's
//! last linear, so scoring a candidate recomputes only what depends on it. Since that last
//! linear is applied unchanged to both sides, the error is taken on the difference of its
//! inputs, `mean(((c − c_ref)·Wᵀ)²)`: one product per candidate, none for the reference, and no
//! cancellation between two large outputs.
//!
//! Every such error is a mean square `mean((X·Wᵀ)²) = Σ(XᵀX ⊙ WᵀW)/(N·OC)`. Where one of the two
//! Gram matrices is shared (o/down's input across their candidates; o_proj's `WᵀW` across the
//! q, k, v candidates) and the symmetric Gram product is cheaper than `X·Wᵀ`, that form is used.

use burn::prelude::*;
use kernels::QuantBackend;
use model_llama::model::Rope;
use model_llama::{DecoderLayer, LayerInputs, LayerTrace, Linear, LinearKind};

/// Cached intermediate tensors of the layer's current state.
pub struct SubBlockState<B: QuantBackend> {
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    /// Input of `o_proj`.
    context: Tensor<B, 3>,
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    /// Input of `down_proj`.
    down_in: Tensor<B, 3>,
    /// `WᵀW` of `o_proj` (still full precision while q, k, v are scored), when the Gram form of
    /// their error is the cheaper one.
    o_gram: Option<Tensor<B, 2>>,
}

/// A candidate's error and the state it leads to (kept so that the winner need not be
/// recomputed).
pub struct Scored<B: QuantBackend> {
    pub error: f64,
    update: Option<Update<B>>,
}

/// A changed projection and the changed input of its sub-block's last linear.
struct Update<B: QuantBackend> {
    proj: Tensor<B, 3>,
    last_in: Tensor<B, 3>,
}

fn mean_square<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    let v: f32 = t.square().mean().into_scalar().elem();
    v as f64
}

/// `Xᵀ·X` of a captured input `[blocks, t, features]`: what the error of a change of the
/// linear reading `X` depends on, and (scaled) GPTQ's Hessian.
pub fn gram<B: QuantBackend>(x: &Tensor<B, 3>) -> Tensor<B, 2> {
    let [blocks, t, features] = x.dims();
    B::gram(x.clone().reshape([blocks * t, features]))
}

/// `WᵀW` of a dense linear's weight `W [OC, IC]` (stored as `Wᵀ`).
fn weight_gram<B: QuantBackend>(weight_t: Tensor<B, 2>) -> Tensor<B, 2> {
    B::gram(weight_t.transpose())
}

/// `mean((X·Wᵀ)²)` over `rows × out` outputs from the two Gram matrices.
fn mean_square_from_grams<B: QuantBackend>(
    x_gram: Tensor<B, 2>,
    w_gram: Tensor<B, 2>,
    rows: usize,
    out: usize,
) -> f64 {
    let sum: f32 = x_gram.mul(w_gram).sum().into_scalar().elem();
    sum as f64 / (rows * out) as f64
}

/// Whether one `N×IC` input's mean square error through `W [OC, IC]` is cheaper from the
/// input's Gram matrix (about `N·IC²/2` with the symmetric product) than from `X·Wᵀ`
/// (`N·IC·OC`), for `outputs` products sharing that Gram.
pub fn gram_is_cheaper([out, inp]: [usize; 2], outputs: usize) -> bool {
    // Measured with the block-symmetric product on 14160 rows: 1.6× the full product's speed
    // at IC = 576, 1.4× at 1536 (where it only ties with down_proj's two direct products).
    4 * inp <= 5 * outputs * out
}

impl<B: QuantBackend> SubBlockState<B> {
    /// The state of a layer straight after its full-precision forward.
    pub fn new(trace: &LayerTrace<B>, layer: &DecoderLayer<B>) -> Self {
        let t = trace.clone();
        let o_t = dense_t(&layer.self_attn.o_proj);
        let [inp, out] = o_t.dims();
        Self {
            o_gram: gram_is_cheaper([out, inp], 1).then(|| weight_gram(o_t)),
            q: t.q,
            k: t.k,
            v: t.v,
            context: t.inputs.o_in,
            gate: t.gate,
            up: t.up,
            down_in: t.inputs.down_in,
        }
    }

    /// The state after replacing the projection `kind` (q, k, v, gate or up) by `linear`.
    fn update(
        &self,
        layer: &DecoderLayer<B>,
        inputs: &LayerInputs<B>,
        rope: &Rope<B>,
        kind: LinearKind,
        linear: &Linear<B>,
    ) -> Update<B> {
        let attn = &layer.self_attn;
        match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => {
                let p = attn.project(kind, linear, inputs.attn_in.clone(), rope, 0);
                let (q, k, v) = match kind {
                    LinearKind::Q => (p.clone(), self.k.clone(), self.v.clone()),
                    LinearKind::K => (self.q.clone(), p.clone(), self.v.clone()),
                    _ => (self.q.clone(), self.k.clone(), p.clone()),
                };
                Update {
                    last_in: attn.attend(q, k, v),
                    proj: p,
                }
            }
            LinearKind::Gate | LinearKind::Up => {
                let p = linear.forward(inputs.mlp_in.clone());
                let (g, u) = match kind {
                    LinearKind::Gate => (p.clone(), self.up.clone()),
                    _ => (self.gate.clone(), p.clone()),
                };
                Update {
                    last_in: B::swiglu(g, u),
                    proj: p,
                }
            }
            other => panic!("{other:?} is the last linear of its sub-block"),
        }
    }

    /// Output error of replacing `kind` by `candidate` in the current state of `layer`. For o
    /// and down, `input_gram` is `XᵀX` of their input when the caller has it (see [`gram`]).
    pub fn score(
        &self,
        layer: &DecoderLayer<B>,
        inputs: &LayerInputs<B>,
        rope: &Rope<B>,
        kind: LinearKind,
        candidate: &Linear<B>,
        input_gram: Option<&Tensor<B, 2>>,
    ) -> Scored<B> {
        if !Self::carries(kind) {
            return Scored {
                error: own_output_error(layer.linear(kind), candidate, inputs.of(kind), input_gram),
                update: None,
            };
        }
        let update = self.update(layer, inputs, rope, kind, candidate);
        let (reference, last, last_gram) = match kind {
            LinearKind::Gate | LinearKind::Up => (&self.down_in, &layer.mlp.down_proj, None),
            _ => (&self.context, &layer.self_attn.o_proj, self.o_gram.as_ref()),
        };
        let diff = update.last_in.clone().sub(reference.clone());
        let error = match last_gram {
            Some(w_gram) => {
                let [blocks, t, _] = diff.dims();
                let out = dense_t(last).dims()[1];
                mean_square_from_grams(gram(&diff), w_gram.clone(), blocks * t, out)
            }
            None => mean_square(last.forward(diff)),
        };
        Scored {
            error,
            update: Some(update),
        }
    }

    /// Whether the quantized state of `kind` changes a later score. o and down are scored on
    /// their own output, which no later linear of the layer reads.
    pub fn carries(kind: LinearKind) -> bool {
        !matches!(kind, LinearKind::O | LinearKind::Down)
    }

    /// Makes a scored candidate part of the current state.
    pub fn commit(&mut self, kind: LinearKind, scored: Scored<B>) {
        if let Some(update) = scored.update {
            self.apply(kind, update);
        }
    }

    /// Makes `linear` (a weight that was not scored, e.g. GPTQ's) the state of `kind`.
    pub fn adopt(
        &mut self,
        layer: &DecoderLayer<B>,
        inputs: &LayerInputs<B>,
        rope: &Rope<B>,
        kind: LinearKind,
        linear: &Linear<B>,
    ) {
        if Self::carries(kind) {
            let update = self.update(layer, inputs, rope, kind, linear);
            self.apply(kind, update);
        }
    }

    fn apply(&mut self, kind: LinearKind, Update { proj, last_in }: Update<B>) {
        match kind {
            LinearKind::Q => (self.q, self.context) = (proj, last_in),
            LinearKind::K => (self.k, self.context) = (proj, last_in),
            LinearKind::V => (self.v, self.context) = (proj, last_in),
            LinearKind::Gate => (self.gate, self.down_in) = (proj, last_in),
            LinearKind::Up => (self.up, self.down_in) = (proj, last_in),
            LinearKind::O | LinearKind::Down => {}
        }
    }
}

/// `mean((X·(Ŵ − W)ᵀ)²)` over the `N × OC` outputs. With `G = XᵀX` it is
/// `Σ(G ⊙ ΔWᵀΔW)/(N·OC)`, which costs about `IC²·OC/2` instead of `N·IC·OC`.
fn own_output_error<B: QuantBackend>(
    original: &Linear<B>,
    candidate: &Linear<B>,
    x: &Tensor<B, 3>,
    gram: Option<&Tensor<B, 2>>,
) -> f64 {
    // Differences are taken on the stored `Wᵀ`, so no weight is transposed.
    let delta_t = dense_t(candidate).sub(dense_t(original));
    match gram {
        Some(g) => {
            let [blocks, t, _] = x.dims();
            let out = delta_t.dims()[1];
            mean_square_from_grams(g.clone(), weight_gram(delta_t), blocks * t, out)
        }
        None => mean_square(B::dense_linear(x.clone(), delta_t)),
    }
}

/// The pipeline quantizes a dense copy of each layer, so every linear it scores is dense.
fn dense_t<B: QuantBackend>(linear: &Linear<B>) -> Tensor<B, 2> {
    match linear {
        Linear::Dense { weight_t } => weight_t.clone(),
        Linear::Quant(_) => panic!("the pipeline scores dense layers only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn own_output_error_through_the_gram_matches_the_direct_product() {
        let device = Default::default();
        let dense = |t: Tensor<B, 2>| Linear::Dense { weight_t: t };
        let w_t = Tensor::<B, 2>::random([48, 20], Distribution::Normal(0.0, 1.0), &device);
        let noise = Tensor::<B, 2>::random([48, 20], Distribution::Normal(0.0, 0.05), &device);
        let x = Tensor::<B, 3>::random([3, 7, 48], Distribution::Normal(0.0, 2.0), &device);
        let (w, c) = (dense(w_t.clone()), dense(w_t.add(noise.clone())));
        let direct = own_output_error(&w, &c, &x, None);
        // The form the q, k, v scores take through o_proj's `WᵀW`.
        let from_grams = mean_square_from_grams(gram(&x), weight_gram(noise.clone()), 21, 20);
        let expected = mean_square(B::dense_linear(x.clone(), noise.clone()));
        assert!(
            (expected - from_grams).abs() <= 1e-4 * expected,
            "{expected} vs {from_grams}"
        );
        let via_gram = own_output_error(&w, &c, &x, Some(&gram(&x)));
        assert!(direct > 0.0);
        assert!(
            (direct - via_gram).abs() <= 1e-4 * direct,
            "{direct} vs {via_gram}"
        );
    }
}
