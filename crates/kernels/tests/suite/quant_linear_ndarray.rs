//! `QuantLinear` on the ndarray backend against dequantize + naive matmul.
#![cfg(feature = "ndarray")]

use crate::cube_common;

use burn::backend::NdArray;
use burn::prelude::*;
use cube_common::{assert_close, random_packed, random_x, reference, rng};
use kernels::{QuantBackend, QuantLinear, QuantLinearError, WeightKind};
use quant_core::QuantDim;

type B = NdArray<f32>;

#[test]
fn forward_matches_reference_both_dims() {
    let device = Default::default();
    let mut rng = rng(11);
    for dim in QuantDim::ALL {
        // [1, 3]: one pass of the SIMD kernel; [2, 5]: two passes; [3, 50]: beyond
        // `DIRECT_ROWS_PACKED`, the dense product on the widened weight.
        const {
            assert!(
                10 <= kernels::cpu::DIRECT_ROWS_PACKED && 150 > kernels::cpu::DIRECT_ROWS_PACKED
            )
        };
        for (bits, lead) in [
            (3, [1, 3]),
            (4, [1, 3]),
            (3, [2, 5]),
            (4, [2, 5]),
            (3, [3, 50]),
        ] {
            let (n, k) = (128, 192);
            let packed = random_packed(&mut rng, dim, bits, 64, n, k);
            let layer = QuantLinear::<B>::new(&packed, &device).unwrap();
            assert_eq!((layer.out_features(), layer.in_features()), (n, k));
            let m = lead[0] * lead[1];
            let x = random_x(&mut rng, m * k, false);
            let y = layer.forward(Tensor::<B, 3>::from_data(
                TensorData::new(x.clone(), [lead[0], lead[1], k]),
                &device,
            ));
            assert_eq!(y.dims(), [lead[0], lead[1], n]);
            let (want, bound) = reference(&packed, &x, m);
            let got = y.into_data().to_vec::<f32>().unwrap();
            // The direct product rounds activations to 8 bits where the CPU has int8 dot
            // products: each moves by at most half a step, 1/254 of its block's largest, about
            // 1/127 of the bound's average |x| (uniform x); its exactness against that
            // definition is `cpu_int8`'s test.
            let int8 = m <= kernels::cpu::DIRECT_ROWS_PACKED && kernels::cpu::vnni::is_supported();
            assert_close(
                &format!("ndarray {dim} b{bits}"),
                &got,
                &want,
                &bound,
                if int8 { 1.0 / 64.0 } else { 2e-5 },
                0.0,
            );
        }
    }
}

#[test]
fn wrong_input_width_is_an_error() {
    let device = Default::default();
    let packed = random_packed(&mut rng(12), QuantDim::Oc, 4, 64, 64, 128);
    let layer = QuantLinear::<B>::new(&packed, &device).unwrap();
    let err = layer
        .try_forward(Tensor::<B, 2>::zeros([3, 64], &device))
        .unwrap_err();
    assert!(
        matches!(err, QuantLinearError::InputShape { expected: 128, .. }),
        "{err}"
    );
}

#[test]
fn invalid_packed_is_an_error() {
    let mut packed = random_packed(&mut rng(13), QuantDim::Ic, 3, 64, 64, 32);
    packed.scales.pop();
    let err = QuantLinear::<B>::new(&packed, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("scales"), "{err}");
}

