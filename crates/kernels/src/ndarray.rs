//! [`QuantBackend`] for burn-ndarray (f32): the host kernels of [`crate::cpu`] on the
//! tensors' own memory.

use std::borrow::Cow;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use burn::prelude::*;
use burn::tensor::{TensorPrimitive, ops::FloatTensor};
use quant_core::PackedLinear;

use crate::cpu::attention::{HeadsView, causal_attention, rotate_half};
use crate::cpu::dense::{MatMut, MatRef, matmul};
use crate::quant_linear::{check_input, dense_transposed};
use crate::{QuantBackend, QuantLinearError, cpu};

type B = NdArray<f32>;

/// The ndarray weight: `Ŵᵀ [IC, OC]`, dequantized at upload.
#[derive(Clone, Debug)]
pub struct NdArrayPacked {
    weight_t: Tensor<B, 2>,
    /// The SIMD kernel's layout, when it supports the layer (group size a multiple of 32).
    simd: Option<cpu::CpuPacked>,
    out_features: usize,
    in_features: usize,
}

/// An f32 tensor's elements with its dims and element strides, borrowed when its memory is
/// laid out with non-negative strides (contiguous in some axis order: fresh results, reshapes,
/// swapped axes), copied into row-major order otherwise.
struct Host<'a> {
    data: Cow<'a, [f32]>,
    dims: Vec<usize>,
    strides: Vec<usize>,
}

/// `None` for a tensor that is not f32 (the caller then takes the generic path).
fn host(t: &NdArrayTensor) -> Option<Host<'_>> {
    let NdArrayTensor::F32(storage) = t else {
        return None;
    };
    let view = storage.view();
    let dims = view.shape().to_vec();
    if view.strides().iter().all(|&s| s >= 0)
        && let Some(data) = view.to_slice_memory_order()
    {
        let strides = view.strides().iter().map(|&s| s as usize).collect();
        return Some(Host {
            data: Cow::Borrowed(data),
            dims,
            strides,
        });
    }
    let owned = view.as_standard_layout().into_owned();
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    Some(Host {
        data: Cow::Owned(owned.into_raw_vec_and_offset().0),
        dims,
        strides,
    })
}

fn is_row_major(h: &Host<'_>) -> bool {
    let mut expected = 1;
    for (&d, &s) in h.dims.iter().zip(&h.strides).rev() {
        if d > 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

fn heads_view<'a>(h: &'a Host<'_>) -> HeadsView<'a> {
    let four = |v: &[usize]| -> [usize; 4] { v.try_into().expect("a 4-D tensor") };
    HeadsView::new(&h.data, four(&h.dims), four(&h.strides))
}

fn mat_ref<'a>(h: &'a Host<'_>) -> MatRef<'a> {
    MatRef::new(&h.data, h.dims[0], h.dims[1], h.strides[0], h.strides[1])
}

fn tensor<const D: usize>(data: Vec<f32>, dims: [usize; D]) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from_data(
        TensorData::new(data, dims),
    )))
}

fn primitive<const D: usize>(t: &Tensor<B, D>) -> FloatTensor<B> {
    t.clone().into_primitive().tensor()
}

/// `x [M, K] · w_t [K, N]` on the host, or `None` when either is not f32.
fn host_matmul(x: &Tensor<B, 2>, w_t: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let (xp, wp) = (primitive(x), primitive(w_t));
    let (xh, wh) = (host(&xp)?, host(&wp)?);
    let (m, n) = (xh.dims[0], wh.dims[1]);
    let mut y = vec![0f32; m * n];
    matmul(
        MatMut::row_major(&mut y, m, n),
        mat_ref(&xh),
        mat_ref(&wh),
        1.0,
        true,
    );
    Some(tensor(y, [m, n]))
}

impl QuantBackend for B {
    type Packed = NdArrayPacked;

