//! Backend-generic versions of [`crate::QuantBackend`]'s fused ops, composed from Burn tensor
//! ops: the defaults on the CubeCL backends and the reference the host kernels are tested
//! against.

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::activation::{silu, softmax};

use crate::QuantBackend;

/// Queries processed together; keys beyond a chunk's last position are never touched, so causal
/// attention does about half the work of a full `T × T` product (and needs `chunk × T` memory).
const QUERY_CHUNK: usize = 512;

/// `[b, t, heads·d]` → `[b, heads, t, d]`.
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, t, hd] = x.dims();
    x.reshape([b, t, heads, hd / heads]).swap_dims(1, 2)
}

/// `[.., K]` as `[rows, K]`, and the function that restores the leading dims of a result.
fn flatten<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> (Tensor<B, 2>, impl Fn(Tensor<B, 2>) -> Tensor<B, D>) {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let restore = move |y: Tensor<B, 2>| {
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    };
    (x.reshape([rows, k]), restore)
}

/// See [`crate::QuantBackend::dense_linear`].
pub fn dense_linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w_t: Tensor<B, 2>,
) -> Tensor<B, D> {
    let (x, restore) = flatten(x);
    restore(x.matmul(w_t))
}

/// See [`crate::QuantBackend::quant_linear`].
pub fn quant_linear<B: QuantBackend, const D: usize>(
    x: Tensor<B, D>,
    w: &B::Weight,
) -> Tensor<B, D> {
    let (x, restore) = flatten(x);
    let y = B::quant_matmul(x.into_primitive().tensor(), w);
    restore(Tensor::from_primitive(TensorPrimitive::Float(y)))
}

/// See [`crate::QuantBackend::causal_attention`].
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    kv_heads: usize,
) -> Tensor<B, 3> {
    let (q, k, v) = (
        split_heads(q, heads),
        split_heads(k, kv_heads),
        split_heads(v, kv_heads),
    );
    let [b, _, t_q, d] = q.dims();
    let k_len = k.dims()[2];
    let offset = k_len - t_q;
    let rep = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    // Heads sharing a KV head are stacked along the query axis, so K and V are never repeated.
    let q = q.mul_scalar(scale).reshape([b, kv_heads, rep, t_q, d]);
    let device = q.device();
    let mut chunks = Vec::with_capacity(t_q.div_ceil(QUERY_CHUNK));
    for c0 in (0..t_q).step_by(QUERY_CHUNK) {
        let c = QUERY_CHUNK.min(t_q - c0);
        let visible = offset + c0 + c;
        let qc = q
            .clone()
            .narrow(3, c0, c)
            .reshape([b, kv_heads, rep * c, d]);
        let kc = k.clone().narrow(2, 0, visible);
        let vc = v.clone().narrow(2, 0, visible);
        let mut scores = qc.matmul(kc.swap_dims(2, 3));
        if c > 1 {
            let mask = causal_bias::<B>(rep, c, offset + c0, visible, &device);
            scores = scores.add(mask);
        }
        let ctx = softmax(scores, 3).matmul(vc);
        chunks.push(ctx.reshape([b, kv_heads, rep, c, d]));
    }
    Tensor::cat(chunks, 3)
        .reshape([b, heads, t_q, d])
        .swap_dims(1, 2)
        .reshape([b, t_q, heads * d])
}

/// Additive mask `[1, 1, rep·c, visible]`: query row `i` (position `first + i % c`) sees keys `≤` it.
fn causal_bias<B: Backend>(
    rep: usize,
    c: usize,
    first: usize,
    visible: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let mut bias = vec![0f32; rep * c * visible];
    for r in 0..rep * c {
        let pos = first + r % c;
        bias[r * visible + pos + 1..(r + 1) * visible].fill(f32::NEG_INFINITY);
    }
    Tensor::<B, 2>::from_data(TensorData::new(bias, [rep * c, visible]), device).unsqueeze::<4>()
}

/// See [`crate::QuantBackend::rotary`].
pub fn rotary<B: Backend>(
    x: Tensor<B, 3>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    heads: usize,
) -> Tensor<B, 3> {
    let [b, t, hd] = x.dims();
    let d = hd / heads;
    let x = x.reshape([b, t, heads, d]);
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let table = |m: Tensor<B, 2>| m.reshape([1, t, 1, d]);
    x.mul(table(cos))
        .add(rotated.mul(table(sin)))
        .reshape([b, t, hd])
}

/// See [`crate::QuantBackend::swiglu`].
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate).mul(up)
}

/// See [`crate::QuantBackend::rms_norm`].
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let rms = x.clone().square().mean_dim(D - 1).add_scalar(eps).sqrt();
    x.div(rms).mul(weight.unsqueeze::<D>())
}

/// See [`crate::QuantBackend::sum_nll`].
pub fn sum_nll<B: Backend>(logits: Tensor<B, 2>, targets: &[u32]) -> f64 {
    let [rows, _] = logits.dims();
    assert_eq!(rows, targets.len(), "one target per row of logits");
    let max = logits.clone().max_dim(1);
    let lse = logits
        .clone()
        .sub(max.clone())
        .exp()
        .sum_dim(1)
        .log()
        .add(max);
    let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [rows, 1]), &logits.device());
    let picked = logits.gather(1, idx);
    let nll: f32 = lse.sub(picked).sum().into_scalar().elem();
    nll as f64
}

/// See [`crate::QuantBackend::squared_distance`] (summed in the backend's float type).
pub fn squared_distance<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    a.sub(b).square().sum().into_scalar().elem::<f64>()
}

/// See [`crate::QuantBackend::inner_product`] (summed in the backend's float type).
pub fn inner_product<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    a.mul(b).sum().into_scalar().elem::<f64>()
}

/// See [`crate::QuantBackend::with_host_values`] (a copy through `into_data`).
pub fn with_host_values<B: Backend, const D: usize, R>(
    x: &Tensor<B, D>,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    let values = (x.clone().into_data().convert::<f32>())
        .into_vec::<f32>()
        .expect("a converted tensor holds f32");
    f(&values)
}

/// See [`crate::QuantBackend::flatten_rows`].
pub fn flatten_rows<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 2> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    x.reshape([rows, dims[D - 1]])
}
