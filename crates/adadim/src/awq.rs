//! AWQ on one decoder layer (docs/method.md §4.8): each input channel's scale searched on the
//! layer's calibration output, then folded into what produces the input, so that the layer the
//! pipeline goes on to quantize computes the same function with easier weights.
//!
//! The four places a scale can fold, as in AWQ's LLaMA recipe:
//! - `input_layernorm` → q, k, v, searched on the attention sub-block's output;
//! - `v_proj` rows → `o_proj`, on o's output, when every head has its own v (no GQA: a grouped v
//!   feeds several heads' o columns, which would have to share scales; AWQ skips it too);
//! - `post_attention_layernorm` → gate, up, on the MLP's output;
//! - `up_proj` rows → `down_proj`, on down's output.
//!
//! Every search reads the full-precision layer's forward on the same sample, so the four are
//! independent and folded together afterwards.

use burn::prelude::*;
use kernels::QuantBackend;
use model_llama::load::load_host;
use model_llama::model::Rope;
use model_llama::{
    DecoderLayer, LayerTrace, Linear, LinearKind, LlamaConfig, TensorSource, linear_shape,
};
use quant_core::{QuantConfig, QuantDim, awq};

use crate::error::Result;
use crate::pipeline::quant_err;

/// Calibration tokens the scales are searched on (whole blocks from the first chunk, at least
/// one): each of the 20 exponents reruns a sub-block on them, which on a 7B layer costs about
/// a second per thousand tokens here.
pub const SEARCH_TOKENS: usize = 4096;

/// A producer the scales fold into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Producer {
    InputNorm,
    PostAttentionNorm,
    Linear(LinearKind),
}

/// One group of linears that read the same input, and what produces it.
#[derive(Clone, Copy, Debug)]
struct ScaleGroup {
    producer: Producer,
    readers: &'static [LinearKind],
}

const GROUPS: [ScaleGroup; 4] = [
    ScaleGroup {
        producer: Producer::InputNorm,
        readers: &[LinearKind::Q, LinearKind::K, LinearKind::V],
    },
    ScaleGroup {
        producer: Producer::Linear(LinearKind::V),
        readers: &[LinearKind::O],
    },
    ScaleGroup {
        producer: Producer::PostAttentionNorm,
        readers: &[LinearKind::Gate, LinearKind::Up],
    },
    ScaleGroup {
        producer: Producer::Linear(LinearKind::Up),
        readers: &[LinearKind::Down],
    },
];

/// The layer's weights after the fold, on the host: what the pipeline quantizes and writes.
pub struct Folded {
    linears: Vec<Option<Vec<f32>>>,
    /// `input_layernorm` and `post_attention_layernorm`, by full tensor name.
    pub norms: Vec<(String, Vec<f32>)>,
}

impl Folded {
    /// The folded weight of `kind`, handed over once.
    pub fn take(&mut self, kind: LinearKind) -> Vec<f32> {
        self.linears[kind as usize]
            .take()
            .expect("each folded weight is taken once")
    }
}

/// Layer `i`'s two norm weights from `src`, by tensor name: `input_layernorm`, then
/// `post_attention_layernorm` (the order [`Folded::norms`] keeps).
pub fn layer_norms(src: &dyn TensorSource, i: usize) -> Result<Vec<(String, Vec<f32>)>> {
    let hidden = src.config().hidden_size;
    ["input_layernorm", "post_attention_layernorm"]
        .into_iter()
        .map(|norm| {
            let name = format!("model.layers.{i}.{norm}.weight");
            let w = load_host(src, &name, &[hidden])?;
            Ok((name, w))
        })
        .collect()
}

