//! CPU kernels. The main one, in this module: `y = x · Ŵᵀ` for decode-sized `M`, straight from
//! AdaDim's packed weights. Beside it, the host ops that make the f32 forward fast on the ndarray
//! backend ([`crate::QuantBackend`]'s fused ops): [`attention`] (causal GQA attention and rotary
//! embedding on strided head views), [`activation`] (softmax, log-sum-exp, cross-entropy and
//! SwiGLU with a vectorised `exp`, and RMS norm), [`dense`] (strided f32 products through `gemm`),
//! [`dense_f16`] (decode-sized products on f16 and bf16 weights, widened in registers) and
//! [`widen`] (the transient f32 copy of a compact weight that larger products multiply) and
//! [`reduce`] (fused, parallel sums of squared errors).
//!
//! # Use
//! Re-lay out a [`quant_core::PackedLinear`] once with [`CpuPacked::new`], then call
//! [`gemm()`] (the fastest kernel this CPU has), [`gemm_with`] (f32 on a forced [`SimdPath`], for
//! tests and benchmarks) or [`vnni::gemm`] (int8 dot products on activations rounded to 8 bits,
//! which [`gemm()`] picks on CPUs with AVX512-VNNI and VBMI or with AVX2; see [`vnni`]).
//! Weights are
//! read once per call (for `M ≤ 8`) and decoded in registers; rows of `x` beyond 8 are
//! processed in chunks of 8, each re-reading the weights: for large `M` (beyond
//! [`DIRECT_ROWS_PACKED`]), dequantize once and call a dense matmul instead. The rest of this
//! doc describes the f32 kernel.
//!
//! # Loop structure
//! Both dims are computed by the same tiles: 16 consecutive output channels (one 512-bit
//! vector of f32, two of 256 bits on AVX2) and, per reduction step `k`, one vector of 16
//! codes, unpacked from interleaved bit streams (see [`CpuPacked`]). A code `q` is decoded
//! not to the float `q` but to `q̃ = 1 + q/2^b`, by moving its bits into the top of the
//! mantissa of 1.0 (a shift and an and-or, no int→float conversion); since
//! `s(q − z) = s̃(q̃ − z̃)` with `s̃ = 2^b·s`, `z̃ = 1 + z/2^b`, the formulas below hold with
//! `q̃, s̃, z̃` in place of `q, s, z`. Where the scale and zero sit is what differs:
//!
//! * **per-OC** (groups along `k`, rows of `W`): *dot-product-like*. A tile walks its 16
//!   rows along `k`; within a group the scale/zero are one 16-wide vector, so
//!   `Σ_{k∈g} x_k (q_k − z)s = s·Σ_{k∈g} x_k q_k − z·s·Σ_{k∈g} x_k`: the inner loop is a
//!   plain `acc += x_k · q_k`, and the scale is applied once per group and lane, with
//!   `Σ_{k∈g} x_k` computed once per call for all tiles.
//! * **per-IC** (groups along the outputs, rows of `Wᵀ`): *axpy-like*. Row `k` of `Wᵀ`
//!   holds one scale/zero per `group_size` outputs, so a whole group of outputs
//!   (`group_size/16` tiles) shares the scalar `s_{k,g}` at each `k`: it folds into the
//!   activation once per group (`c_k = x_k·s_{k,g}`), the zero term `Σ_k x_k z_{k,g} s_{k,g}`
//!   is one number per group, and the inner loop is `acc += c_k · q[k, 16 outputs]`. The
//!   `c_k` and the zero term come from one vectorised pass over `k` per group (f16 scales
//!   and zeros widened 16 at a time), whose output, `k` floats per row of `x`, the group's
//!   tiles then read from L1/L2; it costs `1/(tiles per group)` of a tile's work.
//!
//! Threads (rayon) split the outputs: per-OC over tiles of 16 rows, per-IC over groups of
//! `group_size` output columns, so both cores are busy at `M = 1`. [`gemm_many`] runs the
//! products of several weights on one input (a layer's q, k and v; its gate and up) as one
//! split, so the products of a decode step fork and join the threads 4 times a layer, not 7.
//!
//! # SIMD
//! The tile code is portable Rust over `[f32; 16]` lane arrays, compiled once per
//! [`SimdPath`] inside `#[target_feature]` functions and picked at run time
//! (`is_x86_feature_detected!`). No SIMD crate or intrinsic is needed: LLVM vectorises the
//! fixed-size lane loops fully (per 16 codes on AVX-512: `vpsrld`/`vpslld` → `vpternlogd`
//! (mask and or 1.0) → `vfmadd` with the coefficient broadcast from memory), and the
//! bit-unpacking of split 3-bit codes, which SIMD-crate abstractions do not cover better, is
//! written once for every width. Keep slice accesses in the tile code provably
//! in bounds (fixed-size arrays, `as_chunks`): a bounds check LLVM cannot hoist stops it
//! vectorising the loop around it. One piece has AVX-512 intrinsics beside its portable
//! version: the per-IC coefficient pass, where LLVM kept an accumulator in memory
//! (`tile::Avx512Coefficients`; 1.23× the per-IC product on 4096 × 4096 at 8 rows).

