//! One quantization job end to end: open the model, build the calibration set, quantize, write
//! the packed checkpoint (and optionally the fake-quant export) with the run's report. The CLI's
//! `adadim quantize` and `cargo xtask quantize --config` both describe a [`RunSpec`].

use std::path::PathBuf;
use std::time::Instant;

use kernels::QuantBackend;
use serde::{Deserialize, Serialize};

use crate::calib::{CalibOptions, calibration_from_file};
use crate::error::Result;
use crate::pipeline::{Method, QuantizeOptions, quantize_model};
use crate::policy::DimPolicy;
use crate::report::{RunReport, peak_rss_mib};

fn default_samples() -> usize {
    64
}
fn default_seqlen() -> usize {
    512
}
fn default_bits() -> u32 {
    3
}
fn default_group() -> i64 {
    128
}
fn default_method() -> Method {
    Method::Rtn
}
fn default_dim() -> DimPolicy {
    DimPolicy::Ada
}

/// Everything a quantization run needs; deserializes from the TOML files in `configs/`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// GGUF file or Hugging Face directory.
    pub model: PathBuf,
    /// Calibration text, one sample per line.
    pub calib: PathBuf,
    #[serde(default = "default_samples")]
    pub calib_samples: usize,
    #[serde(default = "default_seqlen")]
    pub calib_seqlen: usize,
    #[serde(default)]
    pub calib_seed: Option<u64>,
    #[serde(default = "default_bits")]
    pub bits: u32,
    #[serde(default = "default_group")]
    pub group_size: i64,
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default = "default_dim")]
    pub dim: DimPolicy,
    /// Packed checkpoint directory.
    pub out: PathBuf,
    /// Optional fake-quant export directory.
    #[serde(default)]
    pub fake_quant: Option<PathBuf>,
}

/// Runs `spec` on `device`; returns the report (also written into the output directory).
pub fn run<B: QuantBackend>(spec: &RunSpec, device: &B::Device) -> Result<RunReport> {
    let start = Instant::now();
    let m = model_llama::open_model(&spec.model)?;
    let opts = QuantizeOptions {
        bits: spec.bits,
        group_size: spec.group_size,
        method: spec.method,
        policy: spec.dim.clone(),
        gptq: Default::default(),
        max_memory: None,
    };
    opts.validate(m.source.config())?;
    let calib = calibration_from_file(
        &spec.calib,
        |t| Ok(m.tokenizer.encode(t)?),
        &CalibOptions {
            n_samples: spec.calib_samples,
            seqlen: spec.calib_seqlen,
            shuffle_seed: spec.calib_seed,
        },
    )?;
    let q = quantize_model::<B>(m.source.as_ref(), &calib, &opts, device)?;
    let report = RunReport {
        model: spec.model.display().to_string(),
        method: spec.method.to_string(),
        policy: spec.dim.to_string(),
        bits: spec.bits,
        group_size: spec.group_size,
        calib_blocks: calib.len(),
        calib_seqlen: spec.calib_seqlen,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
        ic_count: RunReport::ic_summary(&q.records),
        layers: m.source.config().num_hidden_layers,
        linears: q.records.clone(),
    };
    crate::output::write_packed(m.source.as_ref(), &m.tokenizer, &q, &report, &spec.out)?;
    if let Some(fake) = &spec.fake_quant {
        crate::output::write_fake_quant(m.source.as_ref(), &m.tokenizer, &q, &report, fake)?;
    }
    tracing::info!(seconds = report.seconds, out = %spec.out.display(), "quantization done");
    Ok(report)
}
