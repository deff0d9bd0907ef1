//! The AdaDim selector on tiny random models with planted outliers.

use std::collections::HashMap;

use adadim::{
    DimPolicy, Method, QuantizeOptions, QuantizedModel, RangeMode, Recipe, Score, quantize_model,
};
use burn::backend::NdArray;
use burn::prelude::*;
use model_llama::linear_shape;
use model_llama::load::load_model;
use model_llama::{HostTensor, LinearKind, LlamaConfig, MemorySource, TensorSource};
use quant_core::{GptqOptions, GroupSize, QuantDim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;

use common::tiny_config;

type B = NdArray<f32>;

#[derive(Clone, Copy)]
enum Outliers {
    /// A few input channels (weight columns) scaled up.
    Columns,
    /// A few output channels (weight rows) scaled up.
    Rows,
}

const SCALE: f32 = 25.0;

fn outlier_channels(n: usize) -> [usize; 2] {
    [3, n / 2 + 1]
}

fn source(
    config: LlamaConfig,
    seed: u64,
    plant: &dyn Fn(LinearKind) -> Option<Outliers>,
) -> MemorySource {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let h = config.hidden_size;
    let mut uniform = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect()
    };
    tensors.insert(
        "model.embed_tokens.weight".to_string(),
        HostTensor::new(
            vec![config.vocab_size, h],
            uniform(config.vocab_size * h, 1.0, 0.0),
        ),
    );
    tensors.insert(
        "model.norm.weight".into(),
        HostTensor::new(vec![h], uniform(h, 0.1, 1.0)),
    );
    let hd = config.head_dim();
    let rep = config.num_attention_heads / config.num_key_value_heads;
    for i in 0..config.num_hidden_layers {
        let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
            tensors.insert(name, HostTensor::new(shape, data));
        };
        let mut norms = [uniform(h, 0.1, 1.0), uniform(h, 0.1, 1.0)];
        let mut weights: HashMap<LinearKind, Vec<f32>> = HashMap::new();
        for kind in LinearKind::ALL {
            let [out, inp] = linear_shape(&config, kind);
            weights.insert(kind, uniform(out * inp, 1.0 / (inp as f32).sqrt(), 0.0));
        }
        for kind in LinearKind::ALL {
            let [out, inp] = linear_shape(&config, kind);
            match plant(kind) {
                // As in real models (and AWQ's equivalence): weight columns scaled up by as much
                // as their input channels are scaled down, so the function barely changes.
                Some(Outliers::Columns) => {
                    for c in outlier_channels(inp) {
                        let w = weights.get_mut(&kind).unwrap();
                        for r in 0..out {
                            w[r * inp + c] *= SCALE;
                        }
                        match kind {
                            LinearKind::Q | LinearKind::K | LinearKind::V => norms[0][c] /= SCALE,
                            LinearKind::Gate | LinearKind::Up => norms[1][c] /= SCALE,
                            LinearKind::O => {
                                // context channel c is value channel d of KV head (c / hd) / rep
                                let row = (c / hd / rep) * hd + c % hd;
                                let v = weights.get_mut(&LinearKind::V).unwrap();
                                v[row * h..(row + 1) * h]
                                    .iter_mut()
                                    .for_each(|x| *x /= SCALE);
                            }
                            LinearKind::Down => {
                                let up = weights.get_mut(&LinearKind::Up).unwrap();
                                up[c * h..(c + 1) * h].iter_mut().for_each(|x| *x /= SCALE);
                            }
                        }
                    }
                }
                Some(Outliers::Rows) => {
                    let w = weights.get_mut(&kind).unwrap();
                    for r in outlier_channels(out) {
                        w[r * inp..(r + 1) * inp]
                            .iter_mut()
                            .for_each(|x| *x *= SCALE);
                    }
                }
                None => {}
            }
        }
        let [n1, n2] = norms;
        put(
            format!("model.layers.{i}.input_layernorm.weight"),
            vec![h],
            n1,
        );
        put(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            vec![h],
            n2,
        );
        for (kind, w) in weights {
            put(
                format!("{}.weight", kind.hf_prefix(i)),
                linear_shape(&config, kind).to_vec(),
                w,
            );
        }
    }
    MemorySource {
        path: "tiny".into(),
        config,
        tensors,
    }
}

