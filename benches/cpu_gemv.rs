//! Criterion micro-benchmark of the CPU dequant GEMV (`kernels::cpu`) on a cache-resident
//! 4096×4096 weight, per SIMD path. The DRAM-bound figures, the bandwidth and the f32
//! baseline are in `cargo xtask bench-kernels --backend cpu`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kernels::cpu::{CpuPacked, SimdPath, gemm_with};
use quant_core::{GroupSize, QuantConfig, QuantDim, Quantized};

fn packed(dim: QuantDim, bits: u32, n: usize) -> CpuPacked {
    let config = QuantConfig::new(bits, GroupSize::Len(128), dim).expect("valid config");
    let maxq = (1u32 << bits) - 1;
    let groups = n * n / 128;
    let q = Quantized {
        config,
        out_features: n,
        in_features: n,
        group_size: 128,
        codes: (0..n * n)
            .map(|i| ((i * 7 + i / 13) as u32 % (maxq + 1)) as u8)
            .collect(),
        scales: (0..groups)
            .map(|i| 0.001 + (i % 17) as f32 * 1e-4)
            .collect(),
        zeros: (0..groups)
            .map(|i| (i as u32 % (maxq + 1)) as f32)
            .collect(),
    };
    CpuPacked::new(&q.pack()).expect("valid packed weight")
}

fn bench(c: &mut Criterion) {
    let n = 4096;
    let x: Vec<f32> = (0..n).map(|i| ((i % 101) as f32 - 50.0) / 50.0).collect();
    let mut y = vec![0f32; n];
    let mut group = c.benchmark_group("cpu_gemv_4096");
    for dim in [QuantDim::Oc, QuantDim::Ic] {
        for bits in [3, 4] {
            let w = packed(dim, bits, n);
            group.throughput(Throughput::Bytes(w.weight_bytes() as u64));
            for path in SimdPath::available() {
                let name = format!("{}_b{bits}_{path:?}", dim.as_str());
                group.bench_function(name, |b| {
                    b.iter(|| gemm_with(path, &x, 1, &w, &mut y).expect("gemv"))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
