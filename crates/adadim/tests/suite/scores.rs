//! The selector's scores against their definition, and the streaming memory plan against the
//! resident one.
//!
//! A linear's score is the mean squared difference of its sub-block's output (attention for q,
//! k, v; MLP for gate, up; its own output for o, down) between the layer with the candidate and
//! the layer as it stands (earlier linears already quantized), on full-precision inputs
//! (docs/method.md §4). The pipeline computes it through shortcuts (differences before the last
//! linear, Gram matrices, chunk sums); here it is computed directly with the model's own
//! sub-block forwards.

use adadim::memory::footprint;
use adadim::{DimPolicy, Method, QuantizeOptions, QuantizedModel, ScoreForms, quantize_model};
use burn::backend::NdArray;
use burn::prelude::*;
use model_llama::linear_shape;
use model_llama::load::load_layer;
use model_llama::model::Rope;
use model_llama::{Linear, LinearKind, MemorySource, TensorSource};
use quant_core::{GroupSize, QuantConfig, QuantDim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;

type B = NdArray<f32>;

const BLOCKS: usize = 4;
const SEQLEN: usize = 48;

fn calib(vocab: u32) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(11);
    (0..BLOCKS)
        .map(|_| (0..SEQLEN).map(|_| rng.random_range(0..vocab)).collect())
        .collect()
}

fn source() -> MemorySource {
    let mut src = MemorySource::random(common::tiny_config(2), 21);
    // Outlier input channels, so that the two dims score differently.
    for (name, t) in src.tensors.iter_mut() {
        if name.ends_with("proj.weight") {
            let cols = t.shape[1];
            for row in t.data.chunks_mut(cols) {
                row[5] *= 12.0;
            }
        }
    }
    src
}

fn opts(method: Method, max_memory: Option<u64>) -> QuantizeOptions {
    QuantizeOptions {
        bits: 3,
        group_size: GroupSize::Len(32),
        method,
        policy: DimPolicy::Ada,
        gptq: Default::default(),
        range: Default::default(),
        scoring: Default::default(),
        max_memory,
    }
}

/// A memory limit under which the plan streams in chunks of one block.
fn streaming_limit(src: &MemorySource, method: Method) -> u64 {
    footprint(src.config(), BLOCKS, SEQLEN, method, false, 1).peak()
}

fn dense(w: &[f32], shape: [usize; 2]) -> Linear<B> {
    Linear::from_host_weight(w, shape, &Default::default())
}

fn mean_sq_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f64 {
    let a = a.into_data().to_vec::<f32>().unwrap();
    let b = b.into_data().to_vec::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

/// The scores of layer 0 recomputed from their definition.
fn direct_scores(src: &MemorySource, q: &QuantizedModel) -> Vec<(LinearKind, f64, f64)> {
    let device = Default::default();
    let config = src.config();
    let h = config.hidden_size;
    let tokens = calib(config.vocab_size as u32);
    let table = src.load("model.embed_tokens.weight").unwrap().data;
    let x: Vec<f32> = tokens
        .iter()
        .flatten()
        .flat_map(|&t| table[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let x = Tensor::<B, 3>::from_data(TensorData::new(x, [BLOCKS, SEQLEN, h]), &device);
    let rope = Rope::new(config, SEQLEN, &device);
    let mut layer = load_layer::<B>(src, 0, &device).unwrap();
    let (_, trace) = layer.forward_captured(x, &rope);
    let inputs = trace.inputs;
    let base = QuantConfig::new(3, GroupSize::Len(32), QuantDim::Oc).unwrap();
    let mut out = Vec::new();
    for kind in LinearKind::ALL {
        let shape = linear_shape(config, kind);
        let w = src
            .load(&format!("{}.weight", kind.hf_prefix(0)))
            .unwrap()
            .data;
        // The sub-block output the score is defined on, for the layer `l`.
        let output = |l: &model_llama::DecoderLayer<B>| match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => {
                l.self_attn.forward(inputs.attn_in.clone(), &rope, None)
            }
            LinearKind::Gate | LinearKind::Up => l.mlp.forward(inputs.mlp_in.clone()),
            LinearKind::O => l.self_attn.o_proj.forward(inputs.o_in.clone()),
            LinearKind::Down => l.mlp.down_proj.forward(inputs.down_in.clone()),
        };
        let reference = output(&layer);
        let mut errors = [0.0; 2];
        for (e, dim) in errors.iter_mut().zip(QuantDim::ALL) {
            let cand = quant_core::quantize_rtn(&w, shape[0], shape[1], base.with_dim(dim))
                .unwrap()
                .pack()
                .dequantize();
            let mut with = layer.clone();
            *with.linear_mut(kind) = dense(&cand, shape);
            *e = mean_sq_diff(output(&with), reference.clone());
        }
        out.push((kind, errors[0], errors[1]));
        // The layer as the pipeline left it, for the next linear's reference.
        let module = kind.hf_prefix(0);
        let (_, packed) = q.linears.iter().find(|(m, _)| *m == module).unwrap();
        *layer.linear_mut(kind) = dense(&packed.dequantize(), shape);
    }
    out
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1e-30),
        "{what}: {got}, expected {want}"
    );
}

