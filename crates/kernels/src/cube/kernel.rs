//! The CubeCL kernels. Shared pieces (block decode, parameter decode) are written once; the
//! per-IC and per-OC kernels differ in which axis of the packed block is the output axis, and so
//! in how K is split: over cubes with f32 partials for per-IC, over the lanes of a cube with a
//! shared-memory reduction for per-OC (see the module docs of [`super`]).

use cubecl::prelude::*;

/// Codes in one packed block: 32 codes of `b` bits fill exactly `b` words for every `b`.
pub const BLOCK: usize = 32;
/// Units per cube (1-D) of both kernels.
pub const CUBE_UNITS: usize = 64;

/// Loads the `bits` words of one 32-code block (`Vector` loads of `vec = N` words, `vec | bits`)
/// and unpacks it into 32 codes as f32, so the hot loops below work on registers only.
#[cube]
fn decode_block<N: Size>(
    qweight: &Array<Vector<u32, N>>,
    first_vector: usize,
    #[comptime] bits: u32,
    #[comptime] vec: usize,
) -> Array<f32> {
    let mut words = Array::<u32>::new(comptime!(bits as usize));
    #[unroll]
    for v in 0..comptime!(bits as usize / vec) {
        let loaded = qweight[first_vector + v];
        #[unroll]
        for e in 0..N::value() {
            words[v * N::value() + e] = loaded[e];
        }
    }
    let mask = (1u32 << bits) - 1;
    let mut codes = Array::<f32>::new(BLOCK);
    #[unroll]
    for j in 0..BLOCK {
        // Constant-folded after unrolling: the shifts are fixed per code position.
        let bit = j as u32 * bits;
        let w = (bit / 32) as usize;
        let s = bit % 32;
        let mut code = words[w] >> s;
        if s + bits > 32 {
            code |= words[w + 1] << (32 - s);
        }
        codes[j] = f32::cast_from(code & mask);
    }
    codes
}

/// `(scale, zero)` from one parameter word: f16 scale bits in the low half, integer zero in the
/// high half. Decoding f16 by hand keeps the kernels free of any f16 device requirement.
#[cube]
fn decode_params(word: u32) -> (f32, f32) {
    let h = word & 0xFFFF;
    let exp = (h >> 10) & 0x1F;
    let mant = h & 0x3FF;
    let sign = (h & 0x8000) << 16;
    let normal = f32::reinterpret(sign | ((exp + 112) << 23) | (mant << 13));
    // Subnormal f16 scales occur for nearly constant groups: mant · 2⁻²⁴.
    let subnormal = f32::cast_from(mant) * 5.960_464_5e-8;
    let scale = select(exp == 0, subnormal, normal);
    (scale, f32::cast_from(word >> 16))
}

