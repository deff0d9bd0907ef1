//! [`QuantBackend`] for burn-ndarray (f32): the host kernels of [`crate::cpu`] on the
//! tensors' own memory.

use std::borrow::Cow;
use std::sync::Arc;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use burn::prelude::*;
use burn::tensor::{TensorPrimitive, ops::FloatTensor};
use half::{bf16, f16};
use quant_core::PackedLinear;

use crate::cpu::attention::{HeadsView, causal_attention, decode_attention, rotate_half};
use crate::cpu::dense::{MatRef, gram, matmul_new};
use crate::cpu::kv::HostKv;
use crate::quant_linear::{check_bf16_shape, check_f16_shape, dense_transposed};
use crate::{KvDtype, KvStore, QuantBackend, QuantLinearError, WeightKind, cpu};

type B = NdArray<f32>;

/// The ndarray weight, kept compact: products of few rows read it directly, larger ones
/// multiply a transient f32 copy that lives for that product only (a model never holds more
/// than one linear in f32, the one being multiplied).
#[derive(Clone, Debug)]
pub struct NdArrayWeight {
    stored: Arc<Stored>,
    out_features: usize,
    in_features: usize,
}

#[derive(Debug)]
enum Stored {
    /// Packed codes in the SIMD kernel's layout (group size a multiple of 32, as for every
    /// checkpoint this project writes). The kernel layout holds the same bits as the packed
    /// one, so the packed one is not kept beside it.
    Simd(cpu::CpuPacked),
    /// Packed codes of a layout the SIMD kernel does not support: every product multiplies
    /// the dequantized weight.
    Packed(PackedLinear),
    /// A dense `W [out, in]` in f16.
    F16(Vec<f16>),
    /// A dense `W [out, in]` in bf16.
    Bf16(Vec<bf16>),
}

impl NdArrayWeight {
    /// `Ŵᵀ [in, out]` in f32, row-major, built for one product.
    fn widened(&self) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        let shape_ok = "the weight's shape was checked at upload";
        let with_buffer = |fill: &dyn Fn(&mut [f32]) -> Result<(), cpu::CpuKernelError>| {
            let mut w_t = Vec::<f32>::with_capacity(k * n);
            let dst = w_t.spare_capacity_mut();
            // SAFETY: `f32` has no invalid bit patterns and `MaybeUninit<f32>` has its layout;
            // the widening writes every element (it is given exactly `k · n` of them) before
            // any is read. Not zero-filled first: that would write the buffer twice.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), k * n) };
            fill(dst).expect(shape_ok);
            // SAFETY: all `k · n` elements were written above.
            unsafe { w_t.set_len(k * n) };
            w_t
        };
        match &*self.stored {
            Stored::Simd(w) => with_buffer(&|out| cpu::widen::packed_t(w, out)),
            Stored::Packed(p) => dense_transposed(p),
            Stored::F16(w) => with_buffer(&|out| cpu::widen::f16_t(w, n, out)),
            Stored::Bf16(w) => with_buffer(&|out| cpu::widen::bf16_t(w, n, out)),
        }
    }

    /// `y [m, out] = x [m, in] · Ŵᵀ` by a host kernel that reads the stored weight, when one
    /// applies (`m` up to [`cpu::DIRECT_ROWS_PACKED`] or [`cpu::DIRECT_ROWS_16BIT`], a supported layout).
    fn direct_product(&self, x: &[f32], m: usize) -> Option<Vec<f32>> {
        let max_rows = match &*self.stored {
            Stored::Simd(_) => cpu::DIRECT_ROWS_PACKED,
            Stored::Packed(_) => 0,
            Stored::F16(_) | Stored::Bf16(_) => cpu::DIRECT_ROWS_16BIT,
        };
        if m > max_rows {
            return None;
        }
        let n = self.out_features;
        let mut y = vec![0f32; m * n];
        let done = match &*self.stored {
            Stored::Simd(w) => cpu::gemm(x, m, w, &mut y).is_ok(),
            Stored::Packed(_) => false,
            Stored::F16(w) => cpu::dense_f16::gemm_f16(x, m, w, n, &mut y).is_ok(),
            Stored::Bf16(w) => cpu::dense_f16::gemm_bf16(x, m, w, n, &mut y).is_ok(),
        };
        done.then_some(y)
    }
}

