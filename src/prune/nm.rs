//! N:M geometry: groups of M consecutive weights along the input dimension (dim 1; dim 0 for
//! 1-D tensors). For a conv weight `[out, in, kh, kw]` a group runs over M input channels at a
//! fixed output channel and kernel position. A trailing group shorter than M keeps min(N, len).

use crate::model::TensorEntry;

/// A tensor seen as `lines` of `len` elements, element `i` of line `(o, r)` at flat index
/// `o * len * stride + i * stride + r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NmLines {
    pub outer: usize,
    pub len: usize,
    pub stride: usize,
}

pub fn nm_lines(e: &TensorEntry) -> NmLines {
    match e.shape.as_slice() {
        [] => NmLines {
            outer: 1,
            len: 1,
            stride: 1,
        },
        [n] => NmLines {
            outer: 1,
            len: *n,
            stride: 1,
        },
        [o, i, rest @ ..] => NmLines {
            outer: *o,
            len: *i,
            stride: rest.iter().product(),
        },
    }
}

/// Exactly how many weights an N:M pattern prunes in a tensor.
pub fn nm_pruned_count(e: &TensorEntry, n: usize, m: usize) -> usize {
    let l = nm_lines(e);
    let per_line = (l.len / m) * (m - n) + (l.len % m).saturating_sub(n);
    l.outer * l.stride * per_line
}
