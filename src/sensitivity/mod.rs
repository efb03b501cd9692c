//! Sensitivity analysis: how much each layer can take, measured on data.
//!
//! Every prunable layer (or group of tensors that must be cut together) is pruned alone at
//! each sparsity of a grid, everything else dense, and the model is evaluated. The curves
//! then split a sparsity budget across layers ([`plan`]).
//!
//! The sweep is built for speed: a point masks only the swept tensors (the rest of the model
//! is never copied), and engines that can ([`crate::eval::Runner::run_partial`]) start from
//! the dense activations just ahead of the swept layer.

mod plan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use plan::{Plan, PlanError, PlanLayer, Rule, compare_rules, plan};

use crate::eval::{EvalError, Evaluator, Metrics};
use crate::model::Model;
use crate::progress::Progress;
use crate::prune::{
    Criterion, LayerAlloc, MaskSet, Pattern, PruneError, PruneSettings, ScoreIndex,
    build_layer_mask, nm_pruned_count,
};

/// Above this many parameters a sweep measures one point at a time (memory: each concurrent
/// point may hold a decoded copy of the model).
const PARALLEL_POINTS_MAX_PARAMS: u64 = 64_000_000;

/// The default grid: 0, 0.1 … 0.9, 0.95, 0.99.
pub const DEFAULT_GRID: [f64; 12] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99];

#[derive(Debug, thiserror::Error)]
pub enum SensitivityError {
    #[error("grid: {0}")]
    Grid(String),
    #[error(
        "sensitivity needs data to measure on: this model has no evaluator ({0}). Choose \
         evaluation data (File → Evaluation data…, or --data) for a model prunescope can run"
    )]
    NoData(String),
    #[error("no prunable tensors to sweep")]
    NothingToSweep,
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Prune(#[from] PruneError),
}

/// Parses "0.1, 0.5,0.9": values in 0..=1, sorted, duplicates dropped.
pub fn parse_grid(s: &str) -> Result<Vec<f64>, SensitivityError> {
    let mut grid = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let v: f64 = part
            .parse()
            .map_err(|_| SensitivityError::Grid(format!("'{part}' is not a number")))?;
        if !(0.0..=1.0).contains(&v) {
            return Err(SensitivityError::Grid(format!(
                "{v} is outside 0..=1 (sparsities are fractions)"
            )));
        }
        grid.push(v);
    }
    check_grid(grid)
}

/// Sorts and deduplicates a grid; at least one value, each in 0..=1.
pub fn check_grid(mut grid: Vec<f64>) -> Result<Vec<f64>, SensitivityError> {
    if grid.iter().any(|v| !(0.0..=1.0).contains(v)) {
        return Err(SensitivityError::Grid("values must lie in 0..=1".into()));
    }
    grid.sort_by(f64::total_cmp);
    grid.dedup_by(|a, b| (*a - *b).abs() < 1e-12);
    if grid.is_empty() {
        return Err(SensitivityError::Grid("no sparsities given".into()));
    }
    if grid.len() > 200 {
        return Err(SensitivityError::Grid(format!(
            "{} points: at most 200",
            grid.len()
        )));
    }
    Ok(grid)
}

/// What a sweep does at each point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    pub grid: Vec<f64>,
    pub criterion: Criterion,
    pub seed: u64,
    pub pattern: Pattern,
    /// Calibration samples of a data-driven criterion (0 for the others, and then left out
    /// of cache keys, which stay as they were).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub calibration: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl SweepSpec {
    /// The spec for the user's current criterion and pattern, on `grid`.
    pub fn for_settings(settings: &PruneSettings, grid: Vec<f64>) -> SweepSpec {
        SweepSpec {
            grid,
            criterion: settings.criterion,
            seed: if settings.criterion.seeded() {
                settings.seed
            } else {
                0
            },
            pattern: settings.pattern,
            calibration: if settings.criterion.needs_data() {
                settings.calibration
            } else {
                0
            },
        }
    }

    /// The scores' inputs: the evaluator's data as calibration samples where the criterion
    /// needs them.
    pub fn score_inputs<'a>(
        &self,
        data: Option<&'a crate::data::EvalData>,
    ) -> crate::prune::ScoreInputs<'a> {
        crate::prune::ScoreInputs {
            calibration: data.filter(|_| self.criterion.needs_data()),
            samples: self.calibration,
            ..Default::default()
        }
    }

    /// The sparsities actually swept: the grid, or for N:M the only two a pattern allows
    /// (dense and 1 − N/M).
    pub fn points(&self) -> Vec<f64> {
        match self.pattern.fixed_sparsity() {
            Some(s) => vec![0.0, s],
            None => self.grid.clone(),
        }
    }
}

