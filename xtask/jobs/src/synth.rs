//! `cargo xtask synth-model`: a random-weight checkpoint with a real model's shape, for time and
//! memory tests only (see `model_llama::synth`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use model_llama::synth::{SynthDtype, SynthOptions, SynthShape, write_synth_model};

#[derive(clap::Args, Debug, Clone)]
pub struct SynthModelArgs {
    /// The real model whose shape is copied: 1b (Llama-3.2-1B), 7b (LLaMA-2-7B), 13b
    /// (LLaMA-2-13B). The vocabulary is the shipped SmolLM2 tokenizer's (49152), so the
    /// embedding and head differ from the real models'.
    #[arg(long)]
    pub shape: SynthShape,
    /// Number of decoder layers, instead of the real model's.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Weight dtype: f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: SynthDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &SynthModelArgs) -> Result<()> {
    let started = Instant::now();
    // The shipped model is only opened for its tokenizer.
    let tokenizer = model_llama::open_model(&test_assets::smollm2_gguf()?)?.tokenizer;
    let mut config = args.shape.config(tokenizer.vocab_size());
    if let Some(layers) = args.layers {
        config.num_hidden_layers = layers;
    }
    config.bos_token_id = tokenizer.bos_id();
    config.eos_token_id = tokenizer.eos_id();
    let opts = SynthOptions {
        dtype: args.dtype,
        seed: args.seed,
        ..Default::default()
    };
    let dest = write_synth_model(&args.out, &config, &tokenizer, &opts)
        .with_context(|| format!("synthesizing the {} model", args.shape))?;
    println!(
        "{} ({} shape, {} layers, {}, seed {}) in {:.1} s",
        dest.display(),
        args.shape,
        config.num_hidden_layers,
        args.dtype,
        args.seed,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
