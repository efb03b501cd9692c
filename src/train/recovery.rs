//! Pruning schedules (one-shot, iterative, gradual AGP) and lottery tickets, on the native
//! MLP trainer.

use serde::Serialize;

use super::native::{EpochStats, FinetuneConfig, Net, finetune_with};
use super::{NamedTensors, TrainError};
use crate::data::Dataset;
use crate::data::Split;
use crate::eval::Metrics;
use crate::progress::Progress;
use crate::util::SplitMix64;

/// Zhu & Gupta's gradual schedule: `s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))³` for
/// `t0 ≤ t ≤ t0 + n·Δt`, `s_i` before and `s_f` after.
pub fn agp_sparsity(initial: f64, target: f64, t0: usize, n: usize, dt: usize, t: usize) -> f64 {
    let span = (n * dt).max(1) as f64;
    if t <= t0 {
        return initial;
    }
    let frac = ((t - t0) as f64 / span).min(1.0);
    target + (initial - target) * (1.0 - frac).powi(3)
}

/// The sparsity after round `r` (1-based) of `k` iterative rounds that each remove the same
/// fraction of the remaining weights: `1 − (1 − s)^(r/k)`.
pub fn iterative_sparsity(target: f64, r: usize, k: usize) -> f64 {
    1.0 - (1.0 - target).powf(r as f64 / k.max(1) as f64)
}

/// One training step's movement, −w·∂L/∂w per weight, added to `acc`: the one formula the
/// native and candle trainers and the movement criterion share.
pub fn add_movement(acc: &mut [f64], w: &[f32], g: &[f32]) {
    for ((a, w), g) in acc.iter_mut().zip(w).zip(g) {
        *a -= *w as f64 * *g as f64;
    }
}

/// 1 for the weights a tensor keeps at `sparsity` by movement, 0 for the rest: the weights
/// `mask` already prunes first (pruned weights stay pruned), then the lowest movement (ties by
/// flat index).
pub fn movement_keep(movement: &[f64], mask: Option<&[f32]>, sparsity: f64) -> Vec<f32> {
    let kept = |i: usize| mask.is_none_or(|m| m[i] != 0.0);
    super::graph::keep_all_but_lowest(movement.len(), sparsity, |a, b| {
        kept(a)
            .cmp(&kept(b))
            .then(movement[a].total_cmp(&movement[b]))
    })
}

impl Net {
    /// Prunes every layer's weights to `sparsity` by magnitude (smallest first, ties by flat
    /// index), or by movement while it is tracked; weights pruned before stay pruned.
    pub fn prune_layerwise(&mut self, sparsity: f64) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let keep = match &self.movement {
                Some(mv) => movement_keep(&mv[i], l.mask.as_deref(), sparsity),
                None => super::graph::magnitude_keep(&l.w, sparsity),
            };
            for (w, k) in l.w.iter_mut().zip(&keep) {
                // Assigned, not multiplied: an infinite weight times 0 would be NaN.
                if *k == 0.0 {
                    *w = 0.0;
                }
            }
            l.mask = Some(keep);
        }
    }

    /// Random masks at each layer's current sparsity (the lottery ticket's control).
    pub fn random_masks_like(&mut self, other: &Net, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        for (l, o) in self.layers.iter_mut().zip(&other.layers) {
            let n = l.w.len();
            let pruned = o
                .mask
                .as_ref()
                .map_or(0, |m| m.iter().filter(|v| **v == 0.0).count());
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut mask = vec![1f32; n];
            for &i in &order[..pruned] {
                mask[i] = 0.0;
                l.w[i] = 0.0;
            }
            l.mask = Some(mask);
        }
    }

    /// Every weight and bias set from `values` (by name), then the masks applied.
    pub fn set_values(&mut self, values: &NamedTensors) {
        for l in &mut self.layers {
            if let Some((_, _, v)) = values.iter().find(|(n, _, _)| *n == l.weight_name) {
                l.w.copy_from_slice(v);
            }
            if let Some(b) = &l.bias_name
                && let Some((_, _, v)) = values.iter().find(|(n, _, _)| n == b)
            {
                l.b.copy_from_slice(v);
            }
            if let Some(m) = &l.mask {
                for (w, m) in l.w.iter_mut().zip(m) {
                    *w *= m;
                }
            }
        }
    }

    /// A fresh draw of PyTorch's `nn.Linear` default initialisation, U(−1/√in, 1/√in), for
    /// weights and biases, masks kept and applied.
    pub fn reinitialise(&mut self, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        for l in &mut self.layers {
            let bound = 1.0 / (l.inp as f64).sqrt();
            for w in l.w.iter_mut() {
                *w = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
            }
            if l.bias_name.is_some() {
                for b in l.b.iter_mut() {
                    *b = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
                }
            }
            if let Some(m) = &l.mask {
                for (w, m) in l.w.iter_mut().zip(m) {
                    *w *= m;
                }
            }
        }
    }
}

