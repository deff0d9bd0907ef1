//! `adadim`: convert, quantize, evaluate and run LLaMA-family models.

use std::path::{Path, PathBuf};

use adadim::{
    CalibOptions, DimPolicy, Method, Propagate, RangeMode, Recipe, RunReport, RunSpec, Score,
    defaults,
};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use model_llama::generate::{GenerateOptions, generate};
use model_llama::{InvalidOption, KvDtype, OpenModel, open_checkpoint, open_model};
use quant_core::{GptqOptions, GroupSize};

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
        /// Replace this tool's files in a non-empty --out (other files are kept).
        #[arg(long)]
        overwrite: bool,
    },
    /// Perplexity on a text (docs/method.md §5): non-overlapping windows of `seqlen` tokens.
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
        /// How the KV cache stores keys and values: f16 (half the memory, the default), f32
        /// (exact) or q8_0 (8-bit blocks, just over half of f16's memory). The GPU backends
        /// keep f32.
        #[arg(long, default_value_t = KvDtype::F16)]
        kv_cache: KvDtype,
    },
    /// Quantize a model with AdaDim and write a packed checkpoint.
    Quantize(QuantizeArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (docs/serve.md) until Ctrl-C/SIGTERM.
    Serve {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 0 picks a free port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Sequences decoded together (continuous batching).
        #[arg(long, default_value_t = serve::DEFAULT_MAX_BATCH)]
        max_batch: usize,
        /// Requests that may wait beside those running; more get a 503.
        #[arg(long, default_value_t = serve::DEFAULT_QUEUE)]
        queue: usize,
        /// Prompt tokens run per step while other requests decode (chunked prefill): smaller
        /// keeps their tokens flowing during a long prompt, larger gives that prompt its first
        /// token sooner.
        #[arg(long, default_value_t = serve::DEFAULT_PREFILL_CHUNK)]
        prefill_chunk: std::num::NonZeroUsize,
        /// How the KV cache stores keys and values: f16 (half the memory, the default), f32
        /// (exact) or q8_0 (8-bit blocks, just over half of f16's memory). The GPU backends
        /// keep f32.
        #[arg(long, default_value_t = KvDtype::F16)]
        kv_cache: KvDtype,
        /// KV cache memory the running requests may reserve together, each for its prompt and
        /// max_tokens (e.g. `12GiB`); a request waits until its share fits. Default: 3/4 of the
        /// memory available once the model is loaded.
        #[arg(long)]
        kv_memory: Option<bytesize::ByteSize>,
    },
}

#[derive(clap::Args)]
struct QuantizeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Calibration text, one sample per line.
    #[arg(long, default_value = defaults::CALIB_TEXT)]
    calib: PathBuf,
    #[arg(long, default_value_t = defaults::CALIB_SAMPLES)]
    calib_samples: usize,
    #[arg(long, default_value_t = defaults::CALIB_SEQLEN)]
    calib_seqlen: usize,
    /// Shuffle the calibration lines with this seed (default: file order).
    #[arg(long)]
    calib_seed: Option<u64>,
    #[arg(long, default_value_t = defaults::BITS)]
    bits: u32,
    /// Group length; -1 is one group over the whole dimension.
    #[arg(long, default_value_t = defaults::GROUP_SIZE, allow_negative_numbers = true)]
    group_size: GroupSize,
    /// The choices that --method, --dim, --range, --score, --propagate and --refit default to:
    /// best (gptq, ada, search, gptq, quantized, true) or paper (rtn, ada, minmax, rtn, fp,
    /// false).
    #[arg(long, default_value_t = defaults::RECIPE)]
    recipe: Recipe,
    /// rtn, gptq, awq (AWQ's channel scales, then RTN) or awq-gptq (AWQ's scales, then GPTQ)
    /// [default: from --recipe].
    #[arg(long)]
    method: Option<Method>,
    /// oc, ic, ada, or ic:LINEARS (e.g. ic:qkv, ic:down, ic:qkv,down, ic:all) [default: from
    /// --recipe].
    #[arg(long)]
    dim: Option<DimPolicy>,
    /// How each group's [min, max] is chosen: minmax, or search (the shrink with the least
    /// error, weighted by the calibration inputs' second moments per-OC) [default: from
    /// --recipe].
    #[arg(long)]
    range: Option<RangeMode>,
    /// What chooses each linear's dim with --dim ada: rtn (RTN candidates, as the paper) or
    /// gptq (both dims solved by GPTQ; needs --method gptq or awq-gptq) [default: from
    /// --recipe].
    #[arg(long)]
    score: Option<Score>,
    /// What each layer is calibrated on: fp (the full-precision model's activations, as the
    /// paper) or quantized (the already quantized layers' outputs) [default: from --recipe].
    #[arg(long)]
    propagate: Option<Propagate>,
    /// Refit GPTQ's per-OC group scales and zeros to its codes by least squares on the layer's
    /// Hessian (docs/method.md §3.1): true or false [default: from --recipe].
    #[arg(long, value_name = "BOOL")]
    refit: Option<bool>,
    /// Symmetric groups: a scale only, the zero point at the centre code (docs/method.md §2.2).
    #[arg(long)]
    sym: bool,
    /// GPTQ: damping added to the Hessian's diagonal, as a fraction of its mean.
    #[arg(long, value_name = "FRACTION", default_value_t = GptqOptions::default().percdamp,
          allow_negative_numbers = true)]
    gptq_damp: f32,
    /// GPTQ: columns per block of the lazy batch update.
    #[arg(long, value_name = "N", default_value_t = GptqOptions::default().block_size)]
    gptq_block_size: usize,
    /// GPTQ: visit input channels by decreasing Hessian diagonal.
    #[arg(long, value_name = "BOOL", default_value_t = GptqOptions::default().act_order,
          action = clap::ArgAction::Set)]
    gptq_act_order: bool,
    /// GPTQ: per-OC group parameters from the original weights (false only with --dim ic).
    #[arg(long, value_name = "BOOL", default_value_t = GptqOptions::default().static_groups,
          action = clap::ArgAction::Set)]
    gptq_static_groups: bool,
    /// Packed checkpoint directory.
    #[arg(long)]
    out: PathBuf,
    /// Also write a fake-quant (dense f16) export here.
    #[arg(long)]
    fake_quant: Option<PathBuf>,
    /// Replace this tool's files in a non-empty --out / --fake-quant (other files are kept).
    #[arg(long)]
    overwrite: bool,
    /// Continue an interrupted run (kept in OUT.adadim-partial) from its last finished layer;
    /// the model, calibration text and options must be the same.
    #[arg(long)]
    resume: bool,
    /// Memory the run may use, in GiB (default: 90% of the machine's memory). The run predicts
    /// its peak before starting and says what to change if it does not fit.
    #[arg(long, value_name = "GIB")]
    max_memory: Option<f64>,
}

