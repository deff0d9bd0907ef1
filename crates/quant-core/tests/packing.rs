//! Pack/unpack round trips for every bit width, and the packed layout the kernels read.

use proptest::prelude::*;
use quant_core::packing::{pack_row, unpack_range, unpack_row, words_for};
use quant_core::{GroupSize, QuantConfig, QuantDim, quantize_rtn};

fn codes_strategy() -> impl Strategy<Value = (u32, Vec<u8>)> {
    prop_oneof![Just(2u32), Just(3u32), Just(4u32), Just(8u32)].prop_flat_map(|bits| {
        let max = ((1u32 << bits) - 1) as u8;
        (Just(bits), prop::collection::vec(0..=max, 0..200))
    })
}

proptest! {
    #[test]
    fn pack_unpack_round_trip((bits, codes) in codes_strategy()) {
        let mut words = vec![0u32; words_for(codes.len(), bits)];
        pack_row(&codes, bits, &mut words);
        // The stream built bit by bit: code j's bit i at stream bit j·bits + i.
        let mut want = vec![0u32; words.len()];
        for (j, &c) in codes.iter().enumerate() {
            for i in 0..bits as usize {
                let bit = j * bits as usize + i;
                want[bit / 32] |= ((c as u32 >> i) & 1) << (bit % 32);
            }
        }
        prop_assert_eq!(&words, &want);
        let mut back = vec![0u8; codes.len()];
        unpack_row(&words, bits, &mut back);
        prop_assert_eq!(&back, &codes);
        // Any range of the stream is those codes.
        for start in [0, 1, 7, 13, codes.len() / 3, codes.len() / 2].into_iter().filter(|&s| s <= codes.len()) {
            let mut part = vec![0u8; codes.len() - start];
            unpack_range(&words, bits, start, &mut part);
            prop_assert_eq!(&part[..], &codes[start..]);
        }
        // No stray bits past the last code: padding is zero.
        let used = codes.len() * bits as usize;
        if !used.is_multiple_of(32) {
            prop_assert_eq!(words.last().unwrap() >> (used % 32), 0);
        }
    }

    #[test]
    fn packed_linear_round_trips_codes(
        bits in prop_oneof![Just(2u32), Just(3u32), Just(4u32), Just(8u32)],
        out in 1usize..12, inp in 1usize..12, ic in any::<bool>(), seed in any::<u64>(),
    ) {
        let dim = if ic { QuantDim::Ic } else { QuantDim::Oc };
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((seed.wrapping_mul(i as u64 + 1) >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
            .collect();
        let q = quantize_rtn(&w, out, inp, QuantConfig::new(bits, GroupSize::Whole, dim).unwrap()).unwrap();
        let p = q.pack();
        prop_assert!(p.validate().is_ok());
        prop_assert_eq!(p.codes(), q.codes.clone());
        // f16 parameters: the packed dequantization is within f16 rounding of the f32 one.
        for (a, b) in p.dequantize().iter().zip(q.dequantize()) {
            prop_assert!((a - b).abs() <= 2e-3 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}

#[test]
fn three_bit_layout_is_32_codes_in_3_words_little_endian() {
    let codes: Vec<u8> = (0..32).map(|i| (i % 8) as u8).collect();
    let mut words = vec![0u32; words_for(32, 3)];
    assert_eq!(words.len(), 3);
    pack_row(&codes, 3, &mut words);
    // Rebuild the 96-bit stream by hand: code j at bits [3j, 3j+3).
    let mut stream = 0u128;
    for (j, &c) in codes.iter().enumerate() {
        stream |= (c as u128) << (3 * j);
    }
    assert_eq!(
        words,
        vec![stream as u32, (stream >> 32) as u32, (stream >> 64) as u32]
    );
}

#[test]
fn four_bit_words_hold_eight_codes_low_first() {
    let codes = [1u8, 2, 3, 4, 5, 6, 7, 8, 15];
    let mut words = vec![0u32; words_for(codes.len(), 4)];
    pack_row(&codes, 4, &mut words);
    assert_eq!(words, vec![0x8765_4321, 0xF]);
}

#[test]
fn per_ic_packed_rows_are_input_channels() {
    // Per-IC: packed row k = input channel k, with one scale per group of output channels.
    let (out, inp) = (8, 3);
    // W[r, k] = ((r mod 4) − 1.5)·1.25·(k + 1): every group of 4 output channels spans
    // [−1.875, 1.875]·(k+1), so scale = (k+1)/4 and zero = −round(−7.5) = 8, all exact in binary.
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i / inp % 4) as f32 - 1.5) * 1.25 * ((i % inp) as f32 + 1.0))
        .collect();
    let q = quantize_rtn(
        &w,
        out,
        inp,
        QuantConfig::new(4, GroupSize::Len(4), QuantDim::Ic).unwrap(),
    )
    .unwrap();
    let p = q.pack();
    assert_eq!(p.rows_cols(), (inp, out));
    assert_eq!(p.groups_per_row(), 2);
    assert_eq!(p.words_per_row(), 1);
    for k in 0..inp {
        for gi in 0..2 {
            let want = 0.25 * (k as f32 + 1.0);
            assert!(
                (p.scales[k * 2 + gi].to_f32() - want).abs() < 1e-3,
                "row {k} is input channel {k}"
            );
            assert_eq!(p.zeros[k * 2 + gi].to_f32(), 8.0);
        }
    }
    for (i, (a, b)) in p.dequantize().iter().zip(&w).enumerate() {
        let k = (i % inp) as f32;
        assert!((a - b).abs() <= 0.125 * (k + 1.0) + 1e-3, "{a} vs {b}");
    }
}

/// A shape whose buffer sizes wrap around to zero: out 2^32, in 2^34, 8 bits, groups of 4 give
/// 2^64 words and 2^64 scales, which wrapped to 0 matched empty buffers.
#[cfg(target_pointer_width = "64")]
#[test]
fn shapes_too_large_to_address_are_rejected() {
    let p = quant_core::PackedLinear {
        dim: QuantDim::Oc,
        bits: 8,
        group_size: 4,
        out_features: 1 << 32,
        in_features: 1 << 34,
        qweight: vec![],
        scales: vec![],
        zeros: vec![],
    };
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("too large"), "{e}");
}
