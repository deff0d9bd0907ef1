//! [`QuantBackend`]: the Burn backend extension that model code runs on.
//!
//! Following Burn's custom-kernel pattern, each method is a backend op: the packed product
//! (CubeCL kernels on wgpu/cuda, the SIMD GEMV or a dense product on ndarray) and the dense
//! ops whose composition from generic tensor ops is slow on the CPU. Those have
//! backend-generic defaults ([`crate::generic`]); the ndarray backend replaces them with the
//! fused host kernels of [`crate::cpu`].

use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use half::{bf16, f16};
use quant_core::PackedLinear;

use crate::{DeviceLimits, KvStore, QuantLinearError, WeightKind};

/// A Burn backend that can multiply activations by a [`PackedLinear`] (or a 16-bit weight) held
/// on its device.
pub trait QuantBackend: Backend {
    /// A linear layer's weight, resident on the device in one of the forms of [`WeightKind`].
    type Weight: Clone + Send + Sync + std::fmt::Debug;

    /// One layer's KV cache of a sequence, stored as this backend reads it fastest.
    type KvCache: KvStore<Self>;

    /// The largest buffer (and the memory, if known) of `device`, which uploads are checked
    /// against; host backends have none.
    fn device_limits(_device: &Self::Device) -> DeviceLimits {
        DeviceLimits::NONE
    }

    /// How many forwards of disjoint sequences a batched decode step may run at once. One
    /// forward alternates parallel products with serial stretches (norms, rotation,
    /// attention's bookkeeping) in which a host backend's other threads idle; forwards of two
    /// halves of the batch, side by side, fill each other's gaps (docs/serve.md, session 49).
    /// A device runs one.
    fn concurrent_forwards() -> usize {
        1
    }

    /// Uploads (and validates) a packed weight; a buffer the device cannot hold is a
    /// [`QuantLinearError::DeviceLimit`].
    fn upload(
        packed: &PackedLinear,
        device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError>;

    /// Uploads a dense `W [out, in]` whose values are f16 (see [`crate::QuantLinear::from_f16`]).
    fn upload_f16(
        w: &[f16],
        shape: [usize; 2],
        device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError>;

    /// Uploads a dense `W [out, in]` whose values are bf16 (see
    /// [`crate::QuantLinear::from_bf16`]).
    fn upload_bf16(
        w: &[bf16],
        shape: [usize; 2],
        device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError>;

    /// `x [M, IC] · Ŵᵀ → [M, OC]`, in `x`'s float type. Panics if `x` is not `[M, IC]`, like
    /// Burn's own matmul on mismatched shapes; [`crate::QuantLinear::try_forward`] checks first.
    fn quant_matmul(x: FloatTensor<Self>, w: &Self::Weight) -> FloatTensor<Self>;

    /// `(out_features, in_features)` of an uploaded weight.
    fn weight_shape(w: &Self::Weight) -> (usize, usize);

    /// The form `w` is stored in.
    fn weight_kind(w: &Self::Weight) -> WeightKind;

    /// `x [.., IC] · Ŵᵀ → [.., OC]`: [`Self::quant_matmul`] over `x`'s leading dims.
    fn quant_linear<const D: usize>(x: Tensor<Self, D>, w: &Self::Weight) -> Tensor<Self, D> {
        crate::generic::quant_linear(x, w)
    }

    /// [`Self::quant_linear`] of each of several weights with the same input width (a layer's
    /// q, k and v, or its gate and up). Host backends run decode-sized products of packed
    /// weights as one parallel pass, so that threads fork and join once for all of them.
    fn quant_linear_many<const D: usize>(
        x: Tensor<Self, D>,
        ws: &[&Self::Weight],
    ) -> Vec<Tensor<Self, D>> {
        ws.iter()
            .map(|w| Self::quant_linear(x.clone(), w))
            .collect()
    }

    /// `x [.., K] · w_t [K, N] → [.., N]`: a dense linear layer.
    fn dense_linear<const D: usize>(x: Tensor<Self, D>, w_t: Tensor<Self, 2>) -> Tensor<Self, D> {
        crate::generic::dense_linear(x, w_t)
    }

    /// `xᵀ·x` of `x [n, f]` → `[f, f]`: the Gram matrix that output errors and GPTQ's Hessian
    /// are built from. Backends may use its symmetry.
    fn gram(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        Self::dense_linear(x.clone().transpose(), x)
    }

    /// `sum + xᵀ·x` of `x [n, f]` and a running `sum [f, f]`: a Gram matrix summed over chunks
    /// of rows. Backends may add into `sum`'s memory.
    fn gram_add(sum: Tensor<Self, 2>, x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        sum.add(Self::gram(x))
    }

    /// Causal grouped-query attention `softmax(q·kᵀ/√d + mask)·v` on projection outputs:
    /// `q [b, t_q, heads·d]`, `k, v [b, t_k, kv_heads·d]` → `[b, t_q, heads·d]` (heads
    /// concatenated, the input of `o_proj`).
    ///
    /// The queries are the last `t_q` of the `t_k` positions (a decode step over a KV cache has
    /// `t_q < t_k`), and query head `h` reads key/value head `h / (heads / kv_heads)`.
    fn causal_attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        heads: usize,
        kv_heads: usize,
    ) -> Tensor<Self, 3> {
        crate::generic::causal_attention(q, k, v, heads, kv_heads)
    }

    /// Rotary position embedding ("rotate half") of every head of `x [b, t, heads·d]`, with
    /// the tables `cos, sin [t, d]` of its positions.
    fn rotary(
        x: Tensor<Self, 3>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        heads: usize,
    ) -> Tensor<Self, 3> {
        crate::generic::rotary(x, cos, sin, heads)
    }

    /// RMS norm over the last dimension of `x [.., F]`: `x / √(mean(x²) + eps) · weight [F]`.
    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        crate::generic::rms_norm(x, weight, eps)
    }

    /// SwiGLU's gating `silu(gate) ⊙ up`.
    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        crate::generic::swiglu(gate, up)
    }

    /// `Σ (a − b)²` over all elements of two tensors of one shape, in f64: a score's squared
    /// error without the difference tensor.
    fn squared_distance<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> f64 {
        crate::generic::squared_distance(a, b)
    }

    /// `Σ a ⊙ b` over all elements of two tensors of one shape, in f64.
    fn inner_product<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> f64 {
        crate::generic::inner_product(a, b)
    }

    /// `x [.., F]` as `[rows, F]`. Burn's ndarray `reshape` copies even a contiguous tensor;
    /// host backends here re-view it where they can.
    fn flatten_rows<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, 2> {
        crate::generic::flatten_rows(x)
    }

    /// `a − b` of two tensors of one shape. Host backends write it over threads: on the main
    /// thread, a difference of calibration activations (and its page faults) was the largest
    /// serial step of a layer's scores.
    fn difference<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        a.sub(b)
    }

    /// `f` of `x`'s elements as f32 in row-major order. Host backends lend their own memory
    /// where it is laid out so: `into_data` of a shared tensor copies element by element
    /// through its dynamic-rank view, about 0.2 GB/s, and saving a 7B run's activations went
    /// through it once per layer on the main thread.
    fn with_host_values<const D: usize, R>(x: &Tensor<Self, D>, f: impl FnOnce(&[f32]) -> R) -> R {
        crate::generic::with_host_values(x, f)
    }

    /// `Σᵣ −log softmax(logitsᵣ)[targetᵣ]` over the rows of `logits [targets.len(), vocab]`.
    fn sum_nll(logits: Tensor<Self, 2>, targets: &[u32]) -> f64 {
        crate::generic::sum_nll(logits, targets)
    }
}
