//! The layer-by-layer pipeline (SPEC §4): calibration activations propagate through the
//! full-precision model; in each decoder layer the seven linears are visited in order, their dim
//! chosen (greedily, against the layer's current partly quantized state) and quantized.
//!
//! Only one decoder layer's weights are on the device at a time: they stream from the checkpoint.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Instant;

use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::QuantBackend;
use model_llama::load::{linear_shape, load_layer, load_periphery};
use model_llama::packed::QuantizationConfig;
use model_llama::{Linear, LinearKind, TensorSource};
use quant_core::{GptqOptions, Hessian, PackedLinear, QuantConfig, QuantDim, Quantized};
use serde::{Deserialize, Serialize};

use crate::error::{AdadimError, Result};
use crate::policy::DimPolicy;
use crate::score::{SubBlockState, gram, gram_is_cheaper};

/// How each linear's weights are rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Gptq,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            other => Err(format!("unknown method `{other}` (expected rtn or gptq)")),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
        })
    }
}

#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub bits: u32,
    pub group_size: i64,
    pub method: Method,
    pub policy: DimPolicy,
    pub gptq: GptqOptions,
}

impl QuantizeOptions {
    /// Checks bits, group size and policy against every linear shape of `config`, before any
    /// work is done; returns the base (per-OC) quantizer config.
    pub fn validate(&self, config: &model_llama::LlamaConfig) -> Result<QuantConfig> {
        let base = QuantConfig::new(self.bits, self.group_size, QuantDim::Oc)
            .map_err(quant_err("quantization options".into()))?;
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
}

/// What happened to one linear.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinearRecord {
    pub layer: usize,
    pub linear: LinearKind,
    pub dim: QuantDim,
    /// Output errors of the RTN candidates (AdaDim only).
    pub error_oc: Option<f64>,
    pub error_ic: Option<f64>,
    /// GPTQ's reconstruction loss (GPTQ only).
    pub gptq_loss: Option<f64>,
    pub seconds: f64,
}

/// The result of a run: every linear packed, in checkpoint order, and what was done to it.
pub struct QuantizedModel {
    pub quantization: QuantizationConfig,
    pub linears: Vec<(String, PackedLinear)>,
    pub records: Vec<LinearRecord>,
}

fn quant_err(context: String) -> impl FnOnce(quant_core::QuantError) -> AdadimError {
    move |source| AdadimError::Quant { context, source }
}

