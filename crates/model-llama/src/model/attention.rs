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
        let [q, k, v] = self.project_qkv(x);
        (
            rope.apply(q, self.n_heads, start),
            rope.apply(k, self.n_kv_heads, start),
            v,
        )
    }

    /// `x`'s q, k and v projections, not rotated, in one [`Linear::forward_many`].
    fn project_qkv(&self, x: Tensor<B, 3>) -> [Tensor<B, 3>; 3] {
        Linear::forward_many(x, &[&self.q_proj, &self.k_proj, &self.v_proj])
            .try_into()
            .expect("three projections")
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

    /// The input of `o_proj` for new tokens of several sequences: `x: [1, R, hidden]` holds
    /// sequence `i`'s `spans[i]` tokens in consecutive rows, which continue `caches[i]` at the
    /// cache's length (`rows` gives each row its position).
    ///
    /// The projections run once for all rows (one `M = R` product, which reads each weight
    /// once), and so does the rotation (tables selected once per step, [`RowPositions`]).
    /// Consecutive one-row spans (decode steps) share one attention call
    /// ([`KvStore::attend_batch`]: each row over its own cache); a longer span (a chunk of a
    /// prompt) attends causally over its own cache, as a whole prompt would. The cache writes
    /// take one call too ([`KvStore::append_spans`]).
    pub fn context_batch(
        &self,
        x: Tensor<B, 3>,
        rows: &RowPositions<B>,
        caches: &mut [&mut KvCache<B>],
        spans: &[usize],
    ) -> Tensor<B, 3> {
        assert_eq!(spans.len(), caches.len(), "one span per cache");
        assert!(
            caches
                .iter()
                .zip(spans)
                .flat_map(|(c, &n)| c.len()..c.len() + n)
                .eq(rows.positions().iter().copied()),
            "each span continues its cache at the cache's length"
        );
        let [q, k, v] = self.project_qkv(x);
        let (q, k) = (rows.apply(q, self.n_heads), rows.apply(k, self.n_kv_heads));
        let starts: Vec<usize> = spans
            .iter()
            .scan(0, |at, &n| {
                *at += n;
                Some(*at - n)
            })
            .collect();
        KvStore::append_spans(caches, k, v, spans);
        let mut parts = Vec::new();
        let mut i = 0;
        while i < spans.len() {
            let (start, n) = (starts[i], spans[i]);
            if n > 1 {
                parts.push(caches[i].attend(q.clone().narrow(1, start, n), self.n_heads));
                i += 1;
                continue;
            }
            let run = spans[i..].iter().take_while(|&&n| n == 1).count();
            let run_caches: Vec<&KvCache<B>> = caches[i..i + run].iter().map(|c| &**c).collect();
            let q_run = q.clone().narrow(1, start, run);
            parts.push(KvStore::attend_batch(q_run, &run_caches, self.n_heads));
            i += run;
        }
        match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Tensor::cat(parts, 1),
        }
    }
}
