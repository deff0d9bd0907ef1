//! RTN against a naive scalar reference, known values (ties, constant groups), the per-IC/per-OC
//! transpose identity, the Burn entry point and typed errors.

use quant_core::{GroupSize, QuantConfig, QuantDim, QuantError, quantize_rtn, transpose};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// docs/method.md §2 (§2.2 with `sym`) written out element by element, straight from the
/// formulas, on `W [out, in]`. Returns the dequantized weight and the codes, both in the HF layout.
fn naive_rtn(
    w: &[f32],
    out: usize,
    inp: usize,
    bits: u32,
    g: i64,
    dim: QuantDim,
    sym: bool,
) -> (Vec<f32>, Vec<u8>) {
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut deq = vec![0f32; w.len()];
    let mut codes = vec![0u8; w.len()];
    let idx = |r: usize, c: usize| match dim {
        // (r, c) in the grouped layout → flat index of W [out, in]
        QuantDim::Oc => r * inp + c,
        QuantDim::Ic => c * inp + r,
    };
    let (rows, cols) = match dim {
        QuantDim::Oc => (out, inp),
        QuantDim::Ic => (inp, out),
    };
    let g = if g == -1 { cols } else { g as usize };
    for r in 0..rows {
        for g0 in (0..cols).step_by(g) {
            let vals: Vec<f32> = (g0..g0 + g).map(|c| w[idx(r, c)]).collect();
            let mn = vals.iter().cloned().fold(f32::INFINITY, f32::min);
            let mx = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let (scale, zero) = if sym {
                let m = mn.abs().max(mx.abs());
                (f32::max(2.0 * m, 1e-5) / maxq, (maxq + 1.0) / 2.0)
            } else {
                let scale = f32::max(mx - mn, 1e-5) / maxq;
                (scale, (-(mn / scale).round_ties_even()).clamp(0.0, maxq))
            };
            for c in g0..g0 + g {
                let q = ((w[idx(r, c)] / scale).round_ties_even() + zero).clamp(0.0, maxq);
                codes[idx(r, c)] = q as u8;
                deq[idx(r, c)] = (q - zero) * scale;
            }
        }
    }
    (deq, codes)
}

fn random_weight(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Mostly small values plus occasional outliers, and some exact repeats (quantized
            // steps) so ties and equal extremes occur.
            let v: f32 = rng.random_range(-1.0..1.0);
            match rng.random_range(0..20) {
                0 => v * 30.0,
                1 => (v * 8.0).round() / 8.0,
                _ => v,
            }
        })
        .collect()
}

fn dequant_codes_hf(q: &quant_core::Quantized) -> Vec<u8> {
    let (rows, cols) = q.rows_cols();
    match q.config.dim {
        QuantDim::Oc => q.codes.clone(),
        QuantDim::Ic => transpose(&q.codes, rows, cols),
    }
}

