//! Group quantization for AdaDim: asymmetric RTN and GPTQ, per output channel (OC) or per
//! input channel (IC), and the packed format the kernels read.
//!
//! # The grouped layout: one code path for both dims
//!
//! Every algorithm is written once for the *grouped layout*: a `rows × cols` matrix whose groups
//! run along `cols` (see [`QuantDim::grouped_shape`]). Per-OC uses `W [OC, IC]` itself; per-IC
//! uses `Wᵀ [IC, OC]`, so per-IC quantization of `W` *is* per-OC quantization of `Wᵀ`:
//!
//! ```text
//!  per-OC: W  [OC rows × IC cols]        per-IC: Wᵀ [IC rows × OC cols]
//!   row o: | g | g | g | ... |            row k (= input channel k): | g | g | ... |
//!          one scale/zero per g inputs           one scale/zero per g output channels
//!  scales/zeros: [OC, IC/g]               scales/zeros: [IC, OC/g]
//! ```
//!
//! [`quantize_rtn`] is docs/method.md §2 on that layout; [`gptq`] is docs/method.md §3 given a [`Hessian`] of the
//! layer's calibration inputs. Both return a [`Quantized`] (f32 scales/zeros, `u8` codes) whose
//! [`Quantized::pack`] gives the on-disk and in-kernel [`PackedLinear`].
//!
//! # The packed format (docs/method.md §6)
//!
//! Each grouped row is one little-endian bit stream of `cols` codes starting on a fresh `u32`
//! word (`words_per_row = ceil(cols·b/32)`); scales and zeros are f16, `ŵ = (q − zero)·scale`:
//!
//! ```text
//!  qweight [rows × words_per_row] u32           scales, zeros [rows × cols/g] f16
//!  row r:  | w0 | w1 | ... |                     row r: | s0 | s1 | ... |
//!           b=4: 8 codes a word, c0 in bits 0..4        s_j covers codes j·g .. (j+1)·g of row r
//!           b=3: 32 codes in 3 words (c10, c21 straddle words)
//! ```
//!
//! For per-IC the kernel's thread that owns input channel `k` reads packed row `k` (all `OC`
//! output channels' codes of that input) and one scale/zero per `g` output channels, i.e. the
//! weights `W[o, k]` for `o = j·g .. (j+1)·g` share `scales[k, j]`. See [`packing`] for the bit
//! order.
//!
//! # Where computation happens
//!
//! The math is host f32 on slices, parallel with `rayon` and the `gemm` crate; GPTQ's
//! factorizations are f64 (see `linalg`). The crate knows no tensor library: a caller that has
//! its calibration inputs on a device computes `XᵀX` there and hands it over with
//! [`Hessian::from_matrix`] (the AdaDim pipeline does, in `adadim::stats`).

pub mod awq;
mod config;
mod error;
mod gptq;
mod hessian;
mod linalg;
pub mod packing;
mod q8;
mod quantized;
mod range;
pub mod refit;
mod rtn;

pub use config::{GroupSize, QuantConfig, QuantDim};
pub use error::QuantError;
pub use gptq::{GptqOptions, GptqResult, gptq};
pub use hessian::Hessian;
pub use q8::{Q8_GROUP, quantize_q8};
pub use quantized::{PackedLinear, Quantized, from_grouped, to_grouped, transpose};
pub use range::{RangeMode, search_range};
pub use rtn::{GroupParams, centre_code, quantize_rtn, quantize_rtn_with, round_half_even};
