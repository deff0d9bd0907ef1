//! AWQ's activation-aware input-channel scales (docs/method.md §4.8).
//!
//! `y = x·Wᵀ = (x·diag(s)⁻¹)·(W·diag(s))ᵀ` for any positive `s`, but per-OC groups round the
//! scaled weight differently: a channel scaled up takes a larger share of its group's range and
//! is rounded more finely relative to its size. AWQ scales up the channels whose inputs are
//! large, `s = mean|x|^α`, and picks `α` on calibration data. The scales then fold into whatever
//! produces the input (an RMSNorm's weight, or the rows of the linear before), so the model
//! computes the same function and the format is unchanged.
//!
//! Per-IC groups each cover one input channel, so scaling a channel scales its whole group and
//! its rounding error with it: per-IC quantization is unchanged by the scales (up to rounding).

use crate::{QuantConfig, QuantError, quantize_rtn};

/// AWQ's grid: `α = i / ALPHA_GRID` for `i = 0 .. ALPHA_GRID` (0 is the unscaled weight).
pub const ALPHA_GRID: usize = 20;

/// The smallest scale before normalisation, so a dead channel does not scale its weights to 0.
const MIN_SCALE: f32 = 1e-4;

/// The exponents tried, in order; `α = 0` (no scaling) comes first, so a tie keeps it.
pub fn alphas() -> impl Iterator<Item = f32> {
    (0..ALPHA_GRID).map(|i| i as f32 / ALPHA_GRID as f32)
}

/// `s_j = max(mean|x_j|^α, 1e-4)`, divided by `√(max s · min s)` so the scales straddle 1.
pub fn channel_scales(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = mean_abs
        .iter()
        .map(|&m| m.powf(alpha).max(MIN_SCALE))
        .collect();
    let (lo, hi) = s
        .iter()
        .fold((f32::INFINITY, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
    let norm = (lo * hi).sqrt();
    s.iter_mut().for_each(|x| *x /= norm);
    s
}

/// `W ← W·diag(s)`: input channel `j` (column `j` of `W [out, in]`) scaled by `s_j`.
pub fn scale_inputs(w: &mut [f32], in_features: usize, s: &[f32]) {
    assert_eq!(s.len(), in_features, "one scale per input channel");
    for row in w.chunks_exact_mut(in_features) {
        row.iter_mut().zip(s).for_each(|(x, &s)| *x *= s);
    }
}

/// `W ← diag(s)⁻¹·W`: output channel `j` (row `j`) divided by `s_j`, so that the next linear
/// may read `x·diag(s)⁻¹`.
pub fn unscale_outputs(w: &mut [f32], in_features: usize, s: &[f32]) {
    assert_eq!(
        w.len(),
        s.len() * in_features,
        "one scale per output channel"
    );
    for (row, &s) in w.chunks_exact_mut(in_features).zip(s) {
        row.iter_mut().for_each(|x| *x /= s);
    }
}

/// `Q(W·diag(s))·diag(s)⁻¹`: what the scaled and quantized linear computes on the unscaled
/// input, as a dense weight. The quantizer is `config`'s min-max RTN, as in AWQ's search.
pub fn quantize_scaled(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    s: &[f32],
    config: QuantConfig,
) -> Result<Vec<f32>, QuantError> {
    if s.len() != in_features {
        return Err(QuantError::Shape(format!(
            "{} scales for a weight with {in_features} inputs",
            s.len()
        )));
    }
    let mut scaled = w.to_vec();
    scale_inputs(&mut scaled, in_features, s);
    let mut q = quantize_rtn(&scaled, out_features, in_features, config)?.dequantize();
    let inverse: Vec<f32> = s.iter().map(|&s| 1.0 / s).collect();
    scale_inputs(&mut q, in_features, &inverse);
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GroupSize, QuantDim};

    #[test]
    fn scales_are_powers_of_the_mean_centred_on_one() {
        let m = [4.0, 1.0, 0.25, 0.0];
        // α = 0: every channel 1 (the clamp only bites on powers of 0 above α = 0).
        assert_eq!(channel_scales(&m, 0.0), vec![1.0; 4]);
        let s = channel_scales(&m, 0.5);
        // Raw: 2, 1, 0.5, 1e-4 → divided by √(2·1e-4).
        let norm = (2.0f32 * 1e-4).sqrt();
        for (got, want) in s.iter().zip([2.0, 1.0, 0.5, 1e-4]) {
            assert!((got - want / norm).abs() <= 1e-6 * got.abs(), "{s:?}");
        }
        let (lo, hi) = (s[3], s[0]);
        assert!((lo * hi - 1.0).abs() < 1e-5);
    }

    #[test]
    fn alphas_start_at_zero_and_stay_below_one() {
        let a: Vec<f32> = alphas().collect();
        assert_eq!(a.len(), ALPHA_GRID);
        assert_eq!(a[0], 0.0);
        assert!((a[ALPHA_GRID - 1] - 0.95).abs() < 1e-6);
    }

    /// Scaling a linear's inputs and its producer's outputs by the same `s` leaves their
    /// composition unchanged.
    #[test]
    fn a_fold_preserves_the_product() {
        let (out, mid, inp) = (3, 4, 2);
        let w1: Vec<f32> = (0..mid * inp).map(|i| i as f32 * 0.5 - 1.0).collect();
        let w2: Vec<f32> = (0..out * mid).map(|i| 1.0 - i as f32 * 0.25).collect();
        let s = [0.5, 2.0, 3.0, 0.125];
        let (mut f1, mut f2) = (w1.clone(), w2.clone());
        unscale_outputs(&mut f1, inp, &s);
        scale_inputs(&mut f2, mid, &s);
        let compose = |a: &[f32], b: &[f32]| -> Vec<f32> {
            (0..out * inp)
                .map(|e| {
                    let (o, i) = (e / inp, e % inp);
                    (0..mid).map(|k| b[o * mid + k] * a[k * inp + i]).sum()
                })
                .collect()
        };
        for (x, y) in compose(&w1, &w2).iter().zip(compose(&f1, &f2)) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    /// Against the naive definition, and per-IC groups (one input channel each) are unchanged
    /// by power-of-two scales, which are exact.
    #[test]
    fn quantize_scaled_is_the_scaled_rtn_divided_back() {
        let (out, inp) = (8, 8);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let s: Vec<f32> = (0..inp).map(|j| [0.5, 1.0, 2.0, 4.0][j % 4]).collect();
        for dim in [QuantDim::Oc, QuantDim::Ic] {
            let config = QuantConfig::new(3, GroupSize::Len(4), dim).unwrap();
            let got = quantize_scaled(&w, out, inp, &s, config).unwrap();
            let scaled: Vec<f32> = (0..out * inp).map(|e| w[e] * s[e % inp]).collect();
            let q = quantize_rtn(&scaled, out, inp, config)
                .unwrap()
                .dequantize();
            let want: Vec<f32> = (0..out * inp).map(|e| q[e] / s[e % inp]).collect();
            assert_eq!(got, want);
            if dim == QuantDim::Ic {
                let plain = quantize_rtn(&w, out, inp, config).unwrap().dequantize();
                for (a, b) in got.iter().zip(&plain) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
        let config = QuantConfig::new(3, GroupSize::Len(4), QuantDim::Oc).unwrap();
        assert!(quantize_scaled(&w, out, inp, &s[..3], config).is_err());
    }
}
