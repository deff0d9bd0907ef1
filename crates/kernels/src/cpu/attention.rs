//! Causal grouped-query attention on host memory, fused: scores, softmax and the weighted sum
//! of values run per block of queries, and nothing the causal mask hides is exponentiated.
//!
//! Composed from tensor ops, one attention call on the CPU allocates and rewrites the
//! `queries × keys` score matrix five times (scale, mask, max, exp, normalise) and copies the
//! head-split operands into contiguous buffers before each matmul; that was most of a forward
//! pass's time. Here each task owns [`QUERY_BLOCK`] queries of one sequence, multiplies the
//! strided head views in place (see [`super::dense`]) and keeps its scores in one scratch buffer.

use rayon::prelude::*;

use super::activation::{HeadRows, attend_group, softmax_in_place};
use super::dense::{MatMut, MatRef, matmul};
use super::kv::{HostKv, Rows};

/// Queries per task. The block's scores (`block × keys` floats) stay in cache, and the
/// masked triangle of the diagonal block, which the matmuls still compute, is `block/2` keys
/// per query: small against the average of `positions/2` (about 10% at 512 positions).
pub const QUERY_BLOCK: usize = 64;

/// A read-only `[batch, heads, positions, head_dim]` view with element strides.
#[derive(Clone, Copy, Debug)]
pub struct HeadsView<'a> {
    data: &'a [f32],
    dims: [usize; 4],
    strides: [usize; 4],
}

impl<'a> HeadsView<'a> {
    /// Panics if an element of the view lies past the end of `data`.
    pub fn new(data: &'a [f32], dims: [usize; 4], strides: [usize; 4]) -> Self {
        let last: usize = dims
            .iter()
            .zip(&strides)
            .map(|(&n, &s)| n.saturating_sub(1) * s)
            .sum();
        assert!(
            dims.contains(&0) || last < data.len(),
            "a {dims:?} view with strides {strides:?} does not fit in {} elements",
            data.len()
        );
        Self {
            data,
            dims,
            strides,
        }
    }

    /// A row-major view.
    pub fn contiguous(data: &'a [f32], dims: [usize; 4]) -> Self {
        let [_, h, t, d] = dims;
        Self::new(data, dims, [h * t * d, t * d, d, 1])
    }

    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Positions `first..first + count` of head `head` in sequence `batch`: a `count × head_dim`
    /// matrix.
    fn rows(&self, batch: usize, head: usize, first: usize, count: usize) -> MatRef<'a> {
        let [s0, s1, s2, s3] = self.strides;
        let start = batch * s0 + head * s1 + first * s2;
        MatRef::new(&self.data[start..], count, self.dims[3], s2, s3)
    }

    /// The transpose of [`Self::rows`]: `head_dim × count`.
    fn cols(&self, batch: usize, head: usize, count: usize) -> MatRef<'a> {
        let [s0, s1, s2, s3] = self.strides;
        MatRef::new(
            &self.data[batch * s0 + head * s1..],
            self.dims[3],
            count,
            s3,
            s2,
        )
    }
}

