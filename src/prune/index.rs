//! Per-tensor sorted score keys: built once per (model, criterion, seed), queried by binary
//! search on every slider move.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::{Criterion, PruneError, ScoreInputs, key_of_score};
use crate::model::{DECODE_CHUNK, Model};
use crate::progress::Progress;

/// Sorted score keys for every analysable tensor (`None` for the others).
pub struct ScoreIndex {
    pub criterion: Criterion,
    pub seed: u64,
    sorted: Vec<Option<Keys>>,
    /// Each tensor's scores, for the criteria computed a tensor at a time (LAMP and the
    /// data-driven ones); masks read them back from here.
    scores: Option<Arc<Vec<Option<Vec<f32>>>>>,
    /// What the scores were computed on (the calibration data's fingerprint and sample
    /// count), for caches; `None` for criteria that use no data.
    pub calibration: Option<String>,
    /// Channels ranked for structured pruning, made on first use (see
    /// [`super::structured::order_for`]); the error says why the model has none.
    channels: std::sync::OnceLock<Result<Arc<super::structured::ChannelOrder>, String>>,
    /// Blocks of each tensor sorted by score, per block side (see [`super::blocks`]).
    blocks: super::blocks::BlockCache,
}

/// One tensor's keys in ascending order: each key, or, where few distinct keys exist
/// (magnitudes of 16-bit floats: at most 32,768), each distinct key with the number of keys up
/// to and including it. Both answer the same questions exactly; the second takes at most
/// 384 KB whatever the tensor's size, instead of 4 bytes per weight.
enum Keys {
    Sorted(Vec<u32>),
    Runs { keys: Vec<u32>, ends: Vec<u64> },
}

impl Keys {
    fn len(&self) -> usize {
        match self {
            Keys::Sorted(v) => v.len(),
            Keys::Runs { ends, .. } => ends.last().copied().unwrap_or(0) as usize,
        }
    }

    fn count_below(&self, key: u32) -> usize {
        match self {
            Keys::Sorted(v) => v.partition_point(|&k| k < key),
            Keys::Runs { keys, ends } => {
                let i = keys.partition_point(|&k| k < key);
                if i == 0 { 0 } else { ends[i - 1] as usize }
            }
        }
    }

    fn count_at_most(&self, key: u32) -> usize {
        match self {
            Keys::Sorted(v) => v.partition_point(|&k| k <= key),
            Keys::Runs { keys, ends } => {
                let i = keys.partition_point(|&k| k <= key);
                if i == 0 { 0 } else { ends[i - 1] as usize }
            }
        }
    }

    /// The `i`-th smallest key (0-based).
    fn nth(&self, i: usize) -> Option<u32> {
        match self {
            Keys::Sorted(v) => v.get(i).copied(),
            Keys::Runs { keys, ends } => {
                let r = ends.partition_point(|&e| e <= i as u64);
                keys.get(r).copied()
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Keys::Sorted(v) => v.len() * 4,
            Keys::Runs { keys, ends } => keys.len() * 4 + ends.len() * 8,
        }
    }
}

/// Magnitude keys of a 16-bit float tensor as runs, from its bit-pattern counts: the
/// magnitude is the pattern without its sign, and each pattern's key is the key of its value.
fn magnitude_runs(counts: &[u64], decode: fn(u16) -> f32) -> Keys {
    // NaN patterns all map to key 0; every other magnitude to its own key, in pattern order.
    let mut by_magnitude = vec![0u64; 1 << 15];
    for (p, &n) in counts.iter().enumerate() {
        by_magnitude[p & 0x7fff] += n;
    }
    let mut pairs: Vec<(u32, u64)> = by_magnitude
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(p, n)| (super::key_of_score(decode(p as u16)), *n))
        .collect();
    pairs.sort_by_key(|p| p.0);
    let (mut keys, mut ends) = (Vec::new(), Vec::new());
    let mut total = 0u64;
    for (k, n) in pairs {
        total += n;
        if keys.last() == Some(&k) {
            *ends.last_mut().expect("a run") = total;
        } else {
            keys.push(k);
            ends.push(total);
        }
    }
    Keys::Runs { keys, ends }
}

impl std::fmt::Debug for ScoreIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScoreIndex")
            .field("criterion", &self.criterion)
            .field("seed", &self.seed)
            .finish()
    }
}

