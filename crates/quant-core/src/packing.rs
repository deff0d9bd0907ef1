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
    match bits {
        2 => pack_chunks::<2>(codes, out),
        3 => pack_chunks::<3>(codes, out),
        4 => pack_chunks::<4>(codes, out),
        8 => pack_chunks::<8>(codes, out),
        b => pack_from(codes, b as usize, 0, out),
    }
}

/// Unpacks `out.len()` codes of `bits` bits from `words`.
pub fn unpack_row(words: &[u32], bits: u32, out: &mut [u8]) {
    unpack_range(words, bits, 0, out);
}

/// Unpacks codes `start..start + out.len()` of the stream in `words`.
pub fn unpack_range(words: &[u32], bits: u32, start: usize, out: &mut [u8]) {
    match bits {
        2 => unpack_chunks::<2>(words, start, out),
        3 => unpack_chunks::<3>(words, start, out),
        4 => unpack_chunks::<4>(words, start, out),
        8 => unpack_chunks::<8>(words, start, out),
        b => unpack_from(words, b as usize, start, out),
    }
}

/// Codes per step of the fast paths: 8 codes of at most 8 bits are one `u64`, which with its
/// offset within a word (< 32 bits) spans at most 3 words. A LLaMA-7B load re-lays out 6.5
/// billion codes, one at a time with variable shifts before.
const CHUNK: usize = 8;

/// [`pack_row`] for `B`-bit codes, 8 at a time (the rest one by one).
fn pack_chunks<const B: usize>(codes: &[u8], out: &mut [u32]) {
    let chunks = codes.chunks_exact(CHUNK);
    let done = codes.len() - chunks.remainder().len();
    for (i, chunk) in chunks.enumerate() {
        let mut v = 0u64;
        for (j, &c) in chunk.iter().enumerate() {
            v |= (c as u64) << (j * B);
        }
        let bit = i * CHUNK * B;
        let v = (v as u128) << (bit % 32);
        for (k, word) in out[bit / 32..].iter_mut().take(3).enumerate() {
            *word |= (v >> (32 * k)) as u32;
        }
    }
    pack_from(&codes[done..], B, done, out);
}

/// [`unpack_range`] for `B`-bit codes, 8 at a time (the rest one by one).
fn unpack_chunks<const B: usize>(words: &[u32], start: usize, out: &mut [u8]) {
    let mask = (1u64 << B) - 1;
    let done = out.len() / CHUNK * CHUNK;
    let (chunks, rest) = out.split_at_mut(done);
    for (i, chunk) in chunks.chunks_exact_mut(CHUNK).enumerate() {
        let bit = (start + i * CHUNK) * B;
        let mut window = 0u128;
        for (k, &word) in words[bit / 32..].iter().take(3).enumerate() {
            window |= (word as u128) << (32 * k);
        }
        let v = (window >> (bit % 32)) as u64;
        for (j, c) in chunk.iter_mut().enumerate() {
            *c = ((v >> (j * B)) & mask) as u8;
        }
    }
    unpack_from(words, B, start + done, rest);
}

/// Packs `codes` as codes `first..` of the stream, one at a time.
fn pack_from(codes: &[u8], b: usize, first: usize, out: &mut [u32]) {
    for (j, &c) in codes.iter().enumerate() {
        let bit = (first + j) * b;
        let (w, s) = (bit / 32, bit % 32);
        let spread = (c as u64) << s;
        out[w] |= spread as u32;
        if s + b > 32 {
            out[w + 1] |= (spread >> 32) as u32;
        }
    }
}

/// Unpacks codes `start..start + out.len()`, one at a time.
fn unpack_from(words: &[u32], b: usize, start: usize, out: &mut [u8]) {
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