fn upload<B: QuantBackend>(w: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Linear<B> {
    Linear::from_host_weight(&w, shape, device)
}

/// GPTQ's `H = (2/N)·XᵀX` from the Gram matrix of a linear's input over `N` calibration blocks.
fn hessian<B: QuantBackend>(gram: &Tensor<B, 2>, blocks: usize) -> Result<Hessian> {
    let features = gram.dims()[0];
    let h = gram
        .clone()
        .mul_scalar(2.0 / blocks as f64)
        .into_data()
        .into_vec::<f32>();
    h.map_err(|e| quant_core::QuantError::Backend(e.to_string()))
        .and_then(|h| Hessian::from_matrix(h, features, blocks))
        .map_err(quant_err("Hessian".into()))
}

/// Which captured input a linear reads (q, k, v share one; gate and up share one).
fn input_site(kind: LinearKind) -> u8 {
    match kind {
        LinearKind::Q | LinearKind::K | LinearKind::V => 0,
        LinearKind::O => 1,
        LinearKind::Gate | LinearKind::Up => 2,
        LinearKind::Down => 3,
    }
}

fn progress(len: usize, template: &str) -> ProgressBar {
    ProgressBar::new(len as u64)
        .with_style(ProgressStyle::with_template(template).expect("valid template"))
}

/// Quantizes every linear of `src`, layer by layer, on `device`.
pub fn quantize_model<B: QuantBackend>(
    src: &dyn TensorSource,
    calib: &[Vec<u32>],
    opts: &QuantizeOptions,
    device: &B::Device,
) -> Result<QuantizedModel> {
    let config = src.config().clone();
    let base = opts.validate(&config)?;
    let seqlen = calib.first().map_or(0, Vec::len);
    if seqlen == 0 || calib.iter().any(|b| b.len() != seqlen) {
        return Err(AdadimError::EmptyCalibration(
            "calibration blocks must be non-empty and of equal length".into(),
        ));
    }
    let periphery = load_periphery::<B>(src, device)?;
    let ids: Vec<i64> = calib.iter().flatten().map(|&t| t as i64).collect();
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [calib.len(), seqlen]), device);
    let mut x = burn::tensor::module::embedding(periphery.embed_tokens.clone(), tokens);
    let rope = periphery.rope;

    let layers = config.num_hidden_layers;
    let bar = progress(
        layers * LinearKind::ALL.len(),
        "quantize {bar:30} {pos}/{len} linears  {msg}  {elapsed} (eta {eta})",
    );
    let mut linears = Vec::new();
    let mut records = Vec::new();
    for i in 0..layers {
        let mut layer = load_layer::<B>(src, i, device)?;
        let (next, trace) = layer.forward_captured(x, &rope);
        let inputs = &trace.inputs;
        let mut state = opts
            .policy
            .is_adaptive()
            .then(|| SubBlockState::new(&trace, &layer));
        // Gram matrices (device) and Hessians (host) of the captured inputs, built on first use.
        let mut grams: HashMap<u8, Tensor<B, 2>> = HashMap::new();
        let mut hessians: HashMap<u8, Hessian> = HashMap::new();
        let blocks = calib.len();
        for kind in LinearKind::ALL {
            bar.set_message(format!("layer {i} {}", kind.short_name()));
            let t0 = Instant::now();
            let module = kind.hf_prefix(i);
            let shape = linear_shape(&config, kind);
            let w = src.load(&format!("{module}.weight"))?.data;
            let rtn = |dim| {
                quant_core::quantize_rtn(&w, shape[0], shape[1], base.with_dim(dim))
                    .map_err(quant_err(format!("{module} ({dim})")))
            };

            // AdaDim: score the RTN candidates; fixed policies have a single candidate.
            let mut chosen: Option<(QuantDim, Quantized, Linear<B>, crate::score::Scored<B>)> =
                None;
            let mut errors = [None, None];
            let needs_gram = match opts.method {
                Method::Gptq => true,
                Method::Rtn => {
                    // The two candidates share the Gram of their input.
                    state.is_some()
                        && !SubBlockState::<B>::carries(kind)
                        && gram_is_cheaper(shape, 2)
                }
            };
            let g = needs_gram.then(|| {
                grams
                    .entry(input_site(kind))
                    .or_insert_with(|| gram(inputs.of(kind)))
                    .clone()
            });
            if let Some(state) = &state {
                for dim in opts.policy.candidates(kind) {
                    let q = rtn(dim)?;
                    let lin = upload::<B>(q.pack().dequantize(), shape, device);
                    let scored = state.score(&layer, inputs, &rope, kind, &lin, g.as_ref());
                    errors[dim as usize] = Some(scored.error);
                    if chosen.as_ref().is_none_or(|c| scored.error < c.3.error) {
                        chosen = Some((dim, q, lin, scored));
                    }
                }
            }
            let dim = chosen
                .as_ref()
                .map_or_else(|| opts.policy.candidates(kind)[0], |c| c.0);

            let (packed, linear, gptq_loss) = match opts.method {
                Method::Rtn => {
                    let (q, lin) = match chosen.take() {
                        Some((_, q, lin, scored)) => {
                            if let Some(state) = &mut state {
                                state.commit(kind, scored);
                            }
                            (q, lin)
                        }
                        None => {
                            let q = rtn(dim)?;
                            let lin = upload::<B>(q.pack().dequantize(), shape, device);
                            (q, lin)
                        }
                    };
                    (q.pack(), lin, None)
                }
                Method::Gptq => {
                    let h = match hessians.entry(input_site(kind)) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => {
                            e.insert(hessian(g.as_ref().expect("GPTQ builds the Gram"), blocks)?)
                        }
                    };
                    let result =
                        quant_core::gptq(&w, shape[0], shape[1], h, base.with_dim(dim), opts.gptq)
                            .map_err(quant_err(format!("GPTQ of {module} ({dim})")))?;
                    let packed = result.quantized.pack();
                    let lin = upload::<B>(packed.dequantize(), shape, device);
                    // The GPTQ weights replace the RTN candidate in the state (greedy).
                    if let Some(state) = &mut state {
                        state.adopt(&layer, inputs, &rope, kind, &lin);
                    }
                    (packed, lin, Some(result.loss as f64))
                }
            };
            *layer.linear_mut(kind) = linear;
            linears.push((module, packed));
            let record = LinearRecord {
                layer: i,
                linear: kind,
                dim,
                error_oc: errors[QuantDim::Oc as usize],
                error_ic: errors[QuantDim::Ic as usize],
                gptq_loss,
                seconds: t0.elapsed().as_secs_f64(),
            };
            tracing::debug!(?record, "linear quantized");
            records.push(record);
            bar.inc(1);
        }
        x = next;
        tracing::info!(
            layer = i,
            ic = records
                .iter()
                .filter(|r| r.layer == i && r.dim == QuantDim::Ic)
                .count(),
            "layer done"
        );
    }
    bar.finish_and_clear();
    let dims = linears.iter().map(|(m, p)| (m.clone(), p.dim)).collect();
    Ok(QuantizedModel {
        quantization: QuantizationConfig {
            quant_method: "adadim".into(),
            algorithm: opts.method.to_string(),
            bits: opts.bits,
            group_size: opts.group_size,
            dims,
        },
        linears,
        records,
    })
}
