//! The exp-based activations of a LLaMA forward: row softmax, log-sum-exp (and the
//! cross-entropy built on it), the SiLU gate and a decode step's attention of one query (a
//! softmax between two small products), with a vectorisable `exp`; and RMS norm, whose
//! reduction takes the same lanes.
//!
//! libm's `expf` is a scalar call: on a 2048-token window the attention softmax alone makes
//! about 7·10⁸ of them, a tenth of the whole evaluation. [`exp`] is branch-free polynomial code
//! that LLVM vectorises once it is compiled for a wide target (the same multiversioning as the
//! GEMV tiles, see [`super::SimdPath`]).

use super::SimdPath;

/// Lanes of the reductions: independent partial results, so the loops vectorise without
/// reassociating floating-point sums.
const LANES: usize = 16;

/// `eˣ` with relative error below 2·10⁻⁷ on the float range (Cephes' `expf` polynomial).
///
/// `eˣ = 2ⁿ·eʳ` with `n = round(x·log₂e)` and `r = x − n·ln 2` (ln 2 split in two so `r` keeps
/// its low bits). Inputs are clamped to where the result is a normal float or zero-ish.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer (to nearest even) and leaves it in the low mantissa
    // bits, which gives `n` both as a float and as an integer without a conversion.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let n_int = t.to_bits() as i32 - SHIFTER.to_bits() as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n_int + 127) << 23) as u32)
}

#[inline(always)]
fn max_generic(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// `Σ e^(xᵢ − shift)`; with `STORE`, also `xᵢ ← e^(xᵢ − shift)`.
#[inline(always)]
fn exp_sum_generic<const STORE: bool>(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            let e = exp(*v - shift);
            if STORE {
                *v = e;
            }
            *a += e;
        }
    }
    let mut sum: f32 = 0.0;
    for v in chunks.into_remainder() {
        let e = exp(*v - shift);
        if STORE {
            *v = e;
        }
        sum += e;
    }
    sum + acc.iter().sum::<f32>()
}

#[inline(always)]
fn softmax_generic(x: &mut [f32]) {
    let max = max_generic(x);
    let inv = 1.0 / exp_sum_generic::<true>(x, max);
    for v in x {
        *v *= inv;
    }
}

#[inline(always)]
fn logsumexp_generic(x: &[f32]) -> f32 {
    let max = max_generic(x);
    // `exp_sum` only writes with STORE; copying the row to satisfy `&mut` would cost a pass, so
    // sum the read-only row in lanes here.
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - max)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp(v - max);
        }
    }
    max + (tail + acc.iter().sum::<f32>()).ln()
}

/// `outᵢ = silu(gateᵢ)·upᵢ = gateᵢ·upᵢ / (1 + e^(−gateᵢ))`.
#[inline(always)]
fn swiglu_generic(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * u / (1.0 + exp(-g));
    }
}

/// One row of RMS norm: `outᵢ = xᵢ / √(mean(x²) + eps) · weightᵢ`, the sum of squares in
/// [`LANES`] lanes (a serial sum would be one long dependency chain).
#[inline(always)]
fn rms_norm_generic(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let (blocks, tail) = x.as_chunks::<LANES>();
    let mut lanes = [0f32; LANES];
    for block in blocks {
        for (l, v) in lanes.iter_mut().zip(block) {
            *l += v * v;
        }
    }
    let squares = lanes.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>();
    let rms = (squares / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v / rms * w;
    }
}

/// An element type of a KV cache: `f32`; `f16` at half the memory and half the bytes read per
/// decode step; or a [`Q8Block`] of 32 values at just over a quarter. Values are rounded once,
/// when written; attention widens them to f32.
pub trait KvElem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Values one element holds.
    const VALUES: usize;

    /// `dst[i]` = value `i` of `src`, widened (`dst.len() = src.len() · VALUES`).
    fn widen_row(src: &[Self], dst: &mut [f32]);

    /// `src` rounded into `dst` (`src.len() = dst.len() · VALUES`).
    fn narrow_from(dst: &mut [Self], src: &[f32]);

    /// Values `16c..16c + 16` of the row at `row`, widened. Inlined into `avx512_heads`'
    /// kernels, whose AVX-512 context it compiles in.
    ///
    /// # Safety
    /// The CPU supports AVX-512F and the row at `row` holds those values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(row: *const Self, c: usize) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    const VALUES: usize = 1;

    fn widen_row(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn narrow_from(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const Self, c: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(row.add(16 * c)) }
    }
}