pub mod activation;
pub mod attention;
pub mod dense;
pub mod dense_f16;
mod f16;
pub mod kv;
mod layout;
pub mod reduce;
mod simd;
mod tile;
pub mod vnni;
pub mod widen;

use quant_core::{QuantDim, QuantError};
use rayon::prelude::*;

pub use layout::CpuPacked;
pub use simd::SimdPath;

use layout::LANES;

/// Rows of `x` a kernel multiplies at once (accumulators for 8 rows fit in registers): the f32
/// kernel takes them per pass over the weight; the int8 one ([`vnni`]) runs every chunk of
/// them through a tile while its codes are in cache, in one pass.
pub const MAX_M_PER_PASS: usize = 8;

/// Products of up to this many rows read a packed weight directly on the ndarray backend, in
/// chunks of [`MAX_M_PER_PASS`] rows; larger ones multiply a transient f32 copy. A fresh
/// copy is mostly page faults (with the system allocator, about 75 ms for a LLaMA-7B
/// 11008 × 4096 linear), so re-reading the codes wins far beyond one pass: measured on 3-bit
/// g64 weights, the direct product takes 0.3–0.7× the copy's time at 32–128 rows on
/// LLaMA-7B's MLP shapes and 0.2–1.15× on SmolLM2's. Prompts (prefill) and decode batches
/// are below it; evaluation windows and calibration batches are above.
pub const DIRECT_ROWS_PACKED: usize = 128;

/// [`DIRECT_ROWS_PACKED`] for f16/bf16 weights, whose direct product widens every weight in
/// registers on each pass: 0.25–0.8× the copy's time at 32–128 rows on 11008 × 4096, 0.8–1.3×
/// at 32–64 rows on 1536 × 576.
pub const DIRECT_ROWS_16BIT: usize = 64;

/// Why a CPU product could not run.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CpuKernelError {
    #[error("invalid packed weight: {0}")]
    Weight(#[from] QuantError),
    #[error("group size {0} is not a multiple of 32, which the CPU kernel's 32-code blocks need")]
    GroupSize(usize),
    #[error("x has {got} elements, expected m × in_features = {m} × {in_features}")]
    XShape {
        got: usize,
        m: usize,
        in_features: usize,
    },
    #[error("a dense weight of {got} elements is not [{out_features}, in_features]")]
    WShape { got: usize, out_features: usize },
    #[error("y has {got} elements, expected m × out_features = {m} × {out_features}")]
    YShape {
        got: usize,
        m: usize,
        out_features: usize,
    },
    #[error(
        "a widened weight buffer of {got} elements is not in_features × out_features = \
         {in_features} × {out_features}"
    )]
    WidenedShape {
        got: usize,
        in_features: usize,
        out_features: usize,
    },
    #[error("SIMD path {0:?} is not supported on this machine")]
    Unsupported(SimdPath),
    #[error("this CPU has no int8 dot products (AVX-512 VNNI with VBMI, or AVX2)")]
    NoInt8,
}

/// `y[m, out] = x[m, in] · Ŵᵀ`, the fastest way this machine has: int8 dot products where the
/// CPU has them ([`vnni`], activations rounded to 8 bits), otherwise f32 on the best SIMD path.
pub fn gemm(x: &[f32], m: usize, w: &CpuPacked, y: &mut [f32]) -> Result<(), CpuKernelError> {
    if vnni::is_supported() {
        return vnni::gemm(x, m, w, y);
    }
    gemm_with(SimdPath::best(), x, m, w, y)
}

/// [`gemm()`] of several weights with the same input `x`, each `(w, y)` getting
/// `y[m, w.out_features]`: on the int8 kernel one parallel pass for all of them
/// ([`vnni::gemm_many`]), otherwise one [`gemm_with`] each.
pub fn gemm_many(
    x: &[f32],
    m: usize,
    products: &mut [(&CpuPacked, &mut [f32])],
) -> Result<(), CpuKernelError> {
    if vnni::is_supported() {
        return vnni::gemm_many(x, m, products);
    }
    products
        .iter_mut()
        .try_for_each(|(w, y)| gemm_with(SimdPath::best(), x, m, w, y))
}

