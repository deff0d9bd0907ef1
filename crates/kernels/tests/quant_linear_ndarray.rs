//! `QuantLinear` on the ndarray backend against dequantize + naive matmul.
#![cfg(feature = "ndarray")]

#[path = "cube_common/mod.rs"]
mod cube_common;

use burn::backend::NdArray;
use burn::prelude::*;
use cube_common::{assert_close, random_packed, random_x, reference, rng};
use kernels::{QuantLinear, QuantLinearError};
use quant_core::QuantDim;

type B = NdArray<f32>;

#[test]
fn forward_matches_reference_both_dims() {
    let device = Default::default();
    let mut rng = rng(11);
    for dim in QuantDim::ALL {
        // [1, 3]: the SIMD kernel (M ≤ 8); [2, 5]: the dense path.
        for (bits, lead) in [(3, [1, 3]), (4, [1, 3]), (3, [2, 5]), (4, [2, 5])] {
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
            assert_close(
                &format!("ndarray {dim} b{bits}"),
                &got,
                &want,
                &bound,
                2e-5,
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

#[test]
fn f16_weight_matches_reference() {
    use half::f16;
    use rand::Rng;
    let device = Default::default();
    let mut rng = rng(14);
    let (n, k) = (200, 75);
    let w: Vec<f16> = (0..n * k)
        .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    let layer = QuantLinear::<B>::from_f16(&w, [n, k], &device).unwrap();
    assert_eq!((layer.out_features(), layer.in_features()), (n, k));
    // [1, 3]: the f16 GEMV (M ≤ 8); [2, 5]: the dense product on the widened weight.
    for lead in [[1, 3], [2, 5]] {
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
                .map(|j| x[row * k + j] as f64 * w[o * k + j].to_f64())
                .sum();
            assert!(
                (*g as f64 - want).abs() < 1e-4,
                "{lead:?} at {i}: {g} vs {want}"
            );
        }
    }
    let err = QuantLinear::<B>::from_f16(&w[1..], [n, k], &device).unwrap_err();
    assert!(matches!(err, QuantLinearError::F16Shape { .. }), "{err}");
}
