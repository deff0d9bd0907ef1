//! CubeCL dequantizing GEMM/GEMV `y = x · Ŵᵀ` on AdaDim's packed weights (features `wgpu`/`cuda`).
//!
//! # Design (memory bandwidth first)
//!
//! At decode sizes (M = 1..64 tokens) the product is bound by reading the weights, so every
//! choice below minimises weight traffic and keeps the dequantization in registers:
//!
//! * **Packed blocks.** 32 codes of `b` bits fill exactly `b` `u32` words for every supported
//!   `b ∈ {2, 3, 4, 8}`, including 3-bit codes straddling words. The unit of work is one such
//!   block: it is loaded once (as `Vector<u32, N>` loads with `N = 4` for 4/8-bit, 2 for 2-bit,
//!   scalar for 3-bit), unpacked with shifts fixed at compile time, and used for all `tm`
//!   tokens of the unit's M-tile. Each weight word is therefore read once per M-tile.
//! * **Per-IC** (`Ŵᵀ [K, N]` packed along N): a unit owns 32 adjacent output channels and walks
//!   the input rows of its K-split, accumulating an outer product in `32 · tm` registers; its
//!   32 columns share one group, so a row costs one parameter load and the zero point becomes
//!   one correction per token. Adjacent units read adjacent blocks of the same row: coalesced.
//! * **Per-OC** (`Ŵ [N, K]` packed along K): `lanes` adjacent units of a cube share one group
//!   of [`OC_ROWS_PER_UNIT`] output rows; lane `l` takes the blocks `l, l + lanes, …` of each
//!   row, so at every step the lanes read `lanes` adjacent blocks of a row (coalesced at any M).
//!   A block is dequantized once in registers (32 codes sharing one scale and zero) and
//!   multiplied into the `tm` tokens of the tile; every activation load serves the unit's rows.
//!   The lanes' sums are then added inside the cube (below), which writes the finished outputs.
//!   `lanes` is a power of two from [`MIN_OC_LANES`] to the 64 units of a cube (fewer only for
//!   rows of fewer blocks), so a cube holds whole row groups; it grows at small M·N to launch
//!   enough units ([`oc_lanes`]).
//! * **In-cube reduction** (per-OC): each unit stores its `rows · tm` sums in shared memory and
//!   a tree over the lanes of each row group halves the active lanes per step (`log₂ lanes`
//!   barriers; no unit returns early, so all reach them). Not `plane_sum`: cubecl 0.10 turns plane ops off on
//!   CPU adapters (lavapipe, where the tests run), plane widths differ between devices (8 to
//!   64) while a row's lanes must not straddle a plane, and shared memory works everywhere.
//! * **Split-K** (per-IC): at M = 1 there are too few output blocks to fill a GPU, so K is split
//!   over cubes along Y, each split at least [`MIN_ROWS_PER_SPLIT`] rows, so the f32 partials
//!   `[splits, M, N]` stay a small fraction of the weight traffic; a second kernel sums them and
//!   casts to the activation type. The splits shrink as M grows, since M-tiles fill the device
//!   instead. (Per-IC cannot reduce in the cube the same way: a unit holds `32 · tm` sums, which
//!   would need up to 32 KiB of shared memory per cube.)
//! * **Parameters.** Scale (f16 bits) and zero (integer) of a group are packed in one `u32`
//!   at upload and decoded in the kernel, so a group costs 4 bytes, as in docs/method.md §7's ideal, and
//!   the kernels need no f16 device support for the weights. Activations may be f32, f16 or
//!   bf16; accumulation is always f32.
//!
//! Device-side re-layout: `qweight` is uploaded unchanged (the on-disk [`PackedLinear`] layout);
//! only scales and zeros are fused into the parameter words. Layers whose row length or group
//! size is not a multiple of 32 (never the case for g = 64/128) are dequantized at upload and
//! multiplied densely instead.
//!
//! Device limits: every upload first checks each buffer against the device's largest buffer
//! ([`device_limits`]) and refuses one that does not fit, naming it ([`DeviceLimitError`]); a
//! product whose activation buffers ([`matmul_buffers`]) do not fit panics with the same message,
//! as Burn's own ops do on impossible shapes.