impl KvElem for half::f16 {
    const VALUES: usize = 1;

    fn widen_row(src: &[Self], dst: &mut [f32]) {
        for (d, &h) in dst.iter_mut().zip(src) {
            *d = super::f16::h2f_exact(h.to_bits());
        }
    }

    fn narrow_from(dst: &mut [Self], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const Self, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; `vcvtph2ps` is exact (every f16 is an f32).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * c) as *const __m256i)) }
    }
}

/// 32 values of a [`crate::KvDtype::Q8_0`] cache, llama.cpp's `block_q8_0`: value `i` is
/// `d · q[i]`, with `d = max|x| / 127` (as f16) and `q[i] = round(x_i / d)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct Q8Block {
    pub d: half::f16,
    pub q: [i8; Q8Block::LEN],
}

impl Q8Block {
    /// Values per block.
    pub const LEN: usize = crate::KvDtype::Q8_BLOCK;

    /// The block of `x`. The step is rounded to f16 after the codes are taken (as llama.cpp
    /// does); a NaN anywhere makes the step NaN, so every value reads back as NaN.
    pub fn quantize(x: &[f32; Self::LEN]) -> Self {
        if x.iter().any(|v| v.is_nan()) {
            return Self {
                d: half::f16::NAN,
                q: [0; Self::LEN],
            };
        }
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        Self {
            d: half::f16::from_f32(d),
            q: x.map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
        }
    }
}

impl KvElem for Q8Block {
    const VALUES: usize = Self::LEN;

    fn widen_row(src: &[Self], dst: &mut [f32]) {
        for (b, out) in src.iter().zip(dst.chunks_exact_mut(Self::LEN)) {
            let d = b.d.to_f32();
            for (o, &q) in out.iter_mut().zip(&b.q) {
                *o = d * f32::from(q);
            }
        }
    }

    fn narrow_from(dst: &mut [Self], src: &[f32]) {
        let (blocks, rest) = src.as_chunks::<{ Self::LEN }>();
        assert!(
            rest.is_empty() && blocks.len() == dst.len(),
            "{} values do not fill {} blocks of {}",
            src.len(),
            dst.len(),
            Self::LEN
        );
        for (d, x) in dst.iter_mut().zip(blocks) {
            *d = Self::quantize(x);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const Self, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: block `c / 2` of the row exists; its 16 codes from
        // `16 · (c % 2)` are in bounds.
        unsafe {
            let block = row.add(c / 2);
            let codes = (&raw const (*block).q).cast::<i8>().add(16 * (c % 2));
            let ints = _mm512_cvtepi8_epi32(_mm_loadu_si128(codes as *const __m128i));
            let d = _mm512_set1_ps(super::f16::h2f_exact((*block).d.to_bits()));
            _mm512_mul_ps(_mm512_cvtepi32_ps(ints), d)
        }
    }
}

/// One attention head's keys and values for a query: `len` rows of `d` contiguous values each,
/// row `j` starting at element `j·stride` of `k` and of `v` (a KV cache's rows of one head).
#[derive(Debug)]
pub struct HeadRows<'a, T = f32> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub stride: usize,
    pub len: usize,
}

impl<T> Clone for HeadRows<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for HeadRows<'_, T> {}

impl<'a, T: KvElem> HeadRows<'a, T> {
    /// Panics unless every row of `d` values lies inside both buffers (and `d` fills whole
    /// elements).
    fn check(&self, d: usize) {
        let w = d / T::VALUES;
        assert!(
            d.is_multiple_of(T::VALUES)
                && (self.len == 0
                    || (self.len - 1) * self.stride + w <= self.k.len().min(self.v.len())),
            "{} rows of {d} values, {} elements apart, do not fit the buffers",
            self.len,
            self.stride
        );
    }

