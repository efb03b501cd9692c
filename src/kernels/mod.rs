//! Inference kernels for pruned layers, `y = W x` for a batch of inputs: dense, CSR, N:M
//! compressed, block-sparse, and the smaller dense layer that removing whole rows gives.
//!
//! All are multi-threaded over rows (row blocks of equal work), read each weight once, and
//! keep `x` in cache: at batch 1 a layer is memory-bound, so the figure to beat is the bytes a
//! format streams divided by the bandwidth the dense kernel reaches.

use rayon::prelude::*;

#[cfg(feature = "gpu")]
pub mod gpu;

/// Rows per parallel task: enough work to amortise scheduling, small enough to balance.
const ROW_BLOCK: usize = 64;

/// A dense `rows × cols` layer, row-major.
pub struct Dense {
    pub rows: usize,
    pub cols: usize,
    pub w: Vec<f32>,
}

/// The dot product's body: sixteen independent accumulators, so the compiler vectorises it
/// (with FMA where the caller's target features allow).
macro_rules! dot_body {
    ($a:expr, $b:expr, $fma:expr) => {{
        let (a, b): (&[f32], &[f32]) = ($a, $b);
        let mut acc = [0f32; 16];
        let chunks = a.len() / 16;
        for i in 0..chunks {
            let (x, y) = (&a[i * 16..i * 16 + 16], &b[i * 16..i * 16 + 16]);
            for k in 0..16 {
                acc[k] = $fma(x[k], y[k], acc[k]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for i in chunks * 16..a.len() {
            s += a[i] * b[i];
        }
        s
    }};
}

fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    dot_body!(a, b, |x: f32, y: f32, s: f32| s + x * y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body!(a, b, |x: f32, y: f32, s: f32| x.mul_add(y, s))
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `Σ a·b`, with AVX2 + FMA where the CPU has them (chosen at run time).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the body is safe Rust.
        return unsafe { dot_avx2(a, b) };
    }
    dot_generic(a, b)
}

impl Dense {
    /// A `rows × cols` layer of standard normal weights, each zero with probability
    /// `zero_frac` (tests and benchmarks).
    pub fn random(rows: usize, cols: usize, seed: u64, zero_frac: f64) -> Dense {
        let mut rng = crate::util::SplitMix64::new(seed);
        let w = (0..rows * cols)
            .map(|_| {
                if rng.next_f64() < zero_frac {
                    0.0
                } else {
                    rng.normal() as f32
                }
            })
            .collect();
        Dense { rows, cols, w }
    }
}

/// Batches from which the dense layer runs as one GEMM (the `gemm` crate candle uses) instead
/// of one GEMV per input: from here a blocked product reuses each weight across inputs.
const GEMM_FROM_BATCH: usize = 4;

/// Four rows' dot products with one `x`: each 8-lane slice of `x` is loaded once for four
/// weight streams, and four streams in flight keep more memory requests outstanding than one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot4_avx2(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = x.len();
    assert!(w.iter().all(|r| r.len() == n));
    let chunks = n / 16;
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    for i in 0..chunks {
        let o = i * 16;
        // SAFETY: o + 16 ≤ chunks·16 ≤ n, and every row has length n (asserted).
        let (x0, x1) = unsafe {
            (
                _mm256_loadu_ps(x.as_ptr().add(o)),
                _mm256_loadu_ps(x.as_ptr().add(o + 8)),
            )
        };
        for (a, r) in acc.iter_mut().zip(&w) {
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_ps(r.as_ptr().add(o)),
                    _mm256_loadu_ps(r.as_ptr().add(o + 8)),
                )
            };
            a[0] = _mm256_fmadd_ps(w0, x0, a[0]);
            a[1] = _mm256_fmadd_ps(w1, x1, a[1]);
        }
    }
    let mut out = [0f32; 4];
    for (k, a) in acc.iter().enumerate() {
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a[0], a[1])) };
        let mut s: f32 = lanes.iter().sum();
        for i in chunks * 16..n {
            s += w[k][i] * x[i];
        }
        out[k] = s;
    }
    out
}

