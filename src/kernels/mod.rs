//! Inference kernels for pruned layers, `y = W x` for a batch of inputs: dense, CSR, N:M
//! compressed, and the smaller dense layer that removing whole rows gives.
//!
//! All are multi-threaded over rows (row blocks of equal work), read each weight once, and
//! keep `x` in cache: at batch 1 a layer is memory-bound, so the figure to beat is the bytes a
//! format streams divided by the bandwidth the dense kernel reaches.

use rayon::prelude::*;

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

/// `Σ a·b`, with AVX2 + FMA where the CPU has them (chosen at run time).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the body is safe Rust.
        return unsafe { dot_avx2(a, b) };
    }
    dot_generic(a, b)
}

impl Dense {
    /// `y[b][r] = Σ_c W[r][c] · x[b][c]` for `batch` inputs (`x`: batch × cols, `y`: batch × rows).
    pub fn matvec(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        assert_eq!(x.len(), batch * self.cols);
        assert_eq!(y.len(), batch * self.rows);
        let (rows, cols) = (self.rows, self.cols);
        // Output rows in blocks; each block writes its slice of every batch row afterwards.
        let blocks: Vec<Vec<f32>> = (0..rows.div_ceil(ROW_BLOCK))
            .into_par_iter()
            .map(|blk| {
                let r0 = blk * ROW_BLOCK;
                let r1 = (r0 + ROW_BLOCK).min(rows);
                let mut out = vec![0f32; (r1 - r0) * batch];
                for r in r0..r1 {
                    let w = &self.w[r * cols..(r + 1) * cols];
                    for b in 0..batch {
                        out[(r - r0) * batch + b] = dot(w, &x[b * cols..(b + 1) * cols]);
                    }
                }
                out
            })
            .collect();
        scatter(&blocks, rows, batch, y);
    }
}

/// Writes per-block results (`block rows × batch`) into `y` (`batch × rows`).
fn scatter(blocks: &[Vec<f32>], rows: usize, batch: usize, y: &mut [f32]) {
    for (blk, out) in blocks.iter().enumerate() {
        let r0 = blk * ROW_BLOCK;
        let n = out.len() / batch.max(1);
        for i in 0..n {
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
        let blocks: Vec<Vec<f32>> = (0..self.rows.div_ceil(ROW_BLOCK))
            .into_par_iter()
            .map(|blk| {
                let r0 = blk * ROW_BLOCK;
                let r1 = (r0 + ROW_BLOCK).min(self.rows);
                let mut out = vec![0f32; (r1 - r0) * batch];
                for r in r0..r1 {
                    let (a, e) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
                    let vals = &self.values[a..e];
                    for b in 0..batch {
                        let xb = &x[b * cols..(b + 1) * cols];
                        let mut acc = [0f32; 4];
                        if self.idx32.is_empty() {
                            let idx = &self.idx16[a..e];
                            let n4 = vals.len() / 4 * 4;
                            for k in (0..n4).step_by(4) {
                                for j in 0..4 {
                                    acc[j] += vals[k + j] * xb[idx[k + j] as usize];
                                }
                            }
                            for k in n4..vals.len() {
                                acc[0] += vals[k] * xb[idx[k] as usize];
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
                out
            })
            .collect();
        scatter(&blocks, self.rows, batch, y);
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
        let blocks: Vec<Vec<f32>> = (0..self.rows.div_ceil(ROW_BLOCK))
            .into_par_iter()
            .map(|blk| {
                let r0 = blk * ROW_BLOCK;
                let r1 = (r0 + ROW_BLOCK).min(self.rows);
                let mut out = vec![0f32; (r1 - r0) * batch];
                for r in r0..r1 {
                    let vals = &self.values[r * per_row..(r + 1) * per_row];
                    let pos = &self.pos[r * per_row..(r + 1) * per_row];
                    for b in 0..batch {
                        let xb = &x[b * cols..(b + 1) * cols];
                        out[(r - r0) * batch + b] = if fast24 {
                            // SAFETY: the CPU has AVX2 and FMA (checked in `nm24_fast`).
                            unsafe { nm24_row_avx2(vals, pos, xb) }
                        } else {
                            nm_row(vals, pos, xb, n, m)
                        };
                    }
                }
                out
            })
            .collect();
        scatter(&blocks, self.rows, batch, y);
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
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One row of a 2:4 layer: two groups (eight columns of `x`) per step, the four kept values'
/// inputs picked out of one 8-lane load by a lane permutation instead of four gathers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nm24_row_avx2(vals: &[f32], pos: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let cols = x.len();
    let pairs = cols / 8;
    assert!(vals.len() >= 4 * pairs && pos.len() >= 4 * pairs);
    let mut acc = [_mm_setzero_ps(); 4];
    let offset = _mm_setr_epi32(0, 0, 4, 4);
    let step = |p: usize, acc: __m128| -> __m128 {
        let k = 4 * p;
        // SAFETY (loads): 8·p + 8 ≤ 8·pairs ≤ cols, and k + 4 ≤ 4·pairs ≤ the asserted lengths.
        let x8 = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * p)) };
        let packed = unsafe { (pos.as_ptr().add(k) as *const u32).read_unaligned() };
        let idx = _mm_add_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(packed as i32)), offset);
        // Only the low four lanes of the permutation are used; the high indices don't matter.
        let picked = _mm256_permutevar8x32_ps(x8, _mm256_castsi128_si256(idx));
        let v = unsafe { _mm_loadu_ps(vals.as_ptr().add(k)) };
        _mm_fmadd_ps(_mm256_castps256_ps128(picked), v, acc)
    };
    let quads = pairs / 4;
    for q in 0..quads {
        // Four independent accumulators keep four permutes and FMAs in flight.
        for (j, a) in acc.iter_mut().enumerate() {
            *a = step(4 * q + j, *a);
        }
    }
    for p in 4 * quads..pairs {
        acc[0] = step(p, acc[0]);
    }
    let total = _mm_add_ps(_mm_add_ps(acc[0], acc[1]), _mm_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 4];
    unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), total) };
    let mut s: f32 = lanes.iter().sum();
    // The groups after the last full pair (at most one full group and a short one).
    let done = 4 * pairs;
    if done < vals.len() {
        s += nm_row(&vals[done..], &pos[done..], &x[8 * pairs..], 2, 4);
    }
    s
}

/// The dense layer without the rows `keep` drops: a structurally smaller layer.
pub fn remove_rows(d: &Dense, keep: &[bool]) -> Dense {
    let mut w = Vec::new();
    let mut rows = 0;
    for (r, k) in keep.iter().enumerate().take(d.rows) {
        if *k {
            w.extend_from_slice(&d.w[r * d.cols..(r + 1) * d.cols]);
            rows += 1;
        }
    }
    Dense {
        rows,
        cols: d.cols,
        w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;

    fn random(rows: usize, cols: usize, seed: u64, zero_frac: f64) -> Dense {
        let mut rng = SplitMix64::new(seed);
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