/// What the curves measure: accuracy with labels, cosine fidelity to the dense model without.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    Accuracy,
    Fidelity,
}

impl MetricKind {
    pub fn of(dense: &Metrics) -> MetricKind {
        if dense.accuracy.is_some() {
            MetricKind::Accuracy
        } else {
            MetricKind::Fidelity
        }
    }
    /// The number the curves plot (higher is better).
    pub fn value(self, m: &Metrics) -> f64 {
        match self {
            MetricKind::Accuracy => m.accuracy.unwrap_or(f64::NAN),
            MetricKind::Fidelity => m.fidelity.map_or(1.0, |f| f.cosine),
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            MetricKind::Accuracy => "accuracy",
            MetricKind::Fidelity => "fidelity (cosine to dense)",
        }
    }
}

/// Tensors swept as one row: a single layer, or tensors that hold the same weights (a tied
/// embedding and output head), which cannot be cut apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub names: Vec<String>,
    pub tensors: Vec<usize>,
    pub numel: u64,
}

/// The prunable tensors (under `settings`) in model order, byte-identical tensors of the same
/// shape and dtype grouped together.
pub fn groups(model: &Model, settings: &PruneSettings) -> Vec<Group> {
    let prunable: Vec<usize> = (0..model.tensors.len())
        .filter(|&t| settings.is_prunable(model, t))
        .collect();
    // Bucket by shape, dtype and the first bytes, then compare whole tensors only within a
    // bucket: distinct layers almost never share their first 64 bytes.
    let mut buckets: BTreeMap<(Vec<usize>, String, Vec<u8>), Vec<usize>> = BTreeMap::new();
    for &t in &prunable {
        let e = &model.tensors[t];
        let bytes = model.tensor_bytes(t);
        let head = bytes[..bytes.len().min(64)].to_vec();
        buckets
            .entry((e.shape.clone(), e.dtype.to_string(), head))
            .or_default()
            .push(t);
    }
    let mut owner: BTreeMap<usize, usize> = BTreeMap::new();
    for members in buckets.values() {
        for (i, &a) in members.iter().enumerate() {
            if owner.contains_key(&a) {
                continue;
            }
            owner.insert(a, a);
            for &b in &members[i + 1..] {
                if !owner.contains_key(&b) && model.tensor_bytes(a) == model.tensor_bytes(b) {
                    owner.insert(b, a);
                }
            }
        }
    }
    let mut out: Vec<Group> = Vec::new();
    let mut slot: BTreeMap<usize, usize> = BTreeMap::new();
    for &t in &prunable {
        let o = owner[&t];
        let e = &model.tensors[t];
        match slot.get(&o) {
            Some(&g) => {
                out[g].names.push(e.name.clone());
                out[g].tensors.push(t);
                out[g].numel += e.numel as u64;
            }
            None => {
                slot.insert(o, out.len());
                out.push(Group {
                    names: vec![e.name.clone()],
                    tensors: vec![t],
                    numel: e.numel as u64,
                });
            }
        }
    }
    out
}

/// One measured point of a curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub sparsity: f64,
    #[serde(flatten)]
    pub metrics: Metrics,
}

/// The metric of the model with one group pruned alone, across the grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// The tensors of the group (one, unless tied).
    pub name: Vec<String>,
    pub tensors: Vec<usize>,
    pub numel: u64,
    pub points: Vec<Point>,
}

