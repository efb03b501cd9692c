//! Scores computed a tensor at a time: LAMP from each layer's sorted magnitudes, and the
//! data-driven criteria from gradients (Taylor, OBD) or layer inputs (Wanda) on calibration
//! samples, run through the model's graph on candle.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rayon::prelude::*;

use super::{Criterion, PruneError, ScoreInputs, key_of_score};
use crate::data::{ArrayValues, EvalData};
use crate::graph::{Graph, Mode, Node, Op};
use crate::model::Model;
use crate::progress::Progress;

/// Calibration samples used when none is asked for.
pub const DEFAULT_CALIBRATION: usize = 128;

/// Samples per forward and backward pass (Taylor, Wanda); OBD needs one sample a pass.
const BATCH: usize = 64;

/// Epochs over the calibration samples that the movement criterion fine-tunes a copy of the
/// model for, and the (plain SGD) learning rate of those steps: the fine-tune's default rate.
pub const MOVEMENT_EPOCHS: usize = 5;
pub const MOVEMENT_LR: f64 = 0.05;

/// Identifies what data-driven scores were computed on, for caches.
pub fn calibration_key(criterion: Criterion, inputs: &ScoreInputs) -> Option<String> {
    let data = inputs.calibration.filter(|_| criterion.needs_data())?;
    let fingerprint = match inputs.fingerprint {
        Some(f) => f.to_string(),
        None => data.fingerprint(),
    };
    Some(format!(
        "{fingerprint}:{}",
        samples_used(data, inputs.samples)
    ))
}

pub(super) fn samples_used(data: &EvalData, asked: usize) -> usize {
    let asked = if asked == 0 {
        DEFAULT_CALIBRATION
    } else {
        asked
    };
    asked.min(data.samples)
}

/// Every analysable tensor's scores under a precomputed criterion (`None` for the others).
pub fn tensor_scores(
    model: &Model,
    criterion: Criterion,
    inputs: &ScoreInputs,
    progress: &Progress,
) -> Result<Vec<Option<Vec<f32>>>, PruneError> {
    match criterion {
        Criterion::Lamp => {
            let label = format!("Scoring ({})", criterion.label());
            let done = std::sync::atomic::AtomicUsize::new(0);
            let n = model.tensors.len().max(1);
            (0..model.tensors.len())
                .into_par_iter()
                .map(|t| {
                    progress.check()?;
                    let s = model.tensors[t]
                        .analysable()
                        .then(|| lamp_scores(&model.to_f32_vec(t)));
                    let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    progress.report(d as f32 / n as f32, &label);
                    Ok(s)
                })
                .collect()
        }
        Criterion::Taylor
        | Criterion::Obd
        | Criterion::Wanda
        | Criterion::Apoz
        | Criterion::MeanActivation
        | Criterion::Movement => {
            let data = inputs.calibration.ok_or_else(|| {
                PruneError::Calibration(format!(
                    "{} needs calibration data: load evaluation data first (--data in the CLI, \
                     Data in the app)",
                    criterion.cli_name()
                ))
            })?;
            data_scores(model, criterion, data, inputs.samples, progress, true)
        }
        _ => Err(PruneError::Calibration(format!(
            "{} is scored weight by weight, not a tensor at a time",
            criterion.cli_name()
        ))),
    }
}

/// LAMP scores of one layer: w_u² / Σ_{v ⪰ u} w_v², where ⪰ is the ascending order of |w|
/// (ties in flat order). The largest weight scores 1, so no layer is ever emptied by a
/// global threshold below 1. NaN weights score NaN (pruned first), ±Inf scores +Inf.
pub fn lamp_scores(w: &[f32]) -> Vec<f32> {
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by_key(|&i| (key_of_score(w[i].abs()), i));
    let mut scores = vec![0f32; w.len()];
    let mut suffix = 0f64;
    for &i in order.iter().rev() {
        let v = w[i] as f64;
        if v.is_nan() {
            scores[i] = f32::NAN;
            continue;
        }
        if v.is_infinite() {
            scores[i] = f32::INFINITY;
            continue;
        }
        suffix += v * v;
        scores[i] = if suffix > 0.0 {
            (v * v / suffix) as f32
        } else {
            0.0
        };
    }
    scores
}

/// Wanda's raw scores of a weight laid out as `rows` output rows: |w| · `norm(row, col)`.
pub fn wanda_scores(w: &[f32], rows: usize, norm: &dyn Fn(usize, usize) -> f32) -> Vec<f32> {
    let cols = w.len() / rows.max(1);
    w.iter()
        .enumerate()
        .map(|(i, v)| v.abs() * norm(i / cols, i % cols))
        .collect()
}

