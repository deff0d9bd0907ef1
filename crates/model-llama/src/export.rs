//! Writing Hugging Face directories (`config.json`, safetensors shards, `tokenizer.json` and
//! `tokenizer_config.json`).

use std::path::{Path, PathBuf};

use half::f16;
use safetensors::tensor::Dtype;

use crate::checkpoint::TensorSource;
use crate::error::Result;
use crate::linear_kind::LinearKind;
use crate::shards::ShardWriter;
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

    /// Appends the tensor to `writer` under `name`.
    pub fn write_to(&self, writer: &mut ShardWriter, name: &str) -> Result<()> {
        writer.add(name, self.dtype, &self.shape, &self.bytes, &[])
    }
}

/// Largest shard of the checkpoints this project writes, as Hugging Face's `save_pretrained`
/// shards (theirs default to a few GB; 2 GB keeps a shard's pages cheap to release).
pub const MAX_SHARD_BYTES: u64 = 2_000_000_000;

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

/// Writes `config.json` into `dir`.
pub fn write_config(dir: &Path, config_json: &serde_json::Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(config_json).expect("json serializes");
    write_atomic(&dir.join("config.json"), &bytes)
}

/// Writes `model` as a Hugging Face directory: `config.json`, f32 safetensors (sharded like
/// Hugging Face's) and `tokenizer.json` (the GGUF → HF converter). Tensors stream one at a
/// time, so a model of any size converts in the memory of its largest tensor.
pub fn write_hf_dir(model: &crate::OpenModel, out: &Path, overwrite: bool) -> Result<PathBuf> {
    let src = model.source.as_ref();
    let staging = StagingDir::new(out, overwrite)?;
    let mut writer = ShardWriter::new(staging.path(), MAX_SHARD_BYTES)?;
    for name in hf_tensor_names(src) {
        let t = src.load(&name)?;
        OwnedTensor::f32(t.shape, &t.data).write_to(&mut writer, &name)?;
    }
    writer.finish()?;
    write_config(staging.path(), &src.config().to_hf_json())?;
    model.tokenizer.save(&staging.join("tokenizer.json"))?;
    model
        .tokenizer
        .save_config(&staging.join("tokenizer_config.json"))?;
    staging.commit()
}