fn calib(vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..4)
        .map(|_| (0..48).map(|_| rng.random_range(0..vocab)).collect())
        .collect()
}

fn opts(policy: DimPolicy) -> QuantizeOptions {
    QuantizeOptions {
        bits: 3,
        group_size: GroupSize::Len(32),
        method: Method::Rtn,
        policy,
        ..QuantizeOptions::from_choices(Recipe::Paper.choices())
    }
}

fn run(src: &MemorySource, policy: DimPolicy) -> QuantizedModel {
    quantize_model::<B>(src, &calib(97, 9), &opts(policy), &Default::default()).unwrap()
}

/// `src` with its linears replaced by the dequantized packed weights and its norms by the
/// run's (AWQ's folded ones).
fn dequantized(src: &MemorySource, q: &QuantizedModel) -> MemorySource {
    let mut tensors = src.tensors.clone();
    for (module, p) in &q.linears {
        tensors.insert(
            format!("{module}.weight"),
            HostTensor::new(vec![p.out_features, p.in_features], p.dequantize()),
        );
    }
    for (name, w) in &q.norms {
        tensors.insert(name.clone(), HostTensor::new(vec![w.len()], w.clone()));
    }
    MemorySource {
        path: src.path.clone(),
        config: src.config.clone(),
        tensors,
    }
}

fn logits(src: &dyn TensorSource, tokens: &[Vec<u32>]) -> Vec<f32> {
    let device = Default::default();
    let model = load_model::<B>(src, &device).unwrap();
    let ids: Vec<i64> = tokens.iter().flatten().map(|&t| t as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids, [tokens.len(), tokens[0].len()]),
        &device,
    );
    model.forward(input).into_data().to_vec::<f32>().unwrap()
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn column_outliers_choose_ic() {
    let src = source(tiny_config(1), 1, &|_| Some(Outliers::Columns));
    let q = run(&src, DimPolicy::Ada);
    assert_eq!(q.quantization.dims.len(), 7);
    for r in &q.records {
        let (oc, ic) = (r.error_oc.unwrap(), r.error_ic.unwrap());
        assert_eq!(r.dim == QuantDim::Ic, ic < oc, "the choice is the argmin");
        // q and k reach the output through the softmax, which can mute an outlier channel.
        if !matches!(r.linear, LinearKind::Q | LinearKind::K) {
            assert_eq!(
                r.dim,
                QuantDim::Ic,
                "{:?}: oc error {oc}, ic error {ic}",
                r.linear
            );
        }
    }
}

/// Row outliers where the output error is linear in the weight error (no softmax or gating
/// in between): v (through attention's fixed probabilities), o and down.
#[test]
fn row_outliers_choose_oc() {
    let linear_path = [LinearKind::V, LinearKind::O, LinearKind::Down];
    let src = source(tiny_config(1), 1, &|k| {
        linear_path.contains(&k).then_some(Outliers::Rows)
    });
    let q = run(&src, DimPolicy::Ada);
    for r in q.records.iter().filter(|r| linear_path.contains(&r.linear)) {
        let (oc, ic) = (r.error_oc.unwrap(), r.error_ic.unwrap());
        assert_eq!(
            r.dim,
            QuantDim::Oc,
            "{:?}: oc error {oc}, ic error {ic}",
            r.linear
        );
    }
}