#[test]
fn scores_match_their_definition_resident_and_streaming() {
    let src = source();
    let device = Default::default();
    for (plan, max_memory) in [
        ("resident", None),
        ("streaming", Some(streaming_limit(&src, Method::Rtn))),
    ] {
        let q =
            quantize_model::<B>(&src, &calib(97), &opts(Method::Rtn, max_memory), &device).unwrap();
        let direct = direct_scores(&src, &q);
        for (r, (kind, oc, ic)) in q.records.iter().filter(|r| r.layer == 0).zip(direct) {
            assert_eq!(r.linear, kind);
            let what = format!("{plan} {kind:?}");
            assert_close(r.error_oc.unwrap(), oc, 1e-4, &format!("{what} oc"));
            assert_close(r.error_ic.unwrap(), ic, 1e-4, &format!("{what} ic"));
        }
    }
}

/// Every linear kind's score from the production path, with the Gram and difference forms all
/// forced on and all forced off, against the definition (docs/method.md §4).
#[test]
fn scores_in_every_form_match_their_definition() {
    let src = source();
    let device = Default::default();
    let mut by_form = Vec::new();
    for forms in [ScoreForms::Shortcuts, ScoreForms::Direct] {
        let o = QuantizeOptions {
            scoring: forms,
            ..opts(Method::Rtn, None)
        };
        let q = quantize_model::<B>(&src, &calib(97), &o, &device).unwrap();
        let direct = direct_scores(&src, &q);
        let records: Vec<_> = q.records.iter().filter(|r| r.layer == 0).collect();
        assert_eq!(records.len(), LinearKind::ALL.len());
        for (r, (kind, oc, ic)) in records.iter().zip(direct) {
            assert_eq!(r.linear, kind);
            let what = format!("{forms:?} {kind:?}");
            assert_close(r.error_oc.unwrap(), oc, 1e-5, &format!("{what} oc"));
            assert_close(r.error_ic.unwrap(), ic, 1e-5, &format!("{what} ic"));
        }
        by_form.push(q.records);
    }
    // Same choices whichever form computed the scores.
    for (a, b) in by_form[0].iter().zip(&by_form[1]) {
        assert_eq!(a.dim, b.dim, "layer {} {:?}", a.layer, a.linear);
    }
}

#[test]
fn streaming_chooses_as_resident_does() {
    let src = source();
    let device = Default::default();
    for method in [Method::Rtn, Method::Gptq] {
        let run = |max_memory| {
            quantize_model::<B>(&src, &calib(97), &opts(method, max_memory), &device).unwrap()
        };
        let resident = run(None);
        let streaming = run(Some(streaming_limit(&src, method)));
        // Streaming sums the Hessian chunk by chunk, in another order: GPTQ may round a few
        // weights the other way, and the later scores of the layer see those weights.
        let tol = match method {
            Method::Rtn => 1e-4,
            Method::Gptq => 1e-2,
        };
        for (a, b) in resident.records.iter().zip(&streaming.records) {
            let what = format!("{method} layer {} {:?}", a.layer, a.linear);
            assert_eq!(a.dim, b.dim, "{what}");
            assert_close(b.error_oc.unwrap(), a.error_oc.unwrap(), tol, &what);
            assert_close(b.error_ic.unwrap(), a.error_ic.unwrap(), tol, &what);
            if let (Some(x), Some(y)) = (a.gptq_loss, b.gptq_loss) {
                assert_close(y, x, tol, &format!("{what} GPTQ loss"));
            }
        }
        if method == Method::Rtn {
            // Same choices, and RTN does not read the calibration data: identical weights.
            for ((m, a), (_, b)) in resident.linears.iter().zip(&streaming.linears) {
                assert_eq!(a, b, "{m}");
            }
        }
    }
}
