//! A KV cache in host memory, head-major and f16 or f32 ([`HostKv`]).
//!
//! Layout: keys and values are each one buffer `[batch][kv_heads][capacity][d]`, so the rows
//! a decode step reads for one head are one contiguous run (the hardware prefetcher follows
//! it), rather than `d` values out of every `kv_heads·d` of a position-major buffer. Positions
//! `len..capacity` are unused; the buffers grow geometrically.

use half::f16;

use super::activation::{HeadRows, KvElem};
use super::attention::HeadsView;
use crate::kv::{KvDtype, grown_capacity};

/// One layer's keys and values of a sequence (or of a batch of equally long sequences).
#[derive(Clone, Debug)]
pub struct HostKv {
    planes: Planes,
    kv_heads: usize,
    /// Set by the first append, with `batch`.
    head_dim: usize,
    batch: usize,
    len: usize,
    capacity: usize,
    /// Positions the first allocation holds (at least).
    reserve: usize,
}

#[derive(Clone, Debug)]
enum Planes {
    F32(Plane<f32>),
    F16(Plane<f16>),
}

/// Keys and values at one precision.
#[derive(Clone, Debug, Default)]
struct Plane<T> {
    k: Vec<T>,
    v: Vec<T>,
}

/// Rows of one key/value head at the cache's precision.
pub enum Rows<'a> {
    F32(HeadRows<'a, f32>),
    F16(HeadRows<'a, f16>),
}

impl HostKv {
    /// An empty cache for `kv_heads` key/value heads whose first allocation holds `reserve`
    /// positions (more if the first append needs them).
    pub fn empty(dtype: KvDtype, kv_heads: usize, reserve: usize) -> Self {
        assert!(kv_heads > 0, "a KV cache needs at least one head");
        let planes = match dtype {
            KvDtype::F32 => Planes::F32(Plane::default()),
            KvDtype::F16 => Planes::F16(Plane::default()),
        };
        Self {
            planes,
            kv_heads,
            head_dim: 0,
            batch: 0,
            len: 0,
            capacity: 0,
            reserve,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[batch, kv_heads, len, head_dim]`.
    pub fn dims(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.len, self.head_dim]
    }

    /// Appends `t` positions of `batch` sequences: `k, v` row-major `[batch, t, kv_heads·d]`.
    ///
    /// Panics if the sizes disagree with each other or with earlier appends.
    pub fn append_rows(&mut self, k: &[f32], v: &[f32], batch: usize, t: usize) {
        let width = k.len() / (batch * t).max(1);
        assert!(
            k.len() == v.len()
                && k.len() == batch * t * width
                && width.is_multiple_of(self.kv_heads),
            "keys ({}) and values ({}) are not [{batch}, {t}, {} heads·d]",
            k.len(),
            v.len(),
            self.kv_heads
        );
        if k.is_empty() {
            return;
        }
        if self.head_dim == 0 {
            (self.batch, self.head_dim) = (batch, width / self.kv_heads);
        }
        assert!(
            (batch, width) == (self.batch, self.kv_heads * self.head_dim),
            "appending [{batch}, {t}, {width}] to a cache of [{}, _, {}]",
            self.batch,
            self.kv_heads * self.head_dim
        );
        let end = self.len + t;
        if end > self.capacity {
            let capacity = grown_capacity(end, self.capacity, self.reserve);
            let shape = self.shape();
            match &mut self.planes {
                Planes::F32(p) => p.grow(shape, self.len, capacity),
                Planes::F16(p) => p.grow(shape, self.len, capacity),
            }
            self.capacity = capacity;
        }
        let shape = self.shape();
        match &mut self.planes {
            Planes::F32(p) => p.write(shape, self.len, (k, v), t),
            Planes::F16(p) => p.write(shape, self.len, (k, v), t),
        }
        self.len = end;
    }

    /// The rows of key/value head `g` of sequence `b` at the cache's precision.
    pub fn head_rows(&self, b: usize, g: usize) -> Rows<'_> {
        assert!(
            b < self.batch && g < self.kv_heads,
            "no head {g} of sequence {b}"
        );
        let at = (b * self.kv_heads + g) * self.capacity * self.head_dim;
        match &self.planes {
            Planes::F32(p) => Rows::F32(p.rows(at, self.head_dim, self.len)),
            Planes::F16(p) => Rows::F16(p.rows(at, self.head_dim, self.len)),
        }
    }

    /// `f(k, v)` with f32 views `[batch, kv_heads, len, d]` of everything held: the buffers
    /// themselves for f32, a widened copy for f16 (a prompt's attention, whose products want
    /// f32 operands; the copy is small against them).
    pub fn with_heads<R>(&self, f: impl FnOnce(HeadsView<'_>, HeadsView<'_>) -> R) -> R {
        let dims = self.dims();
        let [_, _, cap, d] = self.shape();
        match &self.planes {
            Planes::F32(p) => {
                let strides = [self.kv_heads * cap * d, cap * d, d, 1];
                f(
                    HeadsView::new(&p.k, dims, strides),
                    HeadsView::new(&p.v, dims, strides),
                )
            }
            Planes::F16(p) => {
                let widen = |buf| Plane::widened(buf, self.shape(), self.len);
                let (k, v) = (widen(&p.k), widen(&p.v));
                f(
                    HeadsView::contiguous(&k, dims),
                    HeadsView::contiguous(&v, dims),
                )
            }
        }
    }

    /// `[batch, kv_heads, capacity, head_dim]`.
    fn shape(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.capacity, self.head_dim]
    }
}

impl<T: KvElem> Plane<T> {
    /// The `len` rows of the head starting at element `at`.
    fn rows(&self, at: usize, d: usize, len: usize) -> HeadRows<'_, T> {
        HeadRows {
            k: &self.k[at..],
            v: &self.v[at..],
            stride: d,
            len,
        }
    }

    /// Reallocates for `capacity` positions, keeping the first `len` of each head.
    fn grow(&mut self, [b, h, old_cap, d]: [usize; 4], len: usize, capacity: usize) {
        for buf in [&mut self.k, &mut self.v] {
            let mut grown = vec![T::default(); b * h * capacity * d];
            if len > 0 {
                let old = buf.chunks_exact(old_cap * d);
                for (new, old) in grown.chunks_exact_mut(capacity * d).zip(old) {
                    new[..len * d].copy_from_slice(&old[..len * d]);
                }
            }
            *buf = grown;
        }
    }

    /// Writes `t` positions from row-major `[b, t, h·d]` at positions `len..`.
    fn write(
        &mut self,
        [_, h, cap, d]: [usize; 4],
        len: usize,
        (k, v): (&[f32], &[f32]),
        t: usize,
    ) {
        for (buf, src) in [(&mut self.k, k), (&mut self.v, v)] {
            for (bi, seq) in src.chunks_exact(t * h * d).enumerate() {
                for (i, pos) in seq.chunks_exact(h * d).enumerate() {
                    for (g, head) in pos.chunks_exact(d).enumerate() {
                        let at = ((bi * h + g) * cap + len + i) * d;
                        T::narrow_from(&mut buf[at..at + d], head);
                    }
                }
            }
        }
    }

    /// The first `len` positions of `buf`, widened to a contiguous `[b, h, len, d]`.
    fn widened(buf: &[T], [b, h, cap, d]: [usize; 4], len: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(b * h * len * d);
        for head in buf.chunks_exact(cap * d).take(b * h) {
            out.extend(head[..len * d].iter().map(|x| x.widen()));
        }
        out
    }
}
