//! Building the Burn model from a [`TensorSource`], whole or one layer at a time.

use std::borrow::Cow;
use std::path::Path;

use burn::prelude::*;
use half::{bf16, f16};
use kernels::{QuantBackend, QuantLinear, QuantLinearError};
use rayon::prelude::*;

use crate::checkpoint::TensorSource;
use crate::error::{ModelError, Result};
use crate::linear_kind::{LinearKind, linear_shape};
use crate::model::{
    Attention, DecoderLayer, Linear, Llama, MAX_ROPE_POSITIONS, Mlp, RmsNorm, Rope,
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

/// Refuses the tensor `name` of `len` f32 values if one buffer of `device` cannot hold it:
/// past that limit the upload would fail later, far from its cause (see [`kernels::limits`]).
pub fn check_fits<B: QuantBackend>(name: &str, len: usize, device: &B::Device) -> Result<()> {
    let bytes = (len as u64).saturating_mul(size_of::<f32>() as u64);
    Ok(B::device_limits(device).check_buffer(name, bytes)?)
}

/// The error of uploading the linear `module` of the checkpoint at `path`: a buffer the device
/// cannot hold is named `{module}.{part}` (`qweight`, `scales+zeros`, `weight`); anything else
/// is a malformed file.
pub(crate) fn upload_error(path: &Path, module: &str, e: QuantLinearError) -> ModelError {
    match e {
        QuantLinearError::DeviceLimit(e) => e.renamed(|part| format!("{module}.{part}")).into(),
        e => ModelError::malformed(path, format!("`{module}`: {e}")),
    }
}

/// [`load_host`], uploaded to `device`.
pub fn load_tensor<B: QuantBackend, const D: usize>(
    src: &dyn TensorSource,
    name: &str,
    expected: [usize; D],
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    check_fits::<B>(name, expected.iter().product(), device)?;
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
    check_fits::<B>(name, shape[0] * shape[1], device)?;
    let w = load_host(src, name, &shape)?;
    Ok(Linear::from_host_weight(&w, shape, device))
}

/// A linear from the checkpoint's `[out, in]` weight `name`, kept in 16 bits when that is
/// lossless (see [`compact_linear_from`]).
fn load_compact_linear<B: QuantBackend>(
    src: &dyn TensorSource,
    name: &str,
    shape: [usize; 2],
    device: &B::Device,
) -> Result<Linear<B>> {
    let w = load_host(src, name, &shape)?;
    compact_linear_from(src, name, &w, shape, device)
}

/// A linear on `w [out, in]` that stores it in f16 when every value is exactly an f16, else in
/// bf16 when every value is exactly a bf16 (checkpoints stored in 16 bits, such as our packed
/// ones' heads, f16 models, LLaMA-3's bf16), else in f32. Lossless: products beyond decode
/// sizes multiply an f32 copy of the same values, made for that product only, so their results
/// are those of the f32 weight; decode-sized ones read half the bytes. The model then holds half
/// the memory of its f32 copy.
pub fn compact_linear_from<B: QuantBackend>(
    src: &dyn TensorSource,
    name: &str,
    w: &[f32],
    shape: [usize; 2],
    device: &B::Device,
) -> Result<Linear<B>> {
    let uploaded = if let Some(w16) = exact_f16(w) {
        QuantLinear::from_f16(&w16, shape, device)
    } else if let Some(w16) = exact_bf16(w) {
        QuantLinear::from_bf16(&w16, shape, device)
    } else {
        check_fits::<B>(name, w.len(), device)?;
        return Ok(Linear::from_host_weight(w, shape, device));
    };
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let q = uploaded.map_err(|e| upload_error(src.path(), module, e))?;
    Ok(Linear::Quant(q))
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

/// Dense decoder layer `i`, every linear in f32 (what the quantization pipeline changes).
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

/// Decoder layer `i` for running the model: each linear kept in 16 bits when that is lossless
/// ([`compact_linear_from`]), so a 16-bit checkpoint is not held in f32.
pub fn load_layer_compact<B: QuantBackend>(
    src: &dyn TensorSource,
    i: usize,
    device: &B::Device,
) -> Result<DecoderLayer<B>> {
    load_layer_with(src, i, device, &|kind| {
        let name = format!("{}.weight", kind.hf_prefix(i));
        load_compact_linear(src, &name, linear_shape(src.config(), kind), device)
    })
}

/// The parts of the model outside the decoder layers.
pub struct Periphery<B: QuantBackend> {
    pub embed_tokens: Tensor<B, 2>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    pub rope: Rope<B>,
}

/// `w` in f16, if no value changes.
fn exact_f16(w: &[f32]) -> Option<Vec<f16>> {
    w.par_iter()
        .with_min_len(1 << 16)
        .map(|&v| f16_bits_exact(v).map(f16::from_bits))
        .collect()
}

/// `w` in bf16, if no value changes.
fn exact_bf16(w: &[f32]) -> Option<Vec<bf16>> {
    w.par_iter()
        .with_min_len(1 << 16)
        .map(|&v| {
            let b = v.to_bits();
            (b & 0xffff == 0 && v.is_finite()).then_some(bf16::from_bits((b >> 16) as u16))
        })
        .collect()
}

/// The f16 bits of a finite `v` that f16 represents exactly. On the bits rather than through a
/// round trip: a 7B model has billions of values to test.
fn f16_bits_exact(v: f32) -> Option<u16> {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let (exp, man) = (((b >> 23) & 0xff) as i32, b & 0x7f_ffff);
    if exp == 0 && man == 0 {
        return Some(sign);
    }
    let e = exp - 127;
    if (-14..=15).contains(&e) {
        // A normal f16: 10 mantissa bits.
        (man & 0x1fff == 0).then(|| sign | (((e + 15) as u16) << 10) | (man >> 13) as u16)
    } else if (-24..-14).contains(&e) {
        // A subnormal f16, `m · 2⁻²⁴`: `m = 1.man · 2^(e+24)` must be an integer.
        let (full, shift) = (man | 0x80_0000, (-1 - e) as u32);
        (full & ((1 << shift) - 1) == 0).then(|| sign | (full >> shift) as u16)
    } else {
        None
    }
}

fn load_embedding_host(src: &dyn TensorSource) -> Result<Vec<f32>> {
    let config = src.config();
    let shape = [config.vocab_size, config.hidden_size];
    load_host(src, "model.embed_tokens.weight", &shape)
}

/// The embedding table `[vocab, hidden]` (checks the config first, as every model load does).
pub fn load_embedding<B: QuantBackend>(
    src: &dyn TensorSource,
    device: &B::Device,
) -> Result<Tensor<B, 2>> {
    check_config(src)?;
    let config = src.config();
    let shape = [config.vocab_size, config.hidden_size];
    check_fits::<B>("model.embed_tokens.weight", shape[0] * shape[1], device)?;
    Ok(Tensor::from_data(
        TensorData::new(load_embedding_host(src)?, shape),
        device,
    ))
}

fn check_config(src: &dyn TensorSource) -> Result<()> {
    src.config()
        .validate()
        .map_err(|msg| ModelError::malformed(src.path(), msg))
}

/// The tensor the language-model head multiplies by: its own `lm_head.weight`, or the
/// embedding when tied (or when the checkpoint has none).
pub fn head_name(src: &dyn TensorSource) -> &'static str {
    if src.contains("lm_head.weight") && !src.config().tie_word_embeddings {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    }
}

/// The language-model head's weight `[vocab, hidden]` and its name ([`head_name`]). `embed` is
/// the embedding if the caller has it.
pub fn head_weight<'a>(
    src: &dyn TensorSource,
    embed: Option<&'a [f32]>,
) -> Result<(&'static str, Cow<'a, [f32]>)> {
    let config = src.config();
    let shape = [config.vocab_size, config.hidden_size];
    let name = head_name(src);
    if name == "lm_head.weight" {
        let w = load_host(src, name, &shape)?;
        return Ok((name, Cow::Owned(w)));
    }
    let w = match embed {
        Some(e) => Cow::Borrowed(e),
        None => Cow::Owned(load_embedding_host(src)?),
    };
    Ok(("model.embed_tokens.weight", w))
}

