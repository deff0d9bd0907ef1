//! adadim's integration tests.
//!
//! One test binary for the crate's integration tests: each file below was its own binary,
//! and each linked and compiled the same generic model code again.

#[path = "../common/mod.rs"]
mod common;

mod packed_generation;
mod scores;
mod selector;
