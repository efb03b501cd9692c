//! Weight-value histograms, computed once per model, and their kept/pruned split.

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::super::prune::Mask;
use crate::model::{Model, PatternCounts};
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
        Binner::new(self.lo, self.hi, self.counts.len()).bin(v)
    }
    pub fn non_finite(&self) -> u64 {
        self.nan + self.pos_inf + self.neg_inf
    }
}

/// Maps values to bins with one multiply; every histogram path uses it, so they agree exactly.
#[derive(Clone, Copy, Debug)]
pub struct Binner {
    lo: f32,
    scale: f32,
    last: usize,
}

impl Binner {
    pub fn new(lo: f32, hi: f32, bins: usize) -> Binner {
        let bins = bins.max(1);
        // f32 keeps eight values per AVX register; a few hundred bins need nowhere near
        // its precision.
        let scale = (bins as f64 / (hi as f64 - lo as f64)) as f32;
        Binner {
            lo,
            scale,
            last: bins - 1,
        }
    }
    /// Finite values only; non-finite ones land in a clamped bin and must be skipped by callers.
    #[inline]
    pub fn bin(&self, v: f32) -> usize {
        // Clamped in float first (NaN → 0 through `max`), so the conversion needs none of the
        // saturation checks `as` adds: the binning loop's hot instruction.
        let x = ((v - self.lo) * self.scale).max(0.0).min(self.last as f32);
        // SAFETY: x is finite and within [0, last], which fits u32 (bins are counted in
        // memory, far below 2^32).
        (unsafe { x.to_int_unchecked::<u32>() }) as usize
    }
}

/// Elements per parallel work item: big enough to amortise scheduling, small enough that the
/// largest tensor (an embedding) splits across cores.
const BLOCK: usize = 1 << 20;

/// The histogram of one tensor, sequentially: the reference the parallel path is tested against.
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
    let (lo, hi) = finite_range(lo, hi);
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

#[derive(Clone, Copy)]
struct BlockStats {
    lo: f32,
    hi: f32,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
    zeros: u64,
}

impl BlockStats {
    const EMPTY: BlockStats = BlockStats {
        lo: f32::INFINITY,
        hi: f32::NEG_INFINITY,
        nan: 0,
        pos_inf: 0,
        neg_inf: 0,
        zeros: 0,
    };
    fn merge(self, o: BlockStats) -> BlockStats {
        BlockStats {
            lo: self.lo.min(o.lo),
            hi: self.hi.max(o.hi),
            nan: self.nan + o.nan,
            pos_inf: self.pos_inf + o.pos_inf,
            neg_inf: self.neg_inf + o.neg_inf,
            zeros: self.zeros + o.zeros,
        }
    }
}

/// Range and special values of one block. The common all-finite chunk takes a branch-free
/// loop the compiler vectorises; a chunk with NaN or ±∞ is redone element by element.
fn block_stats(model: &Model, t: usize, range: std::ops::Range<usize>) -> BlockStats {
    let mut st = BlockStats::EMPTY;
    model.for_each_chunk(t, range, |_, c| {
        let (mut lo, mut hi, mut special, mut zeros) =
            (f32::INFINITY, f32::NEG_INFINITY, 0u32, 0u64);
        for &v in c {
            lo = if v < lo { v } else { lo };
            hi = if v > hi { v } else { hi };
            special |= ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
            zeros += (v == 0.0) as u64;
        }
        if special == 0 {
            st = st.merge(BlockStats {
                lo,
                hi,
                zeros,
                ..BlockStats::EMPTY
            });
            return;
        }
        for &v in c {
            if v.is_finite() {
                st.lo = st.lo.min(v);
                st.hi = st.hi.max(v);
                st.zeros += (v == 0.0) as u64;
            } else if v.is_nan() {
                st.nan += 1;
            } else if v > 0.0 {
                st.pos_inf += 1;
            } else {
                st.neg_inf += 1;
            }
        }
    });
    st
}