mod kernel;

use burn::tensor::{
    DType, Shape, TensorData,
    ops::{FloatTensor, FloatTensorOps},
};
use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, kernel::into_contiguous,
    ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
};
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::{bf16, f16};
use quant_core::{PackedLinear, QuantDim};

use crate::quant_linear::{
    QuantLinearError, check_bf16_shape, check_f16_shape, check_input, dense_transposed,
    widened_transposed, widened_transposed_bf16,
};
use crate::{DeviceLimitError, DeviceLimits, QuantBackend, WeightKind};
use kernel::{BLOCK, CUBE_UNITS};
pub use kernel::{REDUCE_MAX_CUBES, REDUCE_UNITS};

/// Units the split-K heuristic aims to launch: enough loads in flight to saturate a GPU's
/// memory system at M = 1.
pub const TARGET_UNITS: usize = 16_384;
/// Fewest input rows a per-IC split handles, so partial sums cost ≤ ~10 % of the weight bytes.
pub const MIN_ROWS_PER_SPLIT: usize = 128;
/// Fewest packed blocks a per-OC lane handles (when the row has enough blocks for
/// [`MIN_OC_LANES`] lanes).
const MIN_BLOCKS_PER_LANE: usize = 4;
/// Output rows of one per-OC unit: they share every activation load (2 halves the loads per
/// multiply-add and keeps the dequantized blocks at 64 registers).
pub const OC_ROWS_PER_UNIT: usize = 2;
/// Lanes a per-OC row gets at least (when it has that many blocks): adjacent blocks read
/// together, 64–256 contiguous bytes of the row per step for 2–8 bits.
pub const MIN_OC_LANES: usize = 8;

/// A linear layer's weight resident on a CubeCL device.
#[derive(Clone)]
pub struct CubeWeight<R: CubeRuntime> {
    out_features: usize,
    in_features: usize,
    stored: DeviceWeight<R>,
}

#[derive(Clone)]
enum DeviceWeight<R: CubeRuntime> {
    /// Codes and fused group parameters, read by the dequantizing kernels.
    Packed {
        dim: QuantDim,
        bits: u32,
        group_size: usize,
        client: ComputeClient<R>,
        qweight: Handle,
        params: Handle,
    },
    /// `Wᵀ [IC, OC]` in f32: a 16-bit weight widened, or a packed layout the kernels do not
    /// cover, dequantized. Multiplied by Burn's matmul.
    Dense(CubeTensor<R>),
}

impl<R: CubeRuntime> std::fmt::Debug for CubeWeight<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CubeWeight")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("kind", &self.kind())
            .finish()
    }
}

impl<R: CubeRuntime> CubeWeight<R> {
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The form the weight is stored in ([`WeightKind::F32`] for the dense path).
    pub fn kind(&self) -> WeightKind {
        match self.stored {
            DeviceWeight::Packed {
                dim,
                bits,
                group_size,
                ..
            } => WeightKind::Packed {
                dim,
                bits,
                group_size,
            },
            DeviceWeight::Dense(_) => WeightKind::F32,
        }
    }
}

/// One `u32` per group: f16 scale bits low, integer zero high. `None` if a zero is not an
/// integer in `0..=0xFFFF` or a scale is not finite (then the layer takes the dense path).
fn fuse_params(packed: &PackedLinear) -> Option<Vec<u32>> {
    packed
        .scales
        .iter()
        .zip(&packed.zeros)
        .map(|(s, z)| {
            let z = z.to_f32();
            let ok = s.is_finite() && z.fract() == 0.0 && (0.0..=65535.0).contains(&z);
            ok.then(|| u32::from(s.to_bits()) | ((z as u32) << 16))
        })
        .collect()
}

/// Words per `Vector` load of `qweight`: must divide `bits` (the words of one block).
fn vector_size(bits: u32) -> usize {
    match bits {
        4 | 8 => 4,
        2 => 2,
        _ => 1,
    }
}