/// An f32 tensor's elements with its dims and element strides, borrowed when its memory is
/// laid out with non-negative strides (contiguous in some axis order: fresh results, reshapes,
/// swapped axes), copied into row-major order otherwise.
///
/// burn-ndarray 0.21 copies on every `reshape` (even of a contiguous tensor), so the host ops
/// take tensors in whatever shape the model has them and read them through their strides.
struct Host<'a> {
    data: Cow<'a, [f32]>,
    dims: Vec<usize>,
    strides: Vec<usize>,
}

fn row_major_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

impl<'a> Host<'a> {
    /// `None` for a tensor that is not f32 (the caller then takes the generic path).
    fn of(t: &'a NdArrayTensor) -> Option<Self> {
        let NdArrayTensor::F32(storage) = t else {
            return None;
        };
        let view = storage.view();
        let dims = view.shape().to_vec();
        if view.strides().iter().all(|&s| s >= 0)
            && let Some(data) = view.to_slice_memory_order()
        {
            let strides = view.strides().iter().map(|&s| s as usize).collect();
            return Some(Self {
                data: Cow::Borrowed(data),
                dims,
                strides,
            });
        }
        let owned = view.as_standard_layout().into_owned();
        Some(Self {
            data: Cow::Owned(owned.into_raw_vec_and_offset().0),
            strides: row_major_strides(&dims),
            dims,
        })
    }

    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    fn is_row_major(&self) -> bool {
        self.dims
            .iter()
            .zip(&self.strides)
            .zip(row_major_strides(&self.dims))
            .all(|((&d, &s), want)| d <= 1 || s == want)
    }

    /// The elements in row-major order (borrowed when they already are).
    fn row_major(&self) -> Cow<'_, [f32]> {
        if self.is_row_major() {
            return Cow::Borrowed(&self.data[..self.len()]);
        }
        let mut out = Vec::with_capacity(self.len());
        let mut index = vec![0usize; self.dims.len()];
        for _ in 0..self.len() {
            let at: usize = index.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
            out.push(self.data[at]);
            for (i, &d) in index.iter_mut().zip(&self.dims).rev() {
                *i += 1;
                if *i < d {
                    break;
                }
                *i = 0;
            }
        }
        Cow::Owned(out)
    }

    /// A `[b, t, heads·d]` tensor read as `[b, heads, t, d]`.
    fn heads(&self, heads: usize) -> HeadsView<'_> {
        self.heads_prefix(heads, self.dims[1])
    }

    /// [`Host::heads`] of the first `len` positions.
    fn heads_prefix(&self, heads: usize, len: usize) -> HeadsView<'_> {
        let [b, t, hd]: [usize; 3] = self.dims.as_slice().try_into().expect("a 3-D tensor");
        let [s0, s1, s2]: [usize; 3] = self.strides.as_slice().try_into().expect("3 strides");
        assert!(len <= t, "a prefix of {len} positions of {t}");
        let d = hd / heads;
        HeadsView::new(&self.data, [b, heads, len, d], [s0, d * s2, s1, s2])
    }
}

fn tensor<const D: usize>(data: Vec<f32>, dims: [usize; D]) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from_data(
        TensorData::new(data, dims),
    )))
}

fn primitive<const D: usize>(t: &Tensor<B, D>) -> FloatTensor<B> {
    t.clone().into_primitive().tensor()
}

