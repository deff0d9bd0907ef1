//! Output errors of candidate weights (docs/method.md §4): q, k, v on the attention sub-block
//! output, gate and up on the MLP sub-block output, o and down on their own output.
//!
//! The state of a sub-block with the layer's current (partly quantized) linears is known up to
//! the input of its last linear, so scoring a candidate recomputes only what depends on it.
//! Since that last linear is applied unchanged to both sides, the error is taken on the
//! difference of its inputs, `mean(((c − c_ref)·Wᵀ)²)`: one product per candidate, none for the
//! reference, and no cancellation between two large outputs.
//!
//! Every such error is a mean square `mean((X·Wᵀ)²) = Σ(XᵀX ⊙ WᵀW)/(N·OC)`. Where one of the two
//! Gram matrices is shared (o/down's input across their candidates; o_proj's `WᵀW` across the
//! q, k, v candidates) and the symmetric Gram product is cheaper than `X·Wᵀ`, that form is used.
//!
//! Errors are means over one chunk of calibration blocks; [`ErrorSum`] weighs the chunks by
//! their token counts, so a split calibration set scores the same as a whole one.

use burn::prelude::*;
use kernels::QuantBackend;
use model_llama::model::Rope;
use model_llama::{DecoderLayer, LayerTrace, Linear, LinearKind};

use crate::stats::SubBlockInputs;

/// Which forms the scores are computed in. Every form gives the same error up to rounding
/// (docs/method.md §4); the choice is one of cost, and forcing one is how the shortcuts are
/// checked against their definition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScoreForms {
    /// The difference form always; a Gram form where `gram_is_cheaper` says so.
    #[default]
    Cheaper,
    /// The difference and Gram forms wherever they apply.
    Shortcuts,
    /// Neither: each output computed whole and subtracted, wherever the inputs are kept (a
    /// streaming plan keeps none, and GPTQ's Hessian brings the input's Gram anyway).
    Direct,
}

impl ScoreForms {
    /// Whether to take a Gram form that the cost rule rates `cheaper` or not.
    pub fn gram(self, cheaper: bool) -> bool {
        match self {
            ScoreForms::Cheaper => cheaper,
            ScoreForms::Shortcuts => true,
            ScoreForms::Direct => false,
        }
    }

    /// Whether errors are taken on the difference of the last linear's inputs.
    pub fn difference(self) -> bool {
        self != ScoreForms::Direct
    }
}

/// The attention sub-block's state on a chunk: rotated q, k, v and the context (`o_proj`'s input).
pub struct AttnState<B: QuantBackend> {
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    context: Tensor<B, 3>,
}

/// The MLP sub-block's state on a chunk: gate and up outputs and `down_proj`'s input.
pub struct MlpState<B: QuantBackend> {
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    down_in: Tensor<B, 3>,
}

/// Both sub-blocks' state on a chunk, kept between linears when memory allows.
pub struct ChunkState<B: QuantBackend> {
    pub attn: AttnState<B>,
    pub mlp: MlpState<B>,
}

impl<B: QuantBackend> ChunkState<B> {
    /// The state straight after the layer's full-precision forward.
    pub fn from_trace(t: &LayerTrace<B>) -> Self {
        Self {
            attn: AttnState {
                q: t.q.clone(),
                k: t.k.clone(),
                v: t.v.clone(),
                context: t.inputs.o_in.clone(),
            },
            mlp: MlpState {
                gate: t.gate.clone(),
                up: t.up.clone(),
                down_in: t.inputs.down_in.clone(),
            },
        }
    }
}

impl<B: QuantBackend> AttnState<B> {
    /// The state of `layer`'s current linears on the sub-block input `attn_in`.
    pub fn compute(layer: &DecoderLayer<B>, attn_in: Tensor<B, 3>, rope: &Rope<B>) -> Self {
        let attn = &layer.self_attn;
        let (q, k, v) = attn.qkv(attn_in, rope, 0);
        let context = attn.attend(q.clone(), k.clone(), v.clone());
        Self { q, k, v, context }
    }
}

