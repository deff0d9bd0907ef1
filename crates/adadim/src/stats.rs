//! Statistics of a layer's calibration inputs: the Gram matrix `XᵀX` of each capture site,
//! summed over chunks of calibration blocks, and GPTQ's Hessian built from it
//! (docs/method.md §3).

use burn::prelude::*;
use kernels::QuantBackend;
use model_llama::{LayerInputs, LinearKind};
use quant_core::Hessian;

use crate::error::{AdadimError, Result};
use crate::score::gram;

/// Where a linear reads its input: q, k and v share one site, gate and up another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// `norm₁(x)`, read by q, k, v.
    AttnNorm,
    /// The attention context, read by o.
    Context,
    /// `norm₂(h)`, read by gate and up.
    MlpNorm,
    /// `silu(gate) ⊙ up`, read by down.
    Gated,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnNorm, Site::Context, Site::MlpNorm, Site::Gated];

    pub fn of(kind: LinearKind) -> Site {
        match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => Site::AttnNorm,
            LinearKind::O => Site::Context,
            LinearKind::Gate | LinearKind::Up => Site::MlpNorm,
            LinearKind::Down => Site::Gated,
        }
    }

    /// The captured input of this site.
    pub fn input<B: QuantBackend>(self, inputs: &LayerInputs<B>) -> &Tensor<B, 3> {
        match self {
            Site::AttnNorm => &inputs.attn_in,
            Site::Context => &inputs.o_in,
            Site::MlpNorm => &inputs.mlp_in,
            Site::Gated => &inputs.down_in,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The full-precision inputs of a layer's two sub-blocks on one chunk: what a candidate's
/// sub-block output is computed from.
#[derive(Clone, Debug)]
pub struct SubBlockInputs<B: QuantBackend> {
    pub attn_in: Tensor<B, 3>,
    pub mlp_in: Tensor<B, 3>,
}

impl<B: QuantBackend> SubBlockInputs<B> {
    pub fn of(inputs: &LayerInputs<B>) -> Self {
        Self {
            attn_in: inputs.attn_in.clone(),
            mlp_in: inputs.mlp_in.clone(),
        }
    }
}

/// The Gram matrices (on the device) and Hessians (on the host) of one layer's sites.
pub struct InputStats<B: QuantBackend> {
    grams: [Option<Tensor<B, 2>>; 4],
    hessians: [Option<Hessian>; 4],
    /// Calibration blocks the Grams sum over (GPTQ's sample count).
    blocks: usize,
}

impl<B: QuantBackend> InputStats<B> {
    pub fn new(blocks: usize) -> Self {
        Self {
            grams: Default::default(),
            hessians: Default::default(),
            blocks,
        }
    }

    /// Adds `XᵀX` of one chunk's input at `site`.
    pub fn accumulate(&mut self, site: Site, x: &Tensor<B, 3>) {
        let g = gram(x);
        let slot = &mut self.grams[site.index()];
        *slot = Some(match slot.take() {
            Some(sum) => sum.add(g),
            None => g,
        });
    }

    /// The Gram matrix of `site`, computed from `x` (its whole input) if it was not accumulated.
    pub fn gram_or(&mut self, site: Site, x: impl FnOnce() -> Tensor<B, 3>) -> &Tensor<B, 2> {
        self.grams[site.index()].get_or_insert_with(|| gram(&x()))
    }

    /// GPTQ's `H = (2/N)·XᵀX` of `site` over the `N` calibration blocks, built on first use from
    /// the site's Gram matrix.
    pub fn hessian(&mut self, site: Site) -> Result<&Hessian> {
        let slot = &mut self.hessians[site.index()];
        if slot.is_none() {
            let gram = self.grams[site.index()]
                .as_ref()
                .expect("the Gram matrix of a GPTQ site is built before its Hessian");
            *slot = Some(hessian(gram, self.blocks)?);
        }
        Ok(slot.as_ref().expect("just built"))
    }
}

/// `H = (2/N)·G` on the host.
fn hessian<B: QuantBackend>(gram: &Tensor<B, 2>, blocks: usize) -> Result<Hessian> {
    let features = gram.dims()[0];
    let h = gram
        .clone()
        .mul_scalar(2.0 / blocks as f64)
        .into_data()
        .into_vec::<f32>();
    h.map_err(|e| quant_core::QuantError::Backend(e.to_string()))
        .and_then(|h| Hessian::from_matrix(h, features, blocks))
        .map_err(|source| AdadimError::Quant {
            context: "Hessian".into(),
            source,
        })
}
