//! The int8 kernel (`kernels::cpu::vnni`) against its definition: the f64 product of the
//! dequantized weight with activations rounded block by block by `vnni::quantize_block`.

use crate::cube_common::{random_packed, reference};
use kernels::cpu::vnni::{self, Isa, Tiling};
use kernels::cpu::{CpuKernelError, CpuPacked};
use quant_core::{PackedLinear, QuantDim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 32;

/// `v` zero-padded to whole blocks and rounded block by block: `x̂`.
fn rounded(v: &[f32]) -> Vec<f64> {
    let mut padded = v.to_vec();
    padded.resize(v.len().next_multiple_of(BLOCK), 0.0);
    padded
        .chunks_exact(BLOCK)
        .flat_map(|b| {
            let (d, q) = vnni::quantize_block(b.try_into().unwrap());
            q.map(|q| d as f64 * q as f64)
        })
        .collect()
}

/// The module doc's definition, in f64: `(y, bound)` with `bound` the sum of the magnitudes of
/// the terms, the scale of the f32 rounding the kernel may add.
fn int8_reference(packed: &PackedLinear, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (n, k) = (packed.out_features, packed.in_features);
    let (codes, gpr, gs) = (packed.codes(), packed.groups_per_row(), packed.group_size);
    let sz = |gi: usize| (packed.scales[gi].to_f32(), packed.zeros[gi].to_f32() as f64);
    let (mut y, mut bound) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        let xh = rounded(row);
        for o in 0..n {
            let (mut acc, mut b) = (0f64, 0f64);
            match packed.dim {
                QuantDim::Oc => {
                    for kk in 0..k {
                        let (s, z) = sz(o * gpr + kk / gs);
                        let q = codes[o * k + kk] as f64;
                        acc += xh[kk] * (q - z) * s as f64;
                        b += (xh[kk] * s as f64).abs() * (q + z.abs());
                    }
                }
                QuantDim::Ic => {
                    // The coefficients x_k·s_{g,k} of o's group, rounded.
                    let g = o / gs;
                    let c: Vec<f32> = (0..k).map(|kk| row[kk] * sz(kk * gpr + g).0).collect();
                    let ch = rounded(&c);
                    for kk in 0..k {
                        let (q, z) = (codes[kk * n + o] as f64, sz(kk * gpr + g).1);
                        // The zero term keeps the exact coefficients (one f32 sum per group).
                        acc += ch[kk] * q - c[kk] as f64 * z;
                        b += ch[kk].abs() * q + (c[kk] as f64 * z).abs();
                    }
                }
            }
            y[i * n + o] = acc;
            bound[i * n + o] = b;
        }
    }
    (y, bound)
}

fn supported() -> bool {
    let yes = vnni::is_supported();
    if !yes {
        eprintln!("int8 kernel NOT tested: this CPU has neither AVX-512 VNNI/VBMI nor AVX2");
    }
    yes
}

/// The instruction set [`vnni::gemm`] runs on (after [`supported`]).
fn best() -> Isa {
    Isa::best().expect("checked by `supported`")
}

