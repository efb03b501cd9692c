//! Masks: one bit per weight (1 = kept), keyed by tensor name.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::{Allocation, LayerAlloc, Pattern, PruneError, PruneSettings, ScoreIndex, nm_lines};
use crate::model::{DECODE_CHUNK, Model};
use crate::progress::Progress;

/// A bit per weight, 1 where the weight is kept.
#[derive(Clone, PartialEq, Eq)]
pub struct Mask {
    words: Vec<u64>,
    len: usize,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mask({} of {} kept)", self.count_kept(), self.len)
    }
}

impl Mask {
    pub fn all_kept(len: usize) -> Mask {
        let mut words = vec![u64::MAX; len.div_ceil(64)];
        if !len.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last = (1u64 << (len % 64)) - 1;
        }
        Mask { words, len }
    }
    pub fn all_pruned(len: usize) -> Mask {
        Mask {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }
    pub fn from_kept(kept: &[bool]) -> Mask {
        let mut m = Mask::all_pruned(kept.len());
        for (i, &k) in kept.iter().enumerate() {
            if k {
                m.words[i / 64] |= 1 << (i % 64);
            }
        }
        m
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    #[inline]
    pub fn kept(&self, i: usize) -> bool {
        (self.words[i / 64] >> (i % 64)) & 1 == 1
    }
    #[inline]
    pub fn set(&mut self, i: usize, kept: bool) {
        if kept {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }
    pub fn count_kept(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Kept weights in elements `range`.
    pub fn count_kept_in(&self, start: usize, end: usize) -> usize {
        (start..end).filter(|&i| self.kept(i)).count()
    }
    /// One byte per weight, 1 = kept: the export format.
    pub fn to_u8(&self) -> Vec<u8> {
        (0..self.len).map(|i| self.kept(i) as u8).collect()
    }
    /// Zeroes the pruned entries of `values` (the tensor this mask belongs to), a word at a time.
    pub fn apply(&self, values: &mut [f32]) {
        for (w, &word) in self.words.iter().enumerate() {
            if word == u64::MAX {
                continue;
            }
            let base = w * 64;
            let end = (base + 64).min(values.len());
            for (i, v) in values[base..end].iter_mut().enumerate() {
                if (word >> i) & 1 == 0 {
                    *v = 0.0;
                }
            }
        }
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

/// Masks of the prunable tensors, keyed by tensor name. Tensors absent here are dense.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MaskSet {
    masks: BTreeMap<String, Mask>,
}

impl MaskSet {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a mask, checking it against the model's tensor of that name.
    pub fn insert(&mut self, model: &Model, name: &str, mask: Mask) -> Result<(), PruneError> {
        let t = model
            .find(name)
            .ok_or_else(|| PruneError::UnknownTensor(name.to_string()))?;
        if model.tensors[t].numel != mask.len() {
            return Err(PruneError::NotAnalysable(format!(
                "{name} (mask has {} elements, tensor {})",
                mask.len(),
                model.tensors[t].numel
            )));
        }
        self.masks.insert(name.to_string(), mask);
        Ok(())
    }
    pub fn get(&self, name: &str) -> Option<&Mask> {
        self.masks.get(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Mask)> {
        self.masks.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn len(&self) -> usize {
        self.masks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }
    pub fn total_kept(&self) -> u64 {
        self.masks.values().map(|m| m.count_kept() as u64).sum()
    }
}

/// Elements per parallel task in unstructured mask building; a multiple of 64 so that each
/// task owns whole words.
const TASK_ELEMS: usize = 64 * DECODE_CHUNK;

/// Builds the masks that an allocation describes, tensors and chunks in parallel.
pub fn build_masks(
    model: &Model,
    index: &ScoreIndex,
    settings: &PruneSettings,
    alloc: &Allocation,
    progress: &Progress,
) -> Result<MaskSet, PruneError> {
    if settings.pattern.structured() {
        let order = super::structured::order_for(model, index)?;
        return super::structured::masks(model, &order, settings);
    }
    let built: Vec<(usize, Mask)> = alloc
        .layers
        .par_iter()
        .map(|l| -> Result<(usize, Mask), PruneError> {
            progress.check()?;
            Ok((l.tensor, build_layer_mask(model, index, settings, l)))
        })
        .collect::<Result<_, _>>()?;
    let mut set = MaskSet::new();
    for (t, m) in built {
        set.insert(model, &model.tensors[t].name, m)?;
    }
    Ok(set)
}

/// Builds the mask of one prunable tensor from its allocation.
pub fn build_layer_mask(
    model: &Model,
    index: &ScoreIndex,
    settings: &PruneSettings,
    l: &LayerAlloc,
) -> Mask {
    let locked = settings.layer(&model.tensors[l.tensor].name).locked;
    if settings.pattern.structured() {
        return match super::structured::order_for(model, index) {
            Ok(order) => super::structured::tensor_mask(model, &order, settings, l.tensor),
            Err(_) => Mask::all_kept(l.numel),
        };
    }
    match settings.pattern {
        Pattern::NM { n, m } if !locked => nm_mask(model, index, l.tensor, n, m),
        Pattern::Block { .. } => super::blocks::tensor_mask(model, index, settings, l.tensor),
        _ => unstructured_mask(model, index, l.tensor, l.pruned),
    }
}

fn unstructured_mask(model: &Model, index: &ScoreIndex, t: usize, pruned: usize) -> Mask {
    let n = model.tensors[t].numel;
    if pruned == 0 {
        return Mask::all_kept(n);
    }
    if pruned >= n {
        return Mask::all_pruned(n);
    }
    let t_key = index
        .nth_key(t, pruned - 1)
        .expect("an allocation prunes at most the tensor's keys");
    let below = index.count_below(t, t_key);
    let ties = index.count_at_most(t, t_key) - below;
    let ties_pruned = pruned - below;
    let mut mask = Mask::all_pruned(n);
    if ties_pruned == ties {
        // Every weight with key ≤ t_key goes: no order dependence, so chunks run in parallel.
        mask.words
            .par_chunks_mut(TASK_ELEMS / 64)
            .enumerate()
            .for_each(|(c, words)| {
                let start = c * TASK_ELEMS;
                let end = (start + TASK_ELEMS).min(n);
                let mut vals = [0f32; DECODE_CHUNK];
                let mut ks = [0u32; DECODE_CHUNK];
                let mut i = start;
                while i < end {
                    let len = (end - i).min(DECODE_CHUNK);
                    index.fill_keys(model, t, i, &mut vals, &mut ks[..len]);
                    for (j, &k) in ks[..len].iter().enumerate() {
                        let bit = i - start + j;
                        words[bit / 64] |= ((k > t_key) as u64) << (bit % 64);
                    }
                    i += len;
                }
            });
    } else {
        // Only some ties go, the first in flat order: one sequential pass over this tensor.
        let mut left = ties_pruned;
        let mut vals = [0f32; DECODE_CHUNK];
        let mut ks = [0u32; DECODE_CHUNK];
        let mut i = 0;
        while i < n {
            let len = (n - i).min(DECODE_CHUNK);
            index.fill_keys(model, t, i, &mut vals, &mut ks[..len]);
            for (j, &k) in ks[..len].iter().enumerate() {
                let keep = k > t_key || (k == t_key && left == 0);
                if k == t_key && left > 0 {
                    left -= 1;
                }
                if keep {
                    mask.set(i + j, true);
                }
            }
            i += len;
        }
    }
    mask
}

fn nm_mask(model: &Model, index: &ScoreIndex, t: usize, n: usize, m: usize) -> Mask {
    let e = &model.tensors[t];
    let mut keys = vec![0u32; e.numel];
    let mut vals = vec![0f32; DECODE_CHUNK];
    for (c, chunk) in keys.chunks_mut(DECODE_CHUNK).enumerate() {
        index.fill_keys(model, t, c * DECODE_CHUNK, &mut vals, chunk);
    }
    let lines = nm_lines(e);
    let mut mask = Mask::all_kept(e.numel);
    let mut group: Vec<(u32, usize)> = Vec::with_capacity(m);
    for o in 0..lines.outer {
        for r in 0..lines.stride {
            let base = o * lines.len * lines.stride + r;
            let mut i = 0;
            while i < lines.len {
                let g = (lines.len - i).min(m);
                group.clear();
                group.extend((i..i + g).map(|j| {
                    let idx = base + j * lines.stride;
                    (keys[idx], idx)
                }));
                // Lowest (key, flat index) first: those are pruned.
                group.sort_unstable();
                for &(_, idx) in group.iter().take(g.saturating_sub(n)) {
                    mask.set(idx, false);
                }
                i += g;
            }
        }
    }
    mask
}

/// Tensor `t` decoded to f32, with its mask applied where `masks` holds one.
pub fn masked_f32(model: &Model, t: usize, masks: Option<&MaskSet>) -> Vec<f32> {
    let mut v = Vec::new();
    masked_f32_into(model, t, masks, &mut v);
    v
}

/// Turns `v`, tensor `t` under mask `old` (`None`: dense), into the tensor under `new`,
/// writing only the entries whose bit differs: a zero where one is pruned now, the stored value
/// where one is kept again. `false`, with `v` untouched, where the tensor is not stored as f32
/// or the masks do not fit it.
pub fn remask_f32(
    model: &Model,
    t: usize,
    old: Option<&Mask>,
    new: Option<&Mask>,
    v: &mut [f32],
) -> bool {
    let e = &model.tensors[t];
    let fits = |m: Option<&Mask>| m.is_none_or(|m| m.len() == e.numel);
    if e.dtype != crate::model::DType::F32 || v.len() != e.numel || !fits(old) || !fits(new) {
        return false;
    }
    let bytes = model.tensor_bytes(t);
    let word = |m: Option<&Mask>, w: usize| m.map_or(u64::MAX, |m| m.words[w]);
    for w in 0..e.numel.div_ceil(64) {
        let now = word(new, w);
        let mut diff = word(old, w) ^ now;
        while diff != 0 {
            let bit = diff.trailing_zeros() as usize;
            diff &= diff - 1;
            let i = w * 64 + bit;
            if i >= v.len() {
                break;
            }
            v[i] = if (now >> bit) & 1 == 1 {
                f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
            } else {
                0.0
            };
        }
    }
    true
}

/// [`masked_f32`] into `v`, reusing its memory (a multi-megabyte weight re-read on every mask
/// change would otherwise fault its pages in afresh each time).
pub fn masked_f32_into(model: &Model, t: usize, masks: Option<&MaskSet>, v: &mut Vec<f32>) {
    v.resize(model.tensors[t].numel, 0.0);
    model.read_f32(t, 0, v);
    if let Some(m) = masks.and_then(|m| m.get(&model.tensors[t].name)) {
        m.apply(v);
    }
}

#[cfg(test)]
mod apply_tests {
    use super::Mask;

    #[test]
    fn remasking_equals_masking_afresh() {
        // Against the plain route (decode everything, apply the new mask), from dense, between
        // two masks, back to dense, over word boundaries and with non-finite values kept.
        let len = 200;
        let mut w: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin()).collect();
        w[3] = f32::NAN;
        w[70] = f32::INFINITY;
        let model =
            crate::model::Model::from_f32_tensors("remask", vec![("w".into(), vec![len], w)]);
        let a = Mask::from_kept(&(0..len).map(|i| i % 3 != 0).collect::<Vec<_>>());
        let b = Mask::from_kept(&(0..len).map(|i| i % 5 != 1 && i < 150).collect::<Vec<_>>());
        let mut v = model.to_f32_vec(0);
        let fresh = |m: Option<&Mask>| {
            let mut x = model.to_f32_vec(0);
            if let Some(m) = m {
                m.apply(&mut x);
            }
            x
        };
        let mut was = None;
        for now in [Some(&a), Some(&b), None, Some(&b)] {
            assert!(super::remask_f32(&model, 0, was, now, &mut v));
            let want = fresh(now);
            assert!(v.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
            was = now;
        }
        // A mask of another length is refused, the values left alone.
        let short = Mask::from_kept(&[true; 10]);
        assert!(!super::remask_f32(&model, 0, None, Some(&short), &mut v));
    }

    #[test]
    fn apply_zeroes_exactly_the_pruned_entries() {
        // Lengths around word boundaries, patterns with whole words kept and pruned.
        for len in [1usize, 63, 64, 65, 130, 200] {
            let kept: Vec<bool> = (0..len)
                .map(|i| i % 3 != 0 && !(64..128).contains(&i))
                .collect();
            let m = Mask::from_kept(&kept);
            let mut v: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            m.apply(&mut v);
            for i in 0..len {
                assert_eq!(v[i] != 0.0, kept[i], "len {len}, entry {i}");
            }
        }
    }
}