/// `x [.., K] · w_t [K, N]` on the host (`x`'s leading dims are rows).
fn host_linear<const D: usize>(x: &Host<'_>, dims: [usize; D], w_t: &Host<'_>) -> Tensor<B, D> {
    let (k, n) = (w_t.dims[0], w_t.dims[1]);
    let w = MatRef::new(&w_t.data, k, n, w_t.strides[0], w_t.strides[1]);
    host_product(x, dims, w, [k, n])
}

/// `x [.., K] · w [K, N]` on the host.
fn host_product<const D: usize>(
    x: &Host<'_>,
    dims: [usize; D],
    w: MatRef<'_>,
    [k, n]: [usize; 2],
) -> Tensor<B, D> {
    let rows = x.len() / k.max(1);
    // A matrix is read through its strides (a transposed view, as in `Xᵀ·X`, costs no copy);
    // more dims are flattened into rows, which needs them row-major.
    let y = if let [_, _] = x.dims[..] {
        let x = MatRef::new(&x.data, rows, k, x.strides[0], x.strides[1]);
        matmul_new(x, w, 1.0, true)
    } else {
        matmul_new(MatRef::row_major(&x.row_major(), rows, k), w, 1.0, true)
    };
    let mut out = dims;
    out[D - 1] = n;
    tensor(y, out)
}

/// `reduce` of the elements of `a` and `b` paired by index: on their memory as it is when both
/// are laid out alike (an element-wise reduction does not care about the order), in row-major
/// copies otherwise.
fn with_same_layout(a: &Host, b: &Host, reduce: fn(&[f32], &[f32]) -> f64) -> f64 {
    assert_eq!(a.dims, b.dims, "reduced tensors differ in shape");
    if a.strides == b.strides {
        let n = a.len();
        reduce(&a.data[..n], &b.data[..n])
    } else {
        reduce(&a.row_major(), &b.row_major())
    }
}

impl QuantBackend for B {
    type Weight = NdArrayWeight;
    type KvCache = HostKv;

    /// Two on a pool of two threads or more; one thread would run them in turn.
    fn concurrent_forwards() -> usize {
        rayon::current_num_threads().min(2)
    }