fn block_counts(
    model: &Model,
    t: usize,
    range: std::ops::Range<usize>,
    binner: Binner,
    bins: usize,
) -> Vec<u64> {
    // Eight interleaved tables: consecutive weights often share a bin, and incrementing one
    // counter back to back stalls on the store it just made.
    let mut lanes = vec![[0u32; 8]; bins];
    let flush = |lanes: &mut Vec<[u32; 8]>, counts: &mut Vec<u64>| {
        for (c, l) in counts.iter_mut().zip(lanes.iter_mut()) {
            *c += l.iter().map(|&x| x as u64).sum::<u64>();
            *l = [0; 8];
        }
    };
    let mut counts = vec![0u64; bins];
    // u32 lanes cannot overflow within one block (BLOCK < 2^32).
    #[cfg(target_arch = "x86_64")]
    let simd = std::arch::is_x86_feature_detected!("avx2");
    model.for_each_chunk(t, range, |_, c| {
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 (checked above).
            done = unsafe { bin_octets_avx2(c, &binner, &mut lanes) };
        }
        let mut quads = c[done..].chunks_exact(4);
        for q in &mut quads {
            for k in 0..4 {
                lanes[binner.bin(q[k])][k] += q[k].is_finite() as u32;
            }
        }
        for &v in quads.remainder() {
            lanes[binner.bin(v)][0] += v.is_finite() as u32;
        }
    });
    flush(&mut lanes, &mut counts);
    counts
}

/// Bins eight values per step with [`Binner::bin`]'s exact arithmetic (subtract, multiply,
/// clamp, truncate: no fused multiply-add, so every bin equals the scalar one), then counts
/// each in its own interleaved table; returns how many values it took (a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bin_octets_avx2(c: &[f32], b: &Binner, lanes: &mut [[u32; 8]]) -> usize {
    use std::arch::x86_64::*;
    let (lo, scale) = (_mm256_set1_ps(b.lo), _mm256_set1_ps(b.scale));
    let (zero, last) = (_mm256_setzero_ps(), _mm256_set1_ps(b.last as f32));
    let exp = _mm256_set1_epi32(0x7f80_0000);
    let n = c.len() / 8 * 8;
    let (mut idx, mut fin) = ([0i32; 8], [0i32; 8]);
    for o in (0..n).step_by(8) {
        // SAFETY: o + 8 ≤ n ≤ c.len().
        let v = unsafe { _mm256_loadu_ps(c.as_ptr().add(o)) };
        // `max_ps(x, 0)` gives 0 for a NaN x, as `f32::max` does.
        let x = _mm256_min_ps(
            _mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(v, lo), scale), zero),
            last,
        );
        let bits = _mm256_and_si256(_mm256_castps_si256(v), exp);
        // 1 where the exponent is not all ones (the value is finite), else 0.
        let finite = _mm256_add_epi32(_mm256_cmpeq_epi32(bits, exp), _mm256_set1_epi32(1));
        unsafe {
            _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, _mm256_cvttps_epi32(x));
            _mm256_storeu_si256(fin.as_mut_ptr() as *mut __m256i, finite);
        }
        for k in 0..8 {
            lanes[idx[k] as usize][k] += fin[k] as u32;
        }
    }
    n
}

/// Every analysable tensor cut into blocks, so that big tensors spread over all cores.
fn blocks(model: &Model) -> Vec<(usize, std::ops::Range<usize>)> {
    let mut jobs = Vec::new();
    for (t, e) in model.tensors.iter().enumerate() {
        if e.analysable() {
            let mut i = 0;
            while i < e.numel {
                jobs.push((t, i..(i + BLOCK).min(e.numel)));
                i += BLOCK;
            }
        }
    }
    jobs
}

/// Histograms of every analysable tensor, in parallel, with progress. Equal to calling
/// [`histogram`] on each tensor.
pub fn all_histograms(
    model: &Model,
    bins: usize,
    progress: &Progress,
) -> Result<Vec<Option<Histogram>>, Cancelled> {
    all_histograms_with(model, bins, progress, None)
}

