//! `cargo xtask bench-kernels --backend wgpu|cuda`: the CubeCL dequantizing kernels against the
//! same product with f16 weights through Burn's matmul on the same backend.
//!
//! Needs xtask built with the backend's feature (`--features wgpu` or `cuda`).

use anyhow::{Result, bail};

use crate::{BenchBackend, BenchKernelsArgs};

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
        other => bail!(
            "xtask was built without the `{}` feature: run `cargo run --release -p xtask \
             --features {0} -- bench-kernels --backend {0}`",
            format!("{other:?}").to_lowercase()
        ),
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod imp {
    use std::fmt::Write as _;
    use std::time::Instant;

    use anyhow::{Context, Result};
    use burn::prelude::*;
    use burn::tensor::{DType, TensorPrimitive};
    use kernels::QuantBackend;
    use quant_core::{PackedLinear, QuantConfig, QuantDim, Quantized};

    use crate::{BenchKernelsArgs, write_report_section};

    struct Row {
        shape: String,
        dim: QuantDim,
        bits: u32,
        m: usize,
        quant_ms: f64,
        f16_ms: f64,
        weight_bytes: usize,
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

    pub fn run<B: QuantBackend>(
        args: &BenchKernelsArgs,
        key: &str,
        device: &B::Device,
    ) -> Result<()> {
        let adapter = B::name(device);
        let on_cpu = key == "wgpu" && adapter_is_cpu();
        tracing::info!("bench-kernels on {adapter}");
        let g = args.group_size;
        let mut rows = Vec::new();
        for (shape, n, k) in args.shapes() {
            // One f16 dense weight per shape, shared by every bits/dim/M.
            let w16 = f16_tensor::<B>([k, n], device);
            for &bits in &args.bits {
                for &dim in &args.dims {
                    let packed = layer(dim, bits, g, n, k)
                        .with_context(|| format!("building the {shape} b{bits} {dim} layer"))?;
                    let wq = B::upload(&packed, device)?;
                    let weight_bytes = packed.qweight.len() * 4 + packed.scales.len() * 4;
                    for &m in &args.m {
                        let x = f16_tensor::<B>([m, k], device);
                        let quant_ms = time::<B>(device, args.warmup, args.iters, || {
                            let y = B::quant_matmul(x.clone().into_primitive().tensor(), &wq);
                            drop(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)));
                        })?;
                        let f16_ms = time::<B>(device, args.warmup, args.iters, || {
                            drop(x.clone().matmul(w16.clone()));
                        })?;
                        let row = Row {
                            shape: shape.clone(),
                            dim,
                            bits,
                            m,
                            quant_ms,
                            f16_ms,
                            weight_bytes,
                        };
                        eprintln!("{}", line(&row, g));
                        rows.push(row);
                    }
                }
            }
        }
        let md = markdown(&rows, args, &adapter, on_cpu);
        println!("{md}");
        write_report_section(&args.out, key, &md)?;
        let csv_path = args.out.with_file_name(format!("bench-kernels-{key}.csv"));
        std::fs::write(&csv_path, csv(&rows, g))
            .with_context(|| format!("writing {}", csv_path.display()))?;
        tracing::info!("wrote {} and {}", args.out.display(), csv_path.display());
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

    fn line(r: &Row, g: usize) -> String {
        format!(
            "{} {} b{} M={}: quant {:.3} ms ({:.2} GB/s), f16 {:.3} ms, speedup {:.2}x (ideal {:.2}x)",
            r.shape,
            r.dim,
            r.bits,
            r.m,
            r.quant_ms,
            gbps(r.weight_bytes, r.quant_ms),
            r.f16_ms,
            r.f16_ms / r.quant_ms,
            ideal(r.bits, g)
        )
    }

    fn markdown(rows: &[Row], args: &BenchKernelsArgs, adapter: &str, on_cpu: bool) -> String {
        let mut s = String::new();
        let label = if on_cpu {
            "**CPU (lavapipe) figures, not GPU**: wgpu on Mesa's software Vulkan driver"
        } else {
            "GPU figures"
        };
        let _ = writeln!(s, "## {:?} backend ({adapter})\n", args.backend);
        let _ = writeln!(
            s,
            "{label}. g = {}, activations f16, median of {} runs after {} warm-up. \
             GB/s = packed weight bytes (codes + 4 B/group) / time; ideal = 16 / (b + 32/g).\n",
            args.group_size, args.iters, args.warmup
        );
        let _ = writeln!(
            s,
            "| shape (OC×IC) | dim | bits | M | quant ms | GB/s | f16 ms | speedup | ideal |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for r in rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.3} | {:.2} | {:.3} | {:.2}× | {:.2}× |",
                r.shape,
                r.dim,
                r.bits,
                r.m,
                r.quant_ms,
                gbps(r.weight_bytes, r.quant_ms),
                r.f16_ms,
                r.f16_ms / r.quant_ms,
                ideal(r.bits, args.group_size)
            );
        }
        s
    }

    fn csv(rows: &[Row], g: usize) -> String {
        let mut s =
            String::from("shape,dim,bits,group_size,m,quant_ms,gbps,f16_ms,speedup,ideal\n");
        for r in rows {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{:.4},{:.2},{:.4},{:.3},{:.3}",
                r.shape,
                r.dim,
                r.bits,
                g,
                r.m,
                r.quant_ms,
                gbps(r.weight_bytes, r.quant_ms),
                r.f16_ms,
                r.f16_ms / r.quant_ms,
                ideal(r.bits, g)
            );
        }
        s
    }
}
