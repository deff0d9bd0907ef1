//! SIMD paths: runtime detection and one compilation of [`super::tile`] per path.
//!
//! Each path is the same generic tile code instantiated inside a `#[target_feature]`
//! function (function multiversioning), so no intrinsics are written by hand and every
//! path computes the same thing. The choice of path is made once per call, outside the
//! loops, through a function pointer.

use std::sync::OnceLock;

use super::layout::{CpuPacked, LANES};

/// A compilation of the kernel for one instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdPath {
    /// Portable Rust for the baseline target; always available. (The compiler may still use
    /// the baseline SSE2/NEON; it has no FMA.)
    Scalar,
    /// x86-64 AVX2 + FMA: each 16-lane vector is two 256-bit registers.
    Avx2,
    /// x86-64 AVX-512 (F, BW, DQ, VL) + FMA: one 512-bit register per 16 lanes.
    Avx512,
    /// aarch64 NEON (+ FMA): four 128-bit registers per 16 lanes.
    Neon,
}

impl SimdPath {
    pub const ALL: [SimdPath; 4] = [Self::Scalar, Self::Avx2, Self::Avx512, Self::Neon];

    /// Whether this machine can run the path (runtime CPU feature detection).
    pub fn is_supported(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                Self::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Self::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every path this machine supports, `Scalar` first.
    pub fn available() -> Vec<SimdPath> {
        Self::ALL.into_iter().filter(|p| p.is_supported()).collect()
    }

    /// The path [`super::gemm`] uses: the widest supported one (detected once).
    pub fn best() -> SimdPath {
        static BEST: OnceLock<SimdPath> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Self::Avx512, Self::Avx2, Self::Neon]
                .into_iter()
                .find(|p| p.is_supported())
                .unwrap_or(Self::Scalar)
        })
    }
}

/// Per-OC tile `t` → `out[..m]`. Unsafe: the path's CPU features must be present.
pub(crate) type OcFn = unsafe fn(&CpuPacked, &[f32], &[f32], usize, &mut [[f32; LANES]]);
/// Per-IC group `g` → `out[tile·m + m]`. Unsafe: the path's CPU features must be present.
pub(crate) type IcFn = unsafe fn(&CpuPacked, &[f32], usize, &mut Vec<f32>, &mut [[f32; LANES]]);

/// Monomorphises `$f::<B, M, S>` for the runtime `bits` and `m` (1..=8), with `S`
/// accumulator sets so that enough independent FMA chains are in flight: an FMA has a
/// latency of about 4 cycles and two issue per cycle, and each code vector adds one FMA to
/// `M` of the `M·S` chains. `$regs` is how many 16-lane vectors the path's register file
/// holds: where that is 32 (AVX-512's 32 zmm), `M = 4` takes 2 sets, 8 chains instead of
/// 4, which otherwise bound it to 4 cycles per 16 codes; smaller files (AVX2's 16 ymm hold
/// 8 vectors) keep `M·S ≤ 8` accumulators.
macro_rules! select {
    ($f:ident, $bits:expr, $m:expr, $regs:tt) => {
        match $bits {
            2 => select!(@m $f, 2, $m, $regs),
            3 => select!(@m $f, 3, $m, $regs),
            4 => select!(@m $f, 4, $m, $regs),
            _ => select!(@m $f, 8, $m, $regs),
        }
    };
    (@m $f:ident, $b:literal, $m:expr, $regs:tt) => {
        match $m {
            1 => $f::<$b, 1, 4> as _,
            2 => $f::<$b, 2, 2> as _,
            3 => $f::<$b, 3, 2> as _,
            4 => $f::<$b, 4, { select!(@sets4 $regs) }> as _,
            5 => $f::<$b, 5, 1> as _,
            6 => $f::<$b, 6, 1> as _,
            7 => $f::<$b, 7, 1> as _,
            _ => $f::<$b, 8, 1> as _,
        }
    };
    (@sets4 32) => { 2 };
    (@sets4 $regs:tt) => { 1 };
}

macro_rules! simd_path {
    ($module:ident, $arith:ty, $coefs:ty, $regs:tt $(, $feature:literal)?) => {
        pub(crate) mod $module {
            use super::super::layout::{CpuPacked, LANES};
            #[allow(unused_imports)]
            use super::super::tile::{self, Fused, PortableCoefficients, Unfused};
            use super::{IcFn, OcFn};

            $(#[target_feature(enable = $feature)])?
            unsafe fn oc<const B: usize, const M: usize, const S: usize>(
                w: &CpuPacked,
                x: &[f32],
                xsum: &[f32],
                t: usize,
                out: &mut [[f32; LANES]],
            ) {
                tile::oc_tile::<B, M, S, $arith>(w, x, xsum, t, out)
            }

            $(#[target_feature(enable = $feature)])?
            unsafe fn ic<const B: usize, const M: usize, const S: usize>(
                w: &CpuPacked,
                x_pad: &[f32],
                g: usize,
                coef: &mut Vec<f32>,
                out: &mut [[f32; LANES]],
            ) {
                tile::ic_group::<B, M, S, $arith, $coefs>(w, x_pad, g, coef, out)
            }

            pub(crate) fn oc_fn(bits: u32, m: usize) -> OcFn {
                select!(oc, bits, m, $regs)
            }

            pub(crate) fn ic_fn(bits: u32, m: usize) -> IcFn {
                select!(ic, bits, m, $regs)
            }
        }
    };
}

// The register file of each path in 16-lane vectors (see `select!`): x86-64's baseline has
// 16 xmm (4 vectors), AVX2 16 ymm (8), AVX-512 32 zmm (32), NEON 32 q registers (8).
simd_path!(scalar, Unfused, PortableCoefficients, 4);
#[cfg(target_arch = "x86_64")]
simd_path!(avx2, Fused, PortableCoefficients, 8, "avx2,fma");
#[cfg(target_arch = "x86_64")]
simd_path!(
    avx512,
    Fused,
    tile::Avx512Coefficients,
    32,
    "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"
);
#[cfg(target_arch = "aarch64")]
simd_path!(neon, Fused, PortableCoefficients, 8, "neon");

/// The kernels of `path`, or `None` when this build has no such path.
pub(crate) fn kernels(path: SimdPath, bits: u32, m: usize) -> Option<(OcFn, IcFn)> {
    match path {
        SimdPath::Scalar => Some((scalar::oc_fn(bits, m), scalar::ic_fn(bits, m))),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx2 => Some((avx2::oc_fn(bits, m), avx2::ic_fn(bits, m))),
        #[cfg(target_arch = "x86_64")]
        SimdPath::Avx512 => Some((avx512::oc_fn(bits, m), avx512::ic_fn(bits, m))),
        #[cfg(target_arch = "aarch64")]
        SimdPath::Neon => Some((neon::oc_fn(bits, m), neon::ic_fn(bits, m))),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
