//! LLaMA in Burn: configuration, checkpoint and tokenizer loading (Hugging Face safetensors
//! directories, GGUF files and AdaDim packed checkpoints), the model itself with a layer-by-layer
//! API for quantization, perplexity and generation.
//!
//! * [`open::open_model`] reads any supported checkpoint as a [`TensorSource`] plus its tokenizer;
//! * [`load::load_model`] builds the Burn [`Llama`] from it, dense linears kept in f16/bf16 when
//!   lossless (or [`load::load_layer`], one layer in f32, for the quantization pipeline);
//! * [`perplexity::perplexity`] and [`generate::generate`] run it ([`pool::run_awake`] keeps
//!   rayon's threads awake through a generation or a serving step);
//!   [`OpenModel::perplexity`] evaluates a checkpoint one decoder layer at a time instead.
//!
//! [`shards::ShardWriter`] streams (resumably) a sharded safetensors checkpoint to disk;
//! [`synth`] writes random-weight checkpoints of real model shapes, for time and memory tests.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod hf_dir;
pub mod linear_kind;
pub mod load;
mod mapped;
pub mod model;
pub mod open;
pub mod packed;
pub mod perplexity;
pub mod pool;
pub mod shards;
pub mod staging;
pub mod synth;
pub mod tokenizer;

pub use checkpoint::{HostTensor, MemorySource, TensorSource};
pub use config::{LlamaConfig, RopeScaling};
pub use error::{InvalidOption, ModelError, Result};
pub use gguf::{GgufCheckpoint, GgufFile};
pub use kernels::KvDtype;
pub use linear_kind::{LinearKind, linear_shape};
pub use model::{DecoderLayer, LayerInputs, LayerTrace, Linear, Llama};
pub use open::{OpenModel, open_checkpoint, open_model};
pub use shards::{ShardState, ShardWriter};
pub use tokenizer::LlamaTokenizer;