#[test]
fn ada_reconstructs_the_model_better_than_either_fixed_dim() {
    // Outliers of both kinds, in different linears: no single dim suits them all.
    let plant = |kind| match kind {
        LinearKind::V | LinearKind::Up | LinearKind::Down => Some(Outliers::Columns),
        LinearKind::Q | LinearKind::Gate | LinearKind::O => Some(Outliers::Rows),
        LinearKind::K => None,
    };
    let src = source(tiny_config(2), 2, &plant);
    let tokens = calib(97, 9);
    let reference = logits(&src, &tokens);
    let err = |policy: DimPolicy| {
        mse(
            &logits(&dequantized(&src, &run(&src, policy.clone())), &tokens),
            &reference,
        )
    };
    let (ada, oc, ic) = (
        err(DimPolicy::Ada),
        err(DimPolicy::Fixed(QuantDim::Oc)),
        err(DimPolicy::Fixed(QuantDim::Ic)),
    );
    assert!(ada <= oc.min(ic), "ada {ada}, all-OC {oc}, all-IC {ic}");
}

#[test]
fn fixed_policies_quantize_in_their_dim() {
    let src = source(tiny_config(1), 3, &|_| None);
    let q = run(&src, "ic:qkv,down".parse().unwrap());
    for r in &q.records {
        let ic = matches!(
            r.linear,
            LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::Down
        );
        assert_eq!(r.dim == QuantDim::Ic, ic, "{:?}", r.linear);
        assert!(r.error_oc.is_none() && r.error_ic.is_none());
    }
    let (_, down) = q
        .linears
        .iter()
        .find(|(m, _)| m.ends_with("down_proj"))
        .unwrap();
    assert_eq!(down.dim, QuantDim::Ic);
}

#[test]
fn gptq_ada_beats_rtn_ada() {
    let plant = |kind| match kind {
        LinearKind::V | LinearKind::Down => Some(Outliers::Columns),
        _ => None,
    };
    let src = source(tiny_config(2), 4, &plant);
    let tokens = calib(97, 9);
    let reference = logits(&src, &tokens);
    let err = |method| {
        let o = QuantizeOptions {
            method,
            ..opts(DimPolicy::Ada)
        };
        let q = quantize_model::<B>(&src, &tokens, &o, &Default::default()).unwrap();
        if method == Method::Gptq {
            assert!(
                q.records
                    .iter()
                    .all(|r| r.gptq_loss.is_some_and(f64::is_finite))
            );
        }
        mse(&logits(&dequantized(&src, &q), &tokens), &reference)
    };
    let (rtn, gptq) = (err(Method::Rtn), err(Method::Gptq));
    assert!(gptq < rtn, "GPTQ-ada {gptq} vs RTN-ada {rtn}");
}

#[test]
fn searched_ranges_reconstruct_the_model_better_for_rtn_and_gptq() {
    let plant = |kind| match kind {
        LinearKind::V | LinearKind::Down => Some(Outliers::Columns),
        LinearKind::Q | LinearKind::Gate => Some(Outliers::Rows),
        _ => None,
    };
    let src = source(tiny_config(2), 6, &plant);
    let tokens = calib(97, 10);
    let reference = logits(&src, &tokens);
    for method in [Method::Rtn, Method::Gptq] {
        let err = |range| {
            let o = QuantizeOptions {
                method,
                range,
                ..opts(DimPolicy::Ada)
            };
            let q = quantize_model::<B>(&src, &tokens, &o, &Default::default()).unwrap();
            mse(&logits(&dequantized(&src, &q), &tokens), &reference)
        };
        let (plain, searched) = (err(RangeMode::MinMax), err(RangeMode::Search));
        assert!(
            searched < plain,
            "{method}: searched ranges {searched} vs min-max {plain}"
        );
    }
}