/// Each score replaced by its rank within its row, as the fraction (rank + 1) / row length:
/// one threshold then removes the same fraction of every row, which is how Wanda compares
/// (within each output), and ties across rows break in flat order. NaN scores rank first.
pub fn row_ranks(scores: &[f32], rows: usize) -> Vec<f32> {
    let rows = rows.max(1);
    let cols = scores.len() / rows;
    let mut out = vec![0f32; scores.len()];
    let mut order: Vec<usize> = Vec::with_capacity(cols);
    for r in 0..rows {
        let row = &scores[r * cols..(r + 1) * cols];
        order.clear();
        order.extend(0..cols);
        order.sort_by_key(|&j| (key_of_score(row[j]), j));
        for (rank, &j) in order.iter().enumerate() {
            out[r * cols + j] = (rank + 1) as f32 / cols as f32;
        }
    }
    out
}

/// The sums of squares of the inputs each weight column of a Conv2d multiplies: for input
/// channel c and kernel offset (ky, kx), every position the kernel visits over the batch
/// (padding contributes zeros). `x` is `[B, C, H, W]`; the result is `[C, kh, kw]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_input_sq(
    x: &[f32],
    shape: [usize; 4],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    out: &mut [f64],
) {
    let [b, c, h, w] = shape;
    let [kh, kw] = kernel;
    let span = |d: usize, size: usize| {
        let reach = dilation[d] * (kernel[d] - 1) + 1;
        (size + 2 * padding[d]).saturating_sub(reach) / stride[d] + 1
    };
    let (oh, ow) = (span(0, h), span(1, w));
    for bi in 0..b {
        for ci in 0..c {
            let plane = &x[(bi * c + ci) * h * w..(bi * c + ci + 1) * h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let mut acc = 0f64;
                    for oy in 0..oh {
                        let iy = (oy * stride[0] + ky * dilation[0]) as isize - padding[0] as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for ox in 0..ow {
                            let ix =
                                (ox * stride[1] + kx * dilation[1]) as isize - padding[1] as isize;
                            if ix >= 0 && ix < w as isize {
                                let v = plane[iy as usize * w + ix as usize] as f64;
                                acc += v * v;
                            }
                        }
                    }
                    out[(ci * kh + ky) * kw + kx] += acc;
                }
            }
        }
    }
}

/// The calibration samples as the graph's batched inputs, in chunks of `batch`, with labels.
pub(super) struct Batches {
    pub(super) inputs: Vec<Vec<Tensor>>,
    labels: Vec<Option<Tensor>>,
    sizes: Vec<usize>,
    n: usize,
}

pub(super) fn batches(
    graph: &Graph,
    data: &EvalData,
    n: usize,
    batch: usize,
    need_labels: bool,
    criterion: Criterion,
) -> Result<Batches, PruneError> {
    let err = |msg: String| PruneError::Calibration(format!("{}: {msg}", criterion.cli_name()));
    if n == 0 {
        return Err(err(format!("the data '{}' has no samples", data.name)));
    }
    let labels = match (&data.labels, need_labels) {
        (Some(l), _) => Some(l),
        (None, true) => {
            return Err(err(format!(
                "needs labelled data (a loss to differentiate) and '{}' has no labels",
                data.name
            )));
        }
        (None, false) => None,
    };
    let mut arrays = Vec::new();
    for spec in &graph.inputs {
        let a = data
            .input(&spec.name)
            .or_else(|| {
                (graph.inputs.len() == 1 && data.inputs.len() == 1).then(|| &data.inputs[0])
            })
            .ok_or_else(|| err(format!("the data has no array for input '{}'", spec.name)))?;
        let per: usize = spec.shape.iter().product();
        if a.sample_len() != per {
            return Err(err(format!(
                "array '{}' has {} values a sample and input '{}' takes {per} ({:?})",
                a.name,
                a.sample_len(),
                spec.name,
                spec.shape
            )));
        }
        let ArrayValues::F32(v) = &a.values else {
            return Err(err(format!("array '{}' is not f32", a.name)));
        };
        arrays.push((v, per, spec.shape.clone()));
    }
    let mut out = Batches {
        inputs: Vec::new(),
        labels: Vec::new(),
        sizes: Vec::new(),
        n,
    };
    let dev = Device::Cpu;
    let mut start = 0;
    while start < n {
        let b = batch.min(n - start);
        let mut xs = Vec::new();
        for (v, per, shape) in &arrays {
            let mut s = vec![b];
            s.extend(shape);
            let slice = v[start * per..(start + b) * per].to_vec();
            xs.push(Tensor::from_vec(slice, s, &dev)?);
        }
        out.inputs.push(xs);
        out.labels.push(match labels {
            Some(l) => Some(Tensor::from_vec(l[start..start + b].to_vec(), b, &dev)?),
            None => None,
        });
        out.sizes.push(b);
        start += b;
    }
    Ok(out)
}