/// [`gemm()`] on a given SIMD path (an error if the machine lacks it).
pub fn gemm_with(
    path: SimdPath,
    x: &[f32],
    m: usize,
    w: &CpuPacked,
    y: &mut [f32],
) -> Result<(), CpuKernelError> {
    let (k, n) = (w.in_features, w.out_features);
    check_call(path, x, m, k, y, n)?;
    for (xc, yc) in x
        .chunks(MAX_M_PER_PASS * k)
        .zip(y.chunks_mut(MAX_M_PER_PASS * n))
    {
        let (oc, ic) = simd::kernels(path, w.bits, xc.len() / k.max(1))
            .ok_or(CpuKernelError::Unsupported(path))?;
        match w.dim {
            QuantDim::Oc => pass_oc(oc, xc, w, yc),
            QuantDim::Ic => pass_ic(ic, xc, w, yc),
        }
    }
    Ok(())
}

/// The checks every product on a given path makes before it runs: [`check_shapes`] and a
/// supported path.
fn check_call(
    path: SimdPath,
    x: &[f32],
    m: usize,
    k: usize,
    y: &[f32],
    n: usize,
) -> Result<(), CpuKernelError> {
    check_shapes(x, m, k, y, n)?;
    if !path.is_supported() {
        return Err(CpuKernelError::Unsupported(path));
    }
    Ok(())
}

/// The checks every product makes before it runs: `x [m, k]`, `y [m, n]`.
fn check_shapes(x: &[f32], m: usize, k: usize, y: &[f32], n: usize) -> Result<(), CpuKernelError> {
    if x.len() != m * k {
        return Err(CpuKernelError::XShape {
            got: x.len(),
            m,
            in_features: k,
        });
    }
    if y.len() != m * n {
        return Err(CpuKernelError::YShape {
            got: y.len(),
            m,
            out_features: n,
        });
    }
    Ok(())
}

fn pass_oc(f: simd::OcFn, x: &[f32], w: &CpuPacked, y: &mut [f32]) {
    let m = y.len() / w.out_features;
    let xsum: Vec<f32> = x
        .chunks(w.group_size)
        .map(|g| g.iter().sum::<f32>())
        .collect();
    let mut out = vec![[0f32; LANES]; w.n_tiles * m];
    out.par_chunks_mut(m).enumerate().for_each(|(t, o)| {
        // SAFETY: `gemm_with` checked that the CPU supports the path `f` was compiled for.
        unsafe { f(w, x, &xsum, t, o) }
    });
    scatter(&out, m, w.out_features, y);
}

fn pass_ic(f: simd::IcFn, x: &[f32], w: &CpuPacked, y: &mut [f32]) {
    let m = y.len() / w.out_features;
    let x_pad = pad_rows(x, w.in_features, w.k_pad);
    let tiles_per_group = w.group_size / LANES;
    let mut out = vec![[0f32; LANES]; w.n_tiles * m];
    out.par_chunks_mut(tiles_per_group * m)
        .enumerate()
        .for_each_init(Vec::new, |coef, (g, o)| {
            // SAFETY: `gemm_with` checked that the CPU supports the path `f` was compiled for.
            unsafe { f(w, &x_pad, g, coef, o) }
        });
    scatter(&out, m, w.out_features, y);
}

/// Rows of `k` values, each zero-padded to `k_pad`: `x` itself when there is nothing to pad
/// (every per-OC weight, and per-IC ones whose inputs fill whole blocks).
fn pad_rows(x: &[f32], k: usize, k_pad: usize) -> std::borrow::Cow<'_, [f32]> {
    if k == k_pad {
        return std::borrow::Cow::Borrowed(x);
    }
    let mut x_pad = vec![0f32; x.len() / k.max(1) * k_pad];
    for (dst, src) in x_pad.chunks_mut(k_pad).zip(x.chunks(k)) {
        dst[..k].copy_from_slice(src);
    }
    std::borrow::Cow::Owned(x_pad)
}

/// Hints the cache line holding `p` into L1. A prefetch never faults, so `p` may point anywhere
/// (past the end of a buffer, say): it is only computed, never dereferenced.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching has no memory-safety effect, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] into L2 only, for lines needed later than L1 could hold them.
#[inline(always)]
pub(crate) fn prefetch_l2<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching has no memory-safety effect, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Tile-major `[tile][m][lane]` → row-major `y[m, n]`, dropping the padding lanes.
fn scatter(out: &[[f32; LANES]], m: usize, n: usize, y: &mut [f32]) {
    for (t, tile) in out.chunks(m).enumerate() {
        let (lo, hi) = (t * LANES, ((t + 1) * LANES).min(n));
        for (mm, lanes) in tile.iter().enumerate() {
            y[mm * n + lo..mm * n + hi].copy_from_slice(&lanes[..hi - lo]);
        }
    }
}
