//! [`CpuPacked`]: the CPU re-layout of a [`PackedLinear`], built once at load time.

use quant_core::packing::{pack_row, unpack_range, words_for};
use quant_core::{PackedLinear, QuantDim};
use rayon::prelude::*;

use super::CpuKernelError;
use super::tile::unroll_block;

/// Output channels per tile: one 512-bit vector of f32 (two 256-bit ones on AVX2).
pub(crate) const LANES: usize = 16;
/// Reduction steps per code block: 32 codes of `b` bits fill exactly `b` words, for every `b`.
pub(crate) const BLOCK: usize = 32;

/// A [`PackedLinear`] re-laid out for the CPU kernel: the same codes, scales and zeros in the
/// same number of bytes, in a different order.
///
/// Both dims become the same shape of problem: tiles of `LANES` = 16 consecutive
/// *output* channels, each lane holding its codes along the *reduction* dim `k` in blocks of
/// [`BLOCK`] = 32 codes, `b` words a block, and the 16 lanes' words interleaved
/// (`[tile][word][lane]`) so that one vector load brings the next `32/b` codes of all 16
/// outputs. For per-OC this is the packed rows of `W`, interleaved; for per-IC (codes stored
/// along output channels) the codes are transposed once here. Within a block, 2-, 4- and
/// 8-bit codes keep the packed format's little-endian bit stream ([`quant_core::packing`]);
/// 3-bit codes are re-laid out byte by byte ([`code_at`]), so that no code straddles a word
/// and 4 codes reach the 4 bytes of a lane with one shift and mask.
///
/// Scales and zeros stay f16 (so the kernel reads no more bytes than the packed format):
/// * per-OC: `[tile][group along k][lane]`, one 16-wide vector per group;
/// * per-IC: `[group along outputs][k]`, one scalar per input channel for the whole
///   group of `group_size` outputs (i.e. `group_size / 16` consecutive tiles).
#[derive(Clone, Debug)]
pub struct CpuPacked {
    pub(crate) dim: QuantDim,
    pub(crate) bits: u32,
    pub(crate) group_size: usize,
    pub(crate) out_features: usize,
    pub(crate) in_features: usize,
    /// Reduction length padded to a whole [`BLOCK`] (padding codes are 0, padding scales 0).
    pub(crate) k_pad: usize,
    pub(crate) n_tiles: usize,
    /// `[tile][k_pad · bits / 32][LANES]`.
    pub(crate) codes: Vec<[u32; LANES]>,
    /// f16 bits; layout per dim as documented on the type.
    pub(crate) scales: Vec<u16>,
    pub(crate) zeros: Vec<u16>,
}