impl From<candle_core::Error> for PruneError {
    fn from(e: candle_core::Error) -> Self {
        PruneError::Calibration(format!("computing scores failed: {e}"))
    }
}

impl From<crate::graph::GraphError> for PruneError {
    fn from(e: crate::graph::GraphError) -> Self {
        PruneError::Calibration(format!("running the graph failed: {e}"))
    }
}

/// Wanda's raw scores |w_ij| · ‖X_j‖₂ of every analysable tensor, before they are turned into
/// ranks within rows (OWL counts their outliers).
pub fn wanda_raw(
    model: &Model,
    data: &EvalData,
    samples: usize,
    progress: &Progress,
) -> Result<Vec<Option<Vec<f32>>>, PruneError> {
    data_scores(model, Criterion::Wanda, data, samples, progress, false)
}

/// `row_ranked`: Wanda's scores as ranks within rows (the criterion), or raw.
fn data_scores(
    model: &Model,
    criterion: Criterion,
    data: &EvalData,
    samples: usize,
    progress: &Progress,
    row_ranked: bool,
) -> Result<Vec<Option<Vec<f32>>>, PruneError> {
    let graph = match crate::train::Trainable::graph_of(model) {
        Ok(g) => g,
        // A graph only tract runs (a transformer): Wanda's inputs are collected there.
        Err(e)
            if criterion == Criterion::Wanda && model.format == crate::model::ModelFormat::Onnx =>
        {
            return tract_wanda(model, data, samples, progress, row_ranked, &e);
        }
        Err(e) => {
            return Err(PruneError::Calibration(format!(
                "{} runs the model on calibration data, and {e}",
                criterion.cli_name()
            )));
        }
    };
    let n = samples_used(data, samples);
    let label = format!("Calibrating {} on {n} samples", criterion.label());
    let batch = if criterion == Criterion::Obd {
        1
    } else {
        BATCH
    };
    let b = batches(&graph, data, n, batch, criterion.needs_labels(), criterion)?;
    let dev = Device::Cpu;
    let params = crate::graph::load_params(&graph, model, None, &dev)?;
    let mut scores: Vec<Option<Vec<f32>>> = vec![None; model.tensors.len()];
    match criterion {
        Criterion::Apoz | Criterion::MeanActivation => {
            let stats = input_activity(&graph, &params, &b, criterion, progress, &label)?;
            for (t, e) in model.tensors.iter().enumerate() {
                if !e.analysable() {
                    continue;
                }
                // A weight scores the activity of the input it reads; a channel's score, the
                // sum over its group's slices, then ranks by the activity of the channel
                // itself (every other slice adds the same to each of its channels).
                let rows = e.shape.first().copied().unwrap_or(1).max(1);
                scores[t] = Some(match stats.get(e.name.as_str()) {
                    Some(stat) => (0..e.numel)
                        .map(|i| stat(i / (e.numel / rows), i % (e.numel / rows)))
                        .collect(),
                    None => vec![0.0; e.numel],
                });
            }
        }
        Criterion::Wanda => {
            let sq = wanda_input_sq(&graph, &params, &b, progress, &label)?;
            for (t, e) in model.tensors.iter().enumerate() {
                if !e.analysable() {
                    continue;
                }
                let w = model.to_f32_vec(t);
                let rows = e.shape.first().copied().unwrap_or(1).max(1);
                let raw = match sq.get(e.name.as_str()) {
                    Some(norm) => wanda_scores(&w, rows, &|r, c| norm(r, c)),
                    // Not the weight of a Linear or Conv2d: no input is known, so its rows
                    // compare by magnitude alone.
                    None => w.iter().map(|v| v.abs()).collect(),
                };
                scores[t] = Some(if row_ranked {
                    row_ranks(&raw, rows)
                } else {
                    raw
                });
            }
        }
        Criterion::Movement => {
            let raw = movement_raw(&graph, &params, &b, progress, &label)?;
            for (t, s) in movement_scores(model, &raw).into_iter().enumerate() {
                scores[t] = s;
            }
        }
        _ => {
            let fisher = criterion == Criterion::Obd;
            let grads = gradient_stats(&graph, &params, &b, fisher, progress, &label)?;
            for (t, e) in model.tensors.iter().enumerate() {
                if !e.analysable() {
                    continue;
                }
                let w = model.to_f32_vec(t);
                // A tensor the graph does not read leaves the loss unchanged: score 0.
                let s = match grads.get(e.name.as_str()) {
                    Some(g) if fisher => w
                        .iter()
                        .zip(g)
                        .map(|(w, f)| (0.5 * (*w as f64) * (*w as f64) * f) as f32)
                        .collect(),
                    Some(g) => w
                        .iter()
                        .zip(g)
                        .map(|(w, g)| ((*w as f64) * g).abs() as f32)
                        .collect(),
                    None => vec![0.0; e.numel],
                };
                scores[t] = Some(s);
            }
        }
    }
    Ok(scores)
}

