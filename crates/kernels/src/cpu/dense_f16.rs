//! Dense 16-bit weights at decode sizes: `y = x · Wᵀ` with `W [n, k]` row-major in f16 or bf16,
//! widened to f32 in registers and accumulated in f32.
//!
//! At `M ≤ 8` a dense product is as bound by reading its weight as a packed one, so a weight that
//! is exactly representable in 16 bits (a packed checkpoint's embedding, which a tied head reuses;
//! every linear of an f16 or bf16 checkpoint) costs half the time of its f32 copy, with the same
//! result up to summation order. The loop is the per-OC one of the packed kernel without codes:
//! `R` rows share each 16-wide load of `x`, `M` tokens share each widened weight vector, and the
//! `R·M` accumulators stay in registers. Both formats run the same code; only the widening
//! differs (bf16 is the top half of an f32, so it is one shift).

use half::{bf16, f16};
use rayon::prelude::*;

use super::f16::h2f;
use super::layout::LANES;
use super::simd::SimdPath;
use super::tile::{Fused, Madd, Unfused};
use super::{CpuKernelError, MAX_M_PER_PASS, check_call};

/// Output rows per rayon task (a 576-wide row is 1.1 KiB of f16): enough work to amortise the
/// scheduling, and enough tasks to balance the cores on a 32 000-row head.
const ROWS_PER_TASK: usize = 128;

/// A 16-bit float format, widened to f32 in plain integer/float arithmetic (so that it
/// vectorises under every SIMD path).
pub(crate) trait Half16 {
    fn widen(bits: u16) -> f32;
}

/// IEEE binary16 (finite values: see [`h2f`]).
pub(crate) struct F16;
/// bfloat16: the top 16 bits of an f32, so widening is exact for every value.
pub(crate) struct Bf16;

impl Half16 for F16 {
    #[inline(always)]
    fn widen(bits: u16) -> f32 {
        h2f(bits)
    }
}

impl Half16 for Bf16 {
    #[inline(always)]
    fn widen(bits: u16) -> f32 {
        f32::from_bits((bits as u32) << 16)
    }
}

/// `R` rows × `M` tokens of `out [row][token]`.
#[inline(always)]
fn rows<const R: usize, const M: usize, A: Madd, H: Half16>(
    x: &[f32],
    k: usize,
    w: &[u16],
    out: &mut [f32],
) {
    let full = k - k % LANES;
    let mut acc = [[[0f32; LANES]; M]; R];
    for c in (0..full).step_by(LANES) {
        for (r, acc) in acc.iter_mut().enumerate() {
            let src: &[u16; LANES] = w[r * k + c..][..LANES].try_into().unwrap();
            let wv: [f32; LANES] = std::array::from_fn(|l| H::widen(src[l]));
            for (mm, acc) in acc.iter_mut().enumerate() {
                let xv: &[f32; LANES] = x[mm * k + c..][..LANES].try_into().unwrap();
                madd_lanes::<A>(acc, xv, &wv);
            }
        }
    }
    for r in 0..R {
        for mm in 0..M {
            let mut s: f32 = acc[r][mm].iter().sum();
            for j in full..k {
                s = A::madd(x[mm * k + j], H::widen(w[r * k + j]), s);
            }
            out[r * M + mm] = s;
        }
    }
}

#[inline(always)]
fn madd_lanes<A: Madd>(acc: &mut [f32; LANES], a: &[f32; LANES], b: &[f32; LANES]) {
    for l in 0..LANES {
        acc[l] = A::madd(a[l], b[l], acc[l]);
    }
}

/// One task's rows `w [rows, k]` → `out [rows][M]`, `R` rows at a time.
#[inline(always)]
fn task<const R: usize, const M: usize, A: Madd, H: Half16>(
    x: &[f32],
    k: usize,
    w: &[u16],
    out: &mut [f32],
) {
    for (wr, o) in w.chunks(R * k).zip(out.chunks_mut(R * M)) {
        if wr.len() == R * k {
            rows::<R, M, A, H>(x, k, wr, o);
        } else {
            for (w1, o1) in wr.chunks(k).zip(o.chunks_mut(M)) {
                rows::<1, M, A, H>(x, k, w1, o1);
            }
        }
    }
}

/// A task compiled for one SIMD path. Unsafe: the path's CPU features must be present.
type TaskFn = unsafe fn(&[f32], usize, &[u16], &mut [f32]);

