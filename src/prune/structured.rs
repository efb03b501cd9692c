//! Structured pruning over dependency groups: whole output channels (conv filters, Linear
//! neurons) go, with every tensor slice their group ties to them (bias, BatchNorm, the next
//! layer's inputs), so the masked model is exactly a smaller model (see [`crate::export`]'s
//! compaction).
//!
//! Channels are ranked once per score index by the criterion summed over the group's weight
//! slices (magnitude: the L1 norm; `l2`: the L2 norm); a sparsity then removes the lowest
//! `C − kept` channels of every group, `kept` rounded up to the width multiple.

use std::sync::Arc;

use super::{
    Allocation, Criterion, LayerAlloc, Mask, MaskSet, Pattern, PruneError, PruneSettings,
    ScoreIndex, score_of_key,
};
use crate::graph::{Group, Groups, Member};
use crate::model::{DECODE_CHUNK, Model};

/// The model's dependency groups and, for each, its channels from least to most important.
#[derive(Debug)]
pub struct ChannelOrder {
    pub groups: Groups,
    /// Per group: channel indices, lowest score first (ties by index).
    pub order: Vec<Vec<usize>>,
    /// Per group: the weights (≥ 2 dims) that make its channels, for the kind of cut and locks.
    pub producers: Vec<Vec<usize>>,
    /// Each Linear or Conv2d weight (by tensor) with the multiply-adds one of its entries does
    /// a sample, from prunescope's graph; empty where only tract runs the model.
    pub uses: Vec<(usize, f64)>,
}

/// Whether a group's channels are Linear neurons (2-D producer), conv channels (4-D) or
/// attention heads.
fn kind_matches(model: &Model, group: &Group, producers: &[usize], pattern: Pattern) -> bool {
    if group.head_dim.is_some() || pattern == Pattern::Head {
        return group.head_dim.is_some() && pattern == Pattern::Head;
    }
    producers.iter().any(|&t| match pattern {
        Pattern::Neuron => model.tensors[t].shape.len() == 2,
        Pattern::Channel => model.tensors[t].shape.len() > 2,
        _ => false,
    })
}

/// Checks that `groups` (`model`'s, from [`groups_of`]) hold channels of `pattern`'s kind, or
/// says why not (the other kind only).
pub fn check_groups(model: &Model, groups: &Groups, pattern: Pattern) -> Result<(), PruneError> {
    let producers = producers_of(model, groups);
    if groups
        .groups
        .iter()
        .zip(&producers)
        .any(|(g, p)| kind_matches(model, g, p, pattern))
    {
        return Ok(());
    }
    let heads = groups.groups.iter().any(|g| g.head_dim.is_some());
    let (what, other) = match pattern {
        Pattern::Neuron if heads => ("Linear neurons", "head"),
        Pattern::Neuron => ("Linear neurons", "channel"),
        Pattern::Head => ("attention heads", "neuron"),
        _ if heads => ("convolution channels", "head"),
        _ => ("convolution channels", "neuron"),
    };
    Err(PruneError::Structured(format!(
        "{} has no prunable {what} ({} dependency group(s) in all{}); try --granularity {other}",
        model.display_name(),
        groups.groups.len(),
        groups
            .blocked
            .first()
            .map(|b| format!("; {} cannot go: {}", b.tensors.join(", "), b.why))
            .unwrap_or_default()
    )))
}

/// The model's dependency groups, or why structured pruning cannot follow its graph. An
/// ONNX graph that prunescope's graph does not import (a transformer) has the attention heads
/// tract-side analysis finds ([`crate::eval::GraphInfo::attention_groups`]).
pub fn groups_of(model: &Model) -> Result<Groups, PruneError> {
    groups_in(model, &crate::train::Trainable::graph_of(model))
}

