//! CubeCL dequantizing kernels on the wgpu runtime (Mesa lavapipe on machines without a GPU)
//! against `PackedLinear::dequantize()` + a naive f64 matmul.
#![cfg(feature = "wgpu")]

use crate::cube_common;

use burn::backend::Wgpu;
use burn::backend::wgpu::WgpuDevice;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use cube_common::{assert_close, random_packed, random_x, reference, rng};
use kernels::cube::{
    MIN_OC_LANES, MIN_ROWS_PER_SPLIT, REDUCE_MAX_CUBES, REDUCE_UNITS, TARGET_UNITS, ic_splits,
    m_tile, oc_lanes,
};
use kernels::{
    DeviceLimitError, DeviceLimits, QuantBackend, QuantLinear, QuantLinearError, WeightKind,
};
use quant_core::{PackedLinear, QuantDim};

type B = Wgpu;

const MS: [usize; 6] = [1, 2, 3, 7, 16, 64];

/// The wgpu device, or a failure explaining how to get one: a missing adapter must not pass.
fn device() -> WgpuDevice {
    let device = WgpuDevice::default();
    let probe = std::panic::catch_unwind(|| {
        Tensor::<B, 1>::zeros([1], &device).into_data();
    });
    if probe.is_err() {
        panic!(
            "no wgpu adapter found: these tests run on any Vulkan driver; without a GPU install \
             Mesa's CPU driver lavapipe with `apt-get install mesa-vulkan-drivers libvulkan1`"
        );
    }
    device
}

/// Runs the kernel directly on `x [m, k]` (f32 or f16 on the device) and returns f32 values.
fn run(w: &<B as QuantBackend>::Weight, x: &[f32], m: usize, k: usize, dtype: DType) -> Vec<f32> {
    let device = device();
    let xt = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [m, k]), &device).cast(dtype);
    let y = B::quant_matmul(xt.into_primitive().tensor(), w);
    let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y));
    assert_eq!(y.dtype(), dtype, "output keeps the activation dtype");
    y.into_data().convert::<f32>().to_vec().unwrap()
}

/// Shapes per dim: the grouped-along size is a multiple of `g` (the format requires it) but
/// not of the 64-block cube width; the other size is arbitrary (odd, not a multiple of the
/// split length), and K is large enough for several K-splits.
fn shapes(dim: QuantDim, g: usize) -> (usize, usize) {
    match (dim, g) {
        (QuantDim::Ic, 64) => (192, 333),
        (QuantDim::Ic, _) => (384, 517),
        (QuantDim::Oc, 64) => (77, 640),
        (QuantDim::Oc, _) => (130, 768),
    }
}

fn check_all(dtype: DType, rel_out: f32, seed: u64) {
    let device = device();
    let mut rng = rng(seed);
    for dim in QuantDim::ALL {
        for bits in [2, 3, 4, 8] {
            for g in [64, 128] {
                let (n, k) = shapes(dim, g);
                let packed = random_packed(&mut rng, dim, bits, g, n, k);
                let w = B::upload(&packed, &device).unwrap();
                assert!(
                    matches!(w.kind(), WeightKind::Packed { .. }),
                    "{dim} b{bits} g{g} must use the kernel"
                );
                for m in MS {
                    let x = random_x(&mut rng, m * k, true);
                    let (want, bound) = reference(&packed, &x, m);
                    let got = run(&w, &x, m, k, dtype);
                    // f32: only summation order differs (≤ ~K·ε₃₂ relative to the term sizes,
                    // 2e-5 at K ≈ 770 leaves room while one wrong code, ≈ bound / (K·q̄), fails).
                    // f16: the output is rounded to f16 as well (half an ulp = 2⁻¹¹ ≈ 4.9e-4).
                    assert_close(
                        &format!("{dim} b{bits} g{g} {n}x{k} M={m} {dtype:?}"),
                        &got,
                        &want,
                        &bound,
                        2e-5,
                        rel_out,
                    );
                }
            }
        }
    }
}

