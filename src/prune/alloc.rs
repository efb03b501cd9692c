//! Turning settings into per-tensor pruned counts, by binary search over sorted keys.

use super::{Pattern, PruneSettings, Scope, ScoreIndex, nm_pruned_count, score_of_key};
use crate::model::Model;

/// The outcome for one prunable tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerAlloc {
    pub tensor: usize,
    pub numel: usize,
    pub pruned: usize,
    /// The largest pruned score (unstructured patterns with something pruned).
    pub threshold: Option<f32>,
    /// The tensor stopped at its cap (lock, min-keep or max sparsity) in global scope.
    pub capped: bool,
}

impl LayerAlloc {
    pub fn kept(&self) -> usize {
        self.numel - self.pruned
    }
    pub fn sparsity(&self) -> f64 {
        if self.numel == 0 {
            0.0
        } else {
            self.pruned as f64 / self.numel as f64
        }
    }
}

/// Per-tensor pruned counts for every prunable tensor, in model order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    pub layers: Vec<LayerAlloc>,
    /// Weights in prunable tensors.
    pub prunable: u64,
    /// Weights actually pruned.
    pub pruned: u64,
    /// Weights the target asked for (global scope); equals `pruned` unless caps forbid it.
    pub requested: u64,
    /// What a structured cut removes, for structured patterns.
    pub structured: Option<StructuredCut>,
}

/// A structured cut in whole channels.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StructuredCut {
    /// Channels removed, over all dependency groups, and the groups' channels in all.
    pub removed: u64,
    pub channels: u64,
    /// Parameters of the model compacted to its kept channels (every tensor, biases and norms
    /// included).
    pub compacted_params: u64,
    /// Multiply-adds a sample of the Linear and Conv2d layers, (dense, compacted); `None`
    /// where only tract runs the model.
    pub macs: Option<(u64, u64)>,
}

impl Allocation {
    /// The allocation that `masks` realise on `settings`' prunable tensors.
    pub fn of_masks(model: &Model, settings: &PruneSettings, masks: &super::MaskSet) -> Allocation {
        let mut a = Allocation::default();
        for t in 0..model.tensors.len() {
            if !settings.is_prunable(model, t) {
                continue;
            }
            let numel = model.tensors[t].numel;
            let kept = masks
                .get(&model.tensors[t].name)
                .map_or(numel, |m| m.count_kept());
            a.prunable += numel as u64;
            a.pruned += (numel - kept) as u64;
            a.layers.push(LayerAlloc {
                tensor: t,
                numel,
                pruned: numel - kept,
                threshold: None,
                capped: false,
            });
        }
        a.requested = a.pruned;
        a
    }

    pub fn sparsity(&self) -> f64 {
        if self.prunable == 0 {
            0.0
        } else {
            self.pruned as f64 / self.prunable as f64
        }
    }
    pub fn reached(&self) -> bool {
        self.pruned == self.requested
    }
    /// The layer of tensor `t`. Layers are in tensor order (see [`allocate`]), so this is a
    /// binary search: the table and size report ask it once per tensor.
    pub fn for_tensor(&self, t: usize) -> Option<&LayerAlloc> {
        let i = self.layers.binary_search_by_key(&t, |l| l.tensor).ok()?;
        self.layers.get(i)
    }
}

