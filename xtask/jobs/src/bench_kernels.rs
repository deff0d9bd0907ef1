//! `cargo xtask bench-kernels --backend wgpu|cuda`: the CubeCL dequantizing kernels against the
//! same product with f16 weights through Burn's matmul on the same backend.
//!
//! Each measurement is first checked against the device's limits (skipped with a note when it
//! cannot fit), then run guarded: an error or a panic fails that measurement only, the run goes
//! on, and it exits non-zero at the end if any failed. The backend's code is compiled in by
//! xtask-jobs' feature of the same name (`wgpu` is on by default); `cargo xtask` without it
//! rebuilds and reruns itself with it, so `cargo xtask bench-kernels --backend cuda` works as
//! written on a CUDA machine (see docs/gpu.md).

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{BenchBackend, BenchKernelsArgs};

/// Set in the environment of the rerun, so a build that still lacks the feature stops.
const RERUN: &str = "ADADIM_XTASK_RERUN";

pub fn run(args: &BenchKernelsArgs) -> Result<()> {
    match args.backend {
        #[cfg(feature = "wgpu")]
        BenchBackend::Wgpu => imp::run::<burn::backend::Wgpu>(
            args,
            "wgpu",
            &burn::backend::wgpu::WgpuDevice::default(),
        ),
        #[cfg(feature = "cuda")]
        BenchBackend::Cuda => imp::run::<burn::backend::Cuda>(
            args,
            "cuda",
            &burn::backend::cuda::CudaDevice::default(),
        ),
        other => rerun_with_feature(&format!("{other:?}").to_lowercase()),
    }
}

