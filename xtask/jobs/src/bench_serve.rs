//! `adadim serve` under load: tokens/s of one sequence against `n` concurrent sequences
//! (continuous batching), with request latency percentiles.
//!
//! The server runs in this process on a free port and is driven over HTTP, as a client would:
//! greedy completions of a fixed length whose prompts ask for counting (so that no sequence
//! ends early at the stop token and the batch stays full). Single and batched runs alternate,
//! round after round, so that a change in the machine's load hits both alike.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::NdArray;
use model_llama::KvDtype;
use model_llama::generate::check_sampling;
use serde_json::{Value, json};

use crate::bench_decode::{median, range};
use crate::jobs::{load_job, repo_root, resolve};

type B = NdArray<f32>;

const MODEL_NAME: &str = "bench";
const DEFAULT_CONFIG: &str = "configs/smollm2-w3g64-rtn-ada.toml";

#[derive(clap::Args, Debug, Clone)]
pub struct BenchServeArgs {
    /// The checkpoint to serve (default: the w3g64 RTN-ada packed model of
    /// configs/smollm2-w3g64-rtn-ada.toml, made first if missing).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent sequences of the batched runs (also the server's batch size).
    #[arg(long, default_value_t = serve::DEFAULT_MAX_BATCH)]
    pub concurrency: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Sampling temperature of the completions (0: greedy); each request has its own seed.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: draw from the most likely tokens that hold this much probability
    /// (1: the whole vocabulary; no effect at temperature 0).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// How the server's KV caches store keys and values (f16, f32 or q8_0).
    #[arg(long, default_value_t = KvDtype::F16)]
    pub kv_cache: KvDtype,
    /// Write the markdown section to this file (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How every request of a run samples.
#[derive(Clone, Copy, Debug)]
struct Sampling {
    temperature: f32,
    top_p: f32,
}

/// One answered request.
#[derive(Clone, Copy, Debug)]
struct Answer {
    seconds: f64,
    tokens: usize,
}

/// A run of `answers` that took `wall` seconds from the first request to the last answer.
struct Run {
    wall: f64,
    answers: Vec<Answer>,
}

impl Run {
    fn tokens_per_second(&self) -> f64 {
        self.answers.iter().map(|a| a.tokens).sum::<usize>() as f64 / self.wall
    }
}

pub fn run(args: &BenchServeArgs) -> Result<()> {
    if args.concurrency == 0 || args.rounds == 0 || args.max_tokens == 0 {
        bail!("--concurrency, --rounds and --max-tokens must each be at least 1");
    }
    check_sampling(args.temperature, args.top_p).map_err(|e| {
        anyhow::anyhow!(e.under_flag(&[("temperature", "--temperature"), ("top_p", "--top-p")]))
    })?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
    };
    let path = match &args.model {
        Some(p) => resolve(p)?,
        None => {
            let spec = load_job(&repo_root().join(DEFAULT_CONFIG))?.quantize;
            if !spec.out.join("config.json").is_file() {
                eprintln!(
                    "{} is missing: quantizing it ({DEFAULT_CONFIG})",
                    spec.out.display()
                );
                adadim::run::<B>(&spec, &Default::default())?;
            }
            spec.out
        }
    };
    let model =
        model_llama::open_model(&path).with_context(|| format!("opening {}", path.display()))?;
    let opts = serve::ServeOptions {
        port: 0,
        max_batch: args.concurrency,
        queue_capacity: args.concurrency,
        kv_cache: args.kv_cache,
        ..serve::ServeOptions::new(MODEL_NAME)
    };
    let server = serve::Server::start::<B>(&model, &Default::default(), &opts)?;
    let url = format!("http://{}/v1/completions", server.addr());
    let load_before = load_average();

    // Warm-up: first-touch page faults, the thread pool.
    complete(&url, 0, 8, sampling)?;
    let (mut single, mut batched) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let one = timed(&url, 1, args.max_tokens, sampling)?;
        let many = timed(&url, args.concurrency, args.max_tokens, sampling)?;
        eprintln!(
            "round {round}/{}: 1 sequence {:.1} tokens/s, {} sequences {:.1} tokens/s",
            args.rounds,
            one.tokens_per_second(),
            args.concurrency,
            many.tokens_per_second()
        );
        single.push(one);
        batched.push(many);
    }
    let load_after = load_average();
    let peak = server.load().peak_running();
    server.shutdown()?;

    let md = report(
        args,
        &path,
        &single,
        &batched,
        (load_before, load_after),
        peak,
    )?;
    match &args.out {
        Some(out) => {
            std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
        }
        None => print!("{md}"),
    }
    Ok(())
}

