//! The ndarray backend's fused host ops against the same ops composed from Burn tensor ops
//! (`kernels::generic`), on contiguous and on strided (axis-swapped) inputs.
#![cfg(feature = "ndarray")]

use burn::backend::NdArray;
use burn::prelude::*;
use kernels::{KvDtype, KvStore, QuantBackend, TensorKv, generic};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type B = NdArray<f32>;

fn random<const D: usize>(rng: &mut StdRng, dims: [usize; D], scale: f32) -> Tensor<B, D> {
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_data(TensorData::new(v, dims), &Default::default())
}

/// A `[b, t, n]` tensor stored as `[b, n, t]` (strided), or contiguous.
fn projection(rng: &mut StdRng, [b, t, n]: [usize; 3], scale: f32, strided: bool) -> Tensor<B, 3> {
    if strided {
        random(rng, [b, n, t], scale).swap_dims(1, 2)
    } else {
        random(rng, [b, t, n], scale)
    }
}

fn assert_close<const D: usize>(what: &str, got: Tensor<B, D>, want: Tensor<B, D>, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let got = got.into_data().to_vec::<f32>().unwrap();
    let want = want.into_data().to_vec::<f32>().unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

#[test]
fn causal_attention_matches_generic() {
    let mut rng = StdRng::seed_from_u64(1);
    // Prefill over several query blocks, a decode step, a chunk continuing a cache.
    for (b, heads, kv, t_q, t_k, strided) in [
        (1, 6, 2, 300, 300, false),
        (2, 4, 4, 1, 50, true),
        (1, 3, 1, 40, 170, true),
    ] {
        let d = 16;
        let q = projection(&mut rng, [b, t_q, heads * d], 2.0, strided);
        let k = projection(&mut rng, [b, t_k, kv * d], 2.0, strided);
        let v = projection(&mut rng, [b, t_k, kv * d], 1.0, false);
        assert_close(
            &format!("attention b{b} h{heads} kv{kv} {t_q}/{t_k}"),
            B::causal_attention(q.clone(), k.clone(), v.clone(), heads, kv),
            generic::causal_attention(q, k, v, heads, kv),
            1e-4,
        );
    }
}

/// `t` as a KV cache of `dtype` stores it.
fn stored(t: Tensor<B, 3>, dtype: KvDtype) -> Tensor<B, 3> {
    let dims = t.dims();
    let values = dtype.as_stored(&t.into_data().to_vec::<f32>().unwrap());
    Tensor::from_data(TensorData::new(values, dims), &Default::default())
}

/// The host cache (head-major, f16, f32 or Q8_0) and the backend-generic tensor cache, appended
/// in chunks (a prompt, single tokens, a chunk that grows the buffers past 64 positions,
/// strided projections): attention of each chunk's queries over everything held is attention
/// over the concatenation of all keys and values appended, at the cache's precision.
#[test]
fn kv_caches_attend_over_everything_appended() {
    let mut rng = StdRng::seed_from_u64(4);
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        for (b, heads, kv, d, strided) in [
            (1, 9, 3, 64, false),
            (2, 4, 2, 16, true),
            (2, 4, 2, 32, true),
        ] {
            if !dtype.holds_heads_of(d) {
                continue;
            }
            let device = Default::default();
            let mut host = <B as QuantBackend>::KvCache::new(dtype, kv, 0, &device);
            let mut reference = TensorKv::<B>::new(dtype, kv, 0, &device);
            let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
            for t in [5, 1, 1, 70, 1, 3] {
                let q = projection(&mut rng, [b, t, heads * d], 2.0, strided);
                let k = projection(&mut rng, [b, t, kv * d], 2.0, strided);
                let v = projection(&mut rng, [b, t, kv * d], 1.0, strided);
                host.append(k.clone(), v.clone());
                let (k, v) = (stored(k, dtype), stored(v, dtype));
                reference.append(k.clone(), v.clone());
                all_k.push(k);
                all_v.push(v);
                assert_eq!(host.len(), reference.len());
                // Attention over everything appended so far, concatenated.
                let want = generic::causal_attention(
                    q.clone(),
                    Tensor::cat(all_k.clone(), 1),
                    Tensor::cat(all_v.clone(), 1),
                    heads,
                    kv,
                );
                let what = format!("{dtype} b{b} h{heads} kv{kv} d{d}: {t} at {}", host.len());
                assert_close(&what, host.attend(q.clone(), heads), want.clone(), 1e-4);
                assert_close(&what, reference.attend(q, heads), want, 1e-4);
            }
        }
    }
}

