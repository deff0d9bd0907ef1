//! f32 copies of compact weights for products with more rows than the decode kernels take.
//!
//! For products of many rows (an evaluation window, a calibration batch), re-reading a compact
//! weight per 8 rows loses to one dense product on its widened copy. These build that copy, `Ŵᵀ [in, out]` row-major in f32
//! (the layout the dense product has always been given, so its results do not change), in one
//! parallel pass, for the caller to drop after the product: a model then holds only its compact
//! weights plus, during a product, one transient f32 linear.
//!
//! Values are bit for bit those of [`quant_core::PackedLinear::dequantize`] (`(q − z)·s` in
//! f32, with `s`, `z` widened from f16) and of widening each f16/bf16 value, so a product on the
//! copy equals one on a dense f32 weight of the same values.

use half::{bf16, f16};
use quant_core::QuantDim;
use rayon::prelude::*;

use super::CpuKernelError;
use super::dense_f16::{Bf16, Half16, weight_cols};
use super::f16::h2f_exact;
use super::layout::{BLOCK, CpuPacked, LANES};
use super::simd::SimdPath;
use super::tile::{block_at, codes_at, unroll_block};

/// Rows of `Ŵᵀ` per rayon task: one code block along `k` (32 rows, tens of KiB to a few MiB
/// of output), so a 576-wide layer still makes 18 tasks for the cores to share.
const TASK_ROWS: usize = BLOCK;

/// Checks that `out` holds `in_features × out_features` values.
fn check_out(out: &[f32], in_features: usize, out_features: usize) -> Result<(), CpuKernelError> {
    if out.len() == in_features * out_features {
        Ok(())
    } else {
        Err(CpuKernelError::WidenedShape {
            got: out.len(),
            in_features,
            out_features,
        })
    }
}

/// Writes `Ŵᵀ [in, out]` of a packed weight into `out` (every element is written).
pub fn packed_t(w: &CpuPacked, out: &mut [f32]) -> Result<(), CpuKernelError> {
    packed_t_with(SimdPath::best(), w, out)
}

/// [`packed_t`] on a given SIMD path (an error if the machine lacks it).
pub fn packed_t_with(path: SimdPath, w: &CpuPacked, out: &mut [f32]) -> Result<(), CpuKernelError> {
    check_out(out, w.in_features, w.out_features)?;
    if !path.is_supported() {
        return Err(CpuKernelError::Unsupported(path));
    }
    let n = w.out_features;
    if n == 0 {
        return Ok(());
    }
    let f = select(path, w.bits).ok_or(CpuKernelError::Unsupported(path))?;
    out.par_chunks_mut(TASK_ROWS * n)
        .enumerate()
        // SAFETY: the path's CPU features were checked above.
        .for_each(|(blk, rows)| unsafe { f(w, blk, rows) });
    Ok(())
}

/// Code block `blk` (rows `32·blk..` of `Ŵᵀ`, all of them in `rows`) of every tile.
#[inline(always)]
fn band<const B: usize>(w: &CpuPacked, blk: usize, rows: &mut [f32]) {
    let n = w.out_features;
    let (k0, kb) = (blk * BLOCK, rows.len() / n);
    // Codes decode to `q̃ = 1 + q/2^B` (see `tile`); `(q̃ − 1)·2^B` is `q` exactly.
    let two_b = (1u32 << B) as f32;
    // Per-IC: one scale and zero per row `k` and group of outputs, the same for the group's
    // tiles: widened once per group.
    let mut ic_group = usize::MAX;
    let (mut ic_s, mut ic_z) = ([0f32; BLOCK], [0f32; BLOCK]);
    for t in 0..w.n_tiles {
        let o0 = t * LANES;
        let block = block_at::<B>(w.tile_codes(t), blk);
        let mut v = [[0f32; LANES]; BLOCK];
        match w.dim {
            QuantDim::Oc => {
                // One scale and zero per lane for the whole block (a group is whole blocks).
                let at = (t * w.groups_along_k() + k0 / w.group_size) * LANES;
                let s: [f32; LANES] = std::array::from_fn(|l| h2f_exact(w.scales[at + l]));
                let z: [f32; LANES] = std::array::from_fn(|l| h2f_exact(w.zeros[at + l]));
                unroll_block!(J => {
                    let q = codes_at::<B>(block, J);
                    for l in 0..LANES {
                        v[J][l] = ((q[l] - 1.0) * two_b - z[l]) * s[l];
                    }
                });
            }
            QuantDim::Ic => {
                let g = o0 / w.group_size;
                if g != ic_group {
                    let at = g * w.k_pad + k0;
                    ic_s = std::array::from_fn(|j| h2f_exact(w.scales[at + j]));
                    ic_z = std::array::from_fn(|j| h2f_exact(w.zeros[at + j]));
                    ic_group = g;
                }
                unroll_block!(J => {
                    let q = codes_at::<B>(block, J);
                    for l in 0..LANES {
                        v[J][l] = ((q[l] - 1.0) * two_b - ic_z[J]) * ic_s[J];
                    }
                });
            }
        }
        if o0 + LANES <= n {
            for (j, v) in v.iter().enumerate().take(kb) {
                let dst: &mut [f32; LANES] = (&mut rows[j * n + o0..][..LANES])
                    .try_into()
                    .expect("LANES elements");
                *dst = *v;
            }
        } else {
            for (j, v) in v.iter().enumerate().take(kb) {
                rows[j * n + o0..(j + 1) * n].copy_from_slice(&v[..n - o0]);
            }
        }
    }
}

