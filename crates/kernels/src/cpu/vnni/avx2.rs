//! The int8 kernel on AVX2, for CPUs without AVX512-VNNI (AMD Zen 2 and 3, Intel before Ice
//! Lake): the same rounded activations, quads and task split as the AVX-512 kernel, with
//! `vpdpbusd` emulated.
//!
//! # Arithmetic
//! `vpmaddubsw` multiplies 32 codes (u8) by 32 activations (i8) and adds adjacent pairs into
//! 16-bit lanes; `vpmaddwd` against ones then adds those pairs into the 32-bit lanes, which is
//! `vpdpbusd`'s sum of a quad. The 16-bit sums of a block's 8 quads are added first and widened
//! once: a pair is at most `2·15·127 = 3810` for 4-bit codes (activations lie in `[−127, 127]`),
//! so 8 of them, 30480, still fit in an `i16`. One pair of 8-bit codes, `2·255·127`, would not:
//! 8-bit codes go signed, `v = q − 128`, and `v·x = |v|·(x signed by v)` keeps a pair within
//! `2·128·127`; each quad's pairs are widened at once, and the offset's share, `128·Σx̂`, folds
//! into the zero term ([`code_offset`]). The integer sums are exact. For 2–4 bits the f32
//! operations after them are the AVX-512 kernel's, in its order, so per-OC products are the
//! same bit for bit; per-IC ones differ only in the order of the zero term's f32 sum.
//!
//! A tile's 16 outputs are two 8-lane halves, one `ymm` each, done one after the other so that
//! `M = 8` rows' 16-bit sums, the decoded quad and the broadcast activation fit in the 16
//! registers.

use std::arch::x86_64::*;

use super::super::layout::{BLOCK, CpuPacked, LANES};
use super::super::tile::{block_at, prefetch_ahead};
use super::pass::{Blocks, Kernel, Out, Rounded};
use super::{QUADS, STEP, quad_codes};

/// Lanes of a `ymm` of f32 or i32: half a tile.
const HALF: usize = LANES / 2;

/// AVX2's [`Kernel`]. Tiles are never paired: two tiles' sums would not fit in the registers.
pub(super) struct Avx2;

impl Kernel for Avx2 {
    unsafe fn round_activations<const B: usize, const M: usize>(
        x_pad: &[f32],
        acts: &mut Rounded,
        xsum: &mut [f32],
    ) {
        // SAFETY: the trait's contract.
        unsafe { round_activations::<B, M>(x_pad, acts, xsum) }
    }

    unsafe fn oc_tiles<const B: usize, const M: usize>(
        w: &CpuPacked,
        acts: &Rounded,
        xsum: &[f32],
        first: usize,
        codes: &[[u32; LANES]],
        out: &Out,
    ) {
        // SAFETY: the trait's contract.
        unsafe { oc_tile::<B, M>(w, acts, xsum, first, codes, out) }
    }

    unsafe fn ic_group<const B: usize, const M: usize>(
        w: &CpuPacked,
        x_pad: &[f32],
        g: usize,
        codes: &[[u32; LANES]],
        acts: &mut Rounded,
        out: &Out,
        _paired: bool,
    ) {
        // SAFETY: the trait's contract.
        unsafe { ic_group::<B, M>(w, x_pad, g, codes, acts, out) }
    }
}

/// The `vpshufb` indices that take a block's bytes from `vpackssdw`/`vpacksswb` order to quad
/// order: `[same]` picks from the byte's own 128-bit half, `[other]` from the other half (bit 7
/// set: a zero byte), and the two results are or-ed.
struct Permutation<const B: usize>;

impl<const B: usize> Permutation<B> {
    /// Evaluated at compile time, once per width.
    const INDEX: [[u8; BLOCK]; 2] = {
        let q = quad_codes(B as u32);
        let mut out = [[0x80u8; BLOCK]; 2];
        let mut o = 0;
        while o < BLOCK {
            let code = q[o / 4][o % 4] as usize;
            // The packs leave code `c` in half `(c % 8) / 4`, at byte `4·(c / 8) + c % 4`.
            let (half, byte) = ((code % 8) / 4, 4 * (code / 8) + code % 4);
            out[(half != o / 16) as usize][o] = byte as u8;
            o += 1;
        }
        out
    };
}

