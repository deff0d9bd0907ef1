//! f16 → f32 in plain integer/float arithmetic, so the conversion vectorises under every
//! SIMD path (the `half` crate's scalar fallback would not).

/// Converts the bits of a finite f16 to f32 (zero and subnormals included).
///
/// Shifting the 15 magnitude bits into f32 position gives a value 2¹¹² too small (the
/// exponent biases differ by 112); one multiply fixes that and also normalises f16
/// subnormals. Inf/NaN are not preserved: scales and zeros are finite by construction.
#[inline(always)]
pub(crate) fn h2f(h: u16) -> f32 {
    const TWO_POW_112: f32 = f32::from_bits(0x7780_0000);
    let h = h as u32;
    let mag = f32::from_bits((h & 0x7fff) << 13) * TWO_POW_112;
    f32::from_bits(mag.to_bits() | ((h & 0x8000) << 16))
}

#[cfg(test)]
mod tests {
    use super::h2f;
    use half::f16;

    #[test]
    fn matches_half_for_every_finite_f16() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            if h.is_finite() {
                assert_eq!(
                    h2f(bits).to_bits(),
                    h.to_f32().to_bits(),
                    "f16 bits {bits:#06x}"
                );
            }
        }
    }
}
