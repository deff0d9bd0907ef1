//! A KV cache in host memory, head-major and f16, f32 or Q8_0 ([`HostKv`]).
//!
//! Layout: keys and values are each one buffer `[batch][kv_heads][capacity][d]` (`d / 32`
//! blocks for Q8_0), so the rows a decode step reads for one head are one contiguous run (the
//! hardware prefetcher follows it), rather than `d` values out of every `kv_heads·d` of a
//! position-major buffer. Positions `len..capacity` are unused; the buffers grow geometrically.

use half::f16;

use super::activation::{HeadRows, KvElem, Q8Block};
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
    Q8(Plane<Q8Block>),
}

/// Keys and values at one precision: rows of `d / T::VALUES` elements.
#[derive(Clone, Debug, Default)]
struct Plane<T> {
    k: Vec<T>,
    v: Vec<T>,
}

/// Rows of one key/value head at the cache's precision.
pub enum Rows<'a> {
    F32(HeadRows<'a, f32>),
    F16(HeadRows<'a, f16>),
    Q8(HeadRows<'a, Q8Block>),
}

impl HostKv {
    /// An empty cache for `kv_heads` key/value heads whose first allocation holds `reserve`
    /// positions (more if the first append needs them).
    pub fn empty(dtype: KvDtype, kv_heads: usize, reserve: usize) -> Self {
        assert!(kv_heads > 0, "a KV cache needs at least one head");
        let planes = match dtype {
            KvDtype::F32 => Planes::F32(Plane::default()),
            KvDtype::F16 => Planes::F16(Plane::default()),
            KvDtype::Q8_0 => Planes::Q8(Plane::default()),
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
            assert!(
                self.dtype().holds_heads_of(self.head_dim),
                "a {} KV cache cannot hold heads of {} values",
                self.dtype(),
                self.head_dim
            );
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
                Planes::Q8(p) => p.grow(shape, self.len, capacity),
            }
            self.capacity = capacity;
        }
        let shape = self.shape();
        match &mut self.planes {
            Planes::F32(p) => p.write(shape, self.len, (k, v), t),
            Planes::F16(p) => p.write(shape, self.len, (k, v), t),
            Planes::Q8(p) => p.write(shape, self.len, (k, v), t),
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
            Planes::Q8(p) => Rows::Q8(p.rows(at, self.head_dim, self.len)),
        }
    }

    /// `f(k, v)` with f32 views `[batch, kv_heads, len, d]` of everything held: the buffers
    /// themselves for f32, a widened copy otherwise (a prompt's attention, whose products want
    /// f32 operands; the copy is small against them).
    pub fn with_heads<R>(&self, f: impl FnOnce(HeadsView<'_>, HeadsView<'_>) -> R) -> R {
        let dims = self.dims();
        let [_, _, cap, d] = self.shape();
        let (k, v) = match &self.planes {
            Planes::F32(p) => {
                let strides = [self.kv_heads * cap * d, cap * d, d, 1];
                return f(
                    HeadsView::new(&p.k, dims, strides),
                    HeadsView::new(&p.v, dims, strides),
                );
            }
            Planes::F16(p) => p.widened(self.shape(), self.len),
            Planes::Q8(p) => p.widened(self.shape(), self.len),
        };
        f(
            HeadsView::contiguous(&k, dims),
            HeadsView::contiguous(&v, dims),
        )
    }

    /// What it stores.
    fn dtype(&self) -> KvDtype {
        match self.planes {
            Planes::F32(_) => KvDtype::F32,
            Planes::F16(_) => KvDtype::F16,
            Planes::Q8(_) => KvDtype::Q8_0,
        }
    }

    /// `[batch, kv_heads, capacity, head_dim]`.
    fn shape(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.capacity, self.head_dim]
    }
}

impl<T: KvElem> Plane<T> {
    /// The `len` rows of `d` values of the head whose first value is value `at` of the planes.
    fn rows(&self, at: usize, d: usize, len: usize) -> HeadRows<'_, T> {
        let at = at / T::VALUES;
        HeadRows {
            k: &self.k[at..],
            v: &self.v[at..],
            stride: d / T::VALUES,
            len,
        }
    }

    /// Reallocates for `capacity` positions, keeping the first `len` of each head.
    fn grow(&mut self, [b, h, old_cap, d]: [usize; 4], len: usize, capacity: usize) {
        let w = d / T::VALUES;
        for buf in [&mut self.k, &mut self.v] {
            let mut grown = vec![T::default(); b * h * capacity * w];
            if len > 0 {
                let old = buf.chunks_exact(old_cap * w);
                for (new, old) in grown.chunks_exact_mut(capacity * w).zip(old) {
                    new[..len * w].copy_from_slice(&old[..len * w]);
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
        let w = d / T::VALUES;
        for (buf, src) in [(&mut self.k, k), (&mut self.v, v)] {
            for (bi, seq) in src.chunks_exact(t * h * d).enumerate() {
                for (i, pos) in seq.chunks_exact(h * d).enumerate() {
                    for (g, head) in pos.chunks_exact(d).enumerate() {
                        let at = ((bi * h + g) * cap + len + i) * w;
                        T::narrow_from(&mut buf[at..at + w], head);
                    }
                }
            }
        }
    }

    /// The first `len` positions of keys and values, widened to contiguous `[b, h, len, d]`.
    fn widened(&self, [b, h, cap, d]: [usize; 4], len: usize) -> (Vec<f32>, Vec<f32>) {
        let w = d / T::VALUES;
        let widen = |buf: &[T]| {
            let mut out = vec![0f32; b * h * len * d];
            if out.is_empty() {
                return out;
            }
            for (head, out) in buf.chunks_exact(cap * w).zip(out.chunks_exact_mut(len * d)) {
                T::widen_row(&head[..len * w], out);
            }
            out
        };
        (widen(&self.k), widen(&self.v))
    }
}
