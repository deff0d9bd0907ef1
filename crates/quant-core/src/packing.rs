//! Bit packing of quantization codes into `u32` words.
//!
//! A row of `n` codes of `b` bits is one little-endian bit stream: code `j` occupies bits
//! `[j·b, (j+1)·b)`, counted from bit 0 of word 0. For `b ∈ {2, 4, 8}` a code never straddles
//! a word (`32/b` codes a word); for `b = 3`, 32 codes fill exactly 3 words and codes 10 and 21
//! straddle a word boundary:
//!
//! ```text
//! b = 4:  word 0 = | c7 | c6 | c5 | c4 | c3 | c2 | c1 | c0 |   (c0 in bits 0..4)
//! b = 3:  word 0 = |c10lo| c9 | ... | c1 | c0 |  word 1 = |..| c11 |c10hi|  word 2 = | c31 | ... |c21hi|
//! ```
//!
//! Every row starts on a fresh word, so a kernel can index row `r` at `r · words_per_row`.

/// Number of `u32` words holding `n` codes of `bits` bits.
pub fn words_for(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// Packs `codes` (each `< 2^bits`) into `out`, which must hold `words_for(codes.len(), bits)` words.
pub fn pack_row(codes: &[u8], bits: u32, out: &mut [u32]) {
    debug_assert_eq!(out.len(), words_for(codes.len(), bits));
    out.fill(0);
    let b = bits as usize;
    for (j, &c) in codes.iter().enumerate() {
        let bit = j * b;
        let (w, s) = (bit / 32, bit % 32);
        let c = c as u64;
        let spread = c << s;
        out[w] |= spread as u32;
        if s + b > 32 {
            out[w + 1] |= (spread >> 32) as u32;
        }
    }
}

/// Unpacks `out.len()` codes of `bits` bits from `words`.
pub fn unpack_row(words: &[u32], bits: u32, out: &mut [u8]) {
    unpack_range(words, bits, 0, out);
}

/// Unpacks codes `start..start + out.len()` of the stream in `words`.
pub fn unpack_range(words: &[u32], bits: u32, start: usize, out: &mut [u8]) {
    let b = bits as usize;
    let mask = (1u64 << b) - 1;
    for (j, o) in out.iter_mut().enumerate() {
        let bit = (start + j) * b;
        let (w, s) = (bit / 32, bit % 32);
        let mut v = (words[w] as u64) >> s;
        if s + b > 32 {
            v |= (words[w + 1] as u64) << (32 - s);
        }
        *o = (v & mask) as u8;
    }
}