/// Runs this same command through `cargo run` with xtask-jobs' `feature` on.
fn rerun_with_feature(feature: &str) -> Result<()> {
    let manual = format!(
        "cargo run --release -p xtask-jobs --features {feature} -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    if std::env::var_os(RERUN).is_some() {
        bail!("xtask-jobs was built without the `{feature}` feature: run `{manual}`");
    }
    eprintln!("xtask-jobs was built without the `{feature}` feature; running `{manual}`");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "xtask-jobs",
            "--features",
            feature,
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .env(RERUN, "1")
        .status()
        .with_context(|| format!("cannot start `{manual}`"))?;
    if !status.success() {
        bail!("`{manual}` failed with {status}");
    }
    Ok(())
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod imp {
    use std::fmt::Write as _;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::time::Instant;

    use anyhow::{Context, Result, bail};
    use burn::prelude::*;
    use burn::tensor::{DType, TensorPrimitive};
    use kernels::cube::{matmul_buffers, weight_buffers};
    use kernels::{DeviceLimits, QuantBackend};
    use quant_core::{PackedLinear, QuantConfig, QuantDim, Quantized};

    use crate::{BenchKernelsArgs, write_report_section};

    /// One timing of a row: a median in ms, or why there is none.
    #[derive(Clone, Debug)]
    pub(super) enum Outcome {
        Ms(f64),
        /// The device's limits cannot hold what the measurement needs (checked before running).
        Skipped(String),
        /// An error or a panic while uploading or running.
        Failed(String),
    }

    impl Outcome {
        fn ms(&self) -> Option<f64> {
            match self {
                Self::Ms(ms) => Some(*ms),
                _ => None,
            }
        }

        fn note(&self, what: &str) -> Option<String> {
            match self {
                Self::Ms(_) => None,
                Self::Skipped(why) => Some(format!("{what} skipped: {why}")),
                Self::Failed(why) => Some(format!("{what} FAILED: {why}")),
            }
        }
    }

    pub(super) struct Row {
        pub(super) shape: String,
        dim: QuantDim,
        bits: u32,
        m: usize,
        pub(super) quant: Outcome,
        pub(super) f16: Outcome,
        weight_bytes: usize,
    }

    impl Row {
        fn speedup(&self) -> Option<f64> {
            Some(self.f16.ms()? / self.quant.ms()?)
        }

        pub(super) fn note(&self) -> String {
            let notes = [self.quant.note("quant"), self.f16.note("f16")];
            notes.into_iter().flatten().collect::<Vec<_>>().join("; ")
        }

        pub(super) fn failed(&self) -> bool {
            matches!(self.quant, Outcome::Failed(_)) || matches!(self.f16, Outcome::Failed(_))
        }
    }

    /// A layer with pseudo-random codes (timing does not depend on the values).
    fn layer(dim: QuantDim, bits: u32, g: usize, n: usize, k: usize) -> Result<PackedLinear> {
        let (rows, cols) = dim.grouped_shape(n, k);
        let maxq = (1u32 << bits) - 1;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let groups = rows * cols / g;
        Ok(Quantized {
            config: QuantConfig::new(bits, quant_core::GroupSize::Len(g), dim)?,
            out_features: n,
            in_features: k,
            group_size: g,
            codes: (0..rows * cols)
                .map(|_| (next() as u32 % (maxq + 1)) as u8)
                .collect(),
            scales: (0..groups).map(|i| 0.01 + (i % 7) as f32 * 1e-3).collect(),
            zeros: (0..groups)
                .map(|i| (i as u32 % (maxq + 1)) as f32)
                .collect(),
        }
        .pack())
    }

    /// An f16 tensor made on the host: an f32 temporary of a 70B shape exceeds wgpu's largest
    /// buffer.
    fn f16_tensor<B: Backend>(shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
        let values = (0..shape[0] * shape[1])
            .map(|i| burn::tensor::f16::from_f32(((i * 7919) % 1000) as f32 * 1e-3 - 0.5))
            .collect::<Vec<_>>();
        Tensor::from_data(TensorData::new(values, shape), (device, DType::F16))
    }

    /// Median wall time (ms) of `f` followed by a device sync, after `warmup` untimed runs.
    fn time<B: Backend>(
        device: &B::Device,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut(),
    ) -> Result<f64> {
        for _ in 0..warmup {
            f();
        }
        B::sync(device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            let t = Instant::now();
            f();
            B::sync(device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// The first line of a panic's message, or of an error's chain, short enough for a
    /// table cell (burn's autotune panic lists every candidate kernel's failure).
    fn short(msg: &str) -> String {
        let line = msg.lines().next().unwrap_or("").replace('|', "/");
        match line.char_indices().nth(160) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line,
        }
    }

    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    }

    /// Runs `f`, catching its error or panic (a kernel, an upload or burn's matmul autotune may
    /// panic rather than return an error), as a one-line reason. After a failure the device's
    /// recorded errors are drained by a sync, so the next measurement starts clean.
    pub(super) fn guarded<B: Backend, T>(
        device: &B::Device,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T, String> {
        let result = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => format!("{e:#}"),
            Err(payload) => format!("panic: {}", panic_message(payload.as_ref())),
        };
        let _ = B::sync(device);
        Err(short(&result))
    }

    /// Checks what one measurement needs against the device's limits: `Err` is the reason to
    /// skip it.
    pub(super) fn fits(
        limits: &DeviceLimits,
        what: &str,
        buffers: &[(&str, u64)],
    ) -> Result<(), String> {
        limits.check_all(what, buffers).map_err(|e| e.to_string())
    }

    /// Every row of `shapes` × bits × dims × M, each measurement checked against `limits` first
    /// (skipped if it cannot fit) and guarded (an error or panic fails that measurement only).
    pub(super) fn measure<B: QuantBackend>(
        args: &BenchKernelsArgs,
        shapes: &[(String, usize, usize)],
        limits: &DeviceLimits,
        device: &B::Device,
    ) -> Result<Vec<Row>> {
        let g = args.group_size;
        let mut rows = Vec::new();
        for (shape, n, k) in shapes.iter().cloned() {
            // One f16 dense weight per shape, shared by every bits/dim/M.
            let w16_bytes = (k * n * 2) as u64;
            let w16 = fits(limits, "the f16 weight", &[("f16 weight", w16_bytes)])
                .map_err(Outcome::Skipped)
                .and_then(|()| {
                    guarded::<B, _>(device, || Ok(f16_tensor::<B>([k, n], device)))
                        .map_err(Outcome::Failed)
                });
            for &bits in &args.bits {
                for &dim in &args.dims {
                    let packed = layer(dim, bits, g, n, k)
                        .with_context(|| format!("building the {shape} b{bits} {dim} layer"))?;
                    let weight = weight_buffers(&packed);
                    let weight_bytes = packed.qweight.len() * 4 + packed.scales.len() * 4;
                    let wq = fits(limits, "the packed weight", &weight)
                        .map_err(Outcome::Skipped)
                        .and_then(|()| {
                            guarded::<B, _>(device, || Ok(B::upload(&packed, device)?))
                                .map_err(Outcome::Failed)
                        });
                    for &m in &args.m {
                        let quant = wq.as_ref().map_err(Outcome::clone).and_then(|wq| {
                            let mut needs = weight.to_vec();
                            needs.extend(matmul_buffers(dim, [m, n, k], 2));
                            fits(limits, "the quantized product", &needs)
                                .map_err(Outcome::Skipped)?;
                            guarded::<B, _>(device, || {
                                let x = f16_tensor::<B>([m, k], device);
                                time::<B>(device, args.warmup, args.iters, || {
                                    let y =
                                        B::quant_matmul(x.clone().into_primitive().tensor(), wq);
                                    drop(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)));
                                })
                            })
                            .map_err(Outcome::Failed)
                        });
                        let f16 = w16.as_ref().map_err(Outcome::clone).and_then(|w16| {
                            let needs = [
                                ("f16 weight", w16_bytes),
                                ("x", (m * k * 2) as u64),
                                ("y", (m * n * 2) as u64),
                            ];
                            fits(limits, "the f16 product", &needs).map_err(Outcome::Skipped)?;
                            guarded::<B, _>(device, || {
                                let x = f16_tensor::<B>([m, k], device);
                                time::<B>(device, args.warmup, args.iters, || {
                                    drop(x.clone().matmul(w16.clone()));
                                })
                            })
                            .map_err(Outcome::Failed)
                        });
                        let row = Row {
                            shape: shape.clone(),
                            dim,
                            bits,
                            m,
                            quant: quant.map_or_else(|o| o, Outcome::Ms),
                            f16: f16.map_or_else(|o| o, Outcome::Ms),
                            weight_bytes,
                        };
                        eprintln!("{}", line(&row, g));
                        rows.push(row);
                    }
                }
            }
            drop(w16);
            B::memory_cleanup(device);
        }
        Ok(rows)
    }

    pub fn run<B: QuantBackend>(
        args: &BenchKernelsArgs,
        key: &str,
        device: &B::Device,
    ) -> Result<()> {
        let adapter = B::name(device);
        let on_cpu = key == "wgpu" && adapter_is_cpu();
        let limits = B::device_limits(device);
        tracing::info!("bench-kernels on {adapter}, limits {limits:?}");
        let g = args.group_size;
        let rows = measure::<B>(args, &args.shapes(), &limits, device)?;
        let md = markdown(&rows, args, &adapter, on_cpu, &limits);
        println!("{md}");
        write_report_section(&args.out, key, &md)?;
        let csv_path = args.out.with_file_name(format!("bench-kernels-{key}.csv"));
        std::fs::write(&csv_path, csv(&rows, g))
            .with_context(|| format!("writing {}", csv_path.display()))?;
        tracing::info!("wrote {} and {}", args.out.display(), csv_path.display());
        let failed = rows.iter().filter(|r| r.failed()).count();
        if failed > 0 {
            bail!(
                "{failed} of {} rows failed (see their notes in {}); rows skipped for the \
                 device's limits are not failures",
                rows.len(),
                args.out.display()
            );
        }
        Ok(())
    }

    /// Lavapipe (and any software Vulkan) must never be reported as a GPU.
    fn adapter_is_cpu() -> bool {
        // The only Vulkan driver on the development machines is Mesa's lavapipe; a real GPU
        // run sets ADADIM_BENCH_GPU=1 to drop the CPU label.
        std::env::var("ADADIM_BENCH_GPU")
            .map(|v| v != "1")
            .unwrap_or(true)
    }

    fn ideal(bits: u32, g: usize) -> f64 {
        16.0 / (bits as f64 + 32.0 / g as f64)
    }

    fn gbps(bytes: usize, ms: f64) -> f64 {
        bytes as f64 / (ms * 1e-3) / 1e9
    }

    fn fmt_ms(o: &Outcome) -> String {
        o.ms().map_or("–".into(), |ms| format!("{ms:.3}"))
    }

    fn line(r: &Row, g: usize) -> String {
        let quant = match r.quant.ms() {
            Some(ms) => format!("{ms:.3} ms ({:.2} GB/s)", gbps(r.weight_bytes, ms)),
            None => "–".into(),
        };
        let speedup = r.speedup().map_or("–".into(), |s| format!("{s:.2}x"));
        let note = r.note();
        format!(
            "{} {} b{} M={}: quant {quant}, f16 {} ms, speedup {speedup} (ideal {:.2}x){}{note}",
            r.shape,
            r.dim,
            r.bits,
            r.m,
            fmt_ms(&r.f16),
            ideal(r.bits, g),
            if note.is_empty() { "" } else { "; " },
        )
    }

    fn markdown(
        rows: &[Row],
        args: &BenchKernelsArgs,
        adapter: &str,
        on_cpu: bool,
        limits: &DeviceLimits,
    ) -> String {
        let mut s = String::new();
        let label = if on_cpu {
            "**CPU (lavapipe) figures, not GPU**: wgpu on Mesa's software Vulkan driver"
        } else {
            "GPU figures"
        };
        let mib = |b: Option<u64>| b.map_or("not reported".into(), |b| format!("{} MiB", b >> 20));
        let _ = writeln!(s, "## {:?} backend ({adapter})\n", args.backend);
        let _ = writeln!(
            s,
            "{label}. g = {}, activations f16, median of {} runs after {} warm-up. \
             GB/s = packed weight bytes (codes + 4 B/group) / time; ideal = 16 / (b + 32/g); \
             of ideal = speedup / ideal. Device: largest buffer {}, memory {}; a measurement \
             that needs more is skipped (see its note).\n",
            args.group_size,
            args.iters,
            args.warmup,
            mib(limits.max_buffer_bytes),
            mib(limits.memory_bytes),
        );
        let _ = writeln!(
            s,
            "| shape (OC×IC) | dim | bits | M | quant ms | GB/s | f16 ms | speedup | ideal | of ideal | note |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for r in rows {
            let ideal = ideal(r.bits, args.group_size);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2}× | {} | {} |",
                r.shape,
                r.dim,
                r.bits,
                r.m,
                fmt_ms(&r.quant),
                r.quant.ms().map_or("–".into(), |ms| format!(
                    "{:.2}",
                    gbps(r.weight_bytes, ms)
                )),
                fmt_ms(&r.f16),
                r.speedup().map_or("–".into(), |x| format!("{x:.2}×")),
                ideal,
                r.speedup()
                    .map_or("–".into(), |x| format!("{:.0}%", 100.0 * x / ideal)),
                r.note()
            );
        }
        s
    }

    fn csv(rows: &[Row], g: usize) -> String {
        let mut s =
            String::from("shape,dim,bits,group_size,m,quant_ms,gbps,f16_ms,speedup,ideal,note\n");
        let num =
            |v: Option<f64>, digits: usize| v.map_or(String::new(), |v| format!("{v:.digits$}"));
        for r in rows {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{:.3},\"{}\"",
                r.shape,
                r.dim,
                r.bits,
                g,
                r.m,
                num(r.quant.ms(), 4),
                num(r.quant.ms().map(|ms| gbps(r.weight_bytes, ms)), 2),
                num(r.f16.ms(), 4),
                num(r.speedup(), 3),
                ideal(r.bits, g),
                r.note().replace('"', "'")
            );
        }
        s
    }
}

