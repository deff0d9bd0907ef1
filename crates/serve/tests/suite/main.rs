//! serve's integration tests.
//!
//! One test binary for the crate's integration tests: each file below was its own binary,
//! and each linked and compiled the same generic model code again.

#[path = "../support/mod.rs"]
mod support;

mod openai_client;
mod server;
