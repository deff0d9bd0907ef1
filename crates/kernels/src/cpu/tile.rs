//! The per-tile kernels, written once as portable Rust over fixed-size lane arrays and
//! compiled once per SIMD path (see [`super::simd`]): under `#[target_feature]` LLVM turns
//! every `for l in 0..LANES` loop into one or two vector instructions.

use super::f16::h2f;
use super::layout::{BLOCK, CpuPacked, LANES, code_at};

/// `a·b + c`: fused where the path has FMA, plain otherwise (`mul_add` without hardware
/// FMA is a slow libm call).
pub(crate) trait Madd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

pub(crate) struct Fused;
pub(crate) struct Unfused;

impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Madd for Unfused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Bit where a decoded code starts in its f32: the code fills the top `bits` of the 23
/// mantissa bits.
const fn code_shift(bits: usize) -> usize {
    23 - bits
}

/// The bits of 1.0f32. A code `q` decodes to `1.0 | q << code_shift(B)`, i.e. the f32
/// `q̃ = 1 + q/2^B` (exact), so `q = 2^B·(q̃ − 1)`; [`decoded_scale_zero`] folds that
/// affine map into the scale and zero.
const DECODE_ONE: u32 = 0x3f80_0000;

/// `(s̃, s̃·z̃)` such that `s̃·(q̃ − z̃) = s·(q − z)` for the decoded code `q̃ = 1 + q/2^B`:
/// `s̃ = s·2^B` and `s̃·z̃ = s·(z + 2^B)` (2^B is exact, so `s̃` is too).
#[inline(always)]
fn decoded_scale_zero<const B: usize>(s: f32, z: f32) -> (f32, f32) {
    let two_b = (1u32 << B) as f32;
    (s * two_b, s * (z + two_b))
}

/// Codes `j` (of the block's 32) of all 16 lanes, decoded to `1 + q/2^B`. Where a code lies
/// ([`code_at`]) is a compile-time constant once `j` is unrolled; the 3-bit codes of quads 6
/// and 7 take their top bit from another word.
///
/// The code is moved straight into the top mantissa bits of 1.0 (one shift, then an
/// and-or: a single `vpternlogd` on AVX-512) instead of shift, mask and int→float
/// conversion (`vcvtdq2ps`): at `M = 1` that is 3 instructions per 16 codes instead of 4,
/// and on AVX-512, where 512-bit vector work only issues on ports 0 and 5, one fewer
/// that can only use port 0. The 3-bit decode is what bounds the `M = 1` product.
#[inline(always)]
pub(crate) fn codes_at<const B: usize>(block: &[[u32; LANES]; B], j: usize) -> [f32; LANES] {
    let at = code_at(B, j);
    let pos = code_shift(B);
    let mask = ((1u32 << at.width) - 1) << pos;
    let mut q = [0f32; LANES];
    for l in 0..LANES {
        let mut v = align(block[at.word][l], at.bit, pos) & mask;
        if let Some((word, bit)) = at.top {
            let top = pos + at.width;
            v |= align(block[word][l], bit, top) & (1 << top);
        }
        q[l] = f32::from_bits(v | DECODE_ONE);
    }
    q
}

/// `word` shifted so that its bit `from` lands on bit `to`.
#[inline(always)]
fn align(word: u32, from: usize, to: usize) -> u32 {
    if from >= to {
        word >> (from - to)
    } else {
        word << (to - from)
    }
}

/// Blocks ahead of the current one whose code lines are prefetched into L1, and further ahead
/// into L2: the hardware prefetcher alone leaves a single core's stream latency-bound while it
/// also decodes, and it stops at each 4 KiB page. Measured on LLaMA-7B's shapes with the
/// weights streaming from memory (3-bit g128, 1 row, interleaved runs): 8 blocks ahead into
/// L1 only, 5.0–5.5 ms a layer; 16 into L1 and 64 or 128 into L2, 4.0–4.4 ms (docs/serve.md,
/// session 33).
pub(crate) const PREFETCH_BLOCKS: usize = 16;
/// See [`PREFETCH_BLOCKS`].
pub(crate) const PREFETCH_L2_BLOCKS: usize = 64;