/// [`all_histograms`], taking 16-bit tensors' histograms from pattern counts already taken
/// (see [`Model::all_pattern_counts`]) instead of counting again.
pub fn all_histograms_with(
    model: &Model,
    bins: usize,
    progress: &Progress,
    patterns: Option<&PatternCounts>,
) -> Result<Vec<Option<Histogram>>, Cancelled> {
    let bins = bins.max(1);
    let counted;
    let patterns = match patterns {
        Some(p) => p,
        None => {
            counted = model.all_pattern_counts(progress)?;
            &counted
        }
    };
    let half = |t: usize| patterns.get(t).is_some_and(|p| p.is_some());
    let jobs: Vec<_> = blocks(model)
        .into_iter()
        .filter(|(t, _)| !half(*t))
        .collect();
    let total = 2 * jobs.iter().map(|(_, r)| r.len() as u64).sum::<u64>().max(1);
    let done = AtomicU64::new(0);
    let tick = |n: usize| {
        let d = done.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        progress.report(d as f32 / total as f32, "Histograms");
    };
    let stats: Vec<BlockStats> = jobs
        .par_iter()
        .map(|(t, r)| {
            progress.check()?;
            let s = block_stats(model, *t, r.clone());
            tick(r.len());
            Ok(s)
        })
        .collect::<Result<_, Cancelled>>()?;
    let mut per_tensor: Vec<Option<BlockStats>> = vec![None; model.tensors.len()];
    for ((t, _), s) in jobs.iter().zip(&stats) {
        per_tensor[*t] = Some(per_tensor[*t].map_or(*s, |p| p.merge(*s)));
    }
    let mut hists: Vec<Option<Histogram>> = model
        .tensors
        .iter()
        .enumerate()
        .map(|(t, e)| {
            if !e.analysable() {
                return None;
            }
            if let (Some(Some(counts)), Some(decode)) = (patterns.get(t), model.half_decoder(t)) {
                return Some(from_patterns(counts, decode, bins));
            }
            let s = per_tensor[t].unwrap_or(BlockStats::EMPTY);
            let (lo, hi) = finite_range(s.lo, s.hi);
            Some(Histogram {
                lo,
                hi,
                counts: vec![0; bins],
                nan: s.nan,
                pos_inf: s.pos_inf,
                neg_inf: s.neg_inf,
                zeros: s.zeros,
            })
        })
        .collect();
    let counts: Vec<Vec<u64>> = jobs
        .par_iter()
        .map(|(t, r)| {
            progress.check()?;
            let h = hists[*t].as_ref().expect("analysable");
            let c = block_counts(model, *t, r.clone(), Binner::new(h.lo, h.hi, bins), bins);
            tick(r.len());
            Ok(c)
        })
        .collect::<Result<_, Cancelled>>()?;
    for ((t, _), c) in jobs.iter().zip(counts) {
        let h = hists[*t].as_mut().expect("analysable");
        for (a, b) in h.counts.iter_mut().zip(c) {
            *a += b;
        }
    }
    Ok(hists)
}

/// The histogram of a 16-bit float tensor from its pattern counts: each pattern decoded once
/// and binned by the same [`Binner`] as every other path, so the result is identical.
fn from_patterns(counts: &[u64], decode: fn(u16) -> f32, bins: usize) -> Histogram {
    let mut s = BlockStats::EMPTY;
    for (p, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let v = decode(p as u16);
        if v.is_finite() {
            s.lo = s.lo.min(v);
            s.hi = s.hi.max(v);
            s.zeros += if v == 0.0 { n } else { 0 };
        } else if v.is_nan() {
            s.nan += n;
        } else if v > 0.0 {
            s.pos_inf += n;
        } else {
            s.neg_inf += n;
        }
    }
    let (lo, hi) = finite_range(s.lo, s.hi);
    let binner = Binner::new(lo, hi, bins);
    let mut out = vec![0u64; bins];
    for (p, &n) in counts.iter().enumerate() {
        let v = decode(p as u16);
        if n > 0 && v.is_finite() {
            out[binner.bin(v)] += n;
        }
    }
    Histogram {
        lo,
        hi,
        counts: out,
        nan: s.nan,
        pos_inf: s.pos_inf,
        neg_inf: s.neg_inf,
        zeros: s.zeros,
    }
}