/// Bytes the sorted keys of `criterion` take for `model`: four a weight, except for the 16-bit
/// float tensors that take runs under magnitude (a few hundred KB each at most).
pub fn sorted_key_bytes(model: &Model, criterion: Criterion) -> u64 {
    (0..model.tensors.len())
        .filter(|&t| model.tensors[t].analysable())
        .filter(|&t| !criterion.orders_as_magnitude() || model.half_decoder(t).is_none())
        // Precomputed criteria hold each weight's score beside its key.
        .map(|t| (if criterion.precomputed() { 8 } else { 4 }) * model.tensors[t].numel as u64)
        .sum()
}

/// Memory the system could still give this process (`MemAvailable`), where it says.
fn available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Refuses an index that would not fit: more than 80 % of the available memory would have the
/// process killed mid-build instead of saying why.
fn check_fits(model: &Model, need: u64, available: Option<u64>) -> Result<(), PruneError> {
    match available {
        Some(avail) if need > avail / 5 * 4 => {
            let mut dtypes: Vec<String> = model
                .tensors
                .iter()
                .filter(|e| e.analysable())
                .map(|e| e.dtype.safetensors_name().to_string())
                .collect();
            dtypes.sort();
            dtypes.dedup();
            Err(PruneError::IndexTooLarge {
                model: model.display_name(),
                dtypes: dtypes.join("/"),
                need_mb: need >> 20,
                avail_mb: avail >> 20,
            })
        }
        _ => Ok(()),
    }
}

