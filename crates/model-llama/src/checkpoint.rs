//! Where weights come from: a [`TensorSource`] hands out tensors by their Hugging Face name,
//! dequantized to f32 on the host, one at a time, so a pipeline can stream a model layer by layer
//! from a memory-mapped file without materialising it whole.

use std::path::Path;

use crate::config::LlamaConfig;
use crate::error::Result;

/// A dense f32 tensor on the host, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
}

/// A checkpoint readable tensor by tensor, under Hugging Face LLaMA names
/// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
pub trait TensorSource: Send + Sync {
    /// The file or directory this source reads (for error messages).
    fn path(&self) -> &Path;
    fn config(&self) -> &LlamaConfig;
    fn contains(&self, name: &str) -> bool;
    /// Loads one tensor, dequantized to f32, in the Hugging Face layout (`[out, in]` for linears).
    fn load(&self, name: &str) -> Result<HostTensor>;
}

/// An in-memory checkpoint (tests, synthetic models, weights produced by a pipeline).
pub struct MemorySource {
    pub path: std::path::PathBuf,
    pub config: LlamaConfig,
    pub tensors: std::collections::HashMap<String, HostTensor>,
}

impl TensorSource for MemorySource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| crate::ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }
}