#[test]
fn kernels_match_reference_f32() {
    check_all(DType::F32, 0.0, 1);
}

/// Symmetric groups (docs/method.md §2.2): RTN's symmetric weights, zero points at the centre
/// code, through the packed kernels of both dims.
#[test]
fn symmetric_weights_match_reference() {
    let device = device();
    let mut rng = rng(43);
    for dim in QuantDim::ALL {
        let (n, k) = shapes(dim, 64);
        let w = random_x(&mut rng, n * k, false);
        let config = quant_core::QuantConfig::new(3, quant_core::GroupSize::Len(64), dim)
            .unwrap()
            .with_sym(true);
        let packed = quant_core::quantize_rtn(&w, n, k, config).unwrap().pack();
        assert!(packed.zeros.iter().all(|z| z.to_f32() == 4.0));
        let wd = B::upload(&packed, &device).unwrap();
        assert!(matches!(wd.kind(), WeightKind::Packed { .. }), "{dim}");
        for m in [1, 7] {
            let x = random_x(&mut rng, m * k, true);
            let (want, bound) = reference(&packed, &x, m);
            let got = run(&wd, &x, m, k, DType::F32);
            assert_close(&format!("{dim} sym M={m}"), &got, &want, &bound, 2e-5, 0.0);
        }
    }
}

#[test]
fn kernels_match_reference_f16() {
    let device = device();
    assert!(
        B::supports_dtype(&device, DType::F16),
        "the wgpu adapter `{}` lacks f16 shader support; the f16 kernel test needs it \
         (lavapipe from mesa-vulkan-drivers has it)",
        B::name(&device)
    );
    check_all(DType::F16, 1e-3, 2);
}

/// Group sizes that are not a multiple of 32 take the dense path and stay correct.
#[test]
fn unaligned_groups_fall_back_to_dense() {
    let device = device();
    let mut rng = rng(3);
    for dim in QuantDim::ALL {
        let packed = random_packed(&mut rng, dim, 3, 48, 96, 144);
        let w = B::upload(&packed, &device).unwrap();
        assert!(!matches!(w.kind(), WeightKind::Packed { .. }));
        let x = random_x(&mut rng, 5 * 144, false);
        let (want, bound) = reference(&packed, &x, 5);
        // Dense matmul of unknown tiling: allow a looser summation error.
        assert_close(
            "dense fallback",
            &run(&w, &x, 5, 144, DType::F32),
            &want,
            &bound,
            1e-4,
            1e-5,
        );
    }
}

/// Per-OC rows of every lane count (1 to 64 lanes a row group, so 64 to 1 groups a cube), with
/// row counts that are not a multiple of the rows a cube or a unit holds, and token counts
/// around the M-tile.
#[test]
fn oc_lane_counts_and_partial_cubes() {
    let device = device();
    let mut rng = rng(6);
    // (out, in): in = 32 (1 lane), 64 (2), 96 (4 lanes, one idle), 640 (8), 2048 (16 lanes at
    // N = 33), 8192 (64 lanes at N ≤ 4); N = 1 (one row in a unit of two), 129 (two cubes of
    // 128 rows at one lane).
    for (n, k, bits) in [
        (1, 640, 8),
        (65, 32, 4),
        (129, 32, 2),
        (3, 64, 3),
        (70, 96, 2),
        (9, 640, 3),
        (33, 2048, 4),
        (3, 8192, 3),
    ] {
        let packed = random_packed(&mut rng, QuantDim::Oc, bits, 32, n, k);
        let w = B::upload(&packed, &device).unwrap();
        assert!(matches!(w.kind(), WeightKind::Packed { .. }));
        for m in [1, 5, 9] {
            let x = random_x(&mut rng, m * k, false);
            let (want, bound) = reference(&packed, &x, m);
            let lanes = oc_lanes(k / 32, n, m.div_ceil(m_tile(QuantDim::Oc, m)));
            assert_close(
                &format!("oc b{bits} {n}x{k} M={m} ({lanes} lanes)"),
                &run(&w, &x, m, k, DType::F32),
                &want,
                &bound,
                2e-5,
                0.0,
            );
        }
    }
}

