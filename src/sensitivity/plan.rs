//! Splitting a sparsity budget across layers by their sensitivity curves.
//!
//! Every rule answers the same question — how many weights each group loses so that exactly
//! `round(S·N)` of the N prunable weights go, within each layer's cap — and differs only in
//! how it weighs the curves. Each rule first produces real-valued targets; one shared rounding
//! step turns them into whole counts that sum to the budget exactly.

use serde::Serialize;

use super::{Curve, MetricKind, Sensitivity, interpolate};
use crate::model::Model;
pub use crate::prune::Rule;
use crate::prune::{PruneSettings, Scope, ScoreIndex, allocate};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error(
        "the sensitivity curves do not match the prunable tensors ({0}); run the sensitivity \
         analysis again"
    )]
    Stale(String),
    #[error("N:M patterns fix every layer's sparsity; a sensitivity plan needs unstructured")]
    Pattern,
}

/// One group's share of the budget.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanLayer {
    pub name: Vec<String>,
    pub tensors: Vec<usize>,
    pub numel: u64,
    /// The most this group may lose (locks, min-keep, max sparsity).
    pub cap: u64,
    /// The same, per tensor of the group.
    pub tensor_caps: Vec<u64>,
    pub pruned: u64,
    /// The metric's drop the curve predicts at this sparsity.
    pub predicted_drop: f64,
}

impl PlanLayer {
    pub fn sparsity(&self) -> f64 {
        if self.numel == 0 {
            0.0
        } else {
            self.pruned as f64 / self.numel as f64
        }
    }
}

/// Per-group pruned counts for one target and rule, with the metric the curves predict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub rule: Rule,
    pub target: f64,
    pub metric: MetricKind,
    /// `round(S·N)`.
    pub requested: u64,
    pub pruned: u64,
    pub prunable: u64,
    /// The dense metric minus the sum of the groups' predicted drops (additive estimate).
    pub predicted: f64,
    pub layers: Vec<PlanLayer>,
    /// Each tensor's target sparsity (`count / numel`), by name: what the plan sets.
    pub targets: Vec<(String, f64)>,
}

impl Plan {
    pub fn reached(&self) -> bool {
        self.pruned == self.requested
    }

    /// Each tensor's pruned count: a tied group's count split over its tensors in proportion
    /// to what each may lose (a locked one loses nothing, the others take its share).
    pub fn tensor_counts(&self) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for l in &self.layers {
            let room: f64 = l.tensor_caps.iter().sum::<u64>() as f64;
            let x: Vec<f64> = l
                .tensor_caps
                .iter()
                .map(|&c| l.pruned as f64 * c as f64 / room.max(1.0))
                .collect();
            let counts = integerize(&x, &l.tensor_caps, l.pruned);
            out.extend(l.tensors.iter().copied().zip(counts));
        }
        out
    }

    /// Writes the plan into the settings as per-tensor sparsities (`count / numel`, which the
    /// layer-wise allocation rounds back to exactly `count`), in sensitivity-guided scope.
    pub fn apply(&self, settings: &mut PruneSettings) {
        settings.scope = Scope::Sensitivity;
        settings.rule = self.rule;
        settings.sparsity = self.target;
        for (name, s) in &self.targets {
            settings.layer_mut(name).sparsity = *s;
        }
    }
}

/// The most each tensor may lose under the settings: nothing when locked, else all but
/// `max(min_keep, 1 − max_sparsity)` of its weights (as the global allocation caps them).
fn tensor_cap(model: &Model, settings: &PruneSettings, t: usize) -> u64 {
    let e = &model.tensors[t];
    let ls = settings.layer(&e.name);
    if ls.locked {
        return 0;
    }
    let keep = settings
        .min_keep
        .max(1.0 - ls.max_sparsity.unwrap_or(1.0))
        .clamp(0.0, 1.0);
    let min_kept = ((keep * e.numel as f64) - 1e-9).ceil().max(0.0) as usize;
    (e.numel - min_kept.min(e.numel)) as u64
}

