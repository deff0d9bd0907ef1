//! One entry point for every checkpoint kind the project reads.

use std::path::Path;

use crate::checkpoint::TensorSource;
use crate::error::{ModelError, Result};
use crate::gguf::GgufCheckpoint;
use crate::hf_dir::SafetensorsDir;
use crate::load::{load_layer_compact, load_layer_with, load_model, upload_error};
use crate::model::{DecoderLayer, Linear, Llama};
use crate::packed::PackedDir;
use crate::perplexity::{PerplexityReport, perplexity_layer_major};
use crate::tokenizer::LlamaTokenizer;
use kernels::{QuantBackend, QuantLinear};

/// A checkpoint and its tokenizer.
pub struct OpenModel {
    pub source: Box<dyn TensorSource>,
    pub tokenizer: LlamaTokenizer,
    /// Set for packed AdaDim checkpoints, which load onto the quantized kernels.
    pub packed: Option<PackedDir>,
}

impl OpenModel {
    /// The Burn model: packed checkpoints keep their linears packed (run through the backend's
    /// dequantizing kernel), everything else is loaded dense.
    pub fn load<B: QuantBackend>(&self, device: &B::Device) -> Result<Llama<B>> {
        match &self.packed {
            Some(packed) => packed.load_model(device),
            None => load_model(self.source.as_ref(), device),
        }
    }

    /// Decoder layer `i` as [`Self::load`] builds it: packed linears on the dequantizing
    /// kernels, dense ones compact where lossless.
    pub fn load_layer<B: QuantBackend>(
        &self,
        i: usize,
        device: &B::Device,
    ) -> Result<DecoderLayer<B>> {
        let Some(packed) = &self.packed else {
            return load_layer_compact(self.source.as_ref(), i, device);
        };
        load_layer_with(packed, i, device, &|kind| {
            let module = kind.hf_prefix(i);
            let q = QuantLinear::new(&packed.packed_linear(&module)?, device)
                .map_err(|e| upload_error(packed.path(), &module, e))?;
            Ok(Linear::Quant(q))
        })
    }

    /// Perplexity on `tokens` (see [`crate::perplexity::perplexity`]), streaming the checkpoint
    /// one decoder layer at a time ([`perplexity_layer_major`]) instead of loading it whole.
    pub fn perplexity<B: QuantBackend>(
        &self,
        tokens: &[u32],
        seqlen: usize,
        max_windows: Option<usize>,
        device: &B::Device,
    ) -> Result<PerplexityReport> {
        perplexity_layer_major(
            self.source.as_ref(),
            &|i| self.load_layer::<B>(i, device),
            tokens,
            seqlen,
            max_windows,
            device,
        )
    }
}

/// Opens a GGUF file, a packed AdaDim directory or a plain Hugging Face directory.
pub fn open_checkpoint(path: &Path) -> Result<Box<dyn TensorSource>> {
    if path.is_dir() {
        return Ok(match PackedDir::open(path)? {
            Some(packed) => Box::new(packed),
            None => Box::new(SafetensorsDir::open(path)?),
        });
    }
    if !path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    Ok(Box::new(GgufCheckpoint::open(path)?))
}

/// Opens a checkpoint with its tokenizer (inside the GGUF, or `tokenizer.json` in a directory).
pub fn open_model(path: &Path) -> Result<OpenModel> {
    if path.is_dir() {
        let tokenizer = LlamaTokenizer::from_file(&path.join("tokenizer.json"))?;
        return Ok(OpenModel {
            source: open_checkpoint(path)?,
            tokenizer,
            packed: PackedDir::open(path)?,
        });
    }
    let gguf = GgufCheckpoint::open(path)?;
    Ok(OpenModel {
        tokenizer: gguf.tokenizer()?,
        source: Box::new(gguf),
        packed: None,
    })
}
