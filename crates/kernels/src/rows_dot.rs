//! Products of rows given as start offsets into a flat buffer, so rows may overlap and a
//! convolution's input channel shifted by a kernel tap costs no copy (see `conv::grid`):
//! - [`Sums`]: dot products of every pair of rows of two sets, `g[i][j] = sum over k of
//!   a_i[k] · b_j[k]` (a weight gradient: output-gradient channels by shifted input channels),
//!   in vector registers, a tile of rows of `a` by rows of `b` at a time (AVX2: 4 x 3, 12
//!   accumulators, 7 loads per 12 fused multiply-adds; AVX-512: 4 x 4, 16 accumulators, 8
//!   loads per 16), over a block of the positions at a time so that every row's block stays
//!   in cache; the lanes are added up once, at the end;
//! - [`combine`]: weighted sums of rows (a forward pass: weights by shifted input channels),
//!   written in place.
//!
//! Both take the positions they run over as [`Run`]s of up to 16 (one AVX-512 register): a
//! convolution's output rows, or 16-wide parts of them, so that the points of the grid outside
//! the output cost nothing, and the output (or output gradient) is written (or read) where it
//! lies in `[batch, channels, h, w]`.
//!
//! Each runs the widest [`Kernel`] the CPU has, chosen at run time, so one binary runs at full
//! width on AVX-512 and on AVX2-only machines; the tests run every kernel the CPU has.

use std::mem::MaybeUninit;

/// Rows of `a` per register tile.
const TILE_A: usize = 4;
/// Rows of `b` per register tile.
const TILE_B: usize = 3;
/// Lanes of a partial sum (one AVX2 register of f32; the AVX-512 kernel folds its 16 into 8
/// at the end of each block).
const LANES: usize = 8;
/// Rows of `a` and of `b` per AVX-512 register tile: 16 accumulators of the 32 registers, 8
/// loads per 16 fused multiply-adds (a 4 x 6 tile, 24 accumulators and 6 loaded rows, spilled
/// registers and ran 1.3-1.7x slower on a Zen 5 EPYC).
const WIDE_TILE_A: usize = 4;
const WIDE_TILE_B: usize = 4;

/// The instructions [`Sums::add`] and [`combine`] run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 512-bit registers (x86-64 with AVX-512F): 16 lanes, masked loads for a row's tail.
    Avx512,
    /// 256-bit registers and fused multiply-add (x86-64 with AVX2 and FMA).
    Avx2Fma,
    /// Plain Rust (every other CPU), summed in the same lane order as [`Kernel::Avx2Fma`] (a
    /// multiply and an add: a fused multiply-add without the instruction is a slow library
    /// call).
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs: AVX-512 where it has it (the run-time test `gemm`
    /// makes for its own micro-kernels), except on AMD's Zen 4, which runs a 512-bit
    /// instruction as two 256-bit halves (there the AVX-512 kernels measured 5-12% slower than
    /// the AVX2 ones on [`Sums`], BENCHMARKS.md); AVX2 + FMA where it has those; plain Rust.
    pub fn detect() -> Kernel {
        // Looked up once: `cpuid` traps to the hypervisor on a virtual machine.
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            Kernel::available()
                .into_iter()
                .find(|&kernel| kernel != Kernel::Avx512 || !split_512_bit())
                .unwrap_or(Kernel::Portable)
        })
    }

    /// Every kernel this CPU runs, fastest first (the equivalence tests run each).
    pub fn available() -> Vec<Kernel> {
        [Kernel::Avx512, Kernel::Avx2Fma, Kernel::Portable]
            .into_iter()
            .filter(|kernel| kernel.runs_here())
            .collect()
    }

    /// Whether this CPU has the kernel's instructions.
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512f",
            Kernel::Avx2Fma => "avx2+fma",
            Kernel::Portable => "portable",
        }
    }

    /// Output rows per register tile of [`combine`].
    fn combine_rows(self) -> usize {
        match self {
            Kernel::Avx512 => WIDE_COMBINE_ROWS,
            Kernel::Avx2Fma | Kernel::Portable => COMBINE_ROWS,
        }
    }

    /// Rows of `a` and of `b` per register tile of [`Sums::add`].
    fn sums_tile(self) -> [usize; 2] {
        match self {
            Kernel::Avx512 => [WIDE_TILE_A, WIDE_TILE_B],
            Kernel::Avx2Fma | Kernel::Portable => [TILE_A, TILE_B],
        }
    }
}

