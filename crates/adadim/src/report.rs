//! The JSON report of a run.

use std::collections::BTreeMap;

use model_llama::LinearKind;
use quant_core::{QuantDim, RangeMode};
use serde::{Deserialize, Serialize};

use crate::options::{Propagate, Recipe, Score};
use crate::pipeline::LinearRecord;

fn paper_score() -> Score {
    Recipe::Paper.choices().score
}
fn paper_propagate() -> Propagate {
    Recipe::Paper.choices().propagate
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub model: String,
    pub method: String,
    pub policy: String,
    pub bits: u32,
    pub group_size: quant_core::GroupSize,
    /// How group ranges were chosen (absent in reports older than the option: min-max).
    #[serde(default)]
    pub range: RangeMode,
    /// Which candidates chose the dims (absent in older reports: RTN's).
    #[serde(default = "paper_score")]
    pub score: Score,
    /// What each layer was calibrated on (absent in older reports: full precision).
    #[serde(default = "paper_propagate")]
    pub propagate: Propagate,
    /// GPTQ's per-OC groups refitted (absent in older reports: not).
    #[serde(default)]
    pub refit: bool,
    /// Symmetric groups (absent in older reports: asymmetric).
    #[serde(default)]
    pub sym: bool,
    pub calib_blocks: usize,
    pub calib_seqlen: usize,
    pub seconds: f64,
    /// Peak resident memory of the process, from the kernel (`VmHWM`), if known.
    pub peak_rss_mib: Option<f64>,
    /// Per linear type: how many layers chose per-IC.
    pub ic_count: BTreeMap<LinearKind, usize>,
    pub layers: usize,
    pub linears: Vec<LinearRecord>,
}

impl RunReport {
    pub fn ic_summary(records: &[LinearRecord]) -> BTreeMap<LinearKind, usize> {
        let mut counts: BTreeMap<LinearKind, usize> =
            LinearKind::ALL.into_iter().map(|k| (k, 0)).collect();
        for r in records.iter().filter(|r| r.dim == QuantDim::Ic) {
            *counts.entry(r.linear).or_default() += 1;
        }
        counts
    }

    /// A per-layer map of choices: one row per layer, one column per linear (`O`/`I`).
    pub fn choice_map(&self) -> String {
        let mut s = String::from("layer  q k v o g u d\n");
        for layer in 0..self.layers {
            s.push_str(&format!("{layer:>5} "));
            for kind in LinearKind::ALL {
                let c = self
                    .linears
                    .iter()
                    .find(|r| r.layer == layer && r.linear == kind)
                    .map_or('?', |r| if r.dim == QuantDim::Ic { 'I' } else { 'O' });
                s.push(' ');
                s.push(c);
            }
            s.push('\n');
        }
        s
    }
}

/// Peak resident set size of this process in MiB (Linux), `None` elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
