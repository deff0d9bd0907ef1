//! Writing Hugging Face directories (`config.json` + `model.safetensors`).

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use safetensors::tensor::{Dtype, View};

use crate::checkpoint::TensorSource;
use crate::error::{ModelError, Result};
use crate::model::LinearKind;
use crate::staging::{StagingDir, write_atomic};

/// A tensor ready to be serialized: dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(shape: Vec<usize>, data: &[f32]) -> Self {
        Self::from_pod(Dtype::F32, shape, data)
    }

    /// Rounds to f16.
    pub fn f16_from_f32(shape: Vec<usize>, data: &[f32]) -> Self {
        let halves: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        Self::from_pod(Dtype::F16, shape, &halves)
    }

    pub fn from_pod<T: bytemuck::Pod>(dtype: Dtype, shape: Vec<usize>, data: &[T]) -> Self {
        Self {
            dtype,
            shape,
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Serializes `tensors` into `path` atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, OwnedTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| ModelError::Invalid(format!("{}: cannot serialize: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Every tensor name of a dense LLaMA checkpoint, in file order.
pub fn hf_tensor_names(src: &dyn TensorSource) -> Vec<String> {
    let config = src.config();
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..config.num_hidden_layers {
        names.push(format!("model.layers.{i}.input_layernorm.weight"));
        names.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
        for kind in LinearKind::ALL {
            names.push(format!("{}.weight", kind.hf_prefix(i)));
        }
    }
    names.push("model.norm.weight".into());
    if src.contains("lm_head.weight") && !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    names
}

/// Stages an HF directory holding `config_json` and `model.safetensors` with `tensors`.
/// The caller may add files (e.g. `tokenizer.json`) before [`StagingDir::commit`].
pub fn stage_hf_dir(
    out: &Path,
    config_json: &serde_json::Value,
    tensors: &[(String, OwnedTensor)],
) -> Result<StagingDir> {
    let staging = StagingDir::new(out)?;
    let config_bytes = serde_json::to_vec_pretty(config_json).expect("json serializes");
    write_atomic(&staging.join("config.json"), &config_bytes)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&staging.join("model.safetensors"), tensors, Some(meta))?;
    Ok(staging)
}

/// Every dense tensor of `src`, converted to `dtype` (F32 or F16).
pub fn dense_tensors(src: &dyn TensorSource, dtype: Dtype) -> Result<Vec<(String, OwnedTensor)>> {
    hf_tensor_names(src)
        .into_iter()
        .map(|name| {
            let t = src.load(&name)?;
            let owned = match dtype {
                Dtype::F16 => OwnedTensor::f16_from_f32(t.shape, &t.data),
                _ => OwnedTensor::f32(t.shape, &t.data),
            };
            Ok((name, owned))
        })
        .collect()
}

/// Writes `model` as a Hugging Face directory: `config.json`, f32 `model.safetensors` and
/// `tokenizer.json` (the GGUF → HF converter).
pub fn write_hf_dir(model: &crate::OpenModel, out: &Path) -> Result<std::path::PathBuf> {
    let src = model.source.as_ref();
    let tensors = dense_tensors(src, Dtype::F32)?;
    let staging = stage_hf_dir(out, &src.config().to_hf_json(), &tensors)?;
    model.tokenizer.save(&staging.join("tokenizer.json"))?;
    staging.commit()
}