/// `softmax(q·kᵀ/√d + causal mask)·v` for every head, written to `out: [batch, t_q, heads·d]`
/// (the input of `o_proj`).
///
/// `q: [b, heads, t_q, d]`, `k, v: [b, kv_heads, t_k, d]` with `t_k ≥ t_q`: the queries are the
/// last `t_q` positions of the `t_k` keys (decoding with a cache), and query head `h` reads
/// key/value head `h / (heads / kv_heads)`. Panics on inconsistent shapes.
pub fn causal_attention(q: HeadsView, k: HeadsView, v: HeadsView, out: &mut [f32]) {
    let [b, heads, t_q, d] = q.dims;
    let [kb, kv_heads, t_k, kd] = k.dims;
    assert!(
        kb == b && kd == d && v.dims == k.dims,
        "q {:?}, k {:?} and v {:?} do not match",
        q.dims,
        k.dims,
        v.dims
    );
    assert!(
        kv_heads > 0 && heads % kv_heads == 0 && t_k >= t_q,
        "q {:?} cannot attend over k {:?}",
        q.dims,
        k.dims
    );
    let row = heads * d;
    assert_eq!(out.len(), b * t_q * row, "output buffer has the wrong size");
    if out.is_empty() {
        return;
    }
    let rep = heads / kv_heads;
    let offset = t_k - t_q;
    let scale = 1.0 / (d as f32).sqrt();
    let heads_adjacent = q.strides[1] == d && q.strides[3] == 1;
    if t_q == 1 && heads_adjacent && rows_alike(&k, &v) {
        return decode_step(q, k, v, scale, out);
    }
    out.par_chunks_mut(t_q * row)
        .enumerate()
        .for_each(|(batch, seq_out)| {
            seq_out
                .par_chunks_mut(QUERY_BLOCK * row)
                .enumerate()
                .for_each_init(Vec::new, |scores, (block, block_out)| {
                    let first = block * QUERY_BLOCK;
                    let n_q = block_out.len() / row;
                    let visible = offset + first + n_q;
                    scores.resize(n_q * visible, 0.0);
                    for h in 0..heads {
                        let kvh = h / rep;
                        matmul(
                            MatMut::row_major(scores, n_q, visible),
                            q.rows(batch, h, first, n_q),
                            k.cols(batch, kvh, visible),
                            scale,
                            false,
                        );
                        for (i, s) in scores.chunks_exact_mut(visible).enumerate() {
                            let (seen, hidden) = s.split_at_mut(offset + first + i + 1);
                            softmax_in_place(seen);
                            hidden.fill(0.0);
                        }
                        matmul(
                            MatMut::new(&mut block_out[h * d..], n_q, d, row, 1),
                            MatRef::row_major(scores, n_q, visible),
                            v.rows(batch, kvh, 0, visible),
                            1.0,
                            false,
                        );
                    }
                });
        });
}

/// [`causal_attention`] of one query per sequence (a decode step), its heads adjacent and each
/// key and value row contiguous: each `(sequence, key/value head)` is [`attend_group`] over
/// all `t_k` keys for its `rep` query heads, which are adjacent in `q` and in `out`. Two `gemm`
/// products per head cost more in setup than this work, and a block of one query kept a
/// step's attention on one thread.
fn decode_step(q: HeadsView, k: HeadsView, v: HeadsView, scale: f32, out: &mut [f32]) {
    let [_, heads, _, d] = q.dims;
    let [_, kv_heads, t_k, _] = k.dims;
    let rep = heads / kv_heads;
    let work = out.len() * t_k;
    attend_groups(out, rep * d, work, |bg, o, scores| {
        let (batch, g) = (bg / kv_heads, bg % kv_heads);
        let q_at = batch * q.strides[0] + g * rep * q.strides[1];
        let kv = head_rows(&k, &v, batch, g);
        attend_group(&q.data[q_at..q_at + rep * d], kv, rep, scale, scores, o);
    });
}

/// One decode step of `n` sequences with separate KV caches: row `i` of `q` (`n` rows of
/// `heads·d`, rotated) attends over every position of `kv[i]` (one sequence each), and the
/// context is written to row `i` of `out`. One call for the whole batch, so that its
/// `n · kv_heads` independent pieces of work share the threads; a call per sequence ran each on
/// one thread, or split three heads over two.
///
/// Panics if a cache holds more than one sequence or the sizes disagree.
pub fn decode_attention(q: &[f32], kv: &[&HostKv], heads: usize, out: &mut [f32]) {
    let n = kv.len();
    assert!(n > 0 && heads > 0, "no sequences or no heads");
    let row = q.len() / n;
    let d = row / heads;
    let [_, kv_heads, _, _] = kv[0].dims();
    assert!(
        q.len() == n * heads * d && out.len() == q.len() && heads.is_multiple_of(kv_heads),
        "{n} queries of {heads} heads in {} values do not fit an output of {}",
        q.len(),
        out.len()
    );
    for cache in kv {
        let [b, h, _, kd] = cache.dims();
        assert!(
            b == 1 && h == kv_heads && kd == d,
            "a cache of {:?} is not one sequence of {kv_heads} heads of {d}",
            cache.dims()
        );
    }
    let rep = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let work = kv.iter().map(|c| c.len()).sum::<usize>() * row;
    attend_groups(out, rep * d, work, |ig, o, scores| {
        let (i, g) = (ig / kv_heads, ig % kv_heads);
        let q = &q[i * row + g * rep * d..][..rep * d];
        match kv[i].head_rows(0, g) {
            Rows::F32(rows) => attend_group(q, rows, rep, scale, scores, o),
            Rows::F16(rows) => attend_group(q, rows, rep, scale, scores, o),
            Rows::Q8(rows) => attend_group(q, rows, rep, scale, scores, o),
        }
    });
}

