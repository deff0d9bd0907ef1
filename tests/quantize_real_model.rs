//! The main job end to end on the shipped model, with a short calibration: quantize with
//! RTN-AdaDim, write the packed checkpoint and the fake-quant export, load both back, on the CPU
//! and (feature `wgpu`) through the CubeCL kernels on wgpu.

use std::path::Path;

use adadim::{DimPolicy, Method, Recipe, RunSpec};
use adadim_e2e::{Cpu, eval_tokens, smollm2};
use model_llama::TensorSource;
use model_llama::perplexity::perplexity;
use quant_core::GroupSize;
use test_assets::repo_asset;

/// Windows and their length for the wgpu comparison: lavapipe runs the model on the CPU. More
/// than `kernels::cpu::DIRECT_ROWS_PACKED` rows, so the CPU side takes its exact product (the
/// dequantized weight), not the int8 kernel's rounded activations.
#[cfg(feature = "wgpu")]
const WGPU_WINDOWS: (usize, usize) = (2, 256);

#[test]
fn quantized_model_is_worse_than_fp_and_packed_matches_fake_quant() {
    // Fail before the quantization when the wgpu half cannot run.
    #[cfg(feature = "wgpu")]
    let gpu = adadim_e2e::wgpu_device();

    let dir = tempfile::tempdir().unwrap();
    let spec = RunSpec {
        calib_samples: 8,
        calib_seqlen: 256,
        bits: 3,
        group_size: GroupSize::Len(64),
        recipe: Recipe::Paper,
        method: Some(Method::Rtn),
        dim: Some(DimPolicy::Ada),
        fake_quant: Some(dir.path().join("fake")),
        ..RunSpec::new(
            smollm2(),
            repo_asset("lee-news.txt"),
            dir.path().join("packed"),
        )
    };
    let report = adadim::run::<Cpu>(&spec, &Default::default()).unwrap();
    assert_eq!(report.linears.len(), 30 * 7);
    let ic: usize = report.ic_count.values().sum();
    eprintln!("per-IC linears: {ic} of 210 ({:?})", report.ic_count);
    assert!(
        ic > 0 && ic < 210,
        "AdaDim picks IC for some linears, not all"
    );
    let fake_quant = spec.fake_quant.as_ref().unwrap();

    // The tied head is stored once, in 8 bits, with the very values of the GGUF's Q8_0 table.
    let packed_dir = model_llama::packed::PackedDir::open(&spec.out)
        .unwrap()
        .unwrap();
    let head = packed_dir.packed_head().unwrap().expect("an 8-bit head");
    assert_eq!((head.bits, head.group_size), (8, quant_core::Q8_GROUP));
    let stored = model_llama::hf_dir::SafetensorsDir::open(&spec.out).unwrap();
    assert!(!stored.contains("model.embed_tokens.weight"));
    let source = model_llama::open_model(&spec.model).unwrap().source;
    let embedding = source.load("model.embed_tokens.weight").unwrap().data;
    assert!(
        head.dequantize() == embedding,
        "the 8-bit head differs from the source's embedding"
    );

    let device = Default::default();
    let ppl = |path: &Path, seqlen, windows| {
        let m = model_llama::open_model(path).unwrap();
        let model = m.load::<Cpu>(&device).unwrap();
        perplexity(&model, &eval_tokens(&m.tokenizer), seqlen, Some(windows))
            .unwrap()
            .perplexity
    };
    let fp = ppl(&spec.model, 2048, 2);
    let packed = ppl(&spec.out, 2048, 2);
    let fake = ppl(fake_quant, 2048, 2);
    eprintln!("perplexity over 2 windows: FP {fp:.3}, packed {packed:.3}, fake-quant {fake:.3}");
    assert!(
        packed.is_finite() && packed > fp,
        "packed {packed} vs FP {fp}"
    );
    // The fake-quant export rounds the dequantized weights to f16.
    assert!(
        (packed - fake).abs() / fake < 1e-3,
        "packed {packed} vs fake-quant {fake}"
    );

    #[cfg(feature = "wgpu")]
    {
        let (windows, seqlen) = WGPU_WINDOWS;
        let packed_cpu = ppl(&spec.out, seqlen, windows);
        packed_on_wgpu_matches_the_cpu(&spec.out, packed_cpu, &gpu);
    }
}

