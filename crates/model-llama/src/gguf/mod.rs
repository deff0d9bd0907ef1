//! GGUF (llama.cpp's format): the container, dequantization, and a LLaMA checkpoint adapter.
//!
//! - [`reader`]: parses a memory-mapped GGUF v2/v3 file ([`GgufFile`]); every length and count
//!   in it is validated against the file size, so corrupt files give `Malformed` errors.
//! - [`dequant`]: ggml tensor types and their conversion to f32 (F32, F16, BF16, Q8_0, Q4_0,
//!   Q4_1, Q5_0, Q5_1), parallel over blocks.
//! - [`checkpoint`]: [`GgufCheckpoint`], a [`TensorSource`](crate::TensorSource) under Hugging
//!   Face names, with llama.cpp's rotary permutation of Q/K rows undone so the weights are
//!   exactly the HF ones, and the config built from the `llama.*` metadata.

pub mod checkpoint;
pub mod dequant;
pub mod reader;

pub use checkpoint::{GgufCheckpoint, config_from_gguf, gguf_name, unpermute_rotary_rows};
pub use dequant::{DequantError, GgmlType, dequantize};
pub use reader::{GgufFile, GgufTensorInfo, GgufValue};
