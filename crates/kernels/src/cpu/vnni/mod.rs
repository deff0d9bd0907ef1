//! The decode-sized product in int8 dot products, on the same [`CpuPacked`] as the f32 kernel.
//! [`super::gemm`] uses it wherever the CPU has the instructions ([`is_supported`]):
//! AVX512-VNNI's `vpdpbusd` (this file) or AVX2's `vpmaddubsw` (`avx2.rs`), the two sharing the
//! rounding's definition, the quads and the task split.
//!
//! # Arithmetic
//! The f32 kernel multiplies each code by an f32 activation: 16 multiply-adds per FMA. Here
//! each row of activations is first rounded to 8 bits in blocks of 32 ([`quantize_block`]: a
//! step `d = max|x|/127` and integers `round(x/d)`, llama.cpp's Q8_0), and `vpdpbusd`
//! multiplies 4 codes (u8) by 4 activations (i8) and adds them into each 32-bit lane: 64
//! multiply-adds per instruction. The integer sums are exact, so the product is `x̂ · Ŵᵀ`
//! up to the f32 sums over blocks, where `x̂` is `x` rounded block by block:
//!
//! * **per-OC**: `y = Σ_g (Σ_{b∈g} (s_g·d_b)·Σ_{k∈b} x̂q_k·q_k − s_g·z_g·Σ_{k∈g} x̂_k)`: each
//!   block's integer sum goes into the output with its group's scale, without a group sum;
//! * **per-IC**: what is rounded is the coefficient `c_k = x_k·s_{g,k}` of each group `g` of
//!   outputs (the f32 kernel's `coef`), so `y = Σ_b e_b·Σ_{k∈b} ĉq_k·q_k − Σ_k c_k·z_{g,k}`
//!   (the zero term is one f32 sum per group and row, so it keeps the exact coefficients).
//!
//! Both run the same block loop (`block_dot`). A row's result does not depend on the other
//! rows of the call, bit for bit: a sequence decodes the same tokens alone and in a batch.
//! The rounding costs accuracy on the order of Q8_0's; docs/results.md measures its effect on
//! perplexity.
//!
//! # Bit layout
//! `vpdpbusd` multiplies the 4 bytes of a 32-bit lane by the same 4 bytes of a broadcast
//! activation word. So the 32 codes of a block (one lane's `b` words, see [`CpuPacked`]) are
//! decoded into 8 *quads*, 4 codes in the 4 bytes of the lane, and the rounded activations of
//! each block are stored permuted the same way ([`quad_codes`]), 4 bytes per quad. A quad is
//! 4 codes that one byte-wise shift can take from a single word (from two for the last two
//! 3-bit quads):
//!
//! * 8 bits: word `i` is quad `i`, codes `4i..4i+4`, as stored;
//! * 4 bits: the low nibbles of word `w` (codes `8w, 8w+2, 8w+4, 8w+6`), then the high ones;
//! * 2 bits: bits `2s..2s+2` of each byte of word `w` (codes `16w+s+4·{0,1,2,3}`);
//! * 3 bits: codes `4i..4i+4` too. The CPU layout puts quad `i` in bits `3(i mod 2)..` of
//!   each byte of word `i/2` for quads 0–5, and splits quads 6 and 7 between the top two bits
//!   of words 0 and 1 and the top two of word 2 (`layout::code_at`): two shifts, two masks
//!   and an or.
//!
//! So 3-bit blocks cost only shifts, ands and ors to decode, which on AMD Zen 4 issue beside
//! `vpdpbusd` (the stream's funnel shifts and `vpmultishiftqb` shared its pipes there:
//! docs/serve.md, session 51).

use std::sync::OnceLock;

use super::layout::{BLOCK, CpuPacked};

/// Four-code steps per 32-code block.
const QUADS: usize = BLOCK / 4;

/// The codes (indices within a 32-code block) that quad `i` puts in bytes 0–3 of each lane, for
/// `bits`-bit codes. The rounded activations of a block are stored in this order.
pub const fn quad_codes(bits: u32) -> [[u8; 4]; QUADS] {
    let mut q = [[0u8; 4]; QUADS];
    let mut i = 0;
    while i < QUADS {
        let mut b = 0;
        while b < 4 {
            let (qi, qb) = (i as u8, b as u8);
            q[i][b] = match bits {
                4 => 8 * (qi / 2) + 2 * qb + qi % 2,
                2 => 16 * (qi / 4) + 4 * qb + qi % 4,
                _ => 4 * qi + qb,
            };
            b += 1;
        }
        i += 1;
    }
    q
}

/// `1/127` in f32: a block's step is `max|x|·STEP`, a product, so that one division (for
/// `127/max|x|`) is all a block costs.
pub const STEP: f32 = 1.0 / 127.0;

/// Rounds a block of 32 activations to 8 bits: `(d, q)` with `x ≈ d·q`, `d = max|x|·`[`STEP`]
/// and `q = round_half_even(x · (127/max|x|))`. An all-zero block gives `d = 0`; a NaN anywhere
/// gives `d = NaN`, so the product is NaN as the f32 kernel's would be. This is the
/// definition the kernel's vector code follows operation for operation.
pub fn quantize_block(x: &[f32; BLOCK]) -> (f32, [i8; BLOCK]) {
    if x.iter().any(|v| v.is_nan()) {
        return (f32::NAN, [0; BLOCK]);
    }
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if amax == 0.0 {
        return (0.0, [0; BLOCK]);
    }
    let inv = 127.0 / amax;
    (amax * STEP, x.map(|v| (v * inv).round_ties_even() as i8))
}

/// The instruction sets the int8 kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 with VNNI and VBMI: `vpdpbusd`, every code width.
    Avx512Vnni,
    /// AVX2 with FMA and F16C: `vpmaddubsw` ([`avx2`]), every code width.
    Avx2,
}

impl Isa {
    /// Every instruction set, the best first.
    pub const ALL: [Isa; 2] = [Isa::Avx512Vnni, Isa::Avx2];

    /// The best int8 instruction set of this CPU, if any (detected once).
    pub fn best() -> Option<Self> {
        static ISA: OnceLock<Option<Isa>> = OnceLock::new();
        *ISA.get_or_init(|| Isa::ALL.into_iter().find(|i| i.is_available()))
    }

