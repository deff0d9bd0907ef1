//! Text generation: prefill, then one token at a time through the KV cache.

use std::time::Instant;

use burn::prelude::*;
use kernels::{KvDtype, QuantBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::config::LlamaConfig;
use crate::error::InvalidOption;
use crate::model::Llama;

pub use kernels::cpu::activation::argmax;

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
    /// How the cache stores keys and values.
    pub kv_cache: KvDtype,
    pub stop_token: Option<u32>,
}

/// Checks the sampling parameters alone, as [`GenerateOptions::validate`] does, for callers
/// that hold no model yet: `temperature` finite and ≥ 0, `top_p` in (0, 1].
pub fn check_sampling(temperature: f32, top_p: f32) -> Result<(), InvalidOption> {
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(InvalidOption::new(
            "temperature",
            format!("{temperature} is not a finite number ≥ 0"),
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(InvalidOption::new(
            "top_p",
            format!("{top_p} is outside (0, 1]"),
        ));
    }
    Ok(())
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
        check_sampling(self.temperature, self.top_p)?;
        if prompt_tokens == 0 {
            return Err(InvalidOption::new("prompt", "it is empty"));
        }
        if self.use_cache {
            self.kv_cache
                .check_heads(config.head_dim())
                .map_err(|reason| InvalidOption::new("kv_cache", reason))?;
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
            kv_cache: KvDtype::default(),
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

/// Logits of the hidden states `[1, t, hidden]` at positions `rows`, handed to `f` as one
/// slice of `rows.len()` rows.
fn with_logits_at<B: QuantBackend, R>(
    model: &Llama<B>,
    hidden: Tensor<B, 3>,
    rows: &[usize],
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    if rows.is_empty() {
        return f(&[]);
    }
    let [_, t, h] = hidden.dims();
    let hidden = hidden.reshape([t, h]);
    let picked = if rows.len() == t && rows.iter().copied().eq(0..t) {
        hidden
    } else {
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let ids =
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows.len()]), &hidden.device());
        hidden.select(0, ids)
    };
    // Read in place: the logits of a batched step are megabytes.
    B::with_host_values(&model.head(picked), f)
}

/// Picks the next token from `logits`: the most likely at temperature 0; otherwise a draw from
/// `softmax(logits / temperature)` restricted to the nucleus, the fewest most likely tokens
/// whose probability reaches `top_p` (most likely first, ties by id).
///
/// It runs once per token and sequence, over the whole vocabulary, so it avoids sorting it:
/// the nucleus is found among the tokens above a falling threshold, which holds it as soon as
/// their mass reaches `top_p` (the largest weights come first in the sorted order). With
/// `top_p = 1` every token is kept and the draw walks them in id order. The weights are
/// computed once, in f32 by the vectorised softmax, and each threshold's mass is one pass
/// in lanes: with an f64 `exp` per token and each threshold collecting its candidates, a draw
/// took 0.2–0.3 ms of SmolLM2's 49,152 logits, a tenth of a decode step.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let (weights, total) = weights(logits, temperature);
    let weighted = |keep: f32| {
        (weights.iter().enumerate())
            .filter(move |&(_, &w)| w >= keep)
            .map(|(i, &w)| (i as u32, w as f64))
    };
    if top_p >= 1.0 {
        return draw(weighted(0.0), total, rng);
    }
    let mut threshold = 1.0f32;
    loop {
        threshold /= 16.0;
        // Below the smallest positive f32 every token is a candidate.
        let everything = threshold == 0.0;
        if !everything && mass_from(&weights, threshold) < top_p as f64 * total {
            continue;
        }
        let mut candidates: Vec<(u32, f64)> = weighted(threshold).collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0;
        for (i, &(_, w)) in candidates.iter().enumerate() {
            kept += w / total;
            if kept >= top_p as f64 {
                let nucleus = &candidates[..=i];
                return draw(
                    nucleus.iter().copied(),
                    nucleus.iter().map(|c| c.1).sum(),
                    rng,
                );
            }
        }
        // Rounding kept the running sum just below `top_p`: keep what is there, or look further.
        if everything {
            let mass = candidates.iter().map(|c| c.1).sum();
            return draw(candidates, mass, rng);
        }
    }
}

