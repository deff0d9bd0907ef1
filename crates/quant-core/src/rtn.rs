//! Round-to-nearest asymmetric group quantization (docs/method.md §2).
//!
//! The per-group math lives in [`GroupParams`]; GPTQ reuses it column by column, so RTN and GPTQ
//! round identically.

use rayon::prelude::*;

use crate::quantized::transpose_into;
use crate::range::{RangeMode, search_range};
use crate::{QuantConfig, QuantError, Quantized};

/// 2²³: from here on, consecutive f32 values are 1 apart.
const TWO_23: f32 = 8_388_608.0;

/// Smallest range a group may have; keeps `scale` finite for constant groups (docs/method.md §2).
const MIN_RANGE: f32 = 1e-5;

/// Scale and zero point of one group: `ŵ = (q − zero) · scale`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    /// An integer in `0..=maxq`, stored as f32 because the dequantization formula uses it so.
    pub zero: f32,
}

impl GroupParams {
    /// docs/method.md §2 from a group's extremes: `scale = max(max − min, 1e-5) / maxq`,
    /// `zero = clamp(−round(min / scale), 0, maxq)`, rounding half to even.
    pub fn from_range(min: f32, max: f32, maxq: u32) -> Self {
        let maxq = maxq as f32;
        let scale = (max - min).max(MIN_RANGE) / maxq;
        // `+ 0.0` turns a `-0.0` zero point into `+0.0` so it prints and serializes plainly.
        let zero = (-round_half_even(min / scale)).clamp(0.0, maxq) + 0.0;
        Self { scale, zero }
    }

    /// Symmetric parameters (docs/method.md §2.2) for a group of largest magnitude `absmax`:
    /// `scale = max(2·absmax, 1e-5) / maxq`, `zero = (maxq + 1) / 2`, set exactly rather than
    /// rounded from `absmax / scale`, which f32 may put a hair below the half.
    pub fn symmetric(absmax: f32, maxq: u32) -> Self {
        Self {
            scale: (2.0 * absmax).max(MIN_RANGE) / maxq as f32,
            zero: centre_code(maxq),
        }
    }

    /// The parameters of the range `[min, max]`: asymmetric, or with `sym` the symmetric ones
    /// of the range's largest magnitude.
    #[inline(always)]
    pub fn of_range(min: f32, max: f32, maxq: u32, sym: bool) -> Self {
        if sym {
            Self::symmetric(min.abs().max(max.abs()), maxq)
        } else {
            Self::from_range(min, max, maxq)
        }
    }

    /// docs/method.md §2 parameters of the group `w` (its own min and max).
    #[inline(always)]
    pub fn of_group(w: &[f32], maxq: u32) -> Self {
        let (min, max) = min_max(w);
        Self::from_range(min, max, maxq)
    }

    /// GPTQ's quantizer range: the group's min capped at ≤ 0 and max at ≥ 0 (docs/method.md §3, per-OC),
    /// so that 0 is always representable.
    pub fn of_group_gptq(w: &[f32], maxq: u32) -> Self {
        let (min, max) = min_max(w);
        Self::from_range(min.min(0.0), max.max(0.0), maxq)
    }

    /// The code of `w`: `clamp(round(w / scale) + zero, 0, maxq)`.
    ///
    /// A true division (not a multiplication by `1/scale`) so ties round exactly as the reference.
    #[inline(always)]
    pub fn code(&self, w: f32, maxq: u32) -> u8 {
        let q = (round_half_even(w / self.scale) + self.zero).clamp(0.0, maxq as f32);
        // `q` is an integer in 0..=maxq, so after adding 2²³ its low mantissa byte is `q`. This
        // vectorizes; `as u8` (a saturating conversion) stays scalar on x86 and made this step
        // the slowest of RTN.
        (q + TWO_23).to_bits() as u8
    }

    /// The dequantized value of `code`.
    #[inline]
    pub fn dequant(&self, code: u8) -> f32 {
        (code as f32 - self.zero) * self.scale
    }
}

/// The zero point of every symmetric group (docs/method.md §2.2): `(maxq + 1) / 2`, 4 at 3 bits.
pub fn centre_code(maxq: u32) -> f32 {
    maxq.div_ceil(2) as f32
}

/// `f32::round_ties_even`, bit for bit, in a form the compiler vectorizes.
///
/// Without SSE4.1 in the target baseline, `round_ties_even` is a libm call per element and caps
/// RTN at a few hundred MB/s. Adding 2²³ to `|x| < 2²³` lands in `[2²³, 2²⁴)`, where the f32 spacing
/// is exactly 1, so the hardware's round-to-nearest-even addition does the rounding; larger
/// magnitudes are already integers.
#[inline]
pub fn round_half_even(x: f32) -> f32 {
    let a = x.abs();
    let r = if a < TWO_23 { (a + TWO_23) - TWO_23 } else { a };
    // copysign keeps −0.0 and NaN as `round_ties_even` does.
    if x.is_nan() { x } else { r.copysign(x) }
}