    /// Whether this CPU has every feature this instruction set's kernel is compiled for.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let fma = has!("fma");
            match self {
                Isa::Avx512Vnni => {
                    has!("avx512f")
                        && has!("avx512bw")
                        && has!("avx512vl")
                        && has!("avx512vnni")
                        && has!("avx512vbmi")
                        && fma
                }
                Isa::Avx2 => has!("avx2") && fma && has!("f16c"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// Whether this CPU runs the int8 kernel: it needs AVX-512 VNNI and VBMI, or AVX2 with
/// FMA and F16C.
pub fn is_supported() -> bool {
    Isa::best().is_some()
}

/// How the AVX-512 kernel walks the 16-output tiles of a product of [`PAIRED_ROWS`] rows or
/// more: one at a time, or two at a time sharing each block's rounded activations, which gives
/// every row two independent `vpdpbusd` chains. The two give the same results bit for bit;
/// which is faster depends on the CPU (docs/serve.md, sessions 34 and 38): pairs were 5–6%
/// faster at 8 rows on Intel Emerald Rapids, and 10–27% slower on AMD Zen 5, where two tiles'
/// sums, codes and accumulators of 8 rows spill out of the 32 registers. The AVX2 kernel always
/// takes one tile (two would not fit in its 16 registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiling {
    Single,
    Paired,
}

impl Tiling {
    /// The faster tiling measured on this CPU's vendor: pairs on Intel, single tiles elsewhere.
    pub fn for_this_cpu() -> Self {
        static TILING: OnceLock<Tiling> = OnceLock::new();
        *TILING.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let id = std::arch::x86_64::__cpuid(0);
                // "GenuineIntel" in ebx, edx, ecx.
                if [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e] {
                    return Tiling::Paired;
                }
            }
            Tiling::Single
        })
    }
}

/// From this many rows on, [`Tiling::Paired`] takes tiles two at a time.
pub const PAIRED_ROWS: usize = 4;

/// `y[m, out] = x̂[m, in] · Ŵᵀ` with int8 activations (see the module doc); an error if the
/// CPU lacks the instructions ([`is_supported`]) or the shapes do not match.
pub fn gemm(
    x: &[f32],
    m: usize,
    w: &CpuPacked,
    y: &mut [f32],
) -> Result<(), super::CpuKernelError> {
    gemm_many(x, m, &mut [(w, y)])
}

/// [`gemm()`] of several weights with the same input `x` (a layer's q, k and v, or its gate
/// and up), each `(w, y)` getting `y[m, w.out_features]`. The results are those of a
/// [`gemm()`] per weight, bit for bit; the weights' tasks share one parallel pass, so the
/// threads fork and join once for all of them, and a small weight's few tasks do not leave a
/// thread idle at its end.
pub fn gemm_many(
    x: &[f32],
    m: usize,
    products: &mut [(&CpuPacked, &mut [f32])],
) -> Result<(), super::CpuKernelError> {
    gemm_many_tiled(x, m, products, Tiling::for_this_cpu())
}

/// [`gemm_many`] with a given [`Tiling`].
pub fn gemm_many_tiled(
    x: &[f32],
    m: usize,
    products: &mut [(&CpuPacked, &mut [f32])],
    tiling: Tiling,
) -> Result<(), super::CpuKernelError> {
    let isa = Isa::best().ok_or(super::CpuKernelError::NoInt8)?;
    gemm_many_on(isa, x, m, products, tiling)
}

/// [`gemm()`] on a given instruction set, which may be below this CPU's best, and with a given
/// [`Tiling`] (the same results; tests and benchmarks compare them); an error if the CPU lacks
/// the instruction set. AVX2 ignores `tiling` (its tiles are never paired).
pub fn gemm_on(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &CpuPacked,
    y: &mut [f32],
    tiling: Tiling,
) -> Result<(), super::CpuKernelError> {
    gemm_many_on(isa, x, m, &mut [(w, y)], tiling)
}