impl<B: QuantBackend> MlpState<B> {
    /// The state of `layer`'s current linears on the sub-block input `mlp_in`.
    pub fn compute(layer: &DecoderLayer<B>, mlp_in: Tensor<B, 3>) -> Self {
        let gate = layer.mlp.gate_proj.forward(mlp_in.clone());
        let up = layer.mlp.up_proj.forward(mlp_in);
        let down_in = B::swiglu(gate.clone(), up.clone());
        Self { gate, up, down_in }
    }
}

/// A changed projection and the changed input of its sub-block's last linear.
pub struct Update<B: QuantBackend> {
    proj: Tensor<B, 3>,
    last_in: Tensor<B, 3>,
}

/// Whether the quantized state of `kind` changes a later score. o and down are scored on their
/// own output, which no later linear of the layer reads.
pub fn carries(kind: LinearKind) -> bool {
    !matches!(kind, LinearKind::O | LinearKind::Down)
}

/// `WᵀW` of `o_proj`, shared by every q, k, v candidate of a layer, when the Gram form of their
/// error is the cheaper one. Taken while o_proj is still full precision.
pub fn o_proj_gram<B: QuantBackend>(
    layer: &DecoderLayer<B>,
    forms: ScoreForms,
) -> Option<Tensor<B, 2>> {
    let o_t = layer.self_attn.o_proj.weight_t();
    let [inp, out] = o_t.dims();
    forms
        .gram(gram_is_cheaper([out, inp], 1))
        .then(|| weight_gram(o_t))
}

/// The attention state with q, k or v replaced by `linear`.
fn attn_update<B: QuantBackend>(
    layer: &DecoderLayer<B>,
    state: &AttnState<B>,
    attn_in: Tensor<B, 3>,
    rope: &Rope<B>,
    kind: LinearKind,
    linear: &Linear<B>,
) -> Update<B> {
    let attn = &layer.self_attn;
    let p = attn.project(kind, linear, attn_in, rope, 0);
    let (q, k, v) = match kind {
        LinearKind::Q => (p.clone(), state.k.clone(), state.v.clone()),
        LinearKind::K => (state.q.clone(), p.clone(), state.v.clone()),
        _ => (state.q.clone(), state.k.clone(), p.clone()),
    };
    Update {
        last_in: attn.attend(q, k, v),
        proj: p,
    }
}

/// The MLP state with gate or up replaced by `linear`.
fn mlp_update<B: QuantBackend>(
    state: &MlpState<B>,
    mlp_in: Tensor<B, 3>,
    kind: LinearKind,
    linear: &Linear<B>,
) -> Update<B> {
    let p = linear.forward(mlp_in);
    let (g, u) = match kind {
        LinearKind::Gate => (p.clone(), state.up.clone()),
        _ => (state.gate.clone(), p.clone()),
    };
    Update {
        last_in: B::swiglu(g, u),
        proj: p,
    }
}

/// The error of an update, measured after the sub-block's last linear `last`: on the difference
/// of its inputs, through `last`'s `WᵀW` when given (or on the two outputs, without `difference`).
fn update_error<B: QuantBackend>(
    update: &Update<B>,
    reference: &Tensor<B, 3>,
    last: &Linear<B>,
    last_gram: Option<&Tensor<B, 2>>,
    difference: bool,
) -> f64 {
    if !difference {
        let out = last.forward(update.last_in.clone());
        return mean_square_distance(out, last.forward(reference.clone()));
    }
    let diff = B::difference(update.last_in.clone(), reference.clone());
    match last_gram {
        Some(w_gram) => {
            let [blocks, t, _] = diff.dims();
            let out = last.out_features();
            mean_square_from_grams(gram(&diff), w_gram.clone(), blocks * t, out)
        }
        None => mean_square(last.forward(diff)),
    }
}