impl Curve {
    /// (sparsity, metric) pairs in sparsity order, the dense model at 0 when the grid skips it.
    pub fn values(&self, kind: MetricKind, dense: f64) -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = self
            .points
            .iter()
            .map(|p| (p.sparsity, kind.value(&p.metrics)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        if v.first().is_none_or(|p| p.0 > 0.0) {
            v.insert(0, (0.0, dense));
        }
        v
    }

    /// The metric's drop from dense at sparsity `s`, interpolated linearly between measured
    /// points; past the last point the last segment's slope continues (never upwards).
    pub fn drop_at(&self, kind: MetricKind, dense: f64, s: f64) -> f64 {
        let v = self.values(kind, dense);
        dense - interpolate(&v, s)
    }
}

/// Piecewise-linear interpolation through sorted `(x, y)` points, extended past the last point
/// with the last segment's slope when that slope is falling (a curve that dips keeps dipping;
/// one that is flat stays flat).
pub fn interpolate(v: &[(f64, f64)], x: f64) -> f64 {
    match v {
        [] => f64::NAN,
        [p] => p.1,
        _ => {
            if x <= v[0].0 {
                return v[0].1;
            }
            for w in v.windows(2) {
                let ((x0, y0), (x1, y1)) = (w[0], w[1]);
                if x <= x1 {
                    if x1 - x0 < 1e-15 {
                        return y1;
                    }
                    return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
                }
            }
            let n = v.len();
            let ((x0, y0), (x1, y1)) = (v[n - 2], v[n - 1]);
            let slope = if x1 - x0 < 1e-15 {
                0.0
            } else {
                ((y1 - y0) / (x1 - x0)).min(0.0)
            };
            y1 + slope * (x - x1)
        }
    }
}

/// Every curve of a sweep, finished or not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    pub metric: MetricKind,
    pub dense: Metrics,
    pub grid: Vec<f64>,
    pub criterion: Criterion,
    pub seed: u64,
    pub pattern: Pattern,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub calibration: usize,
    /// What was measured on ("uci-digits/test, 360 samples").
    pub data: String,
    pub layers: Vec<Curve>,
    /// Every point of every curve is measured (a cancelled sweep keeps what it finished).
    pub complete: bool,
    /// Time spent evaluating, summed over the runs that filled these curves.
    pub sweep_ms: f64,
    /// Evaluations run (points at sparsity 0 reuse the dense model's metrics).
    pub evaluations: usize,
    /// Found in the cache, not measured now.
    #[serde(default)]
    pub cached: bool,
}

impl Sensitivity {
    /// The dense value of the metric.
    pub fn dense_value(&self) -> f64 {
        self.metric.value(&self.dense)
    }

    pub fn spec(&self) -> SweepSpec {
        SweepSpec {
            grid: self.grid.clone(),
            criterion: self.criterion,
            seed: self.seed,
            pattern: self.pattern,
            calibration: self.calibration,
        }
    }

    pub fn points_done(&self) -> usize {
        self.layers.iter().map(|c| c.points.len()).sum()
    }

    pub fn points_total(&self) -> usize {
        self.layers.len() * self.spec().points().len()
    }

    /// The table as CSV: one row per (layer, sparsity).
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "layer,tensors,numel,sparsity,accuracy,top5,loss,cosine,rel_l2,top1_agreement\n",
        );
        let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
        for c in &self.layers {
            for p in &c.points {
                let m = &p.metrics;
                s.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{},{}\n",
                    csv_field(&c.name[0]),
                    csv_field(&c.name.join(" ")),
                    c.numel,
                    p.sparsity,
                    f(m.accuracy),
                    f(m.top5),
                    f(m.loss),
                    f(m.fidelity.map(|x| x.cosine)),
                    f(m.fidelity.map(|x| x.rel_l2)),
                    f(m.fidelity.map(|x| x.top1_agreement)),
                ));
            }
        }
        s
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serialises")
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The mask of tensor `t` pruned alone at sparsity `s` under `spec` (`None`: nothing pruned).
pub fn layer_mask_at(
    model: &Model,
    index: &ScoreIndex,
    spec: &SweepSpec,
    t: usize,
    s: f64,
) -> Option<crate::prune::Mask> {
    let numel = model.tensors[t].numel;
    let pruned = match spec.pattern {
        Pattern::NM { n, m } if s > 0.0 => nm_pruned_count(&model.tensors[t], n, m),
        Pattern::NM { .. } => 0,
        Pattern::Unstructured => ((s * numel as f64).round() as usize).min(numel),
        // Sweeps refuse structured cuts before they start (see `sweep`).
        Pattern::Neuron | Pattern::Channel | Pattern::Head => return None,
        Pattern::Block { b } => {
            let blocks = crate::prune::blocks::blocks_for(model, index, b);
            let tb = blocks[t].as_ref()?;
            let j = tb.blocks_for((s * numel as f64).round() as u64);
            return (j > 0).then(|| tb.mask(j));
        }
    };
    if pruned == 0 {
        return None;
    }
    let settings = PruneSettings {
        criterion: spec.criterion,
        seed: spec.seed,
        pattern: spec.pattern,
        ..Default::default()
    };
    let alloc = LayerAlloc {
        tensor: t,
        numel,
        pruned,
        threshold: None,
        capped: false,
    };
    Some(build_layer_mask(model, index, &settings, &alloc))
}