/// Block `blk` of `M` rows of `x_pad` (or of coefficients `x_k·s_k`, per-IC), rounded into
/// `acts` as the definition says ([`super::quantize_block`]); returns each row's `d·Σq̂`
/// (0 per-IC when the codes have no offset, [`code_offset`]: nothing reads it then).
/// Per-IC (`group` holds the block's 32 scales and zeros) each row's `c·z` is added to `zt`.
///
/// Safety: `x` points at the block in row 0 of rows `k` apart, `group`'s pointers at 32
/// values each; the CPU has AVX2, FMA and F16C.
#[inline(always)]
unsafe fn round_block<const B: usize, const M: usize>(
    x: *const f32,
    k: usize,
    group: Option<(*const u16, *const u16)>,
    quads: &mut [[i32; QUADS]; M],
    steps: &mut [f32; M],
    zt: &mut [[__m256; 2]; M],
) -> [f32; M] {
    // SAFETY (every intrinsic): the function's contract; each load reads 8 values of the block.
    unsafe {
        let abs_mask = _mm256_set1_epi32(i32::MAX);
        let same = _mm256_loadu_si256(Permutation::<B>::INDEX[0].as_ptr().cast());
        let other = _mm256_loadu_si256(Permutation::<B>::INDEX[1].as_ptr().cast());
        // Per 8 values of the block: scales, zeros.
        let mut sz = [[_mm256_setzero_ps(); 2]; 4];
        if let Some((s, z)) = group {
            for (i, sz) in sz.iter_mut().enumerate() {
                *sz = [
                    _mm256_cvtph_ps(_mm_loadu_si128(s.add(HALF * i).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(z.add(HALF * i).cast())),
                ];
            }
        }
        let mut sums = [0f32; M];
        for m in 0..M {
            let row = x.add(m * k);
            let mut c = [_mm256_setzero_ps(); 4];
            for (i, c) in c.iter_mut().enumerate() {
                *c = _mm256_loadu_ps(row.add(HALF * i));
                if group.is_some() {
                    *c = _mm256_mul_ps(*c, sz[i][0]);
                    zt[m][i % 2] = _mm256_fmadd_ps(*c, sz[i][1], zt[m][i % 2]);
                }
            }
            // |c| as integers: for non-negative floats the integer order is the float order,
            // and a NaN's pattern is above every number's, so a NaN block's maximum is NaN.
            let mut v = _mm256_and_si256(_mm256_castps_si256(c[0]), abs_mask);
            for c in &c[1..] {
                v = _mm256_max_epi32(v, _mm256_and_si256(_mm256_castps_si256(*c), abs_mask));
            }
            let v = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let v = _mm_max_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
            let v = _mm_max_epi32(v, _mm_shuffle_epi32::<0b10_11_00_01>(v));
            let amax = f32::from_bits(_mm_cvtsi128_si32(v) as u32);
            // A zero or NaN block gets bytes 0, as in the definition. (An infinite one gets a
            // step of ∞, so its products are not finite, as in the definition.)
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let inv = _mm256_set1_ps(inv);
            let mut q = [_mm256_setzero_si256(); 4];
            for (q, c) in q.iter_mut().zip(&c) {
                *q = _mm256_cvtps_epi32(_mm256_mul_ps(*c, inv));
            }
            // Per-IC the sum only carries the code offset's share, none below 8 bits.
            let d = amax * STEP;
            steps[m] = d;
            if group.is_none() || code_offset::<B>() != 0.0 {
                let total =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let t = _mm_add_epi32(
                    _mm256_castsi256_si128(total),
                    _mm256_extracti128_si256::<1>(total),
                );
                let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
                let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t));
                sums[m] = d * _mm_cvtsi128_si32(t) as f32;
            }
            // Within ±127, so the saturating packs are exact.
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let swapped = _mm256_permute2x128_si256::<0x01>(bytes, bytes);
            let bytes = _mm256_or_si256(
                _mm256_shuffle_epi8(bytes, same),
                _mm256_shuffle_epi8(swapped, other),
            );
            _mm256_storeu_si256(quads[m].as_mut_ptr().cast(), bytes);
        }
        sums
    }
}

