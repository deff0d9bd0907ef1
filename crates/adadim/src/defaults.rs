//! The default of every quantization parameter, written once: the CLI's flags, the keys a
//! config (`configs/*.toml`, read as a [`crate::RunSpec`]) leaves out, and
//! [`crate::QuantizeOptions::default`] all take them from here. GPTQ's own knobs default to
//! [`quant_core::GptqOptions::default`].

use quant_core::GroupSize;

use crate::options::Recipe;

pub const BITS: u32 = 3;
/// The paper's group length (docs/method.md §5).
pub const GROUP_SIZE: GroupSize = GroupSize::Len(128);
/// The recipe whose choices (method, dim, range, score, propagation) a run takes where it
/// names none (docs/method.md §4.7): the most accurate, since it costs little more time than
/// GPTQ-AdaDim (docs/results.md).
pub const RECIPE: Recipe = Recipe::Best;
/// Calibration text, relative to the repository root.
pub const CALIB_TEXT: &str = "assets/lee-news.txt";
pub const CALIB_SAMPLES: usize = 64;
pub const CALIB_SEQLEN: usize = 512;