/// Splits `round(settings.sparsity · N)` weights across the curves' groups by `rule`.
///
/// `index` scores with the settings' criterion (the global-magnitude rule uses it).
pub fn plan(
    model: &Model,
    index: &ScoreIndex,
    settings: &PruneSettings,
    sens: &Sensitivity,
    rule: Rule,
) -> Result<Plan, PlanError> {
    if settings.pattern.fixed_sparsity().is_some() {
        return Err(PlanError::Pattern);
    }
    let prunable: Vec<usize> = (0..model.tensors.len())
        .filter(|&t| settings.is_prunable(model, t))
        .collect();
    let mut covered: Vec<usize> = sens
        .layers
        .iter()
        .flat_map(|c| c.tensors.iter().copied())
        .collect();
    covered.sort_unstable();
    if covered != prunable {
        let missing = prunable
            .iter()
            .find(|t| !covered.contains(t))
            .map(|&t| format!("'{}' has no curve", model.tensors[t].name))
            .or_else(|| {
                covered
                    .iter()
                    .find(|t| !prunable.contains(t))
                    .filter(|&&t| t < model.tensors.len())
                    .map(|&t| format!("'{}' is no longer prunable", model.tensors[t].name))
            })
            .unwrap_or_else(|| "tensor indices differ".into());
        return Err(PlanError::Stale(missing));
    }
    let n: u64 = prunable
        .iter()
        .map(|&t| model.tensors[t].numel as u64)
        .sum();
    let requested = (settings.sparsity.clamp(0.0, 1.0) * n as f64).round() as u64;
    let tensor_caps: Vec<Vec<u64>> = sens
        .layers
        .iter()
        .map(|c| {
            c.tensors
                .iter()
                .map(|&t| tensor_cap(model, settings, t))
                .collect()
        })
        .collect();
    let caps: Vec<u64> = tensor_caps.iter().map(|c| c.iter().sum()).collect();
    let k = requested.min(caps.iter().sum());
    let dense = sens.dense_value();
    let kind = sens.metric;

    let counts: Vec<u64> = match rule {
        Rule::Global => {
            let mut g = settings.clone();
            g.scope = Scope::Global;
            let alloc = allocate(model, index, &g);
            sens.layers
                .iter()
                .map(|c| {
                    c.tensors
                        .iter()
                        .map(|&t| alloc.for_tensor(t).map_or(0, |l| l.pruned as u64))
                        .sum()
                })
                .collect()
        }
        Rule::Uniform => {
            let numel: Vec<f64> = sens.layers.iter().map(|c| c.numel as f64).collect();
            let x = water_fill(k, &caps, 1.0, |lam| numel.iter().map(|n| lam * n).collect());
            integerize(&x, &caps, k)
        }
        Rule::Marginal => integerize(&marginal(sens, &caps, k), &caps, k),
        Rule::Threshold => integerize(&threshold(sens, &caps, k), &caps, k),
        Rule::Inverse => {
            let sigma: Vec<f64> = sens
                .layers
                .iter()
                .map(|c| {
                    let drops: Vec<f64> = costs(sens, c)
                        .into_iter()
                        .filter(|p| p.0 > 0.0)
                        .map(|p| p.1.max(0.0))
                        .collect();
                    if drops.is_empty() {
                        0.0
                    } else {
                        drops.iter().sum::<f64>() / drops.len() as f64
                    }
                })
                .collect();
            let top = sigma.iter().cloned().fold(0.0, f64::max);
            // Sparsity inversely proportional to the normalised drop; the floor keeps a layer
            // that never lost anything from claiming an infinite share.
            let w: Vec<f64> = sigma
                .iter()
                .map(|s| 1.0 / (if top > 0.0 { s / top } else { 1.0 } + INVERSE_FLOOR))
                .collect();
            let numel: Vec<f64> = sens.layers.iter().map(|c| c.numel as f64).collect();
            let wmin = w.iter().cloned().fold(f64::INFINITY, f64::min).max(1e-12);
            let x = water_fill(k, &caps, 1.0 / wmin, |lam| {
                numel
                    .iter()
                    .zip(&w)
                    .map(|(n, w)| n * (lam * w).min(1.0))
                    .collect()
            });
            integerize(&x, &caps, k)
        }
    };
    let layers: Vec<PlanLayer> = sens
        .layers
        .iter()
        .zip(&counts)
        .zip(&caps)
        .zip(tensor_caps)
        .map(|(((c, &pruned), &cap), tensor_caps)| PlanLayer {
            name: c.name.clone(),
            tensors: c.tensors.clone(),
            numel: c.numel,
            cap,
            tensor_caps,
            pruned,
            predicted_drop: if pruned == 0 {
                0.0
            } else {
                c.drop_at(kind, dense, pruned as f64 / c.numel.max(1) as f64)
            },
        })
        .collect();
    let mut predicted = dense - layers.iter().map(|l| l.predicted_drop).sum::<f64>();
    if kind == MetricKind::Accuracy {
        predicted = predicted.clamp(0.0, 1.0);
    }
    let mut plan = Plan {
        rule,
        target: settings.sparsity,
        metric: kind,
        requested,
        pruned: counts.iter().sum(),
        prunable: n,
        predicted,
        layers,
        targets: Vec::new(),
    };
    let per_tensor = plan.tensor_counts();
    plan.pruned = per_tensor.iter().map(|(_, c)| c).sum();
    plan.targets = per_tensor
        .into_iter()
        .map(|(t, c)| {
            let e = &model.tensors[t];
            let s = if e.numel == 0 {
                0.0
            } else {
                c as f64 / e.numel as f64
            };
            (e.name.clone(), s)
        })
        .collect();
    Ok(plan)
}

