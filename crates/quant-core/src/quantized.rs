use half::f16;
use rayon::prelude::*;

use crate::packing::{pack_row, unpack_row, words_for};
use crate::{QuantConfig, QuantDim, QuantError};

/// A quantized weight in f32 parameters: what RTN and GPTQ return.
///
/// Everything is stored in the *grouped layout* (`rows × cols`, see [`QuantDim::grouped_shape`]):
/// `W` for [`QuantDim::Oc`], `Wᵀ` for [`QuantDim::Ic`].
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    pub config: QuantConfig,
    pub out_features: usize,
    pub in_features: usize,
    /// Resolved group length along `cols`.
    pub group_size: usize,
    /// `[rows, cols]` codes in `0..=maxq`.
    pub codes: Vec<u8>,
    /// `[rows, cols / group_size]`.
    pub scales: Vec<f32>,
    /// `[rows, cols / group_size]`: codes in `0..=maxq`, or real numbers after a GPTQ refit
    /// (docs/method.md §3.1).
    pub zeros: Vec<f32>,
}

impl Quantized {
    pub fn rows_cols(&self) -> (usize, usize) {
        self.config
            .dim
            .grouped_shape(self.out_features, self.in_features)
    }

    /// Dequantized weight `[out_features, in_features]` (original HF layout), from the f32 parameters.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = self.rows_cols();
        let grouped = dequantize_grouped(
            rows,
            cols,
            self.group_size,
            |r, c| self.codes[r * cols + c],
            |i| self.scales[i],
            |i| self.zeros[i],
        );
        from_grouped(self.config.dim, rows, cols, grouped)
    }

    /// Packs the codes into `u32` words and stores scales and zeros as f16.
    pub fn pack(&self) -> PackedLinear {
        let (rows, cols) = self.rows_cols();
        let wpr = words_for(cols, self.config.bits);
        let mut qweight = vec![0u32; rows * wpr];
        if wpr > 0 {
            qweight
                .par_chunks_mut(wpr)
                .enumerate()
                .for_each(|(r, words)| {
                    pack_row(
                        &self.codes[r * cols..(r + 1) * cols],
                        self.config.bits,
                        words,
                    );
                });
        }
        PackedLinear {
            dim: self.config.dim,
            bits: self.config.bits,
            group_size: self.group_size,
            out_features: self.out_features,
            in_features: self.in_features,
            qweight,
            scales: self.scales.iter().map(|&s| f16::from_f32(s)).collect(),
            zeros: self.zeros.iter().map(|&z| f16::from_f32(z)).collect(),
        }
    }
}

/// The packed, on-disk and in-kernel form of one quantized linear layer (docs/method.md §6).
///
/// In the grouped layout (`rows × cols`: `W` for OC, `Wᵀ` for IC, groups along `cols`):
/// * `qweight`: `[rows, words_per_row]`, each row one bit stream (see [`crate::packing`]);
/// * `scales`, `zeros`: `[rows, cols / group_size]` in f16; `ŵ = (q − zero) · scale`.
///
/// For IC the rows are input channels: the thread that owns input channel `k` reads row `k`
/// and one scale/zero per `group_size` output channels.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedLinear {
    pub dim: QuantDim,
    pub bits: u32,
    pub group_size: usize,
    pub out_features: usize,
    pub in_features: usize,
    pub qweight: Vec<u32>,
    pub scales: Vec<f16>,
    pub zeros: Vec<f16>,
}

impl PackedLinear {
    /// `(rows, cols)` of the grouped layout.
    pub fn rows_cols(&self) -> (usize, usize) {
        self.dim.grouped_shape(self.out_features, self.in_features)
    }

    pub fn words_per_row(&self) -> usize {
        words_for(self.rows_cols().1, self.bits)
    }

    pub fn groups_per_row(&self) -> usize {
        self.rows_cols().1 / self.group_size
    }

    /// Checks that the buffers agree with the shape, bits and group size (for loaded checkpoints).
    pub fn validate(&self) -> Result<(), QuantError> {
        let config = QuantConfig::new(self.bits, crate::GroupSize::Len(self.group_size), self.dim)?;
        config.check_shape(self.out_features, self.in_features)?;
        let (rows, cols) = self.rows_cols();
        // The shape comes from a file: a product that wraps around could match empty buffers
        // and send `codes`/`dequantize` far out of bounds.
        let fits = cols
            .checked_mul(self.bits as usize)
            .and_then(|bits| rows.checked_mul(bits.div_ceil(32)))
            .and_then(|_| rows.checked_mul(cols))
            .and_then(|n| n.checked_mul(size_of::<f32>()));
        if fits.is_none() {
            return Err(QuantError::Shape(format!(
                "[{}, {}] is too large to address",
                self.out_features, self.in_features
            )));
        }
        let expect = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(QuantError::Shape(format!(
                    "{what} has {got} elements, expected {want}"
                )))
            }
        };
        expect("qweight", self.qweight.len(), rows * self.words_per_row())?;
        expect("scales", self.scales.len(), rows * self.groups_per_row())?;
        expect("zeros", self.zeros.len(), rows * self.groups_per_row())
    }

    /// Codes `[rows, cols]` in the grouped layout.
    pub fn codes(&self) -> Vec<u8> {
        let (rows, cols) = self.rows_cols();
        let wpr = self.words_per_row();
        let mut codes = vec![0u8; rows * cols];
        if cols > 0 {
            codes.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
                unpack_row(&self.qweight[r * wpr..(r + 1) * wpr], self.bits, row);
            });
        }
        codes
    }

    /// Dequantized weight `[out_features, in_features]` (original HF layout), from the f16
    /// parameters: this is the canonical weight of a packed checkpoint and of its fake-quant export.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = self.rows_cols();
        let codes = self.codes();
        let grouped = dequantize_grouped(
            rows,
            cols,
            self.group_size,
            |r, c| codes[r * cols + c],
            |i| self.scales[i].to_f32(),
            |i| self.zeros[i].to_f32(),
        );
        from_grouped(self.dim, rows, cols, grouped)
    }
}

