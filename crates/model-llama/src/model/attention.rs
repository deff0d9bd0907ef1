use burn::prelude::*;
use kernels::{KvStore, QuantBackend};

use super::linear::Linear;
use super::rope::{Rope, RowPositions};
use crate::linear_kind::LinearKind;

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

/// Keys and values of the positions seen so far, of one layer: stored as the backend chooses
/// ([`QuantBackend::KvCache`]; f16, f32 or Q8_0 on the host, see [`kernels::KvDtype`]).
pub type KvCache<B> = <B as QuantBackend>::KvCache;

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
        match cache {
            Some(cache) => self.attend_cached(q, k, v, cache),
            None => self.attend(q, k, v),
        }
    }

    /// Appends `k, v` to `cache` and attends `q` over everything it holds.
    fn attend_cached(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        cache.append(k, v);
        cache.attend(q, self.n_heads)
    }

    /// The input of `o_proj` for one new token of each of several sequences: `x: [1, n, hidden]`
    /// holds sequence `i`'s token in row `i`, which continues `caches[i]` at position
    /// `rows.positions()[i]` (the cache's length).
    ///
    /// The projections run once for all rows (one `M = n` product, which reads each weight
    /// once), and so do the rotation (tables selected once per step, [`RowPositions`]) and the
    /// attention (each row over its own cache, [`KvStore::attend_batch`]); only the
    /// cache writes are per sequence.
    pub fn context_batch(
        &self,
        x: Tensor<B, 3>,
        rows: &RowPositions<B>,
        caches: &mut [&mut KvCache<B>],
    ) -> Tensor<B, 3> {
        let n = x.dims()[1];
        assert_eq!(n, caches.len(), "one cache per row of the batch");
        assert!(
            caches
                .iter()
                .map(|c| c.len())
                .eq(rows.positions().iter().copied()),
            "each row continues its cache at the cache's length"
        );
        let q = rows.apply(self.q_proj.forward(x.clone()), self.n_heads);
        let k = rows.apply(self.k_proj.forward(x.clone()), self.n_kv_heads);
        let v = self.v_proj.forward(x);
        for (i, cache) in caches.iter_mut().enumerate() {
            let row = |t: &Tensor<B, 3>| t.clone().narrow(1, i, 1);
            cache.append(row(&k), row(&v));
        }
        let caches: Vec<&KvCache<B>> = caches.iter().map(|c| &**c).collect();
        KvStore::attend_batch(q, &caches, self.n_heads)
    }
}
