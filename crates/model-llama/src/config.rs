use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// `rope_scaling` of type `llama3` (LLaMA 3.1+); other types are rejected at load time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "default_orig_ctx")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_orig_ctx() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_ctx() -> usize {
    2048
}

/// The LLaMA hyper-parameters, named as in Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The most positions a loaded model runs: `max_position_embeddings`, capped at the length
    /// of the rotary table the loader builds.
    pub fn context_length(&self) -> usize {
        self.max_position_embeddings
            .min(crate::model::MAX_ROPE_POSITIONS)
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err("num_attention_heads is not a multiple of num_key_value_heads".into());
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err("head_dim must be even for rotary embeddings".into());
        }
        if let Some(s) = &self.rope_scaling
            && s.rope_type != "llama3"
        {
            return Err(format!(
                "rope_scaling type `{}` is not supported (only llama3)",
                s.rope_type
            ));
        }
        Ok(())
    }

    /// Reads and validates a Hugging Face `config.json`. Only `LlamaForCausalLM` (or no
    /// `architectures` entry) is accepted.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::malformed(path, e.to_string()))?;
        if let Some(archs) = value.get("architectures").and_then(|a| a.as_array()) {
            let known = archs
                .iter()
                .filter_map(|a| a.as_str())
                .any(|a| a == "LlamaForCausalLM");
            if !known {
                return Err(ModelError::Unsupported {
                    path: path.into(),
                    what: "architecture",
                    value: format!("{archs:?}"),
                });
            }
        }
        let config: LlamaConfig = serde_json::from_value(value)
            .map_err(|e| ModelError::malformed(path, e.to_string()))?;
        config
            .validate()
            .map_err(|msg| ModelError::malformed(path, msg))?;
        Ok(config)
    }

    /// The HF `config.json` contents for this config (plus `architectures`/`model_type`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serializes");
        let obj = v.as_object_mut().expect("object");
        obj.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        obj.insert("model_type".into(), serde_json::json!("llama"));
        obj.insert("hidden_act".into(), serde_json::json!("silu"));
        obj.insert("head_dim".into(), serde_json::json!(self.head_dim()));
        v
    }
}
