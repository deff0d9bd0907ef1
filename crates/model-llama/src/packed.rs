//! AdaDim's packed checkpoint (docs/method.md §6): a Hugging Face directory whose linears are stored as
//! `{module}.qweight` (u32 `[rows, words_per_row]`), `{module}.scales` and `{module}.zeros`
//! (f16 `[rows, cols / group_size]`) in the grouped layout of their dim, and whose `config.json`
//! carries a `quantization_config` block:
//!
//! ```json
//! "quantization_config": {
//!   "quant_method": "adadim", "algorithm": "gptq", "bits": 3, "group_size": 64,
//!   "dims": { "model.layers.0.self_attn.q_proj": "oc", "model.layers.0.mlp.down_proj": "ic", ... }
//! }
//! ```
//! Each linear's tensors also describe themselves: the `__metadata__` of the file holding them
//! maps the module path to its [`PackedLayout`] (format version, dim, bits, group length,
//! original shape), and loading refuses a linear whose record disagrees with `config.json`.
//! Everything else (embedding, norms, an untied head) is stored densely.

use std::collections::BTreeMap;
use std::path::Path;

use kernels::{QuantBackend, QuantLinear};
use quant_core::{PackedLinear, QuantDim};
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{HostTensor, TensorSource};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::export::OwnedTensor;
use crate::hf_dir::SafetensorsDir;
use crate::load::{assemble, load_layer_with, load_periphery_with};
use crate::model::{Linear, Llama};

/// The `quantization_config` block of a packed checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// Always `"adadim"`.
    pub quant_method: String,
    /// `"rtn"` or `"gptq"`.
    pub algorithm: String,
    pub bits: u32,
    pub group_size: quant_core::GroupSize,
    /// Linear module path → its quantization dim.
    pub dims: BTreeMap<String, QuantDim>,
    /// The language-model head's own entry; absent in checkpoints that keep it dense.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadQuantization>,
    /// Symmetric linears (docs/method.md §2.2): every zero point is the centre code, which
    /// loading checks. Absent (false) in asymmetric checkpoints.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sym: bool,
}

/// Module path of the head's packed tensors (`lm_head.qweight`, `.scales`, `.zeros`).
pub const HEAD_MODULE: &str = "lm_head";

/// How the language-model head is stored (docs/method.md §6.1): per-OC groups of `group_size`
/// in `bits`, by the absmax rule ([`quant_core::quantize_q8`]). A tied checkpoint stores no
/// embedding beside it: the embedding is the dequantized head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadQuantization {
    pub bits: u32,
    pub group_size: usize,
}

impl HeadQuantization {
    /// The entry of a head packed as `p`.
    pub fn of(p: &PackedLinear) -> Self {
        Self {
            bits: p.bits,
            group_size: p.group_size,
        }
    }
}

/// Version of [`PackedLayout`]; a reader refuses any other.
pub const LAYOUT_VERSION: u32 = 1;

/// How one packed linear is laid out: stored as JSON under its module path in the
/// `__metadata__` of the shard that holds its tensors, so the tensors describe themselves, and
/// cross-checked against `config.json` when read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedLayout {
    pub format_version: u32,
    pub dim: QuantDim,
    pub bits: u32,
    /// The group length (the whole dimension when the checkpoint says -1).
    pub group_size: usize,
    /// `[out_features, in_features]` of the original weight.
    pub shape: [usize; 2],
}

impl PackedLayout {
    pub fn of(p: &PackedLinear) -> Self {
        Self {
            format_version: LAYOUT_VERSION,
            dim: p.dim,
            bits: p.bits,
            group_size: p.group_size,
            shape: [p.out_features, p.in_features],
        }
    }
}

/// The `__metadata__` entry that describes the packed linear `module`.
pub fn packed_layout_metadata(module: &str, p: &PackedLinear) -> (String, String) {
    let json = serde_json::to_string(&PackedLayout::of(p)).expect("layout serializes");
    (module.to_string(), json)
}

/// The tensors of one packed linear, named after its module path.
pub fn packed_tensors(module: &str, p: &PackedLinear) -> Vec<(String, OwnedTensor)> {
    let (rows, _) = p.rows_cols();
    let groups = p.groups_per_row();
    vec![
        (
            format!("{module}.qweight"),
            OwnedTensor::from_pod(Dtype::U32, vec![rows, p.words_per_row()], &p.qweight),
        ),
        (
            format!("{module}.scales"),
            OwnedTensor::from_pod(Dtype::F16, vec![rows, groups], &p.scales),
        ),
        (
            format!("{module}.zeros"),
            OwnedTensor::from_pod(Dtype::F16, vec![rows, groups], &p.zeros),
        ),
    ]
}