/// What schedules and the lottery train: an MLP on prunescope's loops ([`Net`]) or a graph on
/// candle ([`GraphNet`]).
pub trait Trainee: Clone {
    /// Fraction of the prunable weights that are pruned.
    fn sparsity(&self) -> f64;
    /// Every prunable tensor to `sparsity` by magnitude, or by movement once
    /// [`Trainee::track_movement`] was called; pruned weights stay pruned.
    fn prune_layerwise(&mut self, sparsity: f64);
    /// From now on, training accumulates each prunable weight's movement −Σ_t w_t·∂L/∂w_t and
    /// [`Trainee::prune_layerwise`] prunes the lowest.
    fn track_movement(&mut self);
    fn metrics(&self, test: &Dataset) -> Result<Metrics, TrainError>;
    fn tensors(&self) -> NamedTensors;
    /// Values by name, the masks applied after.
    fn set_values(&mut self, values: &NamedTensors);
    /// A fresh random initialisation, the masks kept and applied.
    fn reinitialise(&mut self, seed: u64);
    /// Random masks with `other`'s per-tensor pruned counts.
    fn random_masks_like(&mut self, other: &Self, seed: u64);
    /// The prunable tensors' masks by name, true = kept.
    fn masks(&self) -> Vec<(String, Vec<bool>)>;
    /// Trains with the masks held. Before step `t`, `prune_at(t, sparsity)` may name a
    /// sparsity to prune to; the tensors before step `record_at` come back too.
    fn train(
        self,
        data: &Split,
        cfg: &FinetuneConfig,
        progress: &Progress,
        on_epoch: &mut dyn FnMut(&EpochStats),
        prune_at: &mut dyn FnMut(usize, f64) -> Option<f64>,
        record_at: Option<usize>,
    ) -> Result<TrainRun<Self>, TrainError>;

    /// Trains without hooks, progress or cancel: the weights after the last epoch.
    fn trained(self, data: &Split, cfg: &FinetuneConfig) -> Result<Self, TrainError> {
        let r = self.train(
            data,
            cfg,
            &Progress::none(),
            &mut |_| {},
            &mut |_, _| None,
            None,
        )?;
        Ok(r.trainee)
    }
}

/// A training run's result.
pub struct TrainRun<T> {
    pub trainee: T,
    pub cancelled: bool,
    pub recorded: Option<NamedTensors>,
}

impl Trainee for Net {
    fn sparsity(&self) -> f64 {
        self.masked_sparsity()
    }
    fn prune_layerwise(&mut self, sparsity: f64) {
        Net::prune_layerwise(self, sparsity)
    }
    fn track_movement(&mut self) {
        self.movement = Some(self.layers.iter().map(|l| vec![0.0; l.w.len()]).collect());
    }
    fn metrics(&self, test: &Dataset) -> Result<Metrics, TrainError> {
        Net::metrics(self, test)
    }
    fn tensors(&self) -> NamedTensors {
        Net::tensors(self)
    }
    fn set_values(&mut self, values: &NamedTensors) {
        Net::set_values(self, values)
    }
    fn reinitialise(&mut self, seed: u64) {
        Net::reinitialise(self, seed)
    }
    fn random_masks_like(&mut self, other: &Self, seed: u64) {
        Net::random_masks_like(self, other, seed)
    }
    fn masks(&self) -> Vec<(String, Vec<bool>)> {
        self.layers
            .iter()
            .map(|l| {
                let keep = l.mask.as_ref().map_or_else(
                    || vec![true; l.w.len()],
                    |m| m.iter().map(|v| *v != 0.0).collect(),
                );
                (l.weight_name.clone(), keep)
            })
            .collect()
    }
    fn train(
        self,
        data: &Split,
        cfg: &FinetuneConfig,
        progress: &Progress,
        on_epoch: &mut dyn FnMut(&EpochStats),
        prune_at: &mut dyn FnMut(usize, f64) -> Option<f64>,
        record_at: Option<usize>,
    ) -> Result<TrainRun<Self>, TrainError> {
        let mut recorded = None;
        let r = finetune_with(
            self,
            None,
            &data.train,
            &data.test,
            cfg,
            progress,
            |e, _| on_epoch(e),
            |t, n| {
                if let Some(s) = prune_at(t, n.sparsity()) {
                    n.prune_layerwise(s);
                }
                if record_at == Some(t) {
                    recorded = Some(n.tensors());
                }
            },
        )?;
        Ok(TrainRun {
            trainee: r.net,
            cancelled: r.cancelled,
            recorded,
        })
    }
}

