//! GPTQ (docs/method.md §3) for both grouping dimensions, one column loop.
//!
//! GPTQ always walks the *input* channels of `W` (columns), because its error feedback follows the
//! Hessian over inputs. The two dims differ only in how one column is turned into codes:
//!
//! * per-OC: every entry of column `i` belongs to a different group (one per output row); those
//!   groups' parameters are fixed up front ("static groups") from the original weights, and
//!   column `i` uses the groups of its original position even under act-order;
//! * per-IC: the column *is* `OC / g` groups of `g` output channels, quantized with docs/method.md §2 at the
//!   moment the column is reached, from its error-updated values.
//!
//! That difference is the [`ColumnQuantizer`]; everything else (dead inputs, act-order, damping,
//! blocks with lazy batch updates, the loss) is shared. The loop works on `Wᵀ` so a column of `W`
//! is a contiguous row; for per-IC that is exactly the grouped layout.
//!
//! Inside a block the columns are processed in order, but the output channels are independent
//! (per-IC groups never straddle a chunk boundary), so each block runs as parallel chunks of output
//! channels. The lazy update of the remaining columns is one `gemm` per block.

use rayon::prelude::*;
use tracing::warn;

use crate::hessian::Hessian;
use crate::linalg::{gemm_f32, upper_cholesky_of_inverse};
use crate::quantized::transpose;
use crate::range::{RangeMode, search_range};
use crate::rtn::{GroupParams, check_finite, quantize_group};
use crate::{QuantConfig, QuantDim, QuantError, Quantized};

/// How many times the damping is raised ×10 after a failed Cholesky before giving up.
const MAX_DAMP_RETRIES: u32 = 4;

/// GPTQ's knobs; [`Default`] is the reference setting (also for fields a config leaves out).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GptqOptions {
    /// Columns per block of the lazy batch update (128).
    pub block_size: usize,
    /// Damping as a fraction of `mean(diag(H))` (0.01).
    pub percdamp: f32,
    /// Process columns by decreasing `H[i, i]` (true).
    pub act_order: bool,
    /// Per-OC only: group parameters from the original weights (true). `false` is rejected
    /// because the packed format has no `g_idx` to describe act-order-dependent groups.
    pub static_groups: bool,
    /// How each group's range is chosen (min-max). Searched per-OC groups weigh each weight's
    /// error by its input's `H[k, k]` (docs/method.md §2.1). Not part of the `gptq` table of a
    /// config: the run's one `range` option sets it for RTN and GPTQ alike.
    #[serde(skip)]
    pub range: RangeMode,
    /// Per-OC: refit each group's scale and zero to the final codes against the full Hessian
    /// (docs/method.md §3.1; false). Like `range`, set by the run, not the `gptq` table.
    #[serde(skip)]
    pub refit: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            block_size: 128,
            percdamp: 0.01,
            act_order: true,
            static_groups: true,
            range: RangeMode::MinMax,
            refit: false,
        }
    }
}

/// What [`gptq`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqResult {
    /// Codes, scales and zeros of the final weights in the grouped layout;
    /// `quantized.dequantize()` is exactly GPTQ's `Q` (with `refit`, its codes on the refitted
    /// parameters).
    pub quantized: Quantized,
    /// GPTQ's reconstruction loss: `Σ (w − q)² / Hinv[i,i]² / 2` over all weights (of the
    /// codes' first parameters, before any refit).
    pub loss: f64,
    /// The relative damping that made the Cholesky succeed (`percdamp`, or more after retries).
    pub damp: f32,
}

impl GptqResult {
    /// The dequantized weights `[out_features, in_features]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.quantized.dequantize()
    }
}

