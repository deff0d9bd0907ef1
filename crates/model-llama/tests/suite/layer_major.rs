//! Layer-major perplexity against the whole-model path (bit for bit), and compact (f16/bf16)
//! dense linears against their f32 loading.

use std::collections::HashMap;

use burn::backend::NdArray;
use burn::prelude::*;
use half::{bf16, f16};
use kernels::QuantLinear;
use model_llama::export::{OwnedTensor, hf_tensor_names, write_config};
use model_llama::load::{
    assemble, load_layer, load_layer_compact, load_layer_with, load_model, load_periphery,
};
use model_llama::packed::{PackedDir, QuantizationConfig, packed_layout_metadata, packed_tensors};
use model_llama::perplexity::{PerplexityReport, perplexity, perplexity_layer_major};
use model_llama::{
    DecoderLayer, Linear, LinearKind, Llama, LlamaConfig, MemorySource, OpenModel, Result,
    ShardWriter, TensorSource, linear_shape,
};
use quant_core::{GroupSize, PackedLinear, QuantConfig, QuantDim, quantize_rtn};

type B = NdArray<f32>;

fn config(layers: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: layers,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        vocab_size: 61,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + i / 5) % 61) as u32).collect()
}

/// Every tensor of `src` passed through `round`.
fn rounded(src: &MemorySource, round: impl Fn(f32) -> f32) -> MemorySource {
    let mut tensors = src.tensors.clone();
    for t in tensors.values_mut() {
        t.data.iter_mut().for_each(|v| *v = round(*v));
    }
    MemorySource {
        path: src.path.clone(),
        config: src.config.clone(),
        tensors,
    }
}

fn assert_same(what: &str, a: &PerplexityReport, b: &PerplexityReport) {
    assert_eq!(a.windows, b.windows, "{what}: windows");
    assert_eq!(
        a.nll.to_bits(),
        b.nll.to_bits(),
        "{what}: layer-major NLL {} vs whole-model {}",
        a.nll,
        b.nll
    );
}

/// The whole-model path on `model` against the layer-major one with `layer`, for window lengths
/// whose products are all beyond the direct products' rows (`kernels::cpu::DIRECT_ROWS_*`,
/// where a compact weight is multiplied as the f32 one the layer-major path loads).
fn check_layer_major(
    what: &str,
    src: &dyn TensorSource,
    model: &Llama<B>,
    layer: &dyn Fn(usize) -> Result<DecoderLayer<B>>,
) {
    let device = Default::default();
    let tokens = tokens(600);
    for (seqlen, windows) in [(136, None), (160, Some(3)), (130, Some(2))] {
        let whole = perplexity(model, &tokens, seqlen, windows).unwrap();
        let streamed =
            perplexity_layer_major(src, layer, &tokens, seqlen, windows, &device).unwrap();
        assert_same(&format!("{what} seqlen {seqlen}"), &streamed, &whole);
        assert!(whole.perplexity.is_finite() && whole.perplexity > 1.0);
    }
}

#[test]
fn layer_major_matches_the_whole_model_on_f32_weights() {
    let src = MemorySource::random(config(3), 21);
    let device = Default::default();
    let model = load_model::<B>(&src, &device).unwrap();
    check_layer_major("f32", &src, &model, &|i| {
        load_layer_compact::<B>(&src, i, &device)
    });
    // A window whose last head product has only a few rows (decode sizes): with an f32 head the
    // two paths still run the same ops.
    let tokens = tokens(40);
    let whole = perplexity(&model, &tokens, 6, None).unwrap();
    let streamed = perplexity_layer_major(
        &src,
        &|i| load_layer_compact::<B>(&src, i, &device),
        &tokens,
        6,
        None,
        &device,
    )
    .unwrap();
    assert_same("f32 seqlen 6", &streamed, &whole);
}

#[test]
fn layer_major_matches_the_whole_model_on_16_bit_weights() {
    let device = Default::default();
    let base = MemorySource::random(config(2), 22);
    let f16_src = rounded(&base, |v| f16::from_f32(v).to_f32());
    let model = load_model::<B>(&f16_src, &device).unwrap();
    assert!(matches!(model.layers[0].mlp.up_proj, Linear::Quant(_)));
    assert!(matches!(model.lm_head, Linear::Quant(_)));
    check_layer_major("f16", &f16_src, &model, &|i| {
        load_layer_compact(&f16_src, i, &device)
    });
    // bf16 values, with one that f16 cannot hold in every tensor so they stay bf16.
    let mut bf16_src = rounded(&base, |v| bf16::from_f32(v).to_f32());
    for t in bf16_src.tensors.values_mut() {
        t.data[0] = bf16::from_f32(1.0e-30).to_f32();
    }
    let model = load_model::<B>(&bf16_src, &device).unwrap();
    assert!(matches!(model.layers[1].self_attn.k_proj, Linear::Quant(_)));
    check_layer_major("bf16", &bf16_src, &model, &|i| {
        load_layer_compact(&bf16_src, i, &device)
    });
}

/// Logits of `tokens` as one sequence.
fn logits(model: &Llama<B>, tokens: &[u32]) -> Vec<f32> {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids, [1, tokens.len()]),
        &Default::default(),
    );
    model.forward(input).into_data().to_vec::<f32>().unwrap()
}