/// `(splits, k_per_split)` for per-IC.
pub fn ic_splits(k: usize, n_blocks: usize, m_tiles: usize) -> (usize, usize) {
    let want = TARGET_UNITS.div_ceil(n_blocks * m_tiles);
    let splits = want.clamp(1, (k / MIN_ROWS_PER_SPLIT).max(1));
    let per = k.div_ceil(splits);
    (k.div_ceil(per), per)
}

/// Lanes per output row for per-OC: a power of two dividing the cube, so a cube holds whole
/// rows. As many as it takes to launch [`TARGET_UNITS`] units, at least [`MIN_OC_LANES`] (so
/// the reads of a row stay coalesced), at most what gives every lane
/// `MIN_BLOCKS_PER_LANE` blocks, and never more than the row has blocks.
pub fn oc_lanes(k_blocks: usize, n: usize, m_tiles: usize) -> usize {
    let want = TARGET_UNITS
        .div_ceil(n.div_ceil(OC_ROWS_PER_UNIT) * m_tiles)
        .next_power_of_two();
    let most = prev_power_of_two(k_blocks / MIN_BLOCKS_PER_LANE).clamp(MIN_OC_LANES, CUBE_UNITS);
    want.clamp(MIN_OC_LANES, most)
        .min(k_blocks.max(1).next_power_of_two())
}

/// The largest power of two `≤ v` (1 for 0).
fn prev_power_of_two(v: usize) -> usize {
    if v == 0 { 1 } else { 1 << v.ilog2() }
}

/// Tokens per unit: per-IC keeps `32 · tm` accumulators, so it stops at 4.
pub fn m_tile(dim: QuantDim, m: usize) -> usize {
    let cap = match dim {
        QuantDim::Ic => 4,
        QuantDim::Oc => 8,
    };
    m.next_power_of_two().min(cap)
}

/// The limits of `device` as its cubecl runtime reports them: the largest page its memory
/// manager allocates, which on wgpu is the device's maximum storage-buffer binding size (so
/// also the largest buffer a kernel may bind) and on CUDA a quarter of the device's memory.
/// Neither runtime reports the memory itself.
pub fn device_limits<R: CubeRuntime>(device: &R::Device) -> DeviceLimits {
    let client = R::client(device);
    DeviceLimits {
        max_buffer_bytes: Some(client.properties().memory.max_page_size),
        memory_bytes: None,
    }
}

/// Bytes of `n` values of `size` bytes (saturating: a product past `u64` fits no device).
fn bytes(n: usize, size: usize) -> u64 {
    (n as u64).saturating_mul(size as u64)
}

