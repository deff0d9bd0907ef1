//! Error-minimising group ranges (docs/method.md §2.1).
//!
//! A group's extremes set its scale, so one outlier spreads the codes of every other weight.
//! Shrinking the range clips the outlier but rounds the rest more finely; the best shrink is the
//! one with the least reconstruction error. This is the search of GPTQ's `mse` option, AWQ's
//! auto-clip and llm-compressor's MSE observer, with a squared error (norm 2) so that it
//! minimises the same quantity as the selector and GPTQ.

use serde::{Deserialize, Serialize};

use crate::rtn::GroupParams;

/// How each group's `[min, max]` is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeMode {
    /// The group's own extremes (docs/method.md §2).
    #[default]
    MinMax,
    /// The shrink `[p·min, p·max]` with the least weighted squared error (docs/method.md §2.1).
    Search,
}

impl RangeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RangeMode::MinMax => "minmax",
            RangeMode::Search => "search",
        }
    }
}

impl std::fmt::Display for RangeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RangeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "minmax" => Ok(RangeMode::MinMax),
            "search" => Ok(RangeMode::Search),
            other => Err(format!(
                "unknown range mode `{other}` (expected minmax or search)"
            )),
        }
    }
}

/// Number of shrink factors tried after `p = 1`: `p = 1 − i/STEPS · MAX_SHRINK`.
const STEPS: usize = 40;
/// The smallest factor is `1 − MAX_SHRINK`.
const MAX_SHRINK: f32 = 0.5;

/// The shrink factors in the order they are tried; `p = 1` (the plain range) comes first, so a
/// tie keeps it.
fn shrinks() -> impl Iterator<Item = f32> {
    (0..=STEPS).map(|i| 1.0 - MAX_SHRINK * i as f32 / STEPS as f32)
}

/// `Σ h_j (w_j − ŵ_j)²` of the group `w` quantized with `p` (`h_j = 1` without weights).
///
/// Summed in `L` independent lanes, so the loop vectorizes and its order (hence its bits) does
/// not depend on the instruction set.
#[inline(always)]
pub(crate) fn group_error(w: &[f32], h: Option<&[f32]>, p: &GroupParams, maxq: u32) -> f32 {
    const L: usize = 16;
    let err = |x: f32| {
        let e = x - p.dequant(p.code(x, maxq));
        e * e
    };
    let mut acc = [0f32; L];
    match h {
        Some(h) => {
            let (wc, hc) = (w.chunks_exact(L), h.chunks_exact(L));
            for (k, (&x, &h)) in wc.remainder().iter().zip(hc.remainder()).enumerate() {
                acc[k] += h * err(x);
            }
            for (w, h) in wc.zip(hc) {
                for k in 0..L {
                    acc[k] += h[k] * err(w[k]);
                }
            }
        }
        None => {
            let wc = w.chunks_exact(L);
            for (k, &x) in wc.remainder().iter().enumerate() {
                acc[k] += err(x);
            }
            for w in wc {
                for k in 0..L {
                    acc[k] += err(w[k]);
                }
            }
        }
    }
    acc.iter().sum()
}

