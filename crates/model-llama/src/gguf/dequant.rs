//! ggml tensor types and their dequantization to f32.
//!
//! Block layouts follow llama.cpp's `ggml-quants.c` exactly. Every quantized block stores its
//! scale (and minimum) as little-endian f16 first, then the codes; 4/5-bit types put elements
//! `0..16` of a block in the low nibbles and `16..32` in the high nibbles.

use half::{bf16, f16};
use rayon::prelude::*;
use thiserror::Error;

/// A ggml tensor type, by its on-disk id (`ggml.h`'s `enum ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// A type id this reader does not know the block layout of (IQ*, TQ*, future types).
    Unknown(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => Unknown(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Unknown(id) => id,
        }
    }

    /// `(elements per block, bytes per block)`; `None` for unknown types, whose size cannot be
    /// computed (so their tensors cannot be bounds-checked or read).
    pub fn block_layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            BF16 => (1, 2),
            Unknown(_) => return None,
        })
    }

    /// Whether [`dequantize`] handles this type.
    pub fn is_dequantizable(self) -> bool {
        block_kernel(self).is_some()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Unknown(id) => write!(f, "ggml type id {id}"),
            GgmlType::Q2K => f.write_str("Q2_K"),
            GgmlType::Q3K => f.write_str("Q3_K"),
            GgmlType::Q4K => f.write_str("Q4_K"),
            GgmlType::Q5K => f.write_str("Q5_K"),
            GgmlType::Q6K => f.write_str("Q6_K"),
            GgmlType::Q8K => f.write_str("Q8_K"),
            other => write!(f, "{other:?}"),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DequantError {
    #[error("dequantization of {0} is not supported")]
    Unsupported(GgmlType),
    #[error("{n} elements of {dtype} need {expected} bytes, got {got}")]
    Length {
        dtype: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
}

/// Converts one block's bytes into its elements.
type BlockKernel = fn(&[u8], &mut [f32]);

fn block_kernel(dtype: GgmlType) -> Option<BlockKernel> {
    use GgmlType::*;
    Some(match dtype {
        F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => |b, o| o[0] = half_at(b, 0),
        BF16 => |b, o| o[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        Q4_0 => |b, o| nibbles(&b[2..18], o, half_at(b, 0), -8.0 * half_at(b, 0)),
        Q4_1 => |b, o| nibbles(&b[4..20], o, half_at(b, 0), half_at(b, 2)),
        Q5_0 => |b, o| {
            let d = half_at(b, 0);
            fifth_bit_nibbles(&b[6..22], u32_at(b, 2), o, d, -16.0 * d)
        },
        Q5_1 => |b, o| fifth_bit_nibbles(&b[8..24], u32_at(b, 4), o, half_at(b, 0), half_at(b, 2)),
        Q8_0 => |b, o| {
            let d = half_at(b, 0);
            for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                *x = f32::from(q as i8) * d;
            }
        },
        _ => return None,
    })
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// 32 elements from 16 bytes of nibbles: `x = q · scale + offset`.
fn nibbles(qs: &[u8], out: &mut [f32], scale: f32, offset: f32) {
    let (lo, hi) = out.split_at_mut(16);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = f32::from(q & 0x0f) * scale + offset;
        *h = f32::from(q >> 4) * scale + offset;
    }
}

/// Like [`nibbles`], with bit `j` of `qh` as the fifth bit of element `j`.
fn fifth_bit_nibbles(qs: &[u8], qh: u32, out: &mut [f32], scale: f32, offset: f32) {
    let (lo, hi) = out.split_at_mut(16);
    for (j, ((&q, l), h)) in qs.iter().zip(lo).zip(hi).enumerate() {
        let q_lo = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        let q_hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
        *l = f32::from(q_lo) * scale + offset;
        *h = f32::from(q_hi) * scale + offset;
    }
}

/// Bytes needed for `n` elements of `dtype`; `None` if `n` is not a whole number of blocks
/// or the type is unknown.
pub fn byte_len(dtype: GgmlType, n: usize) -> Option<usize> {
    let (block, size) = dtype.block_layout()?;
    if !n.is_multiple_of(block) {
        return None;
    }
    (n / block).checked_mul(size)
}

/// Dequantizes `n` elements of `dtype` stored in `bytes` (exactly [`byte_len`] bytes).
pub fn dequantize(dtype: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let kernel = block_kernel(dtype).ok_or(DequantError::Unsupported(dtype))?;
    let (block, size) = dtype
        .block_layout()
        .ok_or(DequantError::Unsupported(dtype))?;
    let expected = byte_len(dtype, n);
    if expected != Some(bytes.len()) {
        return Err(DequantError::Length {
            dtype,
            n,
            expected: expected.unwrap_or(usize::MAX),
            got: bytes.len(),
        });
    }
    let mut out = vec![0f32; n];
    // Chunks of many blocks keep rayon's per-task overhead negligible for 1-element "blocks".
    let blocks_per_task = (16384 / block).max(1);
    out.par_chunks_mut(block * blocks_per_task)
        .zip(bytes.par_chunks(size * blocks_per_task))
        .for_each(|(o, b)| {
            for (ob, bb) in o.chunks_exact_mut(block).zip(b.chunks_exact(size)) {
                kernel(bb, ob);
            }
        });
    Ok(out)
}