/// Every rule's plan at the settings' target, in [`Rule::ALL`] order.
pub fn compare_rules(
    model: &Model,
    index: &ScoreIndex,
    settings: &PruneSettings,
    sens: &Sensitivity,
) -> Vec<Result<Plan, PlanError>> {
    Rule::ALL
        .iter()
        .map(|&r| plan(model, index, settings, sens, r))
        .collect()
}

/// Added to every normalised drop in the inverse rule.
const INVERSE_FLOOR: f64 = 0.05;

/// Real targets `x(λ)`, capped, whose sum is `k`: bisection on λ in `0..=hi` (each target
/// grows with λ).
fn water_fill(k: u64, caps: &[u64], hi: f64, x: impl Fn(f64) -> Vec<f64>) -> Vec<f64> {
    let capped = |lam: f64| -> Vec<f64> {
        x(lam)
            .iter()
            .zip(caps)
            .map(|(v, &c)| v.clamp(0.0, c as f64))
            .collect()
    };
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let (mut lo, mut hi) = (0.0, hi);
    if sum(&capped(hi)) <= k as f64 {
        return capped(hi);
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if sum(&capped(mid)) < k as f64 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    capped(hi)
}

/// Whole counts, each within its cap, summing to exactly `k` (when the caps allow): floors
/// first, then one more to the largest fractional parts.
pub(crate) fn integerize(x: &[f64], caps: &[u64], k: u64) -> Vec<u64> {
    let mut c: Vec<u64> = x
        .iter()
        .zip(caps)
        .map(|(&v, &cap)| (v.max(0.0).floor() as u64).min(cap))
        .collect();
    let mut sum: u64 = c.iter().sum();
    // Overshoot (targets summing past k by rounding noise): take from the smallest fractions.
    if sum > k {
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| (x[a] - x[a].floor()).total_cmp(&(x[b] - x[b].floor())));
        while sum > k {
            let mut moved = false;
            for &i in &order {
                if sum > k && c[i] > 0 {
                    c[i] -= 1;
                    sum -= 1;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        return c;
    }
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| {
        (x[b] - x[b].floor())
            .total_cmp(&(x[a] - x[a].floor()))
            .then(a.cmp(&b))
    });
    while sum < k {
        let mut moved = false;
        for &i in &order {
            if sum < k && c[i] < caps[i] {
                c[i] += 1;
                sum += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    c
}

/// What a rule minimises along a curve, `(sparsity, cost)` from `(0, 0)`: the metric's drop
/// from dense (accuracy, or cosine fidelity without labels). Tried and measured on the
/// samples: planning on the rise in cross-entropy instead did no better at 80 % and worse at
/// 90 % (README, "Sensitivity").
fn costs(sens: &Sensitivity, c: &Curve) -> Vec<(f64, f64)> {
    let dense = sens.dense_value();
    let mut v: Vec<(f64, f64)> = c
        .values(sens.metric, dense)
        .into_iter()
        .map(|(s, y)| (s, dense - y))
        .collect();
    // The dense model costs nothing, whatever the evaluation noise at a measured 0.
    v.retain(|p| p.0 > 0.0);
    v.insert(0, (0.0, 0.0));
    v
}

/// A group's cost curve against weights removed, `(count, cost)`, from 0 to its cap; past
/// the last measured sparsity a rising cost keeps rising.
fn count_curve(sens: &Sensitivity, c: &Curve, cap: u64) -> Vec<(f64, f64)> {
    let n = c.numel.max(1) as f64;
    let by_s = costs(sens, c);
    // `interpolate` extends falling curves: feed it the negated cost.
    let neg: Vec<(f64, f64)> = by_s.iter().map(|&(s, y)| (s, -y)).collect();
    let mut v: Vec<(f64, f64)> = by_s.iter().map(|&(s, y)| (s * n, y)).collect();
    if v.last().map_or(0.0, |p| p.0) < n {
        v.push((n, -interpolate(&neg, 1.0)));
    }
    let cap = cap as f64;
    let mut out: Vec<(f64, f64)> = v.iter().copied().filter(|p| p.0 < cap).collect();
    if cap > 0.0 {
        out.push((cap, interpolate(&v, cap)));
    } else {
        out = vec![(0.0, 0.0)];
    }
    out
}

/// Equal marginal loss: on each curve's lower convex hull the drop per weight removed rises,
/// so taking the cheapest segments first, across all groups, minimises the summed drop.
/// Segments of equal slope share what is left in proportion to their length.
fn marginal(sens: &Sensitivity, caps: &[u64], k: u64) -> Vec<f64> {
    let mut segs: Vec<(f64, usize, f64)> = Vec::new();
    for (g, c) in sens.layers.iter().enumerate() {
        let hull = lower_hull(&count_curve(sens, c, caps[g]));
        for w in hull.windows(2) {
            let len = w[1].0 - w[0].0;
            if len > 0.0 {
                segs.push(((w[1].1 - w[0].1) / len, g, len));
            }
        }
    }
    segs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut x = vec![0.0; sens.layers.len()];
    let mut left = k as f64;
    let mut i = 0;
    while i < segs.len() && left > 0.0 {
        let slope = segs[i].0;
        let mut j = i;
        while j < segs.len() && (segs[j].0 - slope).abs() <= 1e-15 + 1e-9 * slope.abs() {
            j += 1;
        }
        let total: f64 = segs[i..j].iter().map(|s| s.2).sum();
        let take = left.min(total);
        for s in &segs[i..j] {
            x[s.1] += take * s.2 / total;
        }
        left -= take;
        i = j;
    }
    x
}

/// The lower convex hull of points sorted by x (Andrew's monotone chain).
fn lower_hull(p: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut h: Vec<(f64, f64)> = Vec::new();
    for &q in p {
        while h.len() >= 2 {
            let (a, b) = (h[h.len() - 2], h[h.len() - 1]);
            let cross = (b.0 - a.0) * (q.1 - a.1) - (b.1 - a.1) * (q.0 - a.0);
            if cross <= 0.0 {
                h.pop();
            } else {
                break;
            }
        }
        h.push(q);
    }
    h
}

/// A threshold on the tolerated drop, bisected until the budget is met (NVIDIA ModelOpt's
/// FastNAS): each group goes as far as its curve stays within the threshold.
fn threshold(sens: &Sensitivity, caps: &[u64], k: u64) -> Vec<f64> {
    // Running maximum of each drop curve: "stays within τ" must hold at every smaller sparsity.
    let curves: Vec<Vec<(f64, f64)>> = sens
        .layers
        .iter()
        .enumerate()
        .map(|(g, c)| {
            let mut v = count_curve(sens, c, caps[g]);
            let mut m = f64::NEG_INFINITY;
            for p in &mut v {
                m = m.max(p.1);
                p.1 = m;
            }
            v
        })
        .collect();
    let reach = |v: &[(f64, f64)], tau: f64| -> f64 {
        let last = v[v.len() - 1];
        if tau >= last.1 {
            return last.0;
        }
        for w in v.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if y1 > tau {
                return if y1 - y0 < 1e-300 {
                    x0
                } else {
                    x0 + (tau - y0).max(0.0) / (y1 - y0) * (x1 - x0)
                };
            }
        }
        last.0
    };
    let counts = |tau: f64| -> Vec<f64> { curves.iter().map(|v| reach(v, tau)).collect() };
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let kf = k as f64;
    let top = curves.iter().map(|v| v[v.len() - 1].1).fold(0.0, f64::max);
    let at0 = counts(0.0);
    let (lo_c, hi_c) = if sum(&at0) >= kf {
        (vec![0.0; curves.len()], at0)
    } else {
        let (mut lo, mut hi) = (0.0, top.max(0.0));
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if sum(&counts(mid)) >= kf {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        (counts(lo), counts(hi))
    };
    let (sl, sh) = (sum(&lo_c), sum(&hi_c));
    let f = if sh - sl > 0.0 {
        ((kf - sl) / (sh - sl)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    lo_c.iter()
        .zip(&hi_c)
        .map(|(l, h)| l + (h - l) * f)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integerize_hits_the_budget_within_caps() {
        let x = [1.5, 2.5, 3.0];
        let c = integerize(&x, &[10, 10, 3], 7);
        assert_eq!(c.iter().sum::<u64>(), 7);
        assert_eq!(c, vec![2, 2, 3]);
        // Caps force the remainder elsewhere.
        let c = integerize(&[0.9, 0.9, 0.2], &[0, 5, 5], 2);
        assert_eq!(c, vec![0, 1, 1]);
    }

    #[test]
    fn lower_hull_drops_points_above_the_chords() {
        let h = lower_hull(&[(0.0, 0.0), (1.0, 0.5), (2.0, 0.2), (3.0, 1.0)]);
        assert_eq!(h, vec![(0.0, 0.0), (2.0, 0.2), (3.0, 1.0)]);
    }
}
