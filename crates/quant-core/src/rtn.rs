//! Round-to-nearest asymmetric group quantization (SPEC §2).
//!
//! The per-group math lives in [`GroupParams`]; GPTQ reuses it column by column, so RTN and GPTQ
//! round identically.

use rayon::prelude::*;

use crate::quantized::transpose;
use crate::{QuantConfig, QuantError, Quantized};

/// Smallest range a group may have; keeps `scale` finite for constant groups (SPEC §2).
const MIN_RANGE: f32 = 1e-5;

/// Scale and zero point of one group: `ŵ = (q − zero) · scale`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    /// An integer in `0..=maxq`, stored as f32 because the dequantization formula uses it so.
    pub zero: f32,
}

impl GroupParams {
    /// SPEC §2 from a group's extremes: `scale = max(max − min, 1e-5) / maxq`,
    /// `zero = clamp(−round(min / scale), 0, maxq)`, rounding half to even.
    pub fn from_range(min: f32, max: f32, maxq: u32) -> Self {
        let maxq = maxq as f32;
        let scale = (max - min).max(MIN_RANGE) / maxq;
        // `+ 0.0` turns a `-0.0` zero point into `+0.0` so it prints and serializes plainly.
        let zero = (-round_half_even(min / scale)).clamp(0.0, maxq) + 0.0;
        Self { scale, zero }
    }

    /// SPEC §2 parameters of the group `w` (its own min and max).
    pub fn of_group(w: &[f32], maxq: u32) -> Self {
        let (min, max) = min_max(w);
        Self::from_range(min, max, maxq)
    }

    /// GPTQ's quantizer range: the group's min capped at ≤ 0 and max at ≥ 0 (SPEC §3, per-OC),
    /// so that 0 is always representable.
    pub fn of_group_gptq(w: &[f32], maxq: u32) -> Self {
        let (min, max) = min_max(w);
        Self::from_range(min.min(0.0), max.max(0.0), maxq)
    }

    /// The code of `w`: `clamp(round(w / scale) + zero, 0, maxq)`.
    ///
    /// A true division (not a multiplication by `1/scale`) so ties round exactly as the reference.
    #[inline]
    pub fn code(&self, w: f32, maxq: u32) -> u8 {
        (round_half_even(w / self.scale) + self.zero).clamp(0.0, maxq as f32) as u8
    }

    /// The dequantized value of `code`.
    #[inline]
    pub fn dequant(&self, code: u8) -> f32 {
        (code as f32 - self.zero) * self.scale
    }
}

/// `f32::round_ties_even`, bit for bit, in a form the compiler vectorizes.
///
/// Without SSE4.1 in the target baseline, `round_ties_even` is a libm call per element and caps
/// RTN at a few hundred MB/s. Adding 2²³ to `|x| < 2²³` lands in `[2²³, 2²⁴)`, where the f32 spacing
/// is exactly 1, so the hardware's round-to-nearest-even addition does the rounding; larger
/// magnitudes are already integers.
#[inline]
pub fn round_half_even(x: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let a = x.abs();
    let r = if a < TWO_23 { (a + TWO_23) - TWO_23 } else { a };
    // copysign keeps −0.0 and NaN as `round_ties_even` does.
    if x.is_nan() { x } else { r.copysign(x) }
}

/// Min and max of a group, with eight independent lanes so the loop vectorizes.
fn min_max(w: &[f32]) -> (f32, f32) {
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

/// Quantizes one group with its own SPEC §2 parameters, writing codes and returning the parameters.
pub(crate) fn quantize_group(w: &[f32], maxq: u32, codes: &mut [u8]) -> GroupParams {
    let p = GroupParams::of_group(w, maxq);
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

/// RTN of a weight `W [out_features, in_features]` (row-major, HF layout) with `config`.
///
/// Per-IC transposes `W` into the grouped layout first and then runs the very same per-row code as
/// per-OC. Errors on a wrong length, an empty shape, a group size that does not divide the grouped
/// dimension, or a NaN/Inf weight.
pub fn quantize_rtn(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    config: QuantConfig,
) -> Result<Quantized, QuantError> {
    let config = QuantConfig::new(config.bits, config.group_size, config.dim)?;
    let group_size = config.check_shape(out_features, in_features)?;
    if w.len() != out_features * in_features {
        return Err(QuantError::Shape(format!(
            "weight has {} elements, expected {out_features} × {in_features}",
            w.len()
        )));
    }
    check_finite(w)?;
    let (rows, cols) = config.dim.grouped_shape(out_features, in_features);
    let transposed;
    let grouped: &[f32] = match config.dim {
        crate::QuantDim::Oc => w,
        crate::QuantDim::Ic => {
            transposed = transpose(w, out_features, in_features);
            &transposed
        }
    };
    let (codes, scales, zeros) = quantize_grouped(grouped, rows, cols, group_size, config.maxq());
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

/// RTN of a matrix already in the grouped layout: `(codes [rows, cols], scales, zeros [rows, cols/g])`.
fn quantize_grouped(
    grouped: &[f32],
    rows: usize,
    cols: usize,
    group_size: usize,
    maxq: u32,
) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let groups = rows * (cols / group_size);
    debug_assert_eq!(grouped.len(), rows * cols);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; groups];
    let mut zeros = vec![0f32; groups];
    // Groups are independent; a parallel chunk of ≥ 64 KiB of weights keeps rayon's overhead small.
    let per_task = (16 * 1024 / group_size).max(1);
    codes
        .par_chunks_mut(group_size * per_task)
        .zip(grouped.par_chunks(group_size * per_task))
        .zip(scales.par_chunks_mut(per_task))
        .zip(zeros.par_chunks_mut(per_task))
        .for_each(|(((codes, w), scales), zeros)| {
            for (((c, w), s), z) in codes
                .chunks_mut(group_size)
                .zip(w.chunks(group_size))
                .zip(scales.iter_mut())
                .zip(zeros.iter_mut())
            {
                let p = quantize_group(w, maxq, c);
                *s = p.scale;
                *z = p.zero;
            }
        });
    (codes, scales, zeros)
}
