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
    /// `[batch, len, kv_heads·head_dim]`
    pub k: Option<Tensor<B, 3>>,
    pub v: Option<Tensor<B, 3>>,
}

impl<B: QuantBackend> KvCache<B> {
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, k: Tensor<B, 3>, v: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let cat = |old: Option<Tensor<B, 3>>, new: Tensor<B, 3>| match old {
            Some(old) => Tensor::cat(vec![old, new], 1),
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
    /// One projection of `x` (q, k or v), rotated for q and k, for inputs at positions
    /// `start..`: `[b, t, heads·head_dim]`.
    pub fn project(
        &self,
        kind: LinearKind,
        linear: &Linear<B>,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        start: usize,
    ) -> Tensor<B, 3> {
        let heads = match kind {
            LinearKind::Q => self.n_heads,
            LinearKind::K | LinearKind::V => self.n_kv_heads,
            other => panic!("{other:?} is not an attention input projection"),
        };
        let h = linear.forward(x);
        match kind {
            LinearKind::V => h,
            _ => rope.apply(h, heads, start),
        }
    }

    /// Projected and rotated `q: [b, t, heads·d]`, `k, v: [b, t, kv_heads·d]` for inputs at
    /// positions `start..start + t`.
    pub fn qkv(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        start: usize,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
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
    pub fn attend(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
        B::causal_attention(q, k, v, self.n_heads, self.n_kv_heads)
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