/// On lavapipe (or any wgpu adapter): the skip and failure paths of the bench, with a
/// synthetic limit, since the device cannot be made smaller.
#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::Wgpu;
    use burn::backend::wgpu::WgpuDevice;
    use kernels::DeviceLimits;
    use quant_core::QuantDim;

    use super::imp::{Outcome, guarded, measure};
    use crate::{BenchBackend, BenchKernelsArgs};

    fn args() -> BenchKernelsArgs {
        BenchKernelsArgs {
            backend: BenchBackend::Wgpu,
            bits: vec![4],
            m: vec![1],
            dims: vec![QuantDim::Ic, QuantDim::Oc],
            group_size: 128,
            models: vec![],
            warmup: 0,
            iters: 1,
            decode_rounds: 0,
            decode_tokens: 0,
            out: Default::default(),
        }
    }

    #[test]
    fn measurements_past_the_device_limits_are_skipped_and_the_run_goes_on() {
        // 1 MiB buffers: 2048×2048 fits neither its f16 weight (8 MiB) nor its 4-bit codes
        // (2 MiB); 1024×1024 fits its codes (512 KiB) but not its f16 weight (2 MiB); 256×256
        // fits both. The largest shape comes first: a skip must not end the run.
        let limits = DeviceLimits {
            max_buffer_bytes: Some(1 << 20),
            memory_bytes: None,
        };
        let shapes = [
            ("big".to_string(), 2048, 2048),
            ("mid".to_string(), 1024, 1024),
            ("small".to_string(), 256, 256),
        ];
        let rows = measure::<Wgpu>(&args(), &shapes, &limits, &WgpuDevice::default()).unwrap();
        assert_eq!(rows.len(), 6, "3 shapes × 2 dims × 1 bits × 1 M");
        let skipped = |o: &Outcome, tensor: &str| match o {
            Outcome::Skipped(why) => {
                why.contains(&format!("`{tensor}`")) && why.contains("1048576")
            }
            _ => false,
        };
        let timed = |o: &Outcome| matches!(o, Outcome::Ms(ms) if *ms > 0.0);
        for r in &rows {
            assert!(!r.failed(), "{}: {}", r.shape, r.note());
            match r.shape.as_str() {
                "big" => {
                    assert!(skipped(&r.quant, "qweight"), "{:?}", r.quant);
                    assert!(skipped(&r.f16, "f16 weight"), "{:?}", r.f16);
                    assert!(r.note().contains("quant skipped") && r.note().contains("f16 skipped"));
                }
                "mid" => {
                    assert!(timed(&r.quant), "{:?}", r.quant);
                    assert!(skipped(&r.f16, "f16 weight"), "{:?}", r.f16);
                }
                _ => {
                    assert!(timed(&r.quant) && timed(&r.f16), "{}", r.note());
                    assert!(r.note().is_empty());
                }
            }
        }
    }

    #[test]
    fn an_error_or_a_panic_fails_one_measurement_with_its_reason() {
        let device = WgpuDevice::default();
        let e =
            guarded::<Wgpu, ()>(&device, || panic!("kernel exploded\nsecond line")).unwrap_err();
        assert_eq!(e, "panic: kernel exploded");
        let e = guarded::<Wgpu, ()>(&device, || anyhow::bail!("no | pipes")).unwrap_err();
        assert_eq!(e, "no / pipes");
        assert_eq!(guarded::<Wgpu, _>(&device, || Ok(7)), Ok(7));
    }
}