/// Key and value rows contiguous, and as far apart in both buffers.
fn rows_alike(k: &HeadsView, v: &HeadsView) -> bool {
    k.strides[2] == v.strides[2] && k.strides[3] == 1 && v.strides[3] == 1
}

/// The rows of key/value head `g` of sequence `batch`.
fn head_rows<'a>(k: &HeadsView<'a>, v: &HeadsView<'a>, batch: usize, g: usize) -> HeadRows<'a> {
    let at = |x: &HeadsView<'_>| batch * x.strides[0] + g * x.strides[1];
    HeadRows {
        k: &k.data[at(k)..],
        v: &v.data[at(v)..],
        stride: k.strides[2],
        len: k.dims[2],
    }
}

/// Multiply-adds below which a decode step's heads run on the calling thread: rayon's hand-off
/// costs about as much as a few tens of thousands of them.
const PARALLEL_DECODE_WORK: usize = 1 << 16;

/// Runs `group(j, out_j, scratch)` for each chunk `out_j` of `chunk` values of `out`, on rayon's
/// threads when `work` (multiply-adds) is worth the hand-off.
fn attend_groups(
    out: &mut [f32],
    chunk: usize,
    work: usize,
    group: impl Fn(usize, &mut [f32], &mut Vec<f32>) + Sync,
) {
    if work < PARALLEL_DECODE_WORK {
        let mut scores = Vec::new();
        for (j, o) in out.chunks_mut(chunk).enumerate() {
            group(j, o, &mut scores);
        }
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each_init(Vec::new, |scores, (j, o)| group(j, o, scores));
    }
}

/// Rotary position embedding in the "rotate half" convention: for each `d`-vector of `x`
/// (`[b, heads, t, d]`) at position `i`, `x·cosᵢ + (−x₂ ‖ x₁)·sinᵢ` with `x₁, x₂` its halves.
/// `cos, sin: [t, d]` row-major (already cut to the positions of `x`); `out` is
/// `[b, t, heads·d]` row-major, the layout of the projection it came from.
pub fn rotate_half(x: HeadsView, cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let [_, heads, t, d] = x.dims;
    assert!(d % 2 == 0, "head_dim {d} is odd");
    assert!(
        cos.len() == t * d && sin.len() == t * d,
        "rotary tables are not [{t}, {d}]"
    );
    assert_eq!(
        out.len(),
        x.dims.iter().product::<usize>(),
        "output buffer has the wrong size"
    );
    if out.is_empty() {
        return;
    }
    let half = d / 2;
    let [sb, sh, st, sd] = x.strides;
    let rotate = |(bt, out): (usize, &mut [f32])| {
        let (batch, i) = (bt / t, bt % t);
        let (cos1, cos2) = cos[i * d..(i + 1) * d].split_at(half);
        let (sin1, sin2) = sin[i * d..(i + 1) * d].split_at(half);
        let turn =
            |j: usize, x1: f32, x2: f32| (x1 * cos1[j] - x2 * sin1[j], x2 * cos2[j] + x1 * sin2[j]);
        for (h, o) in out.chunks_exact_mut(d).enumerate() {
            let base = batch * sb + h * sh + i * st;
            let (o1, o2) = o.split_at_mut(half);
            if sd == 1 {
                // A projection's own layout: slices, which the compiler vectorises.
                let (x1, x2) = x.data[base..base + d].split_at(half);
                for j in 0..half {
                    (o1[j], o2[j]) = turn(j, x1[j], x2[j]);
                }
            } else {
                let at = |j: usize| x.data[base + j * sd];
                for j in 0..half {
                    (o1[j], o2[j]) = turn(j, at(j), at(j + half));
                }
            }
        }
    };
    if out.len() <= SERIAL_ROTARY {
        out.chunks_mut(heads * d).enumerate().for_each(rotate);
    } else {
        out.par_chunks_mut(heads * d).enumerate().for_each(rotate);
    }
}

