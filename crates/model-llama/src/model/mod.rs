//! The LLaMA decoder in Burn, generic over the backend.
//!
//! Besides the whole-model forward, every piece is callable on its own (embedding, one decoder
//! layer with its linears' inputs captured, the attention and MLP sub-blocks, the head) because
//! the AdaDim pipeline walks the model one layer at a time.

mod attention;
mod layer;
mod linear;
mod mlp;
mod norm;
mod rope;

pub use attention::{Attention, KvCache};
pub use layer::{DecoderLayer, LayerInputs, LayerTrace};
pub use linear::Linear;
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rope::{Rope, RowPositions, inv_freq};

use burn::prelude::*;
use kernels::{KvDtype, KvStore, QuantBackend};

use crate::config::LlamaConfig;

/// Rotary tables longer than this are not precomputed (positions beyond it are rejected).
pub const MAX_ROPE_POSITIONS: usize = 32_768;

/// The most KV-cache memory [`Llama::new_cache_with_capacity`] sets aside per sequence.
pub const CACHE_RESERVE_BYTES: usize = 64 << 20;

/// A LLaMA causal language model.
#[derive(Clone, Debug)]
pub struct Llama<B: QuantBackend> {
    pub config: LlamaConfig,
    /// `[vocab, hidden]`
    pub embed_tokens: Tensor<B, 2>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    pub rope: Rope<B>,
}

impl<B: QuantBackend> Llama<B> {
    pub fn device(&self) -> B::Device {
        self.embed_tokens.device()
    }

    /// Token ids `[batch, seq]` → hidden states `[batch, seq, hidden]`.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.embed_tokens.clone(), tokens)
    }

    /// Final norm and language-model head: hidden states → logits `[.., vocab]`.
    pub fn head<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.lm_head.forward(self.norm.forward(x))
    }

    /// Logits `[batch, seq, vocab]` of a fresh sequence.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.head(self.hidden_states(tokens, None))
    }

    /// Last hidden states (before the final norm); with a cache, `tokens` continue the cached
    /// sequence and the cache is extended.
    pub fn hidden_states(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut [KvCache<B>]>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed(tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c[i]);
            x = layer.forward(x, &self.rope, layer_cache);
        }
        x
    }

    /// Last hidden states `[1, R, hidden]` of new tokens of several sequences: sequence `i`
    /// contributes `spans[i]` (at least 1) consecutive ids of `tokens: [1, R]`, which continue
    /// the sequence cached in `caches[i]` (one entry per layer); the caches are extended. The
    /// linears run once for all rows, as `M = R` products, so one forward can hold a decode
    /// step's token of each running sequence beside a chunk of a prompt (chunked prefill).
    pub fn hidden_states_batch(
        &self,
        tokens: Tensor<B, 2, Int>,
        caches: &mut [&mut [KvCache<B>]],
        spans: &[usize],
    ) -> Tensor<B, 3> {
        assert_eq!(spans.len(), caches.len(), "one span per cache");
        assert!(spans.iter().all(|&n| n > 0), "every span holds a token");
        let rows: usize = spans.iter().sum();
        assert_eq!(tokens.dims(), [1, rows], "the spans cover the tokens");
        // Every layer's cache of a sequence holds the same positions.
        let positions: Vec<usize> = caches
            .iter()
            .zip(spans)
            .flat_map(|(c, &n)| {
                let start = c.first().map_or(0, KvStore::len);
                start..start + n
            })
            .collect();
        let rows = self.rope.at_positions(&positions);
        let mut x = self.embed(tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let mut layer_caches: Vec<&mut KvCache<B>> =
                caches.iter_mut().map(|c| &mut c[i]).collect();
            x = layer.forward_batch(x, &rows, &mut layer_caches, spans);
        }
        x
    }

    /// Bytes a sequence's KV cache holds per position: keys and values of every layer, stored
    /// as `dtype` (or as this backend's cache stores them).
    pub fn kv_bytes_per_position(&self, dtype: KvDtype) -> usize {
        let c = &self.config;
        let row_bytes = <KvCache<B> as KvStore<B>>::row_bytes(dtype, c.head_dim());
        2 * c.num_key_value_heads * row_bytes * self.layers.len()
    }

    /// An empty KV cache storing `dtype`, one entry per layer.
    pub fn new_cache(&self, dtype: KvDtype) -> Vec<KvCache<B>> {
        self.new_cache_with_capacity(dtype, 0)
    }

    /// [`Llama::new_cache`] whose buffers are allocated once for up to `positions` positions,
    /// for a sequence whose greatest length is known in advance. At most
    /// [`CACHE_RESERVE_BYTES`] are set aside (keys and values of every layer); a longer
    /// sequence grows its cache as it goes, so a request that may run long but stops early does
    /// not hold memory it never uses.
    pub fn new_cache_with_capacity(&self, dtype: KvDtype, positions: usize) -> Vec<KvCache<B>> {
        let c = &self.config;
        let reserve = CACHE_RESERVE_BYTES / self.kv_bytes_per_position(dtype).max(1);
        let positions = positions.min(reserve);
        let cache = KvStore::new(dtype, c.num_key_value_heads, positions, &self.device());
        vec![cache; self.layers.len()]
    }
}