impl Dense {
    /// `y[b][r] = Σ_c W[r][c] · x[b][c]` for `batch` inputs (`x`: batch × cols, `y`: batch × rows).
    pub fn matvec(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        assert_eq!(x.len(), batch * self.cols);
        assert_eq!(y.len(), batch * self.rows);
        let (rows, cols) = (self.rows, self.cols);
        if batch >= GEMM_FROM_BATCH && rows > 0 {
            // y (batch × rows) = x (batch × cols) · Wᵀ: Wᵀ's (c, r) element is w[r·cols + c].
            crate::graph::fast::matmul(batch, rows, cols, x, &self.w, 1, cols, y, 0, rows);
            return;
        }
        by_row_blocks(rows, ROW_BLOCK, batch, y, |rs, out| {
            let (r0, r1) = (rs.start, rs.end);
            let row = |r: usize| &self.w[r * cols..(r + 1) * cols];
            let mut r = r0;
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                while r + 4 <= r1 {
                    for b in 0..batch {
                        let xb = &x[b * cols..(b + 1) * cols];
                        // SAFETY: the CPU has AVX2 and FMA (checked above).
                        let d =
                            unsafe { dot4_avx2([row(r), row(r + 1), row(r + 2), row(r + 3)], xb) };
                        for (k, v) in d.into_iter().enumerate() {
                            out[(r + k - r0) * batch + b] = v;
                        }
                    }
                    r += 4;
                }
            }
            for r in r..r1 {
                for b in 0..batch {
                    out[(r - r0) * batch + b] = dot(row(r), &x[b * cols..(b + 1) * cols]);
                }
            }
        });
    }
}

/// Runs `f` over the output rows in tasks of `per_task` rows, in parallel; `f(rows, out)`
/// fills `out[(r − rows.start)·batch + b]` for its rows, and the tasks' results are then
/// written into `y` (`batch × rows`). Every kernel's parallel structure.
fn by_row_blocks(
    rows: usize,
    per_task: usize,
    batch: usize,
    y: &mut [f32],
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let per_task = per_task.max(1);
    let blocks: Vec<Vec<f32>> = (0..rows.div_ceil(per_task))
        .into_par_iter()
        .map(|blk| {
            let r0 = blk * per_task;
            let r1 = (r0 + per_task).min(rows);
            let mut out = vec![0f32; (r1 - r0) * batch];
            f(r0..r1, &mut out);
            out
        })
        .collect();
    for (blk, out) in blocks.iter().enumerate() {
        let r0 = blk * per_task;
        for i in 0..out.len() / batch.max(1) {
            for b in 0..batch {
                y[b * rows + r0 + i] = out[i * batch + b];
            }
        }
    }
}

/// Compressed sparse rows; column indices in 16 bits when the width allows (half the index
/// bytes), else 32.
pub struct Csr {
    pub rows: usize,
    pub cols: usize,
    pub row_ptr: Vec<u32>,
    pub idx16: Vec<u16>,
    pub idx32: Vec<u32>,
    pub values: Vec<f32>,
}

impl Csr {
    /// The non-zeros of a dense row-major matrix where `keep` says so (`None`: w ≠ 0).
    pub fn from_dense(d: &Dense, keep: Option<&[bool]>) -> Csr {
        let wide = d.cols > u16::MAX as usize + 1;
        let mut row_ptr = Vec::with_capacity(d.rows + 1);
        let (mut idx16, mut idx32, mut values) = (Vec::new(), Vec::new(), Vec::new());
        row_ptr.push(0u32);
        for r in 0..d.rows {
            for c in 0..d.cols {
                let i = r * d.cols + c;
                let kept = keep.map_or(d.w[i] != 0.0, |k| k[i]);
                if kept {
                    values.push(d.w[i]);
                    if wide {
                        idx32.push(c as u32);
                    } else {
                        idx16.push(c as u16);
                    }
                }
            }
            row_ptr.push(values.len() as u32);
        }
        Csr {
            rows: d.rows,
            cols: d.cols,
            row_ptr,
            idx16,
            idx32,
            values,
        }
    }