/// Whether the CPU is an AMD Zen 4 (family 19h with AVX-512), which splits 512-bit vector
/// instructions into two 256-bit halves (Zen 5, family 1Ah, and Intel's cores do not).
fn split_512_bit() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        let vendor = __cpuid(0);
        let amd = [vendor.ebx, vendor.edx, vendor.ecx]
            .map(u32::to_le_bytes)
            .concat()
            == b"AuthenticAMD";
        let eax = __cpuid(1).eax;
        let base = (eax >> 8) & 0xf;
        let family = if base == 0xf {
            base + ((eax >> 20) & 0xff)
        } else {
            base
        };
        amd && family == 0x19
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One product's operands: the rows of `a` and of `b` by their start offsets, and the
/// positions summed over, [`Run`]s of up to 16: each run's `len` values of every row of `a`
/// from `output` on and of every row of `b` from `input` on (a convolution's output gradient
/// read in place at an output row, its input on the grid where that row reads it).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub a: &'a [f32],
    pub a_rows: &'a [usize],
    pub b: &'a [f32],
    pub b_rows: &'a [usize],
    pub runs: &'a [Run],
}

/// The running sums of a `[m, n]` set of dot products, added to by one or more [`Rows`] of the
/// same row counts (a product over several batch items is one `add` per item).
pub struct Sums {
    m: usize,
    n: usize,
    kernel: Kernel,
    /// `[m rounded up to the kernel's tile of a, n rounded up to its tile of b, LANES]`: a
    /// tile's missing rows repeat the last row and their sums are dropped.
    partial: Vec<f32>,
}

impl Sums {
    /// Sums to be added with `kernel`, which must run on this CPU.
    pub fn new(m: usize, n: usize, kernel: Kernel) -> Sums {
        assert!(kernel.runs_here(), "{} on this CPU", kernel.name());
        let [tile_a, tile_b] = kernel.sums_tile();
        let padded = m.next_multiple_of(tile_a) * n.next_multiple_of(tile_b);
        Sums {
            m,
            n,
            kernel,
            partial: vec![0.0; padded * LANES],
        }
    }

    /// Adds `rows`' dot products, `block` runs of every row at a time.
    pub fn add(&mut self, rows: Rows, block: usize) {
        assert_eq!(rows.a_rows.len(), self.m, "rows of a");
        assert_eq!(rows.b_rows.len(), self.n, "rows of b");
        assert!(
            rows.runs.iter().all(|run| (1..=RUN).contains(&run.len)),
            "a run of 1 to {RUN} positions"
        );
        let reach = |at: fn(&Run) -> usize| rows.runs.iter().map(|r| at(r) + r.len).max();
        for (starts, data, reach, what) in [
            (rows.a_rows, rows.a, reach(|r| r.output), "a"),
            (rows.b_rows, rows.b, reach(|r| r.input), "b"),
        ] {
            assert!(
                starts.iter().all(|&s| s + reach.unwrap_or(0) <= data.len()),
                "a row of {what} runs past its buffer"
            );
        }
        if self.m == 0 || self.n == 0 || rows.runs.is_empty() {
            return;
        }
        let padded = |starts: &[usize], tile: usize| {
            let mut padded = starts.to_vec();
            padded.resize(
                starts.len().next_multiple_of(tile),
                starts[starts.len() - 1],
            );
            padded
        };
        let [tile_a, tile_b] = self.kernel.sums_tile();
        let tiles = Tiles {
            a: rows.a,
            a_rows: &padded(rows.a_rows, tile_a),
            b: rows.b,
            b_rows: &padded(rows.b_rows, tile_b),
        };
        for block in rows.runs.chunks(block.max(1)) {
            match self.kernel {
                // SAFETY (both): the CPU has the instructions (checked in `new`), every row
                // holds every run's values (checked above) and `partial` holds every padded
                // pair's lanes, the rows padded to the kernel's tiles.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { tiles.add_avx512(block, &mut self.partial) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2Fma => unsafe { tiles.add_avx2(block, &mut self.partial) },
                _ => tiles.add_portable(block, &mut self.partial),
            }
        }
    }

    /// The sums, `[m, n]` row-major.
    pub fn finish(self) -> Vec<f32> {
        let stride = self.n.next_multiple_of(self.kernel.sums_tile()[1]);
        let mut g = vec![0f32; self.m * self.n];
        for (i, row) in g.chunks_exact_mut(self.n.max(1)).enumerate().take(self.m) {
            for (j, sum) in row.iter_mut().enumerate() {
                let lanes = &self.partial[(i * stride + j) * LANES..][..LANES];
                *sum = lanes.iter().sum();
            }
        }
        g
    }
}

