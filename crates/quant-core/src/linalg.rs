//! Dense host linear algebra for GPTQ: a matmul wrapper and the inverse Cholesky factor.
//!
//! The factorizations run in f64: `Hinv` is the Cholesky factor of an *inverse*, whose rounding
//! error grows with the square of `H`'s condition number. Calibration Hessians are often badly
//! conditioned (near-dead channels next to outlier channels); in f64 the damping retry fires only
//! for genuinely indefinite matrices, not for f32 round-off. The big products go through the
//! multithreaded `gemm` crate, so the f64 cost stays well below the GPTQ column loop's.

use rayon::prelude::*;

/// Diagonal block size of the blocked Cholesky and triangular inverse.
const NB: usize = 128;
/// Column band of the trailing Cholesky update: wide enough for an efficient matmul, narrow
/// enough that the wasted upper-triangle work stays small.
const BAND: usize = 512;

/// A read-only matrix operand: `(pointer, row stride, column stride)` in elements.
pub(crate) type Operand<T> = (*const T, isize, isize);

/// `dst[m×n] ← alpha·dst + beta·lhs[m×k]·rhs[k×n]` (`dst` is not read when `read_dst` is false).
///
/// # Safety
/// Every pointer with its strides must address valid memory for the given shape, and `dst` must
/// not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    read_dst: bool,
    lhs: Operand<f32>,
    rhs: Operand<f32>,
    alpha: f32,
    beta: f32,
) {
    unsafe {
        gemm_any(
            m, n, k, dst, dst_rs, dst_cs, read_dst, lhs, rhs, alpha, beta,
        )
    }
}

/// `out[m×n] = a[m×k] · b[k×n]`, all three row-major and contiguous. Panics on other lengths.
pub(crate) fn matmul_into(out: &mut [f32], a: &[f32], b: &[f32], [m, k, n]: [usize; 3]) {
    assert_eq!(
        (out.len(), a.len(), b.len()),
        (m * n, m * k, k * n),
        "operands of a [{m}×{k}]·[{k}×{n}] product"
    );
    // SAFETY: the lengths were just checked against the row-major strides below, and `out`,
    // being a unique borrow, overlaps neither operand.
    unsafe {
        gemm_f32(
            m,
            n,
            k,
            out.as_mut_ptr(),
            n as isize,
            1,
            false,
            (a.as_ptr(), k as isize, 1),
            (b.as_ptr(), n as isize, 1),
            0.0,
            1.0,
        );
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_any<T: 'static>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    dst_cs: isize,
    read_dst: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    alpha: T,
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            alpha,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// The upper-triangular `U` with `H⁻¹ = UᵀU` (what GPTQ calls `Hinv`), or `None` if `h` is not
/// positive definite. `h` is row-major `n × n` and is consumed as scratch.
///
/// Instead of GPTQ's Cholesky → inverse → Cholesky, this uses one Cholesky and one triangular
/// inverse: with `J` the reversal permutation and `JHJ = LLᵀ`, `H⁻¹ = (JL⁻ᵀJ)(JL⁻¹J)` and
/// `U = JL⁻¹J` is upper triangular with a positive diagonal, hence *the* Cholesky factor.
/// Reversing both indices of a row-major matrix is reversing its storage.
pub(crate) fn upper_cholesky_of_inverse(mut h: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    debug_assert_eq!(h.len(), n * n);
    h.reverse();
    if !cholesky_lower(&mut h, n) {
        return None;
    }
    let mut u = invert_lower(&h, n);
    u.reverse();
    Some(u)
}

/// Blocked right-looking lower Cholesky in place. On success the lower triangle holds `L`
/// (`A = LLᵀ`) and the strict upper triangle is zero; returns false if a pivot is not positive.
pub(crate) fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    for k0 in (0..n).step_by(NB) {
        let kb = NB.min(n - k0);
        let mut l11 = block(a, n, k0, k0, kb, kb);
        if !cholesky_small(&mut l11, kb) {
            return false;
        }
        put_block(a, n, k0, k0, kb, kb, &l11);
        let t0 = k0 + kb;
        if t0 == n {
            continue;
        }
        // Panel: L21 = A21 · L11⁻ᵀ, as one matmul against the small explicit inverse.
        let inv11 = invert_lower_small(&l11, kb);
        let a21 = block(a, n, t0, k0, n - t0, kb);
        let base = a.as_mut_ptr();
        // SAFETY: all operands lie inside `a` (n×n) or the local buffers; `dst` (rows t0.., cols
        // k0..k0+kb) does not overlap the copies it reads.
        unsafe {
            gemm_any(
                n - t0,
                kb,
                kb,
                base.add(t0 * n + k0),
                n as isize,
                1,
                false,
                (a21.as_ptr(), kb as isize, 1),
                (inv11.as_ptr(), 1, kb as isize),
                0.0,
                1.0,
            );
        }
        // Trailing update of the lower part, A22 -= L21·L21ᵀ, band by band.
        for j0 in (t0..n).step_by(BAND) {
            let jb = BAND.min(n - j0);
            // SAFETY: `dst` covers columns j0.. (≥ t0) while both operands read columns
            // k0..k0+kb (< t0) of the same buffer: disjoint regions.
            unsafe {
                gemm_any(
                    n - j0,
                    jb,
                    kb,
                    base.add(j0 * n + j0),
                    n as isize,
                    1,
                    true,
                    (base.add(j0 * n + k0), n as isize, 1),
                    (base.add(j0 * n + k0), 1, n as isize),
                    1.0,
                    -1.0,
                );
            }
        }
    }
    a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        row[i + 1..].fill(0.0);
    });
    true
}

