//! Statistics of a layer's calibration inputs: the Gram matrix `XᵀX` of each capture site,
//! summed over chunks of calibration blocks, GPTQ's Hessian built from it (docs/method.md §3),
//! and the inputs' second moments that weight RTN's range search (§2.1).

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

    /// Whether `kind` is the last linear (in visiting order) that reads its site.
    pub fn is_last_reader(kind: LinearKind) -> bool {
        matches!(
            kind,
            LinearKind::V | LinearKind::O | LinearKind::Up | LinearKind::Down
        )
    }

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
    /// `Σ x_k²` per input channel, and the token count it sums over.
    moments: [Option<(Tensor<B, 1>, usize)>; 4],
    /// Calibration blocks the Grams sum over (GPTQ's sample count).
    blocks: usize,
}

impl<B: QuantBackend> InputStats<B> {
    pub fn new(blocks: usize) -> Self {
        Self {
            grams: Default::default(),
            hessians: Default::default(),
            moments: Default::default(),
            blocks,
        }
    }

    /// Adds `XᵀX` of one chunk's input at `site`.
    pub fn accumulate(&mut self, site: Site, x: &Tensor<B, 3>) {
        let slot = &mut self.grams[site.index()];
        *slot = Some(match slot.take() {
            Some(sum) => B::gram_add(sum, B::flatten_rows(x.clone())),
            None => gram(x),
        });
    }

    /// Adds one chunk's `Σ x_k²` at `site`.
    pub fn accumulate_moments(&mut self, site: Site, x: &Tensor<B, 3>) {
        let [blocks, t, features] = x.dims();
        let sq = B::flatten_rows(x.clone())
            .square()
            .sum_dim(0)
            .reshape([features]);
        let slot = &mut self.moments[site.index()];
        *slot = Some(match slot.take() {
            Some((sum, n)) => (sum.add(sq), n + blocks * t),
            None => (sq, blocks * t),
        });
    }

    /// `E[x_k²]` of `site`'s input channels, if they were accumulated.
    pub fn moments(&self, site: Site) -> Option<Vec<f32>> {
        let (sum, n) = self.moments[site.index()].as_ref()?;
        let sum = sum.clone().into_data().into_vec::<f32>().ok()?;
        Some(sum.into_iter().map(|v| v / *n as f32).collect())
    }

    /// The Gram matrix of `site`, computed from `x` (its whole input) if it was not accumulated.
    pub fn gram_or(&mut self, site: Site, x: impl FnOnce() -> Tensor<B, 3>) -> &Tensor<B, 2> {
        self.grams[site.index()].get_or_insert_with(|| gram(&x()))
    }

    /// GPTQ's `H = (2/N)·XᵀX` of `site` over the `N` calibration blocks, built on first use from
    /// the site's Gram matrix (computed from `x`, its whole input, if it was not accumulated),
    /// which it replaces: no Gram-form score of the site comes after its first commit.
    pub fn hessian(&mut self, site: Site, x: impl FnOnce() -> Tensor<B, 3>) -> Result<&Hessian> {
        let slot = &mut self.hessians[site.index()];
        if slot.is_none() {
            let gram = match self.grams[site.index()].take() {
                Some(g) => g,
                None => gram(&x()),
            };
            *slot = Some(hessian(gram, self.blocks)?);
        }
        Ok(slot.as_ref().expect("just built"))
    }

    /// Frees what was kept for `site` once its last linear is done: on 7B shapes the
    /// statistics of the other sites would otherwise sit beside GPTQ's work on the widest one.
    pub fn release(&mut self, site: Site) {
        self.grams[site.index()] = None;
        self.hessians[site.index()] = None;
        self.moments[site.index()] = None;
    }
}

/// `H = (2/N)·G` on the host, scaled in place (no second device copy of a matrix that is a
/// GB on 7B shapes).
fn hessian<B: QuantBackend>(gram: Tensor<B, 2>, blocks: usize) -> Result<Hessian> {
    let features = gram.dims()[0];
    let scale = (2.0 / blocks as f64) as f32;
    gram.into_data()
        .into_vec::<f32>()
        .map_err(|e| quant_core::QuantError::Backend(e.to_string()))
        .and_then(|mut h| {
            h.iter_mut().for_each(|v| *v *= scale);
            Hessian::from_matrix(h, features, blocks)
        })
        .map_err(|source| AdadimError::Quant {
            context: "Hessian".into(),
            source,
        })
}