#[test]
fn rtn_matches_naive_reference_for_random_shapes_bits_and_groups() {
    let mut rng = StdRng::seed_from_u64(7);
    let (mut cases, mut sym_cases) = (0, 0);
    for _ in 0..60 {
        let out = [8, 16, 24, 48, 96][rng.random_range(0..5)];
        let inp = [8, 16, 32, 40, 64][rng.random_range(0..5)];
        let bits = [2, 3, 4, 8][rng.random_range(0..4)];
        for dim in QuantDim::ALL {
            let len = dim.grouped_shape(out, inp).1;
            let divisors: Vec<i64> = (1..=len as i64)
                .filter(|d| len as i64 % d == 0)
                .chain([-1])
                .collect();
            let g = divisors[rng.random_range(0..divisors.len())];
            let w = random_weight(&mut rng, out * inp);
            let sym = rng.random_bool(0.5);
            let config = QuantConfig::new(bits, GroupSize::try_from(g).unwrap(), dim)
                .unwrap()
                .with_sym(sym);
            let q = quantize_rtn(&w, out, inp, config).unwrap();
            let (deq, codes) = naive_rtn(&w, out, inp, bits, g, dim, sym);
            let case = format!("{out}x{inp} b{bits} g{g} {dim} sym={sym}");
            assert_eq!(dequant_codes_hf(&q), codes, "codes: {case}");
            assert_eq!(q.dequantize(), deq, "dequantized: {case}");
            if sym {
                // The centre code: 2 at 2 bits, 128 at 8.
                let centre = (1u32 << (bits - 1)) as f32;
                assert!(q.zeros.iter().all(|&z| z == centre), "zeros: {case}");
                sym_cases += 1;
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 120);
    assert!(sym_cases > 30, "{sym_cases} symmetric cases");
}

#[test]
fn rtn_matches_naive_reference_on_shapes_that_cut_the_per_ic_tiles() {
    // Per-IC gathers tiles of 16..=512 input channels (fewer for bigger groups) and g output
    // channels; these shapes leave partial tiles, odd group lengths and whole-column groups.
    let mut rng = StdRng::seed_from_u64(13);
    let mut cases = 0;
    for (out, inp, g) in [
        (256, 531, 128),
        (96, 1040, 16),
        (130, 37, 13),
        (1024, 45, -1),
        (640, 1100, -1),
        (48, 2000, 16),
        (21, 7, 3),
    ] {
        let w = random_weight(&mut rng, out * inp);
        for dim in QuantDim::ALL {
            let len = dim.grouped_shape(out, inp).1;
            if g != -1 && len % g as usize != 0 {
                continue;
            }
            let config = QuantConfig::new(3, GroupSize::try_from(g).unwrap(), dim).unwrap();
            let q = quantize_rtn(&w, out, inp, config).unwrap();
            let (deq, codes) = naive_rtn(&w, out, inp, 3, g, dim, false);
            assert_eq!(dequant_codes_hf(&q), codes, "codes: {out}x{inp} g{g} {dim}");
            assert_eq!(q.dequantize(), deq, "dequantized: {out}x{inp} g{g} {dim}");
            cases += 1;
        }
    }
    assert_eq!(cases, 11);
}

#[test]
fn the_first_non_finite_weight_of_w_is_reported_in_both_dims() {
    // Groups are checked as they are quantized, in parallel and (per-IC) column by column; the
    // error still names the first bad weight in `w`'s own order.
    let (out, inp) = (64, 600);
    let mut w = vec![0.25f32; out * inp];
    w[40 * inp + 3] = f32::INFINITY;
    w[inp + 550] = f32::NAN;
    for dim in QuantDim::ALL {
        assert_eq!(
            quantize_rtn(
                &w,
                out,
                inp,
                QuantConfig::new(4, GroupSize::Len(8), dim).unwrap()
            ),
            Err(QuantError::NonFiniteWeight { index: inp + 550 }),
            "{dim}"
        );
    }
}

#[test]
fn ties_round_half_to_even() {
    // One 4-bit group spanning [0, 15]: scale = 1, zero = 0, so w / scale is w itself.
    let w = [0.0f32, 0.5, 1.5, 2.5, 3.5, 14.5, 7.0, 15.0];
    let q = quantize_rtn(
        &w,
        1,
        8,
        QuantConfig::new(4, GroupSize::Whole, QuantDim::Oc).unwrap(),
    )
    .unwrap();
    assert_eq!(q.scales, vec![1.0]);
    assert_eq!(q.zeros, vec![0.0]);
    assert_eq!(q.codes, vec![0, 0, 2, 2, 4, 14, 7, 15]);

    // Range [−7.5, 7.5]: scale = 1, zero = −round(−7.5) = 8. −6.5 → round(−6.5) + 8 = −6 + 8 = 2
    // under half-to-even (half-away-from-zero would give 1).
    let w = [-7.5f32, 7.5, -6.5, 0.5];
    let q = quantize_rtn(
        &w,
        4,
        1,
        QuantConfig::new(4, GroupSize::Len(4), QuantDim::Ic).unwrap(),
    )
    .unwrap();
    assert_eq!(q.scales, vec![1.0]);
    assert_eq!(q.zeros, vec![8.0]);
    assert_eq!(q.codes, vec![0, 15, 2, 8]);
}

#[test]
fn constant_groups_use_the_scale_clamp() {
    let w = [3.0f32; 8]
        .iter()
        .chain([-2.0f32; 8].iter())
        .chain([0.0f32; 8].iter())
        .cloned()
        .collect::<Vec<_>>();
    let q = quantize_rtn(
        &w,
        3,
        8,
        QuantConfig::new(3, GroupSize::Len(8), QuantDim::Oc).unwrap(),
    )
    .unwrap();
    let scale = 1e-5f32 / 7.0;
    assert_eq!(q.scales, vec![scale; 3]);
    // Positive constant: zero clamps to 0 and codes saturate at maxq; negative: zero clamps to maxq
    // and codes saturate at 0; zero: exact.
    assert_eq!(q.zeros, vec![0.0, 7.0, 0.0]);
    assert_eq!(&q.codes[..8], &[7; 8]);
    assert_eq!(&q.codes[8..16], &[0; 8]);
    assert_eq!(&q.codes[16..], &[0; 8]);
    assert!(q.scales.iter().all(|s| s.is_finite()));
    let (deq, _) = naive_rtn(&w, 3, 8, 3, 8, QuantDim::Oc, false);
    assert_eq!(q.dequantize(), deq);
}

#[test]
fn per_ic_of_w_is_per_oc_of_w_transposed() {
    let mut rng = StdRng::seed_from_u64(11);
    let (out, inp) = (64, 48);
    let w = random_weight(&mut rng, out * inp);
    for (bits, g) in [(3, 16), (4, 64), (2, -1), (8, 8)] {
        let ic = quantize_rtn(
            &w,
            out,
            inp,
            QuantConfig::new(bits, GroupSize::try_from(g).unwrap(), QuantDim::Ic).unwrap(),
        )
        .unwrap();
        let wt = transpose(&w, out, inp);
        let oc_t = quantize_rtn(
            &wt,
            inp,
            out,
            QuantConfig::new(bits, GroupSize::try_from(g).unwrap(), QuantDim::Oc).unwrap(),
        )
        .unwrap();
        assert_eq!(ic.codes, oc_t.codes);
        assert_eq!(ic.scales, oc_t.scales);
        assert_eq!(ic.zeros, oc_t.zeros);
        assert_eq!(ic.dequantize(), transpose(&oc_t.dequantize(), inp, out));
    }
}

#[test]
fn per_ic_isolates_an_outlier_input_channel() {
    // The property AdaDim relies on: an input column with huge weights ruins every per-OC group it
    // touches but only its own per-IC groups.
    let mut rng = StdRng::seed_from_u64(3);
    let (out, inp) = (64, 64);
    let mut w = random_weight(&mut rng, out * inp)
        .iter()
        .map(|v| v.clamp(-1.0, 1.0))
        .collect::<Vec<_>>();
    for r in 0..out {
        w[r * inp + 5] *= 100.0;
    }
    let err = |dim| {
        let q = quantize_rtn(
            &w,
            out,
            inp,
            QuantConfig::new(3, GroupSize::Len(16), dim).unwrap(),
        )
        .unwrap();
        let d = q.dequantize();
        (0..w.len())
            .filter(|i| i % inp != 5)
            .map(|i| (w[i] - d[i]).powi(2))
            .sum::<f32>()
    };
    assert!(err(QuantDim::Ic) * 10.0 < err(QuantDim::Oc));
}

#[test]
fn bad_configurations_are_typed_errors() {
    let w = vec![0.5f32; 8 * 12];
    let cfg = |bits, group_size: i64, dim| QuantConfig {
        bits,
        group_size: if group_size == -1 {
            GroupSize::Whole
        } else {
            GroupSize::Len(group_size as usize)
        },
        dim,
        sym: false,
    };
    assert_eq!(
        QuantConfig::new(5, GroupSize::Len(4), QuantDim::Oc),
        Err(QuantError::UnsupportedBits(5))
    );
    // Bypassing the constructor must not bypass validation.
    assert_eq!(
        quantize_rtn(&w, 8, 12, cfg(5, 4, QuantDim::Oc)),
        Err(QuantError::UnsupportedBits(5))
    );
    assert_eq!(
        quantize_rtn(&w, 8, 12, cfg(4, 0, QuantDim::Oc)),
        Err(QuantError::InvalidGroupSize(0))
    );
    // The written forms: -1 is the whole dimension, 0 and other negatives are refused.
    assert_eq!(GroupSize::try_from(-1), Ok(GroupSize::Whole));
    assert_eq!(GroupSize::try_from(64), Ok(GroupSize::Len(64)));
    assert_eq!(
        GroupSize::try_from(-3),
        Err(QuantError::InvalidGroupSize(-3))
    );
    assert_eq!(GroupSize::try_from(0), Err(QuantError::InvalidGroupSize(0)));
    assert_eq!("-1".parse::<GroupSize>(), Ok(GroupSize::Whole));
    assert_eq!("128".parse::<GroupSize>(), Ok(GroupSize::Len(128)));
    assert!("0".parse::<GroupSize>().is_err() && "x".parse::<GroupSize>().is_err());
    assert_eq!(GroupSize::Whole.to_string(), "-1");
    assert!(matches!(
        quantize_rtn(&w, 8, 12, cfg(4, 8, QuantDim::Oc)),
        Err(QuantError::GroupSizeDoesNotDivide {
            group_size: 8,
            len: 12,
            ..
        })
    ));
    // 12 divides in_features (OC ok) but not out_features = 8 (IC).
    assert!(quantize_rtn(&w, 8, 12, cfg(4, 12, QuantDim::Oc)).is_ok());
    assert!(matches!(
        quantize_rtn(&w, 8, 12, cfg(4, 12, QuantDim::Ic)),
        Err(QuantError::GroupSizeDoesNotDivide { len: 8, .. })
    ));
    assert!(matches!(
        quantize_rtn(&w, 8, 11, cfg(4, -1, QuantDim::Oc)),
        Err(QuantError::Shape(_))
    ));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w2 = w.clone();
        w2[37] = bad;
        assert_eq!(
            quantize_rtn(&w2, 8, 12, cfg(4, 4, QuantDim::Ic)),
            Err(QuantError::NonFiniteWeight { index: 37 })
        );
    }
}

mod rounding {
    use proptest::prelude::*;
    use quant_core::round_half_even;

    #[test]
    fn known_ties_and_edges() {
        for x in [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.0,
            -0.0,
            0.49999997,
            8_388_607.5,
            4_194_304.5,
            8_388_608.0,
            1e20,
            -1e20,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ] {
            assert_eq!(
                round_half_even(x).to_bits(),
                x.round_ties_even().to_bits(),
                "{x}"
            );
        }
        assert!(round_half_even(f32::NAN).is_nan());
    }

    proptest! {
        #[test]
        fn equals_std_round_ties_even(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            prop_assume!(!x.is_nan());
            prop_assert_eq!(round_half_even(x).to_bits(), x.round_ties_even().to_bits());
        }

        #[test]
        fn equals_std_on_halves(k in -20_000_000i32..20_000_000) {
            let x = k as f32 + 0.5;
            prop_assert_eq!(round_half_even(x).to_bits(), x.round_ties_even().to_bits());
        }
    }
}

/// `Σ_k m_k Σ_o (W − Ŵ)²[o, k]`: the output error's diagonal part, which the searched per-OC
/// ranges minimise group by group.
fn weighted_error(w: &[f32], deq: &[f32], inp: usize, m: &[f32]) -> f64 {
    w.iter()
        .zip(deq)
        .enumerate()
        .map(|(i, (&a, &b))| m[i % inp] as f64 * ((a - b) as f64).powi(2))
        .sum()
}

#[test]
fn searched_ranges_are_each_groups_own_search_and_never_lose_to_min_max() {
    use quant_core::{GroupParams, RangeMode, quantize_rtn_with, search_range};
    let mut rng = StdRng::seed_from_u64(41);
    for (out, inp, g) in [(48, 64, 16), (32, 96, 32), (64, 32, 32)] {
        let w = random_weight(&mut rng, out * inp);
        let m: Vec<f32> = (0..inp).map(|_| rng.random_range(0.01f32..5.0)).collect();
        for dim in [QuantDim::Oc, QuantDim::Ic] {
            let cfg = QuantConfig::new(3, GroupSize::Len(g), dim).unwrap();
            let plain = quantize_rtn(&w, out, inp, cfg).unwrap();
            let searched =
                quantize_rtn_with(&w, out, inp, cfg, RangeMode::Search, Some(&m)).unwrap();
            // Each group's parameters are the search of that group alone (weights by its inputs
            // per-OC; equal per-IC, where a group reads one input).
            let (rows, cols) = dim.grouped_shape(out, inp);
            let grouped = match dim {
                QuantDim::Oc => w.clone(),
                QuantDim::Ic => transpose(&w, out, inp),
            };
            for r in 0..rows {
                for j in 0..cols / g {
                    let vals = &grouped[r * cols + j * g..r * cols + (j + 1) * g];
                    let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let h = (dim == QuantDim::Oc).then(|| &m[j * g..(j + 1) * g]);
                    let want: GroupParams = search_range(vals, h, lo, hi, 7, false);
                    let i = r * (cols / g) + j;
                    assert_eq!(
                        (searched.scales[i], searched.zeros[i]),
                        (want.scale, want.zero),
                        "{dim} group ({r}, {j})"
                    );
                }
            }
            let ones = vec![1f32; inp];
            let weights = if dim == QuantDim::Oc { &m } else { &ones };
            let e_plain = weighted_error(&w, &plain.dequantize(), inp, weights);
            let e_searched = weighted_error(&w, &searched.dequantize(), inp, weights);
            assert!(
                e_searched < e_plain,
                "{dim} {out}x{inp} g{g}: {e_searched} ≥ {e_plain}"
            );
        }
    }
    // Moments of the wrong length are refused.
    let cfg = QuantConfig::new(3, GroupSize::Len(16), QuantDim::Oc).unwrap();
    let w = vec![0.5f32; 4 * 32];
    assert!(quantize_rtn_with(&w, 4, 32, cfg, RangeMode::Search, Some(&[1.0; 31])).is_err());
}
