//! The CPU kernel against `PackedLinear::dequantize()` + a naive matmul (f64 accumulation), on every SIMD
//! path this machine supports.

use crate::cube_common;

use cube_common::{random_packed, reference};
use kernels::cpu::{CpuKernelError, CpuPacked, SimdPath, gemm, gemm_with};
use quant_core::{GroupSize, QuantConfig, QuantDim, Quantized};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 2e-4 * scale + 1e-5,
            "{what}: y[{i}] = {g}, expected {w} (max |y| {scale})"
        );
    }
}

fn check(
    path: SimdPath,
    dim: QuantDim,
    bits: u32,
    group: usize,
    out: usize,
    inp: usize,
    ms: &[usize],
) {
    let mut rng = StdRng::seed_from_u64((out * 31 + inp * 7 + bits as usize * 3 + group) as u64);
    let packed = random_packed(&mut rng, dim, bits, group, out, inp);
    let cpu = CpuPacked::new(&packed).unwrap();
    for &m in ms {
        let x: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (want, _) = reference(&packed, &x, m);
        let mut y = vec![f32::NAN; m * out];
        gemm_with(path, &x, m, &cpu, &mut y).unwrap();
        assert_close(
            &y,
            &want,
            &format!("{path:?} {dim:?} b{bits} g{group} {out}x{inp} m{m}"),
        );
    }
}

