//! Least-squares refit of per-OC group parameters once the codes are fixed (docs/method.md §3.1).
//!
//! Rounding fixes each weight's code from its group's scale and zero; once the codes are fixed,
//! a row's output error `(w − ŵ) H (w − ŵ)ᵀ` is a quadratic in its groups' parameters, so the
//! best parameters for those codes are one small linear solve per row. The full `H` couples a
//! row's groups through their inputs' correlations, which GPTQ chose the codes against.
//!
//! Per row `r` with `G` groups, write `ŵ = Σ_g a_g·q_g + b_g·1_g` (`q_g`, `1_g`: the codes and
//! the ones restricted to group `g`; `a = scale`, `b = −scale·zero`). The normal equations
//! `M θ = v` have blocks `M[a_g, a_h] = q_gᵀ H q_h`, `M[a_g, b_h] = q_gᵀ H 1_h`,
//! `M[b_g, b_h] = 1_gᵀ H 1_h` and `v = [q_gᵀ H w; 1_gᵀ H w]`. Symmetric groups keep their zero
//! at the centre code and solve for the scales alone, on the basis `q_g − z_g·1_g`.

use rayon::prelude::*;

use crate::linalg::{cholesky_lower, gemm_f32, matmul_into};
use crate::{QuantDim, QuantError, Quantized};

/// Rows refitted per batch: bounds the batch's `[rows, in]` temporaries (a few MB on 7B).
const ROW_BATCH: usize = 256;

/// What [`refit_oc`] did, in `Σ_r (w − ŵ) H (w − ŵ)ᵀ` summed over rows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Refit {
    pub error_before: f64,
    pub error_after: f64,
    /// Rows whose parameters changed.
    pub rows_changed: usize,
}

/// Refits every per-OC group's scale and zero (only the scale if the config is symmetric) of
/// `q` to minimise each row's `(w − ŵ) H (w − ŵ)ᵀ` with the codes fixed. A row keeps its old
/// parameters unless the refit lowers its error and every new scale is positive and finite.
/// The new zeros are real numbers, not codes. `w` is `[out, in]`, `h` is `[in, in]`.
pub fn refit_oc(w: &[f32], q: &mut Quantized, h: &[f32]) -> Result<Refit, QuantError> {
    if q.config.dim != QuantDim::Oc {
        return Err(QuantError::InvalidOptions(
            "refit applies to per-OC groups only".into(),
        ));
    }
    let (rows, n) = (q.out_features, q.in_features);
    if w.len() != rows * n || h.len() != n * n {
        return Err(QuantError::Shape(format!(
            "refit of a [{rows}, {n}] weight got {} weights and a Hessian of {} entries",
            w.len(),
            h.len()
        )));
    }
    let gs = q.group_size;
    let groups = n / gs;
    // U[i, h] = (H 1_h)_i, and 1_gᵀ H 1_h: the same for every row.
    let u: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..groups).map(move |g| h[i * n + g * gs..i * n + (g + 1) * gs].iter().sum())
        })
        .collect();
    let ones: Vec<f64> = (0..groups * groups)
        .map(|gh| {
            let (g, hh) = (gh / groups, gh % groups);
            (g * gs..(g + 1) * gs)
                .map(|i| u[i * groups + hh] as f64)
                .sum()
        })
        .collect();
    let mut total = Refit::default();
    for r0 in (0..rows).step_by(ROW_BATCH) {
        let m = ROW_BATCH.min(rows - r0);
        let codes: Vec<f32> = q.codes[r0 * n..(r0 + m) * n]
            .iter()
            .map(|&c| c as f32)
            .collect();
        let wb = &w[r0 * n..(r0 + m) * n];
        let mut hw = vec![0f32; m * n];
        matmul_into(&mut hw, wb, h, [m, n, n]);
        // qhq[r][g][h] = q_gᵀ H q_h, from one `[m, gs] × [gs, n]` product per h.
        let mut qhq = vec![0f64; m * groups * groups];
        let mut r_h = vec![0f32; m * n];
        for hh in 0..groups {
            // SAFETY: `codes` is m×n and `h` n×n, read at column/row offset hh·gs for gs
            // entries; `r_h` is m×n and distinct from both.
            unsafe {
                gemm_f32(
                    m,
                    n,
                    gs,
                    r_h.as_mut_ptr(),
                    n as isize,
                    1,
                    false,
                    (codes.as_ptr().add(hh * gs), n as isize, 1),
                    (h.as_ptr().add(hh * gs * n), n as isize, 1),
                    0.0,
                    1.0,
                );
            }
            qhq.par_chunks_mut(groups * groups)
                .enumerate()
                .for_each(|(r, dst)| {
                    let (qr, rr) = (&codes[r * n..(r + 1) * n], &r_h[r * n..(r + 1) * n]);
                    for g in 0..groups {
                        let span = g * gs..(g + 1) * gs;
                        dst[g * groups + hh] = dot(&qr[span.clone()], &rr[span]);
                    }
                });
        }
        let refits: Vec<RowRefit> = (0..m)
            .into_par_iter()
            .map(|r| {
                let row = Row {
                    w: &wb[r * n..(r + 1) * n],
                    codes: &codes[r * n..(r + 1) * n],
                    hw: &hw[r * n..(r + 1) * n],
                    qhq: &qhq[r * groups * groups..(r + 1) * groups * groups],
                    u: &u,
                    ones: &ones,
                    gs,
                };
                let at = (r0 + r) * groups;
                let old = (&q.scales[at..at + groups], &q.zeros[at..at + groups]);
                row.refit(old, q.config.sym)
            })
            .collect();
        for (r, row) in refits.into_iter().enumerate() {
            total.error_before += row.before;
            total.error_after += row.after;
            if let Some(p) = row.params {
                total.rows_changed += 1;
                let at = (r0 + r) * groups;
                for (g, (s, z)) in p.into_iter().enumerate() {
                    q.scales[at + g] = s;
                    q.zeros[at + g] = z;
                }
            }
        }
    }
    Ok(total)
}