/// [`groups_of`] with the model's graph, or why it has none, already read.
fn groups_in(
    model: &Model,
    graph: &Result<crate::graph::Graph, String>,
) -> Result<Groups, PruneError> {
    match graph {
        Ok(graph) => graph
            .dependency_groups(model)
            .map_err(|e| PruneError::Structured(format!("dependency groups: {e}"))),
        Err(e) => {
            let heads = match model.format {
                crate::model::ModelFormat::Onnx => crate::eval::GraphInfo::read(model)
                    .map(|info| info.attention_groups(model))
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            if heads.is_empty() {
                return Err(PruneError::Structured(format!(
                    "structured pruning follows the model's graph, and {e}"
                )));
            }
            Ok(Groups {
                groups: heads,
                blocked: Vec::new(),
            })
        }
    }
}

/// Per group: the weights (≥ 2 dims) that make its channels (for heads: every weight sliced).
fn producers_of(model: &Model, groups: &Groups) -> Vec<Vec<usize>> {
    groups
        .groups
        .iter()
        .map(|g| {
            g.members
                .iter()
                .filter(|m| m.axis == 0 || g.head_dim.is_some())
                .filter_map(|m| model.find(&m.tensor))
                .filter(|&t| model.tensors[t].shape.len() >= 2)
                .collect()
        })
        .collect()
}

/// Ranks every group's channels under the index's criterion. `Err` says why the model has no
/// groups (no graph prunescope can read).
pub fn channel_order(model: &Model, index: &ScoreIndex) -> Result<ChannelOrder, PruneError> {
    // Read once: the groups and the weights' multiply-adds both follow it.
    let graph = crate::train::Trainable::graph_of(model);
    let groups = groups_in(model, &graph)?;
    let producers = producers_of(model, &groups);
    let mut order = Vec::new();
    for g in &groups.groups {
        let mut score = vec![0f64; g.channels];
        for m in &g.members {
            let Some(t) = model.find(&m.tensor) else {
                continue;
            };
            let e = &model.tensors[t];
            if !e.analysable() || !e.default_prunable() || index.len(t) == 0 {
                continue;
            }
            let mut keys = vec![0u32; e.numel];
            let mut vals = vec![0f32; DECODE_CHUNK];
            for (c, chunk) in keys.chunks_mut(DECODE_CHUNK).enumerate() {
                index.fill_keys(model, t, c * DECODE_CHUNK, &mut vals, chunk);
            }
            for (i, &k) in keys.iter().enumerate() {
                let Some(ch) = channel_of(&e.shape, m, i).filter(|&c| c < g.channels) else {
                    continue;
                };
                let s = score_of_key(k) as f64;
                // A NaN weight says nothing about its channel's importance.
                if s.is_nan() {
                    continue;
                }
                score[ch] += if index.criterion == Criterion::L2 {
                    s * s
                } else {
                    s
                };
            }
        }
        let mut o: Vec<usize> = (0..g.channels).collect();
        o.sort_by(|&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b)));
        order.push(o);
    }
    let uses = graph
        .ok()
        .and_then(|g| g.weight_uses(model).ok())
        .map(|u| {
            u.into_iter()
                .filter_map(|(w, k)| model.find(&w).map(|t| (t, k)))
                .collect()
        })
        .unwrap_or_default();
    Ok(ChannelOrder {
        groups,
        order,
        producers,
        uses,
    })
}

/// The group channel that flat entry `i` of a tensor of `shape` belongs to through `m`.
fn channel_of(shape: &[usize], m: &Member, i: usize) -> Option<usize> {
    let inner: usize = shape.get(m.axis + 1..)?.iter().product();
    let coord = (i / inner) % shape[m.axis];
    let rel = coord.checked_sub(m.offset)?;
    let c = rel / m.per_channel.max(1);
    Some(c)
}

/// Channels each group removes under `settings` (uniformly `sparsity` of each eligible group,
/// or in layer scope the target of the group's first producer), kept widths rounded up to
/// `settings.round_width`.
pub fn plan(model: &Model, order: &ChannelOrder, settings: &PruneSettings) -> Vec<usize> {
    order
        .groups
        .groups
        .iter()
        .zip(&order.producers)
        .map(|(g, producers)| {
            // Every weight the group slices must be free to change: its producers and the
            // layers that read it.
            let eligible = kind_matches(model, g, producers, settings.pattern)
                && g.members.iter().all(|m| {
                    model.find(&m.tensor).is_none_or(|t| {
                        model.tensors[t].shape.len() < 2
                            || (settings.is_prunable(model, t) && !settings.layer(&m.tensor).locked)
                    })
                });
            if !eligible {
                return 0;
            }
            let s = settings.layer_target(&model.tensors[producers[0]].name);
            // Hardware likes widths in multiples of 8; a head count is not a width.
            let round = if g.head_dim.is_some() {
                1
            } else {
                settings.round_width
            };
            removed_channels(g.channels, s, round)
        })
        .collect()
}

/// How many of `channels` go at sparsity `s`: at least one channel stays, and the kept width
/// is rounded up to a multiple of `round` (1: no rounding) where the layer is that wide.
pub fn removed_channels(channels: usize, s: f64, round: usize) -> usize {
    if channels == 0 {
        return 0;
    }
    // kept = ⌈(1 − s)·C⌉, computed from the removed share so that 1 − 0.7 = 0.30000000000000004
    // does not keep one channel too many.
    let removed = ((s * channels as f64) + 1e-9).floor() as usize;
    let mut kept = (channels - removed.min(channels)).max(1);
    let round = round.max(1);
    if round > 1 && channels >= round {
        kept = kept.div_ceil(round) * round;
    }
    channels - kept.min(channels)
}

/// For every tensor a group slices, along each axis, which entries go.
fn removed_entries(
    model: &Model,
    order: &ChannelOrder,
    removed: &[usize],
) -> Vec<(usize, Vec<Vec<bool>>)> {
    let mut out: Vec<(usize, Vec<Vec<bool>>)> = Vec::new();
    for ((g, o), &k) in order.groups.groups.iter().zip(&order.order).zip(removed) {
        if k == 0 {
            continue;
        }
        for m in &g.members {
            let Some(t) = model.find(&m.tensor) else {
                continue;
            };
            let shape = &model.tensors[t].shape;
            if m.axis >= shape.len() {
                continue;
            }
            let i = match out.iter().position(|(x, _)| *x == t) {
                Some(i) => i,
                None => {
                    out.push((t, shape.iter().map(|&d| vec![false; d]).collect()));
                    out.len() - 1
                }
            };
            let axis = &mut out[i].1[m.axis];
            for &c in &o[..k] {
                let start = m.offset + c * m.per_channel;
                for e in axis.iter_mut().skip(start).take(m.per_channel) {
                    *e = true;
                }
            }
        }
    }
    out
}

