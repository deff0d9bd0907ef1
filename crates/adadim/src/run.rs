//! One quantization job end to end: open the model, build the calibration set, quantize, write
//! the packed checkpoint (and optionally the fake-quant export) with the run's report. The CLI's
//! `adadim quantize` and `cargo xtask quantize --config` both describe a [`RunSpec`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kernels::QuantBackend;
use quant_core::{GptqOptions, GroupSize, RangeMode};
use serde::{Deserialize, Serialize};

use model_llama::staging::check_destination;
use sha2::{Digest, Sha256};

use crate::calib::{CalibOptions, calibration_from_file};
use crate::defaults;
use crate::error::{AdadimError, Result};
use crate::options::{Choices, Method, Propagate, Recipe, Score};
use crate::output::Outputs;
use crate::pipeline::{QuantizeOptions, ResumePoint, calibration_seqlen, quantize_layers};
use crate::policy::DimPolicy;
use crate::report::{RunReport, peak_rss_mib};

fn default_samples() -> usize {
    defaults::CALIB_SAMPLES
}
fn default_seqlen() -> usize {
    defaults::CALIB_SEQLEN
}
fn default_bits() -> u32 {
    defaults::BITS
}
fn default_group() -> GroupSize {
    defaults::GROUP_SIZE
}
fn default_recipe() -> Recipe {
    defaults::RECIPE
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
    pub group_size: GroupSize,
    /// The recipe whose choices the five below default to (docs/method.md §4.7).
    #[serde(default = "default_recipe")]
    pub recipe: Recipe,
    #[serde(default)]
    pub method: Option<Method>,
    /// GPTQ's knobs (a `[quantize.gptq]` table in configs: `block_size`, `percdamp`,
    /// `act_order`, `static_groups`); ignored by RTN.
    #[serde(default)]
    pub gptq: GptqOptions,
    #[serde(default)]
    pub dim: Option<DimPolicy>,
    /// How each group's range is chosen: minmax, or search (docs/method.md §2.1).
    #[serde(default)]
    pub range: Option<RangeMode>,
    /// Which candidates choose the dim: rtn, or gptq (docs/method.md §4.5).
    #[serde(default)]
    pub score: Option<Score>,
    /// What each layer is calibrated on: fp, or quantized (docs/method.md §4.6).
    #[serde(default)]
    pub propagate: Option<Propagate>,
    /// Refit GPTQ's per-OC group parameters to its codes (docs/method.md §3.1).
    #[serde(default)]
    pub refit: Option<bool>,
    /// Symmetric groups (docs/method.md §2.2).
    #[serde(default)]
    pub sym: bool,
    /// Packed checkpoint directory.
    pub out: PathBuf,
    /// Optional fake-quant export directory.
    #[serde(default)]
    pub fake_quant: Option<PathBuf>,
    /// Replace this tool's files in non-empty output directories (other files are kept).
    #[serde(default)]
    pub overwrite: bool,
    /// Continue the interrupted run staged beside `out` (`<out>.adadim-partial`).
    #[serde(default)]
    pub resume: bool,
    /// Memory the run may use, in GiB (default: 90% of the machine's memory).
    #[serde(default)]
    pub max_memory_gib: Option<f64>,
}

