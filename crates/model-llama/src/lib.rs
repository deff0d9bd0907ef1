//! LLaMA in Burn: configuration, checkpoint and tokenizer loading (Hugging Face safetensors
//! directories and GGUF files), the model itself with a layer-by-layer API for quantization,
//! perplexity and generation.

pub mod config;
pub mod error;

pub use config::{LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub mod checkpoint;

pub use checkpoint::{HostTensor, MemorySource, TensorSource};
pub mod model;

pub use model::{DecoderLayer, LayerInputs, Linear, LinearKind, Llama};
pub mod export;
pub mod load;
pub mod hf_dir;
pub mod staging;
pub mod perplexity;
pub mod generate;
