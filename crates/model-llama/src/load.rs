//! Building the Burn model from a [`TensorSource`], whole or one layer at a time.

use burn::prelude::*;
use half::f16;
use kernels::{QuantBackend, QuantLinear};

use crate::checkpoint::TensorSource;
use crate::error::{ModelError, Result};
use crate::model::{
    Attention, DecoderLayer, Linear, LinearKind, Llama, MAX_ROPE_POSITIONS, Mlp, RmsNorm, Rope,
};

/// Loads `name` into host memory, checking its shape and that every value is finite.
pub fn load_host(src: &dyn TensorSource, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
    let t = src.load(name)?;
    if t.shape != expected {
        return Err(ModelError::ShapeMismatch {
            path: src.path().to_path_buf(),
            name: name.to_string(),
            got: t.shape,
            expected: expected.to_vec(),
        });
    }
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(ModelError::malformed(
            src.path(),
            format!("tensor `{name}` has a non-finite value at index {i}"),
        ));
    }
    Ok(t.data)
}

/// [`load_host`], uploaded to `device`.
pub fn load_tensor<B: QuantBackend, const D: usize>(
    src: &dyn TensorSource,
    name: &str,
    expected: [usize; D],
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    let data = load_host(src, name, &expected)?;
    Ok(Tensor::from_data(TensorData::new(data, expected), device))
}

/// A dense linear from the checkpoint's `[out, in]` weight `name`.
fn load_linear<B: QuantBackend>(
    src: &dyn TensorSource,
    name: &str,
    shape: [usize; 2],
    device: &B::Device,
) -> Result<Linear<B>> {
    let w = load_host(src, name, &shape)?;
    Ok(Linear::from_host_weight(&w, shape, device))
}

/// `[out, in]` of a linear of the given kind.
pub fn linear_shape(config: &crate::LlamaConfig, kind: LinearKind) -> [usize; 2] {
    let h = config.hidden_size;
    let kv = config.num_key_value_heads * config.head_dim();
    let f = config.intermediate_size;
    match kind {
        LinearKind::Q | LinearKind::O => [h, h],
        LinearKind::K | LinearKind::V => [kv, h],
        LinearKind::Gate | LinearKind::Up => [f, h],
        LinearKind::Down => [h, f],
    }
}

fn norm<B: QuantBackend>(
    src: &dyn TensorSource,
    name: &str,
    device: &B::Device,
) -> Result<RmsNorm<B>> {
    let config = src.config();
    Ok(RmsNorm {
        weight: load_tensor(src, name, [config.hidden_size], device)?,
        eps: config.rms_norm_eps,
    })
}

/// Decoder layer `i`, with every linear loaded through `linear` (dense weights by default;
/// quantized checkpoints pass their own loader).
pub fn load_layer_with<B: QuantBackend>(
    src: &dyn TensorSource,
    i: usize,
    device: &B::Device,
    linear: &dyn Fn(LinearKind) -> Result<Linear<B>>,
) -> Result<DecoderLayer<B>> {
    let config = src.config();
    let prefix = format!("model.layers.{i}");
    Ok(DecoderLayer {
        input_layernorm: norm(src, &format!("{prefix}.input_layernorm.weight"), device)?,
        self_attn: Attention {
            q_proj: linear(LinearKind::Q)?,
            k_proj: linear(LinearKind::K)?,
            v_proj: linear(LinearKind::V)?,
            o_proj: linear(LinearKind::O)?,
            n_heads: config.num_attention_heads,
            n_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim(),
        },
        post_attention_layernorm: norm(
            src,
            &format!("{prefix}.post_attention_layernorm.weight"),
            device,
        )?,
        mlp: Mlp {
            gate_proj: linear(LinearKind::Gate)?,
            up_proj: linear(LinearKind::Up)?,
            down_proj: linear(LinearKind::Down)?,
        },
    })
}

/// Dense decoder layer `i`.
pub fn load_layer<B: QuantBackend>(
    src: &dyn TensorSource,
    i: usize,
    device: &B::Device,
) -> Result<DecoderLayer<B>> {
    load_layer_with(src, i, device, &|kind| {
        let name = format!("{}.weight", kind.hf_prefix(i));
        load_linear(src, &name, linear_shape(src.config(), kind), device)
    })
}

/// The parts of the model outside the decoder layers.
pub struct Periphery<B: QuantBackend> {
    pub embed_tokens: Tensor<B, 2>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    pub rope: Rope<B>,
}

/// The head, kept in f16 when every weight is exactly an f16 (checkpoints stored in f16, such as
/// our packed ones): lossless, and a decode step, which streams the whole head for one token,
/// reads half the bytes. Only the head: for the linears, large products would need a widened
/// f32 copy beside the f16 one.
fn head_linear<B: QuantBackend>(
    src: &dyn TensorSource,
    w: &[f32],
    shape: [usize; 2],
    device: &B::Device,
) -> Result<Linear<B>> {
    let Some(w16) = exact_f16(w) else {
        return Ok(Linear::from_host_weight(w, shape, device));
    };
    let head = QuantLinear::from_f16(&w16, shape, device)
        .map_err(|e| ModelError::malformed(src.path(), format!("language-model head: {e}")))?;
    Ok(Linear::Quant(head))
}

/// `w` in f16, if no value changes.
fn exact_f16(w: &[f32]) -> Option<Vec<f16>> {
    w.iter()
        .map(|&v| {
            let h = f16::from_f32(v);
            (h.to_f32() == v).then_some(h)
        })
        .collect()
}

pub fn load_periphery<B: QuantBackend>(
    src: &dyn TensorSource,
    device: &B::Device,
) -> Result<Periphery<B>> {
    let config = src.config();
    if let Err(msg) = config.validate() {
        return Err(ModelError::malformed(src.path(), msg));
    }
    let shape = [config.vocab_size, config.hidden_size];
    let embed = load_host(src, "model.embed_tokens.weight", &shape)?;
    let lm_head = if src.contains("lm_head.weight") && !config.tie_word_embeddings {
        head_linear(
            src,
            &load_host(src, "lm_head.weight", &shape)?,
            shape,
            device,
        )?
    } else {
        head_linear(src, &embed, shape, device)?
    };
    let embed_tokens = Tensor::from_data(TensorData::new(embed, shape), device);
    Ok(Periphery {
        embed_tokens,
        norm: norm(src, "model.norm.weight", device)?,
        lm_head,
        rope: Rope::new(
            config,
            config.max_position_embeddings.min(MAX_ROPE_POSITIONS),
            device,
        ),
    })
}

/// The whole model, dense.
pub fn load_model<B: QuantBackend>(src: &dyn TensorSource, device: &B::Device) -> Result<Llama<B>> {
    let layers = (0..src.config().num_hidden_layers)
        .map(|i| load_layer(src, i, device))
        .collect::<Result<Vec<_>>>()?;
    Ok(assemble(src, load_periphery(src, device)?, layers))
}

pub fn assemble<B: QuantBackend>(
    src: &dyn TensorSource,
    p: Periphery<B>,
    layers: Vec<DecoderLayer<B>>,
) -> Llama<B> {
    Llama {
        config: src.config().clone(),
        embed_tokens: p.embed_tokens,
        layers,
        norm: p.norm,
        lm_head: p.lm_head,
        rope: p.rope,
    }
}