/// `softmax(logits / temperature)` and its sum (1 up to rounding), which [`sample`] draws by.
fn weights(logits: &[f32], temperature: f32) -> (Vec<f32>, f64) {
    let mut w: Vec<f32> = logits.iter().map(|&l| l / temperature).collect();
    kernels::cpu::activation::softmax_in_place(&mut w);
    let total = mass_from(&w, 0.0);
    (w, total)
}

/// `Σ w` over the weights `w ≥ keep`, in f64 lanes so that the loop vectorises.
fn mass_from(weights: &[f32], keep: f32) -> f64 {
    const LANES: usize = 8;
    let (blocks, tail) = weights.as_chunks::<LANES>();
    let mut lanes = [0f64; LANES];
    let kept = |w: f32| if w >= keep { w as f64 } else { 0.0 };
    for block in blocks {
        for (s, &w) in lanes.iter_mut().zip(block) {
            *s += kept(w);
        }
    }
    lanes.iter().sum::<f64>() + tail.iter().map(|&w| kept(w)).sum::<f64>()
}

/// A token of `tokens` (ids and weights, at least one) with probability proportional to its
/// weight, `mass` being their sum; the last one if rounding leaves the draw past the end.
fn draw(tokens: impl IntoIterator<Item = (u32, f64)>, mass: f64, rng: &mut StdRng) -> u32 {
    let mut u = rng.random::<f64>() * mass;
    let mut last = 0;
    for (id, w) in tokens {
        if u < w {
            return id;
        }
        u -= w;
        last = id;
    }
    last
}

fn to_tensor<B: QuantBackend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// The log-probability of one token and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `top_n` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` read at `token`, with the `top_n` most likely tokens (ties: the
/// lower id first).
///
/// A scored prompt runs this for each of its tokens, so it makes one vectorised pass for the
/// normaliser and one for the top tokens, which keeps them in order as it goes (most values
/// fall below the smallest kept one at the first comparison): 14–59 µs over SmolLM2's 49,152
/// logits, where an f64 `exp` per logit and a selection over every id took 0.2–0.3 ms.
pub fn token_logprob(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let log_sum = kernels::cpu::activation::logsumexp(logits);
    let logprob = |l: f32| l - log_sum;
    let mut top: Vec<u32> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        for (i, &l) in logits.iter().enumerate() {
            // Kept ones at least as likely stay ahead of `l` (and an earlier id of a tie).
            let ahead = |t: &u32| logits[*t as usize].total_cmp(&l).is_ge();
            if top.len() == top_n && top.last().is_some_and(ahead) {
                continue;
            }
            top.insert(top.partition_point(ahead), i as u32);
            top.truncate(top_n);
        }
    }
    TokenLogprob {
        token,
        logprob: logprob(logits[token as usize]),
        top: top
            .into_iter()
            .map(|t| (t, logprob(logits[t as usize])))
            .collect(),
    }
}

/// The most rows of one forward, prompts cut to fit: the CPU's packed kernels read a weight's
/// codes directly, 8-bit activations against them, up to [`kernels::cpu::DIRECT_ROWS_PACKED`]
/// rows, and multiply an f32 copy of the weight beyond. At LLaMA-7B's sizes the copy's product
/// costs several times as much per row (docs/serve.md, session 42), and a weight streams from
/// memory in a small part of a 128-row product's time, so longer prompts run in such chunks.
pub const MAX_STEP_ROWS: usize = kernels::cpu::DIRECT_ROWS_PACKED;

/// From this many rows on, a step whose backend runs forwards side by side
/// ([`QuantBackend::concurrent_forwards`]) runs the layers of its sequences as two forwards of
/// about half the rows each, then the head once for all rows. Measured on the 2-core AMD Zen 4
/// host of docs/serve.md (session 49), against one forward: steps of 8 sequences 0.77–1.04×
/// (median 0.89×), of 16 sequences 0.77–0.89×; of 2 and 4 sequences up to 1.24×, of 6 about
/// even. One head product for both halves, rather than one each, took the steps of 8
/// sequences another 2–7% lower: at 8 rows on two threads it costs less than two 4-row
/// products side by side, each reading the whole head.
pub const SPLIT_ROWS: usize = 8;