/// GPTQ of `W [out_features, in_features]` (row-major, HF layout) against `hessian` (over inputs).
pub fn gptq(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    hessian: &Hessian,
    config: QuantConfig,
    options: GptqOptions,
) -> Result<GptqResult, QuantError> {
    let config = QuantConfig::new(config.bits, config.group_size, config.dim)?.with_sym(config.sym);
    let group_size = config.check_shape(out_features, in_features)?;
    check_options(&options, config.dim)?;
    if w.len() != out_features * in_features {
        return Err(QuantError::Shape(format!(
            "weight has {} elements, expected {out_features} × {in_features}",
            w.len()
        )));
    }
    check_finite(w)?;
    if hessian.in_features() != in_features {
        return Err(QuantError::Shape(format!(
            "Hessian is over {} inputs but the weight has {in_features}",
            hessian.in_features()
        )));
    }
    if hessian.nsamples() == 0 {
        return Err(QuantError::EmptyCalibration);
    }
    let (oc, ic) = (out_features, in_features);
    let maxq = config.maxq();
    let diag = hessian.diag();

    // Dead inputs never reach the layer: their weights are irrelevant, so make them exactly zero.
    let mut wt = transpose(w, oc, ic);
    for (i, &d) in diag.iter().enumerate() {
        if d == 0.0 {
            wt[i * oc..(i + 1) * oc].fill(0.0);
        }
    }
    let search_moments = (options.range == RangeMode::Search).then_some(diag.as_slice());
    let quantizer = match config.dim {
        QuantDim::Oc => ColumnQuantizer::Static {
            params: static_group_params(&wt, ic, oc, group_size, maxq, config.sym, search_moments),
            group_size,
        },
        QuantDim::Ic => ColumnQuantizer::Dynamic {
            group_size,
            range: options.range,
            sym: config.sym,
        },
    };

    let perm = column_order(&diag, options.act_order);
    let (hinv, damp) = inverse_factor(hessian.matrix(), ic, &perm, options.percdamp)?;
    let mut wp = vec![0f32; ic * oc];
    for (dst, &src) in wp.chunks_mut(oc).zip(&perm) {
        dst.copy_from_slice(&wt[src * oc..(src + 1) * oc]);
    }
    drop(wt);

    // Results are stored by *original* column, which undoes act-order for free.
    let mut codes_t = vec![0u8; ic * oc];
    let ic_groups = oc / group_size;
    let mut ic_params = match config.dim {
        QuantDim::Ic => vec![GroupParams::default(); ic * ic_groups],
        QuantDim::Oc => Vec::new(),
    };
    let chunk_len = chunk_len(oc, quantizer.alignment());
    let bs = options.block_size;
    let mut err_blk = vec![0f32; bs.min(ic) * oc];
    let mut loss = 0f64;
    for i1 in (0..ic).step_by(bs) {
        let i2 = (i1 + bs).min(ic);
        let block = Block {
            i1,
            i2,
            oc,
            ic,
            hinv: &hinv,
            perm: &perm,
            maxq,
        };
        let chunks: Vec<ChunkOut> = (0..oc)
            .step_by(chunk_len)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|c0| block.run_chunk(&wp, c0, chunk_len.min(oc - c0), &quantizer))
            .collect();
        for ch in &chunks {
            loss += ch.loss;
            let len = ch.len;
            let gpc = len / group_size;
            for i in 0..i2 - i1 {
                let orig = perm[i1 + i];
                let src = i * len..(i + 1) * len;
                err_blk[i * oc + ch.c0..i * oc + ch.c0 + len].copy_from_slice(&ch.err[src.clone()]);
                codes_t[orig * oc + ch.c0..orig * oc + ch.c0 + len].copy_from_slice(&ch.codes[src]);
                if !ch.params.is_empty() {
                    let dst = orig * ic_groups + ch.c0 / group_size;
                    ic_params[dst..dst + gpc].copy_from_slice(&ch.params[i * gpc..(i + 1) * gpc]);
                }
            }
        }
        if i2 < ic {
            // W[:, i2..] -= Err1 · Hinv[i1..i2, i2..], in the transposed storage:
            // wp[i2.., :] -= Hinv[i1..i2, i2..]ᵀ · err_blk.
            // SAFETY: `wp` is ic×oc, `hinv` ic×ic, `err_blk` ≥ (i2−i1)×oc; distinct buffers.
            unsafe {
                gemm_f32(
                    ic - i2,
                    oc,
                    i2 - i1,
                    wp.as_mut_ptr().add(i2 * oc),
                    oc as isize,
                    1,
                    true,
                    (hinv.as_ptr().add(i1 * ic + i2), 1, ic as isize),
                    (err_blk.as_ptr(), oc as isize, 1),
                    1.0,
                    -1.0,
                );
            }
        }
    }

    let (codes, params) = match (config.dim, quantizer) {
        (QuantDim::Ic, _) => (codes_t, ic_params),
        (QuantDim::Oc, ColumnQuantizer::Static { params, .. }) => (
            transpose(&codes_t, ic, oc),
            // [groups, oc] → [oc, groups]: the grouped layout of W.
            transpose(&params, ic / group_size, oc),
        ),
        (QuantDim::Oc, ColumnQuantizer::Dynamic { .. }) => unreachable!("per-OC is static"),
    };
    let mut quantized = Quantized {
        config,
        out_features,
        in_features,
        group_size,
        codes,
        scales: params.iter().map(|p| p.scale).collect(),
        zeros: params.iter().map(|p| p.zero).collect(),
    };
    if options.refit && config.dim == QuantDim::Oc {
        let r = crate::refit::refit_oc(w, &mut quantized, hessian.matrix())?;
        tracing::debug!(?r, "refitted per-OC groups");
    }
    Ok(GptqResult {
        quantized,
        loss,
        damp,
    })
}

