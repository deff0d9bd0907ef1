//! Whole-tensor reductions of two equally laid-out f32 buffers, accumulated in f64: the squared
//! errors that AdaDim's scores sum over millions of outputs.
//!
//! Fused and parallel: composed from tensor ops, `Σ(a − b)²` writes the difference and its
//! square as two fresh tensors and reduces them on one thread. The partial sums of fixed-size
//! chunks are added in order, so the result does not depend on the number of threads (a score
//! decides a choice, and a choice the output's bytes).

use rayon::prelude::*;

/// Elements per partial sum.
const CHUNK: usize = 1 << 14;

/// `Σ f(aᵢ, bᵢ)` in f64, by chunks summed in order.
fn chunked_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64 + Sync) -> f64 {
    assert_eq!(a.len(), b.len(), "reduced buffers differ in length");
    let partial: Vec<f64> = a
        .par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| f(x, y)).sum())
        .collect();
    partial.iter().sum()
}

/// `Σ (aᵢ − bᵢ)²`, each difference taken in f32 as the tensor op would.
pub fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    chunked_sum(a, b, |x, y| {
        let d = f64::from(x - y);
        d * d
    })
}

/// `Σ aᵢ·bᵢ`.
pub fn inner_product(a: &[f32], b: &[f32]) -> f64 {
    chunked_sum(a, b, |x, y| f64::from(x) * f64::from(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_a_sequential_f64_sum_for_any_thread_count() {
        let n = 3 * CHUNK + 17;
        let a: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let b: Vec<f32> = (0..n)
            .map(|i| ((i * 104729) % 997) as f32 / 300.0 - 1.5)
            .collect();
        let dist: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| f64::from(x - y).powi(2))
            .sum();
        let dot: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (d, p) = pool.install(|| (squared_distance(&a, &b), inner_product(&a, &b)));
            assert!((d - dist).abs() <= 1e-9 * dist, "{threads}: {d} vs {dist}");
            assert!(
                (p - dot).abs() <= 1e-9 * dot.abs(),
                "{threads}: {p} vs {dot}"
            );
            // Chunks are added in order: bit-identical whatever the thread count.
            let (d1, p1) = (squared_distance(&a, &b), inner_product(&a, &b));
            assert_eq!((d.to_bits(), p.to_bits()), (d1.to_bits(), p1.to_bits()));
        }
        assert_eq!(squared_distance(&[], &[]), 0.0);
    }
}
