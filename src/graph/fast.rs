//! Inference of a [`Graph`] with prunescope's own CPU kernels: channels-last activations,
//! convolution as one im2col + GEMM over the whole batch, BatchNorm as a per-channel affine
//! map. candle's convolution runs one small GEMM per image (11 ms for a 16→16 3×3 layer on 360
//! digits where this takes well under one), so the interactive path uses this engine for the
//! graphs it covers; candle stays the engine for training, and the reference in tests.

use rayon::prelude::*;

use super::{Graph, GraphError, Op};

thread_local! {
    /// Freed activation buffers and the im2col scratch, reused by the next run on this thread:
    /// fresh multi-megabyte buffers cost more in page faults than the arithmetic on them.
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Set while [`forward_serial`] runs: every loop and product stays on this thread.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f(i, chunk)` for every `size`-long chunk of `data`: across the pool, or on this thread
/// inside [`forward_serial`].
fn chunks_each<T: Send>(data: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if SERIAL.get() {
        data.chunks_mut(size.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(size.max(1))
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// A buffer of `len` floats for an output that is written whole, recycled where one is free
/// (the smallest that fits, so that a small value does not take a large buffer a later large
/// one needed). A recycled one keeps what it held: a megabyte memset costs as much as a small
/// layer.
pub(crate) fn scratch(len: usize) -> Vec<f32> {
    let recycled = POOL.with_borrow_mut(|p| {
        let i = (0..p.len())
            .filter(|&i| p[i].capacity() >= len)
            .min_by_key(|&i| p[i].capacity())?;
        Some(p.swap_remove(i))
    });
    match recycled {
        Some(mut b) => {
            b.truncate(len);
            b.resize(len, 0.0);
            b
        }
        None => vec![0f32; len],
    }
}

pub(crate) fn recycle(b: Vec<f32>) {
    // Buffers past 64 MB go back to the allocator: a pool of sixteen on every thread of a
    // parallel sweep must not hold gigabytes.
    if b.capacity() > 16 << 20 {
        return;
    }
    POOL.with_borrow_mut(|p| {
        if p.len() < 16 {
            p.push(b);
        }
    });
}

/// An activation: logical shape `[N, …]` as PyTorch sees it; 4-D ones are stored channels-last
/// (`[N, H, W, C]`), the rest row-major in logical order.
#[derive(Clone, Debug)]
struct Act {
    shape: Vec<usize>,
    data: Vec<f32>,
    /// A flattened image kept channels-last: logical shape `[N, C·H·W]`, each sample stored
    /// `(h, w, c)`. A Linear reading it permutes its (smaller) weight instead of the batch.
    chw: Option<[usize; 3]>,
}

impl Act {
    fn nhwc(&self) -> bool {
        self.shape.len() == 4
    }

    /// The data in logical (NCHW) order.
    fn logical(&self) -> Vec<f32> {
        let [c, h, w] = match self.chw {
            Some(chw) => chw,
            None if self.nhwc() => [self.shape[1], self.shape[2], self.shape[3]],
            None => [1, 1, 1],
        };
        // One channel (or not an image): channels-last is logical order already.
        if c == 1 {
            let mut out = scratch(self.data.len());
            out.copy_from_slice(&self.data);
            return out;
        }
        let mut out = scratch(self.data.len());
        chunks_each(&mut out, c * h * w, |b, dst| {
            let src = &self.data[b * h * w * c..(b + 1) * h * w * c];
            for p in 0..h * w {
                for ch in 0..c {
                    dst[ch * h * w + p] = src[p * c + ch];
                }
            }
        });
        out
    }

    /// An activation from logical-order data.
    fn from_logical(shape: Vec<usize>, data: Vec<f32>) -> Act {
        if shape.len() != 4 || shape[1] == 1 {
            return Act {
                shape,
                data,
                chw: None,
            };
        }
        let [n, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
        let mut out = scratch(data.len());
        chunks_each(&mut out, c * h * w, |b, dst| {
            let src = &data[b * c * h * w..(b + 1) * c * h * w];
            for ch in 0..c {
                for p in 0..h * w {
                    dst[p * c + ch] = src[ch * h * w + p];
                }
            }
        });
        debug_assert_eq!(out.len(), n * c * h * w);
        recycle(data);
        Act {
            shape,
            data: out,
            chw: None,
        }
    }

    /// This value in logical order, unless it already is.
    fn into_logical(self) -> Act {
        if self.chw.is_none() {
            return self;
        }
        let data = self.logical();
        recycle(self.data);
        Act {
            shape: self.shape,
            data,
            chw: None,
        }
    }
}

/// `c[m×n] = a[m×k] · b` where b is given by its strides (row stride along k, column stride
/// along n); c is written at `c_off` with row stride `c_rs`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_off: usize,
    c_rs: usize,
) {
    matmul_threads(m, n, k, a, b, b_rs, b_cs, c, c_off, c_rs, true)
}

/// [`matmul`] on the calling thread only (training steps of tiny models).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_off: usize,
    c_rs: usize,
) {
    matmul_threads(m, n, k, a, b, b_rs, b_cs, c, c_off, c_rs, false)
}

#[allow(clippy::too_many_arguments)]
fn matmul_threads(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_off: usize,
    c_rs: usize,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= m * k, "lhs too short");
    assert!(
        k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "rhs too short"
    );
    assert!(c.len() >= c_off + (m - 1) * c_rs + n, "dst too short");
    if k == 0 {
        for r in 0..m {
            c[c_off + r * c_rs..c_off + r * c_rs + n].fill(0.0);
        }
        return;
    }
    // Already on a pool thread (points of a sensitivity sweep run side by side): one thread
    // per product, since splitting it again only adds synchronisation.
    let threads = if !parallel || SERIAL.get() || rayon::current_thread_index().is_some() {
        1
    } else {
        rayon::current_num_threads()
    };
    let par = if m * n * k >= 1 << 16 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index gemm reads or writes: a is m×k row-major,
    // b reaches (k−1)·b_rs + (n−1)·b_cs, c reaches c_off + (m−1)·c_rs + n − 1.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(c_off),
            1,
            c_rs as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// The weights by name, as plain f32 vectors with their shapes.
pub type FastParams = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Whether every op of the graph has a kernel here.
pub fn supports(graph: &Graph) -> bool {
    graph
        .nodes
        .iter()
        .all(|n| !matches!(n.op, Op::Concat { .. } | Op::MatMul))
}

/// BatchNorm at inference as `y = scale·x + shift`, per channel.
fn bn_affine(g: &[f32], b: &[f32], m: &[f32], v: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = g
        .iter()
        .zip(v)
        .map(|(g, v)| g / (v + eps as f32).sqrt())
        .collect();
    let shift = b
        .iter()
        .zip(m)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

/// Most floats an im2col buffer may take before the batch is split (64 MB).
const PATCH_BUDGET: usize = 16 << 20;

/// One output row of a direct convolution (channels-last, on an image whose zero border is
/// written out, so that no tap needs a bounds test) with `O` output channels, `P` pixels at a
/// time: their outputs accumulate in a local array the compiler keeps in vector registers, and
/// each weight load feeds `P` multiply-adds. The weight rows are laid out `[(i, j, c)][o]`.
macro_rules! direct_row {
    ($name:ident, $fma:ident $(, $attr:meta)?) => {
        $(#[$attr])?
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const O: usize, const P: usize>(
            row: &mut [f32],
            img: &[f32],
            wt: &[f32],
            bias: Option<&[f32]>,
            y: usize,
            dims: [usize; 6],
            stride: [usize; 2],
            dil: [usize; 2],
            relu: bool,
        ) {
            let [_, wd, c, kh, kw, ow] = dims;
            let step = stride[1] * c;
            let mut xo = 0;
            while xo < ow {
                // P pixels where P fit, then one at a time.
                let block = if xo + P <= ow { P } else { 1 };
                let mut acc = [[0f32; O]; P];
                if let Some(b) = bias {
                    for a in acc.iter_mut().take(block) {
                        a.copy_from_slice(&b[..O]);
                    }
                }
                for i in 0..kh {
                    let line = &img[(y * stride[0] + i * dil[0]) * wd * c..][..wd * c];
                    for j in 0..kw {
                        let x0 = (xo * stride[1] + j * dil[1]) * c;
                        let wrows = &wt[(i * kw + j) * c * O..][..c * O];
                        if block == P {
                            // Every read below lies inside `line` (the border is written out):
                            // checked once here rather than at each of the c·P loads.
                            assert!(x0 + (P - 1) * step + c <= line.len());
                            for (ci, wr) in wrows.chunks_exact(O).enumerate() {
                                let mut a = [0f32; P];
                                for p in 0..P {
                                    // SAFETY: ci < c, so x0 + p·step + ci < x0 + (P − 1)·step + c,
                                    // which the assert above bounds by line.len().
                                    a[p] = unsafe { *line.get_unchecked(x0 + p * step + ci) };
                                }
                                for k in 0..O {
                                    let w = wr[k];
                                    for p in 0..P {
                                        acc[p][k] = $fma!(a[p], w, acc[p][k]);
                                    }
                                }
                            }
                        } else {
                            for (ci, wr) in wrows.chunks_exact(O).enumerate() {
                                let a = line[x0 + ci];
                                for k in 0..O {
                                    acc[0][k] = $fma!(a, wr[k], acc[0][k]);
                                }
                            }
                        }
                    }
                }
                for (p, a) in acc.iter().take(block).enumerate() {
                    let dst = &mut row[(xo + p) * O..(xo + p + 1) * O];
                    for (d, &v) in dst.iter_mut().zip(a) {
                        *d = if relu { v.max(0.0) } else { v };
                    }
                }
                xo += block;
            }
        }
    };
}

// Macros, not closures: a closure is a function of its own, compiled without the kernel's
// target features, so `mul_add` there became a call to the C library's fmaf per multiply-add.
macro_rules! plain_madd {
    ($a:expr, $w:expr, $s:expr) => {{
        let product = $a * $w;
        $s + product
    }};
}
#[cfg(target_arch = "x86_64")]
macro_rules! fused_madd {
    ($a:expr, $w:expr, $s:expr) => {
        $a.mul_add($w, $s)
    };
}

direct_row!(direct_row_generic, plain_madd);
#[cfg(target_arch = "x86_64")]
direct_row!(
    direct_row_avx2,
    fused_madd,
    target_feature(enable = "avx2,fma")
);
// The same body where the CPU has AVX-512: 32 vector registers of 16 floats, so 32 output
// channels of four pixels are eight registers, not sixteen spilling ones.
#[cfg(target_arch = "x86_64")]
direct_row!(
    direct_row_avx512,
    fused_madd,
    target_feature(enable = "avx512f,avx2,fma")
);

fn direct_rows<const O: usize, const P: usize>(
    out: &mut [f32],
    x: &Act,
    wk: &[f32],
    bias: Option<&[f32]>,
    g: &Geometry,
    isa: Isa,
    relu: bool,
) {
    let [n, c, h0, w0] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let [oh, ow] = g.out_hw;
    let (k, stride, pad, dil) = (g.kernel, g.stride, g.pad, g.dil);
    // The images with their zero border written out: every tap then reads inside the image.
    let (h, wd) = (h0 + 2 * pad[0], w0 + 2 * pad[1]);
    let padded = (pad != [0, 0]).then(|| {
        let mut p = scratch(n * h * wd * c);
        chunks_each(&mut p, h * wd * c, |b, dst| {
            let src = &x.data[b * h0 * w0 * c..(b + 1) * h0 * w0 * c];
            // Top and bottom border rows, then each line's left and right border with the
            // line between them: every float written once.
            dst[..pad[0] * wd * c].fill(0.0);
            dst[(pad[0] + h0) * wd * c..].fill(0.0);
            for (y, line) in src.chunks_exact(w0 * c).enumerate() {
                let row = &mut dst[(y + pad[0]) * wd * c..(y + pad[0] + 1) * wd * c];
                let (left, rest) = row.split_at_mut(pad[1] * c);
                let (mid, right) = rest.split_at_mut(w0 * c);
                left.fill(0.0);
                mid.copy_from_slice(line);
                right.fill(0.0);
            }
        });
        p
    });
    let data = padded.as_deref().unwrap_or(&x.data);
    chunks_each(out, ow * O, |r, row| {
        let (b, y) = (r / oh, r % oh);
        let img = &data[b * h * wd * c..(b + 1) * h * wd * c];
        let dims = [h, wd, c, k[0], k[1], ow];
        match isa {
            // SAFETY: the CPU has these features (Isa::get checked); the body is safe Rust.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe {
                direct_row_avx512::<O, P>(row, img, wk, bias, y, dims, stride, dil, relu)
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe {
                direct_row_avx2::<O, P>(row, img, wk, bias, y, dims, stride, dil, relu)
            },
            // SAFETY: no target features are assumed; the body is safe Rust.
            _ => unsafe {
                direct_row_generic::<O, P>(row, img, wk, bias, y, dims, stride, dil, relu)
            },
        }
    });
    if let Some(p) = padded {
        recycle(p);
    }
}

/// The widest vector extension the direct kernels can use here (x86-64 only; elsewhere the
/// compiler's own vectorization of the plain body).
#[derive(Clone, Copy, PartialEq)]
enum Isa {
    Avx512,
    Avx2,
    Plain,
}

impl Isa {
    fn get() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx2") && has!("fma") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Plain
    }
}

/// Direct convolution for one group and 8, 16 or 32 output channels: no im2col buffer, a
/// pixel's outputs stay in registers. `None` for other channel counts.
fn conv2d_direct(
    x: &Act,
    wk: &[f32],
    bias: Option<&[f32]>,
    o: usize,
    g: &Geometry,
    relu: bool,
) -> Option<Vec<f32>> {
    let n = x.shape[0];
    let mut out = scratch(n * g.out_hw[0] * g.out_hw[1] * o);
    let isa = Isa::get();
    let a = (x, wk, bias, g, isa, relu);
    // Pixels per step: as many as keep the accumulators in half the vector registers (32 of
    // 16 floats with AVX-512, 16 of 8 without).
    match (o, isa == Isa::Avx512) {
        (8, true) => direct_rows::<8, 16>(&mut out, a.0, a.1, a.2, a.3, a.4, a.5),
        (16, true) => direct_rows::<16, 8>(&mut out, a.0, a.1, a.2, a.3, a.4, a.5),
        (32, true) => direct_rows::<32, 4>(&mut out, a.0, a.1, a.2, a.3, a.4, a.5),
        (8, false) => direct_rows::<8, 8>(&mut out, a.0, a.1, a.2, a.3, a.4, a.5),
        (16, false) => direct_rows::<16, 4>(&mut out, a.0, a.1, a.2, a.3, a.4, a.5),
        (32, false) => direct_rows::<32, 2>(&mut out, a.0, a.1, a.2, a.3, a.4, a.5),
        _ => {
            recycle(out);
            return None;
        }
    }
    Some(out)
}

/// `PRUNESCOPE_NO_DIRECT=1` (im2col + GEMM for every convolution) and `PRUNESCOPE_PROFILE=1`
/// (time per node on stderr), read once rather than on every convolution.
pub(crate) fn env_flag(cell: &'static std::sync::OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}
static NO_DIRECT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
pub(crate) static PROFILE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Where a convolution's taps fall.
struct Geometry {
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
    out_hw: [usize; 2],
}

/// im2col for image `b` of channels-last `x`: for every output pixel, its taps `(i, j)` each
/// with channels `c0..c0 + cg` (zeros where a tap falls in the padding), into `dst`.
fn gather_patches(x: &Act, b: usize, c0: usize, cg: usize, g: &Geometry, dst: &mut [f32]) {
    let [c, h, wd] = [x.shape[1], x.shape[2], x.shape[3]];
    let ([kh, kw], [oh, ow]) = (g.kernel, g.out_hw);
    let k = kh * kw * cg;
    let img = &x.data[b * h * wd * c..(b + 1) * h * wd * c];
    for y in 0..oh {
        for xo in 0..ow {
            let row = &mut dst[(y * ow + xo) * k..(y * ow + xo + 1) * k];
            for i in 0..kh {
                let iy = (y * g.stride[0] + i * g.dil[0]) as isize - g.pad[0] as isize;
                for j in 0..kw {
                    let ix = (xo * g.stride[1] + j * g.dil[1]) as isize - g.pad[1] as isize;
                    let seg = &mut row[(i * kw + j) * cg..(i * kw + j + 1) * cg];
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                        seg.fill(0.0);
                    } else {
                        let at = (iy as usize * wd + ix as usize) * c + c0;
                        seg.copy_from_slice(&img[at..at + cg]);
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn conv2d(
    x: &Act,
    w: &(Vec<usize>, Vec<f32>),
    bias: Option<&(Vec<usize>, Vec<f32>)>,
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
    groups: usize,
    relu: bool,
) -> Act {
    let [n, h, wd] = [x.shape[0], x.shape[2], x.shape[3]];
    let (ws, wv) = w;
    let [o, cg, kh, kw] = [ws[0], ws[1], ws[2], ws[3]];
    let og = o / groups;
    let oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) / stride[0] + 1;
    let ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) / stride[1] + 1;
    let k = kh * kw * cg;
    // Weights as [group][k = (i, j, c)][o'] for a row-major GEMM.
    let mut wk = vec![0f32; groups * k * og];
    for g in 0..groups {
        for oo in 0..og {
            for ci in 0..cg {
                for i in 0..kh {
                    for j in 0..kw {
                        let src = (((g * og + oo) * cg + ci) * kh + i) * kw + j;
                        let row = (i * kw + j) * cg + ci;
                        wk[(g * k + row) * og + oo] = wv[src];
                    }
                }
            }
        }
    }
    let geometry = Geometry {
        kernel: [kh, kw],
        stride,
        pad,
        dil,
        out_hw: [oh, ow],
    };
    let direct = groups == 1 && !env_flag(&NO_DIRECT, "PRUNESCOPE_NO_DIRECT");
    if direct
        && let Some(data) = conv2d_direct(x, &wk, bias.map(|b| b.1.as_slice()), o, &geometry, relu)
    {
        return Act {
            shape: vec![n, o, oh, ow],
            data,
            chw: None,
        };
    }
    let per_image = oh * ow;
    let mut out = scratch(n * per_image * o);
    let chunk = (PATCH_BUDGET / (per_image * k).max(1)).clamp(1, n.max(1));
    let mut patches = PATCHES.with_borrow_mut(std::mem::take);
    if patches.len() < chunk * per_image * k {
        patches = vec![0f32; chunk * per_image * k];
    }
    for start in (0..n).step_by(chunk) {
        let imgs = chunk.min(n - start);
        for g in 0..groups {
            chunks_each(
                &mut patches[..imgs * per_image * k],
                per_image * k,
                |b, dst| gather_patches(x, start + b, g * cg, cg, &geometry, dst),
            );
            let rows = imgs * per_image;
            matmul(
                rows,
                og,
                k,
                &patches[..rows * k],
                &wk[g * k * og..(g + 1) * k * og],
                og,
                1,
                &mut out,
                start * per_image * o + g * og,
                o,
            );
        }
    }
    PATCHES.with_borrow_mut(|p| *p = patches);
    let zero = vec![0f32; o];
    let b = bias.map_or(&zero, |b| &b.1);
    chunks_each(&mut out, o * 64, |_, block| {
        for px in block.chunks_exact_mut(o) {
            for (v, bb) in px.iter_mut().zip(b) {
                let y = *v + bb;
                *v = if relu { y.max(0.0) } else { y };
            }
        }
    });
    Act {
        shape: vec![n, o, oh, ow],
        data: out,
        chw: None,
    }
}

fn pool(x: &Act, kernel: [usize; 2], stride: [usize; 2], max: bool) -> Act {
    let [n, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let oh = (h - kernel[0]) / stride[0] + 1;
    let ow = (w - kernel[1]) / stride[1] + 1;
    let mut out = scratch(n * oh * ow * c);
    let area = (kernel[0] * kernel[1]) as f32;
    chunks_each(&mut out, oh * ow * c, |b, dst| {
        let img = &x.data[b * h * w * c..(b + 1) * h * w * c];
        for y in 0..oh {
            for xo in 0..ow {
                let cell = &mut dst[(y * ow + xo) * c..(y * ow + xo + 1) * c];
                // Sixteen channels at a time in a local array (a vector register): the taps
                // fold into it without a store between them.
                for (k, part) in cell.chunks_mut(16).enumerate() {
                    let mut acc = [if max { f32::NEG_INFINITY } else { 0.0 }; 16];
                    for i in 0..kernel[0] {
                        for j in 0..kernel[1] {
                            let at = ((y * stride[0] + i) * w + xo * stride[1] + j) * c + k * 16;
                            let src = &img[at..at + part.len()];
                            if max {
                                // NaN propagates, as in candle and PyTorch; a select, not a
                                // branch, so the loop vectorises.
                                for (d, &v) in acc.iter_mut().zip(src) {
                                    let take = v > *d || v.is_nan();
                                    *d = if take { v } else { *d };
                                }
                            } else {
                                for (d, &v) in acc.iter_mut().zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                    for (d, &a) in part.iter_mut().zip(&acc) {
                        *d = if max { a } else { a / area };
                    }
                }
            }
        }
    });
    Act {
        shape: vec![n, c, oh, ow],
        data: out,
        chw: None,
    }
}

/// [`forward`] entirely on the calling thread: for runs so small that waking the pool's
/// threads costs more than they save.
pub fn forward_serial(
    graph: &Graph,
    inputs: &[(Vec<usize>, &[f32])],
    params: &FastParams,
) -> Result<(Vec<usize>, Vec<f32>), GraphError> {
    // Restored on the way out, a panic included (the worker catches those and runs on).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _restore = Restore(SERIAL.replace(true));
    forward(graph, inputs, params)
}

/// Runs the graph in inference mode on batched logical-order inputs; returns the output in
/// logical order with its batched shape.
pub fn forward(
    graph: &Graph,
    inputs: &[(Vec<usize>, &[f32])],
    params: &FastParams,
) -> Result<(Vec<usize>, Vec<f32>), GraphError> {
    let mut values: std::collections::HashMap<&str, Act> = std::collections::HashMap::new();
    for (spec, (shape, data)) in graph.inputs.iter().zip(inputs) {
        values.insert(&spec.name, Act::from_logical(shape.clone(), data.to_vec()));
    }
    let profile = env_flag(&PROFILE, "PRUNESCOPE_PROFILE");
    // Uses left of each value: an op that is a value's last reader may overwrite it in place.
    let mut uses: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for n in &graph.nodes {
        for i in &n.inputs {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    *uses.entry(graph.output.as_str()).or_default() += 1;
    // Nodes already run as part of an earlier one (a BatchNorm folded into its convolution, a
    // ReLU applied in the same pass).
    let mut skip = 0;
    for (k, n) in graph.nodes.iter().enumerate() {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        for i in &n.inputs {
            if let Some(u) = uses.get_mut(i.as_str()) {
                *u -= 1;
            }
        }
        // A BatchNorm that is the only reader of a convolution's output is folded into its
        // weights and bias (inference: a fixed per-channel affine map).
        let folded_bn = graph.nodes.get(k + 1).filter(|next| {
            matches!(n.op, Op::Conv2d { .. })
                && matches!(next.op, Op::BatchNorm { .. })
                && next.inputs[0] == n.output
                && uses.get(n.output.as_str()).copied() == Some(1)
        });
        let tail = folded_bn.unwrap_or(n);
        // A ReLU that is the only reader of this step's output runs in the same pass.
        let fused_relu = graph
            .nodes
            .get(k + 1 + folded_bn.is_some() as usize)
            .filter(|next| {
                matches!(next.op, Op::Relu)
                    && next.inputs[0] == tail.output
                    && uses.get(tail.output.as_str()).copied() == Some(1)
                    && matches!(
                        tail.op,
                        Op::BatchNorm { .. } | Op::Add | Op::Conv2d { .. } | Op::Linear { .. }
                    )
            });
        let last_use = |v: &str, uses: &std::collections::HashMap<&str, usize>| {
            uses.get(v).copied() == Some(0)
        };
        // The first input, owned: moved out when this node is its last reader, else copied.
        let owned_first = |values: &mut std::collections::HashMap<&str, Act>| -> Option<Act> {
            if last_use(&n.inputs[0], &uses)
                && n.inputs.iter().filter(|i| **i == n.inputs[0]).count() == 1
            {
                values.remove(n.inputs[0].as_str())
            } else {
                values.get(n.inputs[0].as_str()).map(|a| {
                    let mut data = scratch(a.data.len());
                    data.copy_from_slice(&a.data);
                    Act {
                        shape: a.shape.clone(),
                        data,
                        chw: a.chw,
                    }
                })
            }
        };
        let t0 = std::time::Instant::now();
        let err = |msg: &str| GraphError::Node {
            node: n.name.clone(),
            msg: msg.into(),
        };
        let p = |name: &str| {
            params.get(name).ok_or_else(|| GraphError::Tensor {
                node: n.name.clone(),
                tensor: name.into(),
                msg: "no value given".into(),
            })
        };
        let x = values
            .get(n.inputs[0].as_str())
            .ok_or_else(|| err("an input has no value"))?;
        let out = match &n.op {
            Op::Conv2d {
                weight,
                bias,
                stride,
                padding,
                dilation,
                groups,
            } => {
                if !x.nhwc() {
                    return Err(err("convolution of a non-image value"));
                }
                let b = bias.as_deref().map(p).transpose()?;
                let relu = fused_relu.is_some();
                let folded = match folded_bn.map(|bn| &bn.op) {
                    Some(Op::BatchNorm {
                        weight: g,
                        bias: beta,
                        running_mean,
                        running_var,
                        eps,
                        ..
                    }) => {
                        let (scale, shift) = bn_affine(
                            &p(g)?.1,
                            &p(beta)?.1,
                            &p(running_mean)?.1,
                            &p(running_var)?.1,
                            *eps,
                        );
                        let (ws, wv) = p(weight)?;
                        let per = wv.len() / scale.len().max(1);
                        let w: Vec<f32> = wv
                            .chunks(per.max(1))
                            .zip(&scale)
                            .flat_map(|(row, &s)| row.iter().map(move |v| v * s))
                            .collect();
                        // BN(conv + b) = s·conv + (s·b + t).
                        let bias: Vec<f32> = (0..scale.len())
                            .map(|o| b.map_or(0.0, |b| b.1[o]) * scale[o] + shift[o])
                            .collect();
                        Some(((ws.clone(), w), (vec![bias.len()], bias)))
                    }
                    _ => None,
                };
                match &folded {
                    Some((w, b)) => {
                        conv2d(x, w, Some(b), *stride, *padding, *dilation, *groups, relu)
                    }
                    None => conv2d(
                        x,
                        p(weight)?,
                        b,
                        *stride,
                        *padding,
                        *dilation,
                        *groups,
                        relu,
                    ),
                }
            }
            Op::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                eps,
                ..
            } => {
                // Channels are the last stored dimension for 4-D (channels-last) and 2-D values.
                if !(x.nhwc() || x.shape.len() == 2) {
                    return Err(err("batch norm of a value that is neither [N, C] nor 4-D"));
                }
                let (g, b, m, v) = (
                    &p(weight)?.1,
                    &p(bias)?.1,
                    &p(running_mean)?.1,
                    &p(running_var)?.1,
                );
                let (scale, shift) = bn_affine(g, b, m, v, *eps);
                let c = scale.len();
                let relu = fused_relu.is_some();
                let mut a = owned_first(&mut values)
                    .ok_or_else(|| err("an input has no value"))?
                    .into_logical();
                chunks_each(&mut a.data, c * 256, |_, block| {
                    for px in block.chunks_exact_mut(c) {
                        for ((v, s), t) in px.iter_mut().zip(&scale).zip(&shift) {
                            let y = *v * s + t;
                            *v = if relu { y.max(0.0) } else { y };
                        }
                    }
                });
                a
            }
            Op::Linear { weight, bias } => {
                let (ws, wv) = p(weight)?;
                let (out_f, in_f) = (ws[0], ws[1]);
                let rows = x.data.len() / in_f.max(1);
                // A flattened image stays channels-last when the weight is the smaller one to
                // reorder: its columns follow the activation's (h, w, c) order instead.
                let permuted: Option<Vec<f32>> = match x.chw {
                    Some([c, h, w]) if out_f < rows && c * h * w == in_f => {
                        let hw = h * w;
                        let mut pw = vec![0f32; wv.len()];
                        for (dst, src) in pw.chunks_exact_mut(in_f).zip(wv.chunks_exact(in_f)) {
                            for p in 0..hw {
                                for ch in 0..c {
                                    dst[p * c + ch] = src[ch * hw + p];
                                }
                            }
                        }
                        Some(pw)
                    }
                    _ => None,
                };
                let logical = match (&permuted, x.chw.is_some() || x.nhwc()) {
                    (None, true) => std::borrow::Cow::Owned(x.logical()),
                    _ => std::borrow::Cow::Borrowed(x.data.as_slice()),
                };
                let wv = permuted.as_deref().unwrap_or(wv);
                let mut out = scratch(rows * out_f);
                // Wᵀ without a copy: element (k, j) of Wᵀ is W[j][k].
                matmul(rows, out_f, in_f, &logical, wv, 1, in_f, &mut out, 0, out_f);
                if let std::borrow::Cow::Owned(v) = logical {
                    recycle(v);
                }
                let relu = fused_relu.is_some();
                let b = bias.as_deref().map(p).transpose()?.map(|b| b.1.as_slice());
                if b.is_some() || relu {
                    chunks_each(&mut out, out_f * 64, |_, rows| {
                        for r in rows.chunks_exact_mut(out_f) {
                            if let Some(b) = b {
                                for (v, bb) in r.iter_mut().zip(b) {
                                    *v += bb;
                                }
                            }
                            if relu {
                                r.iter_mut().for_each(|v| *v = v.max(0.0));
                            }
                        }
                    });
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().expect("rank ≥ 1") = out_f;
                Act::from_logical(shape, out)
            }
            Op::LayerNorm { weight, bias, eps } => {
                let mut data = x.logical();
                let g = &p(weight)?.1;
                let b = bias.as_deref().map(p).transpose()?.map(|t| &t.1);
                let d = *x.shape.last().expect("rank ≥ 1");
                chunks_each(&mut data, d, |_, r| {
                    let mean = r.iter().sum::<f32>() / d as f32;
                    let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                    let inv = 1.0 / (var + *eps as f32).sqrt();
                    for i in 0..d {
                        r[i] = (r[i] - mean) * inv * g[i] + b.map_or(0.0, |b| b[i]);
                    }
                });
                Act::from_logical(x.shape.clone(), data)
            }
            Op::Softmax => {
                let mut data = x.logical();
                let d = *x.shape.last().expect("rank ≥ 1");
                chunks_each(&mut data, d, |_, r| {
                    let max = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for v in r.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    r.iter_mut().for_each(|v| *v /= sum);
                });
                Act::from_logical(x.shape.clone(), data)
            }
            Op::Relu | Op::Gelu | Op::Tanh | Op::Sigmoid => {
                let mut a = owned_first(&mut values).ok_or_else(|| err("an input has no value"))?;
                // One loop per function, not a call through a pointer per element.
                let op = &n.op;
                chunks_each(&mut a.data, 4096, |_, b| match op {
                    Op::Relu => b.iter_mut().for_each(|v| *v = v.max(0.0)),
                    Op::Gelu => b.iter_mut().for_each(|v| {
                        *v = 0.5
                            * *v
                            * (1.0 + libm::erf(*v as f64 / std::f64::consts::SQRT_2) as f32)
                    }),
                    Op::Tanh => b.iter_mut().for_each(|v| *v = v.tanh()),
                    _ => b.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
                });
                a
            }
            Op::Dropout { .. } => {
                owned_first(&mut values).ok_or_else(|| err("an input has no value"))?
            }
            Op::MaxPool { kernel, stride } | Op::AvgPool { kernel, stride } => {
                if !x.nhwc() {
                    return Err(err("pooling of a non-image value"));
                }
                pool(x, *kernel, *stride, matches!(n.op, Op::MaxPool { .. }))
            }
            Op::GlobalAvgPool { keep_dims } => {
                if !x.nhwc() {
                    return Err(err("pooling of a non-image value"));
                }
                let [b, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
                let mut data = vec![0f32; b * c];
                chunks_each(&mut data, c, |i, dst| {
                    for px in x.data[i * h * w * c..(i + 1) * h * w * c].chunks(c) {
                        for (d, v) in dst.iter_mut().zip(px) {
                            *d += v;
                        }
                    }
                    dst.iter_mut().for_each(|v| *v /= (h * w) as f32);
                });
                // [N, C, 1, 1] channels-last is the same data as [N, C].
                let shape = if *keep_dims {
                    vec![b, c, 1, 1]
                } else {
                    vec![b, c]
                };
                Act {
                    shape,
                    data,
                    chw: None,
                }
            }
            Op::Flatten => {
                let rest: usize = x.shape[1..].iter().product();
                let chw = match (x.nhwc(), x.chw) {
                    (true, _) => Some([x.shape[1], x.shape[2], x.shape[3]]),
                    (false, kept) => kept,
                };
                let a = owned_first(&mut values).ok_or_else(|| err("an input has no value"))?;
                Act {
                    shape: vec![a.shape[0], rest],
                    data: a.data,
                    chw,
                }
            }
            Op::Reshape { shape } => {
                let mut s = vec![x.shape[0]];
                s.extend(shape);
                Act::from_logical(s, x.logical())
            }
            Op::Add => {
                let y = values
                    .get(n.inputs[1].as_str())
                    .ok_or_else(|| err("an input has no value"))?;
                if y.shape != x.shape {
                    return Err(err("adds values of different shapes"));
                }
                // Both in one layout: a flattened image in logical order too.
                let y_data = if y.chw.is_some() {
                    y.logical()
                } else {
                    let mut d = scratch(y.data.len());
                    d.copy_from_slice(&y.data);
                    d
                };
                let relu = fused_relu.is_some();
                let mut a = owned_first(&mut values)
                    .ok_or_else(|| err("an input has no value"))?
                    .into_logical();
                chunks_each(&mut a.data, 4096, |i, a| {
                    let b = &y_data[i * 4096..(i * 4096 + a.len())];
                    for (x, y) in a.iter_mut().zip(b) {
                        let s = *x + y;
                        *x = if relu { s.max(0.0) } else { s };
                    }
                });
                recycle(y_data);
                a
            }
            Op::Concat { .. } | Op::MatMul => {
                return Err(err("no fast kernel for this op; use candle"));
            }
        };
        for i in &n.inputs {
            if last_use(i, &uses)
                && let Some(a) = values.remove(i.as_str())
            {
                recycle(a.data);
            }
        }
        if profile {
            eprintln!(
                "{:<24} {:>8.3} ms",
                n.name,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        // The value goes under the name of the last node this step ran; the nodes it ran
        // along the way have read their input.
        let mut last = n;
        for next in folded_bn.into_iter().chain(fused_relu) {
            if let Some(u) = uses.get_mut(next.inputs[0].as_str()) {
                *u -= 1;
            }
            last = next;
            skip += 1;
        }
        values.insert(&last.output, out);
    }
    let out = values
        .remove(graph.output.as_str())
        .ok_or_else(|| GraphError::Json(format!("the output '{}' is never made", graph.output)))?;
    Ok((out.shape.clone(), out.logical()))
}