/// Hints the cache lines of the blocks [`PREFETCH_BLOCKS`] and [`PREFETCH_L2_BLOCKS`] after
/// block `blk` (possibly past this tile: the next tile follows in memory; out-of-range
/// addresses are only computed, never read).
#[inline(always)]
pub(crate) fn prefetch_ahead<const B: usize>(codes: &[[u32; LANES]], blk: usize) {
    let near = codes.as_ptr().wrapping_add((blk + PREFETCH_BLOCKS) * B);
    let far = codes.as_ptr().wrapping_add((blk + PREFETCH_L2_BLOCKS) * B);
    for i in 0..B {
        super::prefetch(near.wrapping_add(i));
        super::prefetch_l2(far.wrapping_add(i));
    }
}

#[inline(always)]
pub(crate) fn block_at<const B: usize>(codes: &[[u32; LANES]], blk: usize) -> &[[u32; LANES]; B] {
    codes[blk * B..(blk + 1) * B]
        .try_into()
        .expect("tile holds whole blocks")
}

/// Expands `$body` 32 times with `$j` a constant `0..32`: LLVM does not fully unroll the
/// block loop by itself, and only constant `j` turns the word index and shift of each code
/// into immediates (and the 3-bit top-bit test into nothing).
macro_rules! unroll_block {
    ($j:ident => $body:expr) => {
        unroll_block!(@ $j, $body; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
                                   16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31)
    };
    (@ $j:ident, $body:expr; $($n:literal)*) => {
        $({
            const $j: usize = $n;
            $body;
        })*
    };
}
pub(crate) use unroll_block;

/// Accumulators: `S` independent sets of `M × LANES`, so that at small `M` consecutive
/// FMAs do not wait on each other (one chain would be bound by the FMA latency).
pub(crate) type Acc<const M: usize, const S: usize> = [[[f32; LANES]; M]; S];

/// `acc[·][m] += Σ_j coef[m][j] · q_j` over one block: the shared inner loop of both dims.
#[inline(always)]
fn block_fma<const B: usize, const M: usize, const S: usize, A: Madd>(
    block: &[[u32; LANES]; B],
    coef: [&[f32; BLOCK]; M],
    acc: &mut Acc<M, S>,
) {
    unroll_block!(J => {
        let q = codes_at::<B>(block, J);
        let set = &mut acc[J % S];
        for m in 0..M {
            let c = coef[m][J];
            for l in 0..LANES {
                set[m][l] = A::madd(c, q[l], set[m][l]);
            }
        }
    });
}

/// Sum of the `S` accumulator sets.
#[inline(always)]
fn reduce<const M: usize, const S: usize>(acc: &Acc<M, S>) -> [[f32; LANES]; M] {
    let mut out = acc[0];
    for set in &acc[1..] {
        for m in 0..M {
            for l in 0..LANES {
                out[m][l] += set[m][l];
            }
        }
    }
    out
}

#[inline(always)]
fn rows_at<const M: usize>(x: &[f32], stride: usize, k0: usize) -> [&[f32; BLOCK]; M] {
    std::array::from_fn(|m| {
        x[m * stride + k0..m * stride + k0 + BLOCK]
            .try_into()
            .expect("block inside the row")
    })
}