/// `L⁻¹` of a lower-triangular row-major `L`, blocked: block row `I` of `X = L⁻¹` is
/// `X[I, :I] = −X_II · (L[I, :I] · X[:I, :I])`, with `X[:I, :I]` already known.
pub(crate) fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut x = vec![0f64; n * n];
    for i0 in (0..n).step_by(NB) {
        let ib = NB.min(n - i0);
        let xii = invert_lower_small(&block(l, n, i0, i0, ib, ib), ib);
        put_block(&mut x, n, i0, i0, ib, ib, &xii);
        if i0 == 0 {
            continue;
        }
        let mut tmp = vec![0f64; ib * i0];
        // X[:I, :I] is lower triangular: column band C of the product only needs rows C.. of it.
        for c0 in (0..i0).step_by(NB) {
            let cb = NB.min(i0 - c0);
            // SAFETY: `tmp` is ib×i0; `l` and `x` are n×n and the ranges stay inside them.
            unsafe {
                gemm_any(
                    ib,
                    cb,
                    i0 - c0,
                    tmp.as_mut_ptr().add(c0),
                    i0 as isize,
                    1,
                    false,
                    (l.as_ptr().add(i0 * n + c0), n as isize, 1),
                    (x.as_ptr().add(c0 * n + c0), n as isize, 1),
                    0.0,
                    1.0,
                );
            }
        }
        // SAFETY: `dst` is block row I, columns < i0 of `x`; it reads only `xii` and `tmp`.
        unsafe {
            gemm_any(
                ib,
                i0,
                ib,
                x.as_mut_ptr().add(i0 * n),
                n as isize,
                1,
                false,
                (xii.as_ptr(), ib as isize, 1),
                (tmp.as_ptr(), i0 as isize, 1),
                0.0,
                -1.0,
            );
        }
    }
    x
}

/// Unblocked Cholesky of a small dense `k × k` block in place (lower triangle used).
fn cholesky_small(a: &mut [f64], k: usize) -> bool {
    for j in 0..k {
        let d = a[j * k + j] - a[j * k..j * k + j].iter().map(|v| v * v).sum::<f64>();
        // A NaN pivot fails `is_finite`, so comparing only after it is NaN-safe.
        if !d.is_finite() || d <= 0.0 {
            return false;
        }
        let djj = d.sqrt();
        a[j * k + j] = djj;
        for i in j + 1..k {
            let dot: f64 = (0..j).map(|p| a[i * k + p] * a[j * k + p]).sum();
            a[i * k + j] = (a[i * k + j] - dot) / djj;
        }
    }
    for i in 0..k {
        a[i * k + i + 1..(i + 1) * k].fill(0.0);
    }
    true
}

/// Inverse of a small lower-triangular `k × k` matrix by forward substitution, column by column.
fn invert_lower_small(l: &[f64], k: usize) -> Vec<f64> {
    let mut x = vec![0f64; k * k];
    for j in 0..k {
        x[j * k + j] = 1.0 / l[j * k + j];
        for i in j + 1..k {
            let s: f64 = (j..i).map(|p| l[i * k + p] * x[p * k + j]).sum();
            x[i * k + j] = -s / l[i * k + i];
        }
    }
    x
}

fn block(a: &[f64], n: usize, r0: usize, c0: usize, rows: usize, cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in r0..r0 + rows {
        out.extend_from_slice(&a[r * n + c0..r * n + c0 + cols]);
    }
    out
}

fn put_block(a: &mut [f64], n: usize, r0: usize, c0: usize, rows: usize, cols: usize, b: &[f64]) {
    for r in 0..rows {
        a[(r0 + r) * n + c0..(r0 + r) * n + c0 + cols]
            .copy_from_slice(&b[r * cols..(r + 1) * cols]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic SPD test matrix: `AᵀA/n + I` from a simple LCG.
    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let mut a = vec![0f64; n * n];
        for v in &mut a {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *v = ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
        }
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..n).map(|k| a[k * n + i] * a[k * n + j]).sum::<f64>() / n as f64;
            }
            h[i * n + i] += 0.1;
        }
        h
    }

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0f64; n * n];
        for i in 0..n {
            for k in 0..n {
                for j in 0..n {
                    c[i * n + j] += a[i * n + k] * b[k * n + j];
                }
            }
        }
        c
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn cholesky_reconstructs_across_block_boundaries() {
        let n = 300; // not a multiple of NB or BAND
        let h = spd(n, 1);
        let mut l = h.clone();
        assert!(cholesky_lower(&mut l, n));
        let mut lt = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                lt[j * n + i] = l[i * n + j];
                if j > i {
                    assert_eq!(l[i * n + j], 0.0);
                }
            }
        }
        assert!(max_abs_diff(&matmul(&l, &lt, n), &h) < 1e-10);
    }

    #[test]
    fn upper_factor_of_inverse_satisfies_ut_u_h_eq_identity() {
        let n = 260;
        let h = spd(n, 2);
        let u = upper_cholesky_of_inverse(h.clone(), n).expect("SPD");
        let mut ut = vec![0f64; n * n];
        for i in 0..n {
            assert!(u[i * n + i] > 0.0);
            for j in 0..n {
                ut[j * n + i] = u[i * n + j];
                if j < i {
                    assert_eq!(u[i * n + j], 0.0, "U must be upper triangular");
                }
            }
        }
        let prod = matmul(&matmul(&ut, &u, n), &h, n);
        let mut eye = vec![0f64; n * n];
        for i in 0..n {
            eye[i * n + i] = 1.0;
        }
        assert!(max_abs_diff(&prod, &eye) < 1e-8);
    }

    #[test]
    fn indefinite_matrix_is_rejected() {
        let n = 140;
        let mut h = spd(n, 3);
        h[139 * n + 139] = -5.0;
        assert!(upper_cholesky_of_inverse(h, n).is_none());
    }
}
