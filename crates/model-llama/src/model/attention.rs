use std::ops::Range;

use burn::prelude::*;
use kernels::QuantBackend;

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

/// Keys and values of the positions seen so far, per layer.
///
/// The buffers grow geometrically and new positions are written in place, so a decode step
/// copies one row per layer instead of the whole history (which concatenation would).
#[derive(Clone, Debug, Default)]
pub struct KvCache<B: QuantBackend> {
    /// `[batch, capacity, kv_heads·head_dim]`; rows `len..` are unused.
    k: Option<Tensor<B, 3>>,
    v: Option<Tensor<B, 3>>,
    len: usize,
    /// Positions the first allocation holds (at least), when the caller knows how long the
    /// sequence can get: growing copies the history and faults in fresh pages at every doubling.
    reserve: usize,
}

impl<B: QuantBackend> KvCache<B> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An empty cache whose first allocation holds `positions` (more only if needed).
    pub fn with_capacity(positions: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            reserve: positions,
        }
    }

    /// Appends `k, v: [b, t, kv_heads·head_dim]` and returns the buffers, whose first
    /// [`KvCache::len`] rows are all keys and values so far.
    fn append(&mut self, k: Tensor<B, 3>, v: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let rows = self.len..self.len + k.dims()[1];
        self.len = rows.end;
        (
            write_rows(&mut self.k, k, rows.clone(), self.reserve),
            write_rows(&mut self.v, v, rows, self.reserve),
        )
    }
}

/// Writes `new` into rows `rows` of `buf` (growing it if needed, to at least `reserve` rows)
/// and returns the buffer, whose rows `..rows.end` are valid. Not a slice of it: burn-ndarray
/// copies slices, and attention reads the prefix in place
/// ([`QuantBackend::causal_attention_prefix`]).
fn write_rows<B: QuantBackend>(
    buf: &mut Option<Tensor<B, 3>>,
    new: Tensor<B, 3>,
    rows: Range<usize>,
    reserve: usize,
) -> Tensor<B, 3> {
    let [b, _, d] = new.dims();
    let kept = 0..rows.start;
    let full = match buf.take() {
        Some(old) if old.dims()[1] >= rows.end => old,
        old => {
            // At least doubling keeps the total copying linear in the sequence length.
            let capacity = rows
                .end
                .max(2 * old.as_ref().map_or(0, |o| o.dims()[1]))
                .max(64)
                .max(reserve);
            let grown = Tensor::zeros([b, capacity, d], &new.device());
            match old {
                Some(old) => {
                    grown.slice_assign([0..b, kept.clone(), 0..d], old.slice([0..b, kept, 0..d]))
                }
                None => grown,
            }
        }
    };
    // The handles given out at earlier steps are gone, so this is the only one and the
    // backends write in place.
    let full = full.slice_assign([0..b, rows, 0..d], new);
    *buf = Some(full.clone());
    full
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
        let (k, v) = cache.append(k, v);
        B::causal_attention_prefix(q, k, v, cache.len(), self.n_heads, self.n_kv_heads)
    }

    /// The input of `o_proj` for one new token of each of several sequences: `x: [1, n, hidden]`
    /// holds sequence `i`'s token in row `i`, which continues `caches[i]` at position
    /// `rows.positions()[i]` (the cache's length).
    ///
    /// The projections run once for all rows (one `M = n` product, which reads each weight
    /// once), and so do the rotation (tables selected once per step, [`RowPositions`]) and the
    /// attention (each row over its own cache, [`QuantBackend::decode_attention`]); only the
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
        let kv: Vec<_> = caches
            .iter_mut()
            .enumerate()
            .map(|(i, cache)| {
                let row = |t: &Tensor<B, 3>| t.clone().narrow(1, i, 1);
                let (k, v) = cache.append(row(&k), row(&v));
                (k, v, cache.len())
            })
            .collect();
        B::decode_attention(q, &kv, self.n_heads, self.n_kv_heads)
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    use super::*;

    /// Appending in chunks (a prefill, single tokens, a chunk that forces a growth) leaves
    /// exactly the concatenation of everything appended so far in the buffers' valid rows.
    #[test]
    fn cache_matches_concatenation() {
        let device = Default::default();
        let mut cache = KvCache::<NdArray>::default();
        let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
        for t in [5, 1, 1, 70, 1, 60, 1] {
            let k = Tensor::<NdArray, 3>::random([1, t, 6], Distribution::Default, &device);
            let v = Tensor::<NdArray, 3>::random([1, t, 6], Distribution::Default, &device);
            all_k.push(k.clone());
            all_v.push(v.clone());
            let (ck, cv) = cache.append(k, v);
            assert!(cache.len() <= ck.dims()[1]);
            let (ck, cv) = (ck.narrow(1, 0, cache.len()), cv.narrow(1, 0, cache.len()));
            ck.into_data()
                .assert_eq(&Tensor::cat(all_k.clone(), 1).into_data(), true);
            cv.into_data()
                .assert_eq(&Tensor::cat(all_v.clone(), 1).into_data(), true);
        }
        assert_eq!(cache.len(), 139);
    }
}
