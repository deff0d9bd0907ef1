//! The default of every quantization parameter, written once: the CLI's flags, the keys a
//! config (`configs/*.toml`, read as a [`crate::RunSpec`]) leaves out, and
//! [`crate::QuantizeOptions::default`] all take them from here. GPTQ's own knobs default to
//! [`quant_core::GptqOptions::default`].

use quant_core::{GroupSize, RangeMode};

use crate::pipeline::Method;
use crate::policy::DimPolicy;

pub const BITS: u32 = 3;
/// The paper's group length (docs/method.md §5).
pub const GROUP_SIZE: GroupSize = GroupSize::Len(128);
pub const METHOD: Method = Method::Rtn;
pub const DIM: DimPolicy = DimPolicy::Ada;
/// Min-max group ranges, as the paper's method (docs/method.md §2).
pub const RANGE: RangeMode = RangeMode::MinMax;
/// Calibration text, relative to the repository root.
pub const CALIB_TEXT: &str = "assets/lee-news.txt";
pub const CALIB_SAMPLES: usize = 64;
pub const CALIB_SEQLEN: usize = 512;