/// Per-IC: the packed matrix is `Ŵᵀ [K, N]`, packed along N. Unit `(block cb, split s, m-tile)`
/// owns 32 adjacent output channels (one packed block per input row, so a plane reads one
/// contiguous span: coalesced) and walks the input rows `k` of its split, accumulating the
/// outer product `x[m, k] · ŵ[k, 32 cols]` in registers. All 32 columns share one group, so the
/// zero point is folded into one correction per token: `Σ x·s·(q − z) = Σ (x·s)·q − Σ (x·s)·z`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn quant_matmul_ic<F: Float, N: Size>(
    x: &Array<F>,
    qweight: &Array<Vector<u32, N>>,
    params: &Array<u32>,
    partial: &mut Array<f32>,
    m_total: usize,
    k_total: usize,
    n_total: usize,
    k_per_split: usize,
    #[comptime] bits: u32,
    #[comptime] vec: usize,
    #[comptime] group_blocks: usize,
    #[comptime] tm: usize,
) {
    let n_blocks = n_total / BLOCK;
    let cb = ABSOLUTE_POS_X as usize;
    if cb >= n_blocks {
        terminate!();
    }
    let split = CUBE_POS_Y as usize;
    let m0 = CUBE_POS_Z as usize * tm;
    let k_start = split * k_per_split;
    let k_end = (k_start + k_per_split).min(k_total);

    let vectors_per_row = n_blocks * comptime!(bits as usize / vec);
    let groups_per_row = n_blocks / group_blocks;
    let group = cb / group_blocks;

    let mut acc = Array::<f32>::new(comptime!(BLOCK * tm));
    let mut corr = Array::<f32>::new(tm);
    #[unroll]
    for i in 0..comptime!(BLOCK * tm) {
        acc[i] = 0.0;
    }
    #[unroll]
    for mi in 0..tm {
        corr[mi] = 0.0;
    }

    for k in k_start..k_end {
        let (scale, zero) = decode_params(params[k * groups_per_row + group]);
        let codes = decode_block::<N>(
            qweight,
            k * vectors_per_row + cb * comptime!(bits as usize / vec),
            bits,
            vec,
        );
        #[unroll]
        for mi in 0..tm {
            let m = m0 + mi;
            if m < m_total {
                let xs = f32::cast_from(x[m * k_total + k]) * scale;
                corr[mi] += xs * zero;
                #[unroll]
                for j in 0..BLOCK {
                    acc[mi * BLOCK + j] += xs * codes[j];
                }
            }
        }
    }

    #[unroll]
    for mi in 0..tm {
        let m = m0 + mi;
        if m < m_total {
            let base = (split * m_total + m) * n_total + cb * BLOCK;
            #[unroll]
            for j in 0..BLOCK {
                partial[base + j] = acc[mi * BLOCK + j] - corr[mi];
            }
        }
    }
}