#[test]
fn quant_linear_forward_any_leading_dims() {
    let device = device();
    let mut rng = rng(4);
    let packed: PackedLinear = random_packed(&mut rng, QuantDim::Ic, 3, 64, 128, 96);
    let layer = QuantLinear::<B>::new(&packed, &device).unwrap();
    assert_eq!((layer.in_features(), layer.out_features()), (96, 128));
    let x = random_x(&mut rng, 2 * 3 * 96, false);
    let xt = Tensor::<B, 3>::from_data(TensorData::new(x.clone(), [2, 3, 96]), &device);
    let y = layer.forward(xt);
    assert_eq!(y.dims(), [2, 3, 128]);
    let (want, bound) = reference(&packed, &x, 6);
    let got = y.into_data().to_vec::<f32>().unwrap();
    assert_close("QuantLinear wgpu", &got, &want, &bound, 2e-5, 0.0);

    let bad = Tensor::<B, 2>::zeros([4, 95], &device);
    assert!(layer.try_forward(bad).is_err());
}

#[test]
fn invalid_packed_is_an_error() {
    let device = device();
    let mut rng = rng(5);
    let mut packed = random_packed(&mut rng, QuantDim::Oc, 4, 64, 8, 128);
    packed.qweight.pop();
    let err = B::upload(&packed, &device).unwrap_err().to_string();
    assert!(err.contains("qweight"), "{err}");
}

/// Per-IC outputs beyond what the split-K reduction launches units for (wgpu caps a launch at
/// 65 535 cubes a dimension, which `M · N / 256` passes at eval sizes): each unit sums several.
#[test]
fn ic_reduction_covers_more_outputs_than_units() {
    let device = device();
    let mut rng = rng(9);
    let (m, n, k) = (64, 16_512, 128);
    assert!(m * n > REDUCE_MAX_CUBES * REDUCE_UNITS);
    let packed = random_packed(&mut rng, QuantDim::Ic, 4, 128, n, k);
    let w = B::upload(&packed, &device).unwrap();
    let x = random_x(&mut rng, m * k, false);
    let (want, bound) = reference(&packed, &x, m);
    assert_close(
        "M·N > units",
        &run(&w, &x, m, k, DType::F32),
        &want,
        &bound,
        2e-5,
        0.0,
    );
}

/// The buffer a refused upload names, if it is refused for the device's limits.
fn refused_buffer<T: std::fmt::Debug>(
    r: Result<T, QuantLinearError>,
) -> Option<(String, u64, u64)> {
    match r {
        Ok(_) => None,
        Err(QuantLinearError::DeviceLimit(DeviceLimitError::BufferTooLarge {
            tensor,
            bytes,
            limit,
        })) => Some((tensor, bytes, limit)),
        Err(e) => panic!("refused for another reason: {e}"),
    }
}