/// A graph (the CNN samples, any safetensors graph) with its tensors and masks, trained on
/// candle.
#[derive(Clone)]
pub struct GraphNet {
    metadata: std::collections::BTreeMap<String, String>,
    graph: crate::graph::Graph,
    tensors: NamedTensors,
    /// The prunable tensors' masks, true = kept.
    masks: Vec<(String, Vec<bool>)>,
    /// Each masked tensor's movement while it is tracked (see [`Trainee::track_movement`]).
    movement: Option<std::collections::HashMap<String, Vec<f64>>>,
}

impl GraphNet {
    /// The model's graph and tensors; `masks` where given, all kept for the other prunable
    /// trainable tensors (floating, ≥ 2 dims).
    pub fn from_model(
        model: &crate::model::Model,
        graph: crate::graph::Graph,
        masks: &crate::prune::MaskSet,
    ) -> Result<GraphNet, TrainError> {
        let trainable = graph.trainable_names();
        let mut tensors = Vec::new();
        for name in graph.param_names() {
            let t = model
                .find(&name)
                .ok_or_else(|| TrainError::Compute(format!("tensor '{name}' is missing")))?;
            let mut v = model.to_f32_vec(t);
            if let Some(m) = masks.get(&name) {
                m.apply(&mut v);
            }
            tensors.push((name, model.tensors[t].shape.clone(), v));
        }
        let mut gmasks = Vec::new();
        for (name, shape, _) in &tensors {
            let t = model.find(name).expect("found above");
            if let Some(m) = masks.get(name) {
                gmasks.push((name.clone(), (0..m.len()).map(|i| m.kept(i)).collect()));
            } else if trainable.contains(name) && model.tensors[t].default_prunable() {
                gmasks.push((name.clone(), vec![true; shape.iter().product()]));
            }
        }
        Ok(GraphNet {
            metadata: model.metadata.clone(),
            graph,
            tensors,
            masks: gmasks,
            movement: None,
        })
    }

    /// As an in-memory model (every tensor F32, the metadata kept).
    pub fn to_model(&self) -> crate::model::Model {
        let mut m =
            crate::model::Model::from_f32_tensors("graph being trained", self.tensors.clone());
        m.metadata = self.metadata.clone();
        m
    }

    fn apply_masks(&mut self) {
        for (name, keep) in &self.masks {
            if let Some((_, _, v)) = self.tensors.iter_mut().find(|(n, _, _)| n == name) {
                for (x, k) in v.iter_mut().zip(keep) {
                    if !k {
                        *x = 0.0;
                    }
                }
            }
        }
    }
}

