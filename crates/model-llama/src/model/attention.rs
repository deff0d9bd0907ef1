use burn::prelude::*;
use kernels::QuantBackend;

use super::layer::LinearKind;
use super::linear::Linear;
use super::rope::Rope;

/// Grouped-query self-attention.
#[derive(Clone, Debug)]
pub struct Attention<B: QuantBackend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Keys and values of the positions seen so far, per layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache<B: QuantBackend> {
    /// `[batch, kv_heads, len, head_dim]`
    pub k: Option<Tensor<B, 4>>,
    pub v: Option<Tensor<B, 4>>,
}

impl<B: QuantBackend> KvCache<B> {
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let cat = |old: Option<Tensor<B, 4>>, new: Tensor<B, 4>| match old {
            Some(old) => Tensor::cat(vec![old, new], 2),
            None => new,
        };
        let k = cat(self.k.take(), k);
        let v = cat(self.v.take(), v);
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        (k, v)
    }
}

impl<B: QuantBackend> Attention<B> {
    fn split_heads(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [b, t, _] = x.dims();
        x.reshape([b, t, heads, self.head_dim]).swap_dims(1, 2)
    }

    /// One projection of `x` (q, k or v) split into heads, rotated for q and k, for inputs at
    /// positions `start..`: `[b, heads, t, head_dim]`.
    pub fn project(
        &self,
        kind: LinearKind,
        linear: &Linear<B>,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        start: usize,
    ) -> Tensor<B, 4> {
        let heads = match kind {
            LinearKind::Q => self.n_heads,
            LinearKind::K | LinearKind::V => self.n_kv_heads,
            other => panic!("{other:?} is not an attention input projection"),
        };
        let h = self.split_heads(linear.forward(x), heads);
        match kind {
            LinearKind::V => h,
            _ => rope.apply(h, start),
        }
    }

    /// Projected and rotated `q: [b, heads, t, d]`, `k, v: [b, kv_heads, t, d]` for inputs at
    /// positions `start..start + t`.
    pub fn qkv(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        start: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let p = |kind, linear| self.project(kind, linear, x.clone(), rope, start);
        (
            p(LinearKind::Q, &self.q_proj),
            p(LinearKind::K, &self.k_proj),
            p(LinearKind::V, &self.v_proj),
        )
    }

    /// Causal attention of queries at positions `k_len − t_q .. k_len` over all `k_len` keys
    /// (see [`QuantBackend::causal_attention`]). Returns the context `[b, t_q, hidden]` (the
    /// input of `o_proj`).
    pub fn attend(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 3> {
        B::causal_attention(q, k, v)
    }

    /// The attention sub-block: `o_proj(attend(qkv(x)))`, with an optional KV cache.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.o_proj.forward(self.context(x, rope, cache))
    }

    /// The input of `o_proj`.
    pub fn context(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let start = cache.as_ref().map_or(0, |c| c.len());
        let (q, k, v) = self.qkv(x, rope, start);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        self.attend(q, k, v)
    }
}
