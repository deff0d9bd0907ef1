//! Shared by the adadim integration tests.

use model_llama::LlamaConfig;

/// A tiny LLaMA (hidden 64, GQA 4/2 heads, vocab 97) with `layers` decoder layers.
pub fn tiny_config(layers: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: layers,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        vocab_size: 97,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}