/// Rows padded to whole tiles.
struct Tiles<'a> {
    a: &'a [f32],
    a_rows: &'a [usize],
    b: &'a [f32],
    b_rows: &'a [usize],
}

impl Tiles<'_> {
    /// Lane `l` of pair `(i, j)` gains the products at the positions `p` of each run with
    /// `p = l mod 8` (the AVX2 kernel's order).
    fn add_portable(&self, runs: &[Run], partial: &mut [f32]) {
        let n = self.b_rows.len();
        for (i, &ra) in self.a_rows.iter().enumerate() {
            for (j, &rb) in self.b_rows.iter().enumerate() {
                let lanes = &mut partial[(i * n + j) * LANES..][..LANES];
                for run in runs {
                    let row_a = &self.a[ra + run.output..][..run.len];
                    let row_b = &self.b[rb + run.input..][..run.len];
                    for (p, (&xa, &xb)) in row_a.iter().zip(row_b).enumerate() {
                        lanes[p % LANES] += xa * xb;
                    }
                }
            }
        }
    }

    /// [`Tiles::add_portable`] in AVX2 registers, twelve accumulators per 4 x 3 tile, a run's
    /// two halves of 8 into the same accumulator, a run of fewer than 16 by masked loads.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every row must hold every run's values; `partial` must
    /// hold `LANES` values per pair of padded rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add_avx2(&self, runs: &[Run], partial: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = self.b_rows.len();
        let (pa, pb, sums) = (self.a.as_ptr(), self.b.as_ptr(), partial.as_mut_ptr());
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for tile_i in 0..self.a_rows.len() / TILE_A {
            let i0 = tile_i * TILE_A;
            // SAFETY (this block and the loop's): the offsets address rows holding every run's
            // values inside `a` and `b`, which the loads (masked where a run is short) do not
            // pass; each pair's lanes lie in `partial`.
            let ra: [*const f32; TILE_A] =
                std::array::from_fn(|r| unsafe { pa.add(self.a_rows[i0 + r]) });
            for tile_j in 0..n / TILE_B {
                let j0 = tile_j * TILE_B;
                let rb: [*const f32; TILE_B] =
                    std::array::from_fn(|c| unsafe { pb.add(self.b_rows[j0 + c]) });
                let at = |r: usize, c: usize| unsafe { sums.add(((i0 + r) * n + j0 + c) * LANES) };
                unsafe {
                    let mut acc: [[__m256; TILE_B]; TILE_A] =
                        std::array::from_fn(|r| std::array::from_fn(|c| _mm256_loadu_ps(at(r, c))));
                    let mut step = |run: &Run, h: usize, mask: __m256i| {
                        let vb: [__m256; TILE_B] = std::array::from_fn(|c| {
                            _mm256_maskload_ps(rb[c].add(run.input + h), mask)
                        });
                        for (r, sums) in acc.iter_mut().enumerate() {
                            let va = _mm256_maskload_ps(ra[r].add(run.output + h), mask);
                            for (sum, &vb) in sums.iter_mut().zip(&vb) {
                                *sum = _mm256_fmadd_ps(va, vb, *sum);
                            }
                        }
                    };
                    // Whole runs with a constant mask: plain loads once inlined.
                    let all = _mm256_set1_epi32(-1);
                    for run in runs {
                        if run.len == RUN {
                            step(run, 0, all);
                            step(run, 8, all);
                        } else {
                            let len = _mm256_set1_epi32(run.len as i32);
                            step(run, 0, _mm256_cmpgt_epi32(len, lanes));
                            let high = _mm256_add_epi32(lanes, _mm256_set1_epi32(8));
                            step(run, 8, _mm256_cmpgt_epi32(len, high));
                        }
                    }
                    for (r, sums) in acc.iter().enumerate() {
                        for (c, &sum) in sums.iter().enumerate() {
                            _mm256_storeu_ps(at(r, c), sum);
                        }
                    }
                }
            }
        }
    }

    /// [`Tiles::add_avx2`] in AVX-512 registers: a 4 x 4 tile of 16-lane accumulators, each
    /// started from zero and folded into its pair's 8 partial lanes (lanes `l` and `l + 8`
    /// added, then the sum to lane `l`) at the end; a run of fewer than 16 by masked loads.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every row must hold every run's values; the rows must be
    /// padded to whole 4 x 4 tiles and `partial` hold `LANES` values per pair of them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_avx512(&self, runs: &[Run], partial: &mut [f32]) {
        use std::arch::x86_64::*;
        const A: usize = WIDE_TILE_A;
        const B: usize = WIDE_TILE_B;
        let n = self.b_rows.len();
        let (pa, pb, sums) = (self.a.as_ptr(), self.b.as_ptr(), partial.as_mut_ptr());
        for tile_i in 0..self.a_rows.len() / A {
            let i0 = tile_i * A;
            // SAFETY (this block and the loop's): the offsets address rows holding every run's
            // values inside `a` and `b`, which the masked loads do not pass; each pair's lanes
            // lie in `partial`.
            let ra: [*const f32; A] =
                std::array::from_fn(|r| unsafe { pa.add(self.a_rows[i0 + r]) });
            for tile_j in 0..n / B {
                let j0 = tile_j * B;
                let rb: [*const f32; B] =
                    std::array::from_fn(|c| unsafe { pb.add(self.b_rows[j0 + c]) });
                let at = |r: usize, c: usize| unsafe { sums.add(((i0 + r) * n + j0 + c) * LANES) };
                unsafe {
                    // From zero, not from the partial sums: those are 8 lanes, and widening
                    // them is a 256-bit instruction, which without AVX512VL can only use the
                    // first 16 vector registers. The accumulators then get only those 16, one
                    // of them spills to the stack, and its store-to-load round trip every
                    // iteration halved this loop's speed (measured on an Intel Xeon).
                    let mut acc = [[_mm512_setzero_ps(); B]; A];
                    let mut step = |run: &Run, mask: __mmask16| {
                        let vb: [__m512; B] = std::array::from_fn(|c| {
                            _mm512_maskz_loadu_ps(mask, rb[c].add(run.input))
                        });
                        for (r, sums) in acc.iter_mut().enumerate() {
                            let va = _mm512_maskz_loadu_ps(mask, ra[r].add(run.output));
                            for (sum, &vb) in sums.iter_mut().zip(&vb) {
                                *sum = _mm512_fmadd_ps(va, vb, *sum);
                            }
                        }
                    };
                    // Whole runs with a constant mask (a mask computed in the loop left the
                    // compiler one register short: an accumulator went through the stack every
                    // run, 8x64x56x56's weight gradient 7.9 -> 10.7 ms on an Intel Xeon).
                    for run in runs {
                        if run.len == RUN {
                            step(run, !0);
                        } else {
                            step(run, ((1u32 << run.len) - 1) as __mmask16);
                        }
                    }
                    for (r, sums) in acc.iter().enumerate() {
                        for (c, &sum) in sums.iter().enumerate() {
                            let wide = _mm512_castps_pd(sum);
                            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(wide));
                            let low = _mm512_castps512_ps256(sum);
                            let folded = _mm256_add_ps(low, high);
                            _mm256_storeu_ps(
                                at(r, c),
                                _mm256_add_ps(_mm256_loadu_ps(at(r, c)), folded),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Output rows per register tile of [`combine`] (AVX2 and plain Rust).
const COMBINE_ROWS: usize = 6;
/// Output rows per AVX-512 register tile of [`combine`]: 8 rows by 3 registers, 24
/// accumulators, 11 loads per 24 fused multiply-adds (6 by 2 took 8 per 12, and a 16-channel
/// layer ran 18 rows for its 16).
const WIDE_COMBINE_ROWS: usize = 8;
/// The most positions of a [`Run`]: one AVX-512 register, two AVX2 registers.
pub const RUN: usize = 16;

/// Up to [`RUN`] neighbouring positions of [`combine`]'s output: `len` values from `output` on
/// in every output row, each the weighted sum of the rows of `b` read from `input` on (a
/// convolution's output row, or a 16-wide part of one, and where its input lies on the grid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub input: usize,
    pub output: usize,
    pub len: usize,
}

/// [`combine`]'s right operand: rows of `values` by their start offsets (they may overlap: a
/// convolution's input channels shifted by each tap), read at the runs' `input` offsets.
#[derive(Clone, Copy)]
pub struct Shifted<'a> {
    pub values: &'a [f32],
    pub rows: &'a [usize],
    pub runs: &'a [Run],
}

/// The weighted sums of rows, written in place: for every run, output row `i < m` and
/// position `p < run.len`,
/// `out[i * stride + run.output + p] = sum over r of weights[i][r] · b[rows[r] + run.input + p]`
/// (`b`, `rows` = `input.values`, `input.rows`), a matrix product whose right operand's rows are offsets into one
/// buffer (a convolution's shifted input channels) and whose output columns are runs anywhere
/// in `out` (a convolution's output rows, straight into `[batch, channels, h, w]`, skipping
/// the grid's padding), with `weights` `[m, rows]`. Every row of `b` must be readable for
/// [`RUN`] values from every run's `input` (the AVX2 kernel loads whole registers and stores
/// only the run's positions); the runs must not overlap in `out`. Writes every value it
/// addresses and no other.
pub fn combine(
    weights: &[f32],
    m: usize,
    input: Shifted,
    out: &mut [MaybeUninit<f32>],
    stride: usize,
    kernel: Kernel,
) {
    let Shifted {
        values: b,
        rows: b_rows,
        runs,
    } = input;
    let rows = b_rows.len();
    assert_eq!(weights.len(), m * rows, "weights [m, rows]");
    if m == 0 || runs.is_empty() {
        return;
    }
    assert!(
        runs.iter().all(|run| (1..=RUN).contains(&run.len)),
        "a run of 1 to {RUN} positions"
    );
    let reach = runs.iter().map(|run| run.input).max().unwrap_or(0) + RUN;
    assert!(
        b_rows.iter().all(|&s| s + reach <= b.len()),
        "a row of b runs past its buffer"
    );
    let end = runs
        .iter()
        .map(|run| run.output + run.len)
        .max()
        .unwrap_or(0);
    assert!((m - 1) * stride + end <= out.len(), "a run past the output");
    if rows == 0 {
        for run in runs {
            for i in 0..m {
                out[i * stride + run.output..][..run.len].fill(MaybeUninit::new(0.0));
            }
        }
        return;
    }
    let target = Target {
        out: out.as_mut_ptr().cast(),
        stride,
        m,
    };
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 | Kernel::Avx2Fma => {
            assert!(kernel.runs_here(), "{} on this CPU", kernel.name());
            let packed = packed(weights, rows, kernel.combine_rows());
            // SAFETY: the CPU has the kernel's instructions (checked above); every row of b
            // holds `RUN` values from every run's input, and every run's positions of the `m`
            // output rows lie in `out` (checked above); `packed` holds whole tiles.
            unsafe {
                if kernel == Kernel::Avx512 {
                    combine_avx512(&packed, b, b_rows, runs, target);
                } else {
                    combine_avx2(&packed, b, b_rows, runs, target);
                }
            }
        }
        _ => combine_portable(weights, m, input, out, stride),
    }
}

/// `weights` (`[m, rows]`) packed `[tile][row][tile_rows]` for a register tile of `tile_rows`
/// output rows, zero in a last tile's missing rows.
#[cfg(target_arch = "x86_64")]
fn packed(weights: &[f32], rows: usize, tile_rows: usize) -> Vec<f32> {
    let tiles = (weights.len() / rows).div_ceil(tile_rows);
    let mut packed = vec![0f32; tiles * rows * tile_rows];
    for (i, row) in weights.chunks_exact(rows).enumerate() {
        let (tile, lane) = (i / tile_rows, i % tile_rows);
        for (r, &w) in row.iter().enumerate() {
            packed[(tile * rows + r) * tile_rows + lane] = w;
        }
    }
    packed
}

/// Where [`combine`]'s kernels write: output row `i`'s run at `out + i * stride + run.output`,
/// for `i < m` (a last tile's missing rows are not written).
#[derive(Clone, Copy)]
struct Target {
    out: *mut f32,
    stride: usize,
    m: usize,
}

impl Target {
    /// Output rows `tile * rows_per_tile ..` that exist.
    fn live(self, tile: usize, rows_per_tile: usize) -> usize {
        (self.m - tile * rows_per_tile).min(rows_per_tile)
    }

    /// Output row `i` at `run`.
    ///
    /// # Safety
    /// `i < m`, and the run lies in the output ([`combine`]'s checks).
    unsafe fn at(self, i: usize, run: &Run) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.out.add(i * self.stride + run.output) }
    }
}