/// Entries of a tensor of `shape` that survive when `gone[axis][coord]` slices go.
fn kept_count(shape: &[usize], gone: &[Vec<bool>]) -> usize {
    shape
        .iter()
        .zip(gone)
        .map(|(&d, g)| d - g.iter().filter(|x| **x).count())
        .product()
}

fn mask_of(shape: &[usize], gone: &[Vec<bool>]) -> Mask {
    let n: usize = shape.iter().product();
    let mut kept = vec![true; n];
    let mut stride = n;
    for (axis, &d) in shape.iter().enumerate() {
        stride /= d.max(1);
        for (coord, &g) in gone[axis].iter().enumerate() {
            if !g {
                continue;
            }
            // Every entry whose coordinate on `axis` is `coord`.
            let block = d * stride;
            let mut base = coord * stride;
            while base < n {
                for k in &mut kept[base..base + stride] {
                    *k = false;
                }
                base += block;
            }
        }
    }
    Mask::from_kept(&kept)
}

/// The allocation of a structured cut: every prunable tensor's pruned count.
pub fn allocate(model: &Model, order: &ChannelOrder, settings: &PruneSettings) -> Allocation {
    let removed = plan(model, order, settings);
    let gone = removed_entries(model, order, &removed);
    let channels: usize = order.groups.groups.iter().map(|g| g.channels).sum();
    let mut layers = Vec::new();
    let mut prunable = 0u64;
    for t in 0..model.tensors.len() {
        if !settings.is_prunable(model, t) {
            continue;
        }
        let e = &model.tensors[t];
        let pruned = gone
            .iter()
            .find(|(x, _)| *x == t)
            .map_or(0, |(_, g)| e.numel - kept_count(&e.shape, g));
        prunable += e.numel as u64;
        layers.push(LayerAlloc {
            tensor: t,
            numel: e.numel,
            pruned,
            threshold: None,
            capped: false,
        });
    }
    let pruned = layers.iter().map(|l| l.pruned as u64).sum();
    let kept_of = |t: usize| {
        let e = &model.tensors[t];
        match gone.iter().find(|(x, _)| *x == t) {
            Some((_, g)) => kept_count(&e.shape, g) as u64,
            None => e.numel as u64,
        }
    };
    let compacted = (0..model.tensors.len()).map(kept_of).sum();
    // The compacted layers keep their output sizes, so each weight entry left does as many
    // multiply-adds as before.
    let macs = (!order.uses.is_empty()).then(|| {
        let sum = |n: &dyn Fn(usize) -> u64| -> u64 {
            order
                .uses
                .iter()
                .map(|&(t, k)| (k * n(t) as f64) as u64)
                .sum()
        };
        (sum(&|t| model.tensors[t].numel as u64), sum(&kept_of))
    });
    Allocation {
        layers,
        prunable,
        pruned,
        requested: pruned,
        structured: Some(super::StructuredCut {
            removed: removed.iter().sum::<usize>() as u64,
            channels: channels as u64,
            compacted_params: compacted,
            macs,
        }),
    }
}

/// The mask of tensor `t` under a structured cut (all kept where no group slices it).
pub fn tensor_mask(
    model: &Model,
    order: &ChannelOrder,
    settings: &PruneSettings,
    t: usize,
) -> Mask {
    let removed = plan(model, order, settings);
    let gone = removed_entries(model, order, &removed);
    match gone.iter().find(|(x, _)| *x == t) {
        Some((_, g)) => mask_of(&model.tensors[t].shape, g),
        None => Mask::all_kept(model.tensors[t].numel),
    }
}

/// Masks for every tensor a structured cut touches: weights, and also biases and BatchNorm
/// parameters, so that the masked model computes exactly what the compacted one does.
pub fn masks(
    model: &Model,
    order: &ChannelOrder,
    settings: &PruneSettings,
) -> Result<MaskSet, PruneError> {
    let removed = plan(model, order, settings);
    let mut set = MaskSet::new();
    for (t, g) in removed_entries(model, order, &removed) {
        let e = &model.tensors[t];
        if e.analysable() {
            set.insert(model, &e.name, mask_of(&e.shape, &g))?;
        }
    }
    Ok(set)
}

/// Channels removed per group, for reports: (group, channels, removed).
pub fn summary(
    model: &Model,
    order: &ChannelOrder,
    settings: &PruneSettings,
) -> Vec<(Group, usize)> {
    order
        .groups
        .groups
        .iter()
        .cloned()
        .zip(plan(model, order, settings))
        .collect()
}

/// The channel order of `index`'s model, computed on first use and kept with the index.
pub fn order_for(model: &Model, index: &ScoreIndex) -> Result<Arc<ChannelOrder>, PruneError> {
    index.channel_order(|| channel_order(model, index))
}