/// AWQ folds its scales into the norms and linears: at 8 bits the folded, quantized model
/// still computes the original function (the folded norms are written, or the outputs would be
/// off by the scales), and at 3 bits per-OC AWQ reconstructs the model better than per-OC RTN
/// on planted input-channel outliers, before RTN and before GPTQ alike. (Per-IC groups are unchanged by the scales, so AWQ-ada is
/// not compared: on this model it picks per-IC where RTN-ada does.)
#[test]
fn awq_folds_preserve_the_model_and_beat_rtn() {
    let plant = |kind| match kind {
        LinearKind::Q | LinearKind::Gate => Some(Outliers::Columns),
        _ => None,
    };
    let src = source(tiny_config(2), 4, &plant);
    let tokens = calib(97, 9);
    let reference = logits(&src, &tokens);
    let power = mse(&reference, &vec![0.0; reference.len()]);
    let run = |method, bits, policy| {
        let o = QuantizeOptions {
            method,
            bits,
            range: RangeMode::MinMax,
            ..opts(policy)
        };
        quantize_model::<B>(&src, &tokens, &o, &Default::default()).unwrap()
    };
    for method in [Method::Awq, Method::AwqGptq] {
        let q8 = run(method, 8, DimPolicy::Fixed(QuantDim::Oc));
        let changed = q8
            .norms
            .iter()
            .filter(|(name, w)| src.tensors[name].data != *w)
            .count();
        assert!(changed > 0, "{method}: some norm takes a scale");
        let e8 = mse(&logits(&dequantized(&src, &q8), &tokens), &reference);
        assert!(
            e8 < 1e-3 * power,
            "8-bit {method} error {e8} vs power {power}"
        );
    }
    let err = |method| {
        let q = run(method, 3, DimPolicy::Fixed(QuantDim::Oc));
        mse(&logits(&dequantized(&src, &q), &tokens), &reference)
    };
    let (awq, rtn) = (err(Method::Awq), err(Method::Rtn));
    assert!(awq < rtn, "AWQ {awq} vs RTN {rtn}");
    let (awq_gptq, gptq) = (err(Method::AwqGptq), err(Method::Gptq));
    assert!(awq_gptq < gptq, "AWQ-GPTQ {awq_gptq} vs GPTQ {gptq}");
}

/// Refitting GPTQ's per-OC groups to its codes (docs/method.md §3.1) reconstructs the model
/// better than GPTQ's own parameters, with zeros that are no longer all codes.
#[test]
fn refitted_gptq_groups_reconstruct_the_model_better() {
    let plant = |kind| (kind == LinearKind::Q).then_some(Outliers::Columns);
    let src = source(tiny_config(2), 4, &plant);
    let tokens = calib(97, 9);
    let reference = logits(&src, &tokens);
    let run = |refit| {
        let o = QuantizeOptions {
            method: Method::Gptq,
            refit,
            ..opts(DimPolicy::Fixed(QuantDim::Oc))
        };
        quantize_model::<B>(&src, &tokens, &o, &Default::default()).unwrap()
    };
    let (plain, refitted) = (run(false), run(true));
    let err = |q| mse(&logits(&dequantized(&src, q), &tokens), &reference);
    let (e_plain, e_refit) = (err(&plain), err(&refitted));
    assert!(e_refit < e_plain, "refitted {e_refit} vs GPTQ's {e_plain}");
    let fractional = |q: &QuantizedModel| {
        (q.linears.iter())
            .flat_map(|(_, p)| &p.zeros)
            .any(|z| z.to_f32().fract() != 0.0)
    };
    assert!(!fractional(&plain) && fractional(&refitted));
}

/// `sym` makes every group of every linear symmetric, in both dims and for both methods, with
/// ranges searched or not, and the checkpoint's config says so.
#[test]
fn symmetric_runs_keep_every_zero_point_at_the_centre() {
    let plant = |kind| (kind == LinearKind::V).then_some(Outliers::Columns);
    let src = source(tiny_config(1), 7, &plant);
    let tokens = calib(97, 11);
    for method in [Method::Rtn, Method::Gptq] {
        for range in [RangeMode::MinMax, RangeMode::Search] {
            let o = QuantizeOptions {
                method,
                range,
                sym: true,
                ..opts(DimPolicy::Ada)
            };
            let q = quantize_model::<B>(&src, &tokens, &o, &Default::default()).unwrap();
            assert!(q.quantization.sym);
            assert!(q.records.iter().any(|r| r.dim == QuantDim::Ic), "{method}");
            for (m, p) in &q.linears {
                assert!(
                    p.zeros.iter().all(|z| z.to_f32() == 4.0),
                    "{method} {range} {m}: zeros {:?}",
                    &p.zeros[..4]
                );
            }
        }
    }
}

