//! Dequantization of hand-built blocks of every supported type against hand-computed values
//! and a naive element-by-element reference of llama.cpp's block layouts.

use crate::gguf_support;

use gguf_support::f16_bits;
use model_llama::gguf::{DequantError, GgmlType, dequantize};

fn le_u32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

#[test]
fn plain_float_types() {
    let f32_bytes: Vec<u8> = [1.5f32, -2.0, 0.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize(GgmlType::F32, &f32_bytes, 3).unwrap(),
        [1.5, -2.0, 0.0]
    );
    // 0x3C00 = 1.0, 0xC000 = -2.0, 0x3555 = 0.333251953125 (f16 nearest to 1/3).
    let f16_bytes = [0x00, 0x3c, 0x00, 0xc0, 0x55, 0x35];
    assert_eq!(
        dequantize(GgmlType::F16, &f16_bytes, 3).unwrap(),
        [1.0, -2.0, 0.33325195]
    );
    // bf16 is the top half of an f32: 0x3F80 = 1.0, 0xC040 = -3.0, 0x4049 = 3.140625.
    let bf16_bytes = [0x80, 0x3f, 0x40, 0xc0, 0x49, 0x40];
    assert_eq!(
        dequantize(GgmlType::BF16, &bf16_bytes, 3).unwrap(),
        [1.0, -3.0, 3.140625]
    );
}

#[test]
fn q8_0_block() {
    let mut b = f16_bits(0.5).to_vec();
    let qs: Vec<i8> = (0..32)
        .map(|i| if i == 0 { -128 } else { (i * 4 - 60) as i8 })
        .collect();
    b.extend(qs.iter().map(|&q| q as u8));
    let out = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
    assert_eq!(out[0], -64.0);
    assert_eq!(out[1], -28.0);
    assert_eq!(out[31], 32.0);
    let expected: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.5).collect();
    assert_eq!(out, expected);
}

/// 16 bytes whose low nibbles are 0..16 and high nibbles 15..=0.
fn ramp_nibbles() -> Vec<u8> {
    (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
}

#[test]
fn q4_0_block_low_nibbles_first() {
    let mut b = f16_bits(2.0).to_vec();
    b.extend(ramp_nibbles());
    let out = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
    // Element j < 16 is the low nibble of byte j, element 16 + j its high nibble; x = (q - 8)·d.
    assert_eq!(out[0], -16.0);
    assert_eq!(out[15], 14.0);
    assert_eq!(out[16], 14.0);
    assert_eq!(out[31], -16.0);
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(out[16 + j], ((15 - j) as f32 - 8.0) * 2.0);
    }
}

#[test]
fn q4_1_block() {
    let mut b = f16_bits(0.5).to_vec();
    b.extend(f16_bits(-1.0));
    b.extend(ramp_nibbles());
    let out = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
    // x = q·d + m.
    assert_eq!(out[0], -1.0);
    assert_eq!(out[15], 6.5);
    assert_eq!(out[16], 6.5);
    assert_eq!(out[31], -1.0);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.0);
        assert_eq!(out[16 + j], (15 - j) as f32 * 0.5 - 1.0);
    }
}

/// Element `e` of a Q5 block: nibble `e % 16` (low for e < 16), fifth bit = bit `e` of `qh`.
fn q5_code(qs: &[u8], qh: u32, e: usize) -> u32 {
    let byte = qs[e % 16] as u32;
    let nibble = if e < 16 { byte & 15 } else { byte >> 4 };
    nibble | (((qh >> e) & 1) << 4)
}

#[test]
fn q5_0_block() {
    let qh: u32 = 0x8000_0001 | (1 << 16) | (1 << 5);
    let qs = ramp_nibbles();
    let mut b = f16_bits(1.0).to_vec();
    b.extend(le_u32(qh));
    b.extend(&qs);
    let out = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
    // x = (q - 16)·d.
    assert_eq!(out[0], 0.0, "0 | 16 - 16");
    assert_eq!(out[1], -15.0);
    assert_eq!(out[5], 5.0, "5 | 16 - 16");
    assert_eq!(out[16], 15.0, "15 | 16 - 16");
    assert_eq!(out[17], -2.0, "14 - 16");
    assert_eq!(out[31], 0.0, "0 | 16 - 16");
    for (e, &x) in out.iter().enumerate() {
        assert_eq!(x, q5_code(&qs, qh, e) as f32 - 16.0, "element {e}");
    }
}

#[test]
fn q5_1_block() {
    let qh: u32 = 0xA5A5_0F0F;
    let qs = ramp_nibbles();
    let mut b = f16_bits(0.25).to_vec();
    b.extend(f16_bits(-3.0));
    b.extend(le_u32(qh));
    b.extend(&qs);
    let out = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
    assert_eq!(out[0], 16.0 * 0.25 - 3.0);
    assert_eq!(out[4], 4.0 * 0.25 - 3.0);
    for (e, &x) in out.iter().enumerate() {
        assert_eq!(x, q5_code(&qs, qh, e) as f32 * 0.25 - 3.0, "element {e}");
    }
}

/// Many Q4_1 blocks (more than one parallel chunk) against a per-element reference.
#[test]
fn many_q4_1_blocks_match_naive_reference() {
    let n_blocks = 3000;
    let mut bytes = Vec::with_capacity(n_blocks * 20);
    let mut state = 0x1234_5678u32;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    for _ in 0..n_blocks {
        let d = (next() % 1000) as f32 / 997.0;
        let m = -((next() % 1000) as f32) / 331.0;
        bytes.extend(f16_bits(d));
        bytes.extend(f16_bits(m));
        bytes.extend((0..16).map(|_| next() as u8));
    }
    let out = dequantize(GgmlType::Q4_1, &bytes, n_blocks * 32).unwrap();
    for (i, &x) in out.iter().enumerate() {
        let block = &bytes[(i / 32) * 20..(i / 32 + 1) * 20];
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = half::f16::from_le_bytes([block[2], block[3]]).to_f32();
        let e = i % 32;
        let byte = block[4 + e % 16];
        let q = if e < 16 { byte & 15 } else { byte >> 4 };
        assert_eq!(x, q as f32 * d + m, "element {i}");
    }
}

#[test]
fn wrong_lengths_and_types_are_errors() {
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0; 18], 64),
        Err(DequantError::Length { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q8_0, &[0; 34], 31),
        Err(DequantError::Length { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::F32, &[0; 5], 1),
        Err(DequantError::Length { .. })
    ));
    assert_eq!(
        dequantize(GgmlType::Q6K, &[0; 210], 256),
        Err(DequantError::Unsupported(GgmlType::Q6K))
    );
    assert_eq!(
        dequantize(GgmlType::Unknown(77), &[], 0),
        Err(DequantError::Unsupported(GgmlType::Unknown(77)))
    );
    for ty in [0, 1, 2, 3, 6, 7, 8, 30] {
        assert!(GgmlType::from_id(ty).is_dequantizable(), "type {ty}");
        assert_eq!(GgmlType::from_id(ty).id(), ty);
    }
}