/// Uploads check every buffer against the device's largest one, with a synthetic limit (the
/// device cannot be made smaller): a weight past it is an error naming the buffer and the
/// limit, one within it uploads and multiplies correctly.
#[test]
fn uploads_past_a_synthetic_buffer_limit_are_refused_by_name() {
    use burn::backend::wgpu::WgpuRuntime;
    use kernels::cube::{upload_f16_within, upload_within};
    let device = device();
    let mut rng = rng(8);
    let (n, k) = (64, 256);
    let packed = random_packed(&mut rng, QuantDim::Oc, 4, 64, n, k);
    // qweight: 64 · 256 codes of 4 bits = 8192 bytes; scales+zeros: 256 groups of 4 bytes.
    let limits = |bytes| DeviceLimits {
        max_buffer_bytes: Some(bytes),
        memory_bytes: None,
    };
    let upload = |bytes| upload_within::<WgpuRuntime>(&packed, &device, &limits(bytes));
    assert_eq!(
        refused_buffer(upload(8191)),
        Some(("qweight".into(), 8192, 8191))
    );
    let w = upload(8192).expect("every buffer fits");
    assert!(matches!(w.kind(), WeightKind::Packed { .. }));
    let x = random_x(&mut rng, 3 * k, false);
    let (want, bound) = reference(&packed, &x, 3);
    assert_close(
        "at the limit",
        &run(&w, &x, 3, k, DType::F32),
        &want,
        &bound,
        2e-5,
        1e-6,
    );
    // A dense 16-bit weight is widened to f32 on the device: 4 bytes a value.
    let w16 = vec![half::f16::ONE; n * k];
    let dense = |bytes| upload_f16_within::<WgpuRuntime>(&w16, [n, k], &device, &limits(bytes));
    assert_eq!(
        refused_buffer(dense(65535)),
        Some(("weight".into(), 65536, 65535))
    );
    assert!(refused_buffer(dense(65536)).is_none());
    let msg = dense(65535).unwrap_err().to_string();
    assert!(
        msg.contains("`weight`") && msg.contains("65535 bytes"),
        "{msg}"
    );
}

/// The same refusal against the device's real limit (on lavapipe its 128 MiB storage-buffer
/// binding): a weight one row past it, refused before any device work.
#[test]
fn uploads_past_the_devices_largest_buffer_are_refused() {
    let device = device();
    let limits = B::device_limits(&device);
    let max = limits
        .max_buffer_bytes
        .expect("a cubecl device reports its largest buffer");
    let k = 1024;
    let n = (max / (4 * k as u64)) as usize + 1;
    let w16 = vec![half::f16::ZERO; n * k];
    let refused = refused_buffer(QuantLinear::<B>::from_f16(&w16, [n, k], &device));
    assert_eq!(refused, Some(("weight".into(), (n * k * 4) as u64, max)));
}

#[test]
fn split_heuristics_cover_k_exactly() {
    for k in [1, 127, 128, 333, 4096, 11008] {
        for (n_blocks, m_tiles) in [(1, 1), (4, 1), (128, 1), (344, 16)] {
            let (splits, per) = ic_splits(k, n_blocks, m_tiles);
            assert!(
                splits >= 1 && splits * per >= k && (splits - 1) * per < k,
                "k={k}"
            );
            assert!(
                splits == 1 || per >= MIN_ROWS_PER_SPLIT / 2,
                "k={k}: {per} rows a split"
            );
            assert!(splits == 1 || n_blocks * m_tiles * (splits - 1) < TARGET_UNITS);
        }
    }
    for k_blocks in [1, 2, 3, 5, 18, 128, 256, 344, 1024] {
        for (n, m_tiles) in [(1, 1), (10, 1), (576, 1), (4096, 1), (4096, 8)] {
            let lanes = oc_lanes(k_blocks, n, m_tiles);
            assert!(
                lanes.is_power_of_two() && 64 % lanes == 0,
                "{k_blocks} blocks: {lanes} lanes"
            );
            // Never more lanes than blocks (rounded up), at least MIN_OC_LANES if it has them.
            assert!(lanes < 2 * k_blocks, "{k_blocks} blocks: {lanes} lanes");
            assert!(lanes >= MIN_OC_LANES.min(k_blocks), "{k_blocks}: {lanes}");
        }
    }
    assert_eq!(oc_lanes(128, 4096, 1), 8);
    assert_eq!(oc_lanes(1024, 1, 1), 64);
    assert_eq!(oc_lanes(2, 10, 1), 2);
    assert_eq!(oc_lanes(18, 576, 1), 8);
    assert_eq!(m_tile(QuantDim::Ic, 3), 4);
    assert_eq!(m_tile(QuantDim::Ic, 64), 4);
    assert_eq!(m_tile(QuantDim::Oc, 64), 8);
    assert_eq!(m_tile(QuantDim::Oc, 1), 1);
}