    /// Bytes the kernel streams: values, indices and row pointers.
    pub fn bytes(&self) -> usize {
        self.values.len() * 4 + self.idx16.len() * 2 + self.idx32.len() * 4 + self.row_ptr.len() * 4
    }

    pub fn matvec(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        assert_eq!(x.len(), batch * self.cols);
        assert_eq!(y.len(), batch * self.rows);
        let cols = self.cols;
        by_row_blocks(self.rows, ROW_BLOCK, batch, y, |rs, out| {
            let (r0, r1) = (rs.start, rs.end);
            for r in r0..r1 {
                let (a, e) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
                let vals = &self.values[a..e];
                for b in 0..batch {
                    let xb = &x[b * cols..(b + 1) * cols];
                    let mut acc = [0f32; 8];
                    if self.idx32.is_empty() {
                        let idx = &self.idx16[a..e];
                        // Eight independent sums, in exact chunks so that only the
                        // gathers from x keep a bounds check.
                        let (vc, ic) = (vals.chunks_exact(8), idx.chunks_exact(8));
                        let (vr, ir) = (vc.remainder(), ic.remainder());
                        for (v, i) in vc.zip(ic) {
                            for j in 0..8 {
                                acc[j] += v[j] * xb[i[j] as usize];
                            }
                        }
                        for (v, &i) in vr.iter().zip(ir) {
                            acc[0] += v * xb[i as usize];
                        }
                    } else {
                        let idx = &self.idx32[a..e];
                        for (v, &c) in vals.iter().zip(idx) {
                            acc[0] += v * xb[c as usize];
                        }
                    }
                    out[(r - r0) * batch + b] = acc.iter().sum();
                }
            }
        });
    }
}

/// N:M compressed: the N kept values of every group of M consecutive weights along a row, and
/// each one's position in its group (one byte). Rows whose width is not a multiple of M end in
/// a partial group.
pub struct NmCompressed {
    pub rows: usize,
    pub cols: usize,
    pub n: usize,
    pub m: usize,
    pub values: Vec<f32>,
    pub pos: Vec<u8>,
}

impl NmCompressed {
    /// Keeps the N largest |w| of every group of M (ties by position), as N:M pruning does.
    pub fn from_dense(d: &Dense, n: usize, m: usize) -> NmCompressed {
        let groups = d.cols.div_ceil(m);
        let mut values = Vec::with_capacity(d.rows * groups * n);
        let mut pos = Vec::with_capacity(d.rows * groups * n);
        for r in 0..d.rows {
            let row = &d.w[r * d.cols..(r + 1) * d.cols];
            for g in 0..groups {
                let c0 = g * m;
                let len = m.min(d.cols - c0);
                let mut order: Vec<usize> = (0..len).collect();
                order.sort_by(|&a, &b| {
                    row[c0 + b]
                        .abs()
                        .total_cmp(&row[c0 + a].abs())
                        .then(a.cmp(&b))
                });
                let mut keep: Vec<usize> = order.into_iter().take(n.min(len)).collect();
                keep.sort_unstable();
                for j in 0..n {
                    // A short last group pads with zeros at position 0.
                    let (v, p) = keep.get(j).map_or((0.0, 0), |&k| (row[c0 + k], k as u8));
                    values.push(v);
                    pos.push(p);
                }
            }
        }
        NmCompressed {
            rows: d.rows,
            cols: d.cols,
            n,
            m,
            values,
            pos,
        }
    }

    pub fn bytes(&self) -> usize {
        self.values.len() * 4 + self.pos.len()
    }