impl ScoreIndex {
    /// Scores every analysable tensor and sorts the keys, tensors in parallel.
    pub fn build(
        model: &Model,
        criterion: Criterion,
        seed: u64,
        inputs: &ScoreInputs,
        progress: &Progress,
    ) -> Result<ScoreIndex, PruneError> {
        check_fits(model, sorted_key_bytes(model, criterion), available_bytes())?;
        let total: u64 = model
            .tensors
            .iter()
            .filter(|t| t.analysable())
            .map(|t| t.numel as u64)
            .sum::<u64>()
            .max(1);
        if criterion.precomputed() {
            let scores = super::calibrate::tensor_scores(model, criterion, inputs, progress)?;
            return Ok(ScoreIndex::from_scores(
                criterion,
                seed,
                scores,
                super::calibrate::calibration_key(criterion, inputs),
            ));
        }
        let done = AtomicU64::new(0);
        let label = format!("Scoring ({})", criterion.label());
        let sorted = (0..model.tensors.len())
            .into_par_iter()
            .map(|t| -> Result<Option<Keys>, PruneError> {
                let e = &model.tensors[t];
                if !e.analysable() {
                    return Ok(None);
                }
                if criterion.orders_as_magnitude()
                    && let Some(decode) = model.half_decoder(t)
                {
                    let given = inputs
                        .patterns
                        .and_then(|p| p.get(t))
                        .and_then(|c| c.as_ref());
                    let counted;
                    let counts = match given {
                        Some(c) => c,
                        None => {
                            counted = model.pattern_counts(t, progress).expect("a 16-bit tensor");
                            &counted
                        }
                    };
                    progress.check()?;
                    let runs = magnitude_runs(counts, decode);
                    let d = done.fetch_add(e.numel as u64, Ordering::Relaxed) + e.numel as u64;
                    progress.report(d as f32 / total as f32, &label);
                    return Ok(Some(runs));
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
                Ok(Some(Keys::Sorted(keys)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ScoreIndex {
            criterion,
            seed,
            sorted,
            scores: None,
            calibration: None,
            channels: Default::default(),
            blocks: Default::default(),
        })
    }

    /// The index of scores computed a tensor at a time (`None` where not analysable).
    pub fn from_scores(
        criterion: Criterion,
        seed: u64,
        scores: Vec<Option<Vec<f32>>>,
        calibration: Option<String>,
    ) -> ScoreIndex {
        let sorted = scores
            .par_iter()
            .map(|s| {
                s.as_ref().map(|s| {
                    let mut keys: Vec<u32> = s.iter().map(|&v| key_of_score(v)).collect();
                    radix_sort_u32(&mut keys);
                    Keys::Sorted(keys)
                })
            })
            .collect();
        ScoreIndex {
            criterion,
            seed,
            sorted,
            scores: Some(Arc::new(scores)),
            calibration,
            channels: Default::default(),
            blocks: Default::default(),
        }
    }

    pub fn blocks(&self) -> &super::blocks::BlockCache {
        &self.blocks
    }

    /// The channel order for structured pruning, made by `make` the first time.
    pub fn channel_order(
        &self,
        make: impl FnOnce() -> Result<super::structured::ChannelOrder, PruneError>,
    ) -> Result<Arc<super::structured::ChannelOrder>, PruneError> {
        self.channels
            .get_or_init(|| make().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(PruneError::Structured)
    }

    /// Fills `out` with the keys of elements `start..start + out.len()` of tensor `t`: the
    /// one way masks read scores, whichever criterion made them.
    pub fn fill_keys(
        &self,
        model: &Model,
        t: usize,
        start: usize,
        values: &mut [f32],
        out: &mut [u32],
    ) {
        match self.scores.as_ref().and_then(|s| s.get(t)?.as_ref()) {
            Some(s) => {
                let n = out.len();
                for (o, &v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = key_of_score(v);
                }
            }
            None => self
                .criterion
                .fill_keys(model, self.seed, t, start, values, out),
        }
    }

    fn of(&self, t: usize) -> Option<&Keys> {
        self.sorted.get(t).and_then(|s| s.as_ref())
    }

    /// Keys of tensor `t` (0 for tensors that are not analysable).
    pub fn len(&self, t: usize) -> usize {
        self.of(t).map_or(0, Keys::len)
    }

    /// The `i`-th smallest key of tensor `t` (0-based).
    pub fn nth_key(&self, t: usize, i: usize) -> Option<u32> {
        self.of(t)?.nth(i)
    }

    /// Number of elements of `t` whose key is `< key`.
    #[inline]
    pub fn count_below(&self, t: usize, key: u32) -> usize {
        self.of(t).map_or(0, |k| k.count_below(key))
    }

    /// Number of elements of `t` whose key is `<= key`.
    #[inline]
    pub fn count_at_most(&self, t: usize, key: u32) -> usize {
        self.of(t).map_or(0, |k| k.count_at_most(key))
    }

    /// Bytes held by the index.
    pub fn heap_bytes(&self) -> usize {
        self.sorted.iter().flatten().map(Keys::heap_bytes).sum()
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

    /// A safetensors file of the given (name, dtype, shape, raw little-endian bytes).
    fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape,
                    "data_offsets": [data.len(), data.len() + bytes.len()]}),
            );
            data.extend_from_slice(bytes);
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        out
    }

    /// 16-bit values drawn from a small set, so ties abound: ±0, NaN, ±inf, subnormals and a
    /// few dozen ordinary magnitudes of both signs.
    fn tied_bits(n: usize, seed: u64, bf16: bool) -> Vec<u16> {
        let mut rng = SplitMix64::new(seed);
        let specials: [u16; 6] = if bf16 {
            [0x0000, 0x8000, 0x7fc0, 0x7f80, 0xff80, 0x0001]
        } else {
            [0x0000, 0x8000, 0x7e00, 0x7c00, 0xfc00, 0x0001]
        };
        (0..n)
            .map(|_| {
                if rng.below(10) == 0 {
                    specials[rng.below(6) as usize]
                } else {
                    let v = (rng.below(40) as f32 - 20.0) / 8.0;
                    if bf16 {
                        half::bf16::from_f32(v).to_bits()
                    } else {
                        half::f16::from_f32(v).to_bits()
                    }
                }
            })
            .collect()
    }

    #[test]
    fn an_index_that_would_not_fit_is_refused_with_the_figures() {
        let m = crate::model::Model::from_f32_tensors(
            "big",
            vec![("w".into(), vec![1000, 1000], vec![0.5; 1_000_000])],
        );
        assert_eq!(sorted_key_bytes(&m, Criterion::Magnitude), 4_000_000);
        // 4 MB of keys against 4.5 MB available: over 80 %, refused with both figures.
        let e = check_fits(&m, 4_000_000, Some(4_500_000))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 3 MB") && e.contains("F32") && e.contains("4 MB available"),
            "{e}"
        );
        assert!(check_fits(&m, 4_000_000, Some(100_000_000)).is_ok());
        assert!(check_fits(&m, 4_000_000, None).is_ok());
    }

    #[test]
    fn runs_answer_as_the_sorted_keys_and_prune_identically() {
        use crate::prune::{Pattern, PruneSettings, Scope, allocate, build_masks, key_of_score};
        for bf16 in [true, false] {
            let dtype = if bf16 { "BF16" } else { "F16" };
            let shapes = [vec![37, 41], vec![8, 3, 3, 3], vec![1000, 7]];
            let bits: Vec<Vec<u16>> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| tied_bits(s.iter().product(), i as u64 + 11, bf16))
                .collect();
            let names = ["a.weight", "b.weight", "c.weight"];
            let half_model = crate::model::Model::from_safetensors_bytes(
                "h",
                safetensors(
                    &(0..3)
                        .map(|i| {
                            let raw = bits[i].iter().flat_map(|b| b.to_le_bytes()).collect();
                            (names[i], dtype, shapes[i].clone(), raw)
                        })
                        .collect::<Vec<_>>(),
                ),
            )
            .unwrap();
            // The same values as F32: its index is the foundation's sorted one.
            let f32_model = crate::model::Model::from_safetensors_bytes(
                "f",
                safetensors(
                    &(0..3)
                        .map(|i| {
                            let raw = (0..bits[i].len())
                                .flat_map(|j| half_model.to_f32_vec(i)[j].to_le_bytes())
                                .collect();
                            (names[i], "F32", shapes[i].clone(), raw)
                        })
                        .collect::<Vec<_>>(),
                ),
            )
            .unwrap();
            let p = Progress::none();
            let runs = ScoreIndex::build(
                &half_model,
                Criterion::Magnitude,
                0,
                &ScoreInputs::default(),
                &p,
            )
            .unwrap();
            let sorted = ScoreIndex::build(
                &f32_model,
                Criterion::Magnitude,
                0,
                &ScoreInputs::default(),
                &p,
            )
            .unwrap();
            // Counts taken once at open (as the worker does) build the same index.
            let patterns = half_model.all_pattern_counts(&p).unwrap();
            let shared = ScoreIndex::build(
                &half_model,
                Criterion::Magnitude,
                0,
                &ScoreInputs {
                    patterns: Some(&patterns),
                    ..Default::default()
                },
                &p,
            )
            .unwrap();
            for t in 0..3 {
                assert!(matches!(runs.of(t), Some(Keys::Runs { .. })));
                for i in [0, 1, runs.len(t) / 2, runs.len(t) - 1] {
                    assert_eq!(shared.nth_key(t, i), runs.nth_key(t, i));
                }
                assert!(matches!(sorted.of(t), Some(Keys::Sorted(_))));
                // Against brute force: every key of the tensor, sorted.
                let mut all: Vec<u32> = half_model
                    .to_f32_vec(t)
                    .iter()
                    .map(|v| key_of_score(v.abs()))
                    .collect();
                all.sort_unstable();
                assert_eq!(runs.len(t), all.len());
                for i in (0..all.len()).step_by(7) {
                    assert_eq!(runs.nth_key(t, i), Some(all[i]), "{dtype} t{t} i{i}");
                }
                for &k in all.iter().step_by(5).chain([&0, &1, &u32::MAX]) {
                    assert_eq!(runs.count_below(t, k), all.partition_point(|&x| x < k));
                    assert_eq!(runs.count_at_most(t, k), all.partition_point(|&x| x <= k));
                }
            }
            // The exact-count rule: the same allocations and masks, tie by tie.
            for sparsity in [0.0, 0.13, 0.5, 0.77, 0.999, 1.0] {
                for scope in [Scope::Global, Scope::Layer] {
                    let mut s = PruneSettings {
                        sparsity,
                        scope,
                        pattern: Pattern::Unstructured,
                        min_keep: 0.05,
                        ..Default::default()
                    };
                    for n in names {
                        s.layer_mut(n).sparsity = sparsity;
                    }
                    let (a1, a2) = (
                        allocate(&half_model, &runs, &s),
                        allocate(&f32_model, &sorted, &s),
                    );
                    assert_eq!(
                        a1.layers.iter().map(|l| l.pruned).collect::<Vec<_>>(),
                        a2.layers.iter().map(|l| l.pruned).collect::<Vec<_>>()
                    );
                    let m1 = build_masks(&half_model, &runs, &s, &a1, &p).unwrap();
                    let m2 = build_masks(&f32_model, &sorted, &s, &a2, &p).unwrap();
                    for n in names {
                        assert_eq!(
                            m1.get(n).unwrap().words(),
                            m2.get(n).unwrap().words(),
                            "{dtype} {n} {sparsity}"
                        );
                    }
                }
            }
            assert!(runs.heap_bytes() < sorted.heap_bytes());
            assert_eq!(sorted_key_bytes(&half_model, Criterion::Magnitude), 0);
            assert!(sorted_key_bytes(&half_model, Criterion::Random) > 0);
        }
    }

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
