//! Weight-value histograms, computed once per model, and their kept/pruned split.

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::super::prune::Mask;
use crate::model::Model;
use crate::progress::{Cancelled, Progress};

/// Counts of finite values in `bins` equal bins over `[lo, hi]`, plus what fits no bin.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub lo: f32,
    pub hi: f32,
    pub counts: Vec<u64>,
    pub nan: u64,
    pub pos_inf: u64,
    pub neg_inf: u64,
    pub zeros: u64,
}

impl Histogram {
    pub fn bins(&self) -> usize {
        self.counts.len()
    }
    pub fn bin_width(&self) -> f64 {
        (self.hi as f64 - self.lo as f64) / self.counts.len() as f64
    }
    /// The bin a finite value falls in (values outside `[lo, hi]` are clamped).
    #[inline]
    pub fn bin_of(&self, v: f32) -> usize {
        let b = self.counts.len();
        let x =
            ((v as f64 - self.lo as f64) / (self.hi as f64 - self.lo as f64) * b as f64).floor();
        (x.max(0.0) as usize).min(b - 1)
    }
    pub fn non_finite(&self) -> u64 {
        self.nan + self.pos_inf + self.neg_inf
    }
}

/// The histogram of one tensor: one pass for the range, one for the counts.
pub fn histogram(model: &Model, t: usize, bins: usize) -> Histogram {
    let n = model.tensors[t].numel;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    let (mut nan, mut pos_inf, mut neg_inf, mut zeros) = (0, 0, 0, 0);
    model.for_each_chunk(t, 0..n, |_, c| {
        for &v in c {
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
                zeros += (v == 0.0) as u64;
            } else if v.is_nan() {
                nan += 1;
            } else if v > 0.0 {
                pos_inf += 1;
            } else {
                neg_inf += 1;
            }
        }
    });
    if lo > hi {
        (lo, hi) = (-1.0, 1.0);
    } else if lo == hi {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let mut h = Histogram {
        lo,
        hi,
        counts: vec![0; bins.max(1)],
        nan,
        pos_inf,
        neg_inf,
        zeros,
    };
    model.for_each_chunk(t, 0..n, |_, c| {
        for &v in c {
            if v.is_finite() {
                let b = h.bin_of(v);
                h.counts[b] += 1;
            }
        }
    });
    h
}

/// Histograms of every analysable tensor, in parallel, with progress.
pub fn all_histograms(
    model: &Model,
    bins: usize,
    progress: &Progress,
) -> Result<Vec<Option<Histogram>>, Cancelled> {
    let total: u64 = model
        .tensors
        .iter()
        .map(|t| t.numel as u64)
        .sum::<u64>()
        .max(1);
    let done = AtomicU64::new(0);
    (0..model.tensors.len())
        .into_par_iter()
        .map(|t| {
            progress.check()?;
            let e = &model.tensors[t];
            if !e.analysable() {
                return Ok(None);
            }
            let h = histogram(model, t, bins);
            let d = done.fetch_add(e.numel as u64, Ordering::Relaxed) + e.numel as u64;
            progress.report(d as f32 / total as f32, "Histograms");
            Ok(Some(h))
        })
        .collect()
}

/// Kept and pruned counts per bin of `hist`, exact, from the tensor's mask.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSplit {
    pub kept: Vec<u64>,
    pub pruned: Vec<u64>,
    /// Non-finite weights that are pruned / kept.
    pub non_finite_pruned: u64,
    pub non_finite_kept: u64,
}

pub fn split_histogram(
    model: &Model,
    t: usize,
    hist: &Histogram,
    mask: Option<&Mask>,
) -> HistogramSplit {
    let bins = hist.bins();
    let mut s = HistogramSplit {
        kept: vec![0; bins],
        pruned: vec![0; bins],
        non_finite_pruned: 0,
        non_finite_kept: 0,
    };
    let n = model.tensors[t].numel;
    model.for_each_chunk(t, 0..n, |start, c| {
        for (j, &v) in c.iter().enumerate() {
            let kept = mask.is_none_or(|m| m.kept(start + j));
            if v.is_finite() {
                let b = hist.bin_of(v);
                if kept {
                    s.kept[b] += 1
                } else {
                    s.pruned[b] += 1
                }
            } else if kept {
                s.non_finite_kept += 1;
            } else {
                s.non_finite_pruned += 1;
            }
        }
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_match_hand_worked_case() {
        // Range [-1, 3], 4 bins of width 1: [-1,0) [0,1) [1,2) [2,3].
        let m = Model::from_f32_tensors(
            "t",
            vec![(
                "w".into(),
                vec![2, 4],
                vec![-1.0, 0.0, 0.5, 1.0, 2.9, 3.0, f32::NAN, f32::NEG_INFINITY],
            )],
        );
        let h = histogram(&m, 0, 4);
        assert_eq!((h.lo, h.hi), (-1.0, 3.0));
        assert_eq!(h.counts, vec![1, 2, 1, 2]);
        assert_eq!((h.nan, h.neg_inf, h.pos_inf, h.zeros), (1, 1, 0, 1));
        let mask = Mask::from_kept(&[false, true, true, false, true, true, false, true]);
        let s = split_histogram(&m, 0, &h, Some(&mask));
        assert_eq!(s.kept, vec![0, 2, 0, 2]);
        assert_eq!(s.pruned, vec![1, 0, 1, 0]);
        assert_eq!((s.non_finite_kept, s.non_finite_pruned), (1, 1));
    }
}