/// Wanda on an ONNX graph that only tract runs: the activations that each MatMul or Gemm
/// multiplies a weight by are observed there. Other tensors compare by magnitude within rows,
/// as on the candle path.
fn tract_wanda(
    model: &Model,
    data: &EvalData,
    samples: usize,
    progress: &Progress,
    row_ranked: bool,
    why: &str,
) -> Result<Vec<Option<Vec<f32>>>, PruneError> {
    let mut sq: Vec<Vec<f64>> = Vec::new();
    let (weights, names) = observe_through_tract(
        model,
        Criterion::Wanda,
        data,
        samples,
        progress,
        why,
        &mut |k, rows, width| {
            if sq.len() <= k {
                sq.resize(k + 1, Vec::new());
            }
            let a = &mut sq[k];
            a.resize(width, 0.0);
            for row in rows.chunks(width) {
                for (a, v) in a.iter_mut().zip(row) {
                    *a += (*v as f64) * (*v as f64);
                }
            }
        },
    )?;
    let mut scores: Vec<Option<Vec<f32>>> = vec![None; model.tensors.len()];
    for (t, e) in model.tensors.iter().enumerate() {
        if !e.analysable() {
            continue;
        }
        let w = model.to_f32_vec(t);
        let rows = e.shape.first().copied().unwrap_or(1).max(1);
        let cols = e.numel / rows;
        let found = weights.iter().find(|m| m.tensor == t);
        let raw: Vec<f32> = match found {
            Some(m) => {
                let k = names.binary_search(&m.activation).expect("listed above");
                let norms: Vec<f32> = sq[k].iter().map(|v| v.sqrt() as f32).collect();
                let inputs = if m.in_on_columns { cols } else { rows };
                if norms.len() != inputs {
                    return Err(PruneError::Calibration(format!(
                        "wanda: '{}' reads {inputs} input features, and its input '{}' has {}",
                        e.name,
                        m.activation,
                        norms.len()
                    )));
                }
                // The input feature is the column of an [out, in] weight, the row of [in, out].
                let in_columns = m.in_on_columns;
                wanda_scores(&w, rows, &|r, c| norms[if in_columns { c } else { r }])
            }
            None => w.iter().map(|v| v.abs()).collect(),
        };
        scores[t] = Some(match (row_ranked, found) {
            (false, _) => raw,
            // [in, out]: an output neuron is a column, and Wanda compares within it.
            (true, Some(m)) if !m.in_on_columns => {
                let ranked = row_ranks(&transpose(&raw, rows, cols), cols);
                transpose(&ranked, cols, rows)
            }
            (true, _) => row_ranks(&raw, rows),
        });
    }
    Ok(scores)
}

/// For an ONNX graph that only tract runs: every weight a MatMul or Gemm multiplies an
/// activation by, and those activations' names (sorted, each once), after `f` has seen each
/// activation's rows on the first `samples` calibration samples (see
/// [`crate::eval::OnnxRunner::observe`]; `f`'s `k` indexes the names). `why`: why prunescope's
/// own graph does not run the model.
pub(super) fn observe_through_tract(
    model: &Model,
    criterion: Criterion,
    data: &EvalData,
    samples: usize,
    progress: &Progress,
    why: &str,
    f: &mut dyn FnMut(usize, &[f32], usize),
) -> Result<(Vec<crate::eval::MatmulWeight>, Vec<String>), PruneError> {
    let name = criterion.cli_name();
    let fail = |e: crate::eval::EvalError| {
        PruneError::Calibration(format!("{name} collects its inputs through tract, and {e}"))
    };
    let info = crate::eval::GraphInfo::read(model).map_err(fail)?;
    let weights = info.matmul_weights(model);
    if weights.is_empty() {
        return Err(PruneError::Calibration(format!(
            "{name} runs the model on calibration data, and {why}; no MatMul or Gemm in it \
             multiplies a weight either"
        )));
    }
    let n = samples_used(data, samples);
    let runner = crate::eval::OnnxRunner::new(model, info, std::sync::Arc::new(data.head(n)))
        .map_err(fail)?;
    let mut names: Vec<String> = weights.iter().map(|w| w.activation.clone()).collect();
    names.sort();
    names.dedup();
    let label = format!("Calibrating {} on {n} samples (tract)", criterion.label());
    runner
        .observe(model, &names, progress, &label, f)
        .map_err(|e| match progress.check() {
            Err(_) => PruneError::Cancelled,
            Ok(()) => fail(e),
        })?;
    Ok((weights, names))
}