/// A usable bin range when a tensor has no finite values or only one distinct value.
fn finite_range(lo: f32, hi: f32) -> (f32, f32) {
    if lo > hi {
        (-1.0, 1.0)
    } else if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
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
    let binner = Binner::new(hist.lo, hist.hi, bins);
    let n = model.tensors[t].numel;
    let empty = || HistogramSplit {
        kept: vec![0; bins],
        pruned: vec![0; bins],
        non_finite_pruned: 0,
        non_finite_kept: 0,
    };
    (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut s = empty();
            model.for_each_chunk(t, b * BLOCK..((b + 1) * BLOCK).min(n), |start, c| {
                for (j, &v) in c.iter().enumerate() {
                    let kept = mask.is_none_or(|m| m.kept(start + j));
                    if v.is_finite() {
                        let bin = binner.bin(v);
                        if kept {
                            s.kept[bin] += 1
                        } else {
                            s.pruned[bin] += 1
                        }
                    } else if kept {
                        s.non_finite_kept += 1;
                    } else {
                        s.non_finite_pruned += 1;
                    }
                }
            });
            s
        })
        .reduce(empty, |mut a, b| {
            for i in 0..bins {
                a.kept[i] += b.kept[i];
                a.pruned[i] += b.pruned[i];
            }
            a.non_finite_kept += b.non_finite_kept;
            a.non_finite_pruned += b.non_finite_pruned;
            a
        })
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

    #[test]
    fn sixteen_bit_histograms_from_pattern_counts_equal_the_sequential_reference() {
        // bf16 and f16 tensors over several blocks, with NaN, ±∞, ±0 and subnormals.
        let mut rng = crate::util::SplitMix64::new(9);
        let n = BLOCK + 12_345;
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype) in [("b", "BF16"), ("h", "F16"), ("tiny", "BF16")] {
            let len = if name == "tiny" { 3 } else { n };
            let start = data.len();
            for i in 0..len {
                let v = (rng.normal() * 3.0) as f32;
                let bits = match (dtype, i % 1000) {
                    (_, 7) => 0x8000,
                    ("BF16", 1) => 0x7fc1,
                    ("BF16", 2) => 0xff80,
                    ("BF16", 3) => 0x0003,
                    ("F16", 1) => 0x7e01,
                    ("F16", 2) => 0x7c00,
                    ("F16", 3) => 0x0003,
                    ("BF16", _) => half::bf16::from_f32(v).to_bits(),
                    _ => half::f16::from_f32(v).to_bits(),
                };
                data.extend_from_slice(&bits.to_le_bytes());
            }
            header.insert(
                name.into(),
                serde_json::json!({"dtype": dtype, "shape": [len], "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.extend_from_slice(&data);
        let m = Model::from_safetensors_bytes("half", bytes).unwrap();
        let all = all_histograms(&m, 128, &Progress::none()).unwrap();
        for (t, got) in all.iter().enumerate() {
            assert!(m.half_decoder(t).is_some());
            assert_eq!(got.as_ref(), Some(&histogram(&m, t, 128)), "tensor {t}");
        }
        assert!(all[0].as_ref().unwrap().nan > 0 && all[1].as_ref().unwrap().pos_inf > 0);
    }

    #[test]
    fn parallel_histograms_equal_the_sequential_reference() {
        let mut rng = crate::util::SplitMix64::new(5);
        let mut big: Vec<f32> = (0..(2 * BLOCK + 777))
            .map(|_| rng.normal() as f32)
            .collect();
        big[3] = f32::NAN;
        big[BLOCK + 1] = f32::INFINITY;
        big[2 * BLOCK + 5] = f32::NEG_INFINITY;
        big[10] = 0.0;
        let m = Model::from_f32_tensors(
            "t",
            vec![
                ("big".into(), vec![big.len()], big),
                ("flat".into(), vec![3], vec![2.0, 2.0, 2.0]),
                ("nothing".into(), vec![0, 4], vec![]),
                ("nan".into(), vec![2], vec![f32::NAN, f32::NAN]),
            ],
        );
        let all = all_histograms(&m, 100, &Progress::none()).unwrap();
        for (t, got) in all.iter().enumerate() {
            let want = m.tensors[t].analysable().then(|| histogram(&m, t, 100));
            assert_eq!(got, &want, "tensor {t}");
        }
        let mask = Mask::from_kept(
            &(0..m.tensors[0].numel)
                .map(|i| i % 3 != 0)
                .collect::<Vec<_>>(),
        );
        let h = histogram(&m, 0, 100);
        let s = split_histogram(&m, 0, &h, Some(&mask));
        let (mut kept, mut pruned) = (vec![0u64; 100], vec![0u64; 100]);
        for (i, v) in m.to_f32_vec(0).into_iter().enumerate() {
            if v.is_finite() {
                if i % 3 != 0 {
                    kept[h.bin_of(v)] += 1
                } else {
                    pruned[h.bin_of(v)] += 1
                }
            }
        }
        assert_eq!((s.kept, s.pruned), (kept, pruned));
    }
}