fn check_options(o: &GptqOptions, dim: QuantDim) -> Result<(), QuantError> {
    if o.block_size == 0 {
        return Err(QuantError::InvalidOptions(
            "block_size must be positive".into(),
        ));
    }
    if !o.percdamp.is_finite() || o.percdamp < 0.0 {
        return Err(QuantError::InvalidOptions(format!(
            "percdamp must be a finite non-negative number, got {}",
            o.percdamp
        )));
    }
    if dim == QuantDim::Oc && !o.static_groups {
        return Err(QuantError::InvalidOptions(
            "per-OC GPTQ needs static_groups (the packed format has no g_idx)".into(),
        ));
    }
    Ok(())
}

/// Column order: by decreasing `H[i, i]` with act-order (stable, so ties keep their order).
fn column_order(diag: &[f32], act_order: bool) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..diag.len()).collect();
    if act_order {
        perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    }
    perm
}

/// GPTQ's `Hinv` for the permuted, dead-fixed, damped `H`, raising the damping ×10 on failure.
fn inverse_factor(
    h: &[f32],
    n: usize,
    perm: &[usize],
    percdamp: f32,
) -> Result<(Vec<f32>, f32), QuantError> {
    // Dead inputs (zero diagonal) get a 1 there.
    let diag: Vec<f64> = perm
        .iter()
        .map(|&p| match h[p * n + p] as f64 {
            0.0 => 1.0,
            d => d,
        })
        .collect();
    let mean_diag = diag.iter().sum::<f64>() / n as f64;
    let mut damp = percdamp;
    for attempt in 0..=MAX_DAMP_RETRIES {
        // Rebuilt from `h` for every attempt rather than cloned from a kept f64 copy: on a
        // 7B model's down_proj that copy is another GB beside the factorisation.
        let mut a = vec![0f64; n * n];
        a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let src = &h[perm[i] * n..(perm[i] + 1) * n];
            for (dst, &j) in row.iter_mut().zip(perm) {
                *dst = src[j] as f64;
            }
            row[i] = diag[i] + damp as f64 * mean_diag;
        });
        if let Some(u) = upper_cholesky_of_inverse(a, n) {
            return Ok((u.into_iter().map(|v| v as f32).collect(), damp));
        }
        if attempt == MAX_DAMP_RETRIES {
            break;
        }
        warn!(
            damp,
            next = damp * 10.0,
            "GPTQ: Hessian not positive definite after damping; retrying with more damping"
        );
        damp *= 10.0;
    }
    Err(QuantError::Cholesky { damp })
}

/// Per-OC static groups: GPTQ-range parameters of every `g`-column group of the original weights,
/// laid out `[groups, oc]` so a chunk of output channels reads a contiguous run. With `moments`
/// (`H[k, k]`), each range is the searched shrink of the GPTQ range (docs/method.md §2.1); with
/// `sym`, symmetric (§2.2).
fn static_group_params(
    wt: &[f32],
    ic: usize,
    oc: usize,
    g: usize,
    maxq: u32,
    sym: bool,
    moments: Option<&[f32]>,
) -> Vec<GroupParams> {
    let mut params = vec![GroupParams::default(); (ic / g) * oc];
    params
        .par_chunks_mut(oc)
        .zip(wt.par_chunks(g * oc))
        .enumerate()
        .for_each(|(j, (params, cols))| {
            let mut lo = vec![0f32; oc];
            let mut hi = vec![0f32; oc];
            // The GPTQ range always contains 0, so starting the fold at 0 caps min ≤ 0 ≤ max.
            for col in cols.chunks(oc) {
                for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(col) {
                    *l = l.min(v);
                    *h = h.max(v);
                }
            }
            match moments {
                None => {
                    for ((p, &l), &h) in params.iter_mut().zip(&lo).zip(&hi) {
                        *p = GroupParams::of_range(l, h, maxq, sym);
                    }
                }
                Some(m) => {
                    // The group's columns are strided in `wt`; gather them per output channel.
                    let group_t = transpose(cols, g, oc);
                    let h = &m[j * g..(j + 1) * g];
                    for (o, p) in params.iter_mut().enumerate() {
                        let w = &group_t[o * g..(o + 1) * g];
                        *p = search_range(w, Some(h), lo[o], hi[o], maxq, sym);
                    }
                }
            }
        });
    params
}

/// Chunk of output channels processed by one task: a multiple of `align`, about 4 per thread.
fn chunk_len(oc: usize, align: usize) -> usize {
    let target = oc.div_ceil(4 * rayon::current_num_threads());
    target.div_ceil(align).max(1) * align
}

