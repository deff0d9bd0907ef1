//! The seven linears of a decoder layer, named, and their shapes: the one vocabulary that
//! checkpoints, the model and the quantization pipeline share (it depends on nothing but the
//! configuration, so every module can import it one-way).

use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;

/// The seven linear layers of a LLaMA decoder layer, in the order AdaDim visits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// Module path inside a layer, as in Hugging Face checkpoints.
    pub fn module(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    pub fn short_name(self) -> &'static str {
        match self {
            LinearKind::Q => "q",
            LinearKind::K => "k",
            LinearKind::V => "v",
            LinearKind::O => "o",
            LinearKind::Gate => "gate",
            LinearKind::Up => "up",
            LinearKind::Down => "down",
        }
    }

    /// `model.layers.{layer}.{module}` (append `.weight` for the tensor name).
    pub fn hf_prefix(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.module())
    }
}

impl std::str::FromStr for LinearKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LinearKind::ALL
            .into_iter()
            .find(|k| {
                k.short_name() == s || k.module() == s || k.module().rsplit('.').next() == Some(s)
            })
            .ok_or_else(|| format!("unknown linear `{s}` (expected q, k, v, o, gate, up or down)"))
    }
}

/// `[out, in]` of a linear of the given kind.
pub fn linear_shape(config: &LlamaConfig, kind: LinearKind) -> [usize; 2] {
    let h = config.hidden_size;
    let kv = config.num_key_value_heads * config.head_dim();
    let f = config.intermediate_size;
    match kind {
        LinearKind::Q | LinearKind::O => [h, h],
        LinearKind::K | LinearKind::V => [kv, h],
        LinearKind::Gate | LinearKind::Up => [f, h],
        LinearKind::Down => [h, f],
    }
}