impl Trainee for GraphNet {
    fn sparsity(&self) -> f64 {
        let (p, n) = self.masks.iter().fold((0, 0), |(p, n), (_, m)| {
            (p + m.iter().filter(|k| !**k).count(), n + m.len())
        });
        p as f64 / n.max(1) as f64
    }
    fn prune_layerwise(&mut self, sparsity: f64) {
        for (name, keep) in &mut self.masks {
            if let Some((_, _, v)) = self.tensors.iter().find(|(n, _, _)| n == name) {
                let k = match self.movement.as_ref().and_then(|m| m.get(name)) {
                    Some(mv) => {
                        let mask: Vec<f32> = keep.iter().map(|k| *k as u8 as f32).collect();
                        movement_keep(mv, Some(&mask), sparsity)
                    }
                    None => super::graph::magnitude_keep(v, sparsity),
                };
                *keep = k.iter().map(|x| *x != 0.0).collect();
            }
        }
        self.apply_masks();
    }
    fn track_movement(&mut self) {
        self.movement = Some(
            self.masks
                .iter()
                .map(|(n, m)| (n.clone(), vec![0.0; m.len()]))
                .collect(),
        );
    }
    fn metrics(&self, test: &Dataset) -> Result<Metrics, TrainError> {
        super::graph::eval_graph(&self.graph, &self.tensors, test)
    }
    fn tensors(&self) -> NamedTensors {
        self.tensors.clone()
    }
    fn set_values(&mut self, values: &NamedTensors) {
        for (name, _, v) in values {
            if let Some((_, _, dst)) = self.tensors.iter_mut().find(|(n, _, _)| n == name)
                && dst.len() == v.len()
            {
                dst.copy_from_slice(v);
            }
        }
        self.apply_masks();
    }
    fn reinitialise(&mut self, seed: u64) {
        let shapes: Vec<(String, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect();
        let fresh = super::graph::fresh_init(&self.graph, &shapes, seed);
        self.set_values(&fresh);
    }
    fn random_masks_like(&mut self, other: &Self, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        for (name, keep) in &mut self.masks {
            let pruned = other
                .masks
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, m)| m.iter().filter(|k| !**k).count());
            let mut order: Vec<usize> = (0..keep.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            keep.iter_mut().for_each(|k| *k = true);
            for &i in &order[..pruned.min(order.len())] {
                keep[i] = false;
            }
        }
        self.apply_masks();
    }
    fn masks(&self) -> Vec<(String, Vec<bool>)> {
        self.masks.clone()
    }
    fn train(
        self,
        data: &Split,
        cfg: &FinetuneConfig,
        progress: &Progress,
        on_epoch: &mut dyn FnMut(&EpochStats),
        prune_at: &mut dyn FnMut(usize, f64) -> Option<f64>,
        record_at: Option<usize>,
    ) -> Result<TrainRun<Self>, TrainError> {
        let model = self.to_model();
        let mut set = crate::prune::MaskSet::new();
        for (name, keep) in &self.masks {
            set.insert(&model, name, crate::prune::Mask::from_kept(keep))
                .map_err(|e| TrainError::Compute(e.to_string()))?;
        }
        let r = super::graph::finetune_graph_with(
            &model,
            &self.graph,
            &set,
            data,
            cfg,
            &candle_core::Device::Cpu,
            progress,
            |e| on_epoch(e),
            prune_at,
            record_at,
            self.movement.clone(),
        )?;
        let mut next = self;
        next.tensors = r.tensors;
        next.movement = r.movement;
        for (name, keep) in r.masks {
            if let Some((_, m)) = next.masks.iter_mut().find(|(n, _)| *n == name) {
                *m = keep;
            }
        }
        next.apply_masks();
        Ok(TrainRun {
            trainee: next,
            cancelled: r.cancelled,
            recorded: r.recorded,
        })
    }
}

/// Either kind of trainee, as [`super::Trainable::trainee`] builds it from a model: schedules
/// and the lottery run on it without each caller matching on the kind.
#[derive(Clone)]
pub enum AnyTrainee {
    Mlp(Net),
    Graph(GraphNet),
}

/// Calls the same method on whichever trainee it is.
macro_rules! on_each {
    ($self:expr, $t:ident => $e:expr) => {
        match $self {
            AnyTrainee::Mlp($t) => $e,
            AnyTrainee::Graph($t) => $e,
        }
    };
}

