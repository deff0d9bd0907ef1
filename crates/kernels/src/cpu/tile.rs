//! The per-tile kernels, written once as portable Rust over fixed-size lane arrays and
//! compiled once per SIMD path (see [`super::simd`]): under `#[target_feature]` LLVM turns
//! every `for l in 0..LANES` loop into one or two vector instructions.

use super::f16::h2f;
use super::layout::{BLOCK, CpuPacked, LANES};

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

/// Codes `j` (of the block's 32) of all 16 lanes, as f32. `B` words hold the block, so the
/// word and shift are compile-time constants once `j` is unrolled; 3-bit codes 10 and 21
/// straddle two words.
#[inline(always)]
fn codes_at<const B: usize>(block: &[[u32; LANES]; B], j: usize) -> [f32; LANES] {
    let bit = j * B;
    let (w, s) = (bit / 32, bit % 32);
    let mask = ((1u64 << B) - 1) as u32;
    let mut q = [0f32; LANES];
    for l in 0..LANES {
        let mut v = block[w][l] >> s;
        if s + B > 32 {
            v |= block[w + 1][l] << (32 - s);
        }
        q[l] = (v & mask) as i32 as f32;
    }
    q
}

/// Blocks ahead of the current one whose code lines are prefetched: the hardware prefetcher
/// alone leaves a single core's stream latency-bound while it also decodes.
const PREFETCH_BLOCKS: usize = 8;

/// Hints the cache lines of block `blk` (possibly past this tile: the next tile follows in
/// memory; a prefetch never faults, and out-of-range addresses are only computed, not read).
#[inline(always)]
fn prefetch_block<const B: usize>(codes: &[[u32; LANES]], blk: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let base = codes.as_ptr().wrapping_add(blk * B);
        for i in 0..B {
            // SAFETY: prefetching has no memory-safety effect, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    base.wrapping_add(i) as *const i8,
                )
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (codes, blk);
}

#[inline(always)]
fn block_at<const B: usize>(codes: &[[u32; LANES]], blk: usize) -> &[[u32; LANES]; B] {
    codes[blk * B..(blk + 1) * B]
        .try_into()
        .expect("tile holds whole blocks")
}

/// Expands `$body` 32 times with `$j` a constant `0..32`: LLVM does not fully unroll the
/// block loop by itself, and only constant `j` turns the word index and shift of each code
/// into immediates (and the 3-bit straddle test into nothing).
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
/// and zero are constant per lane, so `Σ_k x_k (q_k − z)s = s·Σ_k x_k q_k − z·s·Σ_k x_k`:
/// the codes meet `x` unscaled, and `xsum[m][g] = Σ_{k∈g} x_k` is shared by all tiles.
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
            prefetch_block::<B>(codes, blk + PREFETCH_BLOCKS);
            block_fma::<B, M, S, A>(
                block_at::<B>(codes, blk),
                rows_at::<M>(x, k, blk * BLOCK),
                &mut acc,
            );
        }
        let acc = reduce(&acc);
        let at = (t * groups + g) * LANES;
        let (sv, zv) = (&w.scales[at..at + LANES], &w.zeros[at..at + LANES]);
        for l in 0..LANES {
            let s = h2f(sv[l]);
            let zs = s * h2f(zv[l]);
            for m in 0..M {
                y[m][l] = A::madd(s, acc[m][l], y[m][l]) - zs * xsum[m * groups + g];
            }
        }
    }
    out[..M].copy_from_slice(&y);
}

/// Per-IC group `gi` (`group_size` consecutive outputs = `group_size/16` tiles): axpy-like
/// over the rows `k` of `Wᵀ`. Scale and zero are constant along a row within the group, so
/// they fold into the activation once per group: `coef[m][k] = x_k·s_k`, and the zero term
/// `Σ_k x_k·z_k·s_k` is one number per group, subtracted at the end. The tiles then only
/// run `acc += coef[m][k] · q[k, lanes]`.
#[inline(always)]
pub(crate) fn ic_group<const B: usize, const M: usize, const S: usize, A: Madd>(
    w: &CpuPacked,
    x_pad: &[f32],
    gi: usize,
    coef: &mut Vec<f32>,
    out: &mut [[f32; LANES]],
) {
    let k = w.k_pad;
    coef.clear();
    coef.resize(M * k, 0.0);
    let (s, z) = (
        &w.scales[gi * k..(gi + 1) * k],
        &w.zeros[gi * k..(gi + 1) * k],
    );
    // Lane-wise partial sums keep the reduction vectorisable (float adds don't reassociate).
    let mut zt = [[0f32; LANES]; M];
    // Indexed lanes on purpose: the same `l` addresses five arrays in lock step.
    #[allow(clippy::needless_range_loop)]
    for c in 0..k / LANES {
        for l in 0..LANES {
            let kk = c * LANES + l;
            let sv = h2f(s[kk]);
            let zs = sv * h2f(z[kk]);
            for m in 0..M {
                let xv = x_pad[m * k + kk];
                coef[m * k + kk] = xv * sv;
                zt[m][l] = A::madd(xv, zs, zt[m][l]);
            }
        }
    }
    let zterm: [f32; M] = std::array::from_fn(|m| zt[m].iter().sum());
    let tiles = w.group_size / LANES;
    for tt in 0..tiles {
        let codes = w.tile_codes(gi * tiles + tt);
        let mut acc = [[[0f32; LANES]; M]; S];
        for blk in 0..k / BLOCK {
            prefetch_block::<B>(codes, blk + PREFETCH_BLOCKS);
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
