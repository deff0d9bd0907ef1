//! Generation on packed (quantized) linears through `QuantLinear`: the KV cache gives the same
//! tokens as recomputing the whole sequence, and the packed model matches its dequantized twin.

use std::collections::HashMap;

use adadim::{DimPolicy, Method, QuantizeOptions, Recipe, quantize_model};
use burn::backend::NdArray;
use kernels::QuantLinear;
use model_llama::generate::{GenerateOptions, generate};
use model_llama::load::{assemble, load_layer_with, load_model, load_periphery};
use model_llama::{HostTensor, Linear, Llama, MemorySource, TensorSource};
use quant_core::GroupSize;

use crate::common;

use common::tiny_config;

type B = NdArray<f32>;

fn source() -> MemorySource {
    MemorySource::random(tiny_config(2), 11)
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
        group_size: GroupSize::Len(32),
        method: Method::Rtn,
        policy: DimPolicy::Ada,
        ..QuantizeOptions::from_choices(Recipe::Paper.choices())
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
            kv_cache: Default::default(),
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