/// Rounds all blocks of `M` rows of `k_pad` values (`x_pad`) into `acts`, and adds each
/// block's `d·Σq̂` into `xsum[m·groups + g]` (per-IC, one group: `xsum` holds `M` values). Per-IC
/// (`group` holds the group's scales and zeros) each row's `c·z` goes into `zt`.
///
/// Safety: the CPU has AVX2, FMA and F16C.
#[inline(always)]
unsafe fn round_rows<const B: usize, const M: usize>(
    x_pad: &[f32],
    group: Option<(&[u16], &[u16])>,
    acts: &mut Rounded,
    zt: &mut [[__m256; 2]; M],
    xsum: &mut [f32],
) {
    let k = x_pad.len() / M;
    let blocks = k / BLOCK;
    assert!(acts.m == M && acts.quads.len() == M * blocks && acts.scales.len() == M * blocks);
    if let Some((s, z)) = group {
        assert!(s.len() == k && z.len() == k);
    }
    let groups = xsum.len() / M;
    let (quads, steps) = (acts.quads.as_chunks_mut().0, acts.scales.as_chunks_mut().0);
    for (blk, (quads, steps)) in quads.iter_mut().zip(steps).enumerate() {
        let k0 = blk * BLOCK;
        let mut at = None;
        if let Some((s, z)) = group {
            at = Some((s[k0..].as_ptr(), z[k0..].as_ptr()));
        }
        // SAFETY: block `blk` of every row and of the group is in bounds (the asserts); the
        // caller has the features.
        let sums = unsafe { round_block::<B, M>(x_pad[k0..].as_ptr(), k, at, quads, steps, zt) };
        let g = blk * groups / blocks;
        for (m, sum) in sums.into_iter().enumerate() {
            xsum[m * groups + g] += sum;
        }
    }
}

/// [`round_rows`] per-OC. Safety: the CPU has the features enabled here.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_activations<const B: usize, const M: usize>(
    x_pad: &[f32],
    acts: &mut Rounded,
    xsum: &mut [f32],
) {
    let mut zt = [[_mm256_setzero_ps(); 2]; M];
    // SAFETY: the features are enabled on this function.
    unsafe { round_rows::<B, M>(x_pad, None, acts, &mut zt, xsum) }
}

/// Decodes half `h` (lanes `8h..8h + 8`) of block `blk` of a tile into its 8 quads, in
/// [`quad_codes`] order.
#[inline(always)]
unsafe fn decode<const B: usize>(codes: &[[u32; LANES]], blk: usize, h: usize) -> [__m256i; QUADS] {
    let block = block_at::<B>(codes, blk);
    // SAFETY (every intrinsic): the caller has AVX2; each load reads 8 words of one row of
    // `block`.
    unsafe {
        let mut word = [_mm256_setzero_si256(); B];
        for (word, row) in word.iter_mut().zip(block) {
            *word = _mm256_loadu_si256(row[HALF * h..].as_ptr().cast());
        }
        let mut q = [_mm256_setzero_si256(); QUADS];
        match B {
            8 => {
                // Codes as `q − 128`, signed (see `block_dot`).
                let flip = _mm256_set1_epi8(i8::MIN);
                for (q, w) in q.iter_mut().zip(&word) {
                    *q = _mm256_xor_si256(*w, flip);
                }
            }
            4 => {
                let mask = _mm256_set1_epi32(0x0f0f_0f0f);
                for w in 0..4 {
                    let v = word[w];
                    q[2 * w] = and(v, mask);
                    q[2 * w + 1] = and(_mm256_srli_epi32::<4>(v), mask);
                }
            }
            2 => {
                let mask = _mm256_set1_epi32(0x0303_0303);
                for w in 0..2 {
                    let v = word[w];
                    q[4 * w] = and(v, mask);
                    q[4 * w + 1] = and(_mm256_srli_epi32::<2>(v), mask);
                    q[4 * w + 2] = and(_mm256_srli_epi32::<4>(v), mask);
                    q[4 * w + 3] = and(_mm256_srli_epi32::<6>(v), mask);
                }
            }
            _ => {
                // The layout of `layout::code_at`, as in the AVX-512 kernel.
                let low3 = _mm256_set1_epi32(0x0707_0707);
                for (i, &w) in word.iter().enumerate() {
                    q[2 * i] = and(w, low3);
                    q[2 * i + 1] = and(_mm256_srli_epi32::<3>(w), low3);
                }
                let (low2, bit2) = (
                    _mm256_set1_epi32(0x0303_0303),
                    _mm256_set1_epi32(0x0404_0404),
                );
                q[6] = or(
                    and(_mm256_srli_epi32::<6>(word[0]), low2),
                    and(_mm256_srli_epi32::<4>(word[2]), bit2),
                );
                q[7] = or(
                    and(_mm256_srli_epi32::<6>(word[1]), low2),
                    and(_mm256_srli_epi32::<5>(word[2]), bit2),
                );
            }
        }
        q
    }
}

