//! 8-bit groups by the absmax rule, for the language-model head (docs/method.md §6.1).
//!
//! Each group of [`Q8_GROUP`] weights along a row gets `scale = max|w| / 127` (rounded to f16,
//! as stored) and codes `round(w / scale) + 128`, i.e. zero `128`: llama.cpp's Q8_0 rule, held
//! in the asymmetric packed format every kernel already reads (`ŵ = (q − zero)·scale`).
//!
//! The rule reproduces a Q8_0 source exactly: its values are `d·q` with an f16 `d` and the
//! group's largest `|q| = 127`, so `max|w| / 127 = d` in f32 and `w / d = q`. A head read from
//! a Q8_0 GGUF is stored with the bits it came with.

use half::f16;
use rayon::prelude::*;

use crate::{GroupSize, QuantConfig, QuantDim, QuantError, Quantized};

/// Weights per group: Q8_0's block length.
pub const Q8_GROUP: usize = 32;

/// The code of zero.
const ZERO: f32 = 128.0;

/// `w [out_features, in_features]` in 8-bit per-OC groups of [`Q8_GROUP`] by the absmax rule.
/// `in_features` must be a multiple of [`Q8_GROUP`].
pub fn quantize_q8(
    w: &[f32],
    out_features: usize,
    in_features: usize,
) -> Result<Quantized, QuantError> {
    let config = QuantConfig::new(8, GroupSize::Len(Q8_GROUP), QuantDim::Oc)?;
    let group_size = config.check_shape(out_features, in_features)?;
    if w.len() != out_features * in_features {
        return Err(QuantError::Shape(format!(
            "{} weights for a [{out_features}, {in_features}] matrix",
            w.len()
        )));
    }
    crate::rtn::check_finite(w)?;
    let groups = w.len() / group_size;
    let mut codes = vec![0u8; w.len()];
    let mut scales = vec![0f32; groups];
    codes
        .par_chunks_mut(group_size)
        .zip(scales.par_iter_mut())
        .zip(w.par_chunks(group_size))
        .for_each(|((codes, scale), w)| *scale = q8_group(w, codes));
    Ok(Quantized {
        config,
        out_features,
        in_features,
        group_size,
        codes,
        scales,
        zeros: vec![ZERO; groups],
    })
}

/// Codes of one group into `codes`; returns its scale (an f16 value).
fn q8_group(w: &[f32], codes: &mut [u8]) -> f32 {
    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = f16::from_f32(amax / 127.0).to_f32();
    for (c, &v) in codes.iter_mut().zip(w) {
        let q = if scale > 0.0 {
            (v / scale).round()
        } else {
            0.0
        };
        *c = (q.clamp(-127.0, 127.0) + ZERO) as u8;
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q8_0 block as llama.cpp stores it: an f16 `d` and 32 `q` with the largest `|q|` 127.
    fn q8_0_block(d: f32, seed: u32) -> (f32, Vec<i8>) {
        let d = f16::from_f32(d).to_f32();
        let mut q: Vec<i8> = (0..32u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 255) as i32 - 127)
            .map(|v| v as i8)
            .collect();
        q[(seed % 32) as usize] = if seed.is_multiple_of(2) { 127 } else { -127 };
        (d, q)
    }

    #[test]
    fn a_q8_0_source_is_stored_exactly() {
        let (rows, cols) = (3, 64);
        let mut w = Vec::new();
        let mut want_codes = Vec::new();
        for b in 0..rows * cols / 32 {
            let (d, q) = q8_0_block(0.0123 * (b as f32 + 1.0).powi(3), b as u32 + 7);
            w.extend(q.iter().map(|&q| d * q as f32));
            want_codes.extend(q.iter().map(|&q| (q as i32 + 128) as u8));
        }
        let quantized = quantize_q8(&w, rows, cols).unwrap();
        assert_eq!(quantized.codes, want_codes);
        assert_eq!(quantized.dequantize(), w, "bit-exact round trip");
        let packed = quantized.pack();
        assert_eq!(packed.bits, 8);
        assert_eq!(packed.dequantize(), w, "f16 scales and zeros keep it exact");
    }

    #[test]
    fn matches_a_naive_absmax_reference() {
        let (rows, cols) = (4, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i % 5) as f32)
            .collect();
        let q = quantize_q8(&w, rows, cols).unwrap();
        for (g, chunk) in w.chunks(32).enumerate() {
            let amax = chunk.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
            let scale = f16::from_f64(amax / 127.0).to_f64();
            assert_eq!(q.scales[g] as f64, scale, "group {g}");
            for (j, &v) in chunk.iter().enumerate() {
                let code = (v as f64 / scale).round().clamp(-127.0, 127.0) + 128.0;
                assert_eq!(q.codes[g * 32 + j] as f64, code, "group {g}, weight {j}");
                // Round to nearest: within half a step (plus the f16 scale's rounding).
                let back = (code - 128.0) * scale;
                assert!((back - v as f64).abs() <= 0.5 * scale + amax * 1e-3);
            }
        }
    }

    #[test]
    fn zero_groups_bad_shapes_and_nan_are_handled() {
        let q = quantize_q8(&[0.0; 32], 1, 32).unwrap();
        assert_eq!(q.codes, vec![128; 32]);
        assert_eq!(q.dequantize(), vec![0.0; 32]);
        assert!(matches!(
            quantize_q8(&[0.0; 48], 1, 48),
            Err(QuantError::GroupSizeDoesNotDivide {
                group_size: 32,
                len: 48,
                ..
            })
        ));
        let mut w = vec![1.0; 32];
        w[5] = f32::NAN;
        assert!(matches!(
            quantize_q8(&w, 1, 32),
            Err(QuantError::NonFiniteWeight { index: 5 })
        ));
    }
}