/// Where to cut `spans` (`(start, rows)` each, at least two) into two runs of spans whose rows
/// are as even as can be, each with at least one span.
fn balanced_split(spans: &[(usize, usize)]) -> usize {
    let total: usize = spans.iter().map(|s| s.1).sum();
    let mut before = 0;
    let offsets = spans[..spans.len() - 1].iter().map(|s| {
        before += s.1;
        before
    });
    // The cut after span i leaves `before` rows on the left: closest to half the total wins.
    1 + (offsets.enumerate())
        .min_by_key(|&(_, b)| (2 * b).abs_diff(total))
        .map_or(0, |(i, _)| i)
}

/// One sequence being generated, a token at a time: its KV cache, the sampler's state and the
/// logits of the next position.
///
/// [`Decoder::new`] runs the whole prompt (the prefill) at once. [`Decoder::start`] runs none of
/// it: [`Decoder::step_together`] then runs it in chunks, in the same forwards as other
/// sequences' decode steps, so that a long prompt does not stall them (chunked prefill). Each
/// [`Decoder::next_token`] samples a token, and the forward for the following one runs only
/// when it is asked for, so a caller can hand a token on before the model works on the next.
pub struct Decoder<'m, B: QuantBackend> {
    model: &'m Llama<B>,
    opts: GenerateOptions,
    cache: Vec<crate::model::KvCache<B>>,
    rng: StdRng,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens run through the model so far.
    prefilled: usize,
    /// Score the prompt's tokens with this many alternatives each, as the prefill runs them.
    prompt_top_n: Option<usize>,
    prompt_logprobs: Vec<TokenLogprob>,
    /// Logits the last sampled token was drawn from (or, before any, of the first new token).
    logits: Vec<f32>,
    /// The token drawn from `logits`, not yet handed out.
    sampled: Option<u32>,
    /// A sampled token not yet run through the model.
    pending: bool,
    /// `max_new_tokens` tokens were sampled, or the stop token.
    done: bool,
}

impl<'m, B: QuantBackend> Decoder<'m, B> {
    /// Runs the prefill of `prompt` (non-empty, checked by [`GenerateOptions::validate`]).
    pub fn new(model: &'m Llama<B>, prompt: &[u32], opts: &GenerateOptions) -> Self {
        Self::with_prompt_logprobs(model, prompt, opts, None).0
    }

    /// [`Decoder::new`], also returning each prompt token's log-probability given the tokens
    /// before it (from the second token on) when `top_n` is set, from the same prefill.
    pub fn with_prompt_logprobs(
        model: &'m Llama<B>,
        prompt: &[u32],
        opts: &GenerateOptions,
        top_n: Option<usize>,
    ) -> (Self, Vec<TokenLogprob>) {
        let mut decoder = Self::start(model, prompt, opts, top_n);
        decoder.prefill();
        let logprobs = decoder.take_prompt_logprobs();
        (decoder, logprobs)
    }

    /// A decoder of `prompt` (non-empty) whose prefill has not run: [`Decoder::step_together`]
    /// runs it, in chunks, or [`Decoder::next_token`] all at once. With `top_n`, the prefill
    /// also scores the prompt's tokens ([`Decoder::take_prompt_logprobs`]).
    pub fn start(
        model: &'m Llama<B>,
        prompt: &[u32],
        opts: &GenerateOptions,
        top_n: Option<usize>,
    ) -> Self {
        assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
        // Room for every position the sequence can reach: no growth (a copy of the history and
        // fresh pages) in the middle of decoding.
        let cache =
            model.new_cache_with_capacity(opts.kv_cache, prompt.len() + opts.max_new_tokens);
        Self {
            model,
            opts: opts.clone(),
            cache,
            rng: StdRng::seed_from_u64(opts.seed),
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            prefilled: 0,
            prompt_top_n: top_n,
            prompt_logprobs: Vec::new(),
            logits: Vec::new(),
            sampled: None,
            pending: false,
            done: opts.max_new_tokens == 0,
        }
    }

