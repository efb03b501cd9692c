//! The kernels of prunescope's ONNX interpreter ([`super::onnx_native`]): values, numpy
//! broadcasting, and the operators that transformer encoders exported from PyTorch use.
//!
//! Every size is checked before it is allocated and every index before it is read, so a hostile
//! graph gets a message, never a panic or an absurd allocation.

use std::sync::Arc;

use rayon::prelude::*;

/// Most elements one value may hold (a gigabyte of floats): more is a hostile or broken graph.
pub(crate) const MAX_ELEMENTS: usize = 1 << 28;

/// Elements below which a loop stays on the calling thread: waking the pool costs more.
const PAR_MIN: usize = 1 << 15;

pub(crate) type R<T> = Result<T, String>;

/// An element type of [`Val`]. Float buffers come from the pool that prunescope's kernels
/// share, and go back to it when a value is dropped: a transformer's activations are megabytes
/// each, and fresh ones cost more in page faults than the arithmetic on them.
pub(crate) trait Elem: Copy + Default + Send + Sync + 'static {
    /// `n` elements for an output the caller writes whole (a recycled buffer is not cleared).
    fn alloc(n: usize) -> Vec<Self> {
        vec![Self::default(); n]
    }
}

impl Elem for f32 {
    fn alloc(n: usize) -> Vec<f32> {
        crate::graph::fast::scratch(n)
    }
}
impl Elem for i64 {}
impl Elem for bool {}

/// A tensor: float, integer (int32 and int64 both held as i64) or boolean, row-major. The data
/// is shared, so that Reshape, Unsqueeze and their kind cost no copy.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    F(Vec<usize>, Arc<Vec<f32>>),
    I(Vec<usize>, Arc<Vec<i64>>),
    B(Vec<usize>, Arc<Vec<bool>>),
}

impl Val {
    pub fn f(shape: Vec<usize>, v: Vec<f32>) -> Val {
        Val::F(shape, Arc::new(v))
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Val::F(s, _) | Val::I(s, _) | Val::B(s, _) => s,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Val::F(..) => "float",
            Val::I(..) => "integer",
            Val::B(..) => "bool",
        }
    }

    /// The same data under another shape of as many elements.
    pub fn reshaped(&self, shape: Vec<usize>) -> R<Val> {
        let n = checked_numel(&shape)?;
        if n != numel(self.shape()) {
            return Err(format!(
                "cannot reshape {:?} ({} values) to {shape:?} ({n})",
                self.shape(),
                numel(self.shape())
            ));
        }
        Ok(match self {
            Val::F(_, d) => Val::F(shape, d.clone()),
            Val::I(_, d) => Val::I(shape, d.clone()),
            Val::B(_, d) => Val::B(shape, d.clone()),
        })
    }

    pub fn floats(&self) -> R<(&[usize], &[f32])> {
        match self {
            Val::F(s, d) => Ok((s, d)),
            v => Err(format!(
                "expected a float tensor, got {} {:?}",
                v.kind(),
                v.shape()
            )),
        }
    }

    /// The values of a small integer tensor (shapes, axes, indices).
    pub fn ints(&self) -> R<Vec<i64>> {
        match self {
            Val::I(_, d) => Ok(d.to_vec()),
            v => Err(format!(
                "expected an integer tensor, got {} {:?}",
                v.kind(),
                v.shape()
            )),
        }
    }

    /// The one value of a single-element float or integer tensor, as f64.
    pub fn scalar(&self) -> R<f64> {
        if numel(self.shape()) != 1 {
            return Err(format!("expected one value, got shape {:?}", self.shape()));
        }
        Ok(match self {
            Val::F(_, d) => d[0] as f64,
            Val::I(_, d) => d[0] as f64,
            Val::B(_, d) => d[0] as u8 as f64,
        })
    }
}

pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The element count of `shape`, refused when it overflows or passes [`MAX_ELEMENTS`].
pub(crate) fn checked_numel(shape: &[usize]) -> R<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("shape {shape:?} is too large"))
}