/// `append_spans` of one batch's rows (a prompt chunk and single tokens, contiguous or strided
/// projections) holds exactly what appending each sequence's rows alone holds: the host cache's
/// override and the trait's default (through the tensor cache).
#[test]
fn appending_spans_equals_appending_each_sequence() {
    fn check<C: KvStore<B>>(dtype: KvDtype, kv: usize, d: usize, strided: bool, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (heads, spans) = (2 * kv, [1, 4, 1, 2]);
        let device = Default::default();
        let fresh = || -> Vec<C> {
            (0..spans.len())
                .map(|_| C::new(dtype, kv, 0, &device))
                .collect()
        };
        let (mut batched, mut alone) = (fresh(), fresh());
        // Histories of different lengths first.
        for (i, (b, a)) in batched.iter_mut().zip(&mut alone).enumerate() {
            let len = 1 + 9 * i;
            let (k, v) = (
                random(&mut rng, [1, len, kv * d], 2.0),
                random(&mut rng, [1, len, kv * d], 1.0),
            );
            b.append(k.clone(), v.clone());
            a.append(k, v);
        }
        let rows: usize = spans.iter().sum();
        let k = projection(&mut rng, [1, rows, kv * d], 2.0, strided);
        let v = projection(&mut rng, [1, rows, kv * d], 1.0, strided);
        let mut refs: Vec<&mut C> = batched.iter_mut().collect();
        C::append_spans(&mut refs, k.clone(), v.clone(), &spans);
        let mut start = 0;
        for (cache, &n) in alone.iter_mut().zip(&spans) {
            cache.append(k.clone().narrow(1, start, n), v.clone().narrow(1, start, n));
            start += n;
        }
        for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
            assert_eq!(b.len(), a.len());
            let q = random(&mut rng, [1, 1, heads * d], 2.0);
            let (got, want) = (b.attend(q.clone(), heads), a.attend(q, heads));
            let what = format!("{dtype} kv{kv} d{d} strided {strided}: sequence {i}");
            assert_eq!(
                got.into_data().to_vec::<f32>().unwrap(),
                want.into_data().to_vec::<f32>().unwrap(),
                "{what}"
            );
        }
    }
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        for (seed, strided) in [(6, false), (7, true)] {
            check::<<B as QuantBackend>::KvCache>(dtype, 3, 64, strided, seed);
            check::<TensorKv<B>>(dtype, 2, 32, strided, seed);
        }
    }
}

/// A batched decode step over caches of different lengths equals attending each cache alone
/// (through the tensor cache).
#[test]
fn batched_decode_matches_attending_each_cache() {
    let mut rng = StdRng::seed_from_u64(5);
    let device = Default::default();
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        for (heads, kv, d) in [(9, 3, 64), (4, 2, 16), (8, 8, 128)] {
            if !dtype.holds_heads_of(d) {
                continue;
            }
            let lens = [1, 37, 130];
            let q = random(&mut rng, [1, lens.len(), heads * d], 2.0);
            let mut host = Vec::new();
            let mut alone = Vec::new();
            for len in lens {
                let (k, v) = (
                    random(&mut rng, [1, len, kv * d], 2.0),
                    random(&mut rng, [1, len, kv * d], 1.0),
                );
                let mut cache = <B as QuantBackend>::KvCache::new(dtype, kv, 0, &device);
                cache.append(k.clone(), v.clone());
                let mut reference = TensorKv::<B>::new(dtype, kv, 0, &device);
                reference.append(stored(k, dtype), stored(v, dtype));
                let i = alone.len();
                alone.push(reference.attend(q.clone().narrow(1, i, 1), heads));
                host.push(cache);
            }
            let host: Vec<_> = host.iter().collect();
            assert_close(
                &format!("{dtype} decode h{heads} kv{kv} d{d}"),
                KvStore::attend_batch(q, &host, heads),
                Tensor::cat(alone, 1),
                1e-4,
            );
        }
    }
}