/// The final norm.
pub fn load_final_norm<B: QuantBackend>(
    src: &dyn TensorSource,
    device: &B::Device,
) -> Result<RmsNorm<B>> {
    norm(src, "model.norm.weight", device)
}

/// The language-model head in f32: for evaluations, which multiply it by hundreds of rows at a
/// time (a compact head would be widened again for every such product).
pub fn load_head_dense<B: QuantBackend>(
    src: &dyn TensorSource,
    device: &B::Device,
) -> Result<Linear<B>> {
    let config = src.config();
    let (name, w) = head_weight(src, None)?;
    check_fits::<B>(name, w.len(), device)?;
    Ok(Linear::from_host_weight(
        &w,
        [config.vocab_size, config.hidden_size],
        device,
    ))
}

/// The rotary tables of the model's positions.
pub fn load_rope<B: QuantBackend>(config: &crate::LlamaConfig, device: &B::Device) -> Rope<B> {
    Rope::new(
        config,
        config.max_position_embeddings.min(MAX_ROPE_POSITIONS),
        device,
    )
}

/// Everything outside the decoder layers. The head is compact when lossless (see
/// [`compact_linear_from`]): a decode step streams the whole head for one token.
pub fn load_periphery<B: QuantBackend>(
    src: &dyn TensorSource,
    device: &B::Device,
) -> Result<Periphery<B>> {
    load_periphery_with(src, device, None)
}