    /// The rows of `m`, `d` values each.
    #[inline(always)]
    fn rows(&self, m: &'a [T], d: usize) -> impl Iterator<Item = &'a [T]> {
        let (stride, w) = (self.stride, d / T::VALUES);
        (0..self.len).map(move |j| &m[j * stride..j * stride + w])
    }
}

/// Bytes ahead of the current key or value row that are prefetched. Each row is read once, and
/// a step's caches do not stay in cache between steps (the weights stream through in between):
/// without the hint the loop waits on memory at every row. About two DRAM latencies' worth of
/// the loop's reading speed.
const PREFETCH_BYTES: usize = 2048;

/// `Σ aᵢ` as a tree of halvings: a left-to-right sum would chain 15 dependent adds into each
/// dot product (float adds are not reassociated for us).
#[inline(always)]
fn tree_sum(mut a: [f32; LANES]) -> f32 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}

#[inline(always)]
fn argmax_generic(logits: &[f32]) -> u32 {
    // `total_cmp`'s key: negative floats' magnitude bits flipped, so integer order is its order.
    let key = |x: f32| {
        let b = x.to_bits() as i32;
        b ^ (((b >> 31) as u32) >> 1) as i32
    };
    // A plain reduction over the slice, which LLVM vectorises along it. (Folded into 16 lane
    // maxima block by block, it was vectorised across the blocks instead, with gathers.)
    let best = logits.iter().map(|&x| key(x)).fold(i32::MIN, i32::max);
    let is_best = |x: &f32| key(*x) == best;
    let (blocks, tail) = logits.as_chunks::<LANES>();
    if let Some(i) = tail.iter().rposition(is_best) {
        return (blocks.len() * LANES + i) as u32;
    }
    // A fold, not `any`: no early exit, so each block's test is one vector compare.
    blocks
        .iter()
        .rposition(|block| block.iter().fold(false, |seen, x| seen | is_best(x)))
        .map_or(0, |b| {
            (b * LANES + blocks[b].iter().rposition(is_best).expect("found above")) as u32
        })
}

#[inline(always)]
fn attend_group_generic<T: KvElem>(
    q: &[f32],
    kv: HeadRows<'_, T>,
    rep: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (d, t) = (q.len() / rep, kv.len);
    kv.check(d);
    scores.resize(rep * t, 0.0);
    let mut row = vec![0f32; d];
    let ahead = PREFETCH_BYTES / size_of::<T>();
    let line = (64 / size_of::<T>()).max(1);
    // Scores `[rep, t]`: each key row is read once for the `rep` queries that share it.
    for (j, kr) in kv.rows(kv.k, d).enumerate() {
        for l in (0..kr.len()).step_by(line) {
            super::prefetch(kr.as_ptr().wrapping_add(ahead + l));
            super::prefetch(kv.v.as_ptr().wrapping_add(j * kv.stride + l));
        }
        T::widen_row(kr, &mut row);
        let (kc, kt) = row.as_chunks::<LANES>();
        for (r, qr) in q.chunks_exact(d).enumerate() {
            let (qc, qt) = qr.as_chunks::<LANES>();
            let mut acc = [0f32; LANES];
            for (a, b) in qc.iter().zip(kc) {
                for l in 0..LANES {
                    acc[l] += a[l] * b[l];
                }
            }
            let tail: f32 = qt.iter().zip(kt).map(|(a, b)| a * b).sum();
            scores[r * t + j] = scale * (tail + tree_sum(acc));
        }
    }
    for p in scores.chunks_exact_mut(t) {
        softmax_generic(p);
    }
    out.fill(0.0);
    for (j, vr) in kv.rows(kv.v, d).enumerate() {
        T::widen_row(vr, &mut row);
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            let p = scores[r * t + j];
            for (o, &x) in o.iter_mut().zip(&row) {
                *o += p * x;
            }
        }
    }
}