#[test]
fn compact_linears_compute_what_f32_ones_do() {
    let device = Default::default();
    let base = MemorySource::random(config(2), 23);
    let f16_src = rounded(&base, |v| f16::from_f32(v).to_f32());
    let compact = load_model::<B>(&f16_src, &device).unwrap();
    let layers = (0..2)
        .map(|i| load_layer(&f16_src, i, &device))
        .collect::<Result<Vec<_>>>()
        .unwrap();
    assert!(matches!(layers[0].self_attn.q_proj, Linear::Dense { .. }));
    let dense = assemble(&f16_src, load_periphery(&f16_src, &device).unwrap(), layers);
    // Beyond `DIRECT_ROWS_16BIT` tokens both multiply the same f32 values by the same product;
    // up to it the compact linears take the 16-bit GEMV (another summation order).
    let long = tokens(kernels::cpu::DIRECT_ROWS_16BIT + 6);
    assert_eq!(logits(&compact, &long), logits(&dense, &long));
    let short = &long[..5];
    let (a, b) = (logits(&compact, short), logits(&dense, short));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
            "at {i}: {x} vs {y}"
        );
    }
}

/// Random packed linears for every layer of `src`, by RTN, alternating the dim.
fn packed_linears(src: &MemorySource) -> HashMap<String, PackedLinear> {
    let mut out = HashMap::new();
    for i in 0..src.config.num_hidden_layers {
        for (j, kind) in LinearKind::ALL.into_iter().enumerate() {
            let module = kind.hf_prefix(i);
            let [n, k] = linear_shape(&src.config, kind);
            let w = src.load(&format!("{module}.weight")).unwrap().data;
            let dim = if (i + j) % 2 == 0 {
                QuantDim::Oc
            } else {
                QuantDim::Ic
            };
            let q = quantize_rtn(
                &w,
                n,
                k,
                QuantConfig::new(3, GroupSize::Len(32), dim).unwrap(),
            )
            .unwrap();
            out.insert(module, q.pack());
        }
    }
    out
}

#[test]
fn layer_major_matches_the_whole_model_on_packed_layers() {
    let device = Default::default();
    let src = MemorySource::random(config(2), 24);
    let packed = packed_linears(&src);
    let layer = |i: usize| {
        load_layer_with(&src, i, &device, &|kind| {
            let q = QuantLinear::new(&packed[&kind.hf_prefix(i)], &device).unwrap();
            Ok(Linear::Quant(q))
        })
    };
    let layers = (0..2).map(layer).collect::<Result<Vec<_>>>().unwrap();
    let model = assemble(&src, load_periphery(&src, &device).unwrap(), layers);
    check_layer_major("packed", &src, &model, &layer);
}

/// A packed checkpoint on disk, opened as `adadim eval` opens one, evaluates layer by layer as
/// its loaded model does.
#[test]
fn open_model_streams_a_packed_checkpoint() {
    let device = Default::default();
    // Dense tensors in f16, as the quantizer writes them (the tied head then loads compact).
    let src = rounded(&MemorySource::random(config(2), 25), |v| {
        f16::from_f32(v).to_f32()
    });
    let packed = packed_linears(&src);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("packed");
    std::fs::create_dir(&dir).unwrap();
    let mut writer = ShardWriter::new(&dir, u64::MAX).unwrap();
    for name in hf_tensor_names(&src) {
        let module = name.strip_suffix(".weight").unwrap();
        match packed.get(module) {
            Some(p) => {
                let layout = packed_layout_metadata(module, p);
                for (name, t) in packed_tensors(module, p) {
                    let layout = std::slice::from_ref(&layout);
                    writer
                        .add(&name, t.dtype, &t.shape, &t.bytes, layout)
                        .unwrap();
                }
            }
            None => {
                let t = src.load(&name).unwrap();
                let t = OwnedTensor::f16_from_f32(t.shape, &t.data);
                t.write_to(&mut writer, &name).unwrap();
            }
        }
    }
    writer.finish().unwrap();
    let mut json = src.config.to_hf_json();
    json["quantization_config"] = serde_json::to_value(QuantizationConfig {
        quant_method: "adadim".into(),
        algorithm: "rtn".into(),
        bits: 3,
        group_size: GroupSize::Len(32),
        dims: packed.iter().map(|(m, p)| (m.clone(), p.dim)).collect(),
        head: None,
        sym: false,
    })
    .unwrap();
    write_config(&dir, &json).unwrap();
    // The evaluation does not use the tokenizer: the shipped model's will do.
    let gguf = test_assets::smollm2_gguf().unwrap();
    let m = OpenModel {
        source: Box::new(PackedDir::open(&dir).unwrap().unwrap()),
        tokenizer: model_llama::open_model(&gguf).unwrap().tokenizer,
        packed: PackedDir::open(&dir).unwrap(),
    };
    let model = m.load::<B>(&device).unwrap();
    assert!(matches!(model.layers[0].mlp.down_proj, Linear::Quant(_)));
    let tokens = tokens(600);
    for (seqlen, windows) in [(136, None), (160, Some(2))] {
        let whole = perplexity(&model, &tokens, seqlen, windows).unwrap();
        let streamed = m
            .perplexity::<B>(&tokens, seqlen, windows, &device)
            .unwrap();
        assert_same(&format!("packed dir seqlen {seqlen}"), &streamed, &whole);
    }
}