/// A packed checkpoint directory. As a [`TensorSource`] it serves linears dequantized (the
/// canonical weights, identical to the fake-quant export's before its f16 rounding).
pub struct PackedDir {
    inner: SafetensorsDir,
    quant: QuantizationConfig,
}

impl PackedDir {
    /// Opens `dir`; `Ok(None)` when it is a plain (unquantized) HF directory.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let inner = SafetensorsDir::open(dir)?;
        let Some(block) = inner.raw_config().get("quantization_config") else {
            return Ok(None);
        };
        let config_path = dir.join("config.json");
        let quant: QuantizationConfig = serde_json::from_value(block.clone()).map_err(|e| {
            ModelError::malformed(&config_path, format!("quantization_config: {e}"))
        })?;
        if quant.quant_method != "adadim" {
            return Err(ModelError::Unsupported {
                path: config_path,
                what: "quantization method",
                value: quant.quant_method,
            });
        }
        Ok(Some(Self { inner, quant }))
    }

    pub fn quantization(&self) -> &QuantizationConfig {
        &self.quant
    }

    /// The packed weight of `module` (e.g. `model.layers.0.mlp.down_proj`), validated.
    pub fn packed_linear(&self, module: &str) -> Result<PackedLinear> {
        let path = self.inner.path().to_path_buf();
        let dim = *self.quant.dims.get(module).ok_or_else(|| {
            ModelError::malformed(
                &path,
                format!("no dim for `{module}` in quantization_config"),
            )
        })?;
        let kind_shape = shape_of_module(self.inner.config(), module)
            .ok_or_else(|| ModelError::malformed(&path, format!("unknown linear `{module}`")))?;
        // The quantization settings may not fit the config's shapes: a file error, named.
        let group_size = quant_core::QuantConfig::new(self.quant.bits, self.quant.group_size, dim)
            .and_then(|c| c.check_shape(kind_shape[0], kind_shape[1]))
            .map_err(|e| ModelError::malformed(&path, format!("`{module}`: {e}")))?;
        let expected = PackedLayout {
            format_version: LAYOUT_VERSION,
            dim,
            bits: self.quant.bits,
            group_size,
            shape: kind_shape,
        };
        let p = self.read_packed(module, &expected)?;
        if self.quant.sym {
            let centre = quant_core::centre_code((1 << p.bits) - 1);
            if let Some(g) = p.zeros.iter().position(|z| z.to_f32() != centre) {
                return Err(ModelError::malformed(
                    &path,
                    format!(
                        "`{module}.zeros`: the checkpoint is symmetric, but group {g}'s zero \
                         point is {}, not the centre code {centre}",
                        p.zeros[g]
                    ),
                ));
            }
        }
        Ok(p)
    }

    /// The packed head, when the checkpoint has one ([`HeadQuantization`]), validated.
    pub fn packed_head(&self) -> Result<Option<PackedLinear>> {
        let Some(head) = self.quant.head else {
            return Ok(None);
        };
        let config = self.inner.config();
        let expected = PackedLayout {
            format_version: LAYOUT_VERSION,
            dim: QuantDim::Oc,
            bits: head.bits,
            group_size: head.group_size,
            shape: [config.vocab_size, config.hidden_size],
        };
        self.read_packed(HEAD_MODULE, &expected).map(Some)
    }

    /// Reads `module`'s packed tensors, which must have the layout `expected`.
    fn read_packed(&self, module: &str, expected: &PackedLayout) -> Result<PackedLinear> {
        let path = self.inner.path().to_path_buf();
        self.check_layout(module, expected)?;
        let qweight = self.inner.raw(&format!("{module}.qweight"))?;
        let scales = self.inner.raw(&format!("{module}.scales"))?;
        let zeros = self.inner.raw(&format!("{module}.zeros"))?;
        let check = |name: &str, dtype: Dtype, want: Dtype| {
            if dtype == want {
                Ok(())
            } else {
                Err(ModelError::malformed(
                    &path,
                    format!("`{module}.{name}` is {dtype:?}, expected {want:?}"),
                ))
            }
        };
        check("qweight", qweight.dtype, Dtype::U32)?;
        check("scales", scales.dtype, Dtype::F16)?;
        check("zeros", zeros.dtype, Dtype::F16)?;
        let p = PackedLinear {
            dim: expected.dim,
            bits: expected.bits,
            group_size: expected.group_size,
            out_features: expected.shape[0],
            in_features: expected.shape[1],
            qweight: bytemuck::pod_collect_to_vec(qweight.data),
            scales: bytemuck::pod_collect_to_vec(scales.data),
            zeros: bytemuck::pod_collect_to_vec(zeros.data),
        };
        for part in ["qweight", "scales", "zeros"] {
            self.inner.release(&format!("{module}.{part}"));
        }
        p.validate()
            .map_err(|e| ModelError::malformed(&path, format!("`{module}`: {e}")))?;
        Ok(p)
    }

    /// Whether `name` is served from the packed head: the head itself, and a tied
    /// checkpoint's embedding, which is not stored beside it.
    fn served_by_head(&self, name: &str) -> bool {
        self.quant.head.is_some()
            && (name == "lm_head.weight"
                || (name == "model.embed_tokens.weight" && !self.inner.contains(name)))
    }
}

