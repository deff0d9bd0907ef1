//! The layer-by-layer pipeline (docs/method.md §4): calibration activations propagate through
//! the full-precision model; in each decoder layer the seven linears are visited in order, their
//! dim chosen (greedily, against the layer's current partly quantized state) and quantized.
//!
//! Only one decoder layer's weights are in memory at a time: they stream from the checkpoint,
//! and each finished layer goes to a [`LayerSink`] (the packed checkpoint on disk), so memory
//! does not grow with the number of layers (see [`crate::memory`]).

use std::time::Instant;

use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::QuantBackend;
use model_llama::linear_shape;
use model_llama::load::{load_host, load_layer};
use model_llama::model::Rope;
use model_llama::packed::QuantizationConfig;
use model_llama::{DecoderLayer, InvalidOption, LayerInputs, Linear, LinearKind, TensorSource};
use quant_core::{
    GptqOptions, GroupSize, PackedLinear, QuantConfig, QuantDim, Quantized, RangeMode,
};
use serde::{Deserialize, Serialize};

use crate::awq;
use crate::defaults;
use crate::error::{AdadimError, Result};
use crate::memory::{MemoryPlan, gib};
use crate::options::{Choices, Method, Propagate, Score};
use crate::policy::DimPolicy;
use crate::score::{
    AttnState, ChunkState, ErrorSum, MlpState, ScoreForms, Update, attn_error, carries, delta_t,
    mlp_error, o_proj_gram, own_output_error_direct, own_output_error_gram,
    own_output_error_undifferenced, sub_block_error,
};
use crate::stats::{InputStats, Site, SubBlockInputs};

#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub bits: u32,
    pub group_size: GroupSize,
    pub method: Method,
    pub policy: DimPolicy,
    pub gptq: GptqOptions,
    /// How each group's range is chosen, for RTN and GPTQ alike (docs/method.md §2.1).
    pub range: RangeMode,
    /// Which candidates choose the dim (docs/method.md §4.5).
    pub score: Score,
    /// What each layer is calibrated on (docs/method.md §4.6).
    pub propagate: Propagate,
    /// GPTQ's per-OC group parameters refitted to its codes (docs/method.md §3.1).
    pub refit: bool,
    /// Symmetric groups: a scale only, zero at the centre code (docs/method.md §2.2).
    pub sym: bool,
    /// The forms the scores are computed in (default: the cheaper; the others check them).
    pub scoring: ScoreForms,
    /// Memory the run may use, bytes (`None`: [`crate::memory::default_limit`]).
    pub max_memory: Option<u64>,
}

/// The default recipe's choices (docs/method.md §4.7).
impl Default for QuantizeOptions {
    fn default() -> Self {
        Self::from_choices(defaults::RECIPE.choices())
    }
}

impl QuantizeOptions {
    /// The defaults, with a recipe's (or a run's own) choices.
    pub fn from_choices(c: Choices) -> Self {
        Self {
            bits: defaults::BITS,
            group_size: defaults::GROUP_SIZE,
            method: c.method,
            policy: c.dim,
            gptq: GptqOptions::default(),
            range: c.range,
            score: c.score,
            propagate: c.propagate,
            refit: c.refit,
            sym: false,
            scoring: ScoreForms::default(),
            max_memory: None,
        }
    }

    /// The checks that need no model, made before any work: GPTQ's knobs (when the method is
    /// GPTQ's) and the options that need GPTQ; the error names the option (`gptq.block_size`,
    /// `gptq.percdamp`, `gptq.static_groups`, `score`, `refit`).
    pub fn check_options(&self) -> std::result::Result<(), InvalidOption> {
        if !self.method.solves_gptq() {
            if self.score == Score::Gptq {
                return Err(InvalidOption::new(
                    "score",
                    "`gptq` scores GPTQ-solved candidates, so it needs method gptq or awq-gptq",
                ));
            }
            if self.refit {
                return Err(InvalidOption::new(
                    "refit",
                    "refits GPTQ's groups against its Hessian, so it needs method gptq or \
                     awq-gptq",
                ));
            }
            return Ok(());
        }
        let g = &self.gptq;
        if g.block_size == 0 {
            return Err(InvalidOption::new("gptq.block_size", "must be positive"));
        }
        if !g.percdamp.is_finite() || g.percdamp < 0.0 {
            return Err(InvalidOption::new(
                "gptq.percdamp",
                format!("must be a finite non-negative number, got {}", g.percdamp),
            ));
        }
        let per_oc = LinearKind::ALL
            .into_iter()
            .any(|kind| self.policy.candidates(kind).contains(&QuantDim::Oc));
        if !g.static_groups && per_oc {
            return Err(InvalidOption::new(
                "gptq.static_groups",
                format!(
                    "per-OC GPTQ needs static groups (the packed format has no g_idx for \
                     act-order groups), and dim policy `{}` quantizes some linears per-OC",
                    self.policy
                ),
            ));
        }
        Ok(())
    }