impl Trainee for AnyTrainee {
    fn sparsity(&self) -> f64 {
        on_each!(self, t => t.sparsity())
    }
    fn prune_layerwise(&mut self, sparsity: f64) {
        on_each!(self, t => t.prune_layerwise(sparsity))
    }
    fn track_movement(&mut self) {
        on_each!(self, t => t.track_movement())
    }
    fn metrics(&self, test: &Dataset) -> Result<Metrics, TrainError> {
        on_each!(self, t => t.metrics(test))
    }
    fn tensors(&self) -> NamedTensors {
        on_each!(self, t => t.tensors())
    }
    fn set_values(&mut self, values: &NamedTensors) {
        on_each!(self, t => t.set_values(values))
    }
    fn reinitialise(&mut self, seed: u64) {
        on_each!(self, t => t.reinitialise(seed))
    }
    fn random_masks_like(&mut self, other: &Self, seed: u64) {
        match (self, other) {
            (AnyTrainee::Mlp(a), AnyTrainee::Mlp(b)) => a.random_masks_like(b, seed),
            (AnyTrainee::Graph(a), AnyTrainee::Graph(b)) => a.random_masks_like(b, seed),
            _ => unreachable!("masks are copied between trainees of one model"),
        }
    }
    fn masks(&self) -> Vec<(String, Vec<bool>)> {
        on_each!(self, t => t.masks())
    }
    fn train(
        self,
        data: &Split,
        cfg: &FinetuneConfig,
        progress: &Progress,
        on_epoch: &mut dyn FnMut(&EpochStats),
        prune_at: &mut dyn FnMut(usize, f64) -> Option<f64>,
        record_at: Option<usize>,
    ) -> Result<TrainRun<Self>, TrainError> {
        fn wrap<T>(r: TrainRun<T>, kind: fn(T) -> AnyTrainee) -> TrainRun<AnyTrainee> {
            TrainRun {
                trainee: kind(r.trainee),
                cancelled: r.cancelled,
                recorded: r.recorded,
            }
        }
        Ok(match self {
            AnyTrainee::Mlp(t) => wrap(
                t.train(data, cfg, progress, on_epoch, prune_at, record_at)?,
                AnyTrainee::Mlp,
            ),
            AnyTrainee::Graph(t) => wrap(
                t.train(data, cfg, progress, on_epoch, prune_at, record_at)?,
                AnyTrainee::Graph,
            ),
        })
    }
}

/// How a schedule reaches its target.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// Prune to the target at once, then fine-tune every epoch.
    OneShot,
    /// `rounds` rounds of pruning a fraction of the remaining weights, each followed by
    /// `epochs / rounds` epochs of fine-tuning (skipped when the drop is below `skip_below`).
    Iterative { rounds: usize, skip_below: f64 },
    /// Gradual AGP over the first `ramp` fraction of the steps, masks updated every `every`
    /// steps, then fine-tuning at the target; with `movement`, each update prunes the lowest
    /// movement accumulated since training began (Sanh et al.'s movement pruning) instead of
    /// the smallest magnitudes.
    Agp {
        ramp: f64,
        every: usize,
        movement: bool,
    },
}

/// One point of a schedule's timeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Optimiser steps so far.
    pub step: usize,
    pub sparsity: f64,
    pub test_accuracy: f64,
    /// What happened: "pruned", "fine-tuned", "skipped fine-tuning".
    pub event: &'static str,
}

pub struct ScheduleResult<T> {
    pub timeline: Vec<TimelinePoint>,
    pub net: T,
    pub final_accuracy: f64,
    pub final_loss: f64,
}