/// An axis attribute (negative counts from the end) checked against a rank.
pub(crate) fn axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    if a < -r || a >= r {
        return Err(format!("axis {a} is out of range for rank {rank}"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

/// Runs `f(first_row, rows)` over groups of whole rows of `out` (rows `inner` long), across
/// the pool when `out` is large.
fn rows_each<T: Send>(out: &mut [T], inner: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let inner = inner.max(1);
    let group = inner * (4096 / inner).max(1);
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(group)
            .enumerate()
            .for_each(|(g, c)| f(g * group / inner, c));
    } else {
        out.chunks_mut(group)
            .enumerate()
            .for_each(|(g, c)| f(g * group / inner, c));
    }
}

/// Numpy broadcasting of several shapes: the output shape and each operand's strides along
/// the output's axes (0 where it is broadcast).
pub(crate) struct Bcast {
    pub shape: Vec<usize>,
    strides: Vec<Vec<usize>>,
}

impl Bcast {
    pub fn new(shapes: &[&[usize]]) -> R<Bcast> {
        let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut shape = vec![1usize; rank];
        for s in shapes {
            for (k, &d) in s.iter().rev().enumerate() {
                let o = &mut shape[rank - 1 - k];
                if *o == 1 {
                    *o = d;
                } else if d != 1 && d != *o {
                    return Err(format!("shapes {shapes:?} do not broadcast"));
                }
            }
        }
        checked_numel(&shape)?;
        let strides = shapes
            .iter()
            .map(|s| {
                let mut st = vec![0usize; rank];
                let mut acc = 1;
                for (k, &d) in s.iter().enumerate().rev() {
                    let ax = rank - s.len() + k;
                    if d != 1 {
                        st[ax] = acc;
                    }
                    acc *= d;
                }
                st
            })
            .collect();
        Ok(Bcast { shape, strides })
    }

    fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Length of an output row (the last axis; 1 for a scalar).
    fn inner(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Operand `k`'s offset at the start of output row `row`.
    fn base(&self, k: usize, mut row: usize) -> usize {
        let rank = self.shape.len();
        let mut off = 0;
        for ax in (0..rank.saturating_sub(1)).rev() {
            let d = self.shape[ax];
            off += (row % d) * self.strides[k][ax];
            row /= d;
        }
        off
    }

    /// Operand `k`'s stride along the last axis (0 or 1).
    fn step(&self, k: usize) -> usize {
        self.strides[k].last().copied().unwrap_or(0)
    }
}

/// `f(a, b)` elementwise with broadcasting.
pub(crate) fn zip_map<A, B, O>(
    sa: &[usize],
    a: &[A],
    sb: &[usize],
    b: &[B],
    f: impl Fn(A, B) -> O + Sync + Send,
) -> R<(Vec<usize>, Vec<O>)>
where
    A: Copy + Sync,
    B: Copy + Sync,
    O: Elem,
{
    let bc = Bcast::new(&[sa, sb])?;
    let mut out = O::alloc(bc.numel());
    let inner = bc.inner();
    let (ea, eb) = (bc.step(0), bc.step(1));
    rows_each(&mut out, inner, |first, chunk| {
        for (r, dst) in chunk.chunks_mut(inner).enumerate() {
            let (ba, bb) = (bc.base(0, first + r), bc.base(1, first + r));
            match (ea, eb) {
                (1, 1) => {
                    for ((d, &x), &y) in dst.iter_mut().zip(&a[ba..ba + inner]).zip(&b[bb..]) {
                        *d = f(x, y);
                    }
                }
                (1, _) => {
                    let y = b[bb];
                    for (d, &x) in dst.iter_mut().zip(&a[ba..ba + inner]) {
                        *d = f(x, y);
                    }
                }
                (_, 1) => {
                    let x = a[ba];
                    for (d, &y) in dst.iter_mut().zip(&b[bb..bb + inner]) {
                        *d = f(x, y);
                    }
                }
                _ => dst.fill(f(a[ba], b[bb])),
            }
        }
    });
    Ok((bc.shape, out))
}

/// `Where(cond, x, y)` with broadcasting.
pub(crate) fn select<T: Elem>(
    sc: &[usize],
    c: &[bool],
    sx: &[usize],
    x: &[T],
    sy: &[usize],
    y: &[T],
) -> R<(Vec<usize>, Vec<T>)> {
    let bc = Bcast::new(&[sc, sx, sy])?;
    let mut out = T::alloc(bc.numel());
    let inner = bc.inner();
    let steps = [bc.step(0), bc.step(1), bc.step(2)];
    rows_each(&mut out, inner, |first, chunk| {
        for (r, dst) in chunk.chunks_mut(inner).enumerate() {
            let b = [0, 1, 2].map(|k| bc.base(k, first + r));
            for (j, d) in dst.iter_mut().enumerate() {
                *d = if c[b[0] + j * steps[0]] {
                    x[b[1] + j * steps[1]]
                } else {
                    y[b[2] + j * steps[2]]
                };
            }
        }
    });
    Ok((bc.shape, out))
}

/// `Expand`: `d` broadcast to `to` (numpy rules, both ways).
pub(crate) fn expand<T: Elem>(s: &[usize], d: &[T], to: &[usize]) -> R<(Vec<usize>, Vec<T>)> {
    let bc = Bcast::new(&[s, to])?;
    let mut out = T::alloc(bc.numel());
    let inner = bc.inner();
    let e = bc.step(0);
    rows_each(&mut out, inner, |first, chunk| {
        for (r, dst) in chunk.chunks_mut(inner).enumerate() {
            let b = bc.base(0, first + r);
            if e == 1 {
                dst.copy_from_slice(&d[b..b + inner]);
            } else {
                dst.fill(d[b]);
            }
        }
    });
    Ok((bc.shape, out))
}

/// `f` on every element, across the pool when large.
pub(crate) fn map<T: Copy + Sync, O: Elem>(d: &[T], f: impl Fn(T) -> O + Sync + Send) -> Vec<O> {
    let mut out = O::alloc(d.len());
    rows_each(&mut out, 1, |first, chunk| {
        for (o, &x) in chunk.iter_mut().zip(&d[first..]) {
            *o = f(x);
        }
    });
    out
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        st[k] = st[k + 1] * shape[k + 1];
    }
    st
}

/// `Transpose` by `perm`.
pub(crate) fn transpose<T: Elem>(s: &[usize], d: &[T], perm: &[usize]) -> R<(Vec<usize>, Vec<T>)> {
    let mut seen = vec![false; s.len()];
    if perm.len() != s.len()
        || perm
            .iter()
            .any(|&p| p >= s.len() || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!(
            "perm {perm:?} is not a permutation of the {} axes",
            s.len()
        ));
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let st = strides(s);
    let from: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let mut out = T::alloc(d.len());
    if d.is_empty() {
        return Ok((out_shape, out));
    }
    let inner = out_shape.last().copied().unwrap_or(1);
    let last = from.last().copied().unwrap_or(0);
    let rank = out_shape.len();
    rows_each(&mut out, inner, |first, chunk| {
        for (r, dst) in chunk.chunks_mut(inner).enumerate() {
            let mut row = first + r;
            let mut base = 0;
            for ax in (0..rank.saturating_sub(1)).rev() {
                base += (row % out_shape[ax]) * from[ax];
                row /= out_shape[ax];
            }
            if last == 1 {
                // The last axis stays last (heads split or merged): whole rows copy.
                dst.copy_from_slice(&d[base..base + inner]);
            } else {
                for (j, v) in dst.iter_mut().enumerate() {
                    *v = d[base + j * last];
                }
            }
        }
    });
    Ok((out_shape, out))
}

/// `Gather` along `axis` with integer indices (negative ones count from the end).
pub(crate) fn gather<T: Copy>(
    s: &[usize],
    d: &[T],
    ax: i64,
    si: &[usize],
    idx: &[i64],
) -> R<(Vec<usize>, Vec<T>)> {
    let a = axis(ax, s.len())?;
    if s.is_empty() {
        return Err("Gather on a scalar".into());
    }
    let (outer, n, inner) = (numel(&s[..a]), s[a], numel(&s[a + 1..]));
    let mut shape = s[..a].to_vec();
    shape.extend(si);
    shape.extend(&s[a + 1..]);
    let total = checked_numel(&shape)?;
    let mut out = Vec::with_capacity(total);
    for o in 0..outer {
        for &i in idx {
            let k = if i < 0 { i + n as i64 } else { i };
            if k < 0 || k >= n as i64 {
                return Err(format!(
                    "index {i} is out of range for axis {a} of size {n}"
                ));
            }
            let at = (o * n + k as usize) * inner;
            out.extend_from_slice(&d[at..at + inner]);
        }
    }
    Ok((shape, out))
}

/// `Concat` along `axis`.
pub(crate) fn concat<T: Copy>(parts: &[(&[usize], &[T])], ax: i64) -> R<(Vec<usize>, Vec<T>)> {
    let Some(&(first, _)) = parts.first() else {
        return Err("Concat of nothing".into());
    };
    let a = axis(ax, first.len())?;
    let mut shape = first.to_vec();
    shape[a] = 0;
    for (s, _) in parts {
        let same_rest = s.len() == first.len()
            && s.iter()
                .zip(first)
                .enumerate()
                .all(|(k, (x, y))| k == a || x == y);
        if !same_rest {
            return Err(format!(
                "cannot concatenate {s:?} with {first:?} along axis {a}"
            ));
        }
        shape[a] += s[a];
    }
    let total = checked_numel(&shape)?;
    let outer = numel(&first[..a]);
    let mut out = Vec::with_capacity(total);
    for o in 0..outer {
        for (s, d) in parts {
            let block = numel(&s[a..]);
            out.extend_from_slice(&d[o * block..(o + 1) * block]);
        }
    }
    Ok((shape, out))
}

/// `Slice` (opset 10+): per-axis start, end and step, clamped as ONNX says.
pub(crate) fn slice<T: Copy>(
    s: &[usize],
    d: &[T],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> R<(Vec<usize>, Vec<T>)> {
    let rank = s.len();
    let mut lo = vec![0i64; rank];
    let mut step = vec![1i64; rank];
    let mut count: Vec<usize> = s.to_vec();
    if starts.len() != ends.len() {
        return Err("starts and ends differ in length".into());
    }
    for k in 0..starts.len() {
        let a = match axes {
            Some(ax) => axis(*ax.get(k).ok_or("axes is shorter than starts")?, rank)?,
            None => k,
        };
        if a >= rank {
            return Err(format!("slice axis {a} is out of range for rank {rank}"));
        }
        let st = steps.map_or(Ok(1), |v| {
            v.get(k).copied().ok_or("steps is shorter than starts")
        })?;
        if st == 0 {
            return Err("a slice step is 0".into());
        }
        let dim = s[a] as i64;
        let fix = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (b, e) = (fix(starts[k]), fix(ends[k]));
        // In i128: a step near ±2⁶³ must not overflow the count.
        let (b, e, st) = (b as i128, e as i128, st as i128);
        let (b, n) = if dim == 0 {
            (0, 0)
        } else if st > 0 {
            let (b, e) = (b.clamp(0, dim as i128), e.clamp(0, dim as i128));
            (b, ((e - b).max(0) + st - 1) / st)
        } else {
            let (b, e) = (b.clamp(0, dim as i128 - 1), e.clamp(-1, dim as i128 - 1));
            (b, ((b - e).max(0) + (-st) - 1) / (-st))
        };
        lo[a] = b as i64;
        step[a] = st as i64;
        count[a] = n as usize;
    }
    let total = checked_numel(&count)?;
    let st = strides(s);
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; rank];
    for _ in 0..total {
        let off: i64 = (0..rank)
            .map(|k| (lo[k] + idx[k] as i64 * step[k]) * st[k] as i64)
            .sum();
        out.push(d[off as usize]);
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < count[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok((count, out))
}

/// The shape `Reshape` asks for: 0 copies the input's dimension (unless `allowzero`), one -1
/// takes what is left.
pub(crate) fn reshape_target(from: &[usize], to: &[i64], allowzero: bool) -> R<Vec<usize>> {
    let n = numel(from);
    let mut out = Vec::with_capacity(to.len());
    let mut infer = None;
    for (k, &v) in to.iter().enumerate() {
        match v {
            -1 if infer.is_none() => {
                infer = Some(k);
                out.push(1);
            }
            0 if !allowzero => out.push(
                *from
                    .get(k)
                    .ok_or("Reshape copies a dimension the input lacks")?,
            ),
            v if v >= 0 => out.push(v as usize),
            _ => return Err(format!("Reshape to {to:?} is invalid")),
        }
    }
    let known = checked_numel(&out)?;
    if let Some(k) = infer {
        if known == 0 || !n.is_multiple_of(known) {
            return Err(format!("cannot reshape {from:?} to {to:?}"));
        }
        out[k] = n / known;
    }
    if numel(&out) != n {
        return Err(format!("cannot reshape {from:?} ({n} values) to {to:?}"));
    }
    Ok(out)
}

/// `MatMul` (numpy semantics, batch dimensions broadcast). With `bt`, `b` is a 2-D weight
/// stored transposed, `[N, K]`, as PyTorch's Linear keeps it.
pub(crate) fn matmul(
    sa: &[usize],
    a: &[f32],
    sb: &[usize],
    b: &[f32],
    bt: bool,
) -> R<(Vec<usize>, Vec<f32>)> {
    if sa.is_empty() || sb.is_empty() {
        return Err("MatMul of a scalar".into());
    }
    let a_vec = sa.len() == 1;
    let b_vec = sb.len() == 1;
    let sa2: Vec<usize> = if a_vec { vec![1, sa[0]] } else { sa.to_vec() };
    let sb2: Vec<usize> = if b_vec { vec![sb[0], 1] } else { sb.to_vec() };
    if bt && sb2.len() != 2 {
        return Err("a transposed weight must be 2-D".into());
    }
    let (ra, rb) = (sa2.len(), sb2.len());
    let (m, k) = (sa2[ra - 2], sa2[ra - 1]);
    let (kb, n) = if bt {
        (sb2[1], sb2[0])
    } else {
        (sb2[rb - 2], sb2[rb - 1])
    };
    if k != kb {
        return Err(format!(
            "MatMul of {sa:?} by {sb:?}: inner sizes {k} and {kb} differ"
        ));
    }
    let (b_rs, b_cs) = if bt { (1, k) } else { (n, 1) };
    let bc = Bcast::new(&[&sa2[..ra - 2], &sb2[..rb - 2]])?;
    let batches = numel(&bc.shape);
    let mut shape = bc.shape.clone();
    shape.extend([m, n]);
    let total = checked_numel(&shape)?;
    let mut out = f32::alloc(total);
    if rb == 2 {
        // One product: the batch folds into the rows.
        crate::graph::fast::matmul(batches * m, n, k, a, b, b_rs, b_cs, &mut out, 0, n);
    } else if m * n > 0 {
        // Batch offsets through the broadcast strides (a batch of matrices as a "row" of 1).
        let off = |which: usize, i: usize| -> usize {
            let mut i = i;
            let mut o = 0;
            for ax in (0..bc.shape.len()).rev() {
                let d = bc.shape[ax];
                o += (i % d) * bc.strides[which][ax];
                i /= d;
            }
            o
        };
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            let (oa, ob) = (off(0, i) * m * k, off(1, i) * k * n);
            crate::graph::fast::matmul(m, n, k, &a[oa..oa + m * k], &b[ob..], b_rs, b_cs, c, 0, n);
        });
    }
    if a_vec {
        shape.remove(shape.len() - 2);
    }
    if b_vec {
        shape.pop();
    }
    Ok((shape, out))
}

/// The error function: Eigen's rational approximation (odd degree-13 numerator over even
/// degree-8 denominator on [-4, 4], ±1 beyond), a few ulp in single precision, branch-free so
/// that it vectorizes; libm's `erff` is a call per element.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_2e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// GELU as BERT defines it: x·Φ(x) = x/2·(1 + erf(x/√2)).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The epilogue of a product, in one pass over its output rows (`n` long): the bias added,
/// then GELU where asked.
pub(crate) fn bias_gelu(d: &mut [f32], n: usize, bias: Option<&[f32]>, act: bool) {
    if bias.is_none() && !act {
        return;
    }
    rows_each(d, n, |_, chunk| {
        for row in chunk.chunks_mut(n.max(1)) {
            if let Some(b) = bias {
                for (v, &c) in row.iter_mut().zip(b) {
                    *v += c;
                }
            }
            if act {
                for v in row.iter_mut() {
                    *v = gelu(*v);
                }
            }
        }
    });
}

/// `Softmax` along `axis`; with `legacy` (opset < 13) over the flattened axes from `axis` on.
pub(crate) fn softmax(s: &[usize], d: &[f32], ax: i64, legacy: bool) -> R<Vec<f32>> {
    let a = axis(ax, s.len())?;
    let (n, inner) = if legacy {
        (numel(&s[a..]), 1)
    } else {
        (s[a], numel(&s[a + 1..]))
    };
    let mut out = f32::alloc(d.len());
    out.copy_from_slice(d);
    if n == 0 || out.is_empty() {
        return Ok(out);
    }
    let one = |v: &mut [f32], stride: usize| {
        // exp(x - max): a row of -inf gives NaN, as onnxruntime does.
        let max = v
            .iter()
            .step_by(stride)
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0.0;
        for x in v.iter_mut().step_by(stride) {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in v.iter_mut().step_by(stride) {
            *x *= inv;
        }
    };
    if inner == 1 {
        rows_each(&mut out, n, |_, chunk| {
            chunk.chunks_mut(n).for_each(|r| one(r, 1))
        });
    } else {
        out.chunks_mut(n * inner).for_each(|block| {
            for i in 0..inner {
                one(&mut block[i..], inner);
            }
        });
    }
    Ok(out)
}

/// `LayerNormalization` over the axes from `axis` on; scale and bias of that many values.
pub(crate) fn layer_norm(
    s: &[usize],
    d: &[f32],
    ax: i64,
    eps: f32,
    scale: &[f32],
    bias: Option<&[f32]>,
) -> R<Vec<f32>> {
    let a = axis(ax, s.len())?;
    let n = numel(&s[a..]);
    if scale.len() != n || bias.is_some_and(|b| b.len() != n) {
        return Err(format!(
            "scale and bias must hold the {n} values of the normalized axes {:?}",
            &s[a..]
        ));
    }
    let mut out = f32::alloc(d.len());
    if n == 0 {
        return Ok(out);
    }
    rows_each(&mut out, n, |first, chunk| {
        for (r, y) in chunk.chunks_mut(n).enumerate() {
            let x = &d[(first + r) * n..(first + r + 1) * n];
            let mean = lanes_sum(x, |v| v) / n as f32;
            let var = lanes_sum(x, |v| (v - mean) * (v - mean)) / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            match bias {
                Some(b) => {
                    for (((o, &v), &g), &c) in y.iter_mut().zip(x).zip(scale).zip(b) {
                        *o = (v - mean) * inv * g + c;
                    }
                }
                None => {
                    for ((o, &v), &g) in y.iter_mut().zip(x).zip(scale) {
                        *o = (v - mean) * inv * g;
                    }
                }
            }
        }
    });
    Ok(out)
}

/// `Σ f(x)` in eight interleaved partial sums: one running sum is a chain of dependent adds
/// the compiler may not reorder, eight are eight independent vector lanes.
#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f32>() + tail
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Reduce {
    Sum,
    Mean,
    Max,
}

/// `ReduceSum` / `ReduceMean` / `ReduceMax` over `axes` (already normalized).
pub(crate) fn reduce(
    s: &[usize],
    d: &[f32],
    axes: &[usize],
    keepdims: bool,
    kind: Reduce,
) -> (Vec<usize>, Vec<f32>) {
    let kept: Vec<usize> = s
        .iter()
        .enumerate()
        .map(|(k, &v)| if axes.contains(&k) { 1 } else { v })
        .collect();
    let ost = strides(&kept);
    let out_n = numel(&kept);
    let init = if kind == Reduce::Max {
        f32::NEG_INFINITY
    } else {
        0.0
    };
    let mut out = vec![init; out_n];
    let rank = s.len();
    let mut idx = vec![0usize; rank];
    for &v in d {
        let o: usize = (0..rank)
            .filter(|k| !axes.contains(k))
            .map(|k| idx[k] * ost[k])
            .sum();
        match kind {
            Reduce::Max => out[o] = out[o].max(v),
            _ => out[o] += v,
        }
        for k in (0..rank).rev() {
            idx[k] += 1;
            if idx[k] < s[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    if kind == Reduce::Mean {
        let count: usize = axes.iter().map(|&a| s[a]).product();
        for v in &mut out {
            *v /= count as f32;
        }
    }
    let shape = if keepdims {
        kept
    } else {
        s.iter()
            .enumerate()
            .filter(|(k, _)| !axes.contains(k))
            .map(|(_, &v)| v)
            .collect()
    };
    (shape, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series in f64: an independent reference.
    fn erf_series(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_its_series() {
        let mut worst = 0f64;
        for i in -600..=600 {
            let x = i as f64 / 100.0;
            let want = if x.abs() > 5.0 {
                x.signum()
            } else {
                erf_series(x)
            };
            worst = worst.max((erf(x as f32) as f64 - want).abs());
        }
        assert!(worst < 2e-6, "worst error {worst}");
    }

    #[test]
    fn broadcasting_follows_numpy() {
        // [2, 1, 3] + [4, 1] → [2, 4, 3], worked by hand on index formulas.
        let a: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let b: Vec<f32> = (0..4).map(|v| 10.0 * v as f32).collect();
        let (s, out) = zip_map(&[2, 1, 3], &a, &[4, 1], &b, |x, y| x + y).unwrap();
        assert_eq!(s, vec![2, 4, 3]);
        for i in 0..2 {
            for j in 0..4 {
                for k in 0..3 {
                    assert_eq!(out[(i * 4 + j) * 3 + k], a[i * 3 + k] + b[j]);
                }
            }
        }
        assert!(zip_map(&[2, 3], &a, &[4], &b, |x, y| x + y).is_err());
    }

    #[test]
    fn transpose_gather_slice_concat_by_hand() {
        let d: Vec<i64> = (0..24).collect();
        let (s, t) = transpose(&[2, 3, 4], &d, &[2, 0, 1]).unwrap();
        assert_eq!(s, vec![4, 2, 3]);
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    assert_eq!(t[(k * 2 + i) * 3 + j], d[(i * 3 + j) * 4 + k]);
                }
            }
        }
        let (s, g) = gather(&[2, 3, 4], &d, 1, &[2], &[2, -3]).unwrap();
        assert_eq!(s, vec![2, 2, 4]);
        assert_eq!(&g[..8], &[8, 9, 10, 11, 0, 1, 2, 3]);
        assert!(gather(&[2, 3, 4], &d, 1, &[1], &[3]).is_err());
        // x[:, 2:0:-1, ::2]
        let (s, v) = slice(
            &[2, 3, 4],
            &d,
            &[2, 0],
            &[0, i64::MAX],
            Some(&[1, 2]),
            Some(&[-1, 2]),
        )
        .unwrap();
        assert_eq!(s, vec![2, 2, 2]);
        assert_eq!(v, vec![8, 10, 4, 6, 20, 22, 16, 18]);
        // Edges: an empty axis walked backwards, a step of 2⁶³ − 1, an axis a scalar lacks.
        let empty: [i64; 0] = [];
        let (s, v) = slice(&[0], &empty, &[-1], &[i64::MIN], None, Some(&[-1])).unwrap();
        assert_eq!((s, v.len()), (vec![0], 0));
        let (s, v) = slice(&[5], &d[..5], &[0], &[5], None, Some(&[i64::MAX])).unwrap();
        assert_eq!((s, v), (vec![1], vec![0]));
        assert!(concat(&[(&[][..], &[1][..]), (&[][..], &[2][..])], 0).is_err());
        let (s, c) = concat(
            &[(&[2, 1][..], &[1, 2][..]), (&[2, 2][..], &[3, 4, 5, 6][..])],
            1,
        )
        .unwrap();
        assert_eq!(s, vec![2, 3]);
        assert_eq!(c, vec![1, 3, 4, 2, 5, 6]);
        assert_eq!(
            reshape_target(&[2, 3, 4], &[0, -1], false).unwrap(),
            vec![2, 12]
        );
        assert!(reshape_target(&[2, 3, 4], &[5, -1], false).is_err());
    }

    #[test]
    fn batched_matmul_against_loops() {
        // [2, 1, 3, 4] × [3, 4, 5] → [2, 3, 3, 5], broadcast over the batch.
        let a: Vec<f32> = (0..24).map(|v| (v as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..60).map(|v| (v as f32 * 0.11).cos()).collect();
        let (s, y) = matmul(&[2, 1, 3, 4], &a, &[3, 4, 5], &b, false).unwrap();
        assert_eq!(s, vec![2, 3, 3, 5]);
        for i in 0..2 {
            for j in 0..3 {
                for r in 0..3 {
                    for c in 0..5 {
                        let want: f32 = (0..4)
                            .map(|k| a[(i * 3 + r) * 4 + k] * b[(j * 4 + k) * 5 + c])
                            .sum();
                        let got = y[((i * 3 + j) * 3 + r) * 5 + c];
                        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                    }
                }
            }
        }
        // A transposed 2-D weight equals the plain product with its transpose.
        let w: Vec<f32> = (0..20).map(|v| v as f32 - 7.0).collect(); // [5, 4]
        let (_, wt) = transpose(&[5, 4], &w, &[1, 0]).unwrap();
        let plain = matmul(&[2, 3, 4], &a, &[4, 5], &wt, false).unwrap();
        let fused = matmul(&[2, 3, 4], &a, &[5, 4], &w, true).unwrap();
        assert_eq!(plain.0, fused.0);
        // gemm may sum in another order for other strides: equal to rounding.
        for (p, f) in plain.1.iter().zip(&fused.1) {
            assert!((p - f).abs() <= 1e-5 * p.abs().max(1.0), "{p} vs {f}");
        }
    }

    #[test]
    fn softmax_layer_norm_and_reduce_by_hand() {
        let p = softmax(&[1, 3], &[1.0, 2.0, f32::NEG_INFINITY], -1, false).unwrap();
        let e = 1f32.exp() + 2f32.exp();
        assert!((p[0] - 1f32.exp() / e).abs() < 1e-6 && p[2] == 0.0);
        let all_masked = softmax(&[1, 2], &[f32::NEG_INFINITY; 2], -1, false).unwrap();
        assert!(all_masked.iter().all(|v| v.is_nan()));
        // Along a middle axis: columns of a [2, 2] sum to one.
        let p = softmax(&[2, 2], &[0.0, 1.0, 0.0, 3.0], 0, false).unwrap();
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] + p[3] - 1.0).abs() < 1e-6);
        let y = layer_norm(
            &[1, 4],
            &[1.0, 2.0, 3.0, 4.0],
            -1,
            0.0,
            &[1.0; 4],
            Some(&[0.5; 4]),
        )
        .unwrap();
        let sd = 1.25f32.sqrt();
        assert!((y[0] - (-1.5 / sd + 0.5)).abs() < 1e-6);
        let (s, r) = reduce(
            &[2, 3],
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            &[1],
            false,
            Reduce::Mean,
        );
        assert_eq!((s, r), (vec![2], vec![2.0, 5.0]));
        let (s, r) = reduce(
            &[2, 3],
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            &[0],
            true,
            Reduce::Max,
        );
        assert_eq!((s, r), (vec![1, 3], vec![4.0, 5.0, 6.0]));
    }
}