/// [`combine`] in plain Rust, each sum over the rows in order.
fn combine_portable(
    weights: &[f32],
    m: usize,
    input: Shifted,
    out: &mut [MaybeUninit<f32>],
    stride: usize,
) {
    let Shifted {
        values: b,
        rows: b_rows,
        runs,
    } = input;
    let rows = b_rows.len();
    for run in runs {
        for i in 0..m {
            let mut sums = [0f32; RUN];
            for (&w, &start) in weights[i * rows..(i + 1) * rows].iter().zip(b_rows) {
                let x = &b[start + run.input..][..run.len];
                for (sum, &x) in sums.iter_mut().zip(x) {
                    *sum += w * x;
                }
            }
            for (o, &sum) in out[i * stride + run.output..][..run.len]
                .iter_mut()
                .zip(&sums)
            {
                o.write(sum);
            }
        }
    }
}

/// Rows of `b` per block of [`combine_avx2`] and [`combine_avx512`], and runs per block: a
/// block of rows' block of runs (a few KiB) stays in L1 while every tile of output rows runs
/// over it.
const COMBINE_BLOCK_ROWS: usize = 64;
const COMBINE_BLOCK_RUNS: usize = 16;

/// [`combine_portable`] in AVX2 registers: 6 output rows by one run (16 positions, two
/// registers), 12 accumulators, over blocks of rows and of runs; a run of fewer than 16
/// positions by masked loads and stores of its output.
///
/// # Safety
/// The CPU must have AVX2 and FMA; [`combine`]'s checks must hold, and `packed` hold whole
/// tiles of [`COMBINE_ROWS`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn combine_avx2(packed: &[f32], b: &[f32], b_rows: &[usize], runs: &[Run], to: Target) {
    use std::arch::x86_64::*;
    const ROWS: usize = COMBINE_ROWS;
    let rows = b_rows.len();
    let tiles = packed.len() / (rows * ROWS);
    let pb = b.as_ptr();
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for r0 in (0..rows).step_by(COMBINE_BLOCK_ROWS) {
        let block_rows = &b_rows[r0..(r0 + COMBINE_BLOCK_ROWS).min(rows)];
        for block in runs.chunks(COMBINE_BLOCK_RUNS) {
            for tile in 0..tiles {
                let weights = packed[(tile * rows + r0) * ROWS..].as_ptr();
                let live = to.live(tile, ROWS);
                // One run's sums into place, `masks` keeping its accesses to the output to the
                // run's positions.
                let step = |run: &Run, masks: [__m256i; 2]| {
                    // SAFETY: every row of b holds `RUN` values from the run's input; output
                    // rows `tile * ROWS + lane` for `lane < live` exist, and the masks keep
                    // their accesses to the run's `len` positions (the caller's contract).
                    unsafe {
                        let at = |lane: usize| to.at(tile * ROWS + lane, run);
                        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
                        if r0 > 0 {
                            for (lane, sums) in acc.iter_mut().enumerate().take(live) {
                                *sums = std::array::from_fn(|h| {
                                    _mm256_maskload_ps(at(lane).add(8 * h), masks[h])
                                });
                            }
                        }
                        for (r, &start) in block_rows.iter().enumerate() {
                            let p = pb.add(start + run.input);
                            let x = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                            let w = weights.add(r * ROWS);
                            for (lane, sums) in acc.iter_mut().enumerate() {
                                let weight = _mm256_broadcast_ss(&*w.add(lane));
                                for (sum, &x) in sums.iter_mut().zip(&x) {
                                    *sum = _mm256_fmadd_ps(weight, x, *sum);
                                }
                            }
                        }
                        for (lane, sums) in acc.iter().enumerate().take(live) {
                            for (h, &sum) in sums.iter().enumerate() {
                                _mm256_maskstore_ps(at(lane).add(8 * h), masks[h], sum);
                            }
                        }
                    }
                };
                // Whole runs with a constant mask, so plain loads and stores once inlined (a
                // masked store is microcoded on AMD's Zen 2 and Zen 3).
                let all = _mm256_set1_epi32(-1);
                for run in block {
                    if run.len == RUN {
                        step(run, [all, all]);
                    } else {
                        // Lane `l` of half `h` is in the run where `8 h + l < len`.
                        let len = _mm256_set1_epi32(run.len as i32);
                        let high = _mm256_add_epi32(lanes, _mm256_set1_epi32(8));
                        step(
                            run,
                            [
                                _mm256_cmpgt_epi32(len, lanes),
                                _mm256_cmpgt_epi32(len, high),
                            ],
                        );
                    }
                }
            }
        }
    }
}