    fn upload(
        packed: &PackedLinear,
        _device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError> {
        packed.validate()?;
        let stored = match cpu::CpuPacked::new(packed) {
            Ok(simd) => Stored::Simd(simd),
            Err(_) => Stored::Packed(packed.clone()),
        };
        Ok(NdArrayWeight {
            out_features: packed.out_features,
            in_features: packed.in_features,
            stored: Arc::new(stored),
        })
    }

    fn upload_f16(
        w: &[f16],
        [out_features, in_features]: [usize; 2],
        _device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError> {
        check_f16_shape(w, [out_features, in_features])?;
        Ok(NdArrayWeight {
            out_features,
            in_features,
            stored: Arc::new(Stored::F16(w.to_vec())),
        })
    }

    fn upload_bf16(
        w: &[bf16],
        [out_features, in_features]: [usize; 2],
        _device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError> {
        check_bf16_shape(w, [out_features, in_features])?;
        Ok(NdArrayWeight {
            out_features,
            in_features,
            stored: Arc::new(Stored::Bf16(w.to_vec())),
        })
    }

    fn quant_matmul(x: FloatTensor<Self>, w: &Self::Weight) -> FloatTensor<Self> {
        Self::quant_linear(
            Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x)),
            w,
        )
        .into_primitive()
        .tensor()
    }

    fn quant_linear<const D: usize>(x: Tensor<Self, D>, w: &Self::Weight) -> Tensor<Self, D> {
        let dims = x.dims();
        let (out_features, in_features) = Self::weight_shape(w);
        assert_eq!(
            dims[D - 1],
            in_features,
            "input features of a quantized linear"
        );
        let xp = primitive(&x);
        let Some(xh) = Host::of(&xp) else {
            return crate::generic::quant_linear(x, w);
        };
        let m = xh.len() / in_features.max(1);
        // Decode-sized M reads the stored weight once (host kernels); larger M would re-read it
        // per 8 rows, where the dense product on the widened weight wins.
        if let Some(y) = w.direct_product(&xh.row_major(), m) {
            let mut out = dims;
            out[D - 1] = out_features;
            return tensor(y, out);
        }
        let w_t = w.widened();
        let wm = MatRef::row_major(&w_t, in_features, out_features);
        host_product(&xh, dims, wm, [in_features, out_features])
    }

    fn quant_linear_many<const D: usize>(
        x: Tensor<Self, D>,
        ws: &[&Self::Weight],
    ) -> Vec<Tensor<Self, D>> {
        // Products the single pass does not take go one by one.
        let each = || {
            ws.iter()
                .map(|w| Self::quant_linear(x.clone(), w))
                .collect()
        };
        let dims = x.dims();
        let k = dims[D - 1];
        let packed: Option<Vec<&cpu::CpuPacked>> = ws
            .iter()
            .map(|w| match &*w.stored {
                Stored::Simd(p) if p.in_features == k => Some(p),
                _ => None,
            })
            .collect();
        let xp = primitive(&x);
        let (Some(packed), Some(xh)) = (packed, Host::of(&xp)) else {
            return each();
        };
        let m = xh.len() / k.max(1);
        if m > cpu::DIRECT_ROWS_PACKED {
            return each();
        }
        let mut ys: Vec<Vec<f32>> = packed
            .iter()
            .map(|w| vec![0f32; m * w.out_features])
            .collect();
        let mut products: Vec<_> = packed
            .iter()
            .copied()
            .zip(ys.iter_mut().map(|y| &mut y[..]))
            .collect();
        cpu::gemm_many(&xh.row_major(), m, &mut products).expect("shapes checked above");
        packed
            .iter()
            .zip(ys)
            .map(|(w, y)| {
                let mut out = dims;
                out[D - 1] = w.out_features;
                tensor(y, out)
            })
            .collect()
    }

    fn weight_shape(w: &Self::Weight) -> (usize, usize) {
        (w.out_features, w.in_features)
    }

    fn weight_kind(w: &Self::Weight) -> WeightKind {
        match &*w.stored {
            Stored::Simd(p) => WeightKind::Packed {
                dim: p.dim,
                bits: p.bits,
                group_size: p.group_size,
            },
            Stored::Packed(p) => WeightKind::Packed {
                dim: p.dim,
                bits: p.bits,
                group_size: p.group_size,
            },
            Stored::F16(_) => WeightKind::F16,
            Stored::Bf16(_) => WeightKind::Bf16,
        }
    }

    fn dense_linear<const D: usize>(x: Tensor<Self, D>, w_t: Tensor<Self, 2>) -> Tensor<Self, D> {
        let (xp, wp) = (primitive(&x), primitive(&w_t));
        match (Host::of(&xp), Host::of(&wp)) {
            (Some(xh), Some(wh)) => host_linear(&xh, x.dims(), &wh),
            _ => crate::generic::dense_linear(x, w_t),
        }
    }

    fn squared_distance<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> f64 {
        let (ap, bp) = (primitive(&a), primitive(&b));
        match (Host::of(&ap), Host::of(&bp)) {
            (Some(ah), Some(bh)) => with_same_layout(&ah, &bh, cpu::reduce::squared_distance),
            _ => crate::generic::squared_distance(a, b),
        }
    }

    fn inner_product<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> f64 {
        let (ap, bp) = (primitive(&a), primitive(&b));
        match (Host::of(&ap), Host::of(&bp)) {
            (Some(ah), Some(bh)) => with_same_layout(&ah, &bh, cpu::reduce::inner_product),
            _ => crate::generic::inner_product(a, b),
        }
    }

    fn flatten_rows<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, 2> {
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        if let NdArrayTensor::F32(storage) = primitive(&x) {
            let array = storage.into_owned();
            if array.is_standard_layout()
                && let Ok(flat) = array.into_shape_with_order(&[rows, dims[D - 1]][..])
            {
                return Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(flat)));
            }
        }
        crate::generic::flatten_rows(x)
    }

    fn difference<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        let (ap, bp) = (primitive(&a), primitive(&b));
        match (Host::of(&ap), Host::of(&bp)) {
            // Other layouts (a transposed weight) would need a serial copy first.
            (Some(x), Some(y)) if x.dims == y.dims && x.is_row_major() && y.is_row_major() => {
                let n = x.len();
                let mut out = vec![0f32; n];
                cpu::activation::difference(&x.data[..n], &y.data[..n], &mut out);
                tensor(out, a.dims())
            }
            _ => a.sub(b),
        }
    }

    fn with_host_values<const D: usize, R>(x: &Tensor<Self, D>, f: impl FnOnce(&[f32]) -> R) -> R {
        let xp = primitive(x);
        match Host::of(&xp) {
            Some(h) => f(&h.row_major()),
            None => crate::generic::with_host_values(x, f),
        }
    }

    fn gram(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let xp = primitive(&x);
        let Some(h) = Host::of(&xp) else {
            return crate::generic::dense_linear(x.clone().transpose(), x);
        };
        let [n, f] = [h.dims[0], h.dims[1]];
        let x = MatRef::new(&h.data, n, f, h.strides[0], h.strides[1]);
        tensor(gram(x), [f, f])
    }

    fn gram_add(sum: Tensor<Self, 2>, x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let xp = primitive(&x);
        let (Some(h), NdArrayTensor::F32(storage)) = (Host::of(&xp), primitive(&sum)) else {
            return sum.add(Self::gram(x));
        };
        let [n, f] = [h.dims[0], h.dims[1]];
        assert_eq!(
            storage.shape(),
            &[f, f],
            "a Gram sum is [features, features]"
        );
        drop(sum);
        // Unique once `sum` is dropped (the pipeline hands over its running sum), so no copy.
        let mut acc = storage.into_owned();
        let Some(dst) = acc.as_slice_mut() else {
            let sum = Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(acc)));
            return sum.add(Self::gram(x));
        };
        cpu::dense::gram_add(MatRef::new(&h.data, n, f, h.strides[0], h.strides[1]), dst);
        Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(acc)))
    }

    fn causal_attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        heads: usize,
        kv_heads: usize,
    ) -> Tensor<Self, 3> {
        let (qp, kp, vp) = (primitive(&q), primitive(&k), primitive(&v));
        let (Some(qh), Some(kh), Some(vh)) = (Host::of(&qp), Host::of(&kp), Host::of(&vp)) else {
            return crate::generic::causal_attention(q, k, v, heads, kv_heads);
        };
        let dims = q.dims();
        let mut out = vec![0f32; dims.iter().product()];
        causal_attention(
            qh.heads(heads),
            kh.heads(kv_heads),
            vh.heads(kv_heads),
            &mut out,
        );
        tensor(out, dims)
    }

    fn rotary(
        x: Tensor<Self, 3>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        heads: usize,
    ) -> Tensor<Self, 3> {
        let (xp, cp, sp) = (primitive(&x), primitive(&cos), primitive(&sin));
        let (Some(xh), Some(c), Some(s)) = (Host::of(&xp), Host::of(&cp), Host::of(&sp)) else {
            return crate::generic::rotary(x, cos, sin, heads);
        };
        let dims = x.dims();
        let mut out = vec![0f32; dims.iter().product()];
        rotate_half(xh.heads(heads), &c.row_major(), &s.row_major(), &mut out);
        tensor(out, dims)
    }

    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        let (gp, up_p) = (primitive(&gate), primitive(&up));
        match (Host::of(&gp), Host::of(&up_p)) {
            (Some(g), Some(u)) if g.dims == u.dims => {
                let mut out = vec![0f32; g.len()];
                cpu::activation::swiglu(&g.row_major(), &u.row_major(), &mut out);
                tensor(out, gate.dims())
            }
            _ => crate::generic::swiglu(gate, up),
        }
    }

    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        let (xp, wp) = (primitive(&x), primitive(&weight));
        match (Host::of(&xp), Host::of(&wp)) {
            (Some(h), Some(w)) if h.dims.last() == w.dims.last() => {
                let mut out = vec![0f32; h.len()];
                cpu::activation::rms_norm(&h.row_major(), &w.row_major(), eps as f32, &mut out);
                tensor(out, x.dims())
            }
            _ => crate::generic::rms_norm(x, weight, eps),
        }
    }

    fn sum_nll(logits: Tensor<Self, 2>, targets: &[u32]) -> f64 {
        let p = primitive(&logits);
        match Host::of(&p) {
            Some(h) => cpu::activation::sum_nll(&h.row_major(), h.dims[1], targets),
            None => crate::generic::sum_nll(logits, targets),
        }
    }
}

