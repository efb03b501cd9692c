//! What the pruned model would weigh on disk in the usual sparse storage formats.
//!
//! Non-prunable tensors are stored dense in every format. For prunable ones, with `b` bytes
//! per value and `nnz` kept weights in an `r × c` view:
//! - dense: the tensor as it is;
//! - CSR: `nnz·b` values + `nnz·4` column indices (int32) + `(r+1)·4` row pointers;
//! - bitmask: `⌈r·c/8⌉` bytes of mask + `nnz·b` values;
//! - N:M (only for an N:M pattern): `nnz·b` values + `⌈log2 M⌉` index bits per value.

use crate::model::Model;
use crate::prune::{Allocation, Pattern};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SizeReport {
    pub dense_bytes: u64,
    pub csr_bytes: u64,
    pub bitmask_bytes: u64,
    pub nm_bytes: Option<u64>,
}

pub fn size_report(model: &Model, alloc: &Allocation, pattern: Pattern) -> SizeReport {
    let mut r = SizeReport::default();
    let nm_bits = match pattern {
        Pattern::NM { m, .. } => Some((m as f64).log2().ceil() as u64),
        Pattern::Unstructured => None,
    };
    let mut nm_total = 0u64;
    for (t, e) in model.tensors.iter().enumerate() {
        let dense = model.tensor_bytes(t).len() as u64;
        r.dense_bytes += dense;
        let Some(l) = alloc.for_tensor(t) else {
            r.csr_bytes += dense;
            r.bitmask_bytes += dense;
            nm_total += dense;
            continue;
        };
        let b = e.dtype.size_bytes().unwrap_or(4) as u64;
        let nnz = l.kept() as u64;
        let (rows, _) = e.matrix_dims();
        r.csr_bytes += nnz * (b + 4) + (rows as u64 + 1) * 4;
        r.bitmask_bytes += (e.numel as u64).div_ceil(8) + nnz * b;
        nm_total += match nm_bits {
            Some(bits) => nnz * b + (nnz * bits).div_ceil(8),
            None => dense,
        };
    }
    r.nm_bytes = nm_bits.map(|_| nm_total);
    r
}
