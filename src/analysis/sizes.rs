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
        _ => None,
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

/// One storage format's bytes for the current masks, raw and compressed by zstd.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StorageSize {
    pub format: String,
    pub label: String,
    pub bytes: u64,
    pub zstd_bytes: u64,
}

/// zstd level for the compressed figures (its default).
pub const ZSTD_LEVEL: i32 = 3;

struct Count(u64);

impl std::io::Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every storage format's bytes for the model under `masks`, each built for real (values in
/// the tensor's own dtype) and compressed by zstd: dense (pruned weights as zeros), CSR with
/// 16-bit column indices (32-bit where a row is wider than 65,536) and with 32-bit ones,
/// bitmask + values, N:M compressed (under an N:M pattern) and `block × block` blocks.
/// Tensors without a mask are stored as they are in every format.
pub fn storage_sizes(
    model: &Model,
    masks: &crate::prune::MaskSet,
    pattern: Pattern,
    block: usize,
    progress: &crate::progress::Progress,
) -> Result<Vec<StorageSize>, crate::progress::Cancelled> {
    use std::io::Write;
    let mut formats: Vec<(&str, &str)> = vec![
        ("dense", "dense (zeros stored)"),
        ("csr16", "CSR, 16-bit indices"),
        ("csr32", "CSR, 32-bit indices"),
        ("bitmask", "bitmask + values"),
    ];
    let nm = match pattern {
        Pattern::NM { n, m } => {
            formats.push(("nm", "N:M compressed"));
            Some((n, m))
        }
        _ => None,
    };
    let block = block.max(1);
    let block_label = format!("block {block}×{block}");
    formats.push(("block", &block_label));
    let mut raw = vec![0u64; formats.len()];
    let mut enc: Vec<zstd::stream::Encoder<'static, Count>> = formats
        .iter()
        .map(|_| zstd::stream::Encoder::new(Count(0), ZSTD_LEVEL).expect("zstd encoder"))
        .collect();
    let total: u64 = model.tensors.iter().map(|e| e.numel as u64).sum();
    let mut seen = 0u64;
    let idx = formats.iter().position(|f| f.0 == "block");
    for (t, e) in model.tensors.iter().enumerate() {
        progress.check()?;
        progress.report(
            seen as f32 / total.max(1) as f32,
            &format!("sizes: {}", e.name),
        );
        seen += e.numel as u64;
        let bytes = model.tensor_bytes(t);
        let mut streams: Vec<Vec<u8>> = vec![Vec::new(); formats.len()];
        match masks.get(&e.name) {
            None => {
                for s in &mut streams {
                    s.extend_from_slice(bytes);
                }
            }
            Some(mask) => {
                let b = e.dtype.size_bytes().unwrap_or(4);
                let (rows, cols) = e.matrix_dims();
                let val = |i: usize| &bytes[i * b..(i + 1) * b];
                // dense: the pruned tensor as stored.
                for i in 0..e.numel {
                    if mask.kept(i) {
                        streams[0].extend_from_slice(val(i));
                    } else {
                        streams[0].extend(std::iter::repeat_n(0u8, b));
                    }
                }
                // CSR: values, column indices, row pointers.
                let mut row_ptr = vec![0u32];
                let mut nnz = 0u32;
                for r in 0..rows {
                    for c in 0..cols {
                        let i = r * cols + c;
                        if mask.kept(i) {
                            nnz += 1;
                            for s in [1, 2] {
                                streams[s].extend_from_slice(val(i));
                            }
                            if cols <= 1 << 16 {
                                streams[1].extend_from_slice(&(c as u16).to_le_bytes());
                            } else {
                                streams[1].extend_from_slice(&(c as u32).to_le_bytes());
                            }
                            streams[2].extend_from_slice(&(c as u32).to_le_bytes());
                        }
                    }
                    row_ptr.push(nnz);
                }
                for s in [1, 2] {
                    streams[s].extend(row_ptr.iter().flat_map(|p| p.to_le_bytes()));
                }
                // bitmask + values.
                streams[3].extend(mask.words().iter().flat_map(|w| w.to_le_bytes()));
                streams[3].truncate(e.numel.div_ceil(8));
                for i in 0..e.numel {
                    if mask.kept(i) {
                        streams[3].extend_from_slice(val(i));
                    }
                }
                // N:M: each group's N kept values and their positions (⌈log2 M⌉ bits each).
                if let Some((n, m)) = nm {
                    let lines = crate::prune::nm_lines(e);
                    let bits = (m as f64).log2().ceil().max(1.0) as usize;
                    let mut packed: Vec<u8> = Vec::new();
                    let (mut acc, mut nbits) = (0u32, 0usize);
                    for o in 0..lines.outer {
                        for r in 0..lines.stride {
                            for g in (0..lines.len).step_by(m) {
                                let mut taken = 0;
                                for j in 0..m.min(lines.len - g) {
                                    let i =
                                        o * lines.len * lines.stride + (g + j) * lines.stride + r;
                                    if mask.kept(i) && taken < n {
                                        taken += 1;
                                        streams[4].extend_from_slice(val(i));
                                        acc |= (j as u32) << nbits;
                                        nbits += bits;
                                        while nbits >= 8 {
                                            packed.push(acc as u8);
                                            acc >>= 8;
                                            nbits -= 8;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    if nbits > 0 {
                        packed.push(acc as u8);
                    }
                    streams[4].extend_from_slice(&packed);
                }
                // Blocks: each kept block's values (zero-padded), its column, per block-row pointers.
                if let Some(k) = idx {
                    let (brows, bcols) = (rows.div_ceil(block), cols.div_ceil(block));
                    let mut ptr = vec![0u32];
                    let mut cols_of = Vec::new();
                    for br in 0..brows {
                        for bc in 0..bcols {
                            let inside = |f: &mut dyn FnMut(Option<usize>)| {
                                for i in 0..block {
                                    for j in 0..block {
                                        let (r, c) = (br * block + i, bc * block + j);
                                        f((r < rows && c < cols).then_some(r * cols + c));
                                    }
                                }
                            };
                            let mut any = false;
                            inside(&mut |i| any |= i.is_some_and(|i| mask.kept(i)));
                            if !any {
                                continue;
                            }
                            cols_of.push(bc as u32);
                            inside(&mut |i| match i {
                                Some(i) if mask.kept(i) => streams[k].extend_from_slice(val(i)),
                                _ => streams[k].extend(std::iter::repeat_n(0u8, b)),
                            });
                        }
                        ptr.push(cols_of.len() as u32);
                    }
                    streams[k].extend(cols_of.iter().flat_map(|c| c.to_le_bytes()));
                    streams[k].extend(ptr.iter().flat_map(|p| p.to_le_bytes()));
                }
            }
        }
        for (i, s) in streams.iter().enumerate() {
            raw[i] += s.len() as u64;
            enc[i].write_all(s).expect("counting never fails");
        }
    }
    let mut out = Vec::new();
    for ((key, label), (e, bytes)) in formats.iter().zip(enc.into_iter().zip(raw)) {
        let zstd_bytes = e.finish().expect("counting never fails").0;
        out.push(StorageSize {
            format: key.to_string(),
            label: label.to_string(),
            bytes,
            zstd_bytes,
        });
    }
    progress.report(1.0, "sizes measured");
    Ok(out)
}

#[cfg(test)]
mod storage_tests {
    use super::*;
    use crate::prune::{Mask, MaskSet};

    #[test]
    fn storage_sizes_match_a_hand_count() {
        // w: 3×5 f32 (15 values, 6 kept) and a bias of 3 without a mask.
        let w: Vec<f32> = (1..=15).map(|v| v as f32).collect();
        let model = Model::from_f32_tensors(
            "t",
            vec![
                ("w".into(), vec![3, 5], w),
                ("b".into(), vec![3], vec![1.0, 2.0, 3.0]),
            ],
        );
        // Kept: (0,0) (0,1) (1,4) (2,0) (2,2) (2,3).
        let kept = [
            true, true, false, false, false, false, false, false, false, true, true, false, true,
            true, false,
        ];
        let mut masks = MaskSet::new();
        masks.insert(&model, "w", Mask::from_kept(&kept)).unwrap();
        let sizes = storage_sizes(
            &model,
            &masks,
            Pattern::Unstructured,
            2,
            &crate::progress::Progress::none(),
        )
        .unwrap();
        let get = |k: &str| sizes.iter().find(|s| s.format == k).unwrap().bytes;
        let bias = 12;
        assert_eq!(get("dense"), 60 + bias);
        // 6 values · (4 + 2) + 4 row pointers · 4.
        assert_eq!(get("csr16"), 6 * 6 + 4 * 4 + bias);
        assert_eq!(get("csr32"), 6 * 8 + 4 * 4 + bias);
        // ⌈15/8⌉ bytes of mask + 6 values.
        assert_eq!(get("bitmask"), 2 + 6 * 4 + bias);
        // 2×2 blocks over a 3×5 view (2×3 grid): kept blocks (0,0), (0,2), (1,0), (1,1) — 4
        // blocks of 4 values, 4 column indices, 3 block-row pointers.
        assert_eq!(get("block"), 4 * 16 + 4 * 4 + 3 * 4 + bias);
        assert!(sizes.iter().all(|s| s.format != "nm"));
        // zstd really ran: a frame of something, never more than a few bytes over the raw.
        for s in &sizes {
            assert!(s.zstd_bytes > 0 && s.zstd_bytes < s.bytes + 64, "{s:?}");
        }
    }

    #[test]
    fn nm_storage_counts_values_and_packed_positions() {
        // 2×8 under 2:4: every group keeps 2 → 8 values of 4 bytes, 8 positions of 2 bits.
        let w: Vec<f32> = (1..=16).map(|v| v as f32).collect();
        let model = Model::from_f32_tensors("t", vec![("w".into(), vec![2, 8], w)]);
        let kept: Vec<bool> = (0..16).map(|i| i % 4 >= 2).collect();
        let mut masks = MaskSet::new();
        masks.insert(&model, "w", Mask::from_kept(&kept)).unwrap();
        let sizes = storage_sizes(
            &model,
            &masks,
            Pattern::NM { n: 2, m: 4 },
            4,
            &crate::progress::Progress::none(),
        )
        .unwrap();
        let nm = sizes.iter().find(|s| s.format == "nm").unwrap();
        assert_eq!(nm.bytes, 8 * 4 + 2);
    }
}
