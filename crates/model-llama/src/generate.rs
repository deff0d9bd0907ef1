//! Text generation: prefill, then one token at a time through the KV cache.

use std::time::Instant;

use burn::prelude::*;
use kernels::QuantBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::LlamaConfig;
use crate::error::InvalidOption;
use crate::model::Llama;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// `0` is greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub seed: u64,
    /// Without the cache every step reruns the whole sequence (a reference for tests).
    pub use_cache: bool,
    pub stop_token: Option<u32>,
}

impl GenerateOptions {
    /// Checks the options against a prompt of `prompt_tokens` tokens and the model's `config`,
    /// before the model is loaded: sampling parameters in range, and the prompt plus every new
    /// token within the context.
    pub fn validate(
        &self,
        prompt_tokens: usize,
        config: &LlamaConfig,
    ) -> Result<(), InvalidOption> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(InvalidOption::new(
                "temperature",
                format!("{} is not a finite number ≥ 0", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidOption::new(
                "top_p",
                format!("{} is outside (0, 1]", self.top_p),
            ));
        }
        if prompt_tokens == 0 {
            return Err(InvalidOption::new("prompt", "it is empty"));
        }
        let context = config.context_length();
        if prompt_tokens > context {
            return Err(InvalidOption::new(
                "prompt",
                format!(
                    "its {prompt_tokens} tokens exceed the model's context of {context} positions"
                ),
            ));
        }
        if prompt_tokens.saturating_add(self.max_new_tokens) > context {
            return Err(InvalidOption::new(
                "max_new_tokens",
                format!(
                    "the prompt's {prompt_tokens} tokens plus {} new tokens exceed the model's \
                     context of {context} positions",
                    self.max_new_tokens
                ),
            ));
        }
        Ok(())
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 42,
            use_cache: true,
            stop_token: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prompt_tokens: usize,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds
    }

    /// Decode rate over the tokens after the first (which the prefill produced).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_seconds
    }
}

fn last_logits<B: QuantBackend>(model: &Llama<B>, hidden: Tensor<B, 3>) -> Vec<f32> {
    let [_, t, h] = hidden.dims();
    let last = hidden.narrow(1, t - 1, 1).reshape([1, h]);
    model
        .head(last)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 logits")
}

/// Picks the next token from `logits`.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (((l - max) / temperature) as f64).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p as f64 {
            cut = i + 1;
            break;
        }
    }
    let probs = &probs[..cut];
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * mass;
    for &(id, p) in probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs[probs.len() - 1].0
}

fn to_tensor<B: QuantBackend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Continues `prompt` by up to `max_new_tokens` tokens.
pub fn generate<B: QuantBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Generation {
    // A decode step makes ~200 small parallel products on the CPU backends. Started from a
    // thread outside rayon's pool, each one waits on a cross-thread wake-up (~10 µs); from
    // inside the pool it is a cheap `join`.
    rayon::scope(|_| generate_in_pool(model, prompt, opts))
}

fn generate_in_pool<B: QuantBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Generation {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let device = model.device();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut cache = model.new_cache();
    let mut all = prompt.to_vec();
    let mut out = Vec::with_capacity(opts.max_new_tokens);

    let t0 = Instant::now();
    let hidden = model.hidden_states(
        to_tensor(prompt, &device),
        opts.use_cache.then_some(cache.as_mut_slice()),
    );
    let mut logits = last_logits(model, hidden);
    let prefill_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    while out.len() < opts.max_new_tokens {
        let next = sample(&logits, opts.temperature, opts.top_p, &mut rng);
        out.push(next);
        all.push(next);
        if Some(next) == opts.stop_token || out.len() == opts.max_new_tokens {
            break;
        }
        let input = if opts.use_cache {
            &all[all.len() - 1..]
        } else {
            &all[..]
        };
        let hidden = model.hidden_states(
            to_tensor(input, &device),
            opts.use_cache.then_some(cache.as_mut_slice()),
        );
        logits = last_logits(model, hidden);
    }
    Generation {
        tokens: out,
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
        prompt_tokens: prompt.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(context: usize) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 10,
            "max_position_embeddings": context,
        }))
        .unwrap()
    }

    fn check(f: impl FnOnce(&mut GenerateOptions), prompt: usize) -> Result<(), InvalidOption> {
        let mut o = GenerateOptions::default();
        f(&mut o);
        o.validate(prompt, &config(100))
    }

    #[test]
    fn options_are_checked_against_ranges_and_context() {
        assert_eq!(check(|_| {}, 36), Ok(()));
        assert_eq!(check(|o| o.max_new_tokens = 90, 10), Ok(()));
        assert_eq!(check(|o| (o.top_p, o.temperature) = (1.0, 0.0), 1), Ok(()));
        let option = |f: fn(&mut GenerateOptions), prompt| check(f, prompt).unwrap_err().option;
        assert_eq!(option(|o| o.top_p = 2.0, 1), "top_p");
        assert_eq!(option(|o| o.top_p = 0.0, 1), "top_p");
        assert_eq!(option(|o| o.top_p = f32::NAN, 1), "top_p");
        assert_eq!(option(|o| o.temperature = -0.5, 1), "temperature");
        assert_eq!(option(|o| o.temperature = f32::INFINITY, 1), "temperature");
        assert_eq!(option(|o| o.temperature = f32::NAN, 1), "temperature");
        assert_eq!(option(|o| o.max_new_tokens = 91, 10), "max_new_tokens");
        assert_eq!(
            option(|o| o.max_new_tokens = usize::MAX, 10),
            "max_new_tokens"
        );
        assert_eq!(option(|_| {}, 0), "prompt");
        assert_eq!(option(|o| o.max_new_tokens = 0, 101), "prompt");
        let e = check(|o| o.max_new_tokens = 91, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10 tokens plus 91") && e.contains("100 positions"),
            "{e}"
        );
    }

    #[test]
    fn context_is_capped_at_the_rotary_table() {
        let c = config(1 << 20);
        assert_eq!(c.context_length(), crate::model::MAX_ROPE_POSITIONS);
    }
}
