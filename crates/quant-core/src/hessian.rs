//! The GPTQ Hessian `H = (2/N) Σ XᵀX` of a linear layer's calibration inputs (docs/method.md §3).

use crate::QuantError;
use crate::linalg::gemm_f32;

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
}