/// A 16-bit weight (f16 or bf16) through `QuantLinear`: the GEMV at decode sizes and the
/// dense product on the transient widened copy beyond, against an f64 product on its values.
fn check_16bit_weight<T: Copy>(
    seed: u64,
    from_f32: impl Fn(f32) -> T,
    to_f64: impl Fn(T) -> f64,
    upload: impl Fn(&[T], [usize; 2]) -> Result<QuantLinear<B>, QuantLinearError>,
) {
    use rand::Rng;
    let device = Default::default();
    let mut rng = rng(seed);
    let (n, k) = (200, 75);
    let w: Vec<T> = (0..n * k)
        .map(|_| from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    let layer = upload(&w, [n, k]).unwrap();
    assert_eq!((layer.out_features(), layer.in_features()), (n, k));
    // [1, 3]: one pass of the 16-bit GEMV; [2, 5]: two passes; [2, 40]: beyond
    // `DIRECT_ROWS_16BIT`, the dense product on the widened weight.
    const { assert!(10 <= kernels::cpu::DIRECT_ROWS_16BIT && 80 > kernels::cpu::DIRECT_ROWS_16BIT) };
    for lead in [[1, 3], [2, 5], [2, 40]] {
        let m = lead[0] * lead[1];
        let x = random_x(&mut rng, m * k, false);
        let y = layer.forward(Tensor::<B, 3>::from_data(
            TensorData::new(x.clone(), [lead[0], lead[1], k]),
            &device,
        ));
        let got = y.into_data().to_vec::<f32>().unwrap();
        for (i, g) in got.iter().enumerate() {
            let (row, o) = (i / n, i % n);
            let want: f64 = (0..k)
                .map(|j| x[row * k + j] as f64 * to_f64(w[o * k + j]))
                .sum();
            assert!(
                (*g as f64 - want).abs() < 1e-4,
                "{lead:?} at {i}: {g} vs {want}"
            );
        }
    }
}

#[test]
fn f16_weight_matches_reference() {
    use half::f16;
    let device = Default::default();
    check_16bit_weight(14, f16::from_f32, f16::to_f64, |w, shape| {
        QuantLinear::<B>::from_f16(w, shape, &device)
    });
    let w = [f16::ZERO; 10];
    let err = QuantLinear::<B>::from_f16(&w[1..], [2, 5], &device).unwrap_err();
    assert!(matches!(err, QuantLinearError::F16Shape { .. }), "{err}");
}

#[test]
fn bf16_weight_matches_reference() {
    use half::bf16;
    let device = Default::default();
    check_16bit_weight(15, bf16::from_f32, bf16::to_f64, |w, shape| {
        QuantLinear::<B>::from_bf16(w, shape, &device)
    });
    let w = [bf16::ZERO; 10];
    let err = QuantLinear::<B>::from_bf16(&w[1..], [2, 5], &device).unwrap_err();
    assert!(matches!(err, QuantLinearError::Bf16Shape { .. }), "{err}");
}

/// Beyond the direct products' rows every compact weight is multiplied as a dense f32 weight
/// of the same values: the result is bit for bit the dense product's (an evaluation does not
/// depend on whether a linear is stored compact).
#[test]
fn large_products_equal_the_dense_product_bit_for_bit() {
    use half::{bf16, f16};
    use rand::Rng;
    let device = Default::default();
    let mut rng = rng(16);
    let m = kernels::cpu::DIRECT_ROWS_PACKED + 9;
    let (n, k) = (96, 128);
    let x = random_x(&mut rng, m * k, false);
    let x_t = || Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
    let check = |what: &str, layer: QuantLinear<B>, w: Vec<f32>| {
        let w_t = quant_core::transpose(&w, n, k);
        let w_t = Tensor::<B, 2>::from_data(TensorData::new(w_t, [k, n]), &device);
        let want = B::dense_linear(x_t(), w_t)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let got = layer.forward(x_t()).into_data().to_vec::<f32>().unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{what} at {i}: {a} vs {b}");
        }
    };
    for dim in QuantDim::ALL {
        for bits in [3, 4] {
            let packed = random_packed(&mut rng, dim, bits, 32, n, k);
            let layer = QuantLinear::<B>::new(&packed, &device).unwrap();
            check(&format!("{dim} b{bits}"), layer, packed.dequantize());
        }
    }
    // A group size the SIMD kernel does not take (not a multiple of 32).
    let packed = random_packed(&mut rng, QuantDim::Oc, 4, 16, n, k);
    let layer = QuantLinear::<B>::new(&packed, &device).unwrap();
    check("oc b4 g16", layer, packed.dequantize());
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let layer = QuantLinear::<B>::from_f16(&w16, [n, k], &device).unwrap();
    check("f16", layer, w16.iter().map(|v| v.to_f32()).collect());
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let layer = QuantLinear::<B>::from_bf16(&wb, [n, k], &device).unwrap();
    check("bf16", layer, wb.iter().map(|v| v.to_f32()).collect());
}

/// Several layers on one input (`forward_many`, one parallel pass on the host) give each
/// layer's own `forward`, bit for bit: packed weights of both dims at decode-sized and large row
/// counts, and a set with a weight the pass does not take (f16), which goes layer by layer.
#[test]
fn forward_many_is_forward_of_each_layer() {
    use half::f16;
    let device = Default::default();
    let mut rng = rng(17);
    let k = 192;
    let packed = [
        random_packed(&mut rng, QuantDim::Oc, 3, 64, 128, k),
        random_packed(&mut rng, QuantDim::Ic, 3, 64, 64, k),
        random_packed(&mut rng, QuantDim::Ic, 4, 32, 96, k),
    ];
    let mut layers: Vec<QuantLinear<B>> = packed
        .iter()
        .map(|p| QuantLinear::new(p, &device).unwrap())
        .collect();
    let w16: Vec<f16> = random_x(&mut rng, 48 * k, false)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let f16_layer = QuantLinear::<B>::from_f16(&w16, [48, k], &device).unwrap();
    for with_f16 in [false, true] {
        if with_f16 {
            layers.push(f16_layer.clone());
        }
        let refs: Vec<&QuantLinear<B>> = layers.iter().collect();
        for lead in [[1, 1], [2, 5], [3, 50]] {
            let x = random_x(&mut rng, lead[0] * lead[1] * k, false);
            let x = Tensor::<B, 3>::from_data(TensorData::new(x, [lead[0], lead[1], k]), &device);
            let many = QuantLinear::forward_many(x.clone(), &refs);
            assert_eq!(many.len(), layers.len());
            for (i, (layer, got)) in layers.iter().zip(many).enumerate() {
                let want = layer.forward(x.clone());
                assert_eq!(got.dims(), want.dims());
                let (got, want) = (got.into_data(), want.into_data());
                let (got, want) = (
                    got.as_slice::<f32>().unwrap(),
                    want.as_slice::<f32>().unwrap(),
                );
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "layer {i}, rows {lead:?}, with f16: {with_f16}"
                );
            }
        }
    }
}

#[test]
fn kind_names_the_form_the_weight_is_stored_in() {
    let device = Default::default();
    let mut rng = rng(13);
    // Group 64: the SIMD layout; group 48: kept as packed codes for the dense path.
    for (dim, bits, g) in [(QuantDim::Ic, 3, 64), (QuantDim::Oc, 4, 48)] {
        let packed = random_packed(&mut rng, dim, bits, g, 192, 96);
        let layer = QuantLinear::<B>::new(&packed, &device).unwrap();
        assert_eq!(
            layer.kind(),
            WeightKind::Packed {
                dim,
                bits,
                group_size: g
            }
        );
    }
    let w = vec![half::f16::ONE; 6];
    assert_eq!(
        QuantLinear::<B>::from_f16(&w, [2, 3], &device)
            .unwrap()
            .kind(),
        WeightKind::F16
    );
    let w = vec![half::bf16::ONE; 6];
    assert_eq!(
        QuantLinear::<B>::from_bf16(&w, [2, 3], &device)
            .unwrap()
            .kind(),
        WeightKind::Bf16
    );
}