/// Min and max of a group, with eight independent lanes so the loop vectorizes.
#[inline(always)]
pub(crate) fn min_max(w: &[f32]) -> (f32, f32) {
    const L: usize = 8;
    let mut lo = [f32::INFINITY; L];
    let mut hi = [f32::NEG_INFINITY; L];
    let chunks = w.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..L {
            lo[k] = lo[k].min(c[k]);
            hi[k] = hi[k].max(c[k]);
        }
    }
    for (k, &x) in tail.iter().enumerate() {
        lo[k] = lo[k].min(x);
        hi[k] = hi[k].max(x);
    }
    (
        lo.iter().copied().fold(f32::INFINITY, f32::min),
        hi.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    )
}

/// Quantizes one group with its own parameters (docs/method.md §2, symmetric with `sym` (§2.2),
/// or the searched range of §2.1 with the weights' input moments `h`), writing codes and
/// returning the parameters.
#[inline(always)]
pub(crate) fn quantize_group(
    w: &[f32],
    h: Option<&[f32]>,
    range: RangeMode,
    sym: bool,
    maxq: u32,
    codes: &mut [u8],
) -> GroupParams {
    let (lo, hi) = min_max(w);
    let p = match range {
        RangeMode::MinMax => GroupParams::of_range(lo, hi, maxq, sym),
        RangeMode::Search => search_range(w, h, lo, hi, maxq, sym),
    };
    for (c, &x) in codes.iter_mut().zip(w) {
        *c = p.code(x, maxq);
    }
    p
}

/// Index of the first NaN/Inf in `w`, if any.
pub(crate) fn check_finite(w: &[f32]) -> Result<(), QuantError> {
    match w.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(QuantError::NonFiniteWeight { index }),
        None => Ok(()),
    }
}

/// Whether `w` has no NaN/Inf: a branch-free fold, so it vectorizes where `check_finite`'s early
/// exit does not. RTN runs it on each group while the group is in cache instead of making a
/// separate pass over the whole weight.
#[inline(always)]
fn all_finite(w: &[f32]) -> bool {
    w.iter().fold(true, |ok, x| ok & x.is_finite())
}

/// The per-group step of RTN in both layouts: checks `w` for NaN/Inf (`None`), else quantizes it
/// into `codes` and returns its parameters.
///
/// On AVX-512 CPUs this runs a build of the same code for AVX-512, about 1.5× faster than the
/// x86-64 baseline (SSE2) build on 16-lane divisions and narrowing stores. (An AVX2 build was
/// slower than SSE2: LLVM left `min_max` scalar there.) Every step is an exact IEEE operation, so
/// both builds give the same bits.
#[inline]
fn rtn_group(g: Group<'_>, codes: &mut [u8]) -> Option<GroupParams> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { rtn_group_avx512(g, codes) };
        }
    }
    rtn_group_portable(g, codes)
}

/// One group's weights and what its parameters are chosen by.
#[derive(Clone, Copy)]
struct Group<'a> {
    w: &'a [f32],
    /// The input moments of `w`'s weights (per-OC range search only).
    h: Option<&'a [f32]>,
    range: RangeMode,
    sym: bool,
    maxq: u32,
}

