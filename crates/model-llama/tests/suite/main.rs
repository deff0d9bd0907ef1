//! model-llama's integration tests (`fuzz_loaders` stays apart: it installs a counting global allocator).
//!
//! One test binary for the crate's integration tests: each file below was its own binary,
//! and each linked and compiled the same generic model code again.

#[path = "../gguf_support/mod.rs"]
mod gguf_support;

mod convert_roundtrip;
mod gguf_dequant;
mod gguf_reader;
mod gguf_smollm2;
mod layer_major;
mod model_reference;
mod real_model;
mod tokenizer_smollm2;