fn check(dim: QuantDim, bits: u32, group: usize, out: usize, inp: usize, ms: &[usize]) {
    let mut rng = StdRng::seed_from_u64((out * 31 + inp * 7 + bits as usize * 3 + group) as u64);
    let packed = random_packed(&mut rng, dim, bits, group, out, inp);
    let cpu = CpuPacked::new(&packed).unwrap();
    for &m in ms {
        let mut x: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
        // An all-zero block in every other row (its step is 0).
        for row in x.chunks_mut(inp).skip(1).step_by(2) {
            row[..inp.min(64)]
                .iter_mut()
                .skip(32)
                .for_each(|v| *v = 0.0);
        }
        let (want, bound) = int8_reference(&packed, &x, m);
        // Every instruction set this CPU has (AVX2 beside AVX-512 too), each to the definition.
        let mut single = Vec::new();
        for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
            let mut y = vec![f32::NAN; m * out];
            vnni::gemm_on(isa, &x, m, &cpu, &mut y, Tiling::Single).unwrap();
            for (i, ((&g, &w), &b)) in y.iter().zip(&want).zip(&bound).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-6 * b + 1e-9,
                    "{isa:?} {dim:?} b{bits} g{group} {out}x{inp} m{m}: y[{i}] = {g}, expected \
                     {w} (bound {b})"
                );
            }
            if isa == best() {
                single = y;
            }
        }
        // Pairs of tiles (from `PAIRED_ROWS` rows on, AVX-512 only) change the order of work,
        // not one operation.
        let mut paired = vec![f32::NAN; m * out];
        vnni::gemm_on(best(), &x, m, &cpu, &mut paired, Tiling::Paired).unwrap();
        assert!(
            single
                .iter()
                .zip(&paired)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{dim:?} b{bits} g{group} {out}x{inp} m{m}: paired tiles differ"
        );
    }
}

#[test]
fn int8_kernel_matches_its_definition() {
    if !supported() {
        return;
    }
    // Output counts that are not a multiple of the 16-wide tile (OC: 96+8, 584), per-IC input
    // counts that are not a multiple of the 32-code block (IC: 100, 1000), and row counts
    // through every monomorphisation and past one pass of 8.
    let shapes = [(96, 160), (104, 128), (584, 256), (128, 100), (192, 1000)];
    for dim in [QuantDim::Oc, QuantDim::Ic] {
        for bits in [2, 3, 4, 8] {
            for group in [32, 64, 128] {
                for &(out, inp) in &shapes {
                    let (rows, cols) = dim.grouped_shape(out, inp);
                    if cols % group != 0 || rows == 0 {
                        continue;
                    }
                    check(dim, bits, group, out, inp, &[1, 2, 3, 4, 5, 6, 7, 8, 17]);
                }
            }
        }
    }
}

/// A row's result is the same bit for bit whatever else is in the call, so a sequence decodes
/// the same tokens alone and in a batch (or in a prompt of several chunks of 8 rows, the last
/// one short and, on `Paired`, paired all the same).
#[test]
fn int8_rows_do_not_depend_on_the_rest_of_the_batch() {
    if !supported() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(5);
    for dim in [QuantDim::Oc, QuantDim::Ic] {
        let (out, inp) = (192, 320);
        let packed = random_packed(&mut rng, dim, 3, 64, out, inp);
        let cpu = CpuPacked::new(&packed).unwrap();
        let m = 19;
        let x: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
        for tiling in [Tiling::Single, Tiling::Paired] {
            let mut all = vec![0f32; m * out];
            vnni::gemm_on(best(), &x, m, &cpu, &mut all, tiling).unwrap();
            for i in 0..m {
                let mut one = vec![0f32; out];
                vnni::gemm(&x[i * inp..(i + 1) * inp], 1, &cpu, &mut one).unwrap();
                assert_eq!(
                    one,
                    all[i * out..(i + 1) * out],
                    "{dim:?} {tiling:?} row {i}"
                );
            }
        }
    }
}

