//! How much memory a run will take, and how the calibration activations are held so that it
//! fits (docs/scale.md gives the formula with figures).
//!
//! The peak depends on one decoder layer and the calibration set, never on the number of
//! layers: weights stream from the checkpoint one layer at a time and finished layers stream to
//! disk. Two ways of holding a layer's calibration data:
//!
//! * **resident**: the full-precision forward's intermediate tensors of every calibration token
//!   stay in memory while the layer's seven linears are chosen, so a candidate costs only what
//!   depends on it. About `(9h + 2kv + 6f)` floats a token.
//! * **streaming**: only the layer's input and its two sub-block inputs stay (`3h` floats a
//!   token); the sub-block states are recomputed chunk by chunk of [`STREAM_CHUNK_TOKENS`]
//!   tokens for every linear. Slower, but the calibration set costs 12 bytes per token and
//!   hidden unit.
//!
//! Resident is chosen when its peak takes at most a third of the memory limit (the rest stays
//! for the page cache, which holds the checkpoint being read, and the rest of the machine);
//! otherwise streaming.
//!
//! On a device with a largest buffer (a CubeCL backend), a chunk is also kept small enough that
//! each of its tensors fits one buffer ([`chunk_buffers`]), and the tensors that cannot be split
//! (a weight in f32, the widest Gram matrix) are checked before any work ([`check_device`]).

use kernels::{DeviceLimitError, DeviceLimits};
use model_llama::linear_shape;
use model_llama::{LinearKind, LlamaConfig};

use serde::{Deserialize, Serialize};

use crate::error::{AdadimError, Result};
use crate::options::Method;

/// Tokens per chunk when streaming: large enough for efficient products, small enough that the
/// chunk's intermediate tensors stay a fraction of a 7B model's footprint.
pub const STREAM_CHUNK_TOKENS: usize = 2048;

/// Process overhead: code, tokenizer, the checkpoint's mapped header and the tensor being read.
const BASE_BYTES: u64 = 384 << 20;

/// Allocator fragmentation and short-lived copies the terms do not list, as a fraction of the
/// rest: measured peaks on the 135M model and the 7B shape came within it.
const MARGIN: f64 = 0.10;

const F32: u64 = 4;

/// How the calibration set is held, and the peak that follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Calibration blocks, and tokens per block.
    pub blocks: usize,
    pub seqlen: usize,
    /// Calibration blocks per chunk (all of them when resident).
    pub chunk_blocks: usize,
    pub resident: bool,
    /// Predicted peak resident memory, bytes.
    pub peak: u64,
    /// The limit it was planned against, bytes.
    pub limit: u64,
}

/// The terms of the prediction, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// One layer in f32, the weight being quantized, its candidates and their uploads.
    pub weights: u64,
    /// Gram matrices, Hessians, GPTQ's work space, and a Gram being built and summed.
    pub stats: u64,
    /// Calibration activations that stay for the whole layer.
    pub activations: u64,
    /// Per-chunk intermediate tensors.
    pub chunk: u64,
    /// The embedding while the calibration tokens are embedded (before the first layer).
    pub embedding: u64,
}

impl Footprint {
    /// The peak: the larger of the embedding phase and a layer.
    pub fn peak(&self) -> u64 {
        let layer = self.weights + self.stats + self.activations + self.chunk;
        let terms = BASE_BYTES + layer.max(self.embedding + self.activations / 3);
        (terms as f64 * (1.0 + MARGIN)) as u64
    }
}