/// [`load_periphery`] with the head already loaded (a packed checkpoint's packed head).
pub fn load_periphery_with<B: QuantBackend>(
    src: &dyn TensorSource,
    device: &B::Device,
    head: Option<Linear<B>>,
) -> Result<Periphery<B>> {
    check_config(src)?;
    let config = src.config();
    let shape = [config.vocab_size, config.hidden_size];
    check_fits::<B>("model.embed_tokens.weight", shape[0] * shape[1], device)?;
    let embed = load_embedding_host(src)?;
    let lm_head = match head {
        Some(head) => head,
        None => {
            let (name, w) = head_weight(src, Some(&embed))?;
            compact_linear_from(src, name, &w, shape, device)?
        }
    };
    let embed_tokens = Tensor::from_data(TensorData::new(embed, shape), device);
    Ok(Periphery {
        embed_tokens,
        norm: load_final_norm(src, device)?,
        lm_head,
        rope: load_rope(config, device),
    })
}

/// The whole model, to run: dense linears compact where lossless ([`load_layer_compact`]).
pub fn load_model<B: QuantBackend>(src: &dyn TensorSource, device: &B::Device) -> Result<Llama<B>> {
    let layers = (0..src.config().num_hidden_layers)
        .map(|i| load_layer_compact(src, i, device))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What the bit test must agree with: the f32 → f16 → f32 round trip.
    fn round_trip(v: f32) -> Option<u16> {
        let h = f16::from_f32(v);
        (v.is_finite() && h.to_f32() == v).then_some(h.to_bits())
    }

    #[test]
    fn f16_exactness_agrees_with_the_round_trip() {
        // Every f16 widened, and its f32 neighbours (one ulp away: never exact unless zero).
        for bits in 0..=u16::MAX {
            let v = f16::from_bits(bits).to_f32();
            for u in [v.to_bits().wrapping_sub(1), v.to_bits(), v.to_bits() + 1] {
                let w = f32::from_bits(u);
                assert_eq!(f16_bits_exact(w), round_trip(w), "{w:e} ({u:#010x})");
            }
        }
        // Arbitrary bit patterns, and values around the subnormal and overflow edges.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1 << 20 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let w = f32::from_bits(seed as u32);
            assert_eq!(f16_bits_exact(w), round_trip(w), "{w:e}");
            let w = f32::from_bits((seed >> 32) as u32 & 0x8fff_ffff | 0x3000_0000);
            assert_eq!(f16_bits_exact(w), round_trip(w), "{w:e}");
        }
        for w in [
            65504.0f32,
            65520.0,
            2f32.powi(-24),
            2f32.powi(-25),
            3.0 * 2f32.powi(-25),
        ] {
            assert_eq!(f16_bits_exact(w), round_trip(w), "{w:e}");
        }
    }

    #[test]
    fn a_weight_past_the_device_limit_is_named_after_its_checkpoint_tensor() {
        let too_large = kernels::DeviceLimitError::BufferTooLarge {
            tensor: "qweight".into(),
            bytes: 10,
            limit: 5,
        };
        let module = "model.layers.3.mlp.down_proj";
        let msg = upload_error(Path::new("ckpt"), module, too_large.into()).to_string();
        assert!(
            msg.contains("`model.layers.3.mlp.down_proj.qweight`")
                && msg.contains("10 bytes")
                && msg.contains("5 bytes")
                && !msg.contains("malformed"),
            "{msg}"
        );
        let bad_shape = QuantLinearError::InputShape {
            expected: 4,
            shape: vec![2, 3],
        };
        let msg = upload_error(Path::new("ckpt"), module, bad_shape).to_string();
        assert!(
            msg.starts_with("ckpt: malformed file: `model.layers.3.mlp.down_proj`: "),
            "{msg}"
        );
    }

    #[test]
    fn compact_storage_prefers_f16_then_bf16() {
        assert!(exact_f16(&[0.5, -3.0, 2f32.powi(-24)]).is_some());
        let b = bf16::from_f32(1.0e-30).to_f32();
        assert!(exact_f16(&[0.5, b]).is_none());
        assert_eq!(
            exact_bf16(&[0.5, b]),
            Some(vec![bf16::from_f32(0.5), bf16::from_f32(b)])
        );
        assert!(exact_bf16(&[0.5, 0.1]).is_none());
        assert!(exact_bf16(&[f32::NAN]).is_none());
    }
}