fn gemm_many_on(
    isa: Isa,
    x: &[f32],
    m: usize,
    products: &mut [(&CpuPacked, &mut [f32])],
    tiling: Tiling,
) -> Result<(), super::CpuKernelError> {
    for (w, y) in products.iter() {
        super::check_shapes(x, m, w.in_features, y, w.out_features)?;
    }
    if !isa.is_available() {
        return Err(super::CpuKernelError::NoInt8);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut parts: Vec<_> = products
            .iter_mut()
            .map(|(w, y)| (&**w, super::pad_rows(x, w.in_features, w.k_pad), &mut **y))
            .collect();
        // SAFETY: `Isa::is_available` checked every feature the ISA's kernels are compiled for,
        // and each `y` holds `m` rows of its weight's outputs.
        unsafe {
            match isa {
                Isa::Avx512Vnni => pass::pass::<x86::Vnni>(&mut parts, m, tiling),
                Isa::Avx2 => pass::pass::<avx2::Avx2>(&mut parts, m, Tiling::Single),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, tiling);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx2;

/// What both instruction sets share: the task split over tiles and groups, the rounded
/// activations' layout, and where results go.
#[cfg(target_arch = "x86_64")]
mod pass {
    use std::borrow::Cow;
    use std::cell::RefCell;

    use super::super::MAX_M_PER_PASS;
    use super::super::layout::{BLOCK, CpuPacked, LANES};
    use super::{PAIRED_ROWS, QUADS, Tiling};
    use quant_core::QuantDim;
    use rayon::prelude::*;

    /// One instruction set's block loops. Every method's safety contract: the CPU has the
    /// instruction set's features.
    pub(super) trait Kernel {
        /// Rounds `M` rows of `x_pad` into `acts` and adds each block's `d·Σq̂` into its
        /// group's `xsum[m·groups + g]` (per-OC).
        unsafe fn round_activations<const B: usize, const M: usize>(
            x_pad: &[f32],
            acts: &mut Rounded,
            xsum: &mut [f32],
        );

        /// The per-OC tiles from `first` on whose code words are `codes` (one tile, or two
        /// when paired).
        unsafe fn oc_tiles<const B: usize, const M: usize>(
            w: &CpuPacked,
            acts: &Rounded,
            xsum: &[f32],
            first: usize,
            codes: &[[u32; LANES]],
            out: &Out,
        );

        /// Per-IC group `g`, whose tiles' code words are `codes`, its tiles two at a time when
        /// `paired`; `acts` is scratch.
        unsafe fn ic_group<const B: usize, const M: usize>(
            w: &CpuPacked,
            x_pad: &[f32],
            g: usize,
            codes: &[[u32; LANES]],
            acts: &mut Rounded,
            out: &Out,
            paired: bool,
        );
    }

    /// One weight's padded rows and where its product goes (`[row][out_features]`).
    pub(super) type Part<'a> = (&'a CpuPacked, Cow<'a, [f32]>, &'a mut [f32]);

    /// Runs the products of the `m` padded rows of each part by its weight, all their tasks in
    /// one parallel pass. The rows go in chunks of [`MAX_M_PER_PASS`] (the accumulators that
    /// fit in registers), and each task takes its tiles or group through every chunk in turn:
    /// a prompt's rows then read a weight's codes from memory once, not once per chunk (at
    /// LLaMA-7B's sizes every weight streams from memory).
    ///
    /// Safety: the CPU has `K`'s features, `K` handles each `w.bits`, and pairs tiles if
    /// `tiling` says so.
    pub(super) unsafe fn pass<K: Kernel>(parts: &mut [Part<'_>], m: usize, tiling: Tiling) {
        // One pairing for every chunk, so that task `i` covers the same tiles in each (a
        // short last chunk pairs too: pairing changes no bit).
        let paired = tiling == Tiling::Paired && m.min(MAX_M_PER_PASS) >= PAIRED_ROWS;
        let jobs: Vec<Vec<Job<'_>>> = parts
            .iter_mut()
            .map(|(w, x_pad, y)| {
                let (k, n) = (w.k_pad, w.out_features);
                let y = y.as_mut_ptr();
                (0..m)
                    .step_by(MAX_M_PER_PASS)
                    .map(|first| {
                        let rows = MAX_M_PER_PASS.min(m - first);
                        // SAFETY: `y` holds `m > first` rows of `n`.
                        let out = Out {
                            y: unsafe { y.add(first * n) },
                            n,
                        };
                        let x_rows = &x_pad[first * k..(first + rows) * k];
                        // SAFETY: this function's contract is `job`'s.
                        unsafe { job::<K>(w, x_rows, rows, out, paired) }
                    })
                    .collect()
            })
            .collect();
        let tasks = |chunks: &[Job<'_>]| chunks.first().map_or(0, |j| j.tasks);
        debug_assert!(jobs.iter().all(|c| c.iter().all(|j| j.tasks == tasks(c))));
        let starts: Vec<usize> = jobs
            .iter()
            .scan(0, |at, c| {
                *at += tasks(c);
                Some(*at - tasks(c))
            })
            .collect();
        let total = jobs.iter().map(|c| tasks(c)).sum::<usize>();
        let chunks = m.div_ceil(MAX_M_PER_PASS);
        let run = |scratch: &mut Vec<Rounded>, i: usize| {
            let j = starts.partition_point(|&s| s <= i) - 1;
            for (job, scratch) in jobs[j].iter().zip(scratch.iter_mut()) {
                (job.task)(i - starts[j], scratch)
            }
        };
        (0..total).into_par_iter().for_each(|i| {
            SCRATCH.with(|cell| match cell.try_borrow_mut() {
                Ok(mut scratch) => {
                    if scratch.len() < chunks {
                        scratch.resize_with(chunks, Rounded::default);
                    }
                    run(&mut scratch, i)
                }
                // Only if a task ever ran a pass itself (none does): fresh scratch then.
                Err(_) => run(&mut (0..chunks).map(|_| Rounded::default()).collect(), i),
            })
        });
    }

    thread_local! {
        /// Each thread's per-IC scratch, one [`Rounded`] per 8-row chunk, kept from pass to pass:
        /// rayon's `for_each_init` made fresh ones for every split of the task range, each
        /// allocating and zeroing `M·k` bytes again (4% of a per-IC product at 8 rows). It holds
        /// at most 16 chunks (128 rows, `DIRECT_ROWS_PACKED`): 1.6 MB at LLaMA-7B's 11008 inputs.
        static SCRATCH: RefCell<Vec<Rounded>> = const { RefCell::new(Vec::new()) };
    }

    /// One weight's share of a [`pass`]: task `i` of `tasks` (per-OC a tile or a pair of
    /// tiles, per-IC a group), given per-thread scratch.
    struct Job<'a> {
        tasks: usize,
        task: Box<Task<'a>>,
    }

    /// Runs task `i` of a [`Job`] with a thread's scratch.
    type Task<'a> = dyn Fn(usize, &mut Rounded) + Sync + 'a;

    /// `w`'s [`Job`] on `rows` rows of `x_pad`, into `out`.
    /// Safety: as [`pass`].
    unsafe fn job<'a, K: Kernel>(
        w: &'a CpuPacked,
        x_pad: &'a [f32],
        rows: usize,
        out: Out,
        paired: bool,
    ) -> Job<'a> {
        // SAFETY (each arm): this function's contract is `job_for`'s.
        macro_rules! by_rows {
            ($b:literal) => {
                match rows {
                    1 => unsafe { job_for::<K, $b, 1>(w, x_pad, out, paired) },
                    2 => unsafe { job_for::<K, $b, 2>(w, x_pad, out, paired) },
                    3 => unsafe { job_for::<K, $b, 3>(w, x_pad, out, paired) },
                    4 => unsafe { job_for::<K, $b, 4>(w, x_pad, out, paired) },
                    5 => unsafe { job_for::<K, $b, 5>(w, x_pad, out, paired) },
                    6 => unsafe { job_for::<K, $b, 6>(w, x_pad, out, paired) },
                    7 => unsafe { job_for::<K, $b, 7>(w, x_pad, out, paired) },
                    _ => unsafe { job_for::<K, $b, 8>(w, x_pad, out, paired) },
                }
            };
        }
        match w.bits {
            2 => by_rows!(2),
            3 => by_rows!(3),
            4 => by_rows!(4),
            _ => by_rows!(8),
        }
    }

    /// [`job`] for `M` rows of `B`-bit codes: per-OC rounds the activations now, once for all
    /// tiles, and its tasks take tiles (in pairs when `paired`, an odd last one alone); per-IC
    /// tasks take whole groups, each rounding its own coefficients.
    /// Safety: as [`pass`].
    unsafe fn job_for<'a, K: Kernel, const B: usize, const M: usize>(
        w: &'a CpuPacked,
        x_pad: &'a [f32],
        out: Out,
        paired: bool,
    ) -> Job<'a> {
        let k = w.k_pad;
        match w.dim {
            QuantDim::Oc => {
                let mut acts = Rounded::new(M, k);
                let mut xsum = vec![0f32; M * w.groups_along_k()];
                // SAFETY: this function's contract guarantees the CPU features.
                unsafe { K::round_activations::<B, M>(x_pad, &mut acts, &mut xsum) };
                let pair = if paired { 2 } else { 1 };
                let per_task = pair * w.words_per_tile();
                Job {
                    tasks: w.codes.len().div_ceil(per_task),
                    task: Box::new(move |c, _| {
                        let codes = &w.codes[c * per_task..((c + 1) * per_task).min(w.codes.len())];
                        // SAFETY: the job runs inside `pass`, whose contract guarantees the
                        // CPU features; each task writes its own tiles.
                        unsafe { K::oc_tiles::<B, M>(w, &acts, &xsum, pair * c, codes, &out) }
                    }),
                }
            }
            QuantDim::Ic => {
                let per_task = w.words_per_tile() * (w.group_size / LANES);
                Job {
                    tasks: w.codes.len().div_ceil(per_task),
                    task: Box::new(move |g, acts| {
                        let codes = &w.codes[g * per_task..((g + 1) * per_task).min(w.codes.len())];
                        acts.fit(M, k);
                        // SAFETY: as above; each task writes its own group's tiles.
                        unsafe { K::ic_group::<B, M>(w, x_pad, g, codes, acts, &out, paired) }
                    }),
                }
            }
        }
    }

    /// Where a pass writes: `y[m·n + o]`, row-major, which the tasks share. Each task writes
    /// only the outputs of its own tiles, so their writes never overlap.
    pub(super) struct Out {
        y: *mut f32,
        n: usize,
    }

    // SAFETY: tasks write disjoint outputs (see `Out`); `y` outlives the pass that shares it.
    unsafe impl Sync for Out {}

    impl Out {
        /// Where output `first` of row `m` is, and how many outputs from there on exist (the
        /// rest of a last tile past `n` is left out; 0 when `first ≥ n`).
        ///
        /// Safety: row `m` exists; the caller writes at most the returned count, and only
        /// outputs of tiles its task owns.
        #[inline(always)]
        pub(super) unsafe fn at(&self, m: usize, first: usize) -> (*mut f32, usize) {
            let lanes = self.n.saturating_sub(first);
            // SAFETY: row `m` exists, so `m·n + first` is inside `y` or one past a row's end
            // when `lanes` is 0.
            (unsafe { self.y.add(m * self.n + first.min(self.n)) }, lanes)
        }
    }

    /// `M` rows of rounded activations, block-major: for each block, each row's 8 words of 4
    /// permuted bytes (one word per quad), and each row's block scale. Block-major, so that
    /// the block loop finds all rows at constant offsets from one address.
    #[derive(Default)]
    pub(super) struct Rounded {
        pub(super) m: usize,
        pub(super) quads: Vec<[i32; QUADS]>,
        pub(super) scales: Vec<f32>,
    }

    impl Rounded {
        pub(super) fn new(m: usize, k: usize) -> Self {
            Self {
                m,
                quads: vec![[0; QUADS]; m * k / BLOCK],
                scales: vec![0.0; m * k / BLOCK],
            }
        }

        /// Makes this scratch hold `m` rows of `k`, keeping its allocation.
        fn fit(&mut self, m: usize, k: usize) {
            // Every slot is written before it is read, so what a resize keeps needs no clearing.
            self.m = m;
            self.quads.resize(m * k / BLOCK, [0; QUADS]);
            self.scales.resize(m * k / BLOCK, 0.0);
        }

        /// Per block, the `M` rows' quads and scales.
        #[inline(always)]
        pub(super) fn blocks<const M: usize>(&self) -> Blocks<'_, M> {
            assert_eq!(self.m, M, "rounded for {} rows", self.m);
            Blocks {
                quads: self.quads.as_chunks().0,
                scales: self.scales.as_chunks().0,
            }
        }
    }

    /// [`Rounded::blocks`].
    pub(super) struct Blocks<'a, const M: usize> {
        pub(super) quads: &'a [[[i32; QUADS]; M]],
        pub(super) scales: &'a [[f32; M]],
    }

    /// The code words of `T` consecutive tiles, split.
    pub(super) fn split_tiles<const T: usize>(codes: &[[u32; LANES]]) -> [&[[u32; LANES]]; T] {
        let per_tile = codes.len() / T;
        std::array::from_fn(|t| &codes[t * per_tile..(t + 1) * per_tile])
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::layout::{BLOCK, CpuPacked, LANES};
    use super::super::tile::{block_at, prefetch_ahead};
    use super::pass::{Blocks, Kernel, Out, Rounded, split_tiles};
    use super::{QUADS, STEP, quad_codes};

    /// AVX-512 VNNI's [`Kernel`].
    pub(super) struct Vnni;

    impl Kernel for Vnni {
        unsafe fn round_activations<const B: usize, const M: usize>(
            x_pad: &[f32],
            acts: &mut Rounded,
            xsum: &mut [f32],
        ) {
            // SAFETY: the trait's contract.
            unsafe { round_activations::<B, M>(x_pad, acts, xsum) }
        }

        unsafe fn oc_tiles<const B: usize, const M: usize>(
            w: &CpuPacked,
            acts: &Rounded,
            xsum: &[f32],
            first: usize,
            codes: &[[u32; LANES]],
            out: &Out,
        ) {
            // SAFETY: the trait's contract.
            unsafe {
                if codes.len() == 2 * w.words_per_tile() {
                    oc_tiles::<B, M, 2>(w, acts, xsum, first, codes, out)
                } else {
                    oc_tiles::<B, M, 1>(w, acts, xsum, first, codes, out)
                }
            }
        }

        unsafe fn ic_group<const B: usize, const M: usize>(
            w: &CpuPacked,
            x_pad: &[f32],
            g: usize,
            codes: &[[u32; LANES]],
            acts: &mut Rounded,
            out: &Out,
            paired: bool,
        ) {
            // SAFETY: the trait's contract.
            unsafe {
                if paired {
                    ic_group::<B, M, 2>(w, x_pad, g, codes, acts, out)
                } else {
                    ic_group::<B, M, 1>(w, x_pad, g, codes, acts, out)
                }
            }
        }
    }

    /// Writes tile `tile`'s lanes of row `m`, the lanes past `out_features` left out.
    ///
    /// Safety: row `m` exists, the caller's task owns `tile`, and the CPU has AVX-512F.
    #[inline(always)]
    unsafe fn store(out: &Out, m: usize, tile: usize, v: __m512) {
        // SAFETY: the function's contract; the masked store writes `lanes.min(16)` outputs.
        unsafe {
            let (at, lanes) = out.at(m, tile * LANES);
            _mm512_mask_storeu_ps(at, ((1u32 << lanes.min(LANES)) - 1) as __mmask16, v)
        }
    }

    /// [`quad_codes`]`(B)` as a `vpermt2b` index into a block's 32 integers, codes 0–15 as the
    /// 32-bit lanes of the first source and 16–31 of the second: byte `4i + b` takes the low
    /// byte of code `quad_codes(B)[i][b]`. That truncation is `vpmovdb`'s, so one instruction
    /// narrows and permutes the block (bytes 32–63 are not used).
    struct Permutation<const B: usize>;

    impl<const B: usize> Permutation<B> {
        /// Evaluated at compile time, once per width.
        const INDEX: [u8; 64] = {
            let q = quad_codes(B as u32);
            let mut out = [0u8; 64];
            let mut i = 0;
            while i < BLOCK {
                let code = q[i / 4][i % 4];
                // Bit 6 of a `vpermt2b` index picks the second source.
                out[i] = if code < 16 {
                    4 * code
                } else {
                    64 + 4 * (code - 16)
                };
                i += 1;
            }
            out
        };

        #[inline(always)]
        unsafe fn load() -> __m512i {
            // SAFETY: `INDEX` is 64 readable bytes; the caller has AVX-512F.
            unsafe { _mm512_loadu_si512(Self::INDEX.as_ptr().cast()) }
        }
    }

    /// Blocks rounded together by [`round16`]: one vector of their largest magnitudes.
    const UNITS: usize = 16;

    /// Lane `u` of the result is the largest lane of `v[u]` (as integers): a tree of
    /// two-source shuffles, each step halving the lanes per unit, so 16 units take 15 steps of
    /// three instructions and a final permute instead of a horizontal reduction each.
    #[inline(always)]
    unsafe fn reduce16(v: &[__m512i; UNITS]) -> __m512i {
        /// Lane `4c + l` of the tree's last step holds unit `4l + c`.
        const ORDER: [i32; UNITS] = {
            let mut o = [0; UNITS];
            let mut u = 0;
            while u < UNITS {
                o[u] = (4 * (u % 4) + u / 4) as i32;
                u += 1;
            }
            o
        };
        // SAFETY (every intrinsic): the caller has AVX-512F; only `ORDER` is read.
        unsafe {
            // 8 lanes a unit: chunks 0–1 unit 2i, chunks 2–3 unit 2i + 1.
            let mut h = [_mm512_setzero_si512(); 8];
            for (i, h) in h.iter_mut().enumerate() {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                *h = _mm512_max_epi32(
                    _mm512_shuffle_i32x4::<0b01_00_01_00>(a, b),
                    _mm512_shuffle_i32x4::<0b11_10_11_10>(a, b),
                );
            }
            // 4 lanes a unit: chunk c unit 4i + c.
            let mut q = [_mm512_setzero_si512(); 4];
            for (i, q) in q.iter_mut().enumerate() {
                let (a, b) = (h[2 * i], h[2 * i + 1]);
                *q = _mm512_max_epi32(
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
                );
            }
            // Chunk c: halves of units 8i + c and 8i + 4 + c; then lane 4c + l: unit 4l + c.
            let e = [pair_max(q[0], q[1]), pair_max(q[2], q[3])];
            let t = pair_max(e[0], e[1]);
            _mm512_permutexvar_epi32(_mm512_loadu_si512(ORDER.as_ptr().cast()), t)
        }
    }

    /// Within each 128-bit chunk, lanes `[a0∨a1, a2∨a3, b0∨b1, b2∨b3]`.
    #[inline(always)]
    unsafe fn pair_max(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the caller has AVX-512F; no memory is touched.
        unsafe {
            let (a, b) = (_mm512_castsi512_ps(a), _mm512_castsi512_ps(b));
            _mm512_max_epi32(
                _mm512_castps_si512(_mm512_shuffle_ps::<0b10_00_10_00>(a, b)),
                _mm512_castps_si512(_mm512_shuffle_ps::<0b11_01_11_01>(a, b)),
            )
        }
    }

    /// A block of 32 values in two vectors, and what [`round16`] makes of it: the permuted
    /// bytes, and the integers' lane sums (for the per-OC zero term).
    type Values = [__m512; 2];
    type RoundedBlock = (__m256i, __m512i);

    /// [`super::quantize_block`] on the first `units` of 16 blocks at once: their largest
    /// magnitudes reduced side by side ([`reduce16`]) and one vector division for all the
    /// `127/max|x|`. Returns the steps `d`, one lane per block, and each block's bytes. No
    /// branch: an all-zero block gets `127/0 = ∞` and `0·∞ = NaN`, which converts to the
    /// integer `i32::MIN`, whose low byte is 0; a NaN block's maximum is a NaN (its bit
    /// pattern is above infinity's in the integer max), so its `d` is NaN and its bytes 0, as
    /// the definition says.
    #[inline(always)]
    unsafe fn round16(
        c: &[Values; UNITS],
        units: usize,
        perm: __m512i,
    ) -> (__m512, [RoundedBlock; UNITS]) {
        // SAFETY (every intrinsic): the caller has AVX-512F/BW/VL and VBMI; nothing touches
        // memory but the local array `invs`.
        unsafe {
            // |x| as integers: for non-negative floats the integer order is the float order.
            // (Loops, not closures over the vectors: a closure does not get the caller's
            // target features, and its intrinsics would become calls.)
            let abs_mask = _mm512_set1_epi32(i32::MAX);
            let mut v = [_mm512_setzero_si512(); UNITS];
            for (v, c) in v.iter_mut().zip(c).take(units) {
                *v = _mm512_max_epi32(
                    _mm512_and_si512(_mm512_castps_si512(c[0]), abs_mask),
                    _mm512_and_si512(_mm512_castps_si512(c[1]), abs_mask),
                );
            }
            let amax = _mm512_castsi512_ps(reduce16(&v));
            let mut invs = [0f32; UNITS];
            _mm512_storeu_ps(
                invs.as_mut_ptr(),
                _mm512_div_ps(_mm512_set1_ps(127.0), amax),
            );
            let mut out = [(_mm256_setzero_si256(), _mm512_setzero_si512()); UNITS];
            for (u, out) in out.iter_mut().enumerate().take(units) {
                let inv = _mm512_set1_ps(invs[u]);
                let qa = _mm512_cvtps_epi32(_mm512_mul_ps(c[u][0], inv));
                let qb = _mm512_cvtps_epi32(_mm512_mul_ps(c[u][1], inv));
                *out = (
                    _mm512_castsi512_si256(_mm512_permutex2var_epi8(qa, perm, qb)),
                    _mm512_add_epi32(qa, qb),
                );
            }
            (_mm512_mul_ps(amax, _mm512_set1_ps(STEP)), out)
        }
    }

    /// Decodes block `blk` of a tile into its 8 quads (see the module doc).
    #[inline(always)]
    unsafe fn decode<const B: usize>(codes: &[[u32; LANES]], blk: usize) -> [__m512i; QUADS] {
        let block = block_at::<B>(codes, blk);
        // SAFETY (every intrinsic): the caller has AVX-512F; each load reads
        // one 16-word row of `block`.
        unsafe {
            let word = |i: usize| _mm512_loadu_si512(block[i].as_ptr().cast());
            let mut q = [_mm512_setzero_si512(); QUADS];
            match B {
                8 => {
                    for (i, q) in q.iter_mut().enumerate() {
                        *q = word(i);
                    }
                }
                4 => {
                    let mask = _mm512_set1_epi32(0x0f0f_0f0f);
                    for w in 0..4 {
                        let v = word(w);
                        q[2 * w] = _mm512_and_si512(v, mask);
                        q[2 * w + 1] = _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask);
                    }
                }
                2 => {
                    let mask = _mm512_set1_epi32(0x0303_0303);
                    for w in 0..2 {
                        let v = word(w);
                        q[4 * w] = _mm512_and_si512(v, mask);
                        q[4 * w + 1] = _mm512_and_si512(_mm512_srli_epi32::<2>(v), mask);
                        q[4 * w + 2] = _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask);
                        q[4 * w + 3] = _mm512_and_si512(_mm512_srli_epi32::<6>(v), mask);
                    }
                }
                _ => {
                    let (w0, w1, w2) = (word(0), word(1), word(2));
                    let low3 = _mm512_set1_epi32(0x0707_0707);
                    for (i, w) in [w0, w1, w2].into_iter().enumerate() {
                        q[2 * i] = _mm512_and_si512(w, low3);
                        q[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi32::<3>(w), low3);
                    }
                    // Bits 6–7 of words 0 and 1 to bits 0–1, bits 6 and 7 of word 2 to bit 2.
                    let (low2, bit2) = (
                        _mm512_set1_epi32(0x0303_0303),
                        _mm512_set1_epi32(0x0404_0404),
                    );
                    let top = |w: __m512i, t: __m512i| {
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi32::<6>(w), low2),
                            _mm512_and_si512(t, bit2),
                        )
                    };
                    q[6] = top(w0, _mm512_srli_epi32::<4>(w2));
                    q[7] = top(w1, _mm512_srli_epi32::<5>(w2));
                }
            }
            q
        }
    }

    /// `acc[t][m] += f_t·d_m · Σ_{k∈blk} q̂_m,k · code_k` for the 16 lanes of each of `T` tiles,
    /// with `f_t` the lanes of `factors[t]`, or 1 without them: the block loop both dims share.
    /// Per-OC the factors are the tiles' group scales, so that a block's sum goes straight into
    /// the output: a group accumulator beside the outputs left too few registers at 8 rows, and
    /// its spills cost about 9% of the eight-row per-OC products (docs/serve.md, session 48).
    /// Quads outermost and rows innermost, so that each row's sum stays in a register. A row's
    /// 8 dot products form a chain, each waiting on the one before (`vpdpbusd`'s latency is
    /// about 2.3 ns on Intel, docs/serve.md): at small `M·T` they are split over independent
    /// chains, and with [`super::Tiling::Paired`] two tiles share the block's activations so
    /// that twice as many chains run side by side.
    #[inline(always)]
    unsafe fn block_dot<const B: usize, const M: usize, const T: usize>(
        codes: [&[[u32; LANES]]; T],
        blk: usize,
        acts: &Blocks<'_, M>,
        factors: Option<&[__m512; T]>,
        acc: &mut [[__m512; M]; T],
    ) {
        let chains = (4 / (M * T)).max(1);
        let (x, d) = (&acts.quads[blk], &acts.scales[blk]);
        // SAFETY (every intrinsic): the caller has AVX-512F and VNNI; no memory is touched
        // but `codes` (through `decode`) and `acts`'s slices.
        unsafe {
            let mut quads = [[_mm512_setzero_si512(); QUADS]; T];
            for (quads, codes) in quads.iter_mut().zip(codes) {
                *quads = decode::<B>(codes, blk);
            }
            let mut sums = [[[_mm512_setzero_si512(); M]; T]; 4];
            for i in 0..QUADS {
                let sums = &mut sums[i % chains];
                for m in 0..M {
                    let x = _mm512_set1_epi32(x[m][i]);
                    for (sums, quads) in sums.iter_mut().zip(&quads) {
                        sums[m] = _mm512_dpbusd_epi32(sums[m], quads[i], x);
                    }
                }
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                for m in 0..M {
                    let mut sum = sums[0][t][m];
                    for chain in &sums[1..chains] {
                        sum = _mm512_add_epi32(sum, chain[t][m]);
                    }
                    let step = _mm512_set1_ps(d[m]);
                    // A `match`, not a closure: a closure would not get the target features.
                    let step = match factors {
                        Some(f) => _mm512_mul_ps(f[t], step),
                        None => step,
                    };
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), step, acc[m]);
                }
            }
        }
    }

    /// 16 f16 values at `h[at..]`, widened.
    #[inline(always)]
    unsafe fn widen(h: &[u16], at: usize) -> __m512 {
        let h = &h[at..at + LANES];
        // SAFETY: `h` holds 16 values; the caller has AVX-512F.
        unsafe { widen_at(h.as_ptr()) }
    }

    /// [`widen`] without the bounds check. Safety: `h` points to 16 values; the CPU has
    /// AVX-512F.
    #[inline(always)]
    unsafe fn widen_at(h: *const u16) -> __m512 {
        // SAFETY: the function's contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(h.cast())) }
    }

    /// Per-OC tiles `first..first + T`, whose code words are `codes`:
    /// `y = Σ_g (Σ_{b∈g} s_g·d_b·Σ_{k∈b} q̂_k·q_k − s_g·z_g·xsum_g)` (module doc).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,fma")]
    unsafe fn oc_tiles<const B: usize, const M: usize, const T: usize>(
        w: &CpuPacked,
        acts: &Rounded,
        xsum: &[f32],
        first: usize,
        codes: &[[u32; LANES]],
        out: &Out,
    ) {
        let groups = w.groups_along_k();
        let blocks_per_group = w.group_size / BLOCK;
        let codes = split_tiles::<T>(codes);
        let blocks = acts.blocks::<M>();
        let mut y = [[_mm512_setzero_ps(); M]; T];
        // SAFETY: the helpers need the features enabled on this function; the caller owns
        // tiles `first..first + T` of `out`.
        unsafe {
            for g in 0..groups {
                let at = |t: usize| ((first + t) * groups + g) * LANES;
                let mut s = [_mm512_setzero_ps(); T];
                for (t, s) in s.iter_mut().enumerate() {
                    *s = widen(&w.scales, at(t));
                }
                for blk in g * blocks_per_group..(g + 1) * blocks_per_group {
                    for codes in codes {
                        prefetch_ahead::<B>(codes, blk);
                    }
                    block_dot::<B, M, T>(codes, blk, &blocks, Some(&s), &mut y);
                }
                for (t, y) in y.iter_mut().enumerate() {
                    let sz = _mm512_mul_ps(s[t], widen(&w.zeros, at(t)));
                    for (m, y) in y.iter_mut().enumerate() {
                        *y = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsum[m * groups + g]), *y);
                    }
                }
            }
            for (t, y) in y.iter().enumerate() {
                for (m, y) in y.iter().enumerate() {
                    store(out, m, first + t, *y);
                }
            }
        }
    }

    /// What a dim rounds: per-OC the activations themselves, per-IC a group's coefficients
    /// `c_k = x_k·s_{g,k}` (its `k` f16 scales and zeros).
    #[derive(Clone, Copy)]
    enum Coefficients<'a> {
        Activations,
        Group { scales: &'a [u16], zeros: &'a [u16] },
    }

    /// Rounds `M` rows of `k_pad` (`x_pad`) into `acts` ([`round16`] on each block of
    /// [`Coefficients`]). Per-OC it adds each block's `d·Σq̂` into its group's
    /// `xsum[m·groups + g]`; per-IC each row's `c·z` into `zt[m]`. `16 / M` blocks of all rows
    /// go to one [`round16`], rows innermost, so a row's index is a constant (its `zt` stays
    /// in a register), and since `acts` is block-major those 16 units are 16 consecutive slots.
    ///
    /// Safety: the CPU has AVX-512F/BW/VL, VBMI and FMA. Inlined, so that the dim's branches
    /// fold away in each caller.
    #[inline(always)]
    unsafe fn round_rows<const B: usize, const M: usize>(
        x_pad: &[f32],
        coefficients: Coefficients<'_>,
        acts: &mut Rounded,
        zt: &mut [__m512; M],
        xsum: &mut [f32],
    ) {
        let k = x_pad.len() / M;
        let (blocks, per) = (k / BLOCK, UNITS / M);
        assert!(acts.m == M && acts.quads.len() == M * blocks && acts.scales.len() == M * blocks);
        let group = match coefficients {
            Coefficients::Activations => None,
            Coefficients::Group { scales, zeros } => {
                assert!(scales.len() == k && zeros.len() == k);
                Some((scales.as_ptr(), zeros.as_ptr()))
            }
        };
        let at = Rows {
            x: x_pad.as_ptr(),
            k,
            group,
            quads: acts.quads.as_mut_ptr(),
            steps: acts.scales.as_mut_ptr(),
        };
        let groups = xsum.len() / M;
        let whole = blocks / per * per;
        // SAFETY: the asserts bound every block the calls touch; the caller has the features.
        unsafe {
            let perm = Permutation::<B>::load();
            let mut add = |first: usize, sums: [f32; UNITS], n: usize| {
                for j in 0..n {
                    let g = (first + j) * groups / blocks;
                    for m in 0..M {
                        xsum[m * groups + g] += sums[j * M + m];
                    }
                }
            };
            for first in (0..whole).step_by(per) {
                let sums = round_units::<M>(&at, first, per, perm, zt);
                if group.is_none() {
                    add(first, sums, per);
                }
            }
            for first in whole..blocks {
                let sums = round_units::<M>(&at, first, 1, perm, zt);
                if group.is_none() {
                    add(first, sums, 1);
                }
            }
        }
    }

    /// [`round_rows`] per-OC. Safety: the CPU has the features enabled here.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,fma")]
    unsafe fn round_activations<const B: usize, const M: usize>(
        x_pad: &[f32],
        acts: &mut Rounded,
        xsum: &mut [f32],
    ) {
        let mut zt = [_mm512_setzero_ps(); M];
        // SAFETY: the features are enabled on this function.
        unsafe { round_rows::<B, M>(x_pad, Coefficients::Activations, acts, &mut zt, xsum) }
    }

    /// What [`round_units`] reads and writes: `M` rows of `k` values, the `k` scales and zeros
    /// of a [`Coefficients::Group`], and `acts`'s slots. Raw pointers, so that the fully
    /// unrolled loops carry no bounds checks.
    struct Rows {
        x: *const f32,
        k: usize,
        group: Option<(*const u16, *const u16)>,
        quads: *mut [i32; QUADS],
        steps: *mut f32,
    }

    /// Blocks `first..first + n` of [`round_rows`], all `M` rows (`n·M ≤ 16`); returns each
    /// unit's `d·Σq̂` (the per-OC zero term's share).
    ///
    /// Safety: those blocks are in bounds of every pointer of `at`, and the CPU has
    /// AVX-512F/BW/VL, VBMI and FMA.
    #[inline(always)]
    unsafe fn round_units<const M: usize>(
        at: &Rows,
        first: usize,
        n: usize,
        perm: __m512i,
        zt: &mut [__m512; M],
    ) -> [f32; UNITS] {
        // SAFETY: the function's contract; each load reads 16 values of one block.
        unsafe {
            let mut c = [[_mm512_setzero_ps(); 2]; UNITS];
            for j in 0..n {
                let k0 = (first + j) * BLOCK;
                // Not `Option::map`: a closure does not get the caller's target features.
                let mut sz = None;
                if let Some((s, z)) = at.group {
                    sz = Some((
                        widen_at(s.add(k0)),
                        widen_at(s.add(k0 + 16)),
                        widen_at(z.add(k0)),
                        widen_at(z.add(k0 + 16)),
                    ));
                }
                for (m, zt) in zt.iter_mut().enumerate() {
                    let x = at.x.add(m * at.k + k0);
                    let (xa, xb) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
                    let c = &mut c[j * M + m];
                    *c = match sz {
                        None => [xa, xb],
                        Some((s0, s1, z0, z1)) => {
                            let c = [_mm512_mul_ps(xa, s0), _mm512_mul_ps(xb, s1)];
                            *zt = _mm512_fmadd_ps(c[0], z0, *zt);
                            *zt = _mm512_fmadd_ps(c[1], z1, *zt);
                            c
                        }
                    };
                }
            }
            // Row m's block first + j sits at (first + j)·M + m: the units are consecutive.
            let (units, base) = (n * M, first * M);
            let (steps, blocks) = round16(&c, units, perm);
            _mm512_mask_storeu_ps(
                at.steps.add(base),
                ((1u32 << units) - 1) as __mmask16,
                steps,
            );
            let mut d = [0f32; UNITS];
            _mm512_storeu_ps(d.as_mut_ptr(), steps);
            let mut sums = [0f32; UNITS];
            for (u, (bytes, ints)) in blocks.into_iter().enumerate().take(units) {
                _mm256_storeu_si256(at.quads.add(base + u).cast(), bytes);
                // A zero block's integers are not 0 (see `round16`), but its d is.
                sums[u] = d[u] * _mm512_reduce_add_epi32(ints) as f32;
            }
            sums
        }
    }

    /// Per-IC group `gi`, whose tiles' code words are `codes`: rounds the group's coefficients
    /// `x_k·s_{g,k}` into `acts`, then `y = acc − Σ_k c_k·z_{g,k}` for each of its tiles
    /// (module doc).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,fma")]
    unsafe fn ic_group<const B: usize, const M: usize, const T: usize>(
        w: &CpuPacked,
        x_pad: &[f32],
        gi: usize,
        codes: &[[u32; LANES]],
        acts: &mut Rounded,
        out: &Out,
    ) {
        let k = w.k_pad;
        let (scales, zeros) = (
            &w.scales[gi * k..(gi + 1) * k],
            &w.zeros[gi * k..(gi + 1) * k],
        );
        let mut zt = [_mm512_setzero_ps(); M];
        // SAFETY: the helpers need the features enabled on this function; the caller owns the
        // group's tiles of `out`.
        unsafe {
            let group = Coefficients::Group { scales, zeros };
            round_rows::<B, M>(x_pad, group, acts, &mut zt, &mut []);
            let mut zterm = [0f32; M];
            for (zterm, zt) in zterm.iter_mut().zip(zt) {
                *zterm = _mm512_reduce_add_ps(zt);
            }
            // A group's length is a multiple of the 32-code block, so `T` (1 or 2) divides its
            // tiles.
            let tiles = w.group_size / LANES;
            let blocks = acts.blocks::<M>();
            for (first, codes) in codes.chunks(codes.len() / tiles * T).enumerate() {
                let (first, codes) = (first * T, split_tiles::<T>(codes));
                let mut acc = [[_mm512_setzero_ps(); M]; T];
                for blk in 0..k / BLOCK {
                    for codes in codes {
                        prefetch_ahead::<B>(codes, blk);
                    }
                    block_dot::<B, M, T>(codes, blk, &blocks, None, &mut acc);
                }
                for (t, acc) in acc.iter().enumerate() {
                    for m in 0..M {
                        let y = _mm512_sub_ps(acc[m], _mm512_set1_ps(zterm[m]));
                        store(out, m, gi * tiles + first + t, y);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code of a block appears in exactly one quad byte, for every width, and byte `b`
    /// of a quad is a code whose (low) bits lie in byte `b` of a word, where the decode's
    /// shifts keep it.
    #[test]
    fn quads_are_a_permutation_of_the_block() {
        for bits in [2, 3, 4, 8] {
            let quads = quad_codes(bits);
            let mut seen = [false; BLOCK];
            for quad in quads {
                for (b, c) in quad.into_iter().enumerate() {
                    assert!(!seen[c as usize], "{bits} bits: code {c} twice");
                    seen[c as usize] = true;
                    let at = super::super::layout::code_at(bits as usize, c as usize);
                    assert_eq!(at.bit / 8, b, "{bits} bits: code {c} in byte {b}");
                }
            }
            assert!(seen.iter().all(|&s| s), "{bits} bits");
        }
    }

    #[test]
    fn quantize_block_rounds_to_the_nearest_step() {
        // max|x| = 127/64, so a step is exactly 1/64 and x/step is exact.
        let mut x = [0f32; BLOCK];
        x[0] = -127.0 / 64.0;
        x[1] = 1.0 / 128.0; // half a step: ties go to even (0)
        x[2] = 3.0 / 128.0; // 1.5 steps → 2
        x[3] = 5.0 / 128.0; // 2.5 steps → 2
        x[4] = -7.0 / 128.0; // −3.5 steps → −4
        x[5] = 0.3; // 19.2 steps → 19
        let (d, q) = quantize_block(&x);
        assert_eq!(d, (127.0 / 64.0) * STEP);
        assert_eq!(&q[..7], &[-127, 0, 2, 2, -4, 19, 0]);
        assert_eq!(quantize_block(&[0.0; BLOCK]), (0.0, [0; BLOCK]));
        x[9] = f32::NAN;
        assert!(quantize_block(&x).0.is_nan());
    }
}