/// Mean square error of the attention sub-block's output on one chunk when q, k or v is
/// replaced by `candidate` in the state `state`; with the state it leads to.
// Layer, state, inputs, rope, kind, candidate and the two form choices are all distinct.
#[allow(clippy::too_many_arguments)]
pub fn attn_error<B: QuantBackend>(
    layer: &DecoderLayer<B>,
    state: &AttnState<B>,
    attn_in: &Tensor<B, 3>,
    rope: &Rope<B>,
    kind: LinearKind,
    candidate: &Linear<B>,
    o_gram: Option<&Tensor<B, 2>>,
    forms: ScoreForms,
) -> (f64, Update<B>) {
    let update = attn_update(layer, state, attn_in.clone(), rope, kind, candidate);
    let o_proj = &layer.self_attn.o_proj;
    let error = update_error(&update, &state.context, o_proj, o_gram, forms.difference());
    (error, update)
}

/// Mean square error of the MLP sub-block's output on one chunk when gate or up is replaced by
/// `candidate` in the state `state`; with the state it leads to.
pub fn mlp_error<B: QuantBackend>(
    layer: &DecoderLayer<B>,
    state: &MlpState<B>,
    mlp_in: &Tensor<B, 3>,
    kind: LinearKind,
    candidate: &Linear<B>,
    forms: ScoreForms,
) -> (f64, Update<B>) {
    let update = mlp_update(state, mlp_in.clone(), kind, candidate);
    let down = &layer.mlp.down_proj;
    let error = update_error(&update, &state.down_in, down, None, forms.difference());
    (error, update)
}

/// [`attn_error`] or [`mlp_error`], by the sub-block `kind` (q, k, v, gate or up) belongs to.
// Layer, state, inputs, rope, kind, candidate and the two form choices are all distinct.
#[allow(clippy::too_many_arguments)]
pub fn sub_block_error<B: QuantBackend>(
    layer: &DecoderLayer<B>,
    state: &ChunkState<B>,
    inputs: &SubBlockInputs<B>,
    rope: &Rope<B>,
    kind: LinearKind,
    candidate: &Linear<B>,
    o_gram: Option<&Tensor<B, 2>>,
    forms: ScoreForms,
) -> (f64, Update<B>) {
    match kind {
        LinearKind::Q | LinearKind::K | LinearKind::V => attn_error(
            layer,
            &state.attn,
            &inputs.attn_in,
            rope,
            kind,
            candidate,
            o_gram,
            forms,
        ),
        LinearKind::Gate | LinearKind::Up => {
            mlp_error(layer, &state.mlp, &inputs.mlp_in, kind, candidate, forms)
        }
        other => panic!("{other:?} is the last linear of its sub-block"),
    }
}

impl<B: QuantBackend> ChunkState<B> {
    /// Makes a scored candidate of `kind` part of the state.
    pub fn apply(&mut self, kind: LinearKind, Update { proj, last_in }: Update<B>) {
        match kind {
            LinearKind::Q => (self.attn.q, self.attn.context) = (proj, last_in),
            LinearKind::K => (self.attn.k, self.attn.context) = (proj, last_in),
            LinearKind::V => (self.attn.v, self.attn.context) = (proj, last_in),
            LinearKind::Gate => (self.mlp.gate, self.mlp.down_in) = (proj, last_in),
            LinearKind::Up => (self.mlp.up, self.mlp.down_in) = (proj, last_in),
            LinearKind::O | LinearKind::Down => {}
        }
    }

    /// Makes `linear` (a weight that was not scored, e.g. GPTQ's) the state of `kind`.
    pub fn adopt(
        &mut self,
        layer: &DecoderLayer<B>,
        inputs: &SubBlockInputs<B>,
        rope: &Rope<B>,
        kind: LinearKind,
        linear: &Linear<B>,
    ) {
        let update = match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => attn_update(
                layer,
                &self.attn,
                inputs.attn_in.clone(),
                rope,
                kind,
                linear,
            ),
            LinearKind::Gate | LinearKind::Up => {
                mlp_update(&self.mlp, inputs.mlp_in.clone(), kind, linear)
            }
            LinearKind::O | LinearKind::Down => return,
        };
        self.apply(kind, update);
    }
}

/// A mean over calibration tokens accumulated chunk by chunk.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorSum {
    weighted: f64,
    tokens: usize,
}

