//! The GPTQ Hessian `H = (2/N) Σ XᵀX` of a linear layer's calibration inputs (docs/method.md §3).

use crate::QuantError;
use crate::linalg::{gemm_f32, matmul_into};

/// Running mean of `2 XᵀX` over calibration samples, `in_features × in_features`, row-major f32.
///
/// Follows GPTQ's `add_batch`: every call adds the inputs of `samples` calibration sequences
/// (all their tokens summed, not averaged) and `N` counts sequences, so
/// `H = (2/N) Σ_sequences Σ_tokens xᵀx`. Chunks may be streamed in any order; the result is the
/// same up to f32 rounding.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    in_features: usize,
    nsamples: usize,
    h: Vec<f32>,
}

impl Hessian {
    /// An empty accumulator (zero samples).
    pub fn new(in_features: usize) -> Self {
        Self {
            in_features,
            nsamples: 0,
            h: vec![0.0; in_features * in_features],
        }
    }

    /// Wraps an already computed `H` (row-major `in_features²`) that averages `nsamples` samples.
    ///
    /// Useful when `XᵀX` was computed elsewhere (e.g. on a GPU, as `adadim::stats` does) or for tests.
    pub fn from_matrix(
        h: Vec<f32>,
        in_features: usize,
        nsamples: usize,
    ) -> Result<Self, QuantError> {
        if h.len() != in_features * in_features {
            return Err(QuantError::Shape(format!(
                "Hessian has {} elements, expected {in_features}²",
                h.len()
            )));
        }
        if h.iter().any(|x| !x.is_finite()) {
            return Err(QuantError::NonFiniteInput);
        }
        Ok(Self {
            in_features,
            nsamples,
            h,
        })
    }

    /// Adds one calibration sample: `x` is `[n_rows, in_features]` row-major (its tokens).
    pub fn add_batch(&mut self, x: &[f32], n_rows: usize) -> Result<(), QuantError> {
        self.add_samples(x, n_rows, 1)
    }

    /// Adds `samples` calibration sequences at once: `x` is all their tokens, `[n_rows, in_features]`.
    ///
    /// A call with no rows is ignored (it carries no information and must not dilute the mean).
    pub fn add_samples(
        &mut self,
        x: &[f32],
        n_rows: usize,
        samples: usize,
    ) -> Result<(), QuantError> {
        let n = self.in_features;
        if x.len() != n_rows * n {
            return Err(QuantError::Shape(format!(
                "calibration input has {} elements, expected {n_rows} × {n}",
                x.len()
            )));
        }
        if n_rows == 0 || samples == 0 {
            return Ok(());
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(QuantError::NonFiniteInput);
        }
        let total = (self.nsamples + samples) as f32;
        let keep = self.nsamples as f32 / total;
        // H ← (N/(N+t))·H + (2/(N+t))·XᵀX, the same update order as GPTQ's running mean.
        // SAFETY: `h` is n×n and `x` is n_rows×n, both row-major, as the strides below say.
        unsafe {
            gemm_f32(
                n,
                n,
                n_rows,
                self.h.as_mut_ptr(),
                n as isize,
                1,
                self.nsamples > 0,
                (x.as_ptr(), 1, n as isize),
                (x.as_ptr(), n as isize, 1),
                keep,
                2.0 / total,
            );
        }
        self.nsamples += samples;
        Ok(())
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Number of calibration samples averaged so far (`N`).
    pub fn nsamples(&self) -> usize {
        self.nsamples
    }

    /// `H`, row-major `in_features × in_features`.
    pub fn matrix(&self) -> &[f32] {
        &self.h
    }

    /// `H[i, i]`.
    pub fn diag(&self) -> Vec<f32> {
        (0..self.in_features)
            .map(|i| self.h[i * self.in_features + i])
            .collect()
    }

    /// `Σ_r δ_r H δ_rᵀ` for the rows of `delta` (`[rows, in_features]` row-major, a weight
    /// difference `W − Q`): the summed squared output error of the quantized layer on the
    /// calibration inputs, times `2/N` (docs/method.md §3). Undamped, so two candidates of one
    /// layer compare exactly as their outputs do, whatever damping their solves needed.
    pub fn output_error(&self, delta: &[f32], rows: usize) -> Result<f64, QuantError> {
        let n = self.in_features;
        if delta.len() != rows * n {
            return Err(QuantError::Shape(format!(
                "weight difference has {} elements, expected {rows} × {n}",
                delta.len()
            )));
        }
        // Row bands bound the product buffer at BAND × n however many rows there are.
        const BAND: usize = 256;
        let mut product = vec![0f32; BAND.min(rows) * n];
        let mut sum = 0f64;
        for band in delta.chunks(BAND * n) {
            let m = band.len() / n;
            matmul_into(&mut product[..m * n], band, &self.h, [m, n, n]);
            sum += band
                .iter()
                .zip(&product)
                .map(|(&d, &p)| d as f64 * p as f64)
                .sum::<f64>();
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `output_error` against the output error computed directly: `Σ_tokens |δ x|² · 2/N`.
    #[test]
    fn output_error_is_the_output_difference_on_the_calibration_inputs() {
        let (n, rows, tokens, samples) = (37, 300, 50, 5);
        let mut seed = 7u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let x: Vec<f32> = (0..tokens * n).map(|_| rand()).collect();
        let delta: Vec<f32> = (0..rows * n).map(|_| rand() * 0.1).collect();
        let mut h = Hessian::new(n);
        h.add_samples(&x, tokens, samples).unwrap();
        let mut direct = 0f64;
        for r in 0..rows {
            for t in 0..tokens {
                let y: f64 = (0..n)
                    .map(|k| delta[r * n + k] as f64 * x[t * n + k] as f64)
                    .sum();
                direct += y * y;
            }
        }
        direct *= 2.0 / samples as f64;
        let got = h.output_error(&delta, rows).unwrap();
        assert!(
            (got - direct).abs() <= 1e-4 * direct,
            "{got} against {direct}"
        );
        assert!(h.output_error(&delta[1..], rows).is_err());
        assert_eq!(h.output_error(&[], 0).unwrap(), 0.0);
    }
}