/// How one column of `W` (restricted to a chunk of output channels) becomes codes.
enum ColumnQuantizer {
    /// Per-OC: `params[group_of(orig column) * oc + output channel]`, fixed before the loop.
    Static {
        params: Vec<GroupParams>,
        group_size: usize,
    },
    /// Per-IC: docs/method.md §2 groups of `group_size` output channels, from the current values.
    Dynamic {
        group_size: usize,
        range: RangeMode,
        sym: bool,
    },
}

impl ColumnQuantizer {
    /// Chunks of output channels must not split a per-IC group.
    fn alignment(&self) -> usize {
        match self {
            ColumnQuantizer::Static { .. } => 16,
            ColumnQuantizer::Dynamic { group_size, .. } => *group_size,
        }
    }

    /// Quantizes `w` = column `orig` of `W`, output channels `c0..c0 + w.len()`; writes codes and
    /// dequantized values, and appends the parameters it chose (per-IC only).
    #[allow(clippy::too_many_arguments)]
    fn quantize(
        &self,
        orig: usize,
        c0: usize,
        oc: usize,
        maxq: u32,
        w: &[f32],
        codes: &mut [u8],
        q: &mut [f32],
        chosen: &mut Vec<GroupParams>,
    ) {
        match self {
            ColumnQuantizer::Static { params, group_size } => {
                let base = (orig / group_size) * oc + c0;
                let params = &params[base..base + w.len()];
                for (((c, q), &x), p) in codes.iter_mut().zip(q.iter_mut()).zip(w).zip(params) {
                    *c = p.code(x, maxq);
                    *q = p.dequant(*c);
                }
            }
            ColumnQuantizer::Dynamic {
                group_size,
                range,
                sym,
            } => {
                for ((w, c), q) in w
                    .chunks(*group_size)
                    .zip(codes.chunks_mut(*group_size))
                    .zip(q.chunks_mut(*group_size))
                {
                    // One input channel per group: equal weights, so no moments.
                    let p = quantize_group(w, None, *range, *sym, maxq, c);
                    for (q, &c) in q.iter_mut().zip(c.iter()) {
                        *q = p.dequant(c);
                    }
                    chosen.push(p);
                }
            }
        }
    }
}

/// One block of columns `i1..i2` (in processing order) and what every chunk of it needs.
struct Block<'a> {
    i1: usize,
    i2: usize,
    oc: usize,
    ic: usize,
    hinv: &'a [f32],
    perm: &'a [usize],
    maxq: u32,
}

/// A chunk's results, `[block columns, len]` each: the scaled errors `(w − q)/Hinv[i,i]`, the codes,
/// and the per-IC parameters `[block columns, len/g]`.
struct ChunkOut {
    c0: usize,
    len: usize,
    err: Vec<f32>,
    codes: Vec<u8>,
    params: Vec<GroupParams>,
    loss: f64,
}

impl Block<'_> {
    /// GPTQ's inner loop over the block's columns for output channels `c0..c0 + len`.
    fn run_chunk(
        &self,
        wp: &[f32],
        c0: usize,
        len: usize,
        quantizer: &ColumnQuantizer,
    ) -> ChunkOut {
        let (i1, b, oc, ic) = (self.i1, self.i2 - self.i1, self.oc, self.ic);
        let mut w = vec![0f32; b * len];
        for (i, dst) in w.chunks_mut(len).enumerate() {
            dst.copy_from_slice(&wp[(i1 + i) * oc + c0..(i1 + i) * oc + c0 + len]);
        }
        let mut codes = vec![0u8; b * len];
        let mut q = vec![0f32; len];
        let mut params = Vec::new();
        let mut loss = 0f64;
        for i in 0..b {
            let col = i1 + i;
            let hrow = &self.hinv[col * ic..(col + 1) * ic];
            let d = hrow[col];
            let (cur, rest) = w[i * len..].split_at_mut(len);
            let orig = self.perm[col];
            quantizer.quantize(
                orig,
                c0,
                oc,
                self.maxq,
                cur,
                &mut codes[i * len..(i + 1) * len],
                &mut q,
                &mut params,
            );
            let mut sq = 0f64;
            for (x, &qv) in cur.iter_mut().zip(&q) {
                let diff = *x - qv;
                sq += (diff * diff) as f64;
                *x = diff / d;
            }
            loss += sq / (d as f64 * d as f64) / 2.0;
            // Error feedback into the block's later columns; `cur` now holds the scaled error.
            for (j, later) in rest.chunks_mut(len).enumerate() {
                let h = hrow[col + 1 + j];
                for (x, &e) in later.iter_mut().zip(cur.iter()) {
                    *x -= e * h;
                }
            }
        }
        ChunkOut {
            c0,
            len,
            err: w,
            codes,
            params,
            loss,
        }
    }
}
