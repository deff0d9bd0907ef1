//! `adadim`: convert, quantize, evaluate and run LLaMA-family models.

use std::path::{Path, PathBuf};

use adadim::{DimPolicy, Method, RunReport, RunSpec};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use model_llama::generate::{GenerateOptions, generate};
use model_llama::{OpenModel, open_model};

/// Tensor ops allocate a fresh buffer per result; mimalloc reuses freed pages where glibc maps
/// and zeroes every large buffer anew (page faults were ~15% of an evaluation).
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

#[cfg(feature = "cuda")]
type Backend = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Backend = burn::backend::Wgpu;
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
type Backend = burn::backend::NdArray<f32>;

#[derive(Parser)]
#[command(
    name = "adadim",
    version,
    about = "AdaDim 3/4-bit quantization of LLaMA-family models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a GGUF checkpoint into a Hugging Face directory (f32 safetensors, tokenizer.json).
    Convert {
        gguf: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Perplexity on a text (SPEC §5): non-overlapping windows of `seqlen` tokens.
    Eval {
        /// GGUF file, Hugging Face directory or packed AdaDim directory.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "assets/wiki-eval.txt")]
        text: PathBuf,
        #[arg(long, default_value_t = 2048)]
        seqlen: usize,
        /// Evaluate only the first N windows.
        #[arg(long)]
        windows: Option<usize>,
    },
    /// Generate text from a prompt (greedy unless --temperature > 0).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Recompute the whole sequence every step instead of using the KV cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Quantize a model with AdaDim and write a packed checkpoint.
    Quantize(QuantizeArgs),
}

#[derive(clap::Args)]
struct QuantizeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Calibration text, one sample per line.
    #[arg(long, default_value = "assets/lee-news.txt")]
    calib: PathBuf,
    #[arg(long, default_value_t = 64)]
    calib_samples: usize,
    #[arg(long, default_value_t = 512)]
    calib_seqlen: usize,
    /// Shuffle the calibration lines with this seed (default: file order).
    #[arg(long)]
    calib_seed: Option<u64>,
    #[arg(long, default_value_t = 3)]
    bits: u32,
    /// Group length; -1 is one group over the whole dimension.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    group_size: i64,
    /// rtn or gptq.
    #[arg(long, default_value = "rtn")]
    method: Method,
    /// oc, ic, ada, or ic:<linears> (e.g. ic:qkv, ic:down, ic:qkv,down, ic:all).
    #[arg(long, default_value = "ada")]
    dim: DimPolicy,
    /// Packed checkpoint directory.
    #[arg(long)]
    out: PathBuf,
    /// Also write a fake-quant (dense f16) export here.
    #[arg(long)]
    fake_quant: Option<PathBuf>,
}

impl From<QuantizeArgs> for RunSpec {
    fn from(a: QuantizeArgs) -> Self {
        RunSpec {
            model: a.model,
            calib: a.calib,
            calib_samples: a.calib_samples,
            calib_seqlen: a.calib_seqlen,
            calib_seed: a.calib_seed,
            bits: a.bits,
            group_size: a.group_size,
            method: a.method,
            dim: a.dim,
            out: a.out,
            fake_quant: a.fake_quant,
        }
    }
}

fn main() {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn open(path: &Path) -> Result<OpenModel> {
    open_model(path).with_context(|| format!("cannot open model {}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    let device = Default::default();
    match cli.cmd {
        Cmd::Convert { gguf, out } => {
            let dir = model_llama::export::write_hf_dir(&open(&gguf)?, &out)?;
            println!("wrote {}", dir.display());
        }
        Cmd::Eval {
            model,
            text,
            seqlen,
            windows,
        } => {
            let m = open(&model)?;
            let text_str = std::fs::read_to_string(&text)
                .with_context(|| format!("cannot read {}", text.display()))?;
            let tokens = m.tokenizer.encode(&text_str)?;
            // Layer by layer: memory is one decoder layer and the windows' hidden states, not
            // the model.
            let r = m.perplexity::<Backend>(&tokens, seqlen, windows, &device)?;
            println!(
                "perplexity {:.4}  ({} windows × {} tokens of {}, {} tokens in the text)  {:.1} s, {:.0} tokens/s",
                r.perplexity,
                r.windows,
                r.seqlen,
                text.display(),
                tokens.len(),
                r.seconds,
                r.tokens_per_second()
            );
        }
        Cmd::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            no_cache,
        } => {
            let m = open(&model)?;
            let ids = m.tokenizer.encode(&prompt)?;
            if ids.is_empty() {
                bail!("the prompt is empty");
            }
            let llama = m.load::<Backend>(&device)?;
            let opts = GenerateOptions {
                max_new_tokens: max_tokens,
                temperature,
                top_p,
                seed,
                use_cache: !no_cache,
                stop_token: m.tokenizer.eos_id(),
            };
            let g = generate(&llama, &ids, &opts);
            println!("{prompt}{}", m.tokenizer.decode(&g.tokens)?);
            eprintln!(
                "prefill {} tokens: {:.1} tokens/s; decode {} tokens: {:.1} tokens/s",
                g.prompt_tokens,
                g.prefill_tokens_per_second(),
                g.tokens.len(),
                g.decode_tokens_per_second()
            );
        }
        Cmd::Quantize(args) => {
            let spec = RunSpec::from(args);
            let report = adadim::run::<Backend>(&spec, &device)?;
            println!("wrote {}", spec.out.display());
            print_summary(&report);
        }
    }
    Ok(())
}

fn print_summary(report: &RunReport) {
    let ic: Vec<String> = report
        .ic_count
        .iter()
        .map(|(k, n)| format!("{}:{n}", k.short_name()))
        .collect();
    println!(
        "quantized in {:.1} s; per-IC choices by linear over {} layers: {}",
        report.seconds,
        report.layers,
        ic.join(" ")
    );
}