    /// Checks bits, group size, GPTQ's knobs and policy against every linear shape of
    /// `config`, before any work is done; returns the base (per-OC) quantizer config.
    pub fn validate(&self, config: &model_llama::LlamaConfig) -> Result<QuantConfig> {
        self.check_options()?;
        let base = QuantConfig::new(self.bits, self.group_size, QuantDim::Oc)
            .map_err(quant_err("quantization options".into()))?
            .with_sym(self.sym);
        for kind in LinearKind::ALL {
            let [out, inp] = linear_shape(config, kind);
            for dim in self.policy.candidates(kind) {
                base.with_dim(dim)
                    .check_shape(out, inp)
                    .map_err(quant_err(format!(
                        "{} ({out}×{inp}) in dim {dim}",
                        kind.module()
                    )))?;
            }
        }
        Ok(base)
    }

    /// The `quantization_config` block of the packed checkpoint, with the dims chosen.
    pub fn quantization_config(
        &self,
        dims: std::collections::BTreeMap<String, QuantDim>,
    ) -> QuantizationConfig {
        QuantizationConfig {
            quant_method: "adadim".into(),
            algorithm: self.method.to_string(),
            bits: self.bits,
            group_size: self.group_size,
            dims,
            head: None,
            sym: self.sym,
        }
    }

    /// The memory plan for `blocks × seqlen` calibration tokens on a model of `config`, with
    /// chunks that fit the buffers of `device`.
    pub fn memory_plan<B: QuantBackend>(
        &self,
        config: &model_llama::LlamaConfig,
        blocks: usize,
        seqlen: usize,
        device: &B::Device,
    ) -> Result<MemoryPlan> {
        let limit = self.max_memory.unwrap_or_else(crate::memory::default_limit);
        let device = B::device_limits(device);
        crate::memory::plan(config, blocks, seqlen, self.method, limit, &device)
    }
}

/// What happened to one linear.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinearRecord {
    pub layer: usize,
    pub linear: LinearKind,
    pub dim: QuantDim,
    /// Output errors of the scored candidates (AdaDim only).
    pub error_oc: Option<f64>,
    pub error_ic: Option<f64>,
    /// GPTQ's reconstruction loss (GPTQ only).
    pub gptq_loss: Option<f64>,
    pub seconds: f64,
}

/// The calibration hidden states at a layer boundary, in chunks of whole blocks.
pub struct Activations<B: QuantBackend> {
    pub chunks: Vec<Tensor<B, 3>>,
}