/// The device buffers of a packed weight on the kernel path: the codes as stored, and one
/// parameter word per group.
pub fn weight_buffers(packed: &PackedLinear) -> [(&'static str, u64); 2] {
    [
        ("qweight", bytes(packed.qweight.len(), 4)),
        ("scales+zeros", bytes(packed.scales.len(), 4)),
    ]
}

/// The device buffers a [`quant_matmul`] of `x [m, k]` (elements of `act_bytes`) by a `[n, k]`
/// weight allocates: the input (made contiguous), the output and, per-IC, the split-K partial
/// sums.
pub fn matmul_buffers(
    dim: QuantDim,
    [m, n, k]: [usize; 3],
    act_bytes: usize,
) -> Vec<(&'static str, u64)> {
    let mut buffers = vec![
        ("x", bytes(m * k, act_bytes)),
        ("y", bytes(m * n, act_bytes)),
    ];
    if dim == QuantDim::Ic && m > 0 && n >= BLOCK {
        let tm = m_tile(dim, m);
        let (splits, _) = ic_splits(k, n / BLOCK, m.div_ceil(tm));
        buffers.push((
            "split-K partial sums",
            bytes(splits * m * n, size_of::<f32>()),
        ));
    }
    buffers
}

/// Uploads `packed` to the device of `client` (validated, and checked against the device's
/// limits, first).
pub fn upload<R: CubeRuntime>(
    packed: &PackedLinear,
    device: &R::Device,
) -> Result<CubeWeight<R>, QuantLinearError> {
    upload_within(packed, device, &device_limits::<R>(device))
}

/// [`upload`] against the given `limits` (a device cannot be made smaller to test a refusal).
pub fn upload_within<R: CubeRuntime>(
    packed: &PackedLinear,
    device: &R::Device,
    limits: &DeviceLimits,
) -> Result<CubeWeight<R>, QuantLinearError> {
    packed.validate()?;
    let client = R::client(device);
    let (_, cols) = packed.rows_cols();
    let kernel_ok = packed.group_size.is_multiple_of(BLOCK) && cols.is_multiple_of(BLOCK);
    let stored = match fuse_params(packed).filter(|_| kernel_ok) {
        Some(params) => {
            for (tensor, size) in weight_buffers(packed) {
                limits.check_buffer(tensor, size)?;
            }
            DeviceWeight::Packed {
                dim: packed.dim,
                bits: packed.bits,
                group_size: packed.group_size,
                qweight: client.create_from_slice(bytemuck::cast_slice(&packed.qweight)),
                params: client.create_from_slice(bytemuck::cast_slice(&params)),
                client,
            }
        }
        None => {
            check_dense(limits, [packed.out_features, packed.in_features])?;
            tracing::debug!(
                "layer {}x{} ({}, g={}) takes the dense path",
                packed.out_features,
                packed.in_features,
                packed.dim,
                packed.group_size
            );
            dense_weight(
                client,
                device,
                dense_transposed(packed),
                [packed.out_features, packed.in_features],
            )
        }
    };
    Ok(CubeWeight {
        out_features: packed.out_features,
        in_features: packed.in_features,
        stored,
    })
}

/// `Ŵᵀ [in, out]` (f32, row-major) as a dense device weight.
fn dense_weight<R: CubeRuntime>(
    client: ComputeClient<R>,
    device: &R::Device,
    w_t: Vec<f32>,
    [out_features, in_features]: [usize; 2],
) -> DeviceWeight<R> {
    let data = TensorData::new(w_t, [in_features, out_features]);
    let handle = client.create_from_slice(data.as_bytes());
    DeviceWeight::Dense(CubeTensor::new_contiguous(
        client,
        device.clone(),
        Shape::new([in_features, out_features]),
        handle,
        DType::F32,
    ))
}

/// Checks that the dense f32 `Ŵᵀ` of an `[out, in]` weight fits one device buffer.
fn check_dense(
    limits: &DeviceLimits,
    [out_features, in_features]: [usize; 2],
) -> Result<(), DeviceLimitError> {
    limits.check_buffer(
        "weight",
        bytes(out_features * in_features, size_of::<f32>()),
    )
}

/// A dense `W [out, in]` given in f16 (see [`QuantBackend::upload_f16`]), widened to f32: it is
/// multiplied by Burn's matmul like the dense fallback.
pub fn upload_f16<R: CubeRuntime>(
    w: &[f16],
    shape: [usize; 2],
    device: &R::Device,
) -> Result<CubeWeight<R>, QuantLinearError> {
    upload_f16_within(w, shape, device, &device_limits::<R>(device))
}

/// [`upload_f16`] against the given `limits`.
pub fn upload_f16_within<R: CubeRuntime>(
    w: &[f16],
    shape: [usize; 2],
    device: &R::Device,
    limits: &DeviceLimits,
) -> Result<CubeWeight<R>, QuantLinearError> {
    check_f16_shape(w, shape)?;
    check_dense(limits, shape)?;
    Ok(dense_16(widened_transposed(w, shape), shape, device))
}

/// A dense `W [out, in]` given in bf16, widened to f32 as [`upload_f16`] does.
pub fn upload_bf16<R: CubeRuntime>(
    w: &[bf16],
    shape: [usize; 2],
    device: &R::Device,
) -> Result<CubeWeight<R>, QuantLinearError> {
    check_bf16_shape(w, shape)?;
    check_dense(&device_limits::<R>(device), shape)?;
    Ok(dense_16(widened_transposed_bf16(w, shape), shape, device))
}

/// The device weight of a widened 16-bit `W`.
fn dense_16<R: CubeRuntime>(w_t: Vec<f32>, shape: [usize; 2], device: &R::Device) -> CubeWeight<R> {
    let [out_features, in_features] = shape;
    CubeWeight {
        out_features,
        in_features,
        stored: dense_weight(R::client(device), device, w_t, shape),
    }
}

/// Runs `$body` with `$E` bound to the cubecl float type of `$dtype`.
macro_rules! dispatch_float {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $E = f32;
                $body
            }
            DType::F16 => {
                type $E = half::f16;
                $body
            }
            DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            other => panic!("quantized matmul: unsupported activation dtype {other:?}"),
        }
    };
}