/// `a & b`, without a closure: a closure does not get its caller's target features, and its
/// intrinsics would become calls.
#[inline(always)]
unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: the caller has AVX2; no memory is touched.
    unsafe { _mm256_and_si256(a, b) }
}

/// `a | b`; see [`and`].
#[inline(always)]
unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
    // SAFETY: the caller has AVX2; no memory is touched.
    unsafe { _mm256_or_si256(a, b) }
}

/// `acc[h][m] += f_h·d_m · Σ_{k∈blk} q̂_m,k · code_k` for both halves of a tile, with `f_h` the
/// lanes of `factors[h]` (per-OC the group scales) or 1 without them, as in the AVX-512 kernel:
/// `vpmaddubsw` per quad and row, the 8 quads' 16-bit sums added, then one `vpmaddwd` to 32
/// bits per row (module doc).
#[inline(always)]
unsafe fn block_dot<const B: usize, const M: usize>(
    codes: &[[u32; LANES]],
    blk: usize,
    acts: &Blocks<'_, M>,
    factors: Option<&[__m256; 2]>,
    acc: &mut [[__m256; M]; 2],
) {
    let (x, d) = (&acts.quads[blk], &acts.scales[blk]);
    // SAFETY (every intrinsic): the caller has AVX2 and FMA; no memory is touched but `codes`
    // (through `decode`) and `acts`'s slices.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        for (h, acc) in acc.iter_mut().enumerate() {
            let quads = decode::<B>(codes, blk, h);
            let mut sums = [_mm256_setzero_si256(); M];
            if B == 8 {
                // `v·x = |v|·(x signed by v)`: both factors fit `vpmaddubsw` (|v| ≤ 128,
                // |x| ≤ 127) and a pair, 2·128·127, fits 16 bits; but not 8 of them, so each
                // quad widens at once.
                for (i, quad) in quads.iter().enumerate() {
                    let magnitude = _mm256_abs_epi8(*quad);
                    for (m, sum) in sums.iter_mut().enumerate() {
                        let x = _mm256_sign_epi8(_mm256_set1_epi32(x[m][i]), *quad);
                        let pairs = _mm256_maddubs_epi16(magnitude, x);
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                    }
                }
            } else {
                for (i, quad) in quads.iter().enumerate() {
                    for (m, sum) in sums.iter_mut().enumerate() {
                        let x = _mm256_set1_epi32(x[m][i]);
                        *sum = _mm256_add_epi16(*sum, _mm256_maddubs_epi16(*quad, x));
                    }
                }
                for sum in &mut sums {
                    *sum = _mm256_madd_epi16(*sum, ones);
                }
            }
            for m in 0..M {
                let sum = _mm256_cvtepi32_ps(sums[m]);
                let step = _mm256_set1_ps(d[m]);
                let step = match factors {
                    Some(f) => _mm256_mul_ps(f[h], step),
                    None => step,
                };
                acc[m] = _mm256_fmadd_ps(sum, step, acc[m]);
            }
        }
    }
}

/// What `decode` takes off each `B`-bit code: 128 for 8 bits, which go signed (see
/// `block_dot`), else 0. Its share of the product, `128·Σ_k x̂_k`, is folded into the zero
/// term: per-OC the zero becomes `z − 128`, per-IC `128·Σ_k ĉ_k` leaves the group's zero term.
const fn code_offset<const B: usize>() -> f32 {
    if B == 8 { 128.0 } else { 0.0 }
}

/// 8 f16 values at `h[at..]`, widened.
#[inline(always)]
unsafe fn widen(h: &[u16], at: usize) -> __m256 {
    let h = &h[at..at + HALF];
    // SAFETY: `h` holds 8 values; the caller has F16C.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast())) }
}