/// Several weights on one input in one call give each weight's own product, bit for bit: per-OC
/// and per-IC, different widths and output counts, on both tilings, through every row count
/// and past one pass of 8.
#[test]
fn int8_gemm_many_is_one_gemm_per_weight() {
    if !supported() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(7);
    // (dim, bits, group, out): a layer's q, k, v or gate and up, mixed as AdaDim may pick them.
    type Weight = (QuantDim, u32, usize, usize);
    let sets: [(usize, &[Weight]); 2] = [
        (
            320,
            &[
                (QuantDim::Oc, 3, 64, 320),
                (QuantDim::Ic, 3, 64, 64),
                (QuantDim::Oc, 4, 32, 72),
                (QuantDim::Ic, 2, 128, 256),
            ],
        ),
        // Inputs that do not fill whole blocks: per-IC only, padded.
        (100, &[(QuantDim::Ic, 3, 32, 96), (QuantDim::Ic, 8, 64, 64)]),
    ];
    for (inp, weights) in sets {
        let cpus: Vec<CpuPacked> = weights
            .iter()
            .map(|&(dim, bits, group, out)| {
                CpuPacked::new(&random_packed(&mut rng, dim, bits, group, out, inp)).unwrap()
            })
            .collect();
        for m in [1, 2, 3, 4, 5, 6, 7, 8, 11] {
            let x: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
            for tiling in [Tiling::Single, Tiling::Paired] {
                let mut ys: Vec<Vec<f32>> = cpus
                    .iter()
                    .map(|w| vec![f32::NAN; m * w.out_features()])
                    .collect();
                let mut products: Vec<_> =
                    cpus.iter().zip(ys.iter_mut().map(|y| &mut y[..])).collect();
                vnni::gemm_many_tiled(&x, m, &mut products, tiling).unwrap();
                for (i, (w, y)) in cpus.iter().zip(&ys).enumerate() {
                    let mut one = vec![f32::NAN; m * w.out_features()];
                    vnni::gemm_on(best(), &x, m, w, &mut one, tiling).unwrap();
                    assert!(
                        one.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "in {inp}, weight {i} ({:?} b{}), m {m}, {tiling:?}",
                        w.dim(),
                        w.bits()
                    );
                }
            }
        }
    }
    // Weights of different input widths cannot share an input.
    let a = CpuPacked::new(&random_packed(&mut rng, QuantDim::Oc, 3, 64, 32, 64)).unwrap();
    let b = CpuPacked::new(&random_packed(&mut rng, QuantDim::Oc, 3, 64, 32, 128)).unwrap();
    let (mut ya, mut yb) = (vec![0f32; 32], vec![0f32; 32]);
    assert!(matches!(
        vnni::gemm_many(&[0.5; 64], 1, &mut [(&a, &mut ya[..]), (&b, &mut yb[..])]),
        Err(CpuKernelError::XShape { got: 64, .. })
    ));
}

/// The rounding's cost: within 1% of the exact product's scale (Q8_0-like rounding of
/// uniform activations errs by about 0.2%).
#[test]
fn int8_kernel_stays_close_to_the_exact_product() {
    if !supported() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(6);
    for dim in [QuantDim::Oc, QuantDim::Ic] {
        let (out, inp, m) = (256, 576, 4);
        let packed = random_packed(&mut rng, dim, 4, 64, out, inp);
        let cpu = CpuPacked::new(&packed).unwrap();
        let x: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (exact, _) = reference(&packed, &x, m);
        let mut y = vec![0f32; m * out];
        vnni::gemm(&x, m, &cpu, &mut y).unwrap();
        let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = y
            .iter()
            .zip(&exact)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            err <= 0.01 * scale,
            "{dim:?}: max error {err}, max |y| {scale}"
        );
        assert!(err > 0.0, "{dim:?}: the activations were not rounded");
    }
}

#[test]
fn int8_bad_inputs_are_errors() {
    let mut rng = StdRng::seed_from_u64(1);
    let packed = random_packed(&mut rng, QuantDim::Oc, 4, 64, 32, 64);
    let cpu = CpuPacked::new(&packed).unwrap();
    let mut y = vec![0f32; 32];
    assert!(matches!(
        vnni::gemm(&[0.0; 63], 1, &cpu, &mut y),
        Err(CpuKernelError::XShape { got: 63, .. })
    ));
    if !vnni::is_supported() {
        assert_eq!(
            vnni::gemm(&[0.0; 64], 1, &cpu, &mut y),
            Err(CpuKernelError::NoInt8)
        );
    }
    // A NaN activation gives NaN outputs, as the f32 kernel's would.
    if vnni::is_supported() {
        let mut x = vec![0.5f32; 64];
        x[40] = f32::NAN;
        vnni::gemm(&x, 1, &cpu, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_nan()));
    }
}
