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

impl MemorySource {
    /// A model of `config` with seeded random weights (uniform, linears scaled by
    /// `1/sqrt(in_features)`, norms near 1): for tests and examples that need a real forward pass.
    pub fn random(config: LlamaConfig, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = std::collections::HashMap::new();
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            tensors.insert(name, HostTensor::new(shape, data));
        };
        let h = config.hidden_size;
        put(
            "model.embed_tokens.weight".into(),
            vec![config.vocab_size, h],
            1.0,
            0.0,
        );
        put("model.norm.weight".into(), vec![h], 0.2, 1.0);
        for i in 0..config.num_hidden_layers {
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                put(format!("model.layers.{i}.{norm}.weight"), vec![h], 0.2, 1.0);
            }
            for kind in crate::linear_kind::LinearKind::ALL {
                let shape = crate::linear_kind::linear_shape(&config, kind);
                let scale = 1.5 / (shape[1] as f32).sqrt();
                put(
                    format!("{}.weight", kind.hf_prefix(i)),
                    shape.to_vec(),
                    scale,
                    0.0,
                );
            }
        }
        Self {
            path: "random".into(),
            config,
            tensors,
        }
    }
}