/// Writes half `h` of tile `tile` of row `m`, the lanes past `out_features` left out.
///
/// Safety: row `m` exists, the caller's task owns `tile`, and the CPU has AVX.
#[inline(always)]
unsafe fn store(out: &Out, m: usize, tile: usize, h: usize, v: __m256) {
    // SAFETY: the function's contract; at most `lanes` outputs are written.
    unsafe {
        let (at, lanes) = out.at(m, tile * LANES + h * HALF);
        if lanes >= HALF {
            _mm256_storeu_ps(at, v);
        } else if lanes > 0 {
            let mut all = [0f32; HALF];
            _mm256_storeu_ps(all.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(all.as_ptr(), at, lanes);
        }
    }
}

/// Per-OC tile `t`, whose code words are `codes`:
/// `y = Σ_g (Σ_{b∈g} s_g·d_b·Σ_{k∈b} q̂_k·q_k − s_g·z_g·xsum_g)` (the parent module's doc), in
/// the AVX-512 kernel's order of operations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn oc_tile<const B: usize, const M: usize>(
    w: &CpuPacked,
    acts: &Rounded,
    xsum: &[f32],
    t: usize,
    codes: &[[u32; LANES]],
    out: &Out,
) {
    let groups = w.groups_along_k();
    let blocks_per_group = w.group_size / BLOCK;
    let blocks = acts.blocks::<M>();
    let mut y = [[_mm256_setzero_ps(); M]; 2];
    // SAFETY: the helpers need the features enabled on this function; the caller owns tile
    // `t` of `out`.
    unsafe {
        let offset = _mm256_set1_ps(code_offset::<B>());
        for g in 0..groups {
            let at = |h: usize| (t * groups + g) * LANES + h * HALF;
            let s = [widen(&w.scales, at(0)), widen(&w.scales, at(1))];
            for blk in g * blocks_per_group..(g + 1) * blocks_per_group {
                prefetch_ahead::<B>(codes, blk);
                block_dot::<B, M>(codes, blk, &blocks, Some(&s), &mut y);
            }
            for (h, y) in y.iter_mut().enumerate() {
                let sz = _mm256_mul_ps(s[h], _mm256_sub_ps(widen(&w.zeros, at(h)), offset));
                for (m, y) in y.iter_mut().enumerate() {
                    *y = _mm256_fnmadd_ps(sz, _mm256_set1_ps(xsum[m * groups + g]), *y);
                }
            }
        }
        for (h, y) in y.iter().enumerate() {
            for (m, y) in y.iter().enumerate() {
                store(out, m, t, h, *y);
            }
        }
    }
}

/// Per-IC group `gi`, whose tiles' code words are `codes`: rounds the group's coefficients
/// `x_k·s_{g,k}` into `acts`, then `y = acc − Σ_k c_k·z_{g,k}` for each of its tiles.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ic_group<const B: usize, const M: usize>(
    w: &CpuPacked,
    x_pad: &[f32],
    gi: usize,
    codes: &[[u32; LANES]],
    acts: &mut Rounded,
    out: &Out,
) {
    let k = w.k_pad;
    let group = (
        &w.scales[gi * k..(gi + 1) * k],
        &w.zeros[gi * k..(gi + 1) * k],
    );
    let mut zt = [[_mm256_setzero_ps(); 2]; M];
    // SAFETY: the helpers need the features enabled on this function; the caller owns the
    // group's tiles of `out`.
    unsafe {
        let mut csum = [0f32; M];
        round_rows::<B, M>(x_pad, Some(group), acts, &mut zt, &mut csum);
        let mut zterm = [0f32; M];
        for ((zterm, zt), csum) in zterm.iter_mut().zip(zt).zip(csum) {
            let mut lanes = [0f32; HALF];
            _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(zt[0], zt[1]));
            *zterm = lanes.iter().sum::<f32>() - code_offset::<B>() * csum;
        }
        let tiles = w.group_size / LANES;
        let blocks = acts.blocks::<M>();
        for (t, codes) in codes.chunks(codes.len() / tiles).enumerate() {
            let mut acc = [[_mm256_setzero_ps(); M]; 2];
            for blk in 0..k / BLOCK {
                prefetch_ahead::<B>(codes, blk);
                block_dot::<B, M>(codes, blk, &blocks, None, &mut acc);
            }
            for (h, acc) in acc.iter().enumerate() {
                for (m, acc) in acc.iter().enumerate() {
                    let y = _mm256_sub_ps(*acc, _mm256_set1_ps(zterm[m]));
                    store(out, m, gi * tiles + t, h, y);
                }
            }
        }
    }
}