#[inline(always)]
fn rtn_group_portable(g: Group<'_>, codes: &mut [u8]) -> Option<GroupParams> {
    // A plain `if`: `bool::then` stays an outlined call, compiled without the caller's features.
    if all_finite(g.w) {
        Some(quantize_group(g.w, g.h, g.range, g.sym, g.maxq, codes))
    } else {
        None
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn rtn_group_avx512(g: Group<'_>, codes: &mut [u8]) -> Option<GroupParams> {
    rtn_group_portable(g, codes)
}

/// RTN of a weight `W [out_features, in_features]` (row-major, HF layout) with `config`.
///
/// Both dims run the same per-group step on the grouped layout; per-IC gathers `Wᵀ` one small
/// tile at a time instead of transposing the whole weight first. Errors on a wrong length, an
/// empty shape, a group size that does not divide the grouped dimension, or a NaN/Inf weight
/// (reporting the first one in `w`).
pub fn quantize_rtn(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    config: QuantConfig,
) -> Result<Quantized, QuantError> {
    quantize_rtn_with(
        w,
        out_features,
        in_features,
        config,
        RangeMode::MinMax,
        None,
    )
}

/// [`quantize_rtn`] with each group's range chosen by `range`. With [`RangeMode::Search`],
/// `moments` (the calibration inputs' `E[x_k²]`, one per input channel) weights the error of
/// per-OC groups, whose weights read different inputs (docs/method.md §2.1); per-IC groups read
/// one input each, so it does not change their search.
pub fn quantize_rtn_with(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    config: QuantConfig,
    range: RangeMode,
    moments: Option<&[f32]>,
) -> Result<Quantized, QuantError> {
    let config = QuantConfig::new(config.bits, config.group_size, config.dim)?.with_sym(config.sym);
    let group_size = config.check_shape(out_features, in_features)?;
    if w.len() != out_features * in_features {
        return Err(QuantError::Shape(format!(
            "weight has {} elements, expected {out_features} × {in_features}",
            w.len()
        )));
    }
    if let Some(m) = moments.filter(|m| m.len() != in_features) {
        return Err(QuantError::Shape(format!(
            "{} input moments for a weight with {in_features} inputs",
            m.len()
        )));
    }
    let (rows, cols) = config.dim.grouped_shape(out_features, in_features);
    let groups = rows * (cols / group_size);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; groups];
    let mut zeros = vec![0f32; groups];
    let out = GroupedOut {
        codes: &mut codes,
        scales: &mut scales,
        zeros: &mut zeros,
    };
    let group = Group {
        w: &[],
        h: None,
        range,
        sym: config.sym,
        maxq: config.maxq(),
    };
    let moments = moments.filter(|_| range == RangeMode::Search);
    let finite = match config.dim {
        crate::QuantDim::Oc => quantize_rows(w, group_size, group, moments, out),
        crate::QuantDim::Ic => quantize_columns(w, in_features, group_size, group, out),
    };
    if !finite {
        // Rare, so the index of the first NaN/Inf comes from a second, scalar pass.
        check_finite(w)?;
        unreachable!("RTN saw a non-finite group in a finite weight");
    }
    Ok(Quantized {
        config,
        out_features,
        in_features,
        group_size,
        codes,
        scales,
        zeros,
    })
}

/// Outputs for some grouped rows: `codes [rows, cols]`, `scales` and `zeros [rows, cols / g]`.
struct GroupedOut<'a> {
    codes: &'a mut [u8],
    scales: &'a mut [f32],
    zeros: &'a mut [f32],
}

/// Writes a group's parameters; `false` for a non-finite group.
fn store(p: Option<GroupParams>, scale: &mut f32, zero: &mut f32) -> bool {
    let Some(p) = p else { return false };
    (*scale, *zero) = (p.scale, p.zero);
    true
}

/// Per-OC: `w` is already the grouped layout, so its groups are consecutive runs of `g`, and
/// group `j` of a row reads inputs `j·g .. (j+1)·g` (whose `moments` weight its range search).
/// Returns `false` if some group holds a NaN/Inf.
fn quantize_rows(
    w: &[f32],
    g: usize,
    group: Group<'_>,
    moments: Option<&[f32]>,
    out: GroupedOut,
) -> bool {
    // Groups are independent; a parallel chunk of ≥ 64 KiB of weights keeps rayon's overhead small.
    let per_task = (16 * 1024 / g).max(1);
    let groups_per_row = moments.map_or(1, |m| m.len() / g);
    out.codes
        .par_chunks_mut(g * per_task)
        .zip(w.par_chunks(g * per_task))
        .zip(out.scales.par_chunks_mut(per_task))
        .zip(out.zeros.par_chunks_mut(per_task))
        .enumerate()
        .all(|(t, (((codes, w), scales), zeros))| {
            codes
                .chunks_mut(g)
                .zip(w.chunks(g))
                .zip(scales.iter_mut())
                .zip(zeros.iter_mut())
                .enumerate()
                .all(|(i, (((c, w), s), z))| {
                    let j = (t * per_task + i) % groups_per_row;
                    let h = moments.map(|m| &m[j * g..(j + 1) * g]);
                    store(rtn_group(Group { w, h, ..group }, c), s, z)
                })
        })
}