/// The footprint of quantizing a model of `config` on `blocks × seqlen` calibration tokens,
/// holding `chunk_blocks` blocks at a time (`resident`: every block's intermediates).
pub fn footprint(
    config: &LlamaConfig,
    blocks: usize,
    seqlen: usize,
    method: Method,
    resident: bool,
    chunk_blocks: usize,
) -> Footprint {
    let h = config.hidden_size as u64;
    let f = config.intermediate_size as u64;
    let kv = (config.num_key_value_heads * config.head_dim()) as u64;
    let tokens = (blocks * seqlen) as u64;
    let linears: Vec<u64> = model_llama::LinearKind::ALL
        .into_iter()
        .map(|k| {
            let [o, i] = linear_shape(config, k);
            (o * i) as u64
        })
        .collect();
    let layer: u64 = linears.iter().sum();
    let largest = linears.iter().copied().max().unwrap_or(0);
    // The loaded weight, two dequantized candidates and their transposed uploads; AWQ holds
    // the folded layer on the host beside it, and a searched group's candidates.
    let weights = F32
        * if method.folds_awq() {
            2 * layer + 4 * largest
        } else {
            layer + 4 * largest
        };
    let grams = F32 * (3 * h * h + f * f);
    // The widest Gram while it is built (its block products and the full matrix) and added to
    // the running sum (a new matrix).
    let gram_work = F32 * 5 * f.max(h).pow(2) / 2;
    let stats = gram_work
        + if method.solves_gptq() {
            // Hessians beside the Grams, and the factorisation's work space on the widest input.
            2 * grams + 3 * F32 * f.max(h).pow(2)
        } else {
            // o and down's Grams, and o_proj's `WᵀW`.
            F32 * (2 * h * h + f * f)
        };
    // Every intermediate of the forward (inputs of the four sites, q, k, v, the two sub-block
    // outputs, gate, up) plus a candidate's changed tensors.
    let per_token_state = 9 * h + 2 * kv + 6 * f;
    let (activations, chunk) = if resident {
        (F32 * tokens * (2 * h + per_token_state), 0)
    } else {
        let chunk_tokens = (chunk_blocks * seqlen) as u64;
        (F32 * tokens * 3 * h, F32 * chunk_tokens * per_token_state)
    };
    // AWQ's search runs before the layer's forward, on a sample of its own (less than a
    // resident forward keeps).
    let chunk = if method.folds_awq() && !resident {
        let sample = (crate::awq::SEARCH_TOKENS as u64).clamp(seqlen as u64, tokens);
        chunk.max(F32 * sample * per_token_state)
    } else {
        chunk
    };
    Footprint {
        weights,
        stats,
        activations,
        chunk,
        embedding: F32 * config.vocab_size as u64 * h,
    }
}

/// The widest tensors of one chunk of `chunk_blocks` calibration blocks, as (what, bytes): the
/// MLP's activations and the attention scores. Each must fit one device buffer.
pub fn chunk_buffers(
    config: &LlamaConfig,
    chunk_blocks: usize,
    seqlen: usize,
) -> [(String, u64); 2] {
    let (h, f) = (config.hidden_size, config.intermediate_size);
    let tokens = (chunk_blocks * seqlen) as u64;
    let heads = config.num_attention_heads as u64;
    [
        (
            format!(
                "the calibration activations of {chunk_blocks} blocks × {seqlen} tokens × {} \
                 features",
                f.max(h)
            ),
            F32 * tokens * f.max(h) as u64,
        ),
        (
            format!(
                "the attention scores of {chunk_blocks} blocks × {heads} heads × {seqlen}² \
                 tokens"
            ),
            F32 * chunk_blocks as u64 * heads * (seqlen as u64).pow(2),
        ),
    ]
}

/// The tensors of a layer that cannot be split by chunking, as (what, bytes): the largest
/// linear's weight in f32 and the widest input Gram matrix (GPTQ's Hessian has its size).
pub fn layer_buffers(config: &LlamaConfig) -> [(String, u64); 2] {
    let widest = |by: fn(&[usize; 2]) -> usize| {
        LinearKind::ALL
            .into_iter()
            .max_by_key(|&k| by(&linear_shape(config, k)))
            .expect("a layer has linears")
    };
    let largest = widest(|&[o, i]| o * i);
    let [o, i] = linear_shape(config, largest);
    let widest_input = widest(|&[_, i]| i);
    let i_w = linear_shape(config, widest_input)[1] as u64;
    [
        (
            format!("{}.weight in f32 ([{o}, {i}])", largest.module()),
            F32 * o as u64 * i as u64,
        ),
        (
            format!(
                "the Gram matrix of {}'s inputs ([{i_w}, {i_w}])",
                widest_input.module()
            ),
            F32 * i_w * i_w,
        ),
    ]
}

/// Checks that each of `buffers` fits one buffer of `limits`.
fn check_buffers(
    buffers: impl IntoIterator<Item = (String, u64)>,
    limits: &DeviceLimits,
) -> Result<(), DeviceLimitError> {
    buffers
        .into_iter()
        .try_for_each(|(tensor, bytes)| limits.check_buffer(&tensor, bytes))
}