/// Runs `schedule` from the dense `net` to `target` sparsity on `data`, `cfg.epochs` epochs
/// in all. `on_point` sees the timeline as it grows.
pub fn run_schedule<T: Trainee>(
    mut net: T,
    target: f64,
    schedule: Schedule,
    data: &Split,
    cfg: &FinetuneConfig,
    progress: &Progress,
    mut on_point: impl FnMut(&TimelinePoint),
) -> Result<ScheduleResult<T>, TrainError> {
    let mut timeline = Vec::new();
    let mut push = |t: TimelinePoint, timeline: &mut Vec<TimelinePoint>| {
        on_point(&t);
        timeline.push(t);
    };
    let acc = |n: &T| -> Result<f64, TrainError> {
        Ok(n.metrics(&data.test)?.accuracy.unwrap_or(f64::NAN))
    };
    let per_epoch = data.train.len().div_ceil(cfg.batch_size.max(1));
    let mut step = 0;
    push(
        TimelinePoint {
            step,
            sparsity: net.sparsity(),
            test_accuracy: acc(&net)?,
            event: "dense",
        },
        &mut timeline,
    );
    match schedule {
        Schedule::OneShot => {
            net.prune_layerwise(target);
            push(
                TimelinePoint {
                    step,
                    sparsity: net.sparsity(),
                    test_accuracy: acc(&net)?,
                    event: "pruned",
                },
                &mut timeline,
            );
            let r = net.train(
                data,
                cfg,
                progress,
                &mut |e| step = e.epoch * per_epoch,
                &mut |_, _| None,
                None,
            )?;
            if r.cancelled {
                return Err(TrainError::Cancelled);
            }
            net = r.trainee;
            push(
                TimelinePoint {
                    step,
                    sparsity: net.sparsity(),
                    test_accuracy: acc(&net)?,
                    event: "fine-tuned",
                },
                &mut timeline,
            );
        }
        Schedule::Iterative { rounds, skip_below } => {
            let rounds = rounds.max(1);
            // cfg.epochs in all, spread over the rounds (the first ones get the remainder).
            let epochs_of =
                |r: usize| (cfg.epochs / rounds + usize::from(r <= cfg.epochs % rounds)).max(1);
            for r in 1..=rounds {
                let epochs = epochs_of(r);
                progress.check().map_err(|_| TrainError::Cancelled)?;
                let before = acc(&net)?;
                net.prune_layerwise(iterative_sparsity(target, r, rounds));
                let after = acc(&net)?;
                push(
                    TimelinePoint {
                        step,
                        sparsity: net.sparsity(),
                        test_accuracy: after,
                        event: "pruned",
                    },
                    &mut timeline,
                );
                // ICE-Pruning's idea: a round that cost (almost) nothing needs no recovery.
                if before - after < skip_below && r < rounds {
                    push(
                        TimelinePoint {
                            step,
                            sparsity: net.sparsity(),
                            test_accuracy: after,
                            event: "skipped fine-tuning",
                        },
                        &mut timeline,
                    );
                    continue;
                }
                let round_cfg = FinetuneConfig {
                    epochs,
                    seed: cfg.seed + r as u64,
                    ..cfg.clone()
                };
                net = net.trained(data, &round_cfg)?;
                step += epochs * per_epoch;
                push(
                    TimelinePoint {
                        step,
                        sparsity: net.sparsity(),
                        test_accuracy: acc(&net)?,
                        event: "fine-tuned",
                    },
                    &mut timeline,
                );
                progress.report(r as f32 / rounds as f32, &format!("round {r}/{rounds}"));
            }
        }
        Schedule::Agp {
            ramp,
            every,
            movement,
        } => {
            if movement {
                net.track_movement();
            }
            // One training run: the optimiser state and the learning-rate schedule run through;
            // before a step at t = k·Δt (k ≤ n) the masks move to s_t on the cubic, which
            // reaches the target at t = n·Δt, inside the ramp.
            let total = per_epoch * cfg.epochs.max(1);
            let every = every.max(1);
            let ramp_steps = (ramp.clamp(0.0, 1.0) * total as f64) as usize;
            let n = (ramp_steps / every).max(1);
            let initial = net.sparsity();
            let mut points = Vec::new();
            let r = net.train(
                data,
                cfg,
                progress,
                &mut |e| points.push((e.epoch * per_epoch, e.sparsity, e.test_accuracy)),
                &mut |t, current| {
                    if t.is_multiple_of(every) && t <= n * every {
                        let s = agp_sparsity(initial, target, 0, n, every, t);
                        (s > current + 1e-12).then_some(s)
                    } else {
                        None
                    }
                },
                None,
            )?;
            if r.cancelled {
                return Err(TrainError::Cancelled);
            }
            for (step_at, sparsity, acc) in points {
                push(
                    TimelinePoint {
                        step: step_at,
                        sparsity,
                        test_accuracy: acc,
                        event: if step_at <= n * every {
                            "pruning"
                        } else {
                            "fine-tuned"
                        },
                    },
                    &mut timeline,
                );
            }
            net = r.trainee;
            // Fewer steps than one mask interval: reach the target (without recovery).
            if net.sparsity() + 1e-9 < target {
                net.prune_layerwise(target);
                push(
                    TimelinePoint {
                        step: total,
                        sparsity: net.sparsity(),
                        test_accuracy: acc(&net)?,
                        event: "pruned",
                    },
                    &mut timeline,
                );
            }
            step = total;
            let _ = step;
        }
    }
    let m = net.metrics(&data.test)?;
    Ok(ScheduleResult {
        final_accuracy: m.accuracy.unwrap_or(f64::NAN),
        final_loss: m.loss.unwrap_or(f64::NAN),
        timeline,
        net,
    })
}