/// `x [M, IC] · Ŵᵀ → [M, OC]` in `x`'s float type; panics if `x` is not `[M, IC]`.
pub fn quant_matmul<R, F, I, BT>(x: CubeTensor<R>, w: &CubeWeight<R>) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dims = x.meta.shape().to_vec();
    if let Err(e) = check_input(&dims, w.in_features) {
        panic!("{e}");
    }
    let (dim, bits, group_size, client, qweight, params) = match &w.stored {
        DeviceWeight::Dense(wt) => {
            type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;
            let wt = if wt.dtype == x.dtype {
                wt.clone()
            } else {
                B::<R, F, I, BT>::float_cast(wt.clone(), x.dtype.into())
            };
            return B::<R, F, I, BT>::float_matmul(x, wt);
        }
        DeviceWeight::Packed {
            dim,
            bits,
            group_size,
            client,
            qweight,
            params,
        } => (*dim, *bits, *group_size, client, qweight, params),
    };
    let (m, k, n) = (dims[0], w.in_features, w.out_features);
    if let Err(e) = device_limits::<R>(&x.device).check_all(
        "quantized matmul",
        &matmul_buffers(dim, [m, n, k], x.dtype.size()),
    ) {
        panic!("{e}");
    }
    let x = into_contiguous(x);
    let y = empty_device_contiguous_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([m, n]),
        x.dtype,
    );
    if m == 0 {
        return y;
    }
    let tm = m_tile(dim, m);
    let m_tiles = m.div_ceil(tm);
    let vec = vector_size(bits);
    let group_blocks = group_size / BLOCK;
    let (cols, rows) = match dim {
        QuantDim::Ic => (n, k),
        QuantDim::Oc => (k, n),
    };
    // SAFETY: `qweight` holds the layer's `rows · cols · bits / 32` words (checked by
    // `validate` at upload); the kernel path requires `cols % 32 == 0`, so that count is exact,
    // and `vec` divides `bits`, so it is a whole number of `vec`-word vectors.
    let qweight_arg = unsafe {
        ArrayArg::from_raw_parts(qweight.clone(), rows * cols * bits as usize / 32 / vec)
    };
    // SAFETY: `params` holds one word per group, `rows · cols / group_size` (one per scale,
    // `fuse_params`, of a validated layer).
    let params_arg = unsafe { ArrayArg::from_raw_parts(params.clone(), rows * cols / group_size) };
    // SAFETY: `x` is contiguous, `[m, k]` (`check_input`), of the dtype the kernels are
    // instantiated with (`dispatch_float!` on `x.dtype`).
    let x_arg = unsafe { ArrayArg::from_raw_parts(x.handle.clone(), m * k) };
    let len = m * n;
    // SAFETY: `y` was just allocated contiguous `[m, n]` in `x.dtype`.
    let y_arg = unsafe { ArrayArg::from_raw_parts(y.handle.clone(), len) };
    let cube_dim = CubeDim::new_1d(CUBE_UNITS as u32);

    match dim {
        QuantDim::Ic => {
            let n_blocks = n / BLOCK;
            let (splits, per) = ic_splits(k, n_blocks, m_tiles);
            let partial = client.empty(splits * len * size_of::<f32>());
            // SAFETY: `partial` was just allocated with `splits · len` f32s.
            let partial_arg = || unsafe { ArrayArg::from_raw_parts(partial.clone(), splits * len) };
            let count = CubeCount::Static(
                n_blocks.div_ceil(CUBE_UNITS) as u32,
                splits as u32,
                m_tiles as u32,
            );
            // SAFETY: the kernel indexes without bounds checks, within the arrays above: units
            // past `n / 32` blocks exit; split `s < splits = ⌈k / per⌉` reads rows
            // `s·per .. min((s+1)·per, k)`, so `qweight`, `params` and `x` rows are `< k`; tokens
            // `≥ m` are skipped; it writes `partial[(s·m + t)·n + c]`, `c < n`. `cube_dim` is the
            // `CUBE_UNITS` the kernel was written for and `vec` the vector width of `qweight`.
            dispatch_float!(x.dtype, E => unsafe {
                kernel::quant_matmul_ic::launch_unchecked::<E, R>(
                    client, count, cube_dim, vec, x_arg, qweight_arg, params_arg,
                    partial_arg(), m, k, n, per, bits, vec, group_blocks, tm,
                )
            });
            let cubes = len.div_ceil(REDUCE_UNITS).min(REDUCE_MAX_CUBES);
            let count = CubeCount::Static(cubes as u32, 1, 1);
            // SAFETY: the kernel only touches outputs `i < len`: it reads `partial[s·len + i]`,
            // `s < splits`, and writes `y[i]`, within the `splits · len` and `len` elements of
            // both arrays.
            dispatch_float!(y.dtype, E => unsafe {
                kernel::reduce_splits::launch_unchecked::<E, R>(
                    client, count, CubeDim::new_1d(REDUCE_UNITS as u32), partial_arg(), y_arg,
                    len, splits,
                )
            });
        }
        QuantDim::Oc => {
            let lanes = oc_lanes(k / BLOCK, n, m_tiles);
            let ru = OC_ROWS_PER_UNIT;
            let count = CubeCount::Static(
                n.div_ceil(CUBE_UNITS / lanes * ru) as u32,
                1,
                m_tiles as u32,
            );
            // SAFETY: the kernel indexes without bounds checks: rows and tokens past `n`, `m`
            // (`m ≥ 1` here, `n ≥ 1` by `validate`) are clamped to the last one for reads and never written; blocks
            // are `< k / 32` and groups `< k / group_size` of a clamped row; shared memory is
            // indexed `i · CUBE_UNITS + unit` with `i < ru · tm`, and the tree adds lane
            // `l + stride < lanes` of the same group, since `lanes` (a power of two ≤
            // `CUBE_UNITS`, `oc_lanes`) divides the cube of `CUBE_UNITS` units launched here.
            dispatch_float!(x.dtype, E => unsafe {
                kernel::quant_matmul_oc::launch_unchecked::<E, R>(
                    client, count, cube_dim, vec, x_arg, qweight_arg, params_arg, y_arg,
                    m, k, n, lanes, ru, bits, vec, group_blocks, tm,
                )
            });
        }
    }
    y
}

impl<R, F, I, BT> QuantBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type Weight = CubeWeight<R>;
    type KvCache = crate::TensorKv<Self>;

    fn device_limits(device: &Self::Device) -> DeviceLimits {
        device_limits::<R>(device)
    }

    fn upload(
        packed: &PackedLinear,
        device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError> {
        upload::<R>(packed, device)
    }

    fn upload_f16(
        w: &[f16],
        shape: [usize; 2],
        device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError> {
        upload_f16::<R>(w, shape, device)
    }

    fn upload_bf16(
        w: &[bf16],
        shape: [usize; 2],
        device: &Self::Device,
    ) -> Result<Self::Weight, QuantLinearError> {
        upload_bf16::<R>(w, shape, device)
    }

    fn quant_matmul(x: FloatTensor<Self>, w: &Self::Weight) -> FloatTensor<Self> {
        quant_matmul::<R, F, I, BT>(x, w)
    }

    fn weight_shape(w: &Self::Weight) -> (usize, usize) {
        (w.out_features, w.in_features)
    }

    fn weight_kind(w: &Self::Weight) -> WeightKind {
        w.kind()
    }
}