/// Keys and values on the host ([`HostKv`]), read in place by the fused attention kernels.
impl KvStore<B> for HostKv {
    fn new(
        dtype: KvDtype,
        kv_heads: usize,
        reserve: usize,
        _device: &burn::backend::ndarray::NdArrayDevice,
    ) -> Self {
        HostKv::empty(dtype, kv_heads, reserve)
    }

    fn len(&self) -> usize {
        HostKv::len(self)
    }

    fn append(&mut self, k: Tensor<B, 3>, v: Tensor<B, 3>) {
        let [b, t, _] = k.dims();
        let (kp, vp) = (primitive(&k), primitive(&v));
        let (Some(kh), Some(vh)) = (Host::of(&kp), Host::of(&vp)) else {
            panic!("keys and values of a KV cache must be f32 tensors");
        };
        HostKv::append_rows(self, &kh.row_major(), &vh.row_major(), b, t);
    }

    fn append_spans(caches: &mut [&mut Self], k: Tensor<B, 3>, v: Tensor<B, 3>, spans: &[usize]) {
        let [b, rows, width] = k.dims();
        assert!(
            b == 1 && v.dims() == [1, rows, width] && rows == spans.iter().sum::<usize>(),
            "keys {:?} and values {:?} are not [1, {}, _]",
            k.dims(),
            v.dims(),
            spans.iter().sum::<usize>()
        );
        assert_eq!(caches.len(), spans.len(), "one span per cache");
        let (kp, vp) = (primitive(&k), primitive(&v));
        let (Some(kh), Some(vh)) = (Host::of(&kp), Host::of(&vp)) else {
            panic!("keys and values of a KV cache must be f32 tensors");
        };
        let (k, v) = (kh.row_major(), vh.row_major());
        let mut at = 0;
        for (cache, &n) in caches.iter_mut().zip(spans) {
            let rows = at * width..(at + n) * width;
            HostKv::append_rows(cache, &k[rows.clone()], &v[rows], 1, n);
            at += n;
        }
    }

    fn attend(&self, q: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
        let dims = q.dims();
        if dims[..2] == [1, 1] {
            return Self::attend_batch(q, &[self], heads);
        }
        let qp = primitive(&q);
        let qh = Host::of(&qp).expect("f32 queries");
        let mut out = vec![0f32; dims.iter().product()];
        self.with_heads(|k, v| causal_attention(qh.heads(heads), k, v, &mut out));
        tensor(out, dims)
    }

    fn attend_batch(q: Tensor<B, 3>, caches: &[&Self], heads: usize) -> Tensor<B, 3> {
        let qp = primitive(&q);
        let qh = Host::of(&qp).expect("f32 queries");
        let dims = q.dims();
        let mut out = vec![0f32; dims.iter().product()];
        decode_attention(&qh.row_major(), caches, heads, &mut out);
        tensor(out, dims)
    }
}