/// Compiles [`task`] under `$feature` for every `M`, with `R` rows so that `R·M` accumulators,
/// `R` weight vectors and `M` activation vectors fit in the register file.
macro_rules! simd_path {
    ($module:ident, $arith:ty $(, $feature:literal)?) => {
        mod $module {
            use super::Half16;

            $(#[target_feature(enable = $feature)])?
            unsafe fn task<const R: usize, const M: usize, H: Half16>(
                x: &[f32],
                k: usize,
                w: &[u16],
                out: &mut [f32],
            ) {
                super::task::<R, M, $arith, H>(x, k, w, out)
            }

            pub(super) fn select<H: Half16>(m: usize) -> super::TaskFn {
                match m {
                    1 => task::<4, 1, H>,
                    2 => task::<4, 2, H>,
                    3 => task::<2, 3, H>,
                    4 => task::<2, 4, H>,
                    5 => task::<1, 5, H>,
                    6 => task::<1, 6, H>,
                    7 => task::<1, 7, H>,
                    _ => task::<1, 8, H>,
                }
            }
        }
    };
}

simd_path!(scalar, super::Unfused);
#[cfg(target_arch = "x86_64")]
simd_path!(avx2, super::Fused, "avx2,fma");
#[cfg(target_arch = "x86_64")]
simd_path!(
    avx512,
    super::Fused,
    "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"
);
#[cfg(target_arch = "aarch64")]
simd_path!(neon, super::Fused, "neon");

fn select<H: Half16>(path: SimdPath, m: usize) -> Option<TaskFn> {
    match path {
        SimdPath::Scalar => Some(scalar::select::<H>(m)),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => Some(avx2::select::<H>(m)),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => Some(avx512::select::<H>(m)),
        #[cfg(target_arch = "aarch64")]
        SimdPath::Neon => Some(neon::select::<H>(m)),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// `y[m, n] = x[m, k] · Wᵀ` for `W [n, k]` in f16, on the best SIMD path. Rows of `x` beyond
/// [`MAX_M_PER_PASS`] are taken in chunks that each re-read `W`: for large `m` (beyond
/// [`super::DIRECT_ROWS_16BIT`]), widen `W` once and use a dense f32 product instead.
pub fn gemm_f16(
    x: &[f32],
    m: usize,
    w: &[f16],
    n: usize,
    y: &mut [f32],
) -> Result<(), CpuKernelError> {
    gemm_f16_with(SimdPath::best(), x, m, w, n, y)
}

/// [`gemm_f16`] on a given SIMD path (an error if the machine lacks it).
pub fn gemm_f16_with(
    path: SimdPath,
    x: &[f32],
    m: usize,
    w: &[f16],
    n: usize,
    y: &mut [f32],
) -> Result<(), CpuKernelError> {
    gemm_16::<F16>(path, x, m, bytemuck::cast_slice(w), n, y)
}

/// `y[m, n] = x[m, k] · Wᵀ` for `W [n, k]` in bf16, on the best SIMD path; as [`gemm_f16`].
pub fn gemm_bf16(
    x: &[f32],
    m: usize,
    w: &[bf16],
    n: usize,
    y: &mut [f32],
) -> Result<(), CpuKernelError> {
    gemm_bf16_with(SimdPath::best(), x, m, w, n, y)
}

/// [`gemm_bf16`] on a given SIMD path (an error if the machine lacks it).
pub fn gemm_bf16_with(
    path: SimdPath,
    x: &[f32],
    m: usize,
    w: &[bf16],
    n: usize,
    y: &mut [f32],
) -> Result<(), CpuKernelError> {
    gemm_16::<Bf16>(path, x, m, bytemuck::cast_slice(w), n, y)
}

/// The `k` of a weight `[n, k]` stored as `len` values (an error unless `n` divides `len`).
pub(crate) fn weight_cols(len: usize, n: usize) -> Result<usize, CpuKernelError> {
    let k = len.checked_div(n).unwrap_or(0);
    if len != n * k {
        return Err(CpuKernelError::WShape {
            got: len,
            out_features: n,
        });
    }
    Ok(k)
}

/// The product on the raw bits of a 16-bit `W [n, k]`.
fn gemm_16<H: Half16>(
    path: SimdPath,
    x: &[f32],
    m: usize,
    w: &[u16],
    n: usize,
    y: &mut [f32],
) -> Result<(), CpuKernelError> {
    let k = weight_cols(w.len(), n)?;
    check_call(path, x, m, k, y, n)?;
    for (xc, yc) in x
        .chunks(MAX_M_PER_PASS * k.max(1))
        .zip(y.chunks_mut(MAX_M_PER_PASS * n))
    {
        let mc = yc.len() / n;
        let f = select::<H>(path, mc).ok_or(CpuKernelError::Unsupported(path))?;
        // Row-major in the rows of W, so that each task owns one contiguous piece.
        let mut out = vec![0f32; n * mc];
        out.par_chunks_mut(ROWS_PER_TASK * mc)
            .zip(w.par_chunks(ROWS_PER_TASK * k.max(1)))
            // SAFETY: the path's CPU features were checked above.
            .for_each(|(o, wt)| unsafe { f(xc, k, wt, o) });
        for (row, o) in out.chunks(mc).enumerate() {
            for (mm, &v) in o.iter().enumerate() {
                yc[mm * n + row] = v;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x · Wᵀ` in f64 from the weight's exact values.
    fn naive(x: &[f32], m: usize, w: &[f64], n: usize) -> Vec<f32> {
        let k = w.len() / n;
        let mut y = vec![0f32; m * n];
        for mm in 0..m {
            for o in 0..n {
                let s: f64 = (0..k).map(|j| x[mm * k + j] as f64 * w[o * k + j]).sum();
                y[mm * n + o] = s as f32;
            }
        }
        y
    }

    fn xorshift(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Every SIMD path against the f64 reference, on odd sizes: a k tail after the 16-wide
    /// loads, rows that do not fill R or a task, M beyond one pass.
    fn check_every_path<T: Copy>(
        name: &str,
        from_f32: impl Fn(f32) -> T,
        to_f64: impl Fn(T) -> f64,
        gemm_with: impl Fn(
            SimdPath,
            &[f32],
            usize,
            &[T],
            usize,
            &mut [f32],
        ) -> Result<(), CpuKernelError>,
    ) {
        let mut rand = xorshift(0x2545_f491_4f6c_dd1d);
        for (n, k) in [(1, 1), (5, 17), (131, 45), (300, 576), (257, 64)] {
            let w: Vec<T> = (0..n * k).map(|_| from_f32(rand())).collect();
            let exact: Vec<f64> = w.iter().map(|&v| to_f64(v)).collect();
            for m in [1, 2, 3, 4, 5, 8, 11] {
                let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                let want = naive(&x, m, &exact, n);
                for path in SimdPath::available() {
                    let mut y = vec![f32::NAN; m * n];
                    gemm_with(path, &x, m, &w, n, &mut y).unwrap();
                    for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (k as f32).sqrt().max(1.0),
                            "{name} {path:?} n={n} k={k} m={m} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_every_path() {
        check_every_path("f16", f16::from_f32, f16::to_f64, gemm_f16_with);
    }

    #[test]
    fn bf16_matches_f64_reference_on_every_path() {
        check_every_path("bf16", bf16::from_f32, bf16::to_f64, gemm_bf16_with);
    }

    #[test]
    fn bf16_widening_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let want = bf16::from_bits(bits).to_f32();
            let got = Bf16::widen(bits);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "bf16 bits {bits:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let w = vec![f16::ZERO; 6];
        let mut y = vec![0f32; 2];
        assert!(gemm_f16(&[0.0; 4], 1, &w, 2, &mut y).is_err());
        assert!(gemm_f16(&[0.0; 3], 1, &w, 2, &mut y[..1]).is_err());
        let err = gemm_f16(&[0.0; 3], 1, &w, 4, &mut [0.0; 4]).unwrap_err();
        assert!(
            matches!(
                err,
                CpuKernelError::WShape {
                    got: 6,
                    out_features: 4
                }
            ),
            "{err}"
        );
        let w = vec![bf16::ZERO; 6];
        let err = gemm_bf16(&[0.0; 3], 1, &w, 4, &mut [0.0; 4]).unwrap_err();
        assert!(
            matches!(err, CpuKernelError::WShape { got: 6, .. }),
            "{err}"
        );
        assert!(gemm_bf16(&[0.0; 4], 1, &w, 2, &mut [0.0; 2]).is_err());
    }
}
