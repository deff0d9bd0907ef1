//! Shared test helpers: random packed layers and the naive reference product.
#![allow(dead_code)]

use half::f16;
use quant_core::{GroupSize, PackedLinear, QuantConfig, QuantDim, Quantized};
use rand::{Rng, SeedableRng, rngs::StdRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A packed layer with random codes, zeros and scales. A few scales are f16 subnormals, which
/// nearly constant groups produce and the kernels decode by hand.
pub fn random_packed(
    rng: &mut StdRng,
    dim: QuantDim,
    bits: u32,
    group_size: usize,
    out_features: usize,
    in_features: usize,
) -> PackedLinear {
    let maxq = (1u32 << bits) - 1;
    let (rows, cols) = dim.grouped_shape(out_features, in_features);
    let n_groups = rows * cols / group_size;
    let codes = (0..rows * cols)
        .map(|_| rng.random_range(0..=maxq) as u8)
        .collect();
    let scales = (0..n_groups)
        .map(|i| {
            if i % 17 == 3 {
                3.0e-5 // subnormal in f16
            } else {
                rng.random_range(0.002f32..0.05)
            }
        })
        .collect();
    let zeros = (0..n_groups)
        .map(|_| rng.random_range(0..=maxq) as f32)
        .collect();
    Quantized {
        config: QuantConfig::new(bits, GroupSize::Len(group_size), dim).unwrap(),
        out_features,
        in_features,
        group_size,
        codes,
        scales,
        zeros,
    }
    .pack()
}

/// Activations in `[-1, 1)`, optionally rounded to f16 so the reference sees what the kernel sees.
pub fn random_x(rng: &mut StdRng, len: usize, round_f16: bool) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v = rng.random_range(-1.0f32..1.0);
            if round_f16 {
                f16::from_f32(v).to_f32()
            } else {
                v
            }
        })
        .collect()
}

/// Naive `y = x · Ŵᵀ` in f64 from `PackedLinear::dequantize`, and for every output the sum of
/// magnitudes of the terms a kernel adds: `Σ_k |x|·s·(q + z)` (the zero-point rewrite
/// `Σ x·s·q − Σ x·s·z` sums terms of that size), which bounds f32 rounding error.
pub fn reference(packed: &PackedLinear, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let (n, k) = (packed.out_features, packed.in_features);
    let w = packed.dequantize();
    // s·(q + z) per weight, in the HF layout.
    let (rows, cols) = packed.rows_cols();
    let codes = packed.codes();
    let gpr = packed.groups_per_row();
    let mut mag_grouped = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let gi = r * gpr + c / packed.group_size;
            let (s, z) = (packed.scales[gi].to_f32(), packed.zeros[gi].to_f32());
            mag_grouped[r * cols + c] = s.abs() * (codes[r * cols + c] as f32 + z);
        }
    }
    let mag = quant_core::from_grouped(packed.dim, rows, cols, mag_grouped);
    let mut y = vec![0f32; m * n];
    let mut bound = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut acc, mut b) = (0f64, 0f64);
            for l in 0..k {
                let xv = x[i * k + l] as f64;
                acc += xv * w[j * k + l] as f64;
                b += xv.abs() * mag[j * k + l] as f64;
            }
            y[i * n + j] = acc as f32;
            bound[i * n + j] = b as f32;
        }
    }
    (y, bound)
}

/// Asserts `|got − want| ≤ rel_bound · bound + rel_out · |want|` everywhere.
pub fn assert_close(
    what: &str,
    got: &[f32],
    want: &[f32],
    bound: &[f32],
    rel_bound: f32,
    rel_out: f32,
) {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    let mut worst = (0usize, 0f32);
    for i in 0..got.len() {
        let tol = rel_bound * bound[i] + rel_out * want[i].abs() + 1e-6;
        let err = (got[i] - want[i]).abs();
        assert!(
            err <= tol,
            "{what}: element {i}: got {}, want {} (err {err:e} > tol {tol:e})",
            got[i],
            want[i]
        );
        if err / tol > worst.1 {
            worst = (i, err / tol);
        }
    }
    assert!(got.iter().any(|v| *v != 0.0), "{what}: output is all zero");
}
