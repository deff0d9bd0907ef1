//! The heavy project tasks, which link the whole stack: `cargo xtask` (the light dispatcher in
//! `xtask/`) runs them through `cargo run -p xtask-jobs`, so that `cargo xtask test` does not
//! build the stack once for itself and again for the tests.

mod bench_cpu;
mod bench_decode;
mod bench_kernels;
mod bench_serve;
mod jobs;
mod synth;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use quant_core::QuantDim;

/// Tensor ops allocate a fresh buffer per result; mimalloc reuses freed pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory mapped instead of returning it to the OS after mimalloc's default 10 ms:
/// the forward passes free and reallocate tensors of tens of MiB all the time, and re-faulting
/// (and zeroing) those pages was a quarter of a quantization run. Peak RSS is unchanged.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc 2.x's `mi_option_e` (the crate does not name it).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is thread-safe and takes effect for later frees.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(name = "xtask", about = "adadim-rs project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a quantization job described by a TOML config (see configs/), then evaluate it.
    Quantize {
        #[arg(long)]
        config: PathBuf,
    },
    /// The docs/method.md §4 ablation grid on the shipped model; writes docs/results.md.
    Ablation(jobs::AblationArgs),
    /// Benchmark the dequantizing kernels against the f16 (GPU) / f32 (CPU) dense baseline.
    BenchKernels(BenchKernelsArgs),
    /// Write a checkpoint of random weights with a real model's shape, FOR TIME AND MEMORY
    /// TESTS ONLY (its outputs are meaningless): config.json, the shipped tokenizer.json and
    /// safetensors shards of at most 2 GB.
    SynthModel(synth::SynthModelArgs),
    /// `adadim serve` under load: one sequence against concurrent ones (continuous batching),
    /// tokens/s and latency percentiles.
    BenchServe(bench_serve::BenchServeArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    Cpu,
    Wgpu,
    Cuda,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchKernelsArgs {
    #[arg(long, value_enum, default_value = "wgpu")]
    pub backend: BenchBackend,
    #[arg(long, value_delimiter = ',', default_value = "3,4")]
    pub bits: Vec<u32>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub m: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "ic,oc")]
    pub dims: Vec<QuantDim>,
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// Model families whose linear shapes are benchmarked: 7b, 13b, 70b.
    #[arg(long, value_delimiter = ',', default_value = "7b,13b,70b")]
    pub models: Vec<String>,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// CPU only: rounds of the decode benchmark (FP32, w4g64 and w3g64 packed); 0 skips it.
    #[arg(long, default_value_t = 7)]
    pub decode_rounds: usize,
    /// CPU only: new tokens per decode run.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Markdown report; this backend's section is replaced, others are kept.
    #[arg(long, default_value = "docs/bench-kernels.md")]
    pub out: PathBuf,
}

impl BenchKernelsArgs {
    /// `(name, out_features, in_features)` of the benchmarked linears.
    pub fn shapes(&self) -> Vec<(String, usize, usize)> {
        let mut shapes = Vec::new();
        for model in &self.models {
            let (h, f) = match model.as_str() {
                "7b" => (4096, 11008),
                "13b" => (5120, 13824),
                "70b" => (8192, 28672),
                _ => continue,
            };
            shapes.push((format!("{model} {h}x{h}"), h, h));
            shapes.push((format!("{model} {f}x{h}"), f, h));
            shapes.push((format!("{model} {h}x{f}"), h, f));
        }
        shapes
    }
}

/// Replaces (or appends) the section between `<!-- bench:{key} -->` markers in `path`.
pub fn write_report_section(path: &Path, key: &str, markdown: &str) -> Result<()> {
    let (open, close) = (
        format!("<!-- bench:{key} -->"),
        format!("<!-- /bench:{key} -->"),
    );
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Kernel benchmarks\n\n".into());
    let section = format!("{open}\n{}\n{close}", markdown.trim_end());
    let new = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if b > a => format!("{}{section}{}", &old[..a], &old[b + close.len()..]),
        _ => format!("{}\n{section}\n", old.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, new).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn main() -> Result<()> {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Quantize { config } => jobs::quantize(&config),
        Cmd::Ablation(args) => jobs::ablation(&args),
        Cmd::BenchKernels(args) => match args.backend {
            BenchBackend::Cpu => bench_cpu::run(&args),
            BenchBackend::Wgpu | BenchBackend::Cuda => bench_kernels::run(&args),
        },
        Cmd::SynthModel(args) => synth::run(&args),
        Cmd::BenchServe(args) => bench_serve::run(&args),
    }
}