/// Per-OC tile `t` (16 rows of `W`): dot-product-like along `k`. Within a group the scale
/// and zero are constant per lane, so `Σ_k x_k (q̃_k − z̃)s̃ = s̃·Σ_k x_k q̃_k − z̃·s̃·Σ_k x_k`
/// (decoded codes `q̃`, see [`decoded_scale_zero`]): the codes meet `x` unscaled, and
/// `xsum[m][g] = Σ_{k∈g} x_k` is shared by all tiles.
#[inline(always)]
pub(crate) fn oc_tile<const B: usize, const M: usize, const S: usize, A: Madd>(
    w: &CpuPacked,
    x: &[f32],
    xsum: &[f32],
    t: usize,
    out: &mut [[f32; LANES]],
) {
    let k = w.k_pad;
    let groups = w.groups_along_k();
    let blocks_per_group = w.group_size / BLOCK;
    let codes = w.tile_codes(t);
    let mut y = [[0f32; LANES]; M];
    for g in 0..groups {
        let mut acc = [[[0f32; LANES]; M]; S];
        for blk in g * blocks_per_group..(g + 1) * blocks_per_group {
            prefetch_ahead::<B>(codes, blk);
            block_fma::<B, M, S, A>(
                block_at::<B>(codes, blk),
                rows_at::<M>(x, k, blk * BLOCK),
                &mut acc,
            );
        }
        let acc = reduce(&acc);
        let at = (t * groups + g) * LANES;
        let (sv, zv) = (&w.scales[at..at + LANES], &w.zeros[at..at + LANES]);
        let sz: [(f32, f32); LANES] =
            std::array::from_fn(|l| decoded_scale_zero::<B>(h2f(sv[l]), h2f(zv[l])));
        // Lanes innermost, so that the epilogue is vector code: with groups of 32 it runs once
        // per 32 code vectors, and as a scalar loop it cost as much as they did at M = 8.
        for m in 0..M {
            let xs = xsum[m * groups + g];
            for l in 0..LANES {
                y[m][l] = A::madd(sz[l].0, acc[m][l], y[m][l]) - sz[l].1 * xs;
            }
        }
    }
    out[..M].copy_from_slice(&y);
}

/// Per-IC coefficients of one group over all `k`: `coef[m][k] = x[m][k]·s̃_k` (written into
/// `coef`, `M` rows of `k_pad`), and returns the zero terms `Σ_k x[m][k]·s̃_k·z̃_k`, with
/// `s̃, s̃·z̃` from [`decoded_scale_zero`].
///
/// One vectorised pass per group, written over `[_; LANES]` chunks (`as_chunks`) so that
/// every access is in bounds by construction: the former indexed loop (`coef[m·k + kk]`)
/// kept bounds checks that LLVM could not hoist, so it vectorised half of each 16-wide
/// chunk behind alias checks and ran the rest scalar, a quarter of the per-IC time at
/// `M = 1`. Now it is a few percent (`k/16` vector steps against the tiles' `k·tiles`).
#[inline(always)]
fn ic_coefficients<const B: usize, const M: usize, A: Madd>(
    x_pad: &[f32],
    s: &[u16],
    z: &[u16],
    coef: &mut [f32],
) -> [f32; M] {
    let k = s.len();
    let (s, z) = (s.as_chunks::<LANES>().0, z.as_chunks::<LANES>().0);
    let mut zterm = [0f32; M];
    for (m, (c, x)) in coef
        .chunks_exact_mut(k)
        .zip(x_pad.chunks_exact(k))
        .enumerate()
    {
        // Lane-wise partial sums keep the reduction vectorisable (float adds don't reassociate).
        let mut zt = [0f32; LANES];
        for (((c, x), s), z) in c
            .as_chunks_mut::<LANES>()
            .0
            .iter_mut()
            .zip(x.as_chunks::<LANES>().0)
            .zip(s)
            .zip(z)
        {
            for l in 0..LANES {
                let (sv, zs) = decoded_scale_zero::<B>(h2f(s[l]), h2f(z[l]));
                c[l] = x[l] * sv;
                zt[l] = A::madd(x[l], zs, zt[l]);
            }
        }
        zterm[m] = zt.iter().sum();
    }
    zterm
}

/// How a SIMD path computes [`ic_coefficients`]: the portable code, or intrinsics where LLVM
/// makes poor code of it.
pub(crate) trait IcCoefficients {
    /// [`ic_coefficients`]'s contract. Unsafe: the path's CPU features must be present.
    unsafe fn run<const B: usize, const M: usize, A: Madd>(
        x_pad: &[f32],
        s: &[u16],
        z: &[u16],
        coef: &mut [f32],
    ) -> [f32; M];
}

/// [`ic_coefficients`] itself.
pub(crate) struct PortableCoefficients;

impl IcCoefficients for PortableCoefficients {
    #[inline(always)]
    unsafe fn run<const B: usize, const M: usize, A: Madd>(
        x_pad: &[f32],
        s: &[u16],
        z: &[u16],
        coef: &mut [f32],
    ) -> [f32; M] {
        ic_coefficients::<B, M, A>(x_pad, s, z, coef)
    }
}

