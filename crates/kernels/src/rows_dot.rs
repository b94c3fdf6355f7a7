//! Products of rows given as start offsets into a flat buffer, so rows may overlap and a
//! convolution's input channel shifted by a kernel tap costs no copy (see `conv::grid`):
//! - [`Sums`]: dot products of every pair of rows of two sets, `g[i][j] = sum over k of
//!   a_i[k] · b_j[k]` (a weight gradient: output-gradient channels by shifted input channels),
//!   in vector registers, a tile of rows of `a` by rows of `b` at a time (AVX2: 4 x 3, 12
//!   accumulators, 7 loads per 12 fused multiply-adds; AVX-512: 4 x 4, 16 accumulators, 8
//!   loads per 16), over a block of the rows' length at a time so that every row's block stays
//!   in cache; the lanes are added up once, at the end;
//! - [`combine`]: weighted sums of rows (a forward pass: weights by shifted input channels).
//!
//! Each runs the widest [`Kernel`] the CPU has, chosen at run time, so one binary runs at full
//! width on AVX-512 and on AVX2-only machines; the tests run every kernel the CPU has.

use std::ops::Range;

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
/// Lanes of an AVX-512 register of f32.
const WIDE: usize = 16;

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

/// One product's operands: the rows of `a` and of `b` by their start offsets, each row `len`
/// values long.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub a: &'a [f32],
    pub a_rows: &'a [usize],
    pub b: &'a [f32],
    pub b_rows: &'a [usize],
    pub len: usize,
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

    /// Adds `rows`' dot products, `block` values of every row at a time.
    pub fn add(&mut self, rows: Rows, block: usize) {
        assert_eq!(rows.a_rows.len(), self.m, "rows of a");
        assert_eq!(rows.b_rows.len(), self.n, "rows of b");
        for (starts, data, what) in [(rows.a_rows, rows.a, "a"), (rows.b_rows, rows.b, "b")] {
            assert!(
                starts.iter().all(|&s| s + rows.len <= data.len()),
                "a row of {what} runs past its buffer"
            );
        }
        if self.m == 0 || self.n == 0 || rows.len == 0 {
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
        let block = block.max(LANES) / LANES * LANES;
        for start in (0..rows.len).step_by(block) {
            let span = start..(start + block).min(rows.len);
            match self.kernel {
                // SAFETY (both): the CPU has the instructions (checked in `new`), every row
                // holds `rows.len >= span.end` values (checked above) and `partial` holds every
                // padded pair's lanes, the rows padded to the kernel's tiles.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { tiles.add_avx512(span, &mut self.partial) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2Fma => unsafe { tiles.add_avx2(span, &mut self.partial) },
                _ => tiles.add_portable(span, &mut self.partial),
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
    /// Lane `l` of pair `(i, j)` gains the products at `k = l mod 8` of `span`'s whole groups of
    /// 8; lane 0 the products of its last `span.len() % 8` values.
    fn add_portable(&self, span: Range<usize>, partial: &mut [f32]) {
        let n = self.b_rows.len();
        let whole = span.start + (span.len() / LANES) * LANES;
        for (i, &ra) in self.a_rows.iter().enumerate() {
            let row_a = &self.a[ra..];
            for (j, &rb) in self.b_rows.iter().enumerate() {
                let row_b = &self.b[rb..];
                let lanes = &mut partial[(i * n + j) * LANES..][..LANES];
                let groups = row_a[span.start..whole]
                    .chunks_exact(LANES)
                    .zip(row_b[span.start..whole].chunks_exact(LANES));
                for (xa, xb) in groups {
                    for lane in 0..LANES {
                        lanes[lane] += xa[lane] * xb[lane];
                    }
                }
                for k in whole..span.end {
                    lanes[0] += row_a[k] * row_b[k];
                }
            }
        }
    }

    /// [`Tiles::add_portable`] in AVX2 registers, twelve accumulators per 4 x 3 tile.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every row must hold `span.end` values; `partial` must
    /// hold `LANES` values per pair of padded rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add_avx2(&self, span: Range<usize>, partial: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = self.b_rows.len();
        let whole = span.start + (span.len() / LANES) * LANES;
        let (pa, pb, sums) = (self.a.as_ptr(), self.b.as_ptr(), partial.as_mut_ptr());
        for tile_i in 0..self.a_rows.len() / TILE_A {
            let i0 = tile_i * TILE_A;
            // SAFETY (this block and the loop's): the offsets address rows of `len` values
            // inside `a` and `b`, and `k < span.end <= len`; each pair's lanes lie in `partial`.
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
                    let mut k = span.start;
                    while k < whole {
                        let vb: [__m256; TILE_B] =
                            std::array::from_fn(|c| _mm256_loadu_ps(rb[c].add(k)));
                        for r in 0..TILE_A {
                            let va = _mm256_loadu_ps(ra[r].add(k));
                            for c in 0..TILE_B {
                                acc[r][c] = _mm256_fmadd_ps(va, vb[c], acc[r][c]);
                            }
                        }
                        k += LANES;
                    }
                    for r in 0..TILE_A {
                        for c in 0..TILE_B {
                            _mm256_storeu_ps(at(r, c), acc[r][c]);
                            for k in whole..span.end {
                                *at(r, c) = (*ra[r].add(k)).mul_add(*rb[c].add(k), *at(r, c));
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`Tiles::add_avx2`] in AVX-512 registers: a 4 x 4 tile of 16-lane accumulators, each
    /// started from zero and folded into its pair's 8 partial lanes (lanes `l` and `l + 8`
    /// added, then the sum to lane `l`) at the end; the last `span.len() % 16` values by masked
    /// loads.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; every row must hold `span.end` values; the rows must be
    /// padded to whole 4 x 4 tiles and `partial` hold `LANES` values per pair of them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_avx512(&self, span: Range<usize>, partial: &mut [f32]) {
        use std::arch::x86_64::*;
        const A: usize = WIDE_TILE_A;
        const B: usize = WIDE_TILE_B;
        let n = self.b_rows.len();
        let (pa, pb, sums) = (self.a.as_ptr(), self.b.as_ptr(), partial.as_mut_ptr());
        for tile_i in 0..self.a_rows.len() / A {
            let i0 = tile_i * A;
            // SAFETY (this block and the loop's): the offsets address rows of `len` values
            // inside `a` and `b`; the masked loads read only `k < span.end <= len`; each pair's
            // lanes lie in `partial`.
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
                    let mut step = |k: usize, mask: __mmask16| {
                        let vb: [__m512; B] =
                            std::array::from_fn(|c| _mm512_maskz_loadu_ps(mask, rb[c].add(k)));
                        for (r, sums) in acc.iter_mut().enumerate() {
                            let va = _mm512_maskz_loadu_ps(mask, ra[r].add(k));
                            for (sum, &vb) in sums.iter_mut().zip(&vb) {
                                *sum = _mm512_fmadd_ps(va, vb, *sum);
                            }
                        }
                    };
                    let whole = span.end - (span.len() % WIDE);
                    for k in (span.start..whole).step_by(WIDE) {
                        step(k, !0);
                    }
                    if whole < span.end {
                        step(whole, (1u16 << (span.end - whole)) - 1);
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
/// Positions per register tile of [`combine`] (two AVX2 registers).
const COMBINE_SPAN: usize = 16;

/// The weighted sums of rows, `out[i][k] = sum over r of weights[i][r] · b[b_rows[r] + k]` for
/// `k < len`: a matrix product whose right operand's rows are offsets into one buffer (a
/// convolution's shifted input channels), `[m, len]` row-major, with `weights` `[m, rows]`.
/// Each of `b`'s rows must be readable for `len` rounded up to 16 values.
pub fn combine(
    weights: &[f32],
    m: usize,
    b: &[f32],
    b_rows: &[usize],
    len: usize,
    kernel: Kernel,
) -> Vec<f32> {
    let rows = b_rows.len();
    assert_eq!(weights.len(), m * rows, "weights [m, rows]");
    let span = len.next_multiple_of(COMBINE_SPAN);
    assert!(
        b_rows.iter().all(|&s| s + span <= b.len()),
        "a row of b runs past its buffer"
    );
    // The weights packed [tile][row][tile_rows], zero in a last tile's missing rows.
    let tile_rows = kernel.combine_rows();
    let tiles = m.div_ceil(tile_rows);
    let mut packed = vec![0f32; tiles * rows * tile_rows];
    for (i, row) in weights.chunks_exact(rows.max(1)).enumerate().take(m) {
        let (tile, lane) = (i / tile_rows, i % tile_rows);
        for (r, &w) in row.iter().enumerate() {
            packed[(tile * rows + r) * tile_rows + lane] = w;
        }
    }
    let total = tiles * tile_rows * span;
    let mut out = match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 | Kernel::Avx2Fma if rows > 0 => {
            assert!(kernel.runs_here(), "{} on this CPU", kernel.name());
            let mut out = Vec::with_capacity(total);
            // SAFETY: the CPU has the kernel's instructions (checked above); every row of b
            // holds `span` values (checked above); `packed` and `out` are sized for `tiles`
            // whole tiles, and the kernel writes every value of `out` (its first block of rows
            // stores without loading), so all `total` are initialised.
            unsafe {
                if kernel == Kernel::Avx512 {
                    combine_avx512(&packed, b, b_rows, span, out.as_mut_ptr());
                } else {
                    combine_avx2(&packed, b, b_rows, span, out.as_mut_ptr());
                }
                out.set_len(total);
            }
            out
        }
        _ => {
            let mut out = vec![0f32; total];
            if rows > 0 {
                combine_portable(&packed, b, b_rows, span, &mut out);
            }
            out
        }
    };
    out.truncate(m * span);
    if span != len {
        // Drop each row's last `span - len` values.
        for i in 1..m {
            out.copy_within(i * span..i * span + len, i * len);
        }
        out.truncate(m * len);
    }
    out
}

/// [`combine`] over packed weights and whole tiles, in plain Rust.
fn combine_portable(packed: &[f32], b: &[f32], b_rows: &[usize], span: usize, out: &mut [f32]) {
    let rows = b_rows.len();
    for (tile, weights) in packed.chunks_exact(rows * COMBINE_ROWS).enumerate() {
        let out = &mut out[tile * COMBINE_ROWS * span..][..COMBINE_ROWS * span];
        for (w, &start) in weights.chunks_exact(COMBINE_ROWS).zip(b_rows) {
            let row = &b[start..start + span];
            for (lane, &weight) in w.iter().enumerate() {
                for (o, &x) in out[lane * span..(lane + 1) * span].iter_mut().zip(row) {
                    *o += weight * x;
                }
            }
        }
    }
}

/// Rows of `b` per block of [`combine_avx2`], and positions per block: a block of rows' block
/// of positions (a few KiB) stays in L1 while every tile of output rows runs over it.
const COMBINE_BLOCK_ROWS: usize = 64;
const COMBINE_BLOCK_SPAN: usize = COMBINE_SPAN * 16;

/// [`combine_portable`] in AVX2 registers: 6 output rows by 16 positions, 12 accumulators, over
/// blocks of rows and positions.
///
/// # Safety
/// The CPU must have AVX2 and FMA; every row of `b` must hold `span` (a multiple of 16) values;
/// `packed` must hold whole tiles and `out` address `tiles * COMBINE_ROWS * span` writable
/// values (uninitialised: every one is written before it is read).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn combine_avx2(packed: &[f32], b: &[f32], b_rows: &[usize], span: usize, po: *mut f32) {
    use std::arch::x86_64::*;
    const VECTORS: usize = COMBINE_SPAN / 8;
    let rows = b_rows.len();
    let tiles = packed.len() / (rows * COMBINE_ROWS);
    let pb = b.as_ptr();
    for r0 in (0..rows).step_by(COMBINE_BLOCK_ROWS) {
        let block_rows = &b_rows[r0..(r0 + COMBINE_BLOCK_ROWS).min(rows)];
        for k0 in (0..span).step_by(COMBINE_BLOCK_SPAN) {
            let k1 = (k0 + COMBINE_BLOCK_SPAN).min(span);
            for tile in 0..tiles {
                let weights = packed[(tile * rows + r0) * COMBINE_ROWS..].as_ptr();
                for k in (k0..k1).step_by(COMBINE_SPAN) {
                    // SAFETY: `b_rows[r] + k + 16 <= span` values of each row, the packed
                    // weights of this tile and its output rows are in bounds (the caller's
                    // contract).
                    unsafe {
                        let at = |lane: usize| po.add((tile * COMBINE_ROWS + lane) * span + k);
                        let mut acc = [[_mm256_setzero_ps(); VECTORS]; COMBINE_ROWS];
                        if r0 > 0 {
                            for (lane, sums) in acc.iter_mut().enumerate() {
                                *sums =
                                    std::array::from_fn(|v| _mm256_loadu_ps(at(lane).add(8 * v)));
                            }
                        }
                        for (r, &start) in block_rows.iter().enumerate() {
                            let p = pb.add(start + k);
                            let x: [__m256; VECTORS] =
                                std::array::from_fn(|v| _mm256_loadu_ps(p.add(8 * v)));
                            let w = weights.add(r * COMBINE_ROWS);
                            for (lane, sums) in acc.iter_mut().enumerate() {
                                let weight = _mm256_broadcast_ss(&*w.add(lane));
                                for (sum, &x) in sums.iter_mut().zip(&x) {
                                    *sum = _mm256_fmadd_ps(weight, x, *sum);
                                }
                            }
                        }
                        for (lane, sums) in acc.iter().enumerate() {
                            for (v, &sum) in sums.iter().enumerate() {
                                _mm256_storeu_ps(at(lane).add(8 * v), sum);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`combine_avx2`] in AVX-512 registers: 8 output rows by 48 positions, 24 accumulators; a
/// block's last 16 or 32 positions, where 48 are not left, by masked loads and stores.
///
/// # Safety
/// As [`combine_avx2`], with AVX-512F and `packed` in tiles of [`WIDE_COMBINE_ROWS`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn combine_avx512(packed: &[f32], b: &[f32], b_rows: &[usize], span: usize, po: *mut f32) {
    use std::arch::x86_64::*;
    const ROWS: usize = WIDE_COMBINE_ROWS;
    const VECTORS: usize = 3;
    const STEP: usize = VECTORS * WIDE;
    /// Five steps, about [`COMBINE_BLOCK_SPAN`].
    const BLOCK_SPAN: usize = 5 * STEP;
    let rows = b_rows.len();
    let tiles = packed.len() / (rows * ROWS);
    let pb = b.as_ptr();
    for r0 in (0..rows).step_by(COMBINE_BLOCK_ROWS) {
        let block_rows = &b_rows[r0..(r0 + COMBINE_BLOCK_ROWS).min(rows)];
        for k0 in (0..span).step_by(BLOCK_SPAN) {
            let k1 = (k0 + BLOCK_SPAN).min(span);
            for tile in 0..tiles {
                let weights = packed[(tile * rows + r0) * ROWS..].as_ptr();
                for k in (k0..k1).step_by(STEP) {
                    // `span` and the block are multiples of 16: register `v`'s 16 positions
                    // are there unless the block ends before them.
                    let masks: [__mmask16; VECTORS] =
                        std::array::from_fn(|v| if k + WIDE * v < k1 { !0 } else { 0 });
                    // SAFETY: the masks keep every access to `b_rows[r] + k + 16 * v < span`
                    // values of each row and to this tile's output rows; the packed weights of
                    // this tile are in bounds (the caller's contract).
                    unsafe {
                        let at = |lane: usize, v: usize| {
                            po.add((tile * ROWS + lane) * span + k + WIDE * v)
                        };
                        let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
                        if r0 > 0 {
                            for (lane, sums) in acc.iter_mut().enumerate() {
                                *sums = std::array::from_fn(|v| {
                                    _mm512_maskz_loadu_ps(masks[v], at(lane, v))
                                });
                            }
                        }
                        for (r, &start) in block_rows.iter().enumerate() {
                            let p = pb.add(start + k);
                            let x: [__m512; VECTORS] = std::array::from_fn(|v| {
                                _mm512_maskz_loadu_ps(masks[v], p.add(WIDE * v))
                            });
                            let w = weights.add(r * ROWS);
                            for (lane, sums) in acc.iter_mut().enumerate() {
                                let weight = _mm512_set1_ps(*w.add(lane));
                                for (sum, &x) in sums.iter_mut().zip(&x) {
                                    *sum = _mm512_fmadd_ps(weight, x, *sum);
                                }
                            }
                        }
                        for (lane, sums) in acc.iter().enumerate() {
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

    /// Every kernel this CPU runs (AVX-512, AVX2 + FMA, portable) against f64 sums, with row counts that leave partial tiles, overlapping
    /// rows, lengths that leave a tail under 8, blocks smaller than a row, and two `add`s into
    /// the same sums.
    #[test]
    fn both_kernels_match_f64_sums() {
        let kernels = Kernel::available();
        println!("rows_dot kernels on this CPU: {kernels:?}");
        for (m, n, len, block) in [
            (5, 7, 61, 16),
            (4, 3, 8, 8),
            (1, 1, 3, 64),
            (9, 13, 300, 1000),
            (8, 12, 64, 32),
        ] {
            let a = values(m * 11 + len, 1);
            let b = values(n * 5 + len + 2, 2);
            let a_rows: Vec<usize> = (0..m).map(|i| i * 11).collect();
            // b's rows overlap: starts 5 apart, each `len` long (a shifted tap's rows).
            let b_rows: Vec<usize> = (0..n).map(|j| j * 5 + j % 3).collect();
            let rows = Rows {
                a: &a,
                a_rows: &a_rows,
                b: &b,
                b_rows: &b_rows,
                len,
            };
            for &kernel in &kernels {
                let mut sums = Sums::new(m, n, kernel);
                sums.add(rows, block);
                sums.add(rows, block);
                let got = sums.finish();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..len)
                            .map(|k| 2.0 * a[a_rows[i] + k] as f64 * b[b_rows[j] + k] as f64)
                            .sum();
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{kernel:?} {m}x{n} len {len}: [{i}, {j}] {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Every kernel's weighted sums of rows against f64, with partial tiles of 6 and of 8 output
    /// rows, lengths that are not a multiple of 16 (or of 48), overlapping rows, several blocks
    /// of rows and of positions.
    #[test]
    fn combine_matches_f64_sums() {
        for (m, rows, len) in [
            (7, 5, 37usize),
            (6, 9, 16),
            (1, 1, 3),
            (13, 20, 100),
            // More rows than a block of rows and more positions than a block of positions.
            (8, 70, 300),
            // Two whole AVX-512 tiles (a 16-channel layer), a block ending 16 positions into a
            // step; three tiles, the last of one row, with a second block of a whole step.
            (16, 66, 200),
            (17, 9, 288),
        ] {
            let weights = values(m * rows, 3);
            let b = values(rows * 4 + len.next_multiple_of(16) + 3, 4);
            let b_rows: Vec<usize> = (0..rows).map(|r| r * 4 + r % 3).collect();
            for kernel in Kernel::available() {
                let got = combine(&weights, m, &b, &b_rows, len, kernel);
                assert_eq!(got.len(), m * len);
                for i in 0..m {
                    for k in 0..len {
                        let want: f64 = (0..rows)
                            .map(|r| weights[i * rows + r] as f64 * b[b_rows[r] + k] as f64)
                            .sum();
                        let g = got[i * len + k] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{kernel:?} {m}x{rows} len {len}: [{i}, {k}] {g} vs {want}"
                        );
                    }
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
                len: 8,
            },
            8,
        );
    }
}
