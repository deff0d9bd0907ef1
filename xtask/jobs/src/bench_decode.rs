//! Decode tokens/s of the shipped model: FP32 against the packed RTN-ada w4g64 and w3g64
//! checkpoints, same prompt, greedy, a fixed number of new tokens.
//!
//! The models are loaded once and run in turn, round after round, so that a change in the
//! machine's load hits all of them alike; the table reports medians and ranges. Missing
//! checkpoints are made first from their configs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use burn::backend::NdArray;
use model_llama::generate::{GenerateOptions, generate};
use model_llama::model::Llama;

use crate::jobs::{load_job, repo_root, resolve};

type B = NdArray<f32>;

const PROMPT: &str = "The history of the Roman Empire";
const PACKED: [(&str, &str); 2] = [
    (
        "w4g64 RTN-ada, packed",
        "configs/smollm2-w4g64-rtn-ada.toml",
    ),
    (
        "w3g64 RTN-ada, packed",
        "configs/smollm2-w3g64-rtn-ada.toml",
    ),
];

struct Contender {
    label: String,
    llama: Llama<B>,
    prompt: Vec<u32>,
    rates: Vec<f64>,
}

/// Runs `rounds` rounds of every model and returns the markdown section.
pub fn run(rounds: usize, max_new_tokens: usize) -> Result<String> {
    let device = Default::default();
    let mut paths = vec![("FP32".to_string(), resolve(Path::new("smollm2"))?)];
    for (label, config) in PACKED {
        let spec = load_job(&repo_root().join(config))?.quantize;
        if !spec.out.join("config.json").is_file() {
            eprintln!(
                "{} is missing: quantizing it ({config})",
                spec.out.display()
            );
            adadim::run::<B>(&spec, &device)?;
        }
        paths.push((label.to_string(), spec.out));
    }
    let mut contenders = paths
        .into_iter()
        .map(|(label, path)| {
            let m = model_llama::open_model(&path)?;
            Ok(Contender {
                prompt: m.tokenizer.encode(PROMPT)?,
                llama: m
                    .load::<B>(&device)
                    .with_context(|| format!("loading {}", path.display()))?,
                label,
                rates: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;

    // No stop token: every run decodes the same number of tokens.
    let opts = GenerateOptions {
        max_new_tokens,
        ..Default::default()
    };
    for c in &contenders {
        generate(&c.llama, &c.prompt, &opts); // warm-up: first-touch page faults, pool start
    }
    for round in 1..=rounds {
        for c in &mut contenders {
            let rate = generate(&c.llama, &c.prompt, &opts).decode_tokens_per_second();
            eprintln!("round {round}/{rounds} {}: {rate:.1} tokens/s", c.label);
            c.rates.push(rate);
        }
    }

    let fp32_rates = contenders[0].rates.clone();
    let fp32 = median(&fp32_rates);
    let mut md = String::new();
    writeln!(
        md,
        "### Decode, SmolLM2-135M-Instruct\n\n\
         Prompt {PROMPT:?}, greedy, {max_new_tokens} new tokens, KV cache; the models take turns \
         for {rounds} rounds after one warm-up each. FP32 is the GGUF dequantized to dense f32. \
         The packed checkpoints hold the tied head in 8 bits (docs/method.md §6.1).\n\n\
         | model | median tokens/s | range | × FP32 (medians) | × FP32 within a round, range |\n|---|---|---|---|---|"
    )?;
    for c in &contenders {
        let (lo, hi) = range(c.rates.iter().copied());
        let (ratio_lo, ratio_hi) = range(c.rates.iter().zip(&fp32_rates).map(|(r, f)| r / f));
        writeln!(
            md,
            "| {} | {:.1} | {lo:.1}–{hi:.1} | {:.2}× | {ratio_lo:.2}–{ratio_hi:.2}× |",
            c.label,
            median(&c.rates),
            median(&c.rates) / fp32
        )?;
    }
    Ok(md)
}

pub fn range(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    })
}

/// The median of `xs`: of an even count, the mean of the middle two (the upper one alone
/// would report the better of two rounds as their median).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