/// Computes how many weights each prunable tensor loses.
///
/// Global scope prunes exactly `round(S·N)` of the N prunable weights, smallest keys first,
/// ties broken by (layer order, flat index); a tensor never goes past its cap (locked: 0;
/// otherwise it keeps at least `max(min_keep, 1 - max_sparsity)` of its weights) and the
/// others prune more instead, so the global target holds while it is reachable.
pub fn allocate(model: &Model, index: &ScoreIndex, settings: &PruneSettings) -> Allocation {
    let tensors: Vec<usize> = (0..model.tensors.len())
        .filter(|&t| settings.is_prunable(model, t))
        .collect();
    let numel = |t: usize| model.tensors[t].numel;
    let locked = |t: usize| settings.layer(&model.tensors[t].name).locked;
    let prunable: u64 = tensors.iter().map(|&t| numel(t) as u64).sum();

    let mut layers: Vec<LayerAlloc> = tensors
        .iter()
        .map(|&t| LayerAlloc {
            tensor: t,
            numel: numel(t),
            pruned: 0,
            threshold: None,
            capped: false,
        })
        .collect();

    if settings.pattern.structured() {
        // Validation has checked that the model has groups; without, nothing is cut.
        return match super::structured::order_for(model, index) {
            Ok(order) => super::structured::allocate(model, &order, settings),
            Err(_) => Allocation {
                layers,
                prunable,
                ..Default::default()
            },
        };
    }
    if let Pattern::Block { .. } = settings.pattern {
        return super::blocks::allocate(model, index, settings);
    }
    let requested;
    match (settings.pattern, settings.scope) {
        (Pattern::NM { n, m }, _) => {
            for l in &mut layers {
                if !locked(l.tensor) {
                    l.pruned = nm_pruned_count(&model.tensors[l.tensor], n, m);
                }
            }
            requested = layers.iter().map(|l| l.pruned as u64).sum();
        }
        (Pattern::Neuron | Pattern::Channel | Pattern::Head | Pattern::Block { .. }, _) => {
            unreachable!("returned above")
        }
        (Pattern::Unstructured, Scope::Layer | Scope::Sensitivity) => {
            for l in &mut layers {
                if !locked(l.tensor) {
                    let s = settings
                        .layer(&model.tensors[l.tensor].name)
                        .sparsity
                        .clamp(0.0, 1.0);
                    l.pruned = ((s * l.numel as f64).round() as usize).min(l.numel);
                }
            }
            requested = layers.iter().map(|l| l.pruned as u64).sum();
        }
        (Pattern::Unstructured, Scope::Global) => {
            let caps: Vec<usize> = tensors
                .iter()
                .map(|&t| {
                    let ls = settings.layer(&model.tensors[t].name);
                    if ls.locked {
                        return 0;
                    }
                    let n = numel(t);
                    let keep = settings
                        .min_keep
                        .max(1.0 - ls.max_sparsity.unwrap_or(1.0))
                        .clamp(0.0, 1.0);
                    let min_kept = ((keep * n as f64) - 1e-9).ceil().max(0.0) as usize;
                    n - min_kept.min(n)
                })
                .collect();
            requested = (settings.sparsity.clamp(0.0, 1.0) * prunable as f64).round() as u64;
            let cap_total: u64 = caps.iter().map(|&c| c as u64).sum();
            let k = requested.min(cap_total);
            if k > 0 {
                let f = |key: u32| -> u64 {
                    tensors
                        .iter()
                        .zip(&caps)
                        .map(|(&t, &c)| index.count_at_most(t, key).min(c) as u64)
                        .sum()
                };
                // Smallest key whose "≤ key" count reaches k.
                let (mut lo, mut hi) = (0u32, u32::MAX);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if f(mid) >= k { hi = mid } else { lo = mid + 1 }
                }
                let t_key = lo;
                let mut rest = k;
                let below: Vec<usize> = tensors
                    .iter()
                    .zip(&caps)
                    .map(|(&t, &c)| index.count_below(t, t_key).min(c))
                    .collect();
                rest -= below.iter().map(|&b| b as u64).sum::<u64>();
                for (i, l) in layers.iter_mut().enumerate() {
                    let t = l.tensor;
                    let at_most = index.count_at_most(t, t_key);
                    let ties = at_most - index.count_below(t, t_key);
                    let room = caps[i] - below[i];
                    let take = (ties.min(room) as u64).min(rest) as usize;
                    rest -= take as u64;
                    l.pruned = below[i] + take;
                    // At its cap while the threshold (or an unreachable target) wanted more.
                    l.capped = caps[i] < l.numel
                        && l.pruned == caps[i]
                        && (at_most > caps[i] || requested > k);
                }
            }
        }
    }
    if settings.pattern == Pattern::Unstructured {
        for l in &mut layers {
            if l.pruned > 0 {
                l.threshold = index.nth_key(l.tensor, l.pruned - 1).map(score_of_key);
            }
        }
    }
    let pruned = layers.iter().map(|l| l.pruned as u64).sum();
    Allocation {
        layers,
        prunable,
        pruned,
        requested,
        structured: None,
    }
}