impl CpuPacked {
    /// Re-lays out `w`. Needs `bits ∈ {2, 3, 4, 8}` and a `group_size` that is a multiple of 32.
    pub fn new(w: &PackedLinear) -> Result<Self, CpuKernelError> {
        w.validate()?;
        if !w.group_size.is_multiple_of(BLOCK) {
            return Err(CpuKernelError::GroupSize(w.group_size));
        }
        let (rows, cols) = w.rows_cols();
        let gpr = w.groups_per_row();
        let bits = w.bits;
        let k_pad = w.in_features.next_multiple_of(BLOCK);
        let n_tiles = w.out_features.div_ceil(LANES);
        let wpl = words_for(k_pad, bits);
        let mut codes = vec![[0u32; LANES]; n_tiles * wpl];
        let (scales, zeros) = match w.dim {
            QuantDim::Oc => {
                // Rows of W are already bit streams along k: interleave them.
                let wpr = w.words_per_row();
                for row in 0..rows {
                    let (t, l) = (row / LANES, row % LANES);
                    for (i, &word) in w.qweight[row * wpr..(row + 1) * wpr].iter().enumerate() {
                        codes[t * wpl + i][l] = word;
                    }
                }
                let per_tile = |src: &[half::f16]| {
                    let mut out = vec![0u16; n_tiles * gpr * LANES];
                    for row in 0..rows {
                        let (t, l) = (row / LANES, row % LANES);
                        for g in 0..gpr {
                            out[(t * gpr + g) * LANES + l] = src[row * gpr + g].to_bits();
                        }
                    }
                    out
                };
                (per_tile(&w.scales), per_tile(&w.zeros))
            }
            QuantDim::Ic => {
                // Grouped layout is Wᵀ [k, o]: transpose the codes into streams along k, a tile
                // of 16 outputs at a time (16 codes from each row of Wᵀ, not one from a whole
                // unpacked copy, which missed the cache at every code), tiles in parallel. A
                // LLaMA-7B load spent most of its minute here.
                let wpr = w.words_per_row();
                codes.par_chunks_mut(wpl).enumerate().for_each_init(
                    || (vec![[0u8; LANES]; rows], vec![0u8; k_pad], vec![0u32; wpl]),
                    |(block, column, words), (t, tile)| {
                        let o = t * LANES;
                        let n = LANES.min(cols - o);
                        for (k, codes) in block.iter_mut().enumerate() {
                            let row = &w.qweight[k * wpr..(k + 1) * wpr];
                            unpack_range(row, bits, o, &mut codes[..n]);
                        }
                        for l in 0..n {
                            for (c, codes) in column.iter_mut().zip(block.iter()) {
                                *c = codes[l];
                            }
                            pack_row(column, bits, words);
                            for (lanes, &word) in tile.iter_mut().zip(words.iter()) {
                                lanes[l] = word;
                            }
                        }
                    },
                );
                let per_group = |src: &[half::f16]| {
                    let mut out = vec![0u16; gpr * k_pad];
                    for k in 0..rows {
                        for g in 0..gpr {
                            out[g * k_pad + k] = src[k * gpr + g].to_bits();
                        }
                    }
                    out
                };
                (per_group(&w.scales), per_group(&w.zeros))
            }
        };
        if bits == 3 {
            // Every tile holds whole blocks, so the words fall into blocks of 3 rows.
            codes
                .par_chunks_mut(3 * 1024)
                .for_each(|blocks| blocks.chunks_exact_mut(3).for_each(three_bit_lanes));
        }
        Ok(Self {
            dim: w.dim,
            bits,
            group_size: w.group_size,
            out_features: w.out_features,
            in_features: w.in_features,
            k_pad,
            n_tiles,
            codes,
            scales,
            zeros,
        })
    }