/// `v` (`rows × cols`, row-major) transposed.
pub(super) fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// Per-variable sums, one f64 per element.
type Sums = HashMap<String, Vec<f64>>;

/// Every tensor training updates as a candle variable, the parameters that read them, and a
/// zeroed sum for each.
fn variables(
    graph: &Graph,
    params: &crate::graph::Params,
) -> Result<(HashMap<String, Var>, crate::graph::Params, Sums), PruneError> {
    let mut vars: HashMap<String, Var> = HashMap::new();
    let mut run_params = params.clone();
    for name in graph.trainable_names() {
        let v = Var::from_tensor(&params[&name])?;
        run_params.insert(name.clone(), v.as_tensor().clone());
        vars.insert(name, v);
    }
    let sums = vars
        .iter()
        .map(|(k, v)| (k.clone(), vec![0f64; v.elem_count()]))
        .collect();
    Ok((vars, run_params, sums))
}

/// The gradients of the mean cross-entropy of calibration batch `k`.
fn batch_gradients(
    graph: &Graph,
    run_params: &crate::graph::Params,
    b: &Batches,
    k: usize,
) -> Result<candle_core::backprop::GradStore, PruneError> {
    let (logits, _) = graph.forward(&b.inputs[k], run_params, Mode::Eval)?;
    if logits.rank() != 2 {
        return Err(PruneError::Calibration(format!(
            "a loss needs one row of class scores a sample, and the graph's output is {:?}",
            logits.dims()
        )));
    }
    let y = b.labels[k].as_ref().expect("labels checked");
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    Ok(loss.backward()?)
}

/// Movement's signed sums −Σ_t w_t · g_t over [`MOVEMENT_EPOCHS`] epochs of plain SGD (rate
/// [`MOVEMENT_LR`], BatchNorm and dropout in inference mode) on the calibration batches, for
/// every tensor training updates. The trained copy is dropped: only the sums come back.
pub(super) fn movement_raw(
    graph: &Graph,
    params: &crate::graph::Params,
    b: &Batches,
    progress: &Progress,
    label: &str,
) -> Result<HashMap<String, Vec<f64>>, PruneError> {
    let (vars, run_params, mut acc) = variables(graph, params)?;
    let total = (MOVEMENT_EPOCHS * b.inputs.len()).max(1);
    let mut done = 0;
    for _ in 0..MOVEMENT_EPOCHS {
        for k in 0..b.inputs.len() {
            progress.check()?;
            let grads = batch_gradients(graph, &run_params, b, k)?;
            for (name, v) in &vars {
                let Some(g) = grads.get(v.as_tensor()) else {
                    continue;
                };
                let gv: Vec<f32> = g.flatten_all()?.to_vec1()?;
                let wv: Vec<f32> = v.as_tensor().flatten_all()?.to_vec1()?;
                crate::train::add_movement(acc.get_mut(name).expect("same keys"), &wv, &gv);
                // In place: `run_params` holds the same storage, so the next batch sees it.
                v.set(&(v.as_tensor() - (g * MOVEMENT_LR)?)?)?;
            }
            done += 1;
            progress.report(done as f32 / total as f32, label);
        }
    }
    Ok(acc)
}