/// Searches layer `i`'s scales on `sample` (its calibration input), folds them into `layer`
/// and returns the folded host weights. `config` is the run's per-group quantizer; the search
/// quantizes per-OC, the only dim the scales change.
pub fn fold_layer<B: QuantBackend>(
    src: &dyn TensorSource,
    i: usize,
    layer: &mut DecoderLayer<B>,
    sample: Tensor<B, 3>,
    rope: &Rope<B>,
    config: QuantConfig,
    device: &B::Device,
) -> Result<Folded> {
    let model = src.config();
    let mut linears = Vec::with_capacity(LinearKind::ALL.len());
    for kind in LinearKind::ALL {
        let name = format!("{}.weight", kind.hf_prefix(i));
        linears.push(load_host(src, &name, &linear_shape(model, kind))?);
    }
    let mut norms = layer_norms(src, i)?;
    let (_, trace) = layer.forward_captured(sample, rope);
    let config = config.with_dim(QuantDim::Oc);
    let mut folds = Vec::with_capacity(GROUPS.len());
    for group in GROUPS {
        let readers = group.readers;
        if let Producer::Linear(p) = group.producer
            && linear_shape(model, p)[0] != linear_shape(model, readers[0])[1]
        {
            tracing::debug!(layer = i, producer = ?p, "no AWQ scales: the producer is grouped");
            continue;
        }
        let (alpha, s) = search(model, layer, &trace, rope, group, &linears, config, device)?;
        tracing::debug!(layer = i, readers = ?readers, alpha, "AWQ scales");
        folds.push((group, s));
    }
    for (group, s) in folds {
        for &r in group.readers {
            let [_, inp] = linear_shape(model, r);
            awq::scale_inputs(&mut linears[r as usize], inp, &s);
        }
        let divide = |w: &mut [f32]| w.iter_mut().zip(&s).for_each(|(x, s)| *x /= s);
        match group.producer {
            Producer::InputNorm => divide(&mut norms[0].1),
            Producer::PostAttentionNorm => divide(&mut norms[1].1),
            Producer::Linear(p) => {
                let [_, inp] = linear_shape(model, p);
                awq::unscale_outputs(&mut linears[p as usize], inp, &s);
            }
        }
    }
    for kind in LinearKind::ALL {
        let w = &linears[kind as usize];
        *layer.linear_mut(kind) = Linear::from_host_weight(w, linear_shape(model, kind), device);
    }
    let norm = |w: &[f32]| Tensor::from_data(TensorData::new(w.to_vec(), [w.len()]), device);
    layer.input_layernorm.weight = norm(&norms[0].1);
    layer.post_attention_layernorm.weight = norm(&norms[1].1);
    Ok(Folded {
        linears: linears.into_iter().map(Some).collect(),
        norms,
    })
}

/// The exponent, and its scales, whose scaled and quantized readers reproduce the group's
/// output best on the trace (the first of equals, so no scaling wins a tie).
#[allow(clippy::too_many_arguments)]
fn search<B: QuantBackend>(
    model: &LlamaConfig,
    layer: &DecoderLayer<B>,
    trace: &LayerTrace<B>,
    rope: &Rope<B>,
    group: ScaleGroup,
    linears: &[Vec<f32>],
    config: QuantConfig,
    device: &B::Device,
) -> Result<(f32, Vec<f32>)> {
    let inputs = &trace.inputs;
    let x = inputs.of(group.readers[0]);
    let [blocks, t, c] = x.dims();
    let mean_abs: Vec<f32> = (x.clone().abs().reshape([blocks * t, c]))
        .mean_dim(0)
        .into_data()
        .into_vec()
        .expect("f32 activations");
    let reference = match group.readers[0] {
        LinearKind::Q | LinearKind::O => &trace.attn_out,
        _ => &trace.mlp_out,
    };
    let mut best: Option<(f64, f32, Vec<f32>)> = None;
    for alpha in awq::alphas() {
        let s = awq::channel_scales(&mean_abs, alpha);
        let mut fake = Vec::with_capacity(group.readers.len());
        for &kind in group.readers {
            let [out, inp] = linear_shape(model, kind);
            let w = awq::quantize_scaled(&linears[kind as usize], out, inp, &s, config)
                .map_err(quant_err(format!("AWQ search of {kind:?}")))?;
            fake.push(Linear::<B>::from_host_weight(&w, [out, inp], device));
        }
        let output = match group.readers[0] {
            LinearKind::Q => {
                let attn = &layer.self_attn;
                let x = &inputs.attn_in;
                let p = |kind, l| attn.project(kind, l, x.clone(), rope, 0);
                let (q, k, v) = (
                    p(LinearKind::Q, &fake[0]),
                    p(LinearKind::K, &fake[1]),
                    p(LinearKind::V, &fake[2]),
                );
                attn.o_proj.forward(attn.attend(q, k, v))
            }
            LinearKind::Gate => {
                let x = &inputs.mlp_in;
                let h = B::swiglu(fake[0].forward(x.clone()), fake[1].forward(x.clone()));
                layer.mlp.down_proj.forward(h)
            }
            _ => fake[0].forward(x.clone()),
        };
        let n = output.shape().num_elements();
        let loss = B::squared_distance(output, reference.clone()) / n as f64;
        if best.as_ref().is_none_or(|b| loss < b.0) {
            best = Some((loss, alpha, s));
        }
    }
    let (_, alpha, s) = best.expect("the grid is not empty");
    Ok((alpha, s))
}