/// Per-OC: the packed matrix is `Ŵ [N, K]`, packed along K. A cube of [`CUBE_UNITS`] units
/// holds `CUBE_UNITS / lanes` groups of `ru` adjacent output rows; the `lanes` adjacent units of
/// a group take the packed blocks `lane, lane + lanes, …` of each of its rows, so at every step
/// they read `lanes` adjacent blocks of a row (coalesced). Each block is dequantized once in
/// registers (32 codes sharing one scale and zero) and multiplied into the `tm` tokens of the
/// tile, each activation load serving the `ru` rows; the lanes' sums are then added in shared
/// memory (a tree over the lanes of each group) and written to `y` in the activation type, so no
/// partial sums leave the cube.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn quant_matmul_oc<F: Float, N: Size>(
    x: &Array<F>,
    qweight: &Array<Vector<u32, N>>,
    params: &Array<u32>,
    y: &mut Array<F>,
    m_total: usize,
    k_total: usize,
    n_total: usize,
    #[comptime] lanes: usize,
    #[comptime] ru: usize,
    #[comptime] bits: u32,
    #[comptime] vec: usize,
    #[comptime] group_blocks: usize,
    #[comptime] tm: usize,
) {
    let unit = UNIT_POS_X as usize;
    let lane = unit % lanes;
    // The unit's rows: `ru` adjacent ones, sharing every `x` load.
    let n0 = (CUBE_POS_X as usize * comptime!(CUBE_UNITS / lanes) + unit / lanes) * ru;
    let m0 = CUBE_POS_Z as usize * tm;
    let k_blocks = k_total / BLOCK;
    let vectors_per_row = k_blocks * comptime!(bits as usize / vec);
    let groups_per_row = k_blocks / group_blocks;

    // Offsets of the tile's tokens in `x` and of the unit's rows; tokens past `m_total` and rows
    // past `n_total` repeat the last one (their sums are never written), so the hot loop needs
    // no bounds test.
    let mut acc = Array::<f32>::new(comptime!(ru * tm));
    let mut x_row = Array::<usize>::new(tm);
    let mut w_row = Array::<usize>::new(ru);
    let mut p_row = Array::<usize>::new(ru);
    #[unroll]
    for i in 0..comptime!(ru * tm) {
        acc[i] = 0.0;
    }
    #[unroll]
    for mi in 0..tm {
        x_row[mi] = (m0 + mi).min(m_total - 1) * k_total;
    }
    #[unroll]
    for r in 0..ru {
        let n = (n0 + r).min(n_total - 1);
        w_row[r] = n * vectors_per_row;
        p_row[r] = n * groups_per_row;
    }

    // No early exit: every unit of the cube must reach the barriers below.
    if n0 < n_total {
        let mut blk = lane;
        while blk < k_blocks {
            // Dequantized once for all `tm` tokens; the `ru · tm` sums are independent chains.
            let mut w = Array::<f32>::new(comptime!(ru * BLOCK));
            #[unroll]
            for r in 0..ru {
                let (scale, zero) = decode_params(params[p_row[r] + blk / group_blocks]);
                let codes = decode_block::<N>(
                    qweight,
                    w_row[r] + blk * comptime!(bits as usize / vec),
                    bits,
                    vec,
                );
                #[unroll]
                for j in 0..BLOCK {
                    w[r * BLOCK + j] = scale * (codes[j] - zero);
                }
            }
            let x0 = blk * BLOCK;
            #[unroll]
            for j in 0..BLOCK {
                #[unroll]
                for mi in 0..tm {
                    let xv = f32::cast_from(x[x_row[mi] + x0 + j]);
                    #[unroll]
                    for r in 0..ru {
                        acc[r * tm + mi] += xv * w[r * BLOCK + j];
                    }
                }
            }
            blk += lanes;
        }
    }

    // sums[i · CUBE_UNITS + unit] for the unit's sums i = r · tm + mi: halve the active lanes of
    // every row group until lane 0 holds the totals (readers and writers of one step touch
    // disjoint lanes).
    let mut sums = SharedMemory::<f32>::new(comptime!(ru * tm * CUBE_UNITS));
    #[unroll]
    for i in 0..comptime!(ru * tm) {
        sums[i * CUBE_UNITS + unit] = acc[i];
    }
    sync_cube();
    #[unroll]
    for step in 0..comptime!(lanes.trailing_zeros() as usize) {
        let stride = lanes >> (step + 1);
        if lane < stride {
            #[unroll]
            for i in 0..comptime!(ru * tm) {
                let s = i * CUBE_UNITS + unit;
                sums[s] += sums[s + stride];
            }
        }
        sync_cube();
    }

    // Lane `l` writes the sums `l, l + lanes, …` of its group.
    let first = unit - lane;
    let mut i = lane;
    while i < comptime!(ru * tm) {
        let n = n0 + i / tm;
        let m = m0 + i % tm;
        if n < n_total && m < m_total {
            y[m * n_total + n] = F::cast_from(sums[i * CUBE_UNITS + first]);
        }
        i += lanes;
    }
}

/// Cubes of [`REDUCE_UNITS`] the split-K reduction launches at most: 1 Mi units, more than any
/// GPU runs at once, and within every device's cube count (wgpu allows 65 535 a dimension, which
/// `M · N / 256` passes at eval sizes: 2048 tokens × 11008 outputs).
pub const REDUCE_MAX_CUBES: usize = 4096;
/// Units per cube of the split-K reduction.
pub const REDUCE_UNITS: usize = 256;

/// `y[i] = Σ_s partial[s, i]`, cast to the activation type: the split-K reduction of per-IC.
/// Unit `u` of the launch's `units` sums the outputs `u, u + units, …`.
#[cube(launch_unchecked)]
pub fn reduce_splits<F: Float>(partial: &Array<f32>, y: &mut Array<F>, len: usize, splits: usize) {
    let units = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
    let mut i = ABSOLUTE_POS_X as usize;
    while i < len {
        let mut sum = 0.0f32;
        for s in 0..splits {
            sum += partial[s * len + i];
        }
        y[i] = F::cast_from(sum);
        i += units;
    }
}
