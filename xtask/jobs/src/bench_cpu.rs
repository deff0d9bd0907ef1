//! `cargo xtask bench-kernels --backend cpu`: the CPU dequant GEMV/GEMM against the f32
//! GEMV of the model's dense path, with the machine's read bandwidth measured in the
//! same run.
//!
//! Every timed product reads weights from DRAM, not cache: each case cycles through enough
//! copies of its weights to exceed [`COLD_BYTES`] (this VM reports a 260 MiB L3), as a
//! decode step does when it walks a whole model. The `hot` column repeats one copy
//! (L3-resident) for comparison.
//!
//! By default it times the f32 kernel on the best SIMD path and, where the CPU has them, the
//! int8 dot products that `kernels::cpu::gemm` uses (`int8`); `BENCH_CPU_PATHS=scalar,avx2,
//! avx512,int8` picks the kernels instead.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use kernels::QuantBackend;
use kernels::cpu::{CpuKernelError, CpuPacked, SimdPath, gemm_with, vnni};
use quant_core::{PackedLinear, QuantConfig, QuantDim, Quantized};

use crate::{BenchKernelsArgs, bench_decode, write_report_section};

/// Weight bytes cycled through per case so that reads come from DRAM.
const COLD_BYTES: usize = 768 << 20;
/// Buffer summed to measure the read bandwidth.
const BANDWIDTH_BYTES: usize = 1 << 30;
/// Rounds per case, each against its own bandwidth measurement.
const ROUNDS: usize = 5;

pub fn run(args: &BenchKernelsArgs) -> Result<()> {
    let paths = kernels()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("measuring read bandwidth ({threads} threads, 1 GiB)...");
    let probe = ReadProbe::new(threads);
    let bw = probe.gbps(5);
    eprintln!("read bandwidth: {bw:.2} GB/s");

    let mut md = String::new();
    writeln!(
        md,
        "## CPU (SIMD dequant GEMV/GEMM, `kernels::cpu`)\n\n\
         {threads} threads, measured read bandwidth **{bw:.2} GB/s** (sum of a 1 GiB buffer). \
         Each case is timed in {ROUNDS} rounds, each right after its own bandwidth measurement; \
         `µs` is the median time and `% of bw` the median of the rounds' fractions. \
         Weights are cycled through ≥ {} MiB of copies so reads come from DRAM; \
         `hot` repeats one copy (cache-resident). GB/s counts packed weight bytes (codes + f16 \
         scales + zeros); the f32 baseline is the model's dense path (`QuantBackend::dense_linear`, AVX-512 `gemm`) \
         `[M,K]×[K,N]` on pre-transposed weights (also cycled). Group size {}.\n",
        COLD_BYTES >> 20,
        args.group_size
    )?;
    writeln!(
        md,
        "| shape (out×in) | dim | bits | M | path | weight MB | µs | GB/s | % of bw | hot µs | f32 µs | speedup |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let mut csv = String::from(
        "shape,out_features,in_features,dim,bits,group_size,m,path,weight_bytes,us,gbps,frac_bandwidth,hot_us,f32_us,speedup,bandwidth_gbps\n",
    );

    for (name, out, inp) in args.shapes() {
        let baseline = F32Baseline::new(out, inp);
        for &m in &args.m {
            let f32_time = baseline.time(m, args)?;
            for &bits in &args.bits {
                for &dim in &args.dims {
                    let packed = random_packed(dim, bits, args.group_size, out, inp)?;
                    let cpu = CpuPacked::new(&packed).context("re-laying out for the CPU")?;
                    let bytes = cpu.weight_bytes();
                    let copies: Vec<CpuPacked> = (0..COLD_BYTES.div_ceil(bytes))
                        .map(|_| cpu.clone())
                        .collect();
                    let x = pseudo_random(m * inp, 1);
                    let mut y = vec![0f32; m * out];
                    for &path in &paths {
                        // Other tenants of this VM's host change the bandwidth from one
                        // second to the next, so each round is set against a bandwidth
                        // measured just before it.
                        let mut rounds = Vec::new();
                        for _ in 0..ROUNDS {
                            let bw_now = probe.gbps(2);
                            let t = time_cycled(args, copies.len(), |i| {
                                path.run(&x, m, &copies[i], &mut y)
                            })?;
                            rounds.push((t, bytes as f64 / t.as_secs_f64() / 1e9 / bw_now));
                        }
                        let cold = median_time(rounds.iter().map(|r| r.0));
                        let frac =
                            bench_decode::median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>());
                        let hot = time_cycled(args, 1, |_| path.run(&x, m, &cpu, &mut y))?;
                        let (us, hot_us, f32_us) = (micros(cold), micros(hot), micros(f32_time));
                        let gbps = bytes as f64 / cold.as_secs_f64() / 1e9;
                        let speedup = f32_us / us;
                        let dim_s = dim.as_str();
                        println!(
                            "{name:>14} {dim_s} b{bits} m{m} {path}: {us:8.1} µs  {gbps:6.2} GB/s \
                             ({:4.1}% bw)  hot {hot_us:8.1} µs  f32 {f32_us:9.1} µs  ×{speedup:.2}",
                            100.0 * frac
                        );
                        writeln!(
                            md,
                            "| {name} | {dim_s} | {bits} | {m} | {path} | {:.1} | {us:.1} | {gbps:.2} | {:.0}% | {hot_us:.1} | {f32_us:.1} | {speedup:.2}× |",
                            bytes as f64 / 1e6,
                            100.0 * frac
                        )?;
                        writeln!(
                            csv,
                            "{name},{out},{inp},{dim_s},{bits},{},{m},{path},{bytes},{us:.2},{gbps:.3},{:.4},{hot_us:.2},{f32_us:.2},{speedup:.3},{bw:.3}",
                            args.group_size, frac
                        )?;
                    }
                }
            }
        }
    }
    if args.decode_rounds > 0 {
        md.push('\n');
        md.push_str(&bench_decode::run(args.decode_rounds, args.decode_tokens)?);
    }
    print!("\n{md}");
    write_report_section(&args.out, "cpu", &md)?;
    let csv_path = args
        .out
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("bench-kernels-cpu.csv");
    std::fs::write(&csv_path, csv).with_context(|| format!("writing {}", csv_path.display()))?;
    eprintln!("wrote {} and {}", args.out.display(), csv_path.display());
    Ok(())
}