/// `n` concurrent requests (prompts 0..n), timed from the first sent to the last answered.
fn timed(url: &str, n: usize, max_tokens: usize, sampling: Sampling) -> Result<Run> {
    let t0 = Instant::now();
    let answers = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| s.spawn(move || complete(url, i, max_tokens, sampling)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(Run {
        wall: t0.elapsed().as_secs_f64(),
        answers,
    })
}

/// A completion of prompt `i` (a count that starts at a different number per prompt), greedy at
/// temperature 0, else sampled with seed `i`.
fn complete(url: &str, i: usize, max_tokens: usize, sampling: Sampling) -> Result<Answer> {
    let start = 10 * (i + 1);
    let prompt = format!("Count upwards: {}, {}, {},", start, start + 1, start + 2);
    let body = json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": i});
    let t0 = Instant::now();
    let mut response = ureq::post(url)
        .send_json(&body)
        .with_context(|| format!("POST {url}"))?;
    let v: Value = response.body_mut().read_json()?;
    let seconds = t0.elapsed().as_secs_f64();
    let tokens = v["usage"]["completion_tokens"]
        .as_u64()
        .with_context(|| format!("no usage in the answer {v}"))? as usize;
    Ok(Answer { seconds, tokens })
}

fn report(
    args: &BenchServeArgs,
    path: &std::path::Path,
    single: &[Run],
    batched: &[Run],
    (load_before, load_after): (String, String),
    peak: usize,
) -> Result<String> {
    let rates = |runs: &[Run]| -> Vec<f64> { runs.iter().map(Run::tokens_per_second).collect() };
    let (one, many) = (rates(single), rates(batched));
    let ratios: Vec<f64> = many.iter().zip(&one).map(|(m, o)| m / o).collect();
    let n = args.concurrency;
    let mut md = String::new();
    writeln!(
        md,
        "### Serving: {} ({} rounds)\n\n\
         `cargo xtask bench-serve`: completions of {} tokens over HTTP at temperature {} (0: \
         greedy) and top_p {}, the server in the same process with `--max-batch {n}` and {} KV \
         caches; one request at a time against {n} at once, alternating (at most {peak} \
         sequences ran at once). Load average before and after: {load_before} / {load_after}.\n\n\
         | | median tokens/s (total) | range | × one sequence (same round), median | range |\n\
         |---|---|---|---|---|",
        path.display(),
        args.rounds,
        args.max_tokens,
        args.temperature,
        args.top_p,
        args.kv_cache
    )?;
    let (lo, hi) = range(one.iter().copied());
    writeln!(
        md,
        "| 1 sequence | {:.1} | {lo:.1}–{hi:.1} | 1.00× | |",
        median(&one)
    )?;
    let (lo, hi) = range(many.iter().copied());
    let (rlo, rhi) = range(ratios.iter().copied());
    writeln!(
        md,
        "| {n} sequences | {:.1} | {lo:.1}–{hi:.1} | {:.2}× | {rlo:.2}–{rhi:.2}× |",
        median(&many),
        median(&ratios)
    )?;
    writeln!(
        md,
        "\nRequest latency, all rounds (seconds for {} tokens; per token in brackets):\n\n\
         | | p50 | p90 | p99 |\n|---|---|---|---|",
        args.max_tokens
    )?;
    for (label, runs) in [
        ("1 sequence", single),
        (&*format!("{n} sequences"), batched),
    ] {
        let answers: Vec<Answer> = runs.iter().flat_map(|r| r.answers.clone()).collect();
        let cell = |q: f64| {
            let s = percentile(answers.iter().map(|a| a.seconds).collect(), q);
            let t = percentile(
                answers
                    .iter()
                    .map(|a| a.seconds / a.tokens.max(1) as f64)
                    .collect(),
                q,
            );
            format!("{s:.2} ({:.1} ms)", t * 1e3)
        };
        writeln!(
            md,
            "| {label} | {} | {} | {} |",
            cell(0.5),
            cell(0.9),
            cell(0.99)
        )?;
    }
    Ok(md)
}

/// The `q` quantile (nearest rank) of `xs`.
fn percentile(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused before anything loads, with the option named (a model that does not exist
    /// would be the error otherwise).
    #[test]
    fn bad_sampling_options_are_refused() {
        for (temperature, top_p, option) in [
            (-1.0, 1.0, "--temperature"),
            (f32::NAN, 1.0, "--temperature"),
            (0.7, 0.0, "--top-p"),
            (0.7, 1.5, "--top-p"),
            (0.0, f32::NAN, "--top-p"),
        ] {
            let args = BenchServeArgs {
                model: Some(PathBuf::from("/nonexistent/checkpoint")),
                concurrency: 8,
                max_tokens: 8,
                rounds: 1,
                temperature,
                top_p,
                kv_cache: KvDtype::F16,
                out: None,
            };
            let message = run(&args).unwrap_err().to_string();
            assert!(message.contains(option), "{message}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(xs.clone(), 0.5), 5.0);
        assert_eq!(percentile(xs.clone(), 0.9), 9.0);
        assert_eq!(percentile(xs.clone(), 0.99), 10.0);
        assert_eq!(percentile(vec![3.0], 0.5), 3.0);
    }
}