impl PackedDir {
    /// Errors unless the layout record stored with `module`'s tensors is `expected` (what
    /// `config.json` and the model's shape say).
    fn check_layout(&self, module: &str, expected: &PackedLayout) -> Result<()> {
        let qweight = format!("{module}.qweight");
        let file = self.inner.file_of(&qweight)?;
        let malformed = |msg: String| ModelError::malformed(&file, format!("`{module}`: {msg}"));
        let json = self
            .inner
            .shard_metadata(&qweight, module)?
            .ok_or_else(|| malformed("no layout record in its file's metadata".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| malformed(format!("layout record: {e}")))?;
        let version = value.get("format_version").and_then(|v| v.as_u64());
        if version != Some(LAYOUT_VERSION as u64) {
            return Err(ModelError::Unsupported {
                path: file.clone(),
                what: "packed layout version",
                value: format!(
                    "{} (linear `{module}`; this version reads {LAYOUT_VERSION})",
                    version.map_or("missing".into(), |v| v.to_string())
                ),
            });
        }
        let stored: PackedLayout =
            serde_json::from_value(value).map_err(|e| malformed(format!("layout record: {e}")))?;
        if &stored != expected {
            return Err(malformed(format!(
                "the layout stored with the tensors ({}) disagrees with config.json and the model's shape ({})",
                serde_json::to_string(&stored).expect("serializes"),
                serde_json::to_string(expected).expect("serializes")
            )));
        }
        Ok(())
    }
}

fn shape_of_module(config: &LlamaConfig, module: &str) -> Option<[usize; 2]> {
    let (_, rest) = module.strip_prefix("model.layers.")?.split_once('.')?;
    let kind = crate::linear_kind::LinearKind::ALL
        .into_iter()
        .find(|k| k.module() == rest)?;
    Some(crate::linear_kind::linear_shape(config, kind))
}

impl TensorSource for PackedDir {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }

    fn contains(&self, name: &str) -> bool {
        if self.served_by_head(name) {
            return true;
        }
        match name.strip_suffix(".weight") {
            Some(module) if self.quant.dims.contains_key(module) => true,
            _ => self.inner.contains(name),
        }
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        if self.served_by_head(name) {
            let p = self
                .packed_head()?
                .expect("served_by_head checks the entry");
            return Ok(HostTensor::new(
                vec![p.out_features, p.in_features],
                p.dequantize(),
            ));
        }
        match name.strip_suffix(".weight") {
            Some(module) if self.quant.dims.contains_key(module) => {
                let p = self.packed_linear(module)?;
                Ok(HostTensor::new(
                    vec![p.out_features, p.in_features],
                    p.dequantize(),
                ))
            }
            _ => self.inner.load(name),
        }
    }
}

impl PackedDir {
    /// The model with every linear on its packed weight, multiplied by the backend's
    /// dequantizing kernel ([`kernels::QuantLinear`]).
    pub fn load_model<B: QuantBackend>(&self, device: &B::Device) -> Result<Llama<B>> {
        let layers = (0..self.config().num_hidden_layers)
            .map(|i| {
                load_layer_with(self, i, device, &|kind| {
                    let module = kind.hf_prefix(i);
                    let packed = self.packed_linear(&module)?;
                    let q = QuantLinear::new(&packed, device)
                        .map_err(|e| crate::load::upload_error(self.path(), &module, e))?;
                    Ok(Linear::Quant(q))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = match self.packed_head()? {
            Some(p) => Some(Linear::Quant(
                QuantLinear::new(&p, device)
                    .map_err(|e| crate::load::upload_error(self.path(), HEAD_MODULE, e))?,
            )),
            None => None,
        };
        Ok(assemble(
            self,
            load_periphery_with(self, device, head)?,
            layers,
        ))
    }
}