/// Movement's signed sums as the non-negative scores the index orders: each sum's rank among
/// every analysable tensor's sums (equal sums share a rank), so the order within and across
/// tensors is the sums' order. Shifting the sums by the lowest instead would round small
/// differences away next to a large shift. Ranks are exact in f32 up to 2^24 distinct sums;
/// beyond, neighbours may share a score, never swap. A tensor the graph does not read moved
/// nowhere: 0. A NaN sum scores NaN (pruned first, as NaN weights are).
pub fn movement_scores(model: &Model, raw: &HashMap<String, Vec<f64>>) -> Vec<Option<Vec<f32>>> {
    let sums: Vec<Option<Vec<f64>>> = model
        .tensors
        .iter()
        .map(|e| {
            e.analysable().then(|| {
                raw.get(e.name.as_str())
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; e.numel])
            })
        })
        .collect();
    let mut sorted: Vec<f64> = sums
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|v| !v.is_nan())
        .collect();
    sorted.sort_by(f64::total_cmp);
    sorted.dedup();
    let rank = |v: f64| -> f32 {
        if v.is_nan() {
            f32::NAN
        } else {
            (sorted.partition_point(|x| *x < v) + 1) as f32
        }
    };
    sums.into_iter()
        .map(|s| s.map(|s| s.into_iter().map(rank).collect()))
        .collect()
}

/// The mean gradient of the loss over the samples, or (with `fisher`) the mean of the squared
/// per-sample gradients, for every tensor training updates.
fn gradient_stats(
    graph: &Graph,
    params: &crate::graph::Params,
    b: &Batches,
    fisher: bool,
    progress: &Progress,
    label: &str,
) -> Result<HashMap<String, Vec<f64>>, PruneError> {
    let (vars, run_params, mut acc) = variables(graph, params)?;
    let mut done = 0;
    for k in 0..b.inputs.len() {
        progress.check()?;
        let grads = batch_gradients(graph, &run_params, b, k)?;
        let weight = b.sizes[k] as f64 / b.n as f64;
        for (name, v) in &vars {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            let a = acc.get_mut(name).expect("same keys");
            for (a, g) in a.iter_mut().zip(g) {
                let g = g as f64;
                // Each pass holds one sample for the Fisher; the mean loss's gradient otherwise.
                *a += if fisher {
                    g * g / b.n as f64
                } else {
                    g * weight
                };
            }
        }
        done += b.sizes[k];
        progress.report(done as f32 / b.n as f32, label);
    }
    Ok(acc)
}

/// Runs every calibration batch through `graph` and shows `f` each node with its first input,
/// with progress and cancel between batches; the first error `f` returns stops the run.
pub(super) fn observe_inputs(
    graph: &Graph,
    params: &crate::graph::Params,
    b: &Batches,
    progress: &Progress,
    label: &str,
    f: &mut dyn FnMut(&Node, &Tensor) -> Result<(), PruneError>,
) -> Result<(), PruneError> {
    let mut done = 0;
    for (k, xs) in b.inputs.iter().enumerate() {
        progress.check()?;
        let mut failure: Option<PruneError> = None;
        let mut observe = |n: &Node, x: &Tensor| {
            if failure.is_none()
                && let Err(e) = f(n, x)
            {
                failure = Some(e);
            }
        };
        graph.forward_observed(xs, params, Mode::Eval, &mut observe)?;
        if let Some(e) = failure {
            return Err(e);
        }
        done += b.sizes[k];
        progress.report(done as f32 / b.n as f32, label);
    }
    Ok(())
}

/// For each Linear and Conv2d weight, a function giving the activity of the input that the
/// weight in (row, column) reads: the fraction of its values that are not zero (APoZ's
/// complement) or their mean absolute value, over every sample and position.
#[allow(clippy::type_complexity)]
fn input_activity(
    graph: &Graph,
    params: &crate::graph::Params,
    b: &Batches,
    criterion: Criterion,
    progress: &Progress,
    label: &str,
) -> Result<HashMap<String, Box<dyn Fn(usize, usize) -> f32>>, PruneError> {
    // Per weight name and input feature (Linear) or input channel (Conv2d): (nonzero, sum |x|,
    // count).
    let mut acc: HashMap<String, Vec<(f64, f64, f64)>> = HashMap::new();
    observe_inputs(graph, params, b, progress, label, &mut |n, x| {
        let (weight, features, inner) = match &n.op {
            Op::Linear { weight, .. } => (weight, x.dim(candle_core::D::Minus1)?, 1),
            Op::Conv2d { weight, .. } => {
                let (_, c, h, w) = x.dims4()?;
                (weight, c, h * w)
            }
            _ => return Ok(()),
        };
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let a = acc
            .entry(weight.clone())
            .or_insert_with(|| vec![(0.0, 0.0, 0.0); features]);
        for (i, x) in v.iter().enumerate() {
            let e = &mut a[(i / inner) % features];
            e.0 += (*x != 0.0) as u8 as f64;
            e.1 += x.abs() as f64;
            e.2 += 1.0;
        }
        Ok(())
    })?;
    let mut out: HashMap<String, Box<dyn Fn(usize, usize) -> f32>> = HashMap::new();
    for n in &graph.nodes {
        let (weight, groups, k) = match &n.op {
            Op::Linear { weight, .. } => (weight, 1, 1),
            Op::Conv2d { weight, groups, .. } => {
                let w = params[weight].dims();
                (weight, *groups, w[2] * w[3])
            }
            _ => continue,
        };
        let Some(a) = acc.remove(weight) else {
            continue;
        };
        let stat: Vec<f32> = a
            .iter()
            .map(|(nz, sum, n)| {
                let n = n.max(1.0);
                (if criterion == Criterion::Apoz {
                    nz / n
                } else {
                    sum / n
                }) as f32
            })
            .collect();
        let w = params[weight].dims().to_vec();
        let (per_group_out, cin) = (w[0] / groups.max(1), w.get(1).copied().unwrap_or(1));
        // Column j of row o reads input feature j (Linear), or input channel
        // g·(in/groups) + j / (kh·kw) of its group g (Conv2d).
        out.insert(
            weight.clone(),
            Box::new(move |o, j| {
                let g = o / per_group_out.max(1);
                stat[g * cin + j / k]
            }),
        );
    }
    Ok(out)
}

