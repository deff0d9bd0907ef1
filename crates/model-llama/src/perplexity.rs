//! Perplexity as in the GPTQ/AWQ papers: the token stream cut into non-overlapping windows of
//! `seqlen` tokens, mean next-token cross-entropy over all windows, `exp` of it.
//!
//! [`perplexity_layer_major`] evaluates a checkpoint without holding the model: it embeds every
//! window, then loads one decoder layer at a time and runs every window through it, then the
//! head. Memory is one layer's weights, the hidden states of all windows and one window's
//! activations (a 7B model at 16 × 2048 tokens: well under 8 GiB), and each window goes through
//! the same ops as in [`perplexity`] on the loaded model, so the results are the same.

use std::time::Instant;

use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::QuantBackend;
use serde::Serialize;

use crate::checkpoint::TensorSource;
use crate::error::{ModelError, Result};
use crate::load::{load_embedding, load_final_norm, load_head_dense, load_rope};
use crate::model::{DecoderLayer, Linear, Llama, RmsNorm};

/// Rows of logits materialised at once: `rows × vocab` floats.
const LOGIT_ROWS: usize = 256;

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
    pub perplexity: f64,
    /// Mean negative log-likelihood per predicted token.
    pub nll: f64,
    pub windows: usize,
    pub seqlen: usize,
    /// Tokens run through the model.
    pub tokens: usize,
    pub seconds: f64,
}

impl PerplexityReport {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

/// Sum of `−log p(target)` over rows of `hidden [rows, hidden]`.
pub fn sum_nll<B: QuantBackend>(model: &Llama<B>, hidden: Tensor<B, 2>, targets: &[u32]) -> f64 {
    sum_nll_with(&model.norm, &model.lm_head, hidden, targets)
}

/// [`sum_nll`] with the final norm and head given on their own.
fn sum_nll_with<B: QuantBackend>(
    norm: &RmsNorm<B>,
    lm_head: &Linear<B>,
    hidden: Tensor<B, 2>,
    targets: &[u32],
) -> f64 {
    let rows = hidden.dims()[0];
    let mut total = 0.0;
    for r0 in (0..rows).step_by(LOGIT_ROWS) {
        let n = LOGIT_ROWS.min(rows - r0);
        let logits = lm_head.forward(norm.forward(hidden.clone().narrow(0, r0, n)));
        total += B::sum_nll(logits, &targets[r0..r0 + n]);
    }
    total
}

/// How many windows of `seqlen` tokens are evaluated.
fn window_count(tokens: &[u32], seqlen: usize, max_windows: Option<usize>) -> Result<usize> {
    if seqlen < 2 {
        return Err(ModelError::Invalid(format!(
            "seqlen must be at least 2, got {seqlen}"
        )));
    }
    let available = tokens.len() / seqlen;
    let windows = max_windows.map_or(available, |w| w.min(available));
    if windows == 0 {
        return Err(ModelError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {seqlen}",
            tokens.len()
        )));
    }
    Ok(windows)
}

fn progress(len: usize, unit: &str) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "perplexity {{bar:30}} {{pos}}/{{len}} {unit}  {{elapsed}} (eta {{eta}})"
        ))
        .expect("valid template"),
    )
}

/// Window `w`'s tokens, the targets of its first `seqlen − 1` positions, and its token ids.
fn window(tokens: &[u32], seqlen: usize, w: usize) -> (&[u32], Vec<i64>) {
    let window = &tokens[w * seqlen..(w + 1) * seqlen];
    (window, window.iter().map(|&t| t as i64).collect())
}