/// Compiles the `*_generic` functions for one target feature set.
macro_rules! path {
    ($module:ident, $feature:literal) => {
        mod $module {
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn softmax(x: &mut [f32]) {
                super::softmax_generic(x)
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn logsumexp(x: &[f32]) -> f32 {
                super::logsumexp_generic(x)
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn argmax(x: &[f32]) -> u32 {
                super::argmax_generic(x)
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
                super::swiglu_generic(gate, up, out)
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
                super::rms_norm_generic(x, weight, eps, out)
            }

            #[target_feature(enable = $feature)]
            pub(super) unsafe fn attend_group<T: super::KvElem>(
                q: &[f32],
                kv: super::HeadRows<'_, T>,
                rep: usize,
                scale: f32,
                scores: &mut Vec<f32>,
                out: &mut [f32],
            ) {
                super::attend_group_generic(q, kv, rep, scale, scores, out)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
path!(avx512, "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma");
#[cfg(target_arch = "x86_64")]
path!(avx2, "avx2,fma");
#[cfg(target_arch = "aarch64")]
path!(neon, "neon");

/// [`attend_group`] on AVX-512 for heads of `C·16` values (LLaMA's 64 and 128), written with
/// intrinsics: from portable lane loops over fixed-size rows, LLVM vectorises across key rows
/// (gathers and scatters, several times slower) rather than along the lanes, whatever the loop
/// order.
///
/// Up to `16 / C` query rows go through the keys and values together, their `C`-vector rows
/// held in registers: each key or value row is loaded (and widened) once for all of them, and
/// the weighted sums of values are `16` independent accumulator chains.
#[cfg(target_arch = "x86_64")]
mod avx512_heads {
    use std::arch::x86_64::*;

    use super::{HeadRows, KvElem, PREFETCH_BYTES};

    /// # Safety
    /// The CPU supports [`super::SimdPath::Avx512`]; `q` and `out` are `rep` rows of `C·16`
    /// values. (The rows of `kv` are checked here.)
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_group<const C: usize, T: KvElem>(
        q: &[f32],
        kv: HeadRows<'_, T>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let d = C * 16;
        kv.check(d);
        let (t, rep) = (kv.len, q.len() / d);
        scores.resize(rep * t, 0.0);
        let passes = (0..rep)
            .step_by(16 / C)
            .map(|first| first..rep.min(first + 16 / C));
        for rows in passes.clone() {
            let q = &q[rows.start * d..rows.end * d];
            let p = &mut scores[rows.start * t..rows.end * t];
            // SAFETY (each arm): the caller's contract, and `q`, `p` hold `R` rows.
            unsafe {
                match rows.len() {
                    1 => scores_of::<C, 1, T>(q, kv, scale, p),
                    2 => scores_of::<C, 2, T>(q, kv, scale, p),
                    3 => scores_of::<C, 3, T>(q, kv, scale, p),
                    _ => scores_of::<C, 4, T>(q, kv, scale, p),
                }
            }
        }
        super::softmax_rows(scores, t);
        for rows in passes {
            let p = &scores[rows.start * t..rows.end * t];
            let o = &mut out[rows.start * d..rows.end * d];
            // SAFETY (each arm): as above.
            unsafe {
                match rows.len() {
                    1 => weighted_values::<C, 1, T>(p, kv, o),
                    2 => weighted_values::<C, 2, T>(p, kv, o),
                    3 => weighted_values::<C, 3, T>(p, kv, o),
                    _ => weighted_values::<C, 4, T>(p, kv, o),
                }
            }
        }
    }

    /// `p[r][j] = scale·q_r·k_j` for the `R` query rows of `q`. Also hints each value row into
    /// L2, long before [`weighted_values`] reads it.
    ///
    /// # Safety
    /// As [`attend_group`]; `q` is `R` rows of `C·16`, `p` is `R` rows of `kv.len`, and the
    /// rows of `kv` were checked.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scores_of<const C: usize, const R: usize, T: KvElem>(
        q: &[f32],
        kv: HeadRows<'_, T>,
        scale: f32,
        p: &mut [f32],
    ) {
        let (d, t) = (C * 16, kv.len);
        debug_assert!(q.len() == R * d && p.len() == R * t);
        // SAFETY (loads below): `q` holds `R·d` values; row `j < t` of `k` holds `d` values at
        // `j·stride` (checked by the caller). Prefetches never fault.
        let qv: [[__m512; C]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(q.as_ptr().add(r * d + c * 16)) })
        });
        let (k, v) = (kv.k.as_ptr(), kv.v.as_ptr());
        let line = (64 / size_of::<T>()).max(1);
        let ahead = PREFETCH_BYTES / size_of::<T>();
        for j in 0..t {
            let row = k.wrapping_add(j * kv.stride);
            for l in (0..d / T::VALUES).step_by(line) {
                super::super::prefetch(row.wrapping_add(ahead + l));
                super::super::prefetch_l2(v.wrapping_add(j * kv.stride + l));
            }
            let kr: [__m512; C] = std::array::from_fn(|c| unsafe { T::load16(row, c) });
            for r in 0..R {
                // Two chains: half the dependent FMAs before the reduction.
                let mut even = _mm512_mul_ps(qv[r][0], kr[0]);
                let mut odd = _mm512_mul_ps(qv[r][1], kr[1]);
                for c in (2..C).step_by(2) {
                    even = _mm512_fmadd_ps(qv[r][c], kr[c], even);
                    odd = _mm512_fmadd_ps(qv[r][c + 1], kr[c + 1], odd);
                }
                p[r * t + j] = scale * _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
            }
        }
    }

    /// `out_r = Σ_j p[r][j]·v_j` for the `R` rows of `p`.
    ///
    /// # Safety
    /// As [`scores_of`], with `out` `R` rows of `C·16`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn weighted_values<const C: usize, const R: usize, T: KvElem>(
        p: &[f32],
        kv: HeadRows<'_, T>,
        out: &mut [f32],
    ) {
        let (d, t) = (C * 16, kv.len);
        debug_assert!(out.len() == R * d && p.len() == R * t);
        let v = kv.v.as_ptr();
        let line = (64 / size_of::<T>()).max(1);
        let ahead = PREFETCH_BYTES / size_of::<T>();
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for j in 0..t {
            let row = v.wrapping_add(j * kv.stride);
            for l in (0..d / T::VALUES).step_by(line) {
                super::super::prefetch(row.wrapping_add(ahead + l));
            }
            // SAFETY: row `j < t` of `v` holds `d` values (checked by the caller).
            let vr: [__m512; C] = std::array::from_fn(|c| unsafe { T::load16(row, c) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let pj = _mm512_set1_ps(p[r * t + j]);
                for (a, &x) in acc.iter_mut().zip(&vr) {
                    *a = _mm512_fmadd_ps(pj, x, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, &a) in acc.iter().enumerate() {
                // SAFETY: `out` holds `R·d` values.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * d + c * 16), a) };
            }
        }
    }
}

/// Calls `$f` of the best compiled path for this CPU.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {
        // SAFETY (each arm): `SimdPath::best` returns only paths whose features this CPU has.
        match SimdPath::best() {
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => unsafe { avx512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => unsafe { avx2::$f($($arg),*) },
            #[cfg(target_arch = "aarch64")]
            SimdPath::Neon => unsafe { neon::$f($($arg),*) },
            _ => generic::$f($($arg),*),
        }
    };
}

/// The portable build, under the names `dispatch!` calls.
mod generic {
    pub(super) use super::{
        argmax_generic as argmax, attend_group_generic as attend_group,
        logsumexp_generic as logsumexp, rms_norm_generic as rms_norm, softmax_generic as softmax,
        swiglu_generic as swiglu,
    };
}

/// `out = softmax(scale·q·Kᵀ)·V` for the `rep` query rows of `q` (`d = q.len() / rep` values
/// each) that share one key/value head, written as `rep` rows of `out`; `scores` is scratch.
///
/// A decode step's attention: a few hundred dot products and axpys of `d` values per head,
/// too small for a matrix product's setup, and each key and value row is read once for the
/// `rep` query heads of grouped-query attention. Panics if `q` or `out` is not `rep` rows or
/// a row of `kv` lies outside its buffers.
pub fn attend_group<T: KvElem>(
    q: &[f32],
    kv: HeadRows<'_, T>,
    rep: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    assert!(
        rep > 0 && q.len().is_multiple_of(rep) && out.len() == q.len(),
        "{rep} query rows of {} values do not fit an output of {}",
        q.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if SimdPath::best() == SimdPath::Avx512 {
        // SAFETY: `best` returns only a path the CPU supports; `q` and `out` are `rep` rows of
        // `d` values (asserted above).
        match q.len() / rep {
            64 => return unsafe { avx512_heads::attend_group::<4, T>(q, kv, scale, scores, out) },
            128 => return unsafe { avx512_heads::attend_group::<8, T>(q, kv, scale, scores, out) },
            _ => {}
        }
    }
    dispatch!(attend_group(q, kv, rep, scale, scores, out))
}

/// [`softmax_in_place`] of each `len`-value row of `x`.
fn softmax_rows(x: &mut [f32], len: usize) {
    if len > 0 {
        for row in x.chunks_exact_mut(len) {
            softmax_in_place(row);
        }
    }
}

/// `xᵢ ← e^(xᵢ) / Σⱼ e^(xⱼ)`, in place (an empty row stays empty).
pub fn softmax_in_place(x: &mut [f32]) {
    dispatch!(softmax(x))
}

/// `log Σᵢ e^(xᵢ)`, computed around the row maximum so it does not overflow.
pub fn logsumexp(x: &[f32]) -> f32 {
    dispatch!(logsumexp(x))
}

/// The last index of the greatest value in [`f32::total_cmp`]'s order (0 for an empty slice):
/// a greedy decode step. The values are compared as the integers that order has: one
/// vectorised reduction finds the maximum, then the last block of 16 values holding it is
/// searched. Compiled per [`SimdPath`]: built for the baseline x86-64 target, which has no
/// 32-bit integer `max`, it took 1.2% of the samples of eight sequences' decode steps
/// (docs/serve.md, session 47).
pub fn argmax(logits: &[f32]) -> u32 {
    dispatch!(argmax(logits))
}

/// `outᵢ = silu(gateᵢ)·upᵢ` (SwiGLU's gating), over threads.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    elementwise("swiglu", gate, up, out, |g, u, o| {
        dispatch!(swiglu(g, u, o))
    });
}

/// RMS norm of each row of `weight.len()` values of `x`: `x / √(mean(x²) + eps) · weight`,
/// into `out`. A decode step's rows (a few thousand values) run on the calling thread, where
/// Burn's generic composition took five passes and four fresh tensors per norm; larger inputs
/// run over threads.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    use rayon::prelude::*;
    let n = weight.len();
    assert!(
        n > 0 && x.len().is_multiple_of(n) && out.len() == x.len(),
        "rms_norm of {} values in rows of {n} into {}",
        x.len(),
        out.len()
    );
    let rows_per_task = (1usize << 14).div_ceil(n);
    let task = |(x, out): (&[f32], &mut [f32])| {
        for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            dispatch!(rms_norm(x, weight, eps, out))
        }
    };
    if x.len() <= rows_per_task * n {
        task((x, out));
    } else {
        x.par_chunks(rows_per_task * n)
            .zip(out.par_chunks_mut(rows_per_task * n))
            .for_each(task);
    }
}