/// Checks that the layer's unsplittable tensors and the chunk `plan` holds fit `limits`.
pub fn check_device(
    config: &LlamaConfig,
    plan: &MemoryPlan,
    limits: &DeviceLimits,
) -> Result<(), DeviceLimitError> {
    check_buffers(layer_buffers(config), limits)?;
    check_buffers(
        chunk_buffers(config, plan.chunk_blocks, plan.seqlen),
        limits,
    )
}

/// Chooses resident or streaming for `limit` bytes, with chunks whose tensors each fit one
/// buffer of `device` (its largest buffer, if it has one), or says what to change when even the
/// smallest streaming plan does not fit.
pub fn plan(
    config: &LlamaConfig,
    blocks: usize,
    seqlen: usize,
    method: Method,
    limit: u64,
    device: &DeviceLimits,
) -> Result<MemoryPlan> {
    let check_chunk =
        |chunk_blocks| check_buffers(chunk_buffers(config, chunk_blocks, seqlen), device);
    let resident = footprint(config, blocks, seqlen, method, true, blocks).peak();
    if resident <= limit / 3 && check_chunk(blocks).is_ok() {
        return Ok(MemoryPlan {
            blocks,
            seqlen,
            chunk_blocks: blocks,
            resident: true,
            peak: resident,
            limit,
        });
    }
    let mut chunk_blocks = (STREAM_CHUNK_TOKENS / seqlen.max(1)).clamp(1, blocks.max(1));
    loop {
        let peak = footprint(config, blocks, seqlen, method, false, chunk_blocks).peak();
        if peak <= limit && check_chunk(chunk_blocks).is_ok() {
            return Ok(MemoryPlan {
                blocks,
                seqlen,
                chunk_blocks,
                resident: false,
                peak,
                limit,
            });
        }
        if chunk_blocks == 1 {
            check_chunk(1)
                .map_err(|e| AdadimError::Invalid(format!("{e}: use a shorter --calib-seqlen")))?;
            return Err(AdadimError::Invalid(format!(
                "this run needs about {} of memory (predicted peak with {blocks} calibration \
                 blocks of {seqlen} tokens), more than the {} it may use: use fewer \
                 --calib-samples or a shorter --calib-seqlen, or raise --max-memory if the \
                 machine has more",
                gib(peak),
                gib(limit)
            )));
        }
        chunk_blocks = chunk_blocks.div_ceil(2);
    }
}

/// The default limit: 90% of the machine's memory (`MemTotal`), or 8 GiB where that cannot be
/// read. The machine's total rather than what is free right now, so that the plan, which
/// decides how sums are chunked, and hence the output's bytes, does not depend on what else
/// happens to be running.
pub fn default_limit() -> u64 {
    meminfo("MemTotal:").map_or(8 << 30, |total| total / 10 * 9)
}