/// A CPU kernel the benchmark times.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    /// f32 on a SIMD path (`gemm_with`).
    F32(SimdPath),
    /// Int8 dot products on rounded activations (`vnni::gemm`).
    Int8,
}

impl Kernel {
    fn run(self, x: &[f32], m: usize, w: &CpuPacked, y: &mut [f32]) -> Result<(), CpuKernelError> {
        match self {
            Self::F32(path) => gemm_with(path, x, m, w, y),
            Self::Int8 => vnni::gemm(x, m, w, y),
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::F32(path) => write!(f, "{path:?}"),
            Self::Int8 => f.write_str("int8"),
        }
    }
}

fn kernels() -> Result<Vec<Kernel>> {
    let Ok(list) = std::env::var("BENCH_CPU_PATHS") else {
        let mut all = vec![Kernel::F32(SimdPath::best())];
        all.extend(vnni::is_supported().then_some(Kernel::Int8));
        return Ok(all);
    };
    list.split(',')
        .map(|name| {
            let name = name.trim();
            if name.eq_ignore_ascii_case("int8") {
                if !vnni::is_supported() {
                    bail!("int8 in BENCH_CPU_PATHS: {}", CpuKernelError::NoInt8);
                }
                return Ok(Kernel::Int8);
            }
            let path = SimdPath::ALL
                .into_iter()
                .find(|p| format!("{p:?}").eq_ignore_ascii_case(name))
                .with_context(|| format!("unknown SIMD path {name:?} in BENCH_CPU_PATHS"))?;
            if !path.is_supported() {
                bail!("SIMD path {path:?} is not supported on this machine");
            }
            Ok(Kernel::F32(path))
        })
        .collect()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The median of `times` ([`bench_decode::median`]: of an even count, the mean of the middle
/// two).
fn median_time(times: impl IntoIterator<Item = Duration>) -> Duration {
    let secs: Vec<f64> = times.into_iter().map(|t| t.as_secs_f64()).collect();
    Duration::from_secs_f64(bench_decode::median(&secs))
}

/// Median time of one call, over `args.iters` passes through `n` weight copies.
fn time_cycled<E: std::error::Error + Send + Sync + 'static>(
    args: &BenchKernelsArgs,
    n: usize,
    mut call: impl FnMut(usize) -> Result<(), E>,
) -> Result<Duration> {
    let passes = |count: usize, call: &mut dyn FnMut(usize) -> Result<(), E>| {
        (0..count)
            .map(|_| {
                let start = Instant::now();
                for i in 0..n {
                    call(i)?;
                }
                Ok(start.elapsed() / n as u32)
            })
            .collect::<Result<Vec<_>, E>>()
    };
    passes(args.warmup.max(1), &mut call)?;
    Ok(median_time(passes(args.iters.max(1), &mut call)?))
}

/// A 1 GiB buffer whose parallel sum measures the read bandwidth.
struct ReadProbe {
    buf: Vec<u64>,
    threads: usize,
}

impl ReadProbe {
    fn new(threads: usize) -> Self {
        let buf = (0..BANDWIDTH_BYTES / 8).map(|i| i as u64).collect();
        Self { buf, threads }
    }

    /// Best of `passes` sums, in GB/s.
    fn gbps(&self, passes: usize) -> f64 {
        let chunk = self.buf.len().div_ceil(self.threads);
        let mut best = f64::INFINITY;
        for _ in 0..passes {
            let start = Instant::now();
            let total = std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .buf
                    .chunks(chunk)
                    .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &b| a.wrapping_add(b))))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(0))
                    .fold(0u64, u64::wrapping_add)
            });
            best = best.min(start.elapsed().as_secs_f64());
            std::hint::black_box(total);
        }
        BANDWIDTH_BYTES as f64 / best / 1e9
    }
}