impl RunSpec {
    /// A run of `model` on `calib` into `out` with every other key at its default, as a config
    /// naming only those three reads.
    pub fn new(model: PathBuf, calib: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            calib,
            calib_samples: defaults::CALIB_SAMPLES,
            calib_seqlen: defaults::CALIB_SEQLEN,
            calib_seed: None,
            bits: defaults::BITS,
            group_size: defaults::GROUP_SIZE,
            recipe: defaults::RECIPE,
            method: None,
            gptq: GptqOptions::default(),
            dim: None,
            range: None,
            score: None,
            propagate: None,
            refit: None,
            sym: false,
            out,
            fake_quant: None,
            overwrite: false,
            resume: false,
            max_memory_gib: None,
        }
    }

    /// The recipe's choices, with the ones this run names itself.
    pub fn choices(&self) -> Choices {
        let r = self.recipe.choices();
        let method = self.method.unwrap_or(r.method);
        // A run that makes the method round to nearest scores RTN candidates and refits
        // nothing, whatever its recipe does; AWQ comes with its clip search (docs/method.md
        // §4.8).
        let (recipe_score, recipe_range) = match method {
            Method::Rtn => (Score::Rtn, r.range),
            Method::Awq => (Score::Rtn, RangeMode::Search),
            Method::Gptq => (r.score, r.range),
            Method::AwqGptq => (r.score, RangeMode::Search),
        };
        let recipe_refit = r.refit && method.solves_gptq();
        Choices {
            method,
            dim: self.dim.clone().unwrap_or(r.dim),
            range: self.range.unwrap_or(recipe_range),
            score: self.score.unwrap_or(recipe_score),
            propagate: self.propagate.unwrap_or(r.propagate),
            refit: self.refit.unwrap_or(recipe_refit),
        }
    }

    /// The library options this run quantizes with.
    pub fn options(&self) -> QuantizeOptions {
        QuantizeOptions {
            bits: self.bits,
            group_size: self.group_size,
            gptq: self.gptq,
            sym: self.sym,
            max_memory: self
                .max_memory_gib
                .map(|g| (g * (1u64 << 30) as f64) as u64),
            ..QuantizeOptions::from_choices(self.choices())
        }
    }

    /// What a resumed run must share with the interrupted one: the options that change the
    /// result, the model files (size and modification time) and the calibration text (hash).
    fn fingerprint(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AdadimError::Io { path, source }
        };
        let mut files = Vec::new();
        let entries: Vec<PathBuf> = if self.model.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&self.model)
                .map_err(io(&self.model))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            v
        } else {
            vec![self.model.clone()]
        };
        for f in entries {
            let meta = std::fs::metadata(&f).map_err(io(&f))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            files.push(format!("{name}:{}:{mtime}", meta.len()));
        }
        let text = std::fs::read(&self.calib).map_err(io(&self.calib))?;
        let model = std::fs::canonicalize(&self.model).map_err(io(&self.model))?;
        let v = |x: serde_json::Value| x;
        let c = self.choices();
        let mut fingerprint = BTreeMap::from([
            ("model".into(), v(model.display().to_string().into())),
            ("model files".into(), v(files.into())),
            (
                "calibration text".into(),
                v(format!("{:x}", Sha256::digest(&text)).into()),
            ),
            ("calib_samples".into(), v(self.calib_samples.into())),
            ("calib_seqlen".into(), v(self.calib_seqlen.into())),
            ("calib_seed".into(), serde_json::json!(self.calib_seed)),
            ("bits".into(), v(self.bits.into())),
            ("group_size".into(), v(self.group_size.as_i64().into())),
            ("method".into(), v(c.method.to_string().into())),
            ("dim".into(), v(c.dim.to_string().into())),
            (
                "fake-quant export".into(),
                v(self.fake_quant.is_some().into()),
            ),
            ("version".into(), v(env!("CARGO_PKG_VERSION").into())),
        ]);
        // Only when not the paper's: a run interrupted before these were settable stays
        // resumable.
        let paper = Recipe::Paper.choices();
        if c.range != paper.range {
            fingerprint.insert("range".into(), c.range.to_string().into());
        }
        if c.score != paper.score {
            fingerprint.insert("score".into(), c.score.to_string().into());
        }
        if c.propagate != paper.propagate {
            fingerprint.insert("propagate".into(), c.propagate.to_string().into());
        }
        if c.refit != paper.refit {
            fingerprint.insert("refit".into(), c.refit.into());
        }
        if self.sym {
            fingerprint.insert("sym".into(), true.into());
        }
        if self.gptq != GptqOptions::default() {
            fingerprint.insert("gptq".into(), serde_json::json!(self.gptq));
        }
        Ok(fingerprint)
    }
}

/// Runs `spec` on `device`; returns the report (also written into the output directory).
pub fn run<B: QuantBackend>(spec: &RunSpec, device: &B::Device) -> Result<RunReport> {
    let start = Instant::now();
    let m = model_llama::open_model(&spec.model)?;
    let src = m.source.as_ref();
    let opts = spec.options();
    opts.validate(src.config())?;
    for dest in std::iter::once(&spec.out).chain(&spec.fake_quant) {
        check_destination(dest, spec.overwrite)?;
    }
    let calib = calibration_from_file(
        &spec.calib,
        |t| Ok(m.tokenizer.encode(t)?),
        &CalibOptions {
            n_samples: spec.calib_samples,
            seqlen: spec.calib_seqlen,
            shuffle_seed: spec.calib_seed,
        },
    )?;
    let seqlen = calibration_seqlen(&calib)?;
    let fingerprint = spec.fingerprint()?;
    let fake = spec.fake_quant.as_deref();
    let (mut outputs, resume) = if spec.resume {
        let (outputs, input) =
            Outputs::resume::<B>(src, &spec.out, fake, spec.overwrite, &fingerprint, device)?;
        let layer = outputs.progress().layers_done;
        (outputs, input.map(|input| ResumePoint { layer, input }))
    } else {
        let plan = opts.memory_plan::<B>(src.config(), calib.len(), seqlen, device)?;
        let outputs = Outputs::create(src, &spec.out, fake, spec.overwrite, fingerprint, plan)?;
        (outputs, None)
    };
    let plan = outputs.progress().plan;
    quantize_layers::<B>(src, &calib, &opts, plan, resume, device, &mut outputs)?;
    let progress = outputs.progress();
    let records = progress.records.clone();
    let report = RunReport {
        model: spec.model.display().to_string(),
        method: opts.method.to_string(),
        policy: opts.policy.to_string(),
        bits: spec.bits,
        group_size: spec.group_size,
        range: opts.range,
        score: opts.score,
        propagate: opts.propagate,
        refit: opts.refit,
        sym: opts.sym,
        calib_blocks: calib.len(),
        calib_seqlen: spec.calib_seqlen,
        seconds: progress.seconds + start.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
        ic_count: RunReport::ic_summary(&records),
        layers: src.config().num_hidden_layers,
        linears: records,
    };
    let out = outputs.finish(&opts, &m.tokenizer, &report)?;
    tracing::info!(seconds = report.seconds, out = %out.display(), "quantization done");
    Ok(report)
}
