//! Products of rows given as start offsets into a flat buffer, so rows may overlap and a
//! convolution's input channel shifted by a kernel tap costs no copy (see `conv::grid`):
//! - [`Sums`]: dot products of every pair of rows of two sets, `g[i][j] = sum over k of
//!   a_i[k] · b_j[k]` (a weight gradient: output-gradient channels by shifted input channels),
//!   in 8-lane registers, a tile of 4 `a` rows by 3 `b` rows at a time (12 accumulators, 7
//!   loads per 12 fused multiply-adds), over a block of the rows' length at a time so that
//!   every row's block stays in cache; the lanes are added up once, at the end;
//! - [`combine`]: weighted sums of rows (a forward pass: weights by shifted input channels).

use std::ops::Range;

/// Rows of `a` per register tile.
const TILE_A: usize = 4;
/// Rows of `b` per register tile.
const TILE_B: usize = 3;
/// Lanes of a partial sum (one AVX2 register of f32).
const LANES: usize = 8;

/// The instructions [`Sums::add`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 256-bit registers and fused multiply-add (x86-64 with AVX2 and FMA, AVX-512 machines too).
    Avx2Fma,
    /// Plain Rust (every other CPU), summed in the same lane order (a multiply and an add: a
    /// fused multiply-add without the instruction is a slow library call).
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Kernel::Avx2Fma;
        }
        Kernel::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx2Fma => "avx2+fma",
            Kernel::Portable => "portable",
        }
    }
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
    /// `[m rounded up to TILE_A, n rounded up to TILE_B, LANES]`: a tile's missing rows repeat
    /// the last row and their sums are dropped.
    partial: Vec<f32>,
}

impl Sums {
    /// Sums to be added with `kernel`, which must run on this CPU.
    pub fn new(m: usize, n: usize, kernel: Kernel) -> Sums {
        assert!(
            kernel == Kernel::Portable || kernel == Kernel::detect(),
            "{} on this CPU",
            kernel.name()
        );
        let padded = m.next_multiple_of(TILE_A) * n.next_multiple_of(TILE_B);
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
        let tiles = Tiles {
            a: rows.a,
            a_rows: &padded(rows.a_rows, TILE_A),
            b: rows.b,
            b_rows: &padded(rows.b_rows, TILE_B),
        };
        let block = block.max(LANES) / LANES * LANES;
        for start in (0..rows.len).step_by(block) {
            let span = start..(start + block).min(rows.len);
            match self.kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2Fma => {
                    // SAFETY: the CPU has AVX2 and FMA (checked in `new`), every row holds
                    // `rows.len >= span.end` values (checked above) and `partial` holds every
                    // padded pair's lanes.
                    unsafe { tiles.add_avx2(span, &mut self.partial) }
                }
                _ => tiles.add_portable(span, &mut self.partial),
            }
        }
    }

    /// The sums, `[m, n]` row-major.
    pub fn finish(self) -> Vec<f32> {
        let stride = self.n.next_multiple_of(TILE_B);
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
}

/// Output rows per register tile of [`combine`].
const COMBINE_ROWS: usize = 6;
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
    // The weights packed [tile][row][COMBINE_ROWS], zero in a last tile's missing rows.
    let tiles = m.div_ceil(COMBINE_ROWS);
    let mut packed = vec![0f32; tiles * rows * COMBINE_ROWS];
    for (i, row) in weights.chunks_exact(rows.max(1)).enumerate().take(m) {
        let (tile, lane) = (i / COMBINE_ROWS, i % COMBINE_ROWS);
        for (r, &w) in row.iter().enumerate() {
            packed[(tile * rows + r) * COMBINE_ROWS + lane] = w;
        }
    }
    let total = tiles * COMBINE_ROWS * span;
    let mut out = match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma if rows > 0 => {
            assert_eq!(Kernel::detect(), Kernel::Avx2Fma, "AVX2 + FMA on this CPU");
            let mut out = Vec::with_capacity(total);
            // SAFETY: the CPU has AVX2 and FMA (checked above); every row of b holds `span`
            // values (checked above); `packed` and `out` are sized for `tiles` whole tiles, and
            // the kernel writes every value of `out` (its first block of rows stores without
            // loading), so all `total` are initialised.
            unsafe {
                combine_avx2(&packed, b, b_rows, span, out.as_mut_ptr());
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

    /// Both kernels against f64 sums, with row counts that leave partial tiles, overlapping
    /// rows, lengths that leave a tail under 8, blocks smaller than a row, and two `add`s into
    /// the same sums.
    #[test]
    fn both_kernels_match_f64_sums() {
        let kernels = [Kernel::detect(), Kernel::Portable];
        for (m, n, len, block) in [
            (5, 7, 61, 16),
            (4, 3, 8, 8),
            (1, 1, 3, 64),
            (9, 13, 300, 1000),
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
            for kernel in kernels {
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

    /// Both kernels' weighted sums of rows against f64, with a partial tile of 6 output rows,
    /// a length that is not a multiple of 16, overlapping rows.
    #[test]
    fn combine_matches_f64_sums() {
        for (m, rows, len) in [(7, 5, 37usize), (6, 9, 16), (1, 1, 3), (13, 20, 100)] {
            let weights = values(m * rows, 3);
            let b = values(rows * 4 + len.next_multiple_of(16) + 3, 4);
            let b_rows: Vec<usize> = (0..rows).map(|r| r * 4 + r % 3).collect();
            for kernel in [Kernel::detect(), Kernel::Portable] {
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