    fn upload(
        packed: &PackedLinear,
        device: &Self::Device,
    ) -> Result<Self::Packed, QuantLinearError> {
        packed.validate()?;
        let data = TensorData::new(
            dense_transposed(packed),
            [packed.in_features, packed.out_features],
        );
        Ok(NdArrayPacked {
            weight_t: Tensor::from_data(data, device),
            simd: cpu::CpuPacked::new(packed).ok(),
            out_features: packed.out_features,
            in_features: packed.in_features,
        })
    }

    fn quant_matmul(x: FloatTensor<Self>, w: &Self::Packed) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        if let Err(e) = check_input(&x.dims(), w.in_features) {
            panic!("{e}");
        }
        let m = x.dims()[0];
        // Decode-sized M reads the packed codes once (SIMD kernel); larger M re-reads them per
        // 8 rows, where the dense product on the dequantized weight wins.
        if let Some(simd) = w.simd.as_ref().filter(|_| m <= cpu::MAX_M_PER_PASS)
            && let Some(xh) = host(&primitive(&x))
        {
            let xs = match (xh.strides.as_slice(), &xh.data) {
                ([s, 1], data) if *s == w.in_features => Cow::Borrowed(&data[..m * s]),
                _ => Cow::Owned(x.clone().into_data().into_vec::<f32>().expect("f32 tensor")),
            };
            let mut y = vec![0f32; m * w.out_features];
            if cpu::gemm(&xs, m, simd, &mut y).is_ok() {
                return tensor(y, [m, w.out_features]).into_primitive().tensor();
            }
        }
        Self::dense_matmul(x, w.weight_t.clone())
            .into_primitive()
            .tensor()
    }

    fn packed_shape(w: &Self::Packed) -> (usize, usize) {
        (w.out_features, w.in_features)
    }

    fn dense_matmul(x: Tensor<Self, 2>, w_t: Tensor<Self, 2>) -> Tensor<Self, 2> {
        host_matmul(&x, &w_t).unwrap_or_else(|| x.matmul(w_t))
    }

    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 3> {
        let (qp, kp, vp) = (primitive(&q), primitive(&k), primitive(&v));
        let (Some(qh), Some(kh), Some(vh)) = (host(&qp), host(&kp), host(&vp)) else {
            return crate::generic::causal_attention(q, k, v);
        };
        let [b, heads, t_q, d] = q.dims();
        let mut out = vec![0f32; b * t_q * heads * d];
        causal_attention(heads_view(&qh), heads_view(&kh), heads_view(&vh), &mut out);
        tensor(out, [b, t_q, heads * d])
    }

    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>) -> Tensor<Self, 4> {
        let (xp, cp, sp) = (primitive(&x), primitive(&cos), primitive(&sin));
        if let (Some(xh), Some(c), Some(s)) = (host(&xp), host(&cp), host(&sp))
            && is_row_major(&c)
            && is_row_major(&s)
        {
            let dims = x.dims();
            let n = c.dims.iter().product();
            let mut out = vec![0f32; dims.iter().product()];
            rotate_half(heads_view(&xh), &c.data[..n], &s.data[..n], &mut out);
            return tensor(out, dims);
        }
        crate::generic::rotary(x, cos, sin)
    }

    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        let (gp, up_p) = (primitive(&gate), primitive(&up));
        if let (Some(g), Some(u)) = (host(&gp), host(&up_p))
            && g.dims == u.dims
            && is_row_major(&g)
            && is_row_major(&u)
        {
            let n = g.dims.iter().product();
            let mut out = vec![0f32; n];
            cpu::activation::swiglu(&g.data[..n], &u.data[..n], &mut out);
            return tensor(out, gate.dims());
        }
        crate::generic::swiglu(gate, up)
    }

    fn sum_nll(logits: Tensor<Self, 2>, targets: &[u32]) -> f64 {
        let p = primitive(&logits);
        match host(&p) {
            Some(h) if is_row_major(&h) => {
                cpu::activation::sum_nll(&h.data[..h.dims[0] * h.dims[1]], h.dims[1], targets)
            }
            _ => crate::generic::sum_nll(logits, targets),
        }
    }
}
