//! AdaDim (Heo et al., ICLR 2024): for every linear layer of a LLaMA model, quantize per output
//! channel (OC) or per input channel (IC), whichever reconstructs the layer's output better on
//! calibration data, layer by layer through the model.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use adadim::{CalibOptions, QuantizeOptions, Recipe};
//! use burn::backend::NdArray;
//! use quant_core::GroupSize;
//! let src = model_llama::open_checkpoint("model.gguf".as_ref())?;
//! # let tokenizer: model_llama::tokenizer::LlamaTokenizer = todo!();
//! let calib = adadim::calibration_from_file(
//!     "assets/lee-news.txt".as_ref(),
//!     |t| Ok(tokenizer.encode(t)?),
//!     &CalibOptions { n_samples: 64, seqlen: 512, shuffle_seed: None },
//! )?;
//! // The paper's RTN-AdaDim; `Default::default()` gives the default recipe, `best`.
//! let opts = QuantizeOptions {
//!     bits: 3,
//!     group_size: GroupSize::Len(64),
//!     ..QuantizeOptions::from_choices(Recipe::Paper.choices())
//! };
//! let q = adadim::quantize_model::<NdArray>(src.as_ref(), &calib, &opts, &Default::default())?;
//! # Ok(()) }
//! ```

mod awq;
mod calib;
pub mod defaults;
mod error;
pub mod memory;
mod options;
pub mod output;
mod pipeline;
mod policy;
pub mod report;
mod run;
mod score;
mod stats;

pub use calib::{CalibOptions, calibration_blocks, calibration_from_file};
pub use error::{AdadimError, Result};
pub use memory::MemoryPlan;
pub use options::{Choices, Method, Propagate, Recipe, Score};
pub use pipeline::{
    Activations, FinishedLayer, LayerSink, LinearRecord, QuantizeOptions, QuantizedModel,
    ResumePoint, quantize_layers, quantize_model,
};
pub use policy::DimPolicy;
pub use quant_core::RangeMode;
pub use report::RunReport;
pub use run::{RunSpec, run};
pub use score::ScoreForms;