/// For each Linear and Conv2d weight, a function giving ‖X_j‖₂ for (row, column): the norm of
/// the inputs that the weight in that row and column multiplies, over all samples.
#[allow(clippy::type_complexity)]
fn wanda_input_sq(
    graph: &Graph,
    params: &crate::graph::Params,
    b: &Batches,
    progress: &Progress,
    label: &str,
) -> Result<HashMap<String, Box<dyn Fn(usize, usize) -> f32>>, PruneError> {
    // Sums of squares per weight name: a Linear's per input feature, a Conv2d's per
    // (input channel, ky, kx).
    let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
    observe_inputs(graph, params, b, progress, label, &mut |n, x| {
        match &n.op {
            Op::Linear { weight, .. } => {
                let cols = x.dim(candle_core::D::Minus1)?;
                let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let s = sums
                    .entry(weight.clone())
                    .or_insert_with(|| vec![0.0; cols]);
                for (i, x) in v.iter().enumerate() {
                    s[i % cols] += (*x as f64) * (*x as f64);
                }
            }
            Op::Conv2d {
                weight,
                stride,
                padding,
                dilation,
                ..
            } => {
                let w = params[weight].dims().to_vec();
                let (bn, c, h, wd) = x.dims4()?;
                let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let s = sums
                    .entry(weight.clone())
                    .or_insert_with(|| vec![0.0; c * w[2] * w[3]]);
                conv_input_sq(
                    &v,
                    [bn, c, h, wd],
                    [w[2], w[3]],
                    *stride,
                    *padding,
                    *dilation,
                    s,
                );
            }
            _ => {}
        }
        Ok(())
    })?;
    let mut out: HashMap<String, Box<dyn Fn(usize, usize) -> f32>> = HashMap::new();
    for n in &graph.nodes {
        match &n.op {
            Op::Linear { weight, .. } => {
                if let Some(s) = sums.remove(weight) {
                    let norms: Vec<f32> = s.iter().map(|v| v.sqrt() as f32).collect();
                    out.insert(weight.clone(), Box::new(move |_, c| norms[c]));
                }
            }
            Op::Conv2d { weight, groups, .. } => {
                if let Some(s) = sums.remove(weight) {
                    let w = params[weight].dims().to_vec();
                    let norms: Vec<f32> = s.iter().map(|v| v.sqrt() as f32).collect();
                    // Row o reads the input channels of its group: channel g·(in/groups) + c.
                    let (per_group_out, cin, k) = (w[0] / groups.max(&1), w[1], w[2] * w[3]);
                    out.insert(
                        weight.clone(),
                        Box::new(move |o, col| {
                            let g = o / per_group_out.max(1);
                            norms[(g * cin) * k + col]
                        }),
                    );
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LAMP by its definition, one weight at a time: the denominator sums w² over every weight
    /// ordered at or after this one (larger |w|, or equal |w| and later in flat order).
    fn lamp_brute(w: &[f32]) -> Vec<f32> {
        (0..w.len())
            .map(|u| {
                let a = w[u].abs();
                let den: f64 = (0..w.len())
                    .filter(|&v| w[v].abs() > a || (w[v].abs() == a && v >= u))
                    .map(|v| (w[v] as f64).powi(2))
                    .sum();
                if den > 0.0 {
                    ((w[u] as f64).powi(2) / den) as f32
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn lamp_matches_its_definition_with_ties_and_zeros() {
        let w = [0.5f32, -0.1, 0.0, 2.0, -0.5, 0.1, 0.0, 1.5, -2.0];
        let got = lamp_scores(&w);
        let want = lamp_brute(&w);
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() <= 1e-6 * e.max(1.0), "{got:?} vs {want:?}");
        }
        // Hand-worked: the largest weight in flat order scores 1 (its own square over itself).
        assert_eq!(got[8], 1.0);
        assert!((got[3] - 4.0 / 8.0).abs() < 1e-7);
        // Random layers: every tie rule and order matches the brute force.
        let mut rng = crate::util::SplitMix64::new(7);
        for n in [1usize, 2, 17, 64] {
            let w: Vec<f32> = (0..n)
                .map(|_| ((rng.next_f64() * 8.0).round() - 4.0) as f32 / 4.0)
                .collect();
            let (got, want) = (lamp_scores(&w), lamp_brute(&w));
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-6, "{w:?}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn lamp_ranks_nan_first_and_inf_last() {
        let s = lamp_scores(&[f32::NAN, 1.0, f32::INFINITY, 0.5]);
        assert!(s[0].is_nan());
        assert_eq!(s[2], f32::INFINITY);
        assert!(key_of_score(s[0]) < key_of_score(s[3]));
    }

    #[test]
    fn wanda_scores_by_hand() {
        // Two outputs, three inputs; inputs seen on two samples: x = [1, 0, 2] and [2, 0, -1].
        // ‖X_0‖ = √5, ‖X_1‖ = 0, ‖X_2‖ = √5.
        let norms = [5f32.sqrt(), 0.0, 5f32.sqrt()];
        let w = [0.5f32, 3.0, -0.1, -1.0, 0.2, 0.4];
        let s = wanda_scores(&w, 2, &|_, c| norms[c]);
        let want = [
            0.5 * 5f32.sqrt(),
            0.0,
            0.1 * 5f32.sqrt(),
            5f32.sqrt(),
            0.0,
            0.4 * 5f32.sqrt(),
        ];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{s:?}");
        }
        // Within each row: row 0 ranks w1 (score 0) < w2 < w0; row 1 ranks w4 < w5 < w3. The
        // large weight 3.0 on a silent input goes first, which magnitude would keep.
        let r = row_ranks(&s, 2);
        let third = |k: f32| k / 3.0;
        assert_eq!(
            r,
            vec![
                third(3.0),
                third(1.0),
                third(2.0),
                third(3.0),
                third(1.0),
                third(2.0)
            ]
        );
    }

    #[test]
    fn conv_input_norms_match_an_explicit_unfold() {
        let mut rng = crate::util::SplitMix64::new(3);
        for (shape, kernel, stride, padding, dilation) in [
            (
                [2usize, 3, 5, 4],
                [3usize, 3],
                [1usize, 1],
                [1usize, 1],
                [1usize, 1],
            ),
            ([1, 2, 6, 6], [2, 3], [2, 1], [0, 2], [1, 2]),
        ] {
            let [b, c, h, w] = shape;
            let x: Vec<f32> = (0..b * c * h * w)
                .map(|_| rng.next_f64() as f32 - 0.5)
                .collect();
            let mut got = vec![0f64; c * kernel[0] * kernel[1]];
            conv_input_sq(&x, shape, kernel, stride, padding, dilation, &mut got);
            // The unfold, spelled out: pad the input, then visit every output position.
            let (ph, pw) = (h + 2 * padding[0], w + 2 * padding[1]);
            let padded = |bi: usize, ci: usize, y: usize, xx: usize| -> f64 {
                if y < padding[0] || y >= padding[0] + h || xx < padding[1] || xx >= padding[1] + w
                {
                    0.0
                } else {
                    x[((bi * c + ci) * h + y - padding[0]) * w + xx - padding[1]] as f64
                }
            };
            let oh = (ph - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
            let ow = (pw - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
            for ci in 0..c {
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        let mut want = 0f64;
                        for bi in 0..b {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let v = padded(
                                        bi,
                                        ci,
                                        oy * stride[0] + ky * dilation[0],
                                        ox * stride[1] + kx * dilation[1],
                                    );
                                    want += v * v;
                                }
                            }
                        }
                        let g = got[(ci * kernel[0] + ky) * kernel[1] + kx];
                        assert!((g - want).abs() < 1e-9, "{shape:?} c{ci} ({ky},{kx})");
                    }
                }
            }
        }
    }
}