    /// The dense equivalent (the kept values in place, zeros elsewhere), for checks.
    pub fn to_dense(&self) -> Dense {
        let groups = self.cols.div_ceil(self.m);
        let mut w = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for g in 0..groups {
                for j in 0..self.n {
                    let k = (r * groups + g) * self.n + j;
                    let c = g * self.m + self.pos[k] as usize;
                    if c < self.cols && self.values[k] != 0.0 {
                        w[r * self.cols + c] = self.values[k];
                    }
                }
            }
        }
        Dense {
            rows: self.rows,
            cols: self.cols,
            w,
        }
    }

    pub fn matvec(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        assert_eq!(x.len(), batch * self.cols);
        assert_eq!(y.len(), batch * self.rows);
        let (cols, n, m) = (self.cols, self.n, self.m);
        let per_row = cols.div_ceil(m) * n;
        let fast24 = n == 2 && m == 4 && nm24_fast();
        by_row_blocks(self.rows, ROW_BLOCK, batch, y, |rs, out| {
            let (r0, r1) = (rs.start, rs.end);
            let vals = |r: usize| &self.values[r * per_row..(r + 1) * per_row];
            let pos = |r: usize| &self.pos[r * per_row..(r + 1) * per_row];
            let mut r = r0;
            #[cfg(target_arch = "x86_64")]
            if fast24 {
                while r < r1 {
                    let four = r + 4 <= r1;
                    for b in 0..batch {
                        let xb = &x[b * cols..(b + 1) * cols];
                        // SAFETY: the CPU has AVX2 and FMA (checked in `nm24_fast`).
                        if four {
                            let d = unsafe {
                                nm24_rows_avx2(
                                    [vals(r), vals(r + 1), vals(r + 2), vals(r + 3)],
                                    [pos(r), pos(r + 1), pos(r + 2), pos(r + 3)],
                                    xb,
                                )
                            };
                            for (k, v) in d.into_iter().enumerate() {
                                out[(r + k - r0) * batch + b] = v;
                            }
                        } else {
                            let [d] = unsafe { nm24_rows_avx2([vals(r)], [pos(r)], xb) };
                            out[(r - r0) * batch + b] = d;
                        }
                    }
                    r += if four { 4 } else { 1 };
                }
            }
            for r in r..r1 {
                for b in 0..batch {
                    let xb = &x[b * cols..(b + 1) * cols];
                    out[(r - r0) * batch + b] = nm_row(vals(r), pos(r), xb, n, m);
                }
            }
        });
    }
}

/// One row of an N:M layer times `x`. Positions lie inside their group (a short last group
/// pads with value 0 at position 0), so `base + pos < cols` always.
fn nm_row(vals: &[f32], pos: &[u8], x: &[f32], n: usize, m: usize) -> f32 {
    let mut acc = [0f32; 4];
    for (g, (v, p)) in vals.chunks_exact(n).zip(pos.chunks_exact(n)).enumerate() {
        let base = g * m;
        for j in 0..n {
            acc[j & 3] += v[j] * x[base + p[j] as usize];
        }
    }
    acc.iter().sum()
}