    /// Whether part of the prompt has still to run through the model.
    pub fn is_prefilling(&self) -> bool {
        self.prefilled < self.prompt_len
    }

    /// The prompt's log-probabilities scored so far (see [`Decoder::start`]), taken out.
    pub fn take_prompt_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.prompt_logprobs)
    }

    /// The next token, or `None` once the stop token or `max_new_tokens` was reached. Runs
    /// what is left of the prefill first.
    pub fn next_token(&mut self) -> Option<u32> {
        self.prefill();
        if self.done {
            return None;
        }
        if self.pending {
            Self::step_together(&mut [self], 0);
        }
        let next = self
            .sampled
            .take()
            .expect("the step sampled from its logits");
        self.tokens.push(next);
        self.done = Some(next) == self.opts.stop_token
            || self.generated().len() == self.opts.max_new_tokens;
        self.pending = !self.done;
        Some(next)
    }

    /// Runs what is left of the prompt through the model.
    fn prefill(&mut self) {
        while self.is_prefilling() {
            Self::step_together(&mut [self], usize::MAX);
        }
    }

    /// One forward for several decoders of one model (continuous batching): the sampled token
    /// of each decoder that has one pending, and up to `prefill_tokens` prompt tokens of those
    /// still prefilling (in order; a prompt may be cut into chunks across steps), at most
    /// [`MAX_STEP_ROWS`] rows in all. Its linears are `M = rows` products, which read each
    /// weight once for all of them; from [`SPLIT_ROWS`] rows on, a host backend runs two such
    /// forwards side by side, each over about half the decoders. Each decoder whose last
    /// position ran draws its next token here, side by side with the others; the next
    /// [`Decoder::next_token`] hands it out. Decoders without a KV cache run alone. A
    /// decoder's tokens do not depend on which others step with it.
    pub fn step_together(decoders: &mut [&mut Self], prefill_tokens: usize) {
        // Prompts fill the rows the decoding sequences leave (at least one, so that they
        // always advance).
        let decoding = (decoders.iter())
            .filter(|d| d.pending && d.opts.use_cache)
            .count();
        let mut budget = prefill_tokens.min(MAX_STEP_ROWS.saturating_sub(decoding).max(1));
        let mut batch = Vec::with_capacity(decoders.len());
        let mut spans = Vec::with_capacity(decoders.len());
        for d in decoders.iter_mut() {
            let span = if d.is_prefilling() {
                // Without a cache each step reruns the whole sequence: its prompt runs at once.
                let left = d.prompt_len - d.prefilled;
                let n = if d.opts.use_cache {
                    left.min(budget)
                } else {
                    left
                };
                budget = budget.saturating_sub(n);
                (d.prefilled, n)
            } else if d.pending {
                (d.tokens.len() - 1, 1)
            } else {
                continue;
            };
            if span.1 == 0 {
                continue;
            }
            if d.opts.use_cache {
                batch.push(&mut **d);
                spans.push(span);
            } else {
                d.run_uncached(span);
            }
        }
        let Some(model) = batch.first().map(|d| d.model) else {
            return;
        };
        assert!(
            batch.iter().all(|d| std::ptr::eq(d.model, model)),
            "decoders stepped together share one model"
        );
        let step_rows: usize = spans.iter().map(|s| s.1).sum();
        let split = B::concurrent_forwards() > 1 && batch.len() > 1 && step_rows >= SPLIT_ROWS;
        let hidden = if split {
            let half = balanced_split(&spans);
            let (a, b) = batch.split_at_mut(half);
            let (sa, sb) = spans.split_at(half);
            let (a, b) = rayon::join(
                || Self::hidden_states(model, a, sa),
                || Self::hidden_states(model, b, sb),
            );
            Tensor::cat(vec![a, b], 1)
        } else {
            Self::hidden_states(model, &mut batch, &spans)
        };
        // One head product for the rows whose logits someone reads.
        let reads: Vec<Vec<usize>> = batch
            .iter()
            .zip(&spans)
            .map(|(d, &(start, n))| d.rows_read(start, n).collect())
            .collect();
        let mut rows = Vec::new();
        let mut offset = 0;
        for (read, &(_, n)) in reads.iter().zip(&spans) {
            rows.extend(read.iter().map(|r| offset + r));
            offset += n;
        }
        with_logits_at(model, hidden, &rows, |flat| {
            // A step that reads no logits (a prompt's chunk before its last) still absorbs
            // its spans: any nonzero width cuts the empty rows.
            let vocab = (flat.len() / rows.len().max(1)).max(1);
            let mut rest = flat;
            let work: Vec<_> = (batch.into_iter().zip(spans).zip(reads))
                .map(|((d, span), read)| {
                    let (mine, after) = rest.split_at(read.len() * vocab);
                    rest = after;
                    (d, span, read, mine)
                })
                .collect();
            // Each sequence copies its logits and draws its token on its own, in parallel: at 8
            // sequences that is megabytes of logits and eight draws (40–100 µs each at a
            // temperature above 0), which on one thread left the other idle.
            work.into_par_iter()
                .for_each(|(d, (start, n), read, mine)| {
                    d.absorb(start, n, read.into_iter().zip(mine.chunks_exact(vocab)));
                });
        });
    }

    /// The final hidden states `[1, rows, hidden]` of each decoder's span of tokens
    /// `(start, n)`, in one forward that also extends their caches.
    fn hidden_states(
        model: &Llama<B>,
        batch: &mut [&mut Self],
        spans: &[(usize, usize)],
    ) -> Tensor<B, 3> {
        let tokens: Vec<u32> = batch
            .iter()
            .zip(spans)
            .flat_map(|(d, &(start, n))| d.tokens[start..start + n].iter().copied())
            .collect();
        let lens: Vec<usize> = spans.iter().map(|s| s.1).collect();
        let mut caches: Vec<&mut [crate::model::KvCache<B>]> =
            batch.iter_mut().map(|d| d.cache.as_mut_slice()).collect();
        model.hidden_states_batch(to_tensor(&tokens, &model.device()), &mut caches, &lens)
    }

    /// The rows (offsets within a span of `n` tokens from position `start`) whose logits this
    /// decoder reads: the one that predicts the next new token, and while prefilling with
    /// prompt scores, those that predict prompt tokens.
    fn rows_read(&self, start: usize, n: usize) -> impl Iterator<Item = usize> + use<'_, 'm, B> {
        let scoring = self.is_prefilling() && self.prompt_top_n.is_some();
        (0..n).filter(move |&r| {
            let next = start + r + 1;
            next == self.tokens.len() || (scoring && next < self.prompt_len)
        })
    }

    /// Takes in the logits of a span's rows (see [`Decoder::rows_read`]) once it has run, and
    /// samples the next token from them when they are the last position's (the draw the next
    /// [`Decoder::next_token`] would make, made here so that sequences sample in parallel).
    fn absorb<'a>(
        &mut self,
        start: usize,
        n: usize,
        rows: impl Iterator<Item = (usize, &'a [f32])>,
    ) {
        for (r, logits) in rows {
            let next = start + r + 1;
            if next < self.prompt_len {
                let top_n = self.prompt_top_n.unwrap_or(0);
                let scored = token_logprob(logits, self.tokens[next], top_n);
                self.prompt_logprobs.push(scored);
            } else {
                self.logits.clear();
                self.logits.extend_from_slice(logits);
                self.pending = false;
                let (temperature, top_p) = (self.opts.temperature, self.opts.top_p);
                self.sampled = Some(sample(&self.logits, temperature, top_p, &mut self.rng));
            }
        }
        self.prefilled = self.prefilled.max((start + n).min(self.prompt_len));
    }

    /// A reference without a cache: every step reruns the whole sequence (`span` decides which
    /// rows are read, as with a cache).
    fn run_uncached(&mut self, (start, n): (usize, usize)) {
        let end = start + n;
        let hidden = self
            .model
            .hidden_states(to_tensor(&self.tokens[..end], &self.model.device()), None);
        let read: Vec<usize> = self.rows_read(start, n).collect();
        let at: Vec<usize> = read.iter().map(|r| start + r).collect();
        with_logits_at(self.model, hidden, &at, |flat| {
            let vocab = (flat.len() / at.len().max(1)).max(1);
            self.absorb(start, n, read.into_iter().zip(flat.chunks_exact(vocab)));
        });
    }

    /// The logits the last token of [`Decoder::next_token`] was sampled from.
    pub fn last_logits(&self) -> &[f32] {
        &self.logits
    }

    /// The tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Whether the stop token or `max_new_tokens` ended the sequence (its prompt has run).
    pub fn is_finished(&self) -> bool {
        self.done && !self.is_prefilling()
    }
}