#[test]
fn rotary_matches_generic() {
    let mut rng = StdRng::seed_from_u64(2);
    // A decode step's few rows (on the calling thread) and a prompt's (over threads).
    for (t, d) in [(7, 8), (400, 16)] {
        let cos = random(&mut rng, [t + 3, d], 1.0).narrow(0, 3, t);
        let sin = random(&mut rng, [t + 3, d], 1.0).narrow(0, 3, t);
        for strided in [false, true] {
            let x = projection(&mut rng, [2, t, 3 * d], 1.0, strided);
            assert_close(
                &format!("rotary t{t} d{d} strided {strided}"),
                B::rotary(x.clone(), cos.clone(), sin.clone(), 3),
                generic::rotary(x, cos.clone(), sin.clone(), 3),
                1e-6,
            );
        }
    }
}

#[test]
fn swiglu_dense_linear_and_nll_match_generic() {
    let mut rng = StdRng::seed_from_u64(3);
    let (gate, up) = (
        random(&mut rng, [3, 5, 100], 8.0),
        random(&mut rng, [3, 5, 100], 2.0),
    );
    assert_close(
        "swiglu",
        B::swiglu(gate.clone(), up.clone()),
        generic::swiglu(gate, up),
        1e-5,
    );

    let x = random(&mut rng, [37, 70], 1.0);
    let w_t = random(&mut rng, [70, 45], 1.0);
    let x3 = projection(&mut rng, [2, 9, 70], 1.0, true);
    assert_close(
        "dense, 3-D strided x",
        B::dense_linear(x3.clone(), w_t.clone()),
        generic::dense_linear(x3, w_t.clone()),
        1e-5,
    );
    assert_close(
        "dense",
        B::dense_linear(x.clone(), w_t.clone()),
        x.clone().matmul(w_t.clone()),
        1e-5,
    );
    // A transposed (strided) left operand.
    let xt = random(&mut rng, [70, 37], 1.0).transpose();
    assert_close(
        "dense, strided x",
        B::dense_linear(xt.clone(), w_t.clone()),
        xt.matmul(w_t),
        1e-5,
    );

    let logits = random(&mut rng, [9, 1000], 10.0);
    let targets: Vec<u32> = (0..9).map(|i| i * 97 + 5).collect();
    let (got, want) = (
        B::sum_nll(logits.clone(), &targets),
        generic::sum_nll(logits, &targets),
    );
    assert!(
        (got - want).abs() < 1e-4 * want.abs(),
        "nll {got} vs {want}"
    );
}