/// A band compiled for one SIMD path. Unsafe: the path's CPU features must be present.
type BandFn = unsafe fn(&CpuPacked, usize, &mut [f32]);

/// Compiles [`band`] under `$feature` for every code width.
macro_rules! simd_path {
    ($module:ident $(, $feature:literal)?) => {
        mod $module {
            use super::CpuPacked;

            $(#[target_feature(enable = $feature)])?
            unsafe fn band<const B: usize>(w: &CpuPacked, blk: usize, rows: &mut [f32]) {
                super::band::<B>(w, blk, rows)
            }

            pub(super) fn select(bits: u32) -> super::BandFn {
                match bits {
                    2 => band::<2>,
                    3 => band::<3>,
                    4 => band::<4>,
                    _ => band::<8>,
                }
            }
        }
    };
}

simd_path!(scalar);
#[cfg(target_arch = "x86_64")]
simd_path!(avx2, "avx2,fma");
#[cfg(target_arch = "x86_64")]
simd_path!(avx512, "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma");
#[cfg(target_arch = "aarch64")]
simd_path!(neon, "neon");

fn select(path: SimdPath, bits: u32) -> Option<BandFn> {
    match path {
        SimdPath::Scalar => Some(scalar::select(bits)),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => Some(avx2::select(bits)),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => Some(avx512::select(bits)),
        #[cfg(target_arch = "aarch64")]
        SimdPath::Neon => Some(neon::select(bits)),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Writes `Wᵀ [k, n]` in f32 of a row-major f16 `W [n, k]` into `out`.
pub fn f16_t(w: &[f16], n: usize, out: &mut [f32]) -> Result<(), CpuKernelError> {
    half_t(bytemuck::cast_slice(w), n, out, h2f_exact)
}

/// Writes `Wᵀ [k, n]` in f32 of a row-major bf16 `W [n, k]` into `out`.
pub fn bf16_t(w: &[bf16], n: usize, out: &mut [f32]) -> Result<(), CpuKernelError> {
    half_t(bytemuck::cast_slice(w), n, out, Bf16::widen)
}

/// The transpose in `LANES × TASK_ROWS` squares: `LANES` rows of `W` widened into a small
/// buffer, then written out as `TASK_ROWS` runs of `LANES` consecutive outputs.
fn half_t(
    w: &[u16],
    n: usize,
    out: &mut [f32],
    widen: impl Fn(u16) -> f32 + Sync,
) -> Result<(), CpuKernelError> {
    let k = weight_cols(w.len(), n)?;
    check_out(out, k, n)?;
    if n == 0 || k == 0 {
        return Ok(());
    }
    out.par_chunks_mut(TASK_ROWS * n)
        .enumerate()
        .for_each(|(band, rows)| {
            let (k0, kb) = (band * TASK_ROWS, rows.len() / n);
            let mut square = [[0f32; TASK_ROWS]; LANES];
            for o0 in (0..n).step_by(LANES) {
                let lanes = LANES.min(n - o0);
                for (l, sq) in square.iter_mut().enumerate().take(lanes) {
                    let src = &w[(o0 + l) * k + k0..][..kb];
                    for (d, &h) in sq.iter_mut().zip(src) {
                        *d = widen(h);
                    }
                }
                for j in 0..kb {
                    let dst = &mut rows[j * n + o0..j * n + o0 + lanes];
                    for (l, d) in dst.iter_mut().enumerate() {
                        *d = square[l][j];
                    }
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quant_core::{QuantConfig, Quantized};

    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    fn random_packed(
        dim: QuantDim,
        bits: u32,
        group: i64,
        n: usize,
        k: usize,
        seed: u64,
    ) -> quant_core::PackedLinear {
        let mut rand = xorshift(seed);
        let config =
            QuantConfig::new(bits, quant_core::GroupSize::try_from(group).unwrap(), dim).unwrap();
        let group_size = config.check_shape(n, k).unwrap();
        let maxq = (1u64 << bits) - 1;
        let groups = n * k / group_size;
        Quantized {
            config,
            out_features: n,
            in_features: k,
            group_size,
            codes: (0..n * k).map(|_| (rand() % (maxq + 1)) as u8).collect(),
            scales: (0..groups)
                .map(|_| (rand() % 1000) as f32 * 1e-4 + 1e-3)
                .collect(),
            zeros: (0..groups).map(|_| (rand() % (maxq + 1)) as f32).collect(),
        }
        .pack()
    }

    #[test]
    fn packed_copy_is_the_transposed_dequantized_weight_bit_for_bit() {
        // Odd output counts (a partial last tile), k beyond one task, per-IC k not a multiple
        // of 32 (padded rows), a whole-row group.
        let cases = [
            (QuantDim::Oc, 64, 40, 128),
            (QuantDim::Oc, 32, 17, 96),
            (QuantDim::Oc, -1, 33, 160),
            (QuantDim::Ic, 32, 96, 45),
            (QuantDim::Ic, 64, 128, 100),
            (QuantDim::Ic, -1, 64, 3),
        ];
        for (i, &(dim, group, n, k)) in cases.iter().enumerate() {
            for bits in [2, 3, 4, 8] {
                let p = random_packed(dim, bits, group, n, k, 7 + i as u64);
                let want = quant_core::transpose(&p.dequantize(), n, k);
                let cp = CpuPacked::new(&p).unwrap();
                for path in SimdPath::available() {
                    let mut got = vec![f32::NAN; n * k];
                    packed_t_with(path, &cp, &mut got).unwrap();
                    for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{path:?} {dim} b{bits} g{group} {n}x{k} at ({}, {})",
                            j / n,
                            j % n
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn half_copies_are_the_transposed_widened_weight() {
        let mut rand = xorshift(3);
        for (n, k) in [(1, 1), (17, 5), (40, 33), (3, 100), (64, 64)] {
            // Any bit pattern: subnormals, infinities and NaNs are copied too.
            let bits: Vec<u16> = (0..n * k).map(|_| rand() as u16).collect();
            let w16: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b)).collect();
            let mut got = vec![0f32; n * k];
            f16_t(&w16, n, &mut got).unwrap();
            let want: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let want = quant_core::transpose(&want, n, k);
            for (a, b) in got.iter().zip(&want) {
                assert_eq!(a.to_bits(), b.to_bits(), "f16 {n}x{k}");
            }
            let wb: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b)).collect();
            bf16_t(&wb, n, &mut got).unwrap();
            let want: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want = quant_core::transpose(&want, n, k);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "bf16 {n}x{k}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let p = random_packed(QuantDim::Oc, 4, 32, 16, 32, 1);
        let cp = CpuPacked::new(&p).unwrap();
        let err = packed_t(&cp, &mut [0.0; 100]).unwrap_err();
        assert!(
            matches!(err, CpuKernelError::WidenedShape { got: 100, .. }),
            "{err}"
        );
        assert!(f16_t(&[f16::ZERO; 6], 4, &mut [0.0; 6]).is_err());
        assert!(bf16_t(&[bf16::ZERO; 6], 2, &mut [0.0; 5]).is_err());
    }
}