/// Rows in parallel: a 7B-shape pipeline dequantizes two candidates per linear, and this was
/// its largest serial step.
fn dequantize_grouped(
    rows: usize,
    cols: usize,
    group_size: usize,
    code: impl Fn(usize, usize) -> u8 + Sync,
    scale: impl Fn(usize) -> f32 + Sync,
    zero: impl Fn(usize) -> f32 + Sync,
) -> Vec<f32> {
    let gpr = cols / group_size;
    let mut out = vec![0f32; rows * cols];
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        for (c, v) in row.iter_mut().enumerate() {
            let gi = r * gpr + c / group_size;
            *v = (code(r, c) as f32 - zero(gi)) * scale(gi);
        }
    });
    out
}

/// Row-major transpose of a `rows × cols` matrix (any `Copy` element: weights, codes).
///
/// Banded so both sides stay in cache, and parallel over bands of output rows.
pub fn transpose<T: Copy + Default + Send + Sync>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    assert_eq!(
        data.len(),
        rows * cols,
        "transpose: length does not match shape"
    );
    let mut out = vec![T::default(); data.len()];
    if data.is_empty() {
        return out;
    }
    const TILE: usize = 32;
    // A band is TILE output rows (= TILE input columns); bands are disjoint, so they run in parallel.
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * TILE;
            let c1 = (c0 + TILE).min(cols);
            transpose_into(&data[c0..], cols, rows, c1 - c0, out, rows);
        });
    out
}

/// Writes the transpose of the `rows × cols` block at the start of `src` (row stride `src_stride`)
/// into `dst` (row stride `dst_stride`): `dst[c · dst_stride + r] = src[r · src_stride + c]`.
///
/// Works in `B × B` squares so that both sides touch only `B` cache lines at a time, and each
/// source row is read sequentially (which the hardware prefetcher follows).
pub(crate) fn transpose_into<T: Copy>(
    src: &[T],
    src_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [T],
    dst_stride: usize,
) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        let r1 = (r0 + B).min(rows);
        for c0 in (0..cols).step_by(B) {
            let c1 = (c0 + B).min(cols);
            for r in r0..r1 {
                let run = &src[r * src_stride + c0..r * src_stride + c1];
                for (c, &v) in (c0..).zip(run) {
                    dst[c * dst_stride + r] = v;
                }
            }
        }
    }
}

/// `W [out, in]` → grouped layout.
pub fn to_grouped(dim: QuantDim, out_features: usize, in_features: usize, w: &[f32]) -> Vec<f32> {
    match dim {
        QuantDim::Oc => w.to_vec(),
        QuantDim::Ic => transpose(w, out_features, in_features),
    }
}

/// Grouped layout `rows × cols` → `W [out, in]`.
pub fn from_grouped(dim: QuantDim, rows: usize, cols: usize, g: Vec<f32>) -> Vec<f32> {
    match dim {
        QuantDim::Oc => g,
        QuantDim::Ic => transpose(&g, rows, cols),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_the_definition_on_shapes_that_cut_its_blocks() {
        for (rows, cols) in [
            (1, 1),
            (1, 37),
            (37, 1),
            (17, 33),
            (33, 17),
            (100, 70),
            (64, 48),
        ] {
            let data: Vec<u32> = (0..(rows * cols) as u32).collect();
            let t = transpose(&data, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        t[c * rows + r],
                        data[r * cols + c],
                        "{rows}x{cols} ({r}, {c})"
                    );
                }
            }
        }
    }

    #[test]
    fn transpose_into_reads_and_writes_only_its_block() {
        // A 19 × 23 block at offset 5 of a 40-wide source, into a destination of stride 30.
        let src: Vec<i32> = (0..40 * 25).collect();
        let mut dst = vec![-1; 23 * 30];
        transpose_into(&src[5..], 40, 19, 23, &mut dst, 30);
        for c in 0..23 {
            for r in 0..30 {
                let want = if r < 19 { src[5 + r * 40 + c] } else { -1 };
                assert_eq!(dst[c * 30 + r], want, "({r}, {c})");
            }
        }
    }
}