/// [`ic_coefficients`] in AVX-512 intrinsics. From the portable code LLVM keeps the zero
/// term's 16 lanes on the stack, so every step waits on the last one's store (a sixth of the
/// per-IC time at `M = 8`); here they stay in registers, and each 16 scales and zeros are
/// widened once for all `M` rows instead of once per row. The zero term is summed in another
/// order than the portable code's, so the two differ in the last bits.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx512Coefficients;

#[cfg(target_arch = "x86_64")]
impl IcCoefficients for Avx512Coefficients {
    /// Safety: the CPU has AVX-512F (the caller is compiled for it).
    #[inline(always)]
    unsafe fn run<const B: usize, const M: usize, A: Madd>(
        x_pad: &[f32],
        s: &[u16],
        z: &[u16],
        coef: &mut [f32],
    ) -> [f32; M] {
        use std::arch::x86_64::*;
        let k = s.len();
        assert!(
            k.is_multiple_of(LANES) && z.len() == k && x_pad.len() == M * k && coef.len() == M * k,
            "coefficients of {M} rows of {k} values"
        );
        // SAFETY (every intrinsic below): the CPU has AVX-512F (this function's contract); each
        // load and store reads or writes 16 values at `i < k` (a multiple of 16) within a row
        // of `k`, inside the buffers checked above.
        unsafe {
            let two_b = _mm512_set1_ps((1u32 << B) as f32);
            let mut zt = [_mm512_setzero_ps(); M];
            for i in (0..k).step_by(LANES) {
                let widen =
                    |h: &[u16]| _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().add(i).cast()));
                let (sv, zv) = (widen(s), widen(z));
                // `decoded_scale_zero`, 16 lanes at a time.
                let (scale, zero) = (
                    _mm512_mul_ps(sv, two_b),
                    _mm512_mul_ps(sv, _mm512_add_ps(zv, two_b)),
                );
                for (m, zt) in zt.iter_mut().enumerate() {
                    let x = _mm512_loadu_ps(x_pad.as_ptr().add(m * k + i));
                    _mm512_storeu_ps(coef.as_mut_ptr().add(m * k + i), _mm512_mul_ps(x, scale));
                    *zt = _mm512_fmadd_ps(x, zero, *zt);
                }
            }
            zt.map(|v| _mm512_reduce_add_ps(v))
        }
    }
}

/// Per-IC group `gi` (`group_size` consecutive outputs = `group_size/16` tiles): axpy-like
/// over the rows `k` of `Wᵀ`. Scale and zero are constant along a row within the group, so
/// they fold into the activation once per group: `coef[m][k] = x_k·s̃_k`, and the zero term
/// `Σ_k x_k·s̃_k·z̃_k` is one number per group, subtracted at the end (see
/// [`ic_coefficients`]; `s̃, z̃` are the scale and zero of the decoded codes). The tiles
/// then only run `acc += coef[m][k] · q̃[k, lanes]`, the same inner loop as per-OC.
#[inline(always)]
pub(crate) fn ic_group<
    const B: usize,
    const M: usize,
    const S: usize,
    A: Madd,
    Cf: IcCoefficients,
>(
    w: &CpuPacked,
    x_pad: &[f32],
    gi: usize,
    coef: &mut Vec<f32>,
    out: &mut [[f32; LANES]],
) {
    let k = w.k_pad;
    coef.resize(M * k, 0.0);
    // SAFETY: `ic_group` is only compiled into the path functions whose features `Cf` needs.
    let zterm = unsafe {
        Cf::run::<B, M, A>(
            &x_pad[..M * k],
            &w.scales[gi * k..(gi + 1) * k],
            &w.zeros[gi * k..(gi + 1) * k],
            &mut coef[..M * k],
        )
    };
    let tiles = w.group_size / LANES;
    for tt in 0..tiles {
        let codes = w.tile_codes(gi * tiles + tt);
        let mut acc = [[[0f32; LANES]; M]; S];
        for blk in 0..k / BLOCK {
            prefetch_ahead::<B>(codes, blk);
            block_fma::<B, M, S, A>(
                block_at::<B>(codes, blk),
                rows_at::<M>(coef, k, blk * BLOCK),
                &mut acc,
            );
        }
        let acc = reduce(&acc);
        for m in 0..M {
            for l in 0..LANES {
                out[tt * M + m][l] = acc[m][l] - zterm[m];
            }
        }
    }
}
