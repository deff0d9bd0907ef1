//! KV caches: the keys and values of the positions a sequence has seen, kept per layer so a
//! decode step projects only its new token.
//!
//! A backend chooses how it stores them ([`crate::QuantBackend::KvCache`], a [`KvStore`]): the
//! ndarray backend keeps them on the host, head-major and in f16 by default
//! ([`crate::cpu::kv::HostKv`]); the cube backends keep f32 tensors ([`TensorKv`]).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use burn::prelude::*;

use crate::QuantBackend;
use crate::cpu::activation::{KvElem, Q8Block};

/// The precision a KV cache stores keys and values at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    /// Half the memory of f32 and half the bytes a decode step reads, which is most of its
    /// attention time; each value is rounded once, when written (relative error ≤ 2⁻¹¹).
    /// llama.cpp's default too.
    #[default]
    F16,
    /// Exact: the same attention as recomputing the whole sequence.
    F32,
    /// llama.cpp's Q8_0: blocks of 32 values as 8-bit integers with one f16 step each
    /// ([`crate::cpu::activation::Q8Block`]), 34 bytes per 32 values, just over half of f16's
    /// memory (relative error ≤ 1/254 of a block's largest magnitude). Needs heads whose size is
    /// a multiple of 32.
    Q8_0,
}

impl KvDtype {
    /// Values per block of [`KvDtype::Q8_0`].
    pub const Q8_BLOCK: usize = 32;

    /// Bytes a row of `d` values takes.
    pub fn row_bytes(self, d: usize) -> usize {
        match self {
            Self::F16 => 2 * d,
            Self::F32 => 4 * d,
            Self::Q8_0 => d.div_ceil(Self::Q8_BLOCK) * size_of::<Q8Block>(),
        }
    }

    /// `x` as a cache of this type gives it back: rounded to f16, or block by block to Q8_0
    /// (`x` holds whole blocks then: rows whose size is a multiple of 32).
    pub fn as_stored(self, x: &[f32]) -> Vec<f32> {
        match self {
            Self::F32 => x.to_vec(),
            Self::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            Self::Q8_0 => {
                let mut blocks = vec![Q8Block::default(); x.len() / Self::Q8_BLOCK];
                Q8Block::narrow_from(&mut blocks, x);
                let mut out = vec![0f32; x.len()];
                Q8Block::widen_row(&blocks, &mut out);
                out
            }
        }
    }

    /// Whether it stores heads of `d` values: Q8_0's blocks must tile a row.
    pub fn holds_heads_of(self, d: usize) -> bool {
        self.check_heads(d).is_ok()
    }

    /// [`KvDtype::holds_heads_of`], or why not.
    pub fn check_heads(self, d: usize) -> Result<(), String> {
        if self == Self::Q8_0 && !d.is_multiple_of(Self::Q8_BLOCK) {
            return Err(format!(
                "{self} stores heads whose size is a multiple of {}; this model's heads have {d} \
                 values (use f16 or f32)",
                Self::Q8_BLOCK
            ));
        }
        Ok(())
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
        })
    }
}

impl FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!(
                "unknown KV cache type `{other}` (expected f16, f32 or q8_0)"
            )),
        }
    }
}

/// One layer's KV cache of one sequence (or of a batch of sequences of equal length).
pub trait KvStore<B: Backend>: Clone + Send + Sync + fmt::Debug {
    /// An empty cache for `kv_heads` key/value heads whose first allocation holds `reserve`
    /// positions (more only if needed).
    fn new(dtype: KvDtype, kv_heads: usize, reserve: usize, device: &B::Device) -> Self;

    /// Bytes a cache made for `dtype` stores per row of `d` values (what reserving memory for
    /// it costs).
    fn row_bytes(dtype: KvDtype, d: usize) -> usize {
        dtype.row_bytes(d)
    }

    /// Positions held.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the keys and values of the next positions, `k, v: [b, t, kv_heads·d]`
    /// (projected, `k` rotated).
    fn append(&mut self, k: Tensor<B, 3>, v: Tensor<B, 3>);

    /// [`KvStore::append`] for several sequences at once: `k, v: [1, R, kv_heads·d]` hold
    /// `spans[i]` consecutive rows for `caches[i]`, in order. Backends that read tensors in
    /// place override it, so that a batched step does not cut two tensors per sequence.
    fn append_spans(caches: &mut [&mut Self], k: Tensor<B, 3>, v: Tensor<B, 3>, spans: &[usize]) {
        assert_eq!(caches.len(), spans.len(), "one span per cache");
        assert_eq!(
            k.dims()[1],
            spans.iter().sum::<usize>(),
            "the spans cover the rows"
        );
        let mut start = 0;
        for (cache, &n) in caches.iter_mut().zip(spans) {
            cache.append(k.clone().narrow(1, start, n), v.clone().narrow(1, start, n));
            start += n;
        }
    }