/// Memory the kernel reports available now (`MemAvailable`), bytes.
pub fn available() -> Option<u64> {
    meminfo("MemAvailable:")
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes as GiB with one decimal.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama2_7b() -> LlamaConfig {
        let mut c = tiny();
        c.hidden_size = 4096;
        c.intermediate_size = 11008;
        c.num_attention_heads = 32;
        c.num_key_value_heads = 32;
        c.num_hidden_layers = 32;
        c.vocab_size = 32000;
        c
    }

    fn tiny() -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 256
        }))
        .unwrap()
    }

    #[test]
    fn small_models_stay_resident() {
        let p = plan(&tiny(), 9, 97, Method::Rtn, 8 << 30, &DeviceLimits::NONE).unwrap();
        assert!(p.resident);
        assert_eq!(p.chunk_blocks, 9);
    }

    #[test]
    fn a_7b_model_with_the_protocol_calibration_streams_within_8_gib() {
        // The protocol's 64 samples of lee-news.txt make 27 blocks of 512 tokens.
        for method in [Method::Rtn, Method::Gptq] {
            let p = plan(&llama2_7b(), 27, 512, method, 20 << 30, &DeviceLimits::NONE).unwrap();
            assert!(!p.resident, "{method}");
            assert_eq!(p.chunk_blocks, STREAM_CHUNK_TOKENS / 512);
            assert!(p.peak <= 8 << 30, "{method}: {}", gib(p.peak));
        }
    }

    #[test]
    fn the_peak_does_not_depend_on_the_layer_count() {
        let mut c = llama2_7b();
        let a = footprint(&c, 64, 512, Method::Gptq, false, 4).peak();
        c.num_hidden_layers = 80;
        assert_eq!(a, footprint(&c, 64, 512, Method::Gptq, false, 4).peak());
    }

    #[test]
    fn too_little_memory_says_what_to_change() {
        let e = plan(
            &llama2_7b(),
            64,
            512,
            Method::Rtn,
            1 << 30,
            &DeviceLimits::NONE,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--calib-samples") && e.contains("--max-memory"),
            "{e}"
        );
    }

    #[test]
    fn streaming_shrinks_the_chunk_before_giving_up() {
        let c = llama2_7b();
        let roomy = plan(&c, 64, 512, Method::Rtn, 20 << 30, &DeviceLimits::NONE).unwrap();
        let single = footprint(&c, 64, 512, Method::Rtn, false, 1).peak();
        let tight = plan(&c, 64, 512, Method::Rtn, single, &DeviceLimits::NONE).unwrap();
        assert!(tight.chunk_blocks < roomy.chunk_blocks);
        assert!(tight.peak <= single);
    }

    fn smollm2_135m() -> LlamaConfig {
        let mut c = tiny();
        c.hidden_size = 576;
        c.intermediate_size = 1536;
        c.num_attention_heads = 9;
        c.num_key_value_heads = 3;
        c
    }

    const LAVAPIPE_MAX_BUFFER: u64 = 128 << 20;
    const LAVAPIPE: DeviceLimits = DeviceLimits {
        max_buffer_bytes: Some(LAVAPIPE_MAX_BUFFER),
        memory_bytes: None,
    };

    #[test]
    fn a_device_buffer_limit_streams_in_chunks_whose_tensors_fit_it() {
        let c = smollm2_135m();
        let host = plan(&c, 128, 512, Method::Rtn, 20 << 30, &DeviceLimits::NONE).unwrap();
        assert!(host.resident, "{host:?}");
        let device = plan(&c, 128, 512, Method::Rtn, 20 << 30, &LAVAPIPE).unwrap();
        assert!(!device.resident, "{device:?}");
        for (tensor, bytes) in chunk_buffers(&c, device.chunk_blocks, 512) {
            assert!(bytes <= LAVAPIPE_MAX_BUFFER, "{tensor}: {bytes}");
        }
        // 7B blocks of 1024 tokens: two blocks' attention scores (256 MiB) do not fit, one
        // block's (exactly 128 MiB) does.
        let c = llama2_7b();
        let host = plan(&c, 27, 1024, Method::Rtn, 20 << 30, &DeviceLimits::NONE).unwrap();
        assert_eq!(host.chunk_blocks, 2);
        let device = plan(&c, 27, 1024, Method::Rtn, 20 << 30, &LAVAPIPE).unwrap();
        assert_eq!(device.chunk_blocks, 1);
    }

    #[test]
    fn a_block_too_long_for_the_device_names_the_attention_scores() {
        // 32 heads × 2048² scores of one block are 512 MiB.
        let e = plan(&llama2_7b(), 27, 2048, Method::Rtn, 20 << 30, &LAVAPIPE)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention scores of 1 blocks × 32 heads × 2048²")
                && e.contains("134217728 bytes")
                && e.contains("--calib-seqlen"),
            "{e}"
        );
    }

    #[test]
    fn check_device_names_the_first_tensor_that_cannot_be_split() {
        let c = llama2_7b();
        let p = plan(&c, 27, 512, Method::Gptq, 20 << 30, &LAVAPIPE).unwrap();
        let limits = |max: u64| DeviceLimits {
            max_buffer_bytes: Some(max),
            memory_bytes: None,
        };
        // down_proj's f32 weight is 4096 × 11008 × 4 bytes = 172 MiB.
        let e = check_device(&c, &p, &limits(LAVAPIPE_MAX_BUFFER)).unwrap_err();
        assert!(
            e.to_string()
                .contains("mlp.down_proj.weight in f32 ([4096, 11008])"),
            "{e}"
        );
        // Its input Gram, 11008² × 4 bytes = 462 MiB, is next.
        let e = check_device(&c, &p, &limits(256 << 20)).unwrap_err();
        assert!(
            e.to_string()
                .contains("Gram matrix of mlp.down_proj's inputs"),
            "{e}"
        );
        check_device(&c, &p, &limits(512 << 20)).unwrap();
        check_device(&c, &p, &DeviceLimits::NONE).unwrap();
    }
}