/// Mean NLL over windows from their per-window means, summed in window order.
fn report(nll_sum: f64, windows: usize, seqlen: usize, start: Instant) -> PerplexityReport {
    let nll = nll_sum / windows as f64;
    PerplexityReport {
        perplexity: nll.exp(),
        nll,
        windows,
        seqlen,
        tokens: windows * seqlen,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Perplexity of a loaded `model` on `tokens`, over at most `max_windows` windows of `seqlen`
/// tokens, window by window. To evaluate a checkpoint without loading all of it, see
/// [`perplexity_layer_major`].
pub fn perplexity<B: QuantBackend>(
    model: &Llama<B>,
    tokens: &[u32],
    seqlen: usize,
    max_windows: Option<usize>,
) -> Result<PerplexityReport> {
    let windows = window_count(tokens, seqlen, max_windows)?;
    let device = model.device();
    let bar = progress(windows, "windows");
    let start = Instant::now();
    let mut nll_sum = 0.0;
    for w in 0..windows {
        let (window, ids) = window(tokens, seqlen, w);
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, seqlen]), &device);
        let hidden = model
            .hidden_states(input, None)
            .reshape([seqlen, model.config.hidden_size]);
        let predicted = hidden.narrow(0, 0, seqlen - 1);
        nll_sum += sum_nll(model, predicted, &window[1..]) / (seqlen - 1) as f64;
        bar.inc(1);
        tracing::debug!(
            window = w,
            running_ppl = (nll_sum / (w + 1) as f64).exp(),
            "window done"
        );
    }
    bar.finish_and_clear();
    Ok(report(nll_sum, windows, seqlen, start))
}

/// Perplexity of the checkpoint `src` as [`perplexity`] computes it on the loaded model, but
/// layer-major: every window is embedded, then for each decoder layer `layer(i)` is loaded, every
/// window is run through it (one at a time) and it is dropped; then the final norm and head.
///
/// `layer` builds decoder layer `i` as the model would hold it (packed linears for packed
/// checkpoints, [`crate::load::load_layer_compact`] otherwise). The head is loaded in f32: it is
/// multiplied by hundreds of rows at a time, where a compact head gives the same values through
/// an f32 copy per product. (A window whose last head product has at most
/// `kernels::cpu::DIRECT_ROWS_PACKED` rows (64 for a 16-bit head), which `seqlen = 2048` never
/// makes, can then differ from the loaded model's in rounding, when that model keeps its head
/// compact.) `seconds` includes the loading.
pub fn perplexity_layer_major<B: QuantBackend>(
    src: &dyn TensorSource,
    layer: &dyn Fn(usize) -> Result<DecoderLayer<B>>,
    tokens: &[u32],
    seqlen: usize,
    max_windows: Option<usize>,
    device: &B::Device,
) -> Result<PerplexityReport> {
    let windows = window_count(tokens, seqlen, max_windows)?;
    let config = src.config();
    let start = Instant::now();
    let embed = load_embedding::<B>(src, device)?;
    let mut hidden: Vec<Tensor<B, 3>> = (0..windows)
        .map(|w| {
            let ids = window(tokens, seqlen, w).1;
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, seqlen]), device);
            burn::tensor::module::embedding(embed.clone(), input)
        })
        .collect();
    drop(embed);
    let rope = load_rope::<B>(config, device);
    let layers = config.num_hidden_layers;
    let bar = progress(layers * windows, "layer × window");
    for i in 0..layers {
        let layer = layer(i)?;
        hidden = hidden
            .into_iter()
            .map(|x| {
                let x = layer.forward(x, &rope, None);
                bar.inc(1);
                x
            })
            .collect();
        tracing::debug!(layer = i, "layer done");
    }
    bar.finish_and_clear();
    let norm = load_final_norm::<B>(src, device)?;
    let lm_head = load_head_dense::<B>(src, device)?;
    let mut nll_sum = 0.0;
    for (w, x) in hidden.into_iter().enumerate() {
        let targets = &window(tokens, seqlen, w).0[1..];
        let predicted = x
            .reshape([seqlen, config.hidden_size])
            .narrow(0, 0, seqlen - 1);
        nll_sum += sum_nll_with(&norm, &lm_head, predicted, targets) / (seqlen - 1) as f64;
        tracing::debug!(
            window = w,
            running_ppl = (nll_sum / (w + 1) as f64).exp(),
            "window done"
        );
    }
    Ok(report(nll_sum, windows, seqlen, start))
}