impl QuantizeArgs {
    fn gptq(&self) -> GptqOptions {
        GptqOptions {
            block_size: self.gptq_block_size,
            percdamp: self.gptq_damp,
            act_order: self.gptq_act_order,
            static_groups: self.gptq_static_groups,
            // Set from the run's one --range.
            ..Default::default()
        }
    }
}

impl From<QuantizeArgs> for RunSpec {
    fn from(a: QuantizeArgs) -> Self {
        let gptq = a.gptq();
        RunSpec {
            model: a.model,
            calib: a.calib,
            calib_samples: a.calib_samples,
            calib_seqlen: a.calib_seqlen,
            calib_seed: a.calib_seed,
            bits: a.bits,
            group_size: a.group_size,
            recipe: a.recipe,
            method: a.method,
            gptq,
            dim: a.dim,
            range: a.range,
            score: a.score,
            propagate: a.propagate,
            refit: a.refit,
            sym: a.sym,
            out: a.out,
            fake_quant: a.fake_quant,
            overwrite: a.overwrite,
            resume: a.resume,
            max_memory_gib: a.max_memory,
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

/// Model errors name the file themselves.
fn open(path: &Path) -> Result<OpenModel> {
    open_model(path).context("cannot open the model")
}

/// A library option error, shown under the command-line flag that set the option.
fn flag_error(e: InvalidOption, flags: &[(&str, &str)]) -> anyhow::Error {
    anyhow!(e.under_flag(flags))
}

/// An output directory is created (with its missing parents) only at the end of a run: the
/// closest existing ancestor must be a directory, or the run's work would be lost.
fn check_output_dir(flag: &str, out: &Path) -> Result<()> {
    for ancestor in out.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        match std::fs::metadata(ancestor) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => bail!(
                "invalid {flag} {}: {} is not a directory",
                out.display(),
                ancestor.display()
            ),
            // A missing ancestor is created; other errors surface when the output is written.
            Err(_) => continue,
        }
    }
    Ok(())
}

/// What perplexity needs of `--seqlen` and `--windows`, whatever the model.
fn check_eval_options(seqlen: usize, windows: Option<usize>) -> Result<()> {
    if windows == Some(0) {
        bail!("invalid --windows: 0 windows evaluate nothing; need at least 1");
    }
    if seqlen < 2 {
        bail!("invalid --seqlen: a window of {seqlen} tokens predicts nothing; need at least 2");
    }
    Ok(())
}

/// A sequence length set by `flag` must fit in the model's context.
fn check_context(flag: &str, len: usize, config: &model_llama::LlamaConfig) -> Result<()> {
    let context = config.context_length();
    if len > context {
        bail!("invalid {flag}: {len} exceeds the model's context of {context} positions");
    }
    Ok(())
}

/// Everything about a quantization run that can be checked before it starts.
fn check_quantize_args(args: &RunSpec) -> Result<()> {
    CalibOptions {
        n_samples: args.calib_samples,
        seqlen: args.calib_seqlen,
        shuffle_seed: args.calib_seed,
    }
    .validate()
    .map_err(|e| {
        flag_error(
            e,
            &[
                ("n_samples", "--calib-samples"),
                ("seqlen", "--calib-seqlen"),
            ],
        )
    })?;
    args.options().check_options().map_err(|e| {
        flag_error(
            e,
            &[
                ("gptq.block_size", "--gptq-block-size"),
                ("gptq.percdamp", "--gptq-damp"),
                ("gptq.static_groups", "--gptq-static-groups"),
                ("score", "--score"),
                ("refit", "--refit"),
            ],
        )
    })?;
    check_output_dir("--out", &args.out)?;
    if let Some(fake) = &args.fake_quant {
        check_output_dir("--fake-quant", fake)?;
        if fake == &args.out {
            bail!("invalid --fake-quant: it is the --out directory");
        }
    }
    // The header alone (no weights) gives the context.
    let src = open_checkpoint(&args.model).context("cannot open the model")?;
    check_context("--calib-seqlen", args.calib_seqlen, src.config())
}

fn run(cli: Cli) -> Result<()> {
    let device = Default::default();
    match cli.cmd {
        Cmd::Convert {
            gguf,
            out,
            overwrite,
        } => {
            check_output_dir("--out", &out)?;
            let dir = model_llama::export::write_hf_dir(&open(&gguf)?, &out, overwrite)?;
            println!("wrote {}", dir.display());
        }
        Cmd::Eval {
            model,
            text,
            seqlen,
            windows,
        } => {
            check_eval_options(seqlen, windows)?;
            let m = open(&model)?;
            check_context("--seqlen", seqlen, m.source.config())?;
            let text_str = std::fs::read_to_string(&text)
                .with_context(|| format!("cannot read {}", text.display()))?;
            let tokens = m.tokenizer.encode(&text_str)?;
            if tokens.len() < seqlen {
                bail!(
                    "{}: the text has {} tokens, fewer than one window of --seqlen {seqlen}",
                    text.display(),
                    tokens.len()
                );
            }
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
            kv_cache,
        } => {
            let m = open(&model)?;
            let ids = m.tokenizer.encode(&prompt)?;
            let opts = GenerateOptions {
                max_new_tokens: max_tokens,
                temperature,
                top_p,
                seed,
                use_cache: !no_cache,
                kv_cache,
                stop_token: m.tokenizer.eos_id(),
            };
            opts.validate(ids.len(), m.source.config()).map_err(|e| {
                flag_error(
                    e,
                    &[
                        ("temperature", "--temperature"),
                        ("top_p", "--top-p"),
                        ("max_new_tokens", "--max-tokens"),
                        ("prompt", "--prompt"),
                        ("kv_cache", "--kv-cache"),
                    ],
                )
            })?;
            let llama = m.load::<Backend>(&device)?;
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
            check_quantize_args(&spec)?;
            let report = adadim::run::<Backend>(&spec, &device)?;
            println!("wrote {}", spec.out.display());
            print_summary(&report);
        }
        Cmd::Serve {
            model,
            host,
            port,
            max_batch,
            queue,
            prefill_chunk,
            kv_cache,
            kv_memory,
        } => {
            if kv_memory.is_some_and(|m| m.as_u64() == 0) {
                bail!("invalid --kv-memory 0: it holds no sequence; give a size such as 8GiB");
            }
            let m = open(&model)?;
            // Clients name the model by the checkpoint's file or directory name.
            let name = model.file_stem().unwrap_or(model.as_os_str());
            let opts = serve::ServeOptions {
                host,
                port,
                max_batch,
                prefill_chunk,
                queue_capacity: queue,
                kv_cache,
                kv_memory,
                ..serve::ServeOptions::new(name.to_string_lossy())
            };
            let server = serve::Server::start::<Backend>(&m, &device, &opts)?;
            println!("serving on http://{}", server.addr());
            server.run_until_signal()?;
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
        "quantized ({} {}, {}{} ranges, {}-scored, {} propagation{}) in {:.1} s; per-IC \
         choices by linear over {} layers: {}",
        report.method,
        report.policy,
        if report.sym { "symmetric " } else { "" },
        report.range,
        report.score,
        report.propagate,
        if report.refit { ", refitted" } else { "" },
        report.seconds,
        report.layers,
        ic.join(" ")
    );
}
