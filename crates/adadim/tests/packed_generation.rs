//! Generation on packed (quantized) linears through `QuantLinear`: the KV cache gives the same
//! tokens as recomputing the whole sequence, and the packed model matches its dequantized twin.

use std::collections::HashMap;

use adadim::{DimPolicy, Method, QuantizeOptions, quantize_model};
use burn::backend::NdArray;
use kernels::QuantLinear;
use model_llama::generate::{GenerateOptions, generate};
use model_llama::load::{assemble, linear_shape, load_layer_with, load_model, load_periphery};
use model_llama::{HostTensor, Linear, LinearKind, Llama, LlamaConfig, MemorySource, TensorSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type B = NdArray<f32>;

fn source() -> MemorySource {
    let config = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        vocab_size: 97,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    };
    let mut rng = StdRng::seed_from_u64(11);
    let mut t = HashMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        t.insert(name, HostTensor::new(shape, data));
    };
    put("model.embed_tokens.weight".into(), vec![97, 64], 1.0, 0.0);
    put("model.norm.weight".into(), vec![64], 0.1, 1.0);
    for i in 0..2 {
        put(
            format!("model.layers.{i}.input_layernorm.weight"),
            vec![64],
            0.1,
            1.0,
        );
        put(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            vec![64],
            0.1,
            1.0,
        );
        for kind in LinearKind::ALL {
            let shape = linear_shape(&config, kind);
            put(
                format!("{}.weight", kind.hf_prefix(i)),
                shape.to_vec(),
                0.2,
                0.0,
            );
        }
    }
    MemorySource {
        path: "tiny".into(),
        config,
        tensors: t,
    }
}

#[test]
fn packed_generation_matches_with_and_without_cache_and_its_dequantized_twin() {
    let src = source();
    let device = Default::default();
    let calib: Vec<Vec<u32>> = (0..4)
        .map(|b| (0..32).map(|t| (b * 31 + t * 7) % 97).collect())
        .collect();
    let opts = QuantizeOptions {
        bits: 3,
        group_size: 32,
        method: Method::Rtn,
        policy: DimPolicy::Ada,
        gptq: Default::default(),
    };
    let q = quantize_model::<B>(&src, &calib, &opts, &device).unwrap();
    let packed: HashMap<&str, &quant_core::PackedLinear> =
        q.linears.iter().map(|(m, p)| (m.as_str(), p)).collect();
    assert!(packed.values().any(|p| p.dim == quant_core::QuantDim::Ic));

    let layers = (0..2)
        .map(|i| {
            load_layer_with(&src, i, &device, &|kind| {
                let p = packed[kind.hf_prefix(i).as_str()];
                Ok(Linear::Quant(QuantLinear::new(p, &device).unwrap()))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let quantized: Llama<B> = assemble(&src, load_periphery(&src, &device).unwrap(), layers);

    let mut twin = src.tensors.clone();
    for (m, p) in &q.linears {
        twin.insert(
            format!("{m}.weight"),
            HostTensor::new(vec![p.out_features, p.in_features], p.dequantize()),
        );
    }
    let twin = MemorySource {
        tensors: twin,
        ..source()
    };
    let dense = load_model::<B>(&twin as &dyn TensorSource, &device).unwrap();

    let prompt = [5u32, 17, 42, 8];
    let run = |model: &Llama<B>, use_cache, temperature| {
        let o = GenerateOptions {
            max_new_tokens: 16,
            temperature,
            top_p: 0.9,
            seed: 3,
            use_cache,
            stop_token: None,
        };
        generate(model, &prompt, &o).tokens
    };
    for temperature in [0.0, 0.8] {
        // Cached decoding runs the SIMD kernel at M = 1; full recompute runs M = 4..19.
        let cached = run(&quantized, true, temperature);
        assert_eq!(cached.len(), 16);
        assert_eq!(
            cached,
            run(&quantized, false, temperature),
            "temperature {temperature}"
        );
        assert_eq!(
            cached,
            run(&dense, true, temperature),
            "temperature {temperature}"
        );
    }
}
