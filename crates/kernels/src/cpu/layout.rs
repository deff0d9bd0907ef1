//! [`CpuPacked`]: the CPU re-layout of a [`PackedLinear`], built once at load time.

use quant_core::packing::{pack_row, unpack_range, words_for};
use quant_core::{PackedLinear, QuantDim};
use rayon::prelude::*;

use super::CpuKernelError;

/// Output channels per tile: one 512-bit vector of f32 (two 256-bit ones on AVX2).
pub(crate) const LANES: usize = 16;
/// Reduction steps per code block: 32 codes of `b` bits fill exactly `b` words, for every `b`.
pub(crate) const BLOCK: usize = 32;

/// A [`PackedLinear`] re-laid out for the CPU kernel: same bytes of codes, scales and zeros,
/// different order.
///
/// Both dims become the same shape of problem: tiles of `LANES` = 16 consecutive
/// *output* channels, each lane holding its codes along the *reduction* dim `k` as one
/// little-endian bit stream (the [`quant_core::packing`] format), and the 16 lanes'
/// words interleaved (`[tile][word][lane]`) so that one vector load brings the next
/// `32/b` codes of all 16 outputs. For per-OC this is the packed rows of `W`, interleaved;
/// for per-IC (codes stored along output channels) the codes are transposed once here.
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