#[test]
fn bad_options_are_typed_errors() {
    let src = source(tiny_config(1), 5, &|_| None);
    let run_with = |bits, group_size| {
        let o = QuantizeOptions {
            bits,
            group_size: GroupSize::Len(group_size),
            ..opts(DimPolicy::Ada)
        };
        let e = quantize_model::<B>(&src, &calib(97, 1), &o, &Default::default())
            .err()
            .unwrap();
        // The cause is the error's source, not part of its own message.
        let mut shown = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            shown = format!("{shown}: {c}");
            cause = c.source();
        }
        shown
    };
    assert!(
        run_with(5, 32).contains("unsupported bit width 5"),
        "{}",
        run_with(5, 32)
    );
    let e = run_with(3, 48);
    assert!(e.contains("does not divide"), "{e}");
    let empty: Vec<Vec<u32>> = vec![];
    let e = quantize_model::<B>(&src, &empty, &opts(DimPolicy::Ada), &Default::default())
        .err()
        .unwrap();
    assert!(matches!(e, adadim::AdadimError::EmptyCalibration(_)), "{e}");
}

/// GPTQ's knobs are checked up front, and a bad one is named in the error.
#[test]
fn bad_gptq_options_name_the_option() {
    let with = |gptq: GptqOptions, policy: DimPolicy| QuantizeOptions {
        method: Method::Gptq,
        gptq,
        ..opts(policy)
    };
    let base = GptqOptions::default();
    let option = |o: QuantizeOptions| o.check_options().err().map(|e| e.option);
    assert_eq!(option(with(base, DimPolicy::Ada)), None);
    let bad_block = GptqOptions {
        block_size: 0,
        ..base
    };
    assert_eq!(
        option(with(bad_block, DimPolicy::Ada)),
        Some("gptq.block_size")
    );
    for percdamp in [-0.1, f32::NAN, f32::INFINITY] {
        let o = with(GptqOptions { percdamp, ..base }, DimPolicy::Ada);
        assert_eq!(option(o), Some("gptq.percdamp"), "{percdamp}");
    }
    // Dynamic groups only where no linear is quantized per-OC.
    let dynamic = GptqOptions {
        static_groups: false,
        ..base
    };
    for policy in [
        DimPolicy::Ada,
        "oc".parse().unwrap(),
        "ic:qkv".parse().unwrap(),
    ] {
        assert_eq!(option(with(dynamic, policy)), Some("gptq.static_groups"));
    }
    assert_eq!(option(with(dynamic, "ic".parse().unwrap())), None);
    // RTN ignores them.
    let rtn = QuantizeOptions {
        method: Method::Rtn,
        ..with(bad_block, DimPolicy::Ada)
    };
    assert_eq!(option(rtn.clone()), None);
    // GPTQ-scored candidates need GPTQ.
    let rtn_gptq_scored = QuantizeOptions {
        score: Score::Gptq,
        ..rtn.clone()
    };
    assert_eq!(option(rtn_gptq_scored), Some("score"));
    // So does refitting GPTQ's groups.
    let rtn_refit = QuantizeOptions { refit: true, ..rtn };
    assert_eq!(option(rtn_refit), Some("refit"));
    assert_eq!(
        option(QuantizeOptions {
            refit: true,
            ..with(base, DimPolicy::Ada)
        }),
        None
    );
    // The run's up-front validation refuses them, with the option's name.
    let e = with(bad_block, DimPolicy::Ada)
        .validate(&tiny_config(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid gptq.block_size"), "{e}");
}