/// One level of the lottery-ticket experiment: test accuracies after training.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LotteryLevel {
    pub level: usize,
    /// Fraction of the weights that remain.
    pub remaining: f64,
    /// The winning ticket: survivors rewound, retrained.
    pub ticket: f64,
    /// The same masks with a fresh random initialisation.
    pub reinit: f64,
    /// Random masks at the same per-layer sparsities, from the rewound values.
    pub random_mask: f64,
}

/// Where survivors are rewound to.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rewind {
    /// The initial values.
    Init,
    /// The values after this many steps of dense training (late rewinding).
    Iteration(usize),
}

pub struct LotteryResult<T> {
    pub dense: f64,
    pub levels: Vec<LotteryLevel>,
    /// Each level's ticket (trained), for export.
    pub tickets: Vec<T>,
}

/// Iterative magnitude pruning with rewinding: train dense from `init`; then for each level
/// prune `rate` of each layer's remaining weights by magnitude, rewind the survivors, retrain;
/// beside each ticket, train the two controls.
#[allow(clippy::too_many_arguments)]
pub fn lottery<T: Trainee>(
    init: &T,
    data: &Split,
    cfg: &FinetuneConfig,
    levels: usize,
    rate: f64,
    rewind: Rewind,
    progress: &Progress,
    mut on_level: impl FnMut(&LotteryLevel),
) -> Result<LotteryResult<T>, TrainError> {
    let train = |net: T, seed: u64| -> Result<T, TrainError> {
        let c = FinetuneConfig {
            seed,
            ..cfg.clone()
        };
        // The last epoch's weights: a ticket is judged after its training, not at its best.
        net.trained(data, &c)
    };
    let acc = |n: &T| -> Result<f64, TrainError> {
        Ok(n.metrics(&data.test)?.accuracy.unwrap_or(f64::NAN))
    };
    // The rewind point: the initial values, or those after `k` steps of the dense training
    // itself (recorded on its trajectory).
    let mut rewind_to: NamedTensors = init.tensors();
    let total = levels * 3 + 1;
    let mut done = 0;
    let mut tick = |what: &str| {
        done += 1;
        progress.report(done as f32 / total as f32, what);
    };
    let dense_cfg = FinetuneConfig {
        seed: cfg.seed,
        ..cfg.clone()
    };
    let record_at = match rewind {
        Rewind::Init => None,
        Rewind::Iteration(k) => Some(k),
    };
    let mut trained = {
        let r = init.clone().train(
            data,
            &dense_cfg,
            &Progress::none(),
            &mut |_| {},
            &mut |_, _| None,
            record_at,
        )?;
        if let Some(t) = r.recorded {
            rewind_to = t;
        }
        r.trainee
    };
    if let Rewind::Iteration(k) = rewind {
        let steps = data.train.len().div_ceil(cfg.batch_size.max(1)) * cfg.epochs;
        if k >= steps {
            return Err(TrainError::Compute(format!(
                "cannot rewind to iteration {k}: the dense training has {steps} steps"
            )));
        }
    }
    let dense = acc(&trained)?;
    tick("dense");
    let mut out = Vec::new();
    let mut tickets = Vec::new();
    for level in 1..=levels {
        progress.check().map_err(|_| TrainError::Cancelled)?;
        let remaining = (1.0 - rate).powi(level as i32);
        trained.prune_layerwise(1.0 - remaining);
        let mut ticket = trained.clone();
        ticket.set_values(&rewind_to);
        let ticket = train(ticket, cfg.seed + 1000 + level as u64)?;
        tick("ticket");
        let mut reinit = trained.clone();
        reinit.reinitialise(0x5EED_0000 + level as u64);
        let reinit = train(reinit, cfg.seed + 2000 + level as u64)?;
        tick("reinitialised control");
        let mut random = init.clone();
        random.random_masks_like(&trained, 0xAA00 + level as u64);
        random.set_values(&rewind_to);
        let random = train(random, cfg.seed + 3000 + level as u64)?;
        tick("random-mask control");
        let l = LotteryLevel {
            level,
            remaining: 1.0 - ticket.sparsity(),
            ticket: acc(&ticket)?,
            reinit: acc(&reinit)?,
            random_mask: acc(&random)?,
        };
        on_level(&l);
        out.push(l);
        // The next level prunes from this ticket's trained weights.
        trained = ticket.clone();
        tickets.push(ticket);
    }
    Ok(LotteryResult {
        dense,
        levels: out,
        tickets,
    })
}