impl<B: QuantBackend> Activations<B> {
    /// Embeds `calib` on the host (the embedding is needed only here, so it never goes to the
    /// device) into chunks of `chunk_blocks` blocks.
    fn embed(
        src: &dyn TensorSource,
        calib: &[Vec<u32>],
        chunk_blocks: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let config = src.config();
        let (vocab, h) = (config.vocab_size, config.hidden_size);
        let table = load_host(src, "model.embed_tokens.weight", &[vocab, h])?;
        let seqlen = calib[0].len();
        let chunks = calib
            .chunks(chunk_blocks)
            .map(|blocks| {
                let mut x = Vec::with_capacity(blocks.len() * seqlen * h);
                for &t in blocks.iter().flatten() {
                    let row = t as usize;
                    if row >= vocab {
                        return Err(AdadimError::Invalid(format!(
                            "calibration token {t} is outside the model's vocabulary of {vocab}"
                        )));
                    }
                    x.extend_from_slice(&table[row * h..(row + 1) * h]);
                }
                Ok(Tensor::from_data(
                    TensorData::new(x, [blocks.len(), seqlen, h]),
                    device,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { chunks })
    }

    /// Rebuilds saved activations (`[blocks, seqlen, hidden]` row-major) in chunks.
    pub fn from_host(
        data: &[f32],
        [blocks, seqlen, hidden]: [usize; 3],
        chunk_blocks: usize,
        device: &B::Device,
    ) -> Self {
        let block_len = seqlen * hidden;
        let chunks = data[..blocks * block_len]
            .chunks(chunk_blocks * block_len)
            .map(|c| {
                let n = c.len() / block_len;
                Tensor::from_data(TensorData::new(c.to_vec(), [n, seqlen, hidden]), device)
            })
            .collect();
        Self { chunks }
    }

    /// Every chunk's values on the host, in order (for saving a resumable run).
    pub fn for_each_host_chunk(&self, mut f: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        self.chunks
            .iter()
            .try_for_each(|c| B::with_host_values(c, &mut f))
    }
}

/// Where a run resumes: the first layer still to do and its input activations.
pub struct ResumePoint<B: QuantBackend> {
    pub layer: usize,
    pub input: Activations<B>,
}

/// A finished decoder layer: what the checkpoint stores of it, and what happened to it.
pub struct FinishedLayer {
    /// The packed linears, in checkpoint order.
    pub linears: Vec<(String, PackedLinear)>,
    /// The two norm weights by tensor name: the source's, or with AWQ the folded ones.
    pub norms: Vec<(String, Vec<f32>)>,
    pub records: Vec<LinearRecord>,
}

/// Receives each layer as it finishes, in order.
pub trait LayerSink<B: QuantBackend> {
    /// Layer `index` is done, and `next_input` is the calibration activations the next layer
    /// starts from.
    fn layer_done(
        &mut self,
        index: usize,
        layer: FinishedLayer,
        next_input: &Activations<B>,
    ) -> Result<()>;
}

/// The result of a run kept in memory: every linear packed, in checkpoint order, and what was
/// done to it. For small models and tests; [`quantize_layers`] streams instead.
pub struct QuantizedModel {
    pub quantization: QuantizationConfig,
    pub linears: Vec<(String, PackedLinear)>,
    /// Every layer's norm weights (see [`FinishedLayer::norms`]).
    pub norms: Vec<(String, Vec<f32>)>,
    pub records: Vec<LinearRecord>,
}

pub(crate) fn quant_err(context: String) -> impl FnOnce(quant_core::QuantError) -> AdadimError {
    move |source| AdadimError::Quant { context, source }
}

fn upload<B: QuantBackend>(w: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Linear<B> {
    Linear::from_host_weight(&w, shape, device)
}

fn progress(len: usize, template: &str) -> ProgressBar {
    ProgressBar::new(len as u64)
        .with_style(ProgressStyle::with_template(template).expect("valid template"))
}

/// Checks the calibration blocks: non-empty, all of one length.
pub fn calibration_seqlen(calib: &[Vec<u32>]) -> Result<usize> {
    let seqlen = calib.first().map_or(0, Vec::len);
    if seqlen == 0 || calib.iter().any(|b| b.len() != seqlen) {
        return Err(AdadimError::EmptyCalibration(
            "calibration blocks must be non-empty and of equal length".into(),
        ));
    }
    Ok(seqlen)
}

/// Quantizes every linear of `src` into memory (see [`quantize_layers`]).
pub fn quantize_model<B: QuantBackend>(
    src: &dyn TensorSource,
    calib: &[Vec<u32>],
    opts: &QuantizeOptions,
    device: &B::Device,
) -> Result<QuantizedModel> {
    struct Collect(Vec<FinishedLayer>);
    impl<B: QuantBackend> LayerSink<B> for Collect {
        fn layer_done(&mut self, _: usize, layer: FinishedLayer, _: &Activations<B>) -> Result<()> {
            self.0.push(layer);
            Ok(())
        }
    }
    let mut sink = Collect(Vec::new());
    let plan = opts.memory_plan::<B>(
        src.config(),
        calib.len(),
        calibration_seqlen(calib)?,
        device,
    )?;
    quantize_layers::<B>(src, calib, opts, plan, None, device, &mut sink)?;
    let (mut linears, mut norms, mut records) = (Vec::new(), Vec::new(), Vec::new());
    for layer in sink.0 {
        linears.extend(layer.linears);
        norms.extend(layer.norms);
        records.extend(layer.records);
    }
    let dims = linears.iter().map(|(m, p)| (m.clone(), p.dim)).collect();
    Ok(QuantizedModel {
        quantization: opts.quantization_config(dims),
        linears,
        norms,
        records,
    })
}

/// Quantizes every linear of `src`, layer by layer on `device` (from `resume.layer` on, when
/// given), holding the calibration data as `plan` says, handing each finished layer to `sink`.
pub fn quantize_layers<B: QuantBackend>(
    src: &dyn TensorSource,
    calib: &[Vec<u32>],
    opts: &QuantizeOptions,
    plan: MemoryPlan,
    resume: Option<ResumePoint<B>>,
    device: &B::Device,
    sink: &mut dyn LayerSink<B>,
) -> Result<()> {
    let config = src.config().clone();
    config
        .validate()
        .map_err(|msg| model_llama::ModelError::malformed(src.path(), msg))?;
    let base = opts.validate(&config)?;
    let seqlen = calibration_seqlen(calib)?;
    if (plan.blocks, plan.seqlen) != (calib.len(), seqlen) {
        return Err(AdadimError::Invalid(format!(
            "the memory plan is for {} blocks of {} tokens, the calibration set has {} of {seqlen}",
            plan.blocks,
            plan.seqlen,
            calib.len()
        )));
    }
    // Before any work: past a buffer limit a CubeCL allocation fails far from its cause.
    crate::memory::check_device(&config, &plan, &B::device_limits(device))?;
    if let Some(free) = crate::memory::available().filter(|&free| free < plan.peak) {
        tracing::warn!(
            "the run is predicted to peak at {}, more than the {} available now",
            gib(plan.peak),
            gib(free)
        );
    }
    tracing::info!(
        predicted_peak = %gib(plan.peak),
        limit = %gib(plan.limit),
        resident = plan.resident,
        chunk_blocks = plan.chunk_blocks,
        "memory plan"
    );
    let (first, mut x) = match resume {
        Some(r) => (r.layer, r.input),
        None => (
            0,
            Activations::embed(src, calib, plan.chunk_blocks, device)?,
        ),
    };
    let rope = Rope::new(&config, seqlen, device);
    let layers = config.num_hidden_layers;
    let bar = progress(
        (layers - first) * LinearKind::ALL.len(),
        "quantize {bar:30} {pos}/{len} linears  {msg}  {elapsed} (eta {eta})",
    );
    let run = LayerRun {
        src,
        opts,
        base,
        plan,
        rope: &rope,
        blocks: calib.len(),
        device,
        bar: &bar,
    };
    for i in first..layers {
        let (finished, next) = run.layer(i, x)?;
        tracing::info!(
            layer = i,
            ic = (finished.records.iter())
                .filter(|r| r.dim == QuantDim::Ic)
                .count(),
            "layer done"
        );
        sink.layer_done(i, finished, &next)?;
        x = next;
    }
    bar.finish_and_clear();
    Ok(())
}

/// What one layer's quantization reads.
struct LayerRun<'a, B: QuantBackend> {
    src: &'a dyn TensorSource,
    opts: &'a QuantizeOptions,
    base: QuantConfig,
    plan: MemoryPlan,
    rope: &'a Rope<B>,
    blocks: usize,
    device: &'a B::Device,
    bar: &'a ProgressBar,
}

/// One chunk of a layer's calibration data.
struct Chunk<B: QuantBackend> {
    tokens: usize,
    inputs: SubBlockInputs<B>,
    /// Kept when the plan is resident: every full-precision input, and the sub-blocks' current
    /// state (AdaDim only).
    resident: Option<Resident<B>>,
}

struct Resident<B: QuantBackend> {
    inputs: LayerInputs<B>,
    state: Option<ChunkState<B>>,
}

/// A candidate's error and, on resident chunks, the states it leads to.
struct Scored<B: QuantBackend> {
    error: ErrorSum,
    updates: Vec<Option<Update<B>>>,
}

/// The output errors of a linear's OC and IC candidates.
#[derive(Clone, Copy, Debug, Default)]
struct DimErrors {
    oc: Option<f64>,
    ic: Option<f64>,
}

impl DimErrors {
    fn set(&mut self, dim: QuantDim, error: f64) {
        match dim {
            QuantDim::Oc => self.oc = Some(error),
            QuantDim::Ic => self.ic = Some(error),
        }
    }
}

/// The dim chosen for a linear, with the winning candidate when candidates were scored.
struct Choice<B: QuantBackend> {
    dim: QuantDim,
    scored: Option<Winner<B>>,
    errors: DimErrors,
}

/// A quantized linear: its packed weight, its layer, the chunk states it leads to (when it was
/// scored against them) and GPTQ's loss (when solved).
struct Winner<B: QuantBackend> {
    packed: PackedLinear,
    linear: Linear<B>,
    updates: Vec<Option<Update<B>>>,
    gptq_loss: Option<f64>,
}

impl<B: QuantBackend> Winner<B> {
    fn new(
        quantized: Quantized,
        gptq_loss: Option<f64>,
        t: &Target<'_>,
        device: &B::Device,
    ) -> Self {
        // Packed once: what is uploaded, scored and written is this one form.
        let packed = quantized.pack();
        Self {
            linear: upload::<B>(packed.dequantize(), t.shape, device),
            packed,
            updates: Vec::new(),
            gptq_loss,
        }
    }
}

type LayerOutput<B> = (FinishedLayer, Activations<B>);

/// A linear being quantized: its kind, module path and full-precision weight.
struct Target<'w> {
    kind: LinearKind,
    module: String,
    shape: [usize; 2],
    w: &'w [f32],
}

impl<B: QuantBackend> LayerRun<'_, B> {
    /// Quantizes layer `i` whose calibration input is `x`.
    fn layer(&self, i: usize, x: Activations<B>) -> Result<LayerOutput<B>> {
        let mut layer = load_layer::<B>(self.src, i, self.device)?;
        let mut folded = if self.opts.method.folds_awq() {
            let sample = awq_sample(&x, self.plan.seqlen);
            let f = awq::fold_layer(
                self.src,
                i,
                &mut layer,
                sample,
                self.rope,
                self.base,
                self.device,
            )?;
            Some(f)
        } else {
            None
        };
        let o_gram = if self.opts.policy.is_adaptive() {
            o_proj_gram(&layer, self.opts.scoring)
        } else {
            None
        };
        let mut stats = InputStats::new(self.blocks);
        let (mut chunks, carried) = self.forward(&layer, x, &mut stats);
        let mut linears = Vec::new();
        let mut records = Vec::new();
        for kind in LinearKind::ALL {
            self.bar
                .set_message(format!("layer {i} {}", kind.short_name()));
            let t0 = Instant::now();
            let module = kind.hf_prefix(i);
            let w = match &mut folded {
                Some(f) => f.take(kind),
                None => self.src.load(&format!("{module}.weight"))?.data,
            };
            let target = Target {
                kind,
                shape: linear_shape(self.src.config(), kind),
                module,
                w: &w,
            };
            let choice = self.choose(&layer, &chunks, &mut stats, &target, o_gram.as_ref())?;
            let (dim, errors) = (choice.dim, choice.errors);
            let (packed, linear, gptq_loss) =
                self.commit(&layer, &mut chunks, &mut stats, &target, choice)?;
            *layer.linear_mut(kind) = linear;
            if Site::is_last_reader(kind) {
                stats.release(Site::of(kind));
            }
            linears.push((target.module, packed));
            let record = LinearRecord {
                layer: i,
                linear: kind,
                dim,
                error_oc: errors.oc,
                error_ic: errors.ic,
                gptq_loss,
                seconds: t0.elapsed().as_secs_f64(),
            };
            tracing::debug!(?record, "linear quantized");
            records.push(record);
            self.bar.inc(1);
        }
        let next = match self.opts.propagate {
            Propagate::Fp => carried,
            Propagate::Quantized => Activations {
                chunks: (carried.chunks.into_iter())
                    .map(|x| layer.forward(x, self.rope, None))
                    .collect(),
            },
        };
        let norms = match folded {
            Some(f) => f.norms,
            None => awq::layer_norms(self.src, i)?,
        };
        let finished = FinishedLayer {
            linears,
            norms,
            records,
        };
        Ok((finished, next))
    }

    /// The layer's full-precision forward over every chunk: what the plan keeps of each chunk,
    /// and what the next layer's input is made from: this forward's output, or with quantized
    /// propagation this layer's input, for the quantized layer to run on at the end (the
    /// same memory either way). Streaming plans sum the Gram matrices they need here, since
    /// the inputs are not kept.
    fn forward(
        &self,
        layer: &DecoderLayer<B>,
        x: Activations<B>,
        stats: &mut InputStats<B>,
    ) -> (Vec<Chunk<B>>, Activations<B>) {
        let adaptive = self.opts.policy.is_adaptive();
        let streamed: &[Site] = match (self.plan.resident, self.opts.method.solves_gptq(), adaptive)
        {
            (true, _, _) => &[],
            (false, true, _) => &Site::ALL,
            (false, false, true) => &[Site::Context, Site::Gated],
            (false, false, false) => &[],
        };
        let mut chunks = Vec::with_capacity(x.chunks.len());
        let mut next = Vec::with_capacity(x.chunks.len());
        for x_c in x.chunks {
            let [blocks, t, _] = x_c.dims();
            let input = (self.opts.propagate == Propagate::Quantized).then(|| x_c.clone());
            let (out, trace) = layer.forward_captured(x_c, self.rope);
            for &site in streamed {
                stats.accumulate(site, site.input(&trace.inputs));
            }
            // GPTQ weighs its searched ranges by its Hessian's diagonal instead.
            if self.opts.range == RangeMode::Search && !self.opts.method.solves_gptq() {
                for site in Site::ALL {
                    stats.accumulate_moments(site, site.input(&trace.inputs));
                }
            }
            chunks.push(Chunk {
                tokens: blocks * t,
                inputs: SubBlockInputs::of(&trace.inputs),
                resident: self.plan.resident.then(|| Resident {
                    state: adaptive.then(|| ChunkState::from_trace(&trace)),
                    inputs: trace.inputs.clone(),
                }),
            });
            next.push(input.unwrap_or(out));
        }
        (chunks, Activations { chunks: next })
    }

    /// RTN of `t` in `dim`; `moments` are its inputs' `E[x²]` when ranges are searched.
    fn rtn(&self, t: &Target<'_>, dim: QuantDim, moments: Option<&[f32]>) -> Result<Quantized> {
        let [out, inp] = t.shape;
        let config = self.base.with_dim(dim);
        quant_core::quantize_rtn_with(t.w, out, inp, config, self.opts.range, moments)
            .map_err(quant_err(format!("{} ({dim})", t.module)))
    }

    /// GPTQ of `t` in `dim` against its site's Hessian, and GPTQ's loss.
    fn gptq(
        &self,
        chunks: &[Chunk<B>],
        stats: &mut InputStats<B>,
        t: &Target<'_>,
        dim: QuantDim,
    ) -> Result<(Quantized, f64)> {
        let site = Site::of(t.kind);
        let h = stats.hessian(site, || resident_input(chunks, site))?;
        let options = GptqOptions {
            range: self.opts.range,
            refit: self.opts.refit,
            ..self.opts.gptq
        };
        let [out, inp] = t.shape;
        let result = quant_core::gptq(t.w, out, inp, h, self.base.with_dim(dim), options)
            .map_err(quant_err(format!("GPTQ of {} ({dim})", t.module)))?;
        Ok((result.quantized, result.loss as f64))
    }

    /// `t` quantized in `dim` by the run's method.
    fn quantize(
        &self,
        chunks: &[Chunk<B>],
        stats: &mut InputStats<B>,
        t: &Target<'_>,
        dim: QuantDim,
    ) -> Result<Winner<B>> {
        let (q, loss) = if self.opts.method.solves_gptq() {
            let (q, loss) = self.gptq(chunks, stats, t, dim)?;
            (q, Some(loss))
        } else {
            let moments = stats.moments(Site::of(t.kind));
            (self.rtn(t, dim, moments.as_deref())?, None)
        };
        Ok(Winner::new(q, loss, t, self.device))
    }

    /// Whether the scored candidates are the method's own result (RTN, or GPTQ-scored GPTQ),
    /// so the winner is kept instead of quantized again in its dim.
    fn candidates_are_final(&self) -> bool {
        !self.opts.method.solves_gptq() || self.opts.score == Score::Gptq
    }

    /// The dim of `t`: AdaDim scores a candidate of each dim (RTN's, or with `--score gptq`
    /// GPTQ's); fixed policies have one.
    fn choose(
        &self,
        layer: &DecoderLayer<B>,
        chunks: &[Chunk<B>],
        stats: &mut InputStats<B>,
        t: &Target<'_>,
        o_gram: Option<&Tensor<B, 2>>,
    ) -> Result<Choice<B>> {
        let dims = self.opts.policy.candidates(t.kind);
        if !self.opts.policy.is_adaptive() {
            return Ok(Choice {
                dim: dims[0],
                scored: None,
                errors: DimErrors::default(),
            });
        }
        let moments = stats.moments(Site::of(t.kind));
        let mut candidates = Vec::with_capacity(dims.len());
        for &dim in &dims {
            let candidate = match self.opts.score {
                Score::Rtn => {
                    Winner::new(self.rtn(t, dim, moments.as_deref())?, None, t, self.device)
                }
                Score::Gptq => self.quantize(chunks, stats, t, dim)?,
            };
            candidates.push((dim, candidate));
        }
        let linears: Vec<&Linear<B>> = candidates.iter().map(|c| &c.1.linear).collect();
        let scored = if carries(t.kind) {
            self.score_sub_block(layer, chunks, t.kind, &linears, o_gram)
        } else if self.opts.score == Score::Gptq {
            let packed: Vec<&PackedLinear> = candidates.iter().map(|c| &c.1.packed).collect();
            self.score_solved_own_output(chunks, stats, t, &packed)?
        } else {
            self.score_own_output(layer, chunks, stats, t, &linears)
        };
        let mut errors = DimErrors::default();
        let mut best: Option<(f64, Choice<B>)> = None;
        for ((dim, candidate), s) in candidates.into_iter().zip(scored) {
            let error = s.error.mean();
            errors.set(dim, error);
            // Ties keep the earlier candidate (OC).
            if best.as_ref().is_none_or(|b| error < b.0) {
                let scored = Some(Winner {
                    updates: s.updates,
                    ..candidate
                });
                best = Some((
                    error,
                    Choice {
                        dim,
                        scored,
                        errors,
                    },
                ));
            }
        }
        let (_, choice) = best.expect("at least one candidate");
        Ok(Choice { errors, ..choice })
    }

    /// q, k, v, gate and up: the error of each candidate on their sub-block's output, chunk by
    /// chunk, against each chunk's current state (kept, or recomputed once per chunk).
    fn score_sub_block(
        &self,
        layer: &DecoderLayer<B>,
        chunks: &[Chunk<B>],
        kind: LinearKind,
        candidates: &[&Linear<B>],
        o_gram: Option<&Tensor<B, 2>>,
    ) -> Vec<Scored<B>> {
        let forms = self.opts.scoring;
        let mut scored: Vec<Scored<B>> = candidates
            .iter()
            .map(|_| Scored {
                error: ErrorSum::default(),
                updates: Vec::with_capacity(chunks.len()),
            })
            .collect();
        for chunk in chunks {
            let inputs = &chunk.inputs;
            let kept = chunk.resident.as_ref().and_then(|r| r.state.as_ref());
            let attn = matches!(kind, LinearKind::Q | LinearKind::K | LinearKind::V);
            let recomputed_attn = (kept.is_none() && attn)
                .then(|| AttnState::compute(layer, inputs.attn_in.clone(), self.rope));
            let recomputed_mlp =
                (kept.is_none() && !attn).then(|| MlpState::compute(layer, inputs.mlp_in.clone()));
            for (s, &c) in scored.iter_mut().zip(candidates) {
                let (error, update) = match (kept, &recomputed_attn, &recomputed_mlp) {
                    (Some(state), _, _) => {
                        let (e, u) = sub_block_error(
                            layer, state, inputs, self.rope, kind, c, o_gram, forms,
                        );
                        (e, Some(u))
                    }
                    (None, Some(state), _) => {
                        let (e, _) = attn_error(
                            layer,
                            state,
                            &inputs.attn_in,
                            self.rope,
                            kind,
                            c,
                            o_gram,
                            forms,
                        );
                        (e, None)
                    }
                    (None, None, Some(state)) => (
                        mlp_error(layer, state, &inputs.mlp_in, kind, c, forms).0,
                        None,
                    ),
                    (None, None, None) => unreachable!("a state is kept or recomputed"),
                };
                s.error.add(error, chunk.tokens);
                s.updates.push(update);
            }
        }
        scored
    }

    /// o and down: the error of each candidate on its own output, through the Gram matrix of
    /// its input where that is cheaper (and always when streaming, which keeps no inputs).
    fn score_own_output(
        &self,
        layer: &DecoderLayer<B>,
        chunks: &[Chunk<B>],
        stats: &mut InputStats<B>,
        t: &Target<'_>,
        candidates: &[&Linear<B>],
    ) -> Vec<Scored<B>> {
        let site = Site::of(t.kind);
        let by_gram = !self.plan.resident
            || self.opts.method.solves_gptq()
            || (self.opts.scoring).gram(crate::score::gram_is_cheaper(t.shape, candidates.len()));
        let tokens: usize = chunks.iter().map(|c| c.tokens).sum();
        let gram = by_gram.then(|| stats.gram_or(site, || resident_input(chunks, site)));
        candidates
            .iter()
            .map(|&c| {
                let delta = delta_t(layer.linear(t.kind), c);
                let mut error = ErrorSum::default();
                match gram {
                    Some(g) => error.add(own_output_error_gram(&delta, g, tokens), tokens),
                    None => {
                        for chunk in chunks {
                            let x = site.input(&resident(chunk).inputs);
                            let e = if self.opts.scoring.difference() {
                                own_output_error_direct(&delta, x)
                            } else {
                                own_output_error_undifferenced(layer.linear(t.kind), c, x)
                            };
                            error.add(e, chunk.tokens);
                        }
                    }
                }
                Scored {
                    error,
                    updates: Vec::new(),
                }
            })
            .collect()
    }

    /// o and down, GPTQ-scored: each solved candidate's error on its own output, through the
    /// site's Hessian (which has taken the place of its Gram matrix).
    fn score_solved_own_output(
        &self,
        chunks: &[Chunk<B>],
        stats: &mut InputStats<B>,
        t: &Target<'_>,
        candidates: &[&PackedLinear],
    ) -> Result<Vec<Scored<B>>> {
        let site = Site::of(t.kind);
        let h = stats.hessian(site, || resident_input(chunks, site))?;
        let tokens: usize = chunks.iter().map(|c| c.tokens).sum();
        let [out, _] = t.shape;
        candidates
            .iter()
            .map(|p| {
                let delta: Vec<f32> = (t.w.iter().zip(p.dequantize()))
                    .map(|(w, q)| w - q)
                    .collect();
                let sum = h
                    .output_error(&delta, out)
                    .map_err(quant_err(format!("output error of {}", t.module)))?;
                // H = (2/N)·XᵀX, so N/2 of it is the summed square over every token.
                let mean = sum * h.nsamples() as f64 / 2.0 / (tokens * out) as f64;
                let mut error = ErrorSum::default();
                error.add(mean, tokens);
                Ok(Scored {
                    error,
                    updates: Vec::new(),
                })
            })
            .collect()
    }

    /// Quantizes `t` in the chosen dim (the scored candidate when it is the method's result;
    /// otherwise GPTQ solved against the site's Hessian) and makes it part of the chunks' kept
    /// states.
    fn commit(
        &self,
        layer: &DecoderLayer<B>,
        chunks: &mut [Chunk<B>],
        stats: &mut InputStats<B>,
        t: &Target<'_>,
        choice: Choice<B>,
    ) -> Result<(PackedLinear, Linear<B>, Option<f64>)> {
        let winner = match choice.scored {
            Some(winner) if self.candidates_are_final() => winner,
            _ => self.quantize(chunks, stats, t, choice.dim)?,
        };
        if winner.updates.is_empty() {
            // A weight not scored against the kept states replaces the RTN candidate in them
            // (greedy).
            for Chunk {
                inputs, resident, ..
            } in chunks.iter_mut()
            {
                if let Some(Resident { state: Some(s), .. }) = resident {
                    s.adopt(layer, inputs, self.rope, t.kind, &winner.linear);
                }
            }
        }
        for (chunk, update) in chunks.iter_mut().zip(winner.updates) {
            if let (Some(Resident { state: Some(s), .. }), Some(u)) = (&mut chunk.resident, update)
            {
                s.apply(t.kind, u);
            }
        }
        Ok((winner.packed, winner.linear, winner.gptq_loss))
    }
}

/// The calibration blocks AWQ's scales are searched on: whole blocks from the start of the
/// first chunk, about [`awq::SEARCH_TOKENS`] tokens.
fn awq_sample<B: QuantBackend>(x: &Activations<B>, seqlen: usize) -> Tensor<B, 3> {
    let first = &x.chunks[0];
    let blocks = (awq::SEARCH_TOKENS / seqlen).clamp(1, first.dims()[0]);
    first.clone().narrow(0, 0, blocks)
}

fn resident<B: QuantBackend>(chunk: &Chunk<B>) -> &Resident<B> {
    chunk
        .resident
        .as_ref()
        .expect("inputs are read back only when the plan keeps them")
}

/// The whole input of `site` from resident chunks (no copy when there is one chunk).
fn resident_input<B: QuantBackend>(chunks: &[Chunk<B>], site: Site) -> Tensor<B, 3> {
    let mut parts: Vec<Tensor<B, 3>> = chunks
        .iter()
        .map(|c| site.input(&resident(c).inputs).clone())
        .collect();
    if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(parts, 0)
    }
}
