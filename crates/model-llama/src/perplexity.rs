//! Perplexity as in the GPTQ/AWQ papers: the token stream cut into non-overlapping windows of
//! `seqlen` tokens, mean next-token cross-entropy over all windows, `exp` of it.

use std::time::Instant;

use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::QuantBackend;
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::model::Llama;

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
    let rows = hidden.dims()[0];
    let mut total = 0.0;
    for r0 in (0..rows).step_by(LOGIT_ROWS) {
        let n = LOGIT_ROWS.min(rows - r0);
        let logits = model.head(hidden.clone().narrow(0, r0, n));
        total += B::sum_nll(logits, &targets[r0..r0 + n]);
    }
    total
}

/// Perplexity of `model` on `tokens`, over at most `max_windows` windows of `seqlen` tokens.
pub fn perplexity<B: QuantBackend>(
    model: &Llama<B>,
    tokens: &[u32],
    seqlen: usize,
    max_windows: Option<usize>,
) -> Result<PerplexityReport> {
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
    let device = model.device();
    let bar = ProgressBar::new(windows as u64).with_style(
        ProgressStyle::with_template(
            "perplexity {bar:30} {pos}/{len} windows  {elapsed} (eta {eta})",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let mut nll_sum = 0.0;
    for w in 0..windows {
        let window = &tokens[w * seqlen..(w + 1) * seqlen];
        let ids: Vec<i64> = window.iter().map(|&t| t as i64).collect();
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
    let nll = nll_sum / windows as f64;
    Ok(PerplexityReport {
        perplexity: nll.exp(),
        nll,
        windows,
        seqlen,
        tokens: windows * seqlen,
        seconds: start.elapsed().as_secs_f64(),
    })
}
