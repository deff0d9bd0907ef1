//! A GGUF LLaMA file seen as a Hugging Face checkpoint: HF tensor names, HF row order for Q/K,
//! and a [`LlamaConfig`] built from the `llama.*` metadata.

use std::collections::HashMap;
use std::path::Path;

use super::reader::GgufFile;
use crate::checkpoint::{HostTensor, TensorSource};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::tokenizer::LlamaTokenizer;

/// HF per-layer suffix ↔ GGUF per-layer suffix.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The GGUF name of a Hugging Face LLaMA tensor name (`None` if it is not one).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some((*g).to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = LAYER_NAMES.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// Which rotary-permuted projection a HF name is, with its head count.
fn rotary_heads(hf: &str, config: &LlamaConfig) -> Option<usize> {
    if hf.ends_with(".self_attn.q_proj.weight") {
        Some(config.num_attention_heads)
    } else if hf.ends_with(".self_attn.k_proj.weight") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's rotary row permutation of a `[rows, cols]` Q or K weight.
///
/// `convert_hf_to_gguf.py` reorders each head's rows from HF's "first half / second half"
/// rotary layout to interleaved pairs: `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2)`,
/// i.e. GGUF row `h·hd + 2i + s` holds HF row `h·hd + s·hd/2 + i`. This maps it back.
///
/// # Panics
/// If `rows` is not a multiple of `2 · n_head` or `data.len() != rows · cols` (callers check
/// the tensor's shape against the config first).
pub fn unpermute_rotary_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert!(n_head > 0 && rows.is_multiple_of(2 * n_head) && data.len() == rows * cols);
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for (hf_row, dst) in out.chunks_exact_mut(cols).enumerate() {
        let (h, r) = (hf_row / head_dim, hf_row % head_dim);
        let (s, i) = (r / half, r % half);
        let gguf_row = h * head_dim + 2 * i + s;
        dst.copy_from_slice(&data[gguf_row * cols..(gguf_row + 1) * cols]);
    }
    out
}

/// Builds the [`LlamaConfig`] from a GGUF file's metadata (`general.architecture` must be
/// `llama`).
pub fn config_from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
    let path = file.path();
    let arch = file.require_str("general.architecture")?;
    if arch != "llama" {
        return Err(ModelError::Unsupported {
            path: path.into(),
            what: "architecture",
            value: arch.to_string(),
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(v) = file.get(&key("rope.scaling.type")) {
        let kind = v.as_str().unwrap_or("?");
        if kind != "none" {
            return Err(ModelError::Unsupported {
                path: path.into(),
                what: "rope scaling",
                value: kind.to_string(),
            });
        }
    }
    let vocab_size = match file.get("tokenizer.ggml.tokens") {
        Some(tokens) => tokens
            .as_array()
            .ok_or_else(|| file.wrong_type("tokenizer.ggml.tokens", "an array"))?
            .len(),
        None => file.require_usize(&key("vocab_size"))?,
    };
    let token_id = |k: &str| -> Result<Option<u32>> {
        file.get(k)
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| file.wrong_type(k, "a token id"))
            })
            .transpose()
    };
    let num_attention_heads = file.require_usize(&key("attention.head_count"))?;
    let config = LlamaConfig {
        hidden_size: file.require_usize(&key("embedding_length"))?,
        intermediate_size: file.require_usize(&key("feed_forward_length"))?,
        num_attention_heads,
        num_key_value_heads: match file.get(&key("attention.head_count_kv")) {
            Some(_) => file.require_usize(&key("attention.head_count_kv"))?,
            None => num_attention_heads,
        },
        num_hidden_layers: file.require_usize(&key("block_count"))?,
        rms_norm_eps: file.require_f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: match file.get(&key("rope.freq_base")) {
            Some(_) => file.require_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        },
        rope_scaling: None,
        max_position_embeddings: match file.get(&key("context_length")) {
            Some(_) => file.require_usize(&key("context_length"))?,
            None => 2048,
        },
        vocab_size,
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
    };
    config
        .validate()
        .map_err(|msg| ModelError::malformed(path, msg))?;
    // Models whose head size is not hidden/heads (or that rotate only part of it) would need
    // a different attention layout.
    for (k, expected) in [
        ("rope.dimension_count", config.head_dim()),
        ("attention.key_length", config.head_dim()),
        ("attention.value_length", config.head_dim()),
    ] {
        if let Some(v) = file.get(&key(k))
            && v.as_u64() != Some(expected as u64)
        {
            return Err(ModelError::Unsupported {
                path: path.into(),
                what: "head layout",
                value: format!("{arch}.{k} = {v:?}, expected {expected}"),
            });
        }
    }
    Ok(config)
}

/// A GGUF LLaMA checkpoint, read tensor by tensor under Hugging Face names.
pub struct GgufCheckpoint {
    file: GgufFile,
    config: LlamaConfig,
    /// HF name → GGUF name, for the tensors present in the file.
    names: HashMap<String, String>,
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        // From the tensors present, not from the config's layer count: that count is
        // untrusted, and naming 2^40 layers would never finish.
        let names = file
            .tensors()
            .iter()
            .filter_map(|t| {
                hf_name(&t.name, config.num_hidden_layers).map(|hf| (hf, t.name.clone()))
            })
            .collect();
        Ok(Self {
            file,
            config,
            names,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The tokenizer stored in the file's `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> Result<LlamaTokenizer> {
        LlamaTokenizer::from_gguf(&self.file)
    }

    /// The Hugging Face names of the tensors present, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.names.keys().cloned().collect();
        names.sort();
        names
    }
}

/// The Hugging Face name of a GGUF tensor of a LLaMA with `layers` layers (`None` if it is
/// not one); the inverse of [`gguf_name`].
fn hf_name(gguf: &str, layers: usize) -> Option<String> {
    if let Some((h, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some((*h).to_string());
    }
    let (digits, suffix) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = digits.parse().ok()?;
    let (h, _) = LAYER_NAMES.iter().find(|(_, g)| *g == suffix)?;
    // Only the spelling `gguf_name` gives (`blk.1`, not `blk.01` or `blk.+1`) names the tensor.
    (layer < layers && layer.to_string() == digits).then(|| format!("model.layers.{layer}.{h}"))
}

impl TensorSource for GgufCheckpoint {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let gguf = self
            .names
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path().to_path_buf(),
                name: name.to_string(),
            })?;
        let mut t = self.file.tensor_f32(gguf)?;
        if let Some(n_head) = rotary_heads(name, &self.config) {
            let expected = [n_head * self.config.head_dim(), self.config.hidden_size];
            if t.shape != expected {
                return Err(ModelError::ShapeMismatch {
                    path: self.path().to_path_buf(),
                    name: name.to_string(),
                    got: t.shape,
                    expected: expected.to_vec(),
                });
            }
            t.data = unpermute_rotary_rows(&t.data, expected[0], expected[1], n_head);
        }
        Ok(t)
    }
}
