//! Per-tensor sorted score keys: built once per (model, criterion, seed), queried by binary
//! search on every slider move.

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::{Criterion, PruneError, ScoreInputs};
use crate::model::{DECODE_CHUNK, Model};
use crate::progress::Progress;

/// Sorted score keys for every analysable tensor (`None` for the others).
pub struct ScoreIndex {
    pub criterion: Criterion,
    pub seed: u64,
    sorted: Vec<Option<Vec<u32>>>,
}

impl std::fmt::Debug for ScoreIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScoreIndex")
            .field("criterion", &self.criterion)
            .field("seed", &self.seed)
            .finish()
    }
}

impl ScoreIndex {
    /// Scores every analysable tensor and sorts the keys, tensors in parallel.
    pub fn build(
        model: &Model,
        criterion: Criterion,
        seed: u64,
        _inputs: &ScoreInputs,
        progress: &Progress,
    ) -> Result<ScoreIndex, PruneError> {
        let total: u64 = model
            .tensors
            .iter()
            .filter(|t| t.analysable())
            .map(|t| t.numel as u64)
            .sum::<u64>()
            .max(1);
        let done = AtomicU64::new(0);
        let label = format!("Scoring ({})", criterion.label());
        let sorted = (0..model.tensors.len())
            .into_par_iter()
            .map(|t| -> Result<Option<Vec<u32>>, PruneError> {
                let e = &model.tensors[t];
                if !e.analysable() {
                    return Ok(None);
                }
                let mut keys = vec![0u32; e.numel];
                let mut vals = vec![0f32; DECODE_CHUNK];
                for (c, chunk) in keys.chunks_mut(DECODE_CHUNK).enumerate() {
                    if c % 256 == 0 {
                        progress.check()?;
                    }
                    criterion.fill_keys(model, seed, t, c * DECODE_CHUNK, &mut vals, chunk);
                }
                progress.check()?;
                radix_sort_u32(&mut keys);
                let d = done.fetch_add(e.numel as u64, Ordering::Relaxed) + e.numel as u64;
                progress.report(d as f32 / total as f32, &label);
                Ok(Some(keys))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ScoreIndex {
            criterion,
            seed,
            sorted,
        })
    }

    /// Sorted keys of tensor `t` (empty for tensors that are not analysable).
    pub fn keys(&self, t: usize) -> &[u32] {
        self.sorted.get(t).and_then(|s| s.as_deref()).unwrap_or(&[])
    }

    /// Number of elements of `t` whose key is `< key`.
    #[inline]
    pub fn count_below(&self, t: usize, key: u32) -> usize {
        self.keys(t).partition_point(|&k| k < key)
    }

    /// Number of elements of `t` whose key is `<= key`.
    #[inline]
    pub fn count_at_most(&self, t: usize, key: u32) -> usize {
        self.keys(t).partition_point(|&k| k <= key)
    }

    /// Bytes held by the index.
    pub fn heap_bytes(&self) -> usize {
        self.sorted.iter().flatten().map(|v| v.len() * 4).sum()
    }
}

/// LSD radix sort of u32 keys: three passes of 11 bits. Several times faster than a
/// comparison sort on the tens of millions of keys a large embedding has.
pub fn radix_sort_u32(v: &mut [u32]) {
    if v.len() < 256 {
        v.sort_unstable();
        return;
    }
    const BITS: u32 = 11;
    const BUCKETS: usize = 1 << BITS;
    let mut counts = vec![[0usize; BUCKETS]; 3];
    let mut max = 0u32;
    for &x in v.iter() {
        max = max.max(x);
        for (p, c) in counts.iter_mut().enumerate() {
            c[((x >> (p as u32 * BITS)) as usize) & (BUCKETS - 1)] += 1;
        }
    }
    let mut buf = vec![0u32; v.len()];
    let mut in_v = true;
    for (p, c) in counts.iter().enumerate() {
        let shift = p as u32 * BITS;
        if shift > 0 && (max >> shift) == 0 {
            break;
        }
        let mut offs = [0usize; BUCKETS];
        let mut sum = 0;
        for (o, &n) in offs.iter_mut().zip(c.iter()) {
            *o = sum;
            sum += n;
        }
        let (src, dst): (&[u32], &mut [u32]) = if in_v {
            (&*v, &mut buf)
        } else {
            (&buf, &mut *v)
        };
        for &x in src {
            let b = ((x >> shift) as usize) & (BUCKETS - 1);
            dst[offs[b]] = x;
            offs[b] += 1;
        }
        in_v = !in_v;
    }
    if !in_v {
        v.copy_from_slice(&buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::SplitMix64;

    #[test]
    fn radix_sort_matches_std_sort() {
        let mut rng = SplitMix64::new(7);
        for &(n, bound) in &[
            (0usize, 1u64),
            (5, 3),
            (300, 4),
            (5000, 1 << 31),
            (70_000, 1 << 12),
            (9_999, u32::MAX as u64 + 1),
        ] {
            let mut v: Vec<u32> = (0..n).map(|_| rng.below(bound) as u32).collect();
            let mut expect = v.clone();
            expect.sort();
            radix_sort_u32(&mut v);
            assert_eq!(v, expect, "n={n} bound={bound}");
        }
    }
}