type B = NdArray<f32>;

/// `[M, K] × [K, N]` in f32 through the model's dense path (`QuantBackend::dense_linear`:
/// the `gemm` crate on ndarray), on enough copies of the weight to defeat the cache.
struct F32Baseline {
    k: usize,
    weights: Vec<Tensor<B, 2>>,
}

impl F32Baseline {
    fn new(out: usize, inp: usize) -> Self {
        let device = Default::default();
        let w = pseudo_random(inp * out, 2);
        let copies = COLD_BYTES.div_ceil(inp * out * 4);
        let weights = (0..copies)
            .map(|_| Tensor::from_data(TensorData::new(w.clone(), [inp, out]), &device))
            .collect();
        Self { k: inp, weights }
    }

    fn time(&self, m: usize, args: &BenchKernelsArgs) -> Result<Duration> {
        let device = Default::default();
        let x: Tensor<B, 2> = Tensor::from_data(
            TensorData::new(pseudo_random(m * self.k, 3), [m, self.k]),
            &device,
        );
        time_cycled(args, self.weights.len(), |i| {
            let y =
                <B as QuantBackend>::dense_linear(x.clone(), self.weights[i].clone()).into_data();
            std::hint::black_box(y);
            Ok::<(), std::convert::Infallible>(())
        })
    }
}

/// Deterministic values in [-1, 1) (xorshift: the benchmark needs no statistical quality).
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A packed weight with random codes, scales and zeros (the kernel's speed does not depend
/// on the values).
fn random_packed(
    dim: QuantDim,
    bits: u32,
    group_size: usize,
    out: usize,
    inp: usize,
) -> Result<PackedLinear> {
    let config = QuantConfig::new(bits, quant_core::GroupSize::Len(group_size), dim)?;
    let (rows, cols) = dim.grouped_shape(out, inp);
    let groups = rows * cols / group_size;
    let maxq = ((1u32 << bits) - 1) as f32;
    let u = |n, seed| pseudo_random(n, seed).into_iter().map(|v| (v + 1.0) / 2.0);
    Ok(Quantized {
        config,
        out_features: out,
        in_features: inp,
        group_size,
        codes: u(rows * cols, 4)
            .map(|v| (v * maxq).round() as u8)
            .collect(),
        scales: u(groups, 5).map(|v| 0.001 + 0.01 * v).collect(),
        zeros: u(groups, 6).map(|v| (v * maxq).round()).collect(),
    }
    .pack())
}