/// One row's error before and after, and its new `(scale, zero)` per group when better.
struct RowRefit {
    before: f64,
    after: f64,
    params: Option<Vec<(f32, f32)>>,
}

/// One row's parts of the normal equations.
struct Row<'a> {
    w: &'a [f32],
    codes: &'a [f32],
    /// `(H w)`, over all inputs.
    hw: &'a [f32],
    /// `q_gᵀ H q_h`, `[G, G]`.
    qhq: &'a [f64],
    /// `(H 1_h)_i`, `[n, G]`.
    u: &'a [f32],
    /// `1_gᵀ H 1_h`, `[G, G]`.
    ones: &'a [f64],
    gs: usize,
}

impl Row<'_> {
    fn refit(&self, (scales, zeros): (&[f32], &[f32]), sym: bool) -> RowRefit {
        let groups = scales.len();
        let gs = self.gs;
        let span = |g: usize| g * gs..(g + 1) * gs;
        let whw = dot(self.w, self.hw);
        // [a; b] blocks of M and v.
        let nb = 2 * groups;
        let mut m = vec![0f64; nb * nb];
        let mut v = vec![0f64; nb];
        for g in 0..groups {
            let qg = &self.codes[span(g)];
            v[g] = dot(qg, &self.hw[span(g)]);
            v[groups + g] = self.hw[span(g)].iter().map(|&x| x as f64).sum();
            for hh in 0..groups {
                let qu: f64 = (span(g))
                    .map(|i| self.codes[i] as f64 * self.u[i * groups + hh] as f64)
                    .sum();
                m[g * nb + hh] = self.qhq[g * groups + hh];
                m[g * nb + groups + hh] = qu;
                m[(groups + hh) * nb + g] = qu;
                m[(groups + g) * nb + groups + hh] = self.ones[g * groups + hh];
            }
        }
        // Symmetric groups: θ = scales on the basis q_g − z_g·1_g, i.e. T·[a; b] with T = [I, −Z].
        let (m, v) = if sym {
            let mut ms = vec![0f64; groups * groups];
            let mut vs = vec![0f64; groups];
            for g in 0..groups {
                let zg = zeros[g] as f64;
                vs[g] = v[g] - zg * v[groups + g];
                for hh in 0..groups {
                    let zh = zeros[hh] as f64;
                    ms[g * groups + hh] = m[g * nb + hh]
                        - zh * m[g * nb + groups + hh]
                        - zg * m[(groups + g) * nb + hh]
                        + zg * zh * m[(groups + g) * nb + groups + hh];
                }
            }
            (ms, vs)
        } else {
            (m, v)
        };
        let k = v.len();
        let error = |theta: &[f64]| -> f64 {
            let quad: f64 = (0..k)
                .map(|j| theta[j] * (0..k).map(|l| m[j * k + l] * theta[l]).sum::<f64>())
                .sum();
            whw - 2.0 * dot64(theta, &v) + quad
        };
        let theta0: Vec<f64> = if sym {
            scales.iter().map(|&s| s as f64).collect()
        } else {
            (scales.iter().map(|&s| s as f64))
                .chain(
                    scales
                        .iter()
                        .zip(zeros)
                        .map(|(&s, &z)| -(s as f64) * z as f64),
                )
                .collect()
        };
        let before = error(&theta0);
        let unchanged = RowRefit {
            before,
            after: before,
            params: None,
        };
        let Some(theta) = solve_spd(&m, &v, k) else {
            return unchanged;
        };
        let after = error(&theta);
        let params: Option<Vec<(f32, f32)>> = (0..groups)
            .map(|g| {
                let s = theta[g];
                let z = if sym {
                    zeros[g] as f64
                } else {
                    -theta[groups + g] / s
                };
                (s > 0.0 && s.is_finite() && z.is_finite()).then_some((s as f32, z as f32))
            })
            .collect();
        match params {
            Some(p) if after < before => RowRefit {
                before,
                after,
                params: Some(p),
            },
            _ => unchanged,
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `M θ = v` for a symmetric positive semi-definite `M`, with a ridge of 1e-10 of its mean
/// diagonal so that a group whose inputs are all dead stays solvable; `None` if that fails.
fn solve_spd(m: &[f64], v: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut a = m.to_vec();
    let ridge = 1e-10 * (0..n).map(|i| m[i * n + i]).sum::<f64>() / n as f64;
    for i in 0..n {
        a[i * n + i] += ridge;
    }
    if !cholesky_lower(&mut a, n) {
        return None;
    }
    // L y = v, then Lᵀ θ = y.
    let mut y = v.to_vec();
    for i in 0..n {
        y[i] = (y[i] - dot64(&a[i * n..i * n + i], &y[..i])) / a[i * n + i];
    }
    for i in (0..n).rev() {
        let tail: f64 = (i + 1..n).map(|k| a[k * n + i] * y[k]).sum();
        y[i] = (y[i] - tail) / a[i * n + i];
    }
    Some(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{QuantConfig, quantize_rtn};

    /// A random symmetric positive definite `[n, n]`: `XᵀX/rows` of correlated inputs with a few
    /// large channels, like a calibration Hessian.
    fn hessian(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let rows = 4 * n;
        let x: Vec<f32> = (0..rows * n)
            .map(|i| rnd() * if (i % n).is_multiple_of(7) { 8.0 } else { 1.0 })
            .collect();
        let mut h = vec![0f32; n * n];
        for r in 0..rows {
            let xr = &x[r * n..(r + 1) * n];
            for i in 0..n {
                for k in 0..n {
                    h[i * n + k] += xr[i] * xr[k] / rows as f32;
                }
            }
        }
        h
    }

    fn weights(rows: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..rows * n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// `Σ_r (w − ŵ) H (w − ŵ)ᵀ`, naively.
    fn error(w: &[f32], q: &Quantized, h: &[f32]) -> f64 {
        let n = q.in_features;
        let d: Vec<f64> = w
            .iter()
            .zip(q.dequantize())
            .map(|(a, b)| (*a - b) as f64)
            .collect();
        (0..q.out_features)
            .map(|r| {
                let dr = &d[r * n..(r + 1) * n];
                (0..n)
                    .map(|i| dr[i] * (0..n).map(|k| h[i * n + k] as f64 * dr[k]).sum::<f64>())
                    .sum::<f64>()
            })
            .sum()
    }

    /// Weights that are exactly `(q − z')·s'` for some codes and other parameters than RTN's
    /// are recovered exactly: the refit finds the parameters that make the error zero.
    #[test]
    fn recovers_the_parameters_of_weights_on_the_codes_grid() {
        let (rows, n) = (5, 48);
        let h = hessian(n, 3);
        let config = QuantConfig::new(3, crate::GroupSize::Len(16), QuantDim::Oc).unwrap();
        let mut q = quantize_rtn(&weights(rows, n, 9), rows, n, config).unwrap();
        for (i, (s, z)) in q.scales.iter_mut().zip(&mut q.zeros).enumerate() {
            *s *= 1.0 + 0.1 * (i % 3) as f32;
            *z += 0.3 * (i % 2) as f32;
        }
        let exact = q.dequantize();
        let (scales, zeros) = (q.scales.clone(), q.zeros.clone());
        for s in &mut q.scales {
            *s *= 0.8;
        }
        q.zeros.iter_mut().for_each(|z| *z = z.round());
        let r = refit_oc(&exact, &mut q, &h).unwrap();
        assert!(
            r.error_before > 0.0 && r.error_after < 1e-8 * r.error_before,
            "{r:?}"
        );
        for (a, b) in q
            .scales
            .iter()
            .zip(&scales)
            .chain(q.zeros.iter().zip(&zeros))
        {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    /// On RTN's codes of random weights the refit lowers the naive error, by the amount it
    /// reports, and no row gets worse; symmetric groups keep their zero at the centre code.
    #[test]
    fn lowers_the_output_error_and_keeps_symmetric_zeros() {
        let (rows, n) = (7, 64);
        let h = hessian(n, 5);
        let w = weights(rows, n, 11);
        for sym in [false, true] {
            let config = QuantConfig::new(3, crate::GroupSize::Len(16), QuantDim::Oc)
                .unwrap()
                .with_sym(sym);
            let mut q = quantize_rtn(&w, rows, n, config).unwrap();
            let zeros = q.zeros.clone();
            let before = error(&w, &q, &h);
            let r = refit_oc(&w, &mut q, &h).unwrap();
            let after = error(&w, &q, &h);
            assert!(
                (r.error_before - before).abs() < 1e-4 * before,
                "{r:?} vs {before}"
            );
            assert!(
                (r.error_after - after).abs() < 1e-4 * before,
                "{r:?} vs {after}"
            );
            assert!(after < 0.95 * before, "sym {sym}: {after} vs {before}");
            assert!(r.rows_changed > 0);
            if sym {
                assert_eq!(q.zeros, zeros);
            }
        }
    }

    #[test]
    fn refuses_per_ic_groups_and_wrong_shapes() {
        let config = QuantConfig::new(3, crate::GroupSize::Len(16), QuantDim::Ic).unwrap();
        let w = weights(16, 16, 1);
        let mut q = quantize_rtn(&w, 16, 16, config).unwrap();
        assert!(refit_oc(&w, &mut q, &hessian(16, 1)).is_err());
        let config = config.with_dim(QuantDim::Oc);
        let mut q = quantize_rtn(&w, 16, 16, config).unwrap();
        assert!(refit_oc(&w, &mut q, &hessian(8, 1)).is_err());
    }
}