/// Runs the sweep, calling `on_point` after every measured point with the curves so far.
///
/// `resume` holds curves from an earlier, cancelled run of the same sweep: its points are kept
/// and not measured again. Cancelling returns the curves so far with `complete == false`.
/// `index` must score with `spec.criterion` (and seed).
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    model: &Model,
    index: &ScoreIndex,
    evaluator: &dyn Evaluator,
    spec: &SweepSpec,
    groups: Vec<Group>,
    resume: Option<&Sensitivity>,
    progress: &Progress,
    mut on_point: impl FnMut(&Sensitivity),
) -> Result<Sensitivity, SensitivityError> {
    if groups.is_empty() {
        return Err(SensitivityError::NothingToSweep);
    }
    if spec.criterion.updates_weights() {
        return Err(SensitivityError::Prune(PruneError::Calibration(format!(
            "{} changes the kept weights; sensitivity curves rank weights by a score: sweep \
             magnitude or wanda",
            spec.criterion.cli_name()
        ))));
    }
    if spec.pattern.structured() {
        return Err(SensitivityError::Prune(PruneError::Structured(format!(
            "sensitivity curves prune one layer at a time, and a {} cut moves whole dependency \
             groups: sweep unstructured or N:M",
            spec.pattern
        ))));
    }
    let t0 = Instant::now();
    let dense = match resume {
        Some(r) => r.dense,
        None => evaluator.evaluate(model, &MaskSet::new())?,
    };
    let points = spec.points();
    let mut out = Sensitivity {
        metric: MetricKind::of(&dense),
        dense,
        grid: spec.grid.clone(),
        criterion: spec.criterion,
        seed: spec.seed,
        pattern: spec.pattern,
        calibration: spec.calibration,
        data: evaluator.describe(),
        layers: groups
            .into_iter()
            .map(|g| {
                let done = resume
                    .and_then(|r| r.layers.iter().find(|c| c.name == g.names))
                    .map(|c| c.points.clone())
                    .unwrap_or_default();
                Curve {
                    name: g.names,
                    tensors: g.tensors,
                    numel: g.numel,
                    points: done,
                }
            })
            .collect(),
        complete: false,
        sweep_ms: resume.map_or(0.0, |r| r.sweep_ms),
        evaluations: resume.map_or(0, |r| r.evaluations),
        cached: false,
    };
    let total = out.points_total().max(1);
    let mut done = out.points_done();
    // Points run side by side, as many at once as there are threads: small models are
    // latency-bound per evaluation, and the curves still fill a few points at a time. Engines
    // without a partial path decode the whole model per point, so big models go one at a time.
    let threads = if model.total_params() > PARALLEL_POINTS_MAX_PARAMS {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    for g in 0..out.layers.len() {
        let pending: Vec<f64> = points
            .iter()
            .copied()
            .filter(|&s| {
                !out.layers[g]
                    .points
                    .iter()
                    .any(|p| (p.sparsity - s).abs() < 1e-12)
            })
            .collect();
        let tensors = out.layers[g].tensors.clone();
        for chunk in pending.chunks(threads) {
            if progress.check().is_err() {
                out.sweep_ms += t0.elapsed().as_secs_f64() * 1e3;
                return Ok(out);
            }
            let measured: Vec<Result<(Metrics, bool), SensitivityError>> = chunk
                .par_iter()
                .map(|&s| {
                    let mut masks = MaskSet::new();
                    for &t in &tensors {
                        if let Some(m) = layer_mask_at(model, index, spec, t, s) {
                            masks.insert(model, &model.tensors[t].name, m)?;
                        }
                    }
                    if masks.is_empty() {
                        return Ok((dense, false));
                    }
                    Ok((evaluator.evaluate_partial(model, &masks)?, true))
                })
                .collect();
            for (&s, r) in chunk.iter().zip(measured) {
                let (metrics, evaluated) = r?;
                out.evaluations += evaluated as usize;
                let c = &mut out.layers[g];
                c.points.push(Point {
                    sparsity: s,
                    metrics,
                });
                done += 1;
                progress.report(
                    done as f32 / total as f32,
                    &format!("{} at {:.0}%", c.name[0], s * 100.0),
                );
            }
            out.layers[g]
                .points
                .sort_by(|a, b| a.sparsity.total_cmp(&b.sparsity));
            on_point(&out);
        }
    }
    out.complete = true;
    out.sweep_ms += t0.elapsed().as_secs_f64() * 1e3;
    Ok(out)
}

/// A finished sweep: from the disk cache when `use_cache` and it is there, else measured (and
/// then cached). The CLI's path; the GUI's worker adds an in-memory cache and resuming.
pub fn measure(
    model: &Model,
    evaluator: &dyn Evaluator,
    spec: &SweepSpec,
    settings: &PruneSettings,
    use_cache: bool,
    progress: &Progress,
) -> Result<Sensitivity, SensitivityError> {
    let groups = groups(model, settings);
    let key = model
        .content_hash()
        .ok()
        .and_then(|h| model_key(model, &h))
        .map(|k| cache_key(&k, &sweep_data_key(evaluator), spec, &groups));
    if use_cache && let Some(s) = key.as_deref().and_then(load_cached) {
        return Ok(s);
    }
    let data = evaluator.shared_data();
    let index = ScoreIndex::build(
        model,
        spec.criterion,
        spec.seed,
        &spec.score_inputs(data.as_deref()),
        progress,
    )?;
    let s = sweep(
        model,
        &index,
        evaluator,
        spec,
        groups,
        None,
        progress,
        |_| {},
    )?;
    if !s.complete {
        return Err(SensitivityError::Prune(PruneError::Cancelled));
    }
    if let Some(k) = &key {
        // The cache only saves time; a read-only home directory must not fail the sweep.
        let _ = store_cached(k, &s);
    }
    Ok(s)
}

/// Everything of a model that changes its outputs: the file's SHA-256, its external data
/// files' and the architecture description's (a sidecar can change without the file).
/// `content_hash` is the file's own, which callers usually hold already.
pub fn model_key(model: &Model, content_hash: &str) -> Option<String> {
    let mut parts = vec![content_hash.to_string()];
    for (_, path) in model.input_files().into_iter().skip(1) {
        parts.push(crate::util::sha256_file(path).ok()?);
    }
    if let Ok(Some(arch)) = crate::eval::arch_json(model) {
        parts.push(crate::util::sha256_hex(arch.as_bytes()));
    }
    Some(crate::util::sha256_hex(parts.join(":").as_bytes()))
}

/// What is measured and by which engine (engines agree to float tolerance, not bit for bit).
pub fn sweep_data_key(evaluator: &dyn Evaluator) -> String {
    format!("{}|{}", evaluator.fingerprint(), evaluator.engine().name)
}

/// The cache key of a sweep: the model's content, what is measured, the criterion, pattern
/// and grid, and the groups swept.
pub fn cache_key(model_hash: &str, data: &str, spec: &SweepSpec, groups: &[Group]) -> String {
    let names: Vec<&Vec<String>> = groups.iter().map(|g| &g.names).collect();
    let key = serde_json::json!({
        "version": 1,
        "model": model_hash,
        "data": data,
        "spec": spec,
        "groups": names,
    });
    crate::util::sha256_hex(key.to_string().as_bytes())
}

/// Where finished sweeps are kept: `$PRUNESCOPE_CACHE_DIR`, else `$XDG_CACHE_HOME/prunescope`,
/// else `~/.cache/prunescope`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PRUNESCOPE_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("prunescope"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("prunescope"))
}

