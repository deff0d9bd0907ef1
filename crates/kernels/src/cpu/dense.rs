//! Dense f32 products on strided host matrices, through the `gemm` crate.
//!
//! burn-ndarray multiplies with `matrixmultiply`, whose x86 kernel stops at AVX2; `gemm` has
//! AVX-512 kernels and reaches about 1.6× its throughput on this project's machines (117 vs
//! ~70 GFLOP/s on two cores). It also takes arbitrary row and column strides, so transposed or
//! head-split operands are multiplied in place instead of being copied first.

use std::ops::Range;

use rayon::prelude::*;

/// A read-only matrix: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable matrix: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// Panics unless a `rows × cols` matrix with strides `rs`, `cs` fits in `len` elements.
fn check_fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    let span = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    };
    assert!(
        span <= len,
        "a {rows}×{cols} matrix with strides ({rs}, {cs}) does not fit in {len} elements"
    );
}

impl<'a> MatRef<'a> {
    /// Panics if the strided matrix reaches past the end of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_fits(data.len(), rows, cols, rs, cs);
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// Columns `range` (a view, no copy).
    fn columns(self, range: Range<usize>) -> Self {
        let start = if self.rows == 0 || range.is_empty() {
            0
        } else {
            range.start * self.cs
        };
        Self::new(
            &self.data[start..],
            self.rows,
            range.len(),
            self.rs,
            self.cs,
        )
    }

    /// The transpose (a view, no copy).
    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

impl<'a> MatMut<'a> {
    /// Panics if the strided matrix reaches past the end of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        check_fits(data.len(), rows, cols, rs, cs);
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
}

/// Height of the block rows [`gram`] multiplies: small enough that the skipped upper
/// triangle is most of the saving (21 of 36 blocks at 576 features), large enough for
/// full-speed kernels.
const GRAM_BLOCK: usize = 96;

/// `xᵀ·x` of `x: [n, f]` as a row-major `[f, f]` buffer.
///
/// The result is symmetric, so each block row is multiplied only up to the diagonal (one
/// product per block row, over rayon's threads) and the rest is mirrored: a little over half
/// the work of the general product, which calibration pays for every Gram matrix and Hessian.
pub fn gram(x: MatRef<'_>) -> Vec<f32> {
    let f = x.cols;
    let mut out = vec![0f32; f * f];
    gram_into(x, &mut out, false);
    out
}

/// `acc += XᵀX` for a row-major `acc [f, f]`: a Gram summed over chunks of rows without a new
/// `f × f` matrix per chunk and a second, single-threaded pass to add it.
pub fn gram_add(x: MatRef<'_>, acc: &mut [f32]) {
    assert_eq!(
        acc.len(),
        x.cols * x.cols,
        "a Gram sum is [features, features]"
    );
    gram_into(x, acc, true);
}

/// `out = XᵀX`, or `out += XᵀX` with `add`.
fn gram_into(x: MatRef<'_>, out: &mut [f32], add: bool) {
    let f = x.cols;
    let rows: Vec<Range<usize>> = (0..f.div_ceil(GRAM_BLOCK))
        .map(|i| i * GRAM_BLOCK..((i + 1) * GRAM_BLOCK).min(f))
        .collect();
    // Longest rows first, so the threads finish together.
    let mut products: Vec<Vec<f32>> = rows
        .par_iter()
        .rev()
        .map(|r| matmul_new(x.columns(r.clone()).t(), x.columns(0..r.end), 1.0, false))
        .collect();
    products.reverse();
    let put = |dst: &mut f32, v: f32| {
        if add {
            *dst += v;
        } else {
            *dst = v;
        }
    };
    // Each block row of the result is its product (left of and on the diagonal) and, to the
    // right, the transposes of the later blocks' products, copied tile by tile so that both
    // sides stay in cache. Done serially, this mirroring took most of a 7B-shape Gram's time.
    out.par_chunks_mut(GRAM_BLOCK * f)
        .zip(&rows)
        .enumerate()
        .for_each(|(b, (dst, r))| {
            for (ii, row) in dst.chunks_exact_mut(f).enumerate() {
                let src = &products[b][ii * r.end..(ii + 1) * r.end];
                row[..r.end]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(d, &v)| put(d, v));
            }
            for (r2, p2) in rows.iter().zip(&products).skip(b + 1) {
                for (ii, row) in dst.chunks_exact_mut(f).enumerate() {
                    let i = r.start + ii;
                    for (jj, v) in row[r2.clone()].iter_mut().enumerate() {
                        put(v, p2[jj * r2.end + i]);
                    }
                }
            }
        });
}