/// Continues `prompt` by up to `max_new_tokens` tokens.
pub fn generate<B: QuantBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Generation {
    // A decode step makes ~200 small parallel products on the CPU backends. Started from a
    // thread outside rayon's pool, each one waits on a cross-thread wake-up (~10 µs); from
    // inside the pool, with the other threads kept awake, it is a cheap `join`.
    crate::pool::run_awake(|| {
        let t0 = Instant::now();
        let mut decoder = Decoder::new(model, prompt, opts);
        let prefill_seconds = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        while decoder.next_token().is_some() {}
        Generation {
            tokens: decoder.generated().to_vec(),
            prefill_seconds,
            decode_seconds: t1.elapsed().as_secs_f64(),
            prompt_tokens: prompt.len(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_split_evens_the_rows() {
        assert_eq!(balanced_split(&[(0, 1), (0, 1)]), 1);
        assert_eq!(balanced_split(&[(0, 1); 8]), 4);
        assert_eq!(balanced_split(&[(0, 1); 7]), 3);
        // A prompt's chunk beside decode steps: it goes alone.
        assert_eq!(balanced_split(&[(0, 64), (0, 1), (0, 1), (0, 1)]), 1);
        assert_eq!(balanced_split(&[(0, 1), (0, 1), (0, 64)]), 2);
        assert_eq!(balanced_split(&[(0, 3), (0, 1), (0, 1), (0, 1), (0, 2)]), 2);
    }

    /// The sampler's definition, written plainly: every token's weight, sorted, cut at `top_p`.
    fn sample_by_sorting(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
        let (weights, total) = weights(logits, temperature);
        let mut probs: Vec<(u32, f64)> = (weights.iter().enumerate())
            .map(|(i, &w)| (i as u32, w as f64))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0;
        let cut = probs
            .iter()
            .position(|p| {
                kept += p.1 / total;
                kept >= top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        let nucleus = &probs[..cut];
        draw(
            nucleus.iter().copied(),
            nucleus.iter().map(|p| p.1).sum(),
            rng,
        )
    }

    /// With `top_p < 1`, the same token as sorting the whole vocabulary, for the same random
    /// draw: peaked, flat and tied logits, a vocabulary the size of the real ones.
    #[test]
    fn nucleus_sampling_matches_sorting_the_vocabulary() {
        let mut noise = StdRng::seed_from_u64(3);
        // Peaked with noise; nearly flat, with ties; a few tied favourites over a flat rest.
        let vocabularies: [Vec<f32>; 3] = [
            (0..49_152)
                .map(|i| ((i * 7919) % 1000) as f32 / 40.0 + noise.random::<f32>() * 1e-3)
                .collect(),
            (0..49_152).map(|i| ((i * 31) % 7) as f32 * 0.01).collect(),
            (0..49_152)
                .map(|i| if i % 100 == 3 { 5.0 } else { 1.0 })
                .collect(),
        ];
        for logits in &vocabularies {
            for (temperature, top_p) in [(0.7, 0.95), (1.0, 0.5), (1.3, 0.99), (0.2, 0.9)] {
                for seed in 0..20 {
                    let fast = sample(logits, temperature, top_p, &mut StdRng::seed_from_u64(seed));
                    let slow = sample_by_sorting(
                        logits,
                        temperature,
                        top_p,
                        &mut StdRng::seed_from_u64(seed),
                    );
                    assert_eq!(
                        fast, slow,
                        "temperature {temperature}, top_p {top_p}, seed {seed}"
                    );
                }
            }
        }
    }

    /// Draw frequencies: the softmax over all tokens at `top_p = 1`, the renormalised nucleus
    /// below it, the most likely token at temperature 0.
    #[test]
    fn sample_frequencies_follow_the_distribution() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let softmax: Vec<f64> = {
            let e: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        };
        let frequencies = |top_p: f32| {
            let mut rng = StdRng::seed_from_u64(9);
            let mut counts = [0usize; 4];
            let draws = 40_000;
            for _ in 0..draws {
                counts[sample(&logits, 1.0, top_p, &mut rng) as usize] += 1;
            }
            counts.map(|c| c as f64 / draws as f64)
        };
        for (f, p) in frequencies(1.0).iter().zip(&softmax) {
            assert!((f - p).abs() < 0.01, "{f} against {p}");
        }
        // softmax ≈ [0.644, 0.237, 0.087, 0.032]: 0.8 keeps the first two.
        let nucleus = frequencies(0.8);
        let kept = softmax[0] + softmax[1];
        assert!((nucleus[0] - softmax[0] / kept).abs() < 0.01, "{nucleus:?}");
        assert!((nucleus[1] - softmax[1] / kept).abs() < 0.01, "{nucleus:?}");
        assert_eq!(nucleus[2] + nucleus[3], 0.0, "{nucleus:?}");
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample(&[0.5, 3.0, -1.0], 0.0, 0.5, &mut rng), 1);
    }

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
        // Heads of 4 values do not fill a Q8_0 block; without a cache nothing is stored.
        assert_eq!(option(|o| o.kv_cache = KvDtype::Q8_0, 1), "kv_cache");
        let no_cache = |o: &mut GenerateOptions| (o.kv_cache, o.use_cache) = (KvDtype::Q8_0, false);
        assert_eq!(check(no_cache, 1), Ok(()));
        let e = check(|o| o.max_new_tokens = 91, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10 tokens plus 91") && e.contains("100 positions"),
            "{e}"
        );
    }

    #[test]
    fn token_logprob_is_the_log_softmax_with_its_top_tokens() {
        let logits = [1.0f32, 3.0, 2.0, 3.0 - 2f32.ln()];
        // Softmax mass: e, e^3, e^2, e^3 / 2.
        let z = (1f64.exp() + 1.5 * 3f64.exp() + 2f64.exp()).ln();
        let lp = token_logprob(&logits, 2, 2);
        assert!((lp.logprob as f64 - (2.0 - z)).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3]);
        assert!((lp.top[0].1 as f64 - (3.0 - z)).abs() < 1e-6);
        let total: f64 = logits
            .iter()
            .map(|&l| (token_logprob(&logits, 0, 0).logprob as f64 + (l - 1.0) as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(token_logprob(&logits, 0, 9).top.len(), 4);
    }

    /// On a vocabulary of real size with many ties: the top tokens of sorting every id (most
    /// likely first, the lower id of a tie first), and log-probabilities within f32 rounding of
    /// an f64 log-softmax.
    #[test]
    fn token_logprob_matches_sorting_the_vocabulary() {
        let mut rng = StdRng::seed_from_u64(5);
        let logits: Vec<f32> = (0..49_152)
            .map(|_| (rng.random_range(0..2000) as f32) / 100.0 - 10.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = max
            + (logits.iter())
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        for (token, top_n) in [(0u32, 0usize), (17, 1), (40_000, 5), (123, 20)] {
            let lp = token_logprob(&logits, token, top_n);
            assert!((lp.logprob as f64 - (logits[token as usize] as f64 - z)).abs() < 1e-5);
            let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
            assert_eq!(ids, order[..top_n], "top {top_n}");
            for &(t, p) in &lp.top {
                assert!((p as f64 - (logits[t as usize] as f64 - z)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn context_is_capped_at_the_rotary_table() {
        let c = config(1 << 20);
        assert_eq!(c.context_length(), crate::model::MAX_ROPE_POSITIONS);
    }
}