fn paths() -> Vec<SimdPath> {
    let paths = SimdPath::available();
    eprintln!("SIMD paths tested on this machine: {paths:?}");
    let missing: Vec<_> = SimdPath::ALL
        .into_iter()
        .filter(|p| !paths.contains(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("SIMD paths NOT tested (this CPU/arch lacks them): {missing:?}");
    }
    paths
}

#[test]
fn every_path_dim_bits_group_matches_dequantize_matmul() {
    // Output counts that are not a multiple of the 16-wide tile (OC: 96+8, 584) and per-IC
    // input counts that are not a multiple of the 32-code block (IC: 100, 1000).
    let shapes = [(96, 160), (104, 128), (584, 256), (128, 100), (192, 1000)];
    for path in paths() {
        for dim in [QuantDim::Oc, QuantDim::Ic] {
            for bits in [3, 4] {
                for group in [64, 128] {
                    for &(out, inp) in &shapes {
                        let (rows, cols) = dim.grouped_shape(out, inp);
                        if cols % group != 0 || rows == 0 {
                            continue;
                        }
                        check(path, dim, bits, group, out, inp, &[1, 2, 3, 4, 8]);
                    }
                }
            }
        }
    }
}

#[test]
fn model_shape_and_large_m() {
    for path in paths() {
        for dim in [QuantDim::Oc, QuantDim::Ic] {
            check(path, dim, 3, 64, 576, 1536, &[1, 5]);
            check(path, dim, 4, 64, 1536, 576, &[13]);
        }
    }
}

#[test]
fn bits_2_and_8_and_group_32() {
    for path in paths() {
        for dim in [QuantDim::Oc, QuantDim::Ic] {
            for bits in [2, 8] {
                check(path, dim, bits, 32, 96, 160, &[1, 3]);
            }
        }
    }
}

/// One-hot rows of `x` read back single columns of `Ŵ`: every code value at every position
/// of a 32-code block (so every shift, mask and word straddle of the decode), for every
/// width, through the M = 8 and M = 4 kernels, with almost no rounding to hide an error
/// (products of f16 scales and small integers are exact in f32).
#[test]
fn one_hot_x_reads_back_every_code_at_every_block_position() {
    for path in paths() {
        for dim in [QuantDim::Oc, QuantDim::Ic] {
            for bits in [2, 3, 4, 8] {
                let (out, inp, group) = (256, 96, 32);
                let levels = 1usize << bits;
                let config = QuantConfig::new(bits, GroupSize::Len(group), dim).unwrap();
                let (rows, cols) = dim.grouped_shape(out, inp);
                let groups = rows * cols / group;
                // Code of output o at input k: (o + 3k) mod 2^b, all values at every k.
                let code = |r: usize, c: usize| {
                    let (o, k) = match dim {
                        QuantDim::Oc => (r, c),
                        QuantDim::Ic => (c, r),
                    };
                    ((o + 3 * k) % levels) as u8
                };
                let packed = Quantized {
                    config,
                    out_features: out,
                    in_features: inp,
                    group_size: group,
                    codes: (0..rows * cols).map(|i| code(i / cols, i % cols)).collect(),
                    // f16-exact scales, one an f16 subnormal.
                    scales: (0..groups)
                        .map(|g| match g % 11 {
                            5 => 2f32.powi(-20),
                            r => (1.0 + r as f32 / 8.0) / 64.0,
                        })
                        .collect(),
                    zeros: (0..groups).map(|g| ((g * 5) % levels) as f32).collect(),
                }
                .pack();
                let w = packed.dequantize();
                let cpu = CpuPacked::new(&packed).unwrap();
                let mut x = vec![0f32; inp * inp];
                for k in 0..inp {
                    x[k * inp + k] = 1.0;
                }
                let mut y = vec![f32::NAN; inp * out];
                gemm_with(path, &x, inp, &cpu, &mut y).unwrap();
                for k in 0..inp {
                    for o in 0..out {
                        let (got, want) = (y[k * out + o], w[o * inp + k]);
                        assert!(
                            (got - want).abs() <= 1e-6 * want.abs() + 1e-9,
                            "{path:?} {dim:?} b{bits}: y[{k}, {o}] = {got}, Ŵ[{o}, {k}] = {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn all_paths_agree_with_the_default_path() {
    let mut rng = StdRng::seed_from_u64(7);
    let packed = random_packed(&mut rng, QuantDim::Ic, 3, 64, 256, 320);
    let cpu = CpuPacked::new(&packed).unwrap();
    let x: Vec<f32> = (0..2 * 320).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut best = vec![0f32; 2 * 256];
    gemm_with(SimdPath::best(), &x, 2, &cpu, &mut best).unwrap();
    for path in paths() {
        let mut y = vec![0f32; 2 * 256];
        gemm_with(path, &x, 2, &cpu, &mut y).unwrap();
        assert_close(&y, &best, &format!("{path:?} vs {:?}", SimdPath::best()));
    }
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = StdRng::seed_from_u64(1);
    let packed = random_packed(&mut rng, QuantDim::Oc, 4, 64, 32, 64);
    let cpu = CpuPacked::new(&packed).unwrap();
    let mut y = vec![0f32; 32];
    assert!(matches!(
        gemm(&[0.0; 63], 1, &cpu, &mut y),
        Err(CpuKernelError::XShape { got: 63, .. })
    ));
    assert!(matches!(
        gemm(&[0.0; 64], 1, &cpu, &mut y[..31]),
        Err(CpuKernelError::YShape { got: 31, .. })
    ));
    let unsupported = SimdPath::ALL.into_iter().find(|p| !p.is_supported());
    if let Some(p) = unsupported {
        assert_eq!(
            gemm_with(p, &[0.0; 64], 1, &cpu, &mut y),
            Err(CpuKernelError::Unsupported(p))
        );
    }
    let g48 = random_packed(&mut rng, QuantDim::Oc, 4, 48, 32, 96);
    assert_eq!(
        CpuPacked::new(&g48).unwrap_err(),
        CpuKernelError::GroupSize(48)
    );
    let mut broken = packed.clone();
    broken.scales.pop();
    assert!(matches!(
        CpuPacked::new(&broken),
        Err(CpuKernelError::Weight(_))
    ));
}

/// Symmetric groups (docs/method.md §2.2) are packed like any others, with every zero point at
/// the centre code: RTN's symmetric weights through every path, both dims.
#[test]
fn symmetric_weights_run_as_packed() {
    let mut rng = StdRng::seed_from_u64(41);
    let (out, inp) = (96, 128);
    let w: Vec<f32> = (0..out * inp)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    for path in paths() {
        for dim in QuantDim::ALL {
            for bits in [3, 4] {
                let config = QuantConfig::new(bits, GroupSize::Len(32), dim)
                    .unwrap()
                    .with_sym(true);
                let packed = quant_core::quantize_rtn(&w, out, inp, config)
                    .unwrap()
                    .pack();
                let centre = (1u32 << (bits - 1)) as f32;
                assert!(packed.zeros.iter().all(|z| z.to_f32() == centre));
                let cpu = CpuPacked::new(&packed).unwrap();
                for m in [1, 5] {
                    let x: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let (want, _) = reference(&packed, &x, m);
                    let mut y = vec![f32::NAN; m * out];
                    gemm_with(path, &x, m, &cpu, &mut y).unwrap();
                    assert_close(&y, &want, &format!("{path:?} {dim:?} b{bits} sym m{m}"));
                }
            }
        }
    }
}
