//! quant-core speed on the LLaMA-7B layer shapes (CPU; targets: RTN ≥ 1 GB/s, GPTQ 4096×4096 < 10 s).
//!
//! * `rtn/{oc,ic}/4096x4096`: throughput in bytes of f32 weights.
//! * `hessian/add_batch_512x4096`: one 512-token calibration sample into a 4096-input Hessian;
//!   the reference calibration (128 × 512 tokens) costs 128× this.
//! * `gptq_solve/{oc,ic}/{4096x4096,11008x4096}`: GPTQ given the Hessian (3-bit, g = 128,
//!   act-order, blocks of 128): damping, Cholesky, inverse and the column loop.
//!
//! `QUANT_CORE_BENCH_QUICK=1` skips the 11008×4096 shape.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quant_core::{GptqOptions, GroupSize, Hessian, QuantConfig, QuantDim, gptq, quantize_rtn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Correlated calibration rows with a few outlier channels, like real activations.
fn calibration(tokens: usize, ic: usize, seed: u64) -> Vec<f32> {
    let rank = 32;
    let mix = random(rank * ic, seed);
    let z = random(tokens * rank, seed + 1);
    let mut x = random(tokens * ic, seed + 2);
    for t in 0..tokens {
        for k in 0..rank {
            let zk = z[t * rank + k];
            for (v, m) in x[t * ic..(t + 1) * ic]
                .iter_mut()
                .zip(&mix[k * ic..(k + 1) * ic])
            {
                *v += zk * m;
            }
        }
        for o in [7, 1000, 3000] {
            x[t * ic + o] *= 30.0;
        }
    }
    x
}

fn bench_rtn(c: &mut Criterion) {
    let (oc, ic) = (4096, 4096);
    let w = random(oc * ic, 1);
    let mut g = c.benchmark_group("rtn");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes((oc * ic * 4) as u64));
    for dim in QuantDim::ALL {
        let config = QuantConfig::new(3, GroupSize::Len(128), dim).unwrap();
        g.bench_function(format!("{dim}/4096x4096"), |b| {
            b.iter(|| quantize_rtn(&w, oc, ic, config).unwrap())
        });
    }
    g.finish();
}

fn bench_hessian(c: &mut Criterion) {
    let (tokens, ic) = (512, 4096);
    let x = calibration(tokens, ic, 2);
    let mut g = c.benchmark_group("hessian");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(tokens as u64));
    g.bench_function("add_batch_512x4096", |b| {
        let mut h = Hessian::new(ic);
        b.iter(|| h.add_batch(&x, tokens).unwrap())
    });
    g.finish();
}

fn bench_gptq(c: &mut Criterion) {
    let ic = 4096;
    // The solve's cost does not depend on how many tokens built H; 4096 keep the setup short.
    let tokens = 4096;
    let mut h = Hessian::new(ic);
    let x = calibration(tokens, ic, 3);
    for s in x.chunks(512 * ic) {
        h.add_batch(s, 512).unwrap();
    }
    drop(x);
    let quick = std::env::var_os("QUANT_CORE_BENCH_QUICK").is_some();
    let shapes: &[usize] = if quick { &[4096] } else { &[4096, 11008] };
    let mut g = c.benchmark_group("gptq_solve");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for &oc in shapes {
        let w = random(oc * ic, 4);
        for dim in QuantDim::ALL {
            let config = QuantConfig::new(3, GroupSize::Len(128), dim).unwrap();
            g.bench_function(format!("{dim}/{oc}x{ic}"), |b| {
                b.iter(|| gptq(&w, oc, ic, &h, config, GptqOptions::default()).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_rtn, bench_hessian, bench_gptq);
criterion_main!(benches);