/// Whether the vectorised 2:4 kernel can run here.
fn nm24_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Four rows of a 2:4 layer at once, four groups (sixteen columns of `x`) per step: each
/// row's eight kept positions widen to lane indices in one instruction, two lane permutations
/// pick their inputs out of two 8-lane loads of `x` (shared by the four rows), and a blend
/// joins them for one 8-lane FMA. Four rows keep four weight streams in flight, as the dense
/// kernel does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nm24_rows_avx2<const R: usize>(
    vals: [&[f32]; R],
    pos: [&[u8]; R],
    x: &[f32],
) -> [f32; R] {
    use std::arch::x86_64::*;
    let cols = x.len();
    let quads = cols / 16;
    for r in 0..R {
        assert!(vals[r].len() >= 8 * quads && pos[r].len() >= 8 * quads);
    }
    let mut acc = [_mm256_setzero_ps(); R];
    // Groups 0 and 1 of a step index the first load (offsets 0 and 4), groups 2 and 3 the second.
    let offset = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
    for q in 0..quads {
        let k = 8 * q;
        // SAFETY (loads): 16·q + 16 ≤ 16·quads ≤ cols, and k + 8 ≤ 8·quads ≤ the asserted lengths.
        let (xa, xb) = unsafe {
            (
                _mm256_loadu_ps(x.as_ptr().add(16 * q)),
                _mm256_loadu_ps(x.as_ptr().add(16 * q + 8)),
            )
        };
        for r in 0..R {
            let p8 = unsafe { _mm_loadl_epi64(pos[r].as_ptr().add(k) as *const __m128i) };
            let idx = _mm256_add_epi32(_mm256_cvtepu8_epi32(p8), offset);
            let picked = _mm256_blend_ps::<0b1111_0000>(
                _mm256_permutevar8x32_ps(xa, idx),
                _mm256_permutevar8x32_ps(xb, idx),
            );
            let v = unsafe { _mm256_loadu_ps(vals[r].as_ptr().add(k)) };
            acc[r] = _mm256_fmadd_ps(picked, v, acc[r]);
        }
    }
    let mut out = [0f32; R];
    let done = 8 * quads;
    for r in 0..R {
        let mut lanes = [0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        out[r] = lanes.iter().sum();
        // The groups after the last full step (at most three full groups and a short one).
        if done < vals[r].len() {
            out[r] += nm_row(&vals[r][done..], &pos[r][done..], &x[16 * quads..], 2, 4);
        }
    }
    out
}

/// Block-sparse: the kept `b × b` blocks of the matrix, each stored dense (zero-padded at the
/// right and bottom edges), with each block-row's list of block columns. A block is kept when
/// any weight inside it is.
pub struct BlockSparse {
    pub rows: usize,
    pub cols: usize,
    pub b: usize,
    /// Per block-row, the range of its blocks in `block_col` (len = block-rows + 1).
    pub block_ptr: Vec<u32>,
    pub block_col: Vec<u32>,
    /// `b·b` values per kept block, row-major inside the block.
    pub values: Vec<f32>,
}

impl BlockSparse {
    pub fn from_dense(d: &Dense, keep: Option<&[bool]>, b: usize) -> BlockSparse {
        let b = b.max(1);
        let kept = |i: usize| keep.map_or(d.w[i] != 0.0, |k| k[i]);
        let (brows, bcols) = (d.rows.div_ceil(b), d.cols.div_ceil(b));
        let mut block_ptr = vec![0u32];
        let (mut block_col, mut values) = (Vec::new(), Vec::new());
        for br in 0..brows {
            let rs = br * b..((br + 1) * b).min(d.rows);
            for bc in 0..bcols {
                let cs = bc * b..((bc + 1) * b).min(d.cols);
                let any = rs.clone().any(|r| cs.clone().any(|c| kept(r * d.cols + c)));
                if !any {
                    continue;
                }
                block_col.push(bc as u32);
                for i in 0..b {
                    for j in 0..b {
                        let (r, c) = (br * b + i, bc * b + j);
                        let v = if r < d.rows && c < d.cols && kept(r * d.cols + c) {
                            d.w[r * d.cols + c]
                        } else {
                            0.0
                        };
                        values.push(v);
                    }
                }
            }
            block_ptr.push(block_col.len() as u32);
        }
        BlockSparse {
            rows: d.rows,
            cols: d.cols,
            b,
            block_ptr,
            block_col,
            values,
        }
    }

    /// Kept blocks.
    pub fn blocks(&self) -> usize {
        self.block_col.len()
    }

    pub fn bytes(&self) -> usize {
        self.values.len() * 4 + self.block_col.len() * 4 + self.block_ptr.len() * 4
    }

    pub fn matvec(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        assert_eq!(x.len(), batch * self.cols);
        assert_eq!(y.len(), batch * self.rows);
        let (b, cols) = (self.b, self.cols);
        // Tasks of whole block-rows, about ROW_BLOCK rows each.
        let per_task = ROW_BLOCK.div_ceil(b).max(1) * b;
        by_row_blocks(self.rows, per_task, batch, y, |rs, out| {
            let r0 = rs.start;
            for br in rs.start / b..rs.end.div_ceil(b) {
                let (s, e) = (self.block_ptr[br] as usize, self.block_ptr[br + 1] as usize);
                for k in s..e {
                    let c0 = self.block_col[k] as usize * b;
                    let len = b.min(cols - c0);
                    let vals = &self.values[k * b * b..(k + 1) * b * b];
                    for i in 0..b.min(self.rows - br * b) {
                        let w = &vals[i * b..i * b + len];
                        let row = br * b + i - r0;
                        for bb in 0..batch {
                            let xb = &x[bb * cols + c0..bb * cols + c0 + len];
                            out[row * batch + bb] += dot(w, xb);
                        }
                    }
                }
            }
        });
    }
}

/// The dense layer without the rows `keep` drops: a structurally smaller layer.
pub fn remove_rows(d: &Dense, keep: &[bool]) -> Dense {
    compact(d, keep, &vec![true; d.cols])
}

/// The dense layer of only the rows and columns kept: what removing whole output neurons and
/// whole inputs gives (the input shrinks to the kept columns).
pub fn compact(d: &Dense, rows: &[bool], cols: &[bool]) -> Dense {
    let kept_cols: Vec<usize> = (0..d.cols).filter(|&c| cols[c]).collect();
    let mut w = Vec::new();
    let mut n = 0;
    for (r, k) in rows.iter().enumerate().take(d.rows) {
        if *k {
            let row = &d.w[r * d.cols..(r + 1) * d.cols];
            w.extend(kept_cols.iter().map(|&c| row[c]));
            n += 1;
        }
    }
    Dense {
        rows: n,
        cols: kept_cols.len(),
        w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;

    fn random(rows: usize, cols: usize, seed: u64, zero_frac: f64) -> Dense {
        Dense::random(rows, cols, seed, zero_frac)
    }

    /// The textbook triple loop in f64.
    fn reference(d: &Dense, x: &[f32], batch: usize) -> Vec<f32> {
        let mut y = vec![0f32; batch * d.rows];
        for b in 0..batch {
            for r in 0..d.rows {
                let mut s = 0f64;
                for c in 0..d.cols {
                    s += d.w[r * d.cols + c] as f64 * x[b * d.cols + c] as f64;
                }
                y[b * d.rows + r] = s as f32;
            }
        }
        y
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{i}: {p} vs {q}");
        }
    }

    #[test]
    fn every_kernel_equals_the_triple_loop() {
        // Shapes around the row block and the group width, odd widths, one row, one column.
        for (rows, cols, zeros, batch) in [
            (1, 1, 0.0, 1),
            (3, 7, 0.5, 2),
            (65, 130, 0.9, 3),
            (200, 33, 0.0, 1),
            (64, 64, 1.0, 4),
            (130, 257, 0.97, 8),
        ] {
            let d = random(rows, cols, rows as u64 * 31 + cols as u64, zeros);
            let x: Vec<f32> = {
                let mut rng = SplitMix64::new(7);
                (0..batch * cols).map(|_| rng.normal() as f32).collect()
            };
            let want = reference(&d, &x, batch);
            let mut y = vec![f32::NAN; batch * rows];
            d.matvec(&x, batch, &mut y);
            close(&y, &want);
            let csr = Csr::from_dense(&d, None);
            let mut y = vec![f32::NAN; batch * rows];
            csr.matvec(&x, batch, &mut y);
            close(&y, &want);
            for (n, m) in [(2, 4), (1, 4), (4, 8)] {
                let nm = NmCompressed::from_dense(&d, n, m);
                let dd = nm.to_dense();
                // Exactly N of every full group kept (where the weights were non-zero).
                let mut y = vec![f32::NAN; batch * rows];
                nm.matvec(&x, batch, &mut y);
                close(&y, &reference(&dd, &x, batch));
            }
            for b in [1, 3, 4, 8] {
                let bs = BlockSparse::from_dense(&d, None, b);
                let mut y = vec![f32::NAN; batch * rows];
                bs.matvec(&x, batch, &mut y);
                close(&y, &want);
            }
            // Dropping rows and columns equals the full product on the kept inputs.
            let kc: Vec<bool> = (0..cols).map(|c| c % 3 != 1).collect();
            let kr: Vec<bool> = (0..rows).map(|r| r % 4 != 2).collect();
            let both = compact(&d, &kr, &kc);
            let xk: Vec<f32> = (0..batch)
                .flat_map(|b| (0..cols).filter(|c| kc[*c]).map(move |c| (b, c)))
                .map(|(b, c)| x[b * cols + c])
                .collect();
            let w =
                d.w.iter()
                    .enumerate()
                    .map(|(i, v)| if kc[i % cols] { *v } else { 0.0 })
                    .collect();
            let dz = Dense { rows, cols, w };
            let full = reference(&dz, &x, batch);
            let mut y = vec![f32::NAN; batch * both.rows];
            both.matvec(&xk, batch, &mut y);
            let kept: Vec<usize> = (0..rows).filter(|r| kr[*r]).collect();
            for b in 0..batch {
                for (i, &r) in kept.iter().enumerate() {
                    let (p, q) = (y[b * both.rows + i], full[b * rows + r]);
                    assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()));
                }
            }
            let keep: Vec<bool> = (0..rows).map(|r| r % 2 == 0).collect();
            let small = remove_rows(&d, &keep);
            let mut y = vec![f32::NAN; batch * small.rows];
            small.matvec(&x, batch, &mut y);
            let full = reference(&d, &x, batch);
            let kept_rows: Vec<usize> = (0..rows).filter(|r| keep[*r]).collect();
            for b in 0..batch {
                for (i, &r) in kept_rows.iter().enumerate() {
                    let (p, q) = (y[b * small.rows + i], full[b * rows + r]);
                    assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()));
                }
            }
        }
    }

    #[test]
    fn block_sparse_keeps_exactly_the_blocks_with_a_kept_weight() {
        // 5×5 in 2×2 blocks (3×3 block grid, edges padded): one weight at (0,0) and one at
        // (4,3) keep blocks (0,0) and (2,1) only.
        let mut w = vec![0f32; 25];
        w[0] = 1.5;
        w[4 * 5 + 3] = -2.0;
        let d = Dense {
            rows: 5,
            cols: 5,
            w,
        };
        let bs = BlockSparse::from_dense(&d, None, 2);
        assert_eq!(bs.block_ptr, vec![0, 1, 1, 2]);
        assert_eq!(bs.block_col, vec![0, 1]);
        assert_eq!(bs.values, vec![1.5, 0.0, 0.0, 0.0, 0.0, -2.0, 0.0, 0.0]);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let mut y = [f32::NAN; 5];
        bs.matvec(&x, 1, &mut y);
        assert_eq!(y, [1.5, 0.0, 0.0, 0.0, -8.0]);
    }

    #[test]
    fn nm_keeps_the_largest_of_each_group() {
        let d = Dense {
            rows: 1,
            cols: 6,
            w: vec![0.1, -3.0, 2.0, 0.5, 7.0, -8.0],
        };
        let nm = NmCompressed::from_dense(&d, 2, 4);
        assert_eq!(nm.to_dense().w, vec![0.0, -3.0, 2.0, 0.0, 7.0, -8.0]);
    }
}