/// `outᵢ = aᵢ − bᵢ`, over threads (so that a fresh `out`'s pages fault on every core).
pub fn difference(a: &[f32], b: &[f32], out: &mut [f32]) {
    elementwise("difference", a, b, out, |a, b, o| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a - b;
        }
    });
}

/// `op` over matching chunks of two operands and the output, on rayon's threads.
fn elementwise(
    name: &str,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    op: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    assert!(
        a.len() == b.len() && b.len() == out.len(),
        "{name} operands differ in length"
    );
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| op(a, b, o));
}

/// `Σᵣ −log softmax(logitsᵣ)[targetᵣ]` over the rows of `logits: [targets.len(), vocab]`:
/// the summed cross-entropy, without materialising the probabilities.
pub fn sum_nll(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    use rayon::prelude::*;
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "logits are not [{} targets, {vocab}]",
        targets.len()
    );
    logits
        .par_chunks_exact(vocab)
        .zip(targets)
        .map(|(row, &t)| (logsumexp(row) - row[t as usize]) as f64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The greedy choice is `max_by(total_cmp)`'s (the last of equal maxima), at every length
    /// around the lane width and with ties, signed zeros, infinities and NaNs of both signs, in
    /// the dispatched and the portable build.
    #[test]
    fn argmax_is_the_last_greatest_in_total_order() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        let specials = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1.5,
        ];
        for len in [0, 1, 2, 15, 16, 17, 33, 100, 49_152] {
            for trial in 0..20 {
                let logits: Vec<f32> = (0..len)
                    .map(|_| match rng.random_range(0..10) {
                        0 if trial % 2 == 0 => specials[rng.random_range(0..specials.len())],
                        1 => 1.5,
                        _ => rng.random_range(-4.0..4.0),
                    })
                    .collect();
                let want = logits
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32);
                assert_eq!(argmax(&logits), want, "{len} values, trial {trial}");
                assert_eq!(argmax_generic(&logits), want, "{len} values, trial {trial}");
            }
        }
    }

    #[test]
    fn exp_matches_libm_across_the_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!((0.0..1e-37).contains(&exp(f32::NEG_INFINITY)));
    }

    /// Q8_0 blocks as llama.cpp's `quantize_row_q8_0_ref` makes them: step `max|x|/127`,
    /// codes rounded half away from zero; zeros and NaNs read back as themselves.
    #[test]
    fn q8_blocks_round_to_the_nearest_step() {
        // max|x| = 127/64: the step is exactly 1/64 (an f16), and x/step is exact.
        let mut x = [0f32; 32];
        x[0] = -127.0 / 64.0;
        x[1] = 1.0 / 128.0; // half a step: away from zero (1)
        x[2] = -3.0 / 128.0; // −1.5 steps → −2
        x[3] = 0.3; // 19.2 steps → 19
        x[31] = 127.0 / 64.0;
        let b = Q8Block::quantize(&x);
        // llama.cpp's 34 bytes per block, which the KV memory budget counts.
        assert_eq!(crate::KvDtype::Q8_0.row_bytes(64), 2 * 34);
        assert_eq!(b.d.to_f32(), 1.0 / 64.0);
        assert_eq!(&b.q[..4], &[-127, 1, -2, 19]);
        assert_eq!(b.q[31], 127);
        let mut back = [0f32; 32];
        Q8Block::widen_row(&[b], &mut back);
        assert_eq!(back[3], 19.0 / 64.0);
        for (y, x) in back.iter().zip(&x) {
            assert!((y - x).abs() <= 0.5 / 64.0, "{y} for {x}");
        }
        Q8Block::widen_row(&[Q8Block::quantize(&[0.0; 32])], &mut back);
        assert_eq!(back, [0.0; 32]);
        x[7] = f32::NAN;
        Q8Block::widen_row(&[Q8Block::quantize(&x)], &mut back);
        assert!(back.iter().all(|v| v.is_nan()));
    }

    fn soft_input(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
    }

    #[test]
    fn activations_match_f64_on_every_length() {
        for n in [1usize, 5, 16, 17, 33, 100] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 11) as f32 * 3.1 - 15.0)
                .collect();
            let max = row
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let lse = logsumexp(&row) as f64;
            assert!((lse - (max + sum.ln())).abs() < 1e-5, "n={n}: {lse}");
            let nll = sum_nll(&row, n, &[(n - 1) as u32]);
            assert!((nll - (lse - row[n - 1] as f64)).abs() < 1e-9);
            let mut gated = vec![0f32; n];
            swiglu(&row, &soft_input(n), &mut gated);
            for ((o, &g), u) in gated.iter().zip(&row).zip(soft_input(n)) {
                let want = g as f64 * u as f64 / (1.0 + (-(g as f64)).exp());
                assert!((*o as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
            }
            let mut soft = row.clone();
            softmax_in_place(&mut soft);
            for (s, &v) in soft.iter().zip(&row) {
                let want = (v as f64 - max).exp() / sum;
                assert!((*s as f64 - want).abs() < 1e-6, "n={n}: {s} vs {want}");
            }
        }
    }
}