    /// Causal attention of `q: [b, t, heads·d]`, the queries of the last `t` positions held,
    /// over every position held: `[b, t, heads·d]` (the input of `o_proj`). See
    /// [`QuantBackend::causal_attention`].
    fn attend(&self, q: Tensor<B, 3>, heads: usize) -> Tensor<B, 3>;

    /// One decode step of several sequences: row `i` of `q: [1, n, heads·d]` is the query of
    /// the last position held by `caches[i]` (one sequence each). Returns `[1, n, heads·d]`,
    /// [`KvStore::attend`] of each row, in one call, so that backends can spread the whole
    /// batch's heads over their threads.
    fn attend_batch(q: Tensor<B, 3>, caches: &[&Self], heads: usize) -> Tensor<B, 3>;
}

/// A KV cache in two f32 tensors `[b, capacity, kv_heads·d]`, for any backend.
///
/// The buffers grow geometrically and new positions are written in place, so a decode step
/// copies one row per layer instead of the whole history (which concatenation would). It keeps
/// f32 whatever [`KvDtype`] asks: its attention is composed of tensor ops, which run in f32.
#[derive(Clone, Debug)]
pub struct TensorKv<B: Backend> {
    /// Rows `len..` are unused.
    k: Option<Tensor<B, 3>>,
    v: Option<Tensor<B, 3>>,
    len: usize,
    kv_heads: usize,
    /// Positions the first allocation holds (at least): growing copies the history and faults
    /// in fresh pages at every doubling.
    reserve: usize,
}

impl<B: QuantBackend> KvStore<B> for TensorKv<B> {
    fn new(_dtype: KvDtype, kv_heads: usize, reserve: usize, _device: &B::Device) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            kv_heads,
            reserve,
        }
    }

    fn row_bytes(_dtype: KvDtype, d: usize) -> usize {
        KvDtype::F32.row_bytes(d)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn append(&mut self, k: Tensor<B, 3>, v: Tensor<B, 3>) {
        let rows = self.len..self.len + k.dims()[1];
        self.len = rows.end;
        write_rows(&mut self.k, k, rows.clone(), self.reserve);
        write_rows(&mut self.v, v, rows, self.reserve);
    }

    fn attend(&self, q: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            panic!("attention over an empty KV cache");
        };
        let (k, v) = (
            k.clone().narrow(1, 0, self.len),
            v.clone().narrow(1, 0, self.len),
        );
        B::causal_attention(q, k, v, heads, self.kv_heads)
    }

    fn attend_batch(q: Tensor<B, 3>, caches: &[&Self], heads: usize) -> Tensor<B, 3> {
        let rows = caches
            .iter()
            .enumerate()
            .map(|(i, cache)| cache.attend(q.clone().narrow(1, i, 1), heads))
            .collect();
        Tensor::cat(rows, 1)
    }
}

/// Positions a cache holding `capacity` grows to when it must hold `needed`: at least double
/// (which keeps the total copying linear in the sequence length), at least 64, and at least the
/// `reserve` its first allocation was asked for.
pub(crate) fn grown_capacity(needed: usize, capacity: usize, reserve: usize) -> usize {
    needed.max(2 * capacity).max(64).max(reserve)
}

/// Writes `new` into rows `rows` of `buf`, growing it if needed (to at least `reserve` rows).
fn write_rows<B: Backend>(
    buf: &mut Option<Tensor<B, 3>>,
    new: Tensor<B, 3>,
    rows: Range<usize>,
    reserve: usize,
) {
    let [b, _, d] = new.dims();
    let kept = 0..rows.start;
    let full = match buf.take() {
        Some(old) if old.dims()[1] >= rows.end => old,
        old => {
            let held = old.as_ref().map_or(0, |o| o.dims()[1]);
            let capacity = grown_capacity(rows.end, held, reserve);
            let grown = Tensor::zeros([b, capacity, d], &new.device());
            match old {
                Some(old) => {
                    grown.slice_assign([0..b, kept.clone(), 0..d], old.slice([0..b, kept, 0..d]))
                }
                None => grown,
            }
        }
    };
    // The only handle, so the backends write in place.
    *buf = Some(full.slice_assign([0..b, rows, 0..d], new));
}