    pub fn dim(&self) -> QuantDim {
        self.dim
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn group_size(&self) -> usize {
        self.group_size
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes the kernel streams per product (codes + scales + zeros, padding included).
    pub fn weight_bytes(&self) -> usize {
        self.codes.len() * LANES * 4 + (self.scales.len() + self.zeros.len()) * 2
    }

    /// Code words of one tile (`k_pad · bits / 32`, each `[u32; LANES]`).
    pub(crate) fn words_per_tile(&self) -> usize {
        self.codes.len() / self.n_tiles
    }

    /// Code words of tile `t`: `[k_pad · bits / 32][LANES]`.
    pub(crate) fn tile_codes(&self, t: usize) -> &[[u32; LANES]] {
        let wpl = self.words_per_tile();
        &self.codes[t * wpl..(t + 1) * wpl]
    }

    pub(crate) fn groups_along_k(&self) -> usize {
        match self.dim {
            QuantDim::Oc => self.in_features / self.group_size,
            QuantDim::Ic => 1,
        }
    }
}

/// Where code `j` of a block lies in the block's words of one lane of a [`CpuPacked`]: its low
/// `width` bits from bit `bit` of word `word`, and, when it does not fit there, its top bit
/// at `top = (word, bit)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CodeAt {
    pub word: usize,
    pub bit: usize,
    pub width: usize,
    pub top: Option<(usize, usize)>,
}

/// [`CodeAt`] for code `j` (`< 32`) of a block of `bits`-bit codes.
///
/// 2, 4 and 8 bits: the packed format's stream, code `j` at bit `j·b` (no code straddles a
/// word). 3 bits: byte `y` (`0..4`) of the block's three words holds the codes `4i + y` of
/// the *quads* `i = 0..8`, so that one shift and one mask of a word give quad `i`'s 4 codes in
/// the 4 bytes of each lane, the layout `vpdpbusd` multiplies (see [`super::vnni`]):
///
/// ```text
///            bits 0..2    bits 3..5    bit 6          bit 7
/// word 0:    c(y)         c(4+y)       c(24+y) bit 0  c(24+y) bit 1
/// word 1:    c(8+y)       c(12+y)      c(28+y) bit 0  c(28+y) bit 1
/// word 2:    c(16+y)      c(20+y)      c(24+y) bit 2  c(28+y) bit 2
/// ```
///
/// (in byte `y`, i.e. bits `8y..8y+8` of the word). Quads 0–5 are whole 3-bit fields; quads
/// 6 and 7 keep their low two bits in the top of words 0 and 1 and their top bits in word 2.
/// The stream would straddle codes 10 and 21 across words, and no single shift would align
/// any 4 codes with the 4 bytes of a lane.
pub(crate) const fn code_at(bits: usize, j: usize) -> CodeAt {
    if bits != 3 {
        return CodeAt {
            word: j * bits / 32,
            bit: j * bits % 32,
            width: bits,
            top: None,
        };
    }
    let (quad, byte) = (j / 4, j % 4);
    if quad < 6 {
        CodeAt {
            word: quad / 2,
            bit: 8 * byte + 3 * (quad % 2),
            width: 3,
            top: None,
        }
    } else {
        CodeAt {
            word: quad - 6,
            bit: 8 * byte + 6,
            width: 2,
            top: Some((2, 8 * byte + 6 + (quad - 6))),
        }
    }
}

/// A 3-bit block of a tile (3 rows of 16 lanes), from the packed format's stream to
/// [`code_at`]'s layout. Lane by lane with every position a constant, which LLVM vectorises
/// across the lanes: a LLaMA-7B load re-lays out 2.5 GB of codes.
fn three_bit_lanes(block: &mut [[u32; LANES]]) {
    let mut out = [[0u32; LANES]; 3];
    unroll_block!(J => {
        const AT: CodeAt = code_at(3, J);
        // Code `J` of the stream: bits `3J..3J + 3`, across a word boundary for codes 10 and 21.
        let (w, s) = (3 * J / 32, 3 * J % 32);
        for l in 0..LANES {
            let mut code = block[w][l] >> s;
            if s + 3 > 32 {
                code |= block[w + 1][l] << (32 - s);
            }
            out[AT.word][l] |= (code & ((1 << AT.width) - 1)) << AT.bit;
            if let Some((word, bit)) = AT.top {
                out[word][l] |= ((code >> AT.width) & 1) << bit;
            }
        }
    });
    block.copy_from_slice(&out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bit of a block's words belongs to exactly one code, for every width.
    #[test]
    fn code_at_covers_every_bit_once() {
        for bits in [2usize, 3, 4, 8] {
            let mut used = vec![0u8; 32 * bits];
            for j in 0..BLOCK {
                let at = code_at(bits, j);
                let top = at.top.map_or(0, |_| 1);
                assert_eq!(at.width + top, bits, "{bits}-bit code {j}");
                assert!(at.bit + at.width <= 32, "{bits}-bit code {j} straddles");
                for b in 0..at.width {
                    used[32 * at.word + at.bit + b] += 1;
                }
                if let Some((word, bit)) = at.top {
                    used[32 * word + bit] += 1;
                }
            }
            assert!(used.iter().all(|&n| n == 1), "{bits} bits: {used:?}");
        }
    }

    /// The 3-bit re-layout puts code `j` of the stream where [`code_at`] says, and 4 codes of
    /// a quad in the 4 bytes of a word.
    #[test]
    fn three_bit_lanes_follows_code_at() {
        let codes: Vec<u8> = (0..BLOCK).map(|j| ((j * 5 + j / 7) % 8) as u8).collect();
        let mut stream = [0u32; 3];
        pack_row(&codes, 3, &mut stream);
        let mut block = stream.map(|w| [w; LANES]);
        three_bit_lanes(&mut block);
        let lanes = block.map(|row| row[LANES - 1]);
        for (j, &code) in codes.iter().enumerate() {
            let at = code_at(3, j);
            let mut got = (lanes[at.word] >> at.bit) & ((1 << at.width) - 1);
            if let Some((word, bit)) = at.top {
                got |= ((lanes[word] >> bit) & 1) << at.width;
            }
            assert_eq!(got, u32::from(code), "code {j}");
        }
        // Quad 1 (codes 4..8) is bits 3..5 of each byte of word 0.
        let quad1: Vec<u8> = (0..4)
            .map(|y| ((lanes[0] >> (8 * y + 3)) & 7) as u8)
            .collect();
        assert_eq!(quad1, codes[4..8]);
    }
}