impl ErrorSum {
    /// Adds a chunk's mean over `tokens` tokens.
    pub fn add(&mut self, mean: f64, tokens: usize) {
        self.weighted += mean * tokens as f64;
        self.tokens += tokens;
    }

    /// The mean over every token added (exactly the one chunk's mean when there is one).
    pub fn mean(&self) -> f64 {
        self.weighted / self.tokens.max(1) as f64
    }
}

fn mean_square<B: QuantBackend, const D: usize>(t: Tensor<B, D>) -> f64 {
    let n = t.shape().num_elements();
    B::inner_product(t.clone(), t) / n as f64
}

/// `mean((a − b)²)`, without the difference tensor.
fn mean_square_distance<B: QuantBackend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let n = a.shape().num_elements();
    B::squared_distance(a, b) / n as f64
}

/// `Xᵀ·X` of a captured input `[blocks, t, features]`: what the error of a change of the
/// linear reading `X` depends on, and (scaled) GPTQ's Hessian.
pub fn gram<B: QuantBackend>(x: &Tensor<B, 3>) -> Tensor<B, 2> {
    B::gram(B::flatten_rows(x.clone()))
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

/// `Ŵᵀ − Wᵀ` of a candidate against the layer's linear.
pub fn delta_t<B: QuantBackend>(original: &Linear<B>, candidate: &Linear<B>) -> Tensor<B, 2> {
    // Differences are taken on the stored `Wᵀ`, so no weight is transposed.
    candidate.weight_t().sub(original.weight_t())
}

/// `mean((X·ΔWᵀ)²)` over the `N × OC` outputs of one chunk's input `x`.
pub fn own_output_error_direct<B: QuantBackend>(delta_t: &Tensor<B, 2>, x: &Tensor<B, 3>) -> f64 {
    mean_square(B::dense_linear(x.clone(), delta_t.clone()))
}

/// `mean((X·Ŵᵀ − X·Wᵀ)²)` over the `N × OC` outputs of one chunk's input `x`: the definition,
/// without the difference form.
pub fn own_output_error_undifferenced<B: QuantBackend>(
    original: &Linear<B>,
    candidate: &Linear<B>,
    x: &Tensor<B, 3>,
) -> f64 {
    mean_square_distance(candidate.forward(x.clone()), original.forward(x.clone()))
}

/// `mean((X·ΔWᵀ)²)` over `tokens × OC` outputs from `G = XᵀX` over those tokens:
/// `Σ(G ⊙ ΔWᵀΔW)/(N·OC)`, which costs about `IC²·OC/2` instead of `N·IC·OC`.
pub fn own_output_error_gram<B: QuantBackend>(
    delta_t: &Tensor<B, 2>,
    x_gram: &Tensor<B, 2>,
    tokens: usize,
) -> f64 {
    let out = delta_t.dims()[1];
    mean_square_from_grams(x_gram.clone(), weight_gram(delta_t.clone()), tokens, out)
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
        let d = delta_t(&w, &c);
        let direct = own_output_error_direct(&d, &x);
        // The form the q, k, v scores take through o_proj's `WᵀW`.
        let from_grams = mean_square_from_grams(gram(&x), weight_gram(noise.clone()), 21, 20);
        let expected = mean_square(B::dense_linear(x.clone(), noise.clone()));
        assert!(
            (expected - from_grams).abs() <= 1e-4 * expected,
            "{expected} vs {from_grams}"
        );
        let via_gram = own_output_error_gram(&d, &gram(&x), 21);
        assert!(direct > 0.0);
        assert!(
            (direct - via_gram).abs() <= 1e-4 * direct,
            "{direct} vs {via_gram}"
        );
    }

    #[test]
    fn chunk_means_weighted_by_tokens_give_the_whole_mean() {
        let mut s = ErrorSum::default();
        s.add(2.0, 3);
        s.add(4.0, 1);
        assert_eq!(s.mean(), 2.5);
        let mut one = ErrorSum::default();
        one.add(0.1f32 as f64, 14_160);
        assert_eq!(one.mean(), 0.1f32 as f64);
    }
}