/// [`combine_avx2`] in AVX-512 registers: 8 output rows by three runs (one register each), 24
/// accumulators; a run of fewer than 16 positions, and a block's missing runs, by masked loads
/// and stores.
///
/// # Safety
/// As [`combine_avx2`], with AVX-512F and `packed` in tiles of [`WIDE_COMBINE_ROWS`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn combine_avx512(packed: &[f32], b: &[f32], b_rows: &[usize], runs: &[Run], to: Target) {
    use std::arch::x86_64::*;
    const ROWS: usize = WIDE_COMBINE_ROWS;
    const VECTORS: usize = 3;
    /// Five steps, about [`COMBINE_BLOCK_RUNS`].
    const BLOCK_RUNS: usize = 5 * VECTORS;
    let rows = b_rows.len();
    let tiles = packed.len() / (rows * ROWS);
    let pb = b.as_ptr();
    for r0 in (0..rows).step_by(COMBINE_BLOCK_ROWS) {
        let block_rows = &b_rows[r0..(r0 + COMBINE_BLOCK_ROWS).min(rows)];
        for block in runs.chunks(BLOCK_RUNS) {
            for tile in 0..tiles {
                let weights = packed[(tile * rows + r0) * ROWS..].as_ptr();
                let live = to.live(tile, ROWS);
                for step in block.chunks(VECTORS) {
                    // A step's missing runs repeat its first, with nothing loaded or stored
                    // (plain loops: `array::from_fn` here was left a call, its result passed
                    // through the stack, 3% of ResNet-20's step).
                    let mut runs = [step[0]; VECTORS];
                    let mut masks: [__mmask16; VECTORS] = [0; VECTORS];
                    for (v, run) in step.iter().enumerate() {
                        runs[v] = *run;
                        masks[v] = (((1u32 << run.len) - 1) & 0xffff) as __mmask16;
                    }
                    // SAFETY: the masks keep every access to the runs' `len` values of each row
                    // of b and of output rows `tile * ROWS + lane`, `lane < live`; the packed
                    // weights of this tile are in bounds (the caller's contract).
                    unsafe {
                        let at = |lane: usize, v: usize| to.at(tile * ROWS + lane, &runs[v]);
                        let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
                        if r0 > 0 {
                            for (lane, sums) in acc.iter_mut().enumerate().take(live) {
                                *sums = std::array::from_fn(|v| {
                                    _mm512_maskz_loadu_ps(masks[v], at(lane, v))
                                });
                            }
                        }
                        let mut from = [pb; VECTORS];
                        for (from, run) in from.iter_mut().zip(&runs) {
                            *from = pb.add(run.input);
                        }
                        for (r, &start) in block_rows.iter().enumerate() {
                            let x: [__m512; VECTORS] = std::array::from_fn(|v| {
                                _mm512_maskz_loadu_ps(masks[v], from[v].add(start))
                            });
                            let w = weights.add(r * ROWS);
                            for (lane, sums) in acc.iter_mut().enumerate() {
                                let weight = _mm512_set1_ps(*w.add(lane));
                                for (sum, &x) in sums.iter_mut().zip(&x) {
                                    *sum = _mm512_fmadd_ps(weight, x, *sum);
                                }
                            }
                        }
                        for (lane, sums) in acc.iter().enumerate().take(live) {
                            for (v, &sum) in sums.iter().enumerate() {
                                _mm512_mask_storeu_ps(at(lane, v), masks[v], sum);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// `lines` lines of `width` points cut into runs of up to 16, the lines `[input, output]`
    /// values apart.
    fn lines_of_runs(lines: usize, width: usize, [input, output]: [usize; 2]) -> Vec<Run> {
        (0..lines)
            .flat_map(|line| {
                (0..width).step_by(RUN).map(move |p| Run {
                    input: line * input + p,
                    output: line * output + p,
                    len: (width - p).min(RUN),
                })
            })
            .collect()
    }

    /// Every kernel this CPU runs (AVX-512, AVX2 + FMA, portable) against f64 sums, with row
    /// counts that leave partial tiles, overlapping rows, runs of 16 and fewer (under 8, and
    /// between 8 and 16), blocks of fewer runs than a row, and two `add`s into the same sums.
    #[test]
    fn both_kernels_match_f64_sums() {
        let kernels = Kernel::available();
        println!("rows_dot kernels on this CPU: {kernels:?}");
        for (m, n, width, lines, block) in [
            (5, 7, 61, 1, 1),
            (4, 3, 8, 1, 1),
            (1, 1, 3, 2, 4),
            (9, 13, 300, 1, 100),
            (8, 12, 32, 2, 2),
            (4, 4, 45, 3, 3),
        ] {
            // Each line of a `width + 1` values apart, of b `width + 4` apart.
            let runs = lines_of_runs(lines, width, [width + 4, width + 1]);
            let a = values(m * 11 + lines * (width + 1), 1);
            let b = values(n * 5 + lines * (width + 4) + 2, 2);
            let a_rows: Vec<usize> = (0..m).map(|i| i * 11).collect();
            // b's rows overlap: starts 5 apart (a shifted tap's rows).
            let b_rows: Vec<usize> = (0..n).map(|j| j * 5 + j % 3).collect();
            let rows = Rows {
                a: &a,
                a_rows: &a_rows,
                b: &b,
                b_rows: &b_rows,
                runs: &runs,
            };
            for &kernel in &kernels {
                let mut sums = Sums::new(m, n, kernel);
                sums.add(rows, block);
                sums.add(rows, block);
                let got = sums.finish();
                for i in 0..m {
                    for j in 0..n {
                        let (a, b, a_rows, b_rows) = (&a, &b, &a_rows, &b_rows);
                        let want: f64 = runs
                            .iter()
                            .flat_map(|run| {
                                (0..run.len).map(move |p| {
                                    2.0 * a[a_rows[i] + run.output + p] as f64
                                        * b[b_rows[j] + run.input + p] as f64
                                })
                            })
                            .sum();
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{kernel:?} {m}x{n} width {width}: [{i}, {j}] {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Every kernel's weighted sums of rows against f64, written in place at runs of 16 and
    /// fewer positions (a map 37 wide: two whole runs and one of 5 per row), with partial
    /// tiles of 6 and of 8 output rows, overlapping rows, several blocks of rows and of runs,
    /// a step of three runs cut short; the values between runs left as they were.
    #[test]
    fn combine_matches_f64_sums() {
        for (m, rows, width, lines) in [
            (7, 5, 37usize, 1usize),
            (6, 9, 16, 1),
            (1, 1, 3, 1),
            (13, 20, 100, 1),
            // More rows than a block of rows and more runs than a block of runs.
            (8, 70, 300, 2),
            // Two whole AVX-512 tiles (a 16-channel layer) over 13 runs; three tiles, the last
            // of one row, with a second block of runs.
            (16, 66, 16, 13),
            (17, 9, 32, 9),
            (3, 0, 20, 2),
        ] {
            let weights = values(m * rows, 3);
            // Each line's input `width + 3` values apart, its output `width + 2` apart.
            let runs = lines_of_runs(lines, width, [width + 3, width + 2]);
            let stride = lines * (width + 2) + 1;
            let b = values(rows * 4 + lines * (width + 3) + RUN + 3, 4);
            let b_rows: Vec<usize> = (0..rows).map(|r| r * 4 + r % 3).collect();
            for kernel in Kernel::available() {
                let mut out = vec![MaybeUninit::new(f32::NAN); m * stride];
                let input = Shifted {
                    values: &b,
                    rows: &b_rows,
                    runs: &runs,
                };
                combine(&weights, m, input, &mut out, stride, kernel);
                // SAFETY: every value was initialised (NaN, or written).
                let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                let mut written = vec![false; got.len()];
                for run in &runs {
                    for i in 0..m {
                        for p in 0..run.len {
                            let want: f64 = (0..rows)
                                .map(|r| {
                                    weights[i * rows + r] as f64
                                        * b[b_rows[r] + run.input + p] as f64
                                })
                                .sum();
                            let at = i * stride + run.output + p;
                            written[at] = true;
                            let g = got[at] as f64;
                            assert!(
                                (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{kernel:?} {m}x{rows} width {width}: [{i}, {at}] {g} vs {want}"
                            );
                        }
                    }
                }
                for (at, (&g, written)) in got.iter().zip(&written).enumerate() {
                    assert!(
                        *written || g.is_nan(),
                        "{kernel:?}: {at} written outside the runs"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "runs past its buffer")]
    fn a_row_past_its_buffer_is_refused() {
        let a = [0f32; 10];
        let mut sums = Sums::new(1, 1, Kernel::Portable);
        sums.add(
            Rows {
                a: &a,
                a_rows: &[0],
                b: &a,
                b_rows: &[3],
                runs: &[Run {
                    input: 0,
                    output: 0,
                    len: 8,
                }],
            },
            8,
        );
    }
}