/// RMS norm against Burn's composition and against a naive f64 one: a decode step's rows (the
/// calling thread), enough rows for the threads, a width that is not a multiple of the 16 lanes,
/// a strided input, and an all-zero row (`eps` alone keeps it finite).
#[test]
fn rms_norm_matches_generic_and_naive() {
    let mut rng = StdRng::seed_from_u64(9);
    let eps = 1e-5;
    for (dims, strided) in [
        ([1, 1, 576], false),
        ([1, 8, 100], false),
        ([2, 300, 576], false),
        ([3, 40, 70], true),
    ] {
        let mut x = projection(&mut rng, dims, 3.0, strided);
        if !strided {
            // Row 0 all zero.
            x = x.slice_assign(
                [0..1, 0..1, 0..dims[2]],
                Tensor::zeros([1, 1, dims[2]], &Default::default()),
            );
        }
        let weight = random(&mut rng, [dims[2]], 2.0);
        let got = B::rms_norm(x.clone(), weight.clone(), eps);
        assert_close(
            &format!("rms_norm {dims:?}"),
            got.clone(),
            generic::rms_norm(x.clone(), weight.clone(), eps),
            1e-5,
        );
        let (xs, ws) = (
            x.into_data().to_vec::<f32>().unwrap(),
            weight.into_data().to_vec::<f32>().unwrap(),
        );
        let got = got.into_data().to_vec::<f32>().unwrap();
        for (r, (row, out)) in xs.chunks(dims[2]).zip(got.chunks(dims[2])).enumerate() {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dims[2] as f64;
            let rms = (ms + eps).sqrt();
            for ((&v, &w), &o) in row.iter().zip(&ws).zip(out) {
                let want = v as f64 / rms * w as f64;
                assert!(
                    (o as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "row {r} of {dims:?}: {o} vs {want}"
                );
            }
        }
    }
}

/// The symmetric block product against a naive f64 `xᵀx`, around the block size (96) and on a
/// transposed (strided) input; the result must be exactly symmetric.
#[test]
fn gram_matches_naive() {
    let mut rng = StdRng::seed_from_u64(4);
    for (n, f, strided) in [
        (7, 1, false),
        (50, 95, false),
        (33, 96, true),
        (40, 97, false),
        (129, 200, true),
        (0, 5, false),
    ] {
        let x = if strided {
            random(&mut rng, [f, n], 1.0).transpose()
        } else {
            random(&mut rng, [n, f], 1.0)
        };
        let v = x.clone().into_data().to_vec::<f32>().unwrap();
        let got = B::gram(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(got.len(), f * f);
        for i in 0..f {
            for j in 0..f {
                let want: f64 = (0..n)
                    .map(|r| v[r * f + i] as f64 * v[r * f + j] as f64)
                    .sum();
                let g = got[i * f + j];
                assert!(
                    (g as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{n}×{f} ({i}, {j}): {g} vs {want}"
                );
                assert_eq!(g, got[j * f + i], "{n}×{f}: not symmetric at ({i}, {j})");
            }
        }
    }
}

/// The running Gram sum adds into the sum's memory with the same f32 additions as adding a new
/// Gram matrix, on contiguous and strided chunks, and leaves a shared sum untouched.
#[test]
fn gram_add_matches_adding_a_gram() {
    let mut rng = StdRng::seed_from_u64(5);
    for (n, f, strided) in [(31, 97, false), (64, 200, true)] {
        let sum = B::gram(random(&mut rng, [n + 3, f], 1.0));
        let x = if strided {
            random(&mut rng, [f, n], 1.0).transpose()
        } else {
            random(&mut rng, [n, f], 1.0)
        };
        let want = sum.clone().add(B::gram(x.clone())).into_data();
        let before = sum.clone().into_data();
        // While `sum` is held elsewhere the op must copy it, not write into it.
        let shared = B::gram_add(sum.clone(), x.clone());
        sum.clone().into_data().assert_eq(&before, true);
        shared.into_data().assert_eq(&want, true);
        // Handed over, it is written in place.
        B::gram_add(sum, x).into_data().assert_eq(&want, true);
    }
}

/// The fused reductions against the same sums of composed tensor ops, on tensors laid out alike
/// and differently.
#[test]
fn squared_distance_and_inner_product_match_generic() {
    let mut rng = StdRng::seed_from_u64(6);
    for strided in [false, true] {
        let a = projection(&mut rng, [2, 37, 300], 1.0, strided);
        let b = projection(&mut rng, [2, 37, 300], 1.0, false);
        for (got, want) in [
            (
                B::squared_distance(a.clone(), b.clone()),
                generic::squared_distance(a.clone(), b.clone()),
            ),
            (
                B::inner_product(a.clone(), b.clone()),
                generic::inner_product(a.clone(), b.clone()),
            ),
        ] {
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }
}

/// The layout ops the calibration pipeline reads activations through: exact (they only move or
/// subtract values), on contiguous, axis-swapped and narrowed inputs.
#[test]
fn difference_flatten_and_host_values_are_exact() {
    let mut rng = StdRng::seed_from_u64(7);
    let narrowed = random(&mut rng, [3, 40, 70], 1.0).narrow(1, 3, 33);
    for (name, a) in [
        ("contiguous", projection(&mut rng, [2, 33, 70], 1.0, false)),
        ("swapped", projection(&mut rng, [2, 33, 70], 1.0, true)),
        ("narrowed", narrowed.narrow(0, 1, 2)),
    ] {
        let b = projection(&mut rng, [2, 33, 70], 1.0, false);
        B::difference(a.clone(), b.clone())
            .into_data()
            .assert_eq(&a.clone().sub(b).into_data(), true);
        let flat = B::flatten_rows(a.clone());
        assert_eq!(flat.dims(), [66, 70], "{name}");
        flat.into_data()
            .assert_eq(&generic::flatten_rows(a.clone()).into_data(), true);
        let want = a.clone().into_data().to_vec::<f32>().unwrap();
        B::with_host_values(&a, |v| assert_eq!(v, want.as_slice(), "{name}"));
        generic::with_host_values(&a, |v| assert_eq!(v, want.as_slice(), "{name}"));
    }
    // A flattened view shares the memory but not the mutations of later ops.
    let a = random(&mut rng, [2, 5, 8], 1.0);
    let before = a.clone().into_data();
    let flat = B::flatten_rows(a.clone()).add_scalar(1.0);
    a.into_data().assert_eq(&before, true);
    assert_eq!(flat.dims(), [10, 8]);
}