/// `alpha · lhs · rhs` in a new row-major buffer.
pub fn matmul_new(lhs: MatRef<'_>, rhs: MatRef<'_>, alpha: f32, parallel: bool) -> Vec<f32> {
    let (m, n) = (lhs.rows, rhs.cols);
    if lhs.cols == 0 {
        return vec![0.0; m * n];
    }
    let mut out = Vec::<f32>::with_capacity(m * n);
    // Not zero-filled first: the product overwrites every element (`read_dst` is false and the
    // inner dimension is non-zero), and for the model's activations the fill was 3% of a run.
    let dst = out.spare_capacity_mut();
    // SAFETY: `f32` has no invalid bit patterns and `MaybeUninit<f32>` has its layout; the slice
    // is only written through (see above) before being read.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), m * n) };
    matmul(MatMut::row_major(dst, m, n), lhs, rhs, alpha, parallel);
    // SAFETY: `matmul` wrote all `m · n` elements.
    unsafe { out.set_len(m * n) };
    out
}

/// `dst ← alpha · lhs · rhs` (overwritten, not accumulated). `parallel` spreads one product over
/// rayon's threads; callers that already run products in parallel pass `false`.
pub fn matmul(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, alpha: f32, parallel: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(
        rhs.rows, k,
        "inner dimensions differ: {m}×{k} · {}×{n}",
        rhs.rows
    );
    assert_eq!(
        (dst.rows, dst.cols),
        (m, n),
        "destination is {}×{}, the product is {m}×{n}",
        dst.rows,
        dst.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            for c in 0..n {
                dst.data[r * dst.rs + c * dst.cs] = 0.0;
            }
        }
        return;
    }
    // Small products lose more to thread hand-off than they gain.
    let parallelism = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the constructors checked that every operand's strided extent lies inside its
    // slice; `dst` is a unique borrow, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `XᵀX` of a row-major `[n, f]` in f64, term by term.
    fn naive_gram(x: &[f32], n: usize, f: usize) -> Vec<f64> {
        let mut g = vec![0f64; f * f];
        for r in 0..n {
            for i in 0..f {
                for j in 0..f {
                    g[i * f + j] += f64::from(x[r * f + i]) * f64::from(x[r * f + j]);
                }
            }
        }
        g
    }

    #[test]
    fn gram_add_sums_the_grams_of_chunks_of_rows() {
        // Wider than one block of GRAM_BLOCK features, so the mirrored part is exercised.
        let (n1, n2, f) = (37, 29, GRAM_BLOCK + 45);
        let x: Vec<f32> = (0..(n1 + n2) * f)
            .map(|i| ((i * 7919) % 613) as f32 / 306.0 - 1.0)
            .collect();
        let (x1, x2) = x.split_at(n1 * f);
        let mut acc = gram(MatRef::row_major(x1, n1, f));
        let first = acc.clone();
        gram_add(MatRef::row_major(x2, n2, f), &mut acc);
        // The same f32 additions as adding a second Gram matrix.
        let second = gram(MatRef::row_major(x2, n2, f));
        for ((a, b), c) in acc.iter().zip(&first).zip(&second) {
            assert_eq!(a.to_bits(), (b + c).to_bits());
        }
        for (a, want) in acc.iter().zip(naive_gram(&x, n1 + n2, f)) {
            assert!(
                (f64::from(*a) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{a} vs {want}"
            );
        }
    }
}