/// Values up to which [`rotate_half`] runs on the calling thread: a decode step's rows take a
/// microsecond or two there, less than handing half of them to another thread.
const SERIAL_ROTARY: usize = 1 << 14;

#[cfg(test)]
mod tests {

    use super::*;
    use crate::kv::KvDtype;

    /// Straight from the definition, in f64.
    fn naive(q: &[f32], k: &[f32], v: &[f32], qd: [usize; 4], kd: [usize; 4]) -> Vec<f64> {
        let [b, heads, t_q, d] = qd;
        let [_, kv_heads, t_k, _] = kd;
        let rep = heads / kv_heads;
        let at = |x: &[f32], dims: [usize; 4], i: [usize; 4]| {
            x[((i[0] * dims[1] + i[1]) * dims[2] + i[2]) * dims[3] + i[3]] as f64
        };
        let mut out = vec![0f64; b * t_q * heads * d];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..t_q {
                    let pos = t_k - t_q + i;
                    let s: Vec<f64> = (0..=pos)
                        .map(|j| {
                            (0..d)
                                .map(|c| at(q, qd, [bi, h, i, c]) * at(k, kd, [bi, h / rep, j, c]))
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    for c in 0..d {
                        out[(bi * t_q + i) * heads * d + h * d + c] = s
                            .iter()
                            .enumerate()
                            .map(|(j, x)| (x - max).exp() / z * at(v, kd, [bi, h / rep, j, c]))
                            .sum();
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2000) as f32 / 500.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_for_prefill_decode_and_gqa() {
        // (batch, heads, kv_heads, t_q, t_k, d): blocks that do not divide t_q, a decode step
        // over a cache, and t_q < t_k with several blocks.
        for (b, heads, kv_heads, t_q, t_k, d) in [
            (1, 3, 1, 300, 300, 8),
            (2, 4, 2, 1, 37, 16),
            // A decode step long enough to run its heads on threads.
            (3, 6, 2, 1, 700, 16),
            (1, 2, 2, 130, 170, 4),
        ] {
            let qd = [b, heads, t_q, d];
            let kd = [b, kv_heads, t_k, d];
            let (q, k, v) = (
                values(qd.iter().product(), 1),
                values(kd.iter().product(), 2),
                values(kd.iter().product(), 3),
            );
            let mut out = vec![f32::NAN; b * t_q * heads * d];
            causal_attention(
                HeadsView::contiguous(&q, qd),
                HeadsView::contiguous(&k, kd),
                HeadsView::contiguous(&v, kd),
                &mut out,
            );
            for (got, want) in out.iter().zip(naive(&q, &k, &v, qd, kd)) {
                assert!((*got as f64 - want).abs() < 1e-4, "{got} vs {want}");
            }
        }
    }

    #[test]
    fn reads_strided_head_views_in_place() {
        // q stored as [b, t, heads, d] (a projection's output before splitting heads) and read
        // through swapped strides must give the same result as the contiguous copy.
        let (heads, t, d) = (2, 5, 4);
        let stored = values(t * heads * d, 9);
        let mut contiguous = vec![0f32; stored.len()];
        for i in 0..t {
            for h in 0..heads {
                for c in 0..d {
                    contiguous[(h * t + i) * d + c] = stored[(i * heads + h) * d + c];
                }
            }
        }
        let dims = [1, heads, t, d];
        let strided = HeadsView::new(&stored, dims, [t * heads * d, d, heads * d, 1]);
        let dense = HeadsView::contiguous(&contiguous, dims);
        let (mut a, mut b) = (vec![0f32; t * heads * d], vec![0f32; t * heads * d]);
        causal_attention(strided, strided, strided, &mut a);
        causal_attention(dense, dense, dense, &mut b);
        assert_eq!(a, b);
    }

    /// Sequences of different lengths in caches of their own, filled in two appends (the
    /// second grows the buffers past their first 64 positions): each query row gets the
    /// definition's attention over its own sequence's keys and values as the cache stores them
    /// (rounded to f16, or to Q8_0 blocks). Head sizes 64 and 128 take the AVX-512 path where
    /// the CPU has it, 16 and 24 the portable one (not for Q8_0, whose blocks need multiples of
    /// 32); the longest case is enough work to run on threads.
    #[test]
    fn decode_attention_matches_the_definition_per_sequence() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
            for (heads, kv_heads, d, lens) in [
                (9, 3, 64, vec![1, 17, 142]),
                (4, 4, 128, vec![33, 2]),
                (8, 2, 16, vec![5, 90, 1, 64]),
                (6, 3, 24, vec![12]),
                (4, 2, 64, vec![700, 650, 3]),
                // More query heads per key/value head than one pass of the AVX-512 kernel
                // holds (4 of 64, 2 of 128; Llama 3 8B has 4 of 128).
                (12, 2, 64, vec![5, 40]),
                (8, 2, 128, vec![3, 70]),
                // The portable path for Q8_0 too.
                (4, 2, 32, vec![5, 40]),
            ] {
                if dtype.holds_heads_of(d) {
                    decode_case(dtype, heads, kv_heads, d, &lens);
                }
            }
        }
    }

    fn decode_case(dtype: KvDtype, heads: usize, kv_heads: usize, d: usize, lens: &[usize]) {
        let (n, row, kv_row) = (lens.len(), heads * d, kv_heads * d);
        let q = values(n * row, 1);
        let buffers: Vec<(Vec<f32>, Vec<f32>)> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let seed = 10 * i as u32;
                (
                    values(len * kv_row, seed + 2),
                    values(len * kv_row, seed + 3),
                )
            })
            .collect();
        let caches: Vec<HostKv> = buffers
            .iter()
            .zip(lens)
            .map(|((k, v), &len)| {
                let mut cache = HostKv::empty(dtype, kv_heads, 0);
                let at = len / 2 * kv_row;
                cache.append_rows(&k[..at], &v[..at], 1, len / 2);
                cache.append_rows(&k[at..], &v[at..], 1, len - len / 2);
                assert_eq!(cache.dims(), [1, kv_heads, len, d]);
                cache
            })
            .collect();
        let refs: Vec<&HostKv> = caches.iter().collect();
        let mut out = vec![f32::NAN; n * row];
        decode_attention(&q, &refs, heads, &mut out);
        let stored = |m: &[f32]| dtype.as_stored(m);
        for (i, &len) in lens.iter().enumerate() {
            // The definition's operands: [1, heads, 1, d] and [1, kv_heads, len, d].
            let split = |m: &[f32]| -> Vec<f32> {
                let mut t = vec![0f32; kv_heads * len * d];
                for (j, r) in m.chunks_exact(kv_row).take(len).enumerate() {
                    for (h, x) in r.chunks_exact(d).enumerate() {
                        t[(h * len + j) * d..(h * len + j + 1) * d].copy_from_slice(x);
                    }
                }
                t
            };
            let (k, v) = (split(&stored(&buffers[i].0)), split(&stored(&buffers[i].1)));
            let want = naive(
                &q[i * row..(i + 1) * row],
                &k,
                &v,
                [1, heads, 1, d],
                [1, kv_heads, len, d],
            );
            for (got, want) in out[i * row..(i + 1) * row].iter().zip(want) {
                assert!(
                    (*got as f64 - want).abs() < 1e-4,
                    "d {d}, sequence {i} of {len}: {got} vs {want}"
                );
            }
        }
    }
}