fn cache_file(dir: &Path, key: &str) -> PathBuf {
    dir.join("sensitivity").join(format!("{key}.json"))
}

/// A finished sweep from the disk cache, if there is a readable one.
pub fn load_cached(key: &str) -> Option<Sensitivity> {
    let path = cache_file(&cache_dir()?, key);
    let text = std::fs::read_to_string(path).ok()?;
    let mut s: Sensitivity = serde_json::from_str(&text).ok()?;
    s.complete.then_some(())?;
    s.cached = true;
    Some(s)
}

/// Stores a finished sweep (atomically); a cache that cannot be written is not an error the
/// user needs to act on, so the reason is only returned.
pub fn store_cached(key: &str, s: &Sensitivity) -> Result<(), String> {
    let dir = cache_dir().ok_or("no cache directory (HOME is not set)")?;
    let path = cache_file(&dir, key);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    use std::io::Write;
    crate::util::atomic_write(&path, |w| w.write_all(s.to_json().as_bytes()))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_parses_sorts_and_refuses_nonsense() {
        assert_eq!(parse_grid("0.9, 0.1,0.5,0.5").unwrap(), vec![0.1, 0.5, 0.9]);
        assert!(parse_grid("0.1,x").is_err());
        assert!(parse_grid("1.5").is_err());
        assert!(parse_grid(" , ").is_err());
    }

    #[test]
    fn interpolation_matches_hand_values() {
        let v = [(0.0, 1.0), (0.5, 0.8), (0.9, 0.2)];
        assert!((interpolate(&v, 0.25) - 0.9).abs() < 1e-12);
        assert!((interpolate(&v, 0.7) - 0.5).abs() < 1e-12);
        // Past the end the falling slope (-1.5 per unit) continues.
        assert!((interpolate(&v, 1.0) - 0.05).abs() < 1e-12);
        // A rising last segment does not extrapolate upwards.
        let up = [(0.0, 1.0), (0.5, 0.8), (0.9, 0.85)];
        assert!((interpolate(&up, 1.0) - 0.85).abs() < 1e-12);
    }
}