/// The parameters of the shrink of `[lo, hi]` that quantizes the group `w` with the least
/// `Σ h_j (w_j − ŵ_j)²`. `[lo, hi]` is the plain range (the group's extremes, or GPTQ's range
/// through 0), so the result is never worse than it. With `sym` the candidates are symmetric
/// (docs/method.md §2.2).
#[inline(always)]
pub fn search_range(
    w: &[f32],
    h: Option<&[f32]>,
    lo: f32,
    hi: f32,
    maxq: u32,
    sym: bool,
) -> GroupParams {
    let mut best = GroupParams::of_range(lo, hi, maxq, sym);
    let mut best_err = group_error(w, h, &best, maxq);
    for p in shrinks().skip(1) {
        let cand = GroupParams::of_range(p * lo, p * hi, maxq, sym);
        let err = group_error(w, h, &cand, maxq);
        if err < best_err {
            (best, best_err) = (cand, err);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn extremes(w: &[f32]) -> (f32, f32) {
        w.iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
                (l.min(x), h.max(x))
            })
    }

    /// The naive reference: every candidate's error in f64, the first minimum kept.
    fn reference(w: &[f32], h: Option<&[f32]>, maxq: u32) -> GroupParams {
        let (lo, hi) = extremes(w);
        let mut best: Option<(f64, GroupParams)> = None;
        for i in 0..=STEPS {
            let p = 1.0 - MAX_SHRINK * i as f32 / STEPS as f32;
            let cand = GroupParams::from_range(p * lo, p * hi, maxq);
            let err: f64 = w
                .iter()
                .enumerate()
                .map(|(j, &x)| {
                    let q =
                        ((x / cand.scale).round_ties_even() + cand.zero).clamp(0.0, maxq as f32);
                    let e = (x - (q - cand.zero) * cand.scale) as f64;
                    h.map_or(1.0, |h| h[j] as f64) * e * e
                })
                .sum();
            if best.as_ref().is_none_or(|b| err < b.0 * (1.0 - 1e-6)) {
                best = Some((err, cand));
            }
        }
        best.unwrap().1
    }

    fn group(rng: &mut StdRng, len: usize) -> Vec<f32> {
        let mut w: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        // One outlier in most groups: where clipping pays.
        if rng.random_bool(0.7) {
            let i = rng.random_range(0..len);
            w[i] = rng.random_range(3.0f32..8.0) * if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        }
        w
    }

    #[test]
    fn search_matches_the_naive_reference_and_never_loses_to_min_max() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut improved = 0;
        for case in 0..400 {
            let len = [16, 32, 64, 128][case % 4];
            let w = group(&mut rng, len);
            let h: Option<Vec<f32>> =
                (case % 2 == 1).then(|| (0..len).map(|_| rng.random_range(0.01f32..4.0)).collect());
            let h = h.as_deref();
            for maxq in [7, 15] {
                let (lo, hi) = extremes(&w);
                let got = search_range(&w, h, lo, hi, maxq, false);
                let plain = GroupParams::from_range(lo, hi, maxq);
                let (e_got, e_plain) = (
                    group_error(&w, h, &got, maxq),
                    group_error(&w, h, &plain, maxq),
                );
                assert!(e_got <= e_plain, "case {case}: {e_got} > {e_plain}");
                if e_got < 0.9 * e_plain {
                    improved += 1;
                }
                let want = reference(&w, h, maxq);
                let e_want = group_error(&w, h, &want, maxq);
                // f32 sums may order near-ties differently; the errors must agree.
                assert!(
                    (e_got - e_want).abs() <= 1e-4 * e_want.max(1e-12),
                    "case {case}: {e_got} vs reference {e_want}"
                );
            }
        }
        // Groups with an outlier must gain clearly from clipping.
        assert!(improved > 200, "only {improved} of 800 improved by 10%");
    }

    /// Symmetric candidates keep the centre zero, and the search never loses to the plain
    /// symmetric range.
    #[test]
    fn symmetric_search_keeps_the_centre_and_never_loses() {
        let mut rng = StdRng::seed_from_u64(8);
        for case in 0..200 {
            let w = group(&mut rng, 64);
            let (lo, hi) = extremes(&w);
            for maxq in [7, 15] {
                let got = search_range(&w, None, lo, hi, maxq, true);
                let plain = GroupParams::symmetric(lo.abs().max(hi.abs()), maxq);
                assert_eq!(got.zero, (maxq + 1) as f32 / 2.0, "case {case}");
                assert!(
                    group_error(&w, None, &got, maxq) <= group_error(&w, None, &plain, maxq),
                    "case {case}"
                );
            }
        }
    }

    #[test]
    fn weights_steer_the_error_to_the_heavy_inputs() {
        // An outlier with a tiny input moment is worth clipping hard; with a huge one it is not.
        let mut w: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 / 32.0) - 1.0)
            .collect();
        w[5] = 6.0;
        let (lo, hi) = extremes(&w);
        let mut h = vec![1.0f32; 64];
        h[5] = 1e-4;
        let light = search_range(&w, Some(&h), lo, hi, 7, false);
        h[5] = 1e4;
        let heavy = search_range(&w, Some(&h), lo, hi, 7, false);
        assert!(light.scale < heavy.scale, "{light:?} vs {heavy:?}");
        let heavy_err = {
            let e = w[5] - heavy.dequant(heavy.code(w[5], 7));
            e * e
        };
        let light_err = {
            let e = w[5] - light.dequant(light.code(w[5], 7));
            e * e
        };
        assert!(heavy_err < light_err);
    }

    #[test]
    fn range_mode_round_trips_through_text() {
        for m in [RangeMode::MinMax, RangeMode::Search] {
            assert_eq!(m.as_str().parse::<RangeMode>(), Ok(m));
        }
        assert!(
            "clip"
                .parse::<RangeMode>()
                .unwrap_err()
                .contains("minmax or search")
        );
    }
}
