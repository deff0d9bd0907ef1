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

/// [`h2f`] for every f16, infinities and NaNs included (bit for bit as `half` converts them:
/// NaNs made quiet, payload kept): for copies of weights, which the caller may not have checked.
#[inline(always)]
pub(crate) fn h2f_exact(h: u16) -> f32 {
    if h & 0x7c00 == 0x7c00 {
        let (h, man) = (h as u32, (h & 0x03ff) as u32);
        let quiet = if man == 0 { 0 } else { 0x0040_0000 };
        f32::from_bits(((h & 0x8000) << 16) | 0x7f80_0000 | quiet | (man << 13))
    } else {
        h2f(h)
    }
}

#[cfg(test)]
mod tests {
    use super::{h2f, h2f_exact};
    use half::f16;

    #[test]
    fn exact_matches_half_for_every_f16() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = h2f_exact(bits);
            assert_eq!(got.to_bits(), want.to_bits(), "f16 bits {bits:#06x}");
        }
    }

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