/// The packed checkpoint through the CubeCL kernels (`QuantLinear` on wgpu, every linear and the
/// head) against the same checkpoint on the CPU (`packed_cpu`, the same windows), which the test
/// above ties to the fake-quant export: the wgpu model computes the same function, and its
/// kernels the same products.
///
/// The fake-quant export itself is not run on wgpu: its dense head, `[seqlen, 576] × [576,
/// 49152]`, goes through burn's matmul, which CubeCL autotunes on first use with ten timed runs
/// of every candidate kernel; on lavapipe that took 9 of a cold CI run's 37 minutes.
#[cfg(feature = "wgpu")]
fn packed_on_wgpu_matches_the_cpu(
    packed_dir: &Path,
    packed_cpu: f64,
    device: &burn::backend::wgpu::WgpuDevice,
) {
    use adadim_e2e::Gpu;
    use kernels::WeightKind;
    use model_llama::{Linear, LinearKind};

    let (windows, seqlen) = WGPU_WINDOWS;
    let start = std::time::Instant::now();
    let m = model_llama::open_model(packed_dir).unwrap();
    let model = m.load::<Gpu>(device).unwrap();
    let linears = model
        .layers
        .iter()
        .flat_map(|l| LinearKind::ALL.map(|kind| l.linear(kind)));
    for (i, linear) in linears.chain([&model.lm_head]).enumerate() {
        assert!(
            matches!(linear, Linear::Quant(q) if matches!(q.kind(), WeightKind::Packed { .. })),
            "linear {i} of the packed model does not run on the packed kernels"
        );
    }
    let report = perplexity(&model, &eval_tokens(&m.tokenizer), seqlen, Some(windows));
    let packed = report.unwrap().perplexity;
    eprintln!(
        "perplexity over {windows} windows of {seqlen}: wgpu packed {packed:.4} ({:.1} s with \
         loading), CPU packed {packed_cpu:.4}",
        start.elapsed().as_secs_f64()
    );
    assert!(packed.is_finite(), "wgpu packed perplexity {packed}");
    assert!(
        (packed - packed_cpu).abs() / packed_cpu < 1e-3,
        "packed: wgpu {packed} vs CPU {packed_cpu}"
    );
}

/// On a device with a largest buffer (lavapipe's storage-buffer binding), a layer whose input
/// Gram matrix cannot fit one buffer is refused before any weight is read, naming the tensor
/// and the limit: the empty checkpoint below would fail on its first read otherwise.
#[cfg(feature = "wgpu")]
#[test]
fn quantizing_on_wgpu_refuses_a_gram_matrix_larger_than_the_device_buffer() {
    use adadim::{AdadimError, QuantizeOptions, quantize_model};
    use kernels::QuantBackend;

    let gpu = adadim_e2e::wgpu_device();
    let limit = adadim_e2e::Gpu::device_limits(&gpu)
        .max_buffer_bytes
        .expect("wgpu reports its largest buffer");
    // The smallest multiple of 64 whose f32 Gram exceeds the limit.
    let ffn = ((limit as f64 / 4.0).sqrt() as usize / 64 + 1) * 64;
    let config = model_llama::LlamaConfig {
        hidden_size: 64,
        intermediate_size: ffn,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: 1,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        vocab_size: 97,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    };
    let src = model_llama::MemorySource {
        path: "no-weights".into(),
        config,
        tensors: Default::default(),
    };
    let calib = vec![(0..32).collect::<Vec<u32>>(); 2];
    let opts = QuantizeOptions {
        group_size: GroupSize::Len(32),
        ..Default::default()
    };
    let Err(e) = quantize_model::<adadim_e2e::Gpu>(&src, &calib, &opts, &gpu) else {
        panic!("a Gram matrix larger than the device's largest buffer was accepted");
    };
    let msg = e.to_string();
    assert!(matches!(e, AdadimError::DeviceLimit(_)), "{msg}");
    assert!(
        msg.contains(&format!(
            "Gram matrix of mlp.down_proj's inputs ([{ffn}, {ffn}])"
        )) && msg.contains(&format!("{limit} bytes")),
        "{msg}"
    );
}