/// Per-IC: grouped row `k` is column `k` of `w [cols, rows]` (`rows` = in_features).
/// Returns `false` if some group holds a NaN/Inf.
///
/// A task owns a few grouped rows (so its outputs are contiguous) and walks down their columns of
/// `w` one group at a time, transposing each `g × k` tile into a small buffer that stays in
/// cache. This reads `w` once, where transposing it whole would write and reread 4 bytes more
/// per weight.
fn quantize_columns(w: &[f32], rows: usize, g: usize, group: Group<'_>, out: GroupedOut) -> bool {
    let cols = w.len() / rows;
    let groups_per_row = cols / g;
    // Long runs of each row of `w` (up to 2 KiB) keep the hardware prefetcher busy; ≥ 16 reads
    // whole cache lines; about 64 Ki weights (256 KiB) keeps the tile in L2 for g ≤ 4096.
    let tile_rows = (64 * 1024 / g).clamp(16, 512);
    // An odd number of cache lines between tile rows: a power-of-two stride would put the
    // transpose's writes in a few L1 sets.
    let stride = g.next_multiple_of(32) + 16;
    out.codes
        .par_chunks_mut(tile_rows * cols)
        .zip(out.scales.par_chunks_mut(tile_rows * groups_per_row))
        .zip(out.zeros.par_chunks_mut(tile_rows * groups_per_row))
        .enumerate()
        .map_init(
            || vec![0f32; tile_rows * stride],
            |tile, (t, ((codes, scales), zeros))| {
                let k0 = t * tile_rows;
                let k = codes.len() / cols;
                (0..groups_per_row).all(|j| {
                    // Rows j·g .. (j+1)·g, columns k0 .. k0+k of `w` → group j of k grouped rows.
                    transpose_into(&w[j * g * rows + k0..], rows, g, k, tile, stride);
                    (0..k).all(|r| {
                        let i = r * groups_per_row + j;
                        let c = &mut codes[r * cols + j * g..r * cols + (j + 1) * g];
                        let w = &tile[r * stride..r * stride + g];
                        let p = rtn_group(Group { w, ..group }, c);
                        store(p, &mut scales[i], &mut zeros[i])
                    })
                })
            },
        )
        .all(|finite| finite)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Groups of many lengths with ties, repeats, constants, outliers and extreme magnitudes.
    fn groups(rng: &mut StdRng) -> Vec<Vec<f32>> {
        let mut out = vec![
            vec![3.0; 16],
            vec![-2.0; 7],
            vec![0.0; 8],
            vec![-0.0, 0.0, 0.5],
        ];
        out.push(vec![f32::MAX, -f32::MAX, 1.0, 0.0]);
        out.push(vec![1e30, 1e30 + 1e24, 1e-30]);
        for _ in 0..300 {
            let len = rng.random_range(1..300);
            let scale = [1e-6f32, 1.0, 1e4][rng.random_range(0..3)];
            out.push(
                (0..len)
                    .map(|_| match rng.random_range(0..10) {
                        0 => (rng.random_range(-8.0f32..8.0)).round() / 2.0 * scale,
                        1 => rng.random_range(-30.0f32..30.0) * scale,
                        _ => rng.random_range(-1.0f32..1.0) * scale,
                    })
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn code_equals_the_saturating_cast_it_replaces() {
        let mut rng = StdRng::seed_from_u64(1);
        for w in groups(&mut rng) {
            for maxq in [3, 7, 15, 255] {
                let p = GroupParams::of_group(&w, maxq);
                for &x in &w {
                    let q = (round_half_even(x / p.scale) + p.zero).clamp(0.0, maxq as f32);
                    assert_eq!(p.code(x, maxq), q as u8, "{x} with {p:?}");
                }
            }
        }
    }

    /// Tests run on whatever CPU builds them; the build `rtn_group` does not pick must agree too.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_and_portable_builds_agree() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx512bw") && has!("avx512vl")) {
            eprintln!("no AVX-512 here: only the portable build runs");
            return;
        }
        let mut rng = StdRng::seed_from_u64(2);
        let mut all = groups(&mut rng);
        all.push(vec![1.0, f32::NAN, 2.0]);
        all.push(vec![f32::NEG_INFINITY; 20]);
        for w in all {
            for (maxq, range, sym) in [3, 7, 15, 255].into_iter().flat_map(|q| {
                [RangeMode::MinMax, RangeMode::Search]
                    .into_iter()
                    .flat_map(move |r| [(q, r, false), (q, r, true)])
            }) {
                let mut a = vec![0u8; w.len()];
                let mut b = vec![0u8; w.len()];
                let g = Group {
                    w: &w,
                    h: None,
                    range,
                    sym,
                    maxq,
                };
                // SAFETY: the features were detected above.
                let pa = unsafe { rtn_group_avx512(g, &mut a) };
                let pb = rtn_group_portable(g, &mut b);
                assert_eq!(pa.is_some(), w.iter().all(|x| x.is_finite()));
                assert_eq!(pa, pb, "{w:?}");
                if pa.is_some() {
                    assert_eq!(a, b, "{w:?}");
                }
            }
        }
    }
}
