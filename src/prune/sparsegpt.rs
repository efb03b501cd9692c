//! SparseGPT (Frantar & Alistarh, 2023): each Linear layer pruned to its target sparsity by
//! the layer-wise Optimal Brain Surgeon update, using the Hessian H = X Xᵀ of the layer's inputs
//! on calibration samples. Unlike a score, it changes the kept weights: every pruned weight's
//! error is spread over the columns not yet visited, so the layer's output moves as little as
//! the second-order model allows.
//!
//! Inputs are the dense model's (every layer calibrated on the same forward pass, as Wanda is),
//! not the partly pruned model's that the paper's sequential variant feeds forward.

use std::collections::HashMap;

use candle_core::Device;

use super::{Mask, MaskSet, PruneError, PruneSettings};
use crate::data::EvalData;
use crate::graph::Op;
use crate::model::Model;
use crate::progress::Progress;

/// Columns whose masks are chosen together (the paper's block size).
pub const BLOCK: usize = 128;
/// Dampening of H's diagonal, as a fraction of its mean.
pub const DAMP: f64 = 0.01;

/// One layer's outcome: its squared output error on the calibration inputs, ‖(W − Ŵ) X‖², and
/// the error of magnitude pruning to the same sparsity, for comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerResult {
    pub name: String,
    pub sparsity: f64,
    pub error: f64,
    pub magnitude_error: f64,
}

/// What SparseGPT made: the model with updated weights, its masks, and per-layer errors.
pub struct SparseGpt {
    pub model: Model,
    pub masks: MaskSet,
    pub layers: Vec<LayerResult>,
}

impl SparseGpt {
    /// The original ONNX file's bytes with the pruned layers' updated values in place: the same
    /// graph, which tract runs and the export writes.
    pub fn onnx_bytes(&self, original: &Model) -> Result<Vec<u8>, crate::export::ExportError> {
        let values: crate::train::NamedTensors = self
            .model
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, e)| self.masks.get(&e.name).is_some())
            .map(|(t, e)| (e.name.clone(), e.shape.clone(), self.model.to_f32_vec(t)))
            .collect();
        crate::export::patch_onnx(original, &values)
    }
}

/// ‖(W − Ŵ) X‖² = Σ_r (w_r − ŵ_r)ᵀ H (w_r − ŵ_r) for H = X Xᵀ.
pub fn output_error(w: &[f32], w_hat: &[f32], cols: usize, h: &[f64]) -> f64 {
    use rayon::prelude::*;
    let cols = cols.max(1);
    w.par_chunks(cols)
        .zip(w_hat.par_chunks(cols))
        .map(|(w, w_hat)| {
            let d: Vec<f64> = w
                .iter()
                .zip(w_hat)
                .map(|(a, b)| *a as f64 - *b as f64)
                .collect();
            let mut total = 0.0;
            for (i, di) in d.iter().enumerate() {
                if *di == 0.0 {
                    continue;
                }
                let row = &h[i * cols..(i + 1) * cols];
                total += di * row.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>();
            }
            total
        })
        .sum()
}

/// Lower Cholesky factor of the symmetric positive definite `a` (n × n, row-major), a column
/// at a time: once L[j][j] is known, the rows below fill their column j in parallel.
fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>, String> {
    use rayon::prelude::*;
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let s: f64 = l[j * n..j * n + j].iter().map(|v| v * v).sum();
        let d = a[j * n + j] - s;
        if d <= 0.0 || !d.is_finite() {
            return Err(format!(
                "the Hessian is not positive definite at column {j}"
            ));
        }
        let djj = d.sqrt();
        l[j * n + j] = djj;
        let (done, below) = l.split_at_mut((j + 1) * n);
        let lj = &done[j * n..j * n + j];
        below.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let i = j + 1 + r;
            let s: f64 = row[..j].iter().zip(lj).map(|(a, b)| a * b).sum();
            row[j] = (a[i * n + j] - s) / djj;
        });
    }
    Ok(l)
}

/// The inverse of `a` = L Lᵀ from its lower Cholesky factor.
fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    use rayon::prelude::*;
    // L⁻¹ by forward substitution, a column at a time, kept transposed (`t[c][i]` = L⁻¹[i][c])
    // so that every sum runs along contiguous rows; then A⁻¹ = L⁻ᵀ L⁻¹.
    let mut t = vec![0f64; n * n];
    t.par_chunks_mut(n.max(1)).enumerate().for_each(|(c, col)| {
        for i in c..n {
            let s: f64 = (c..i).map(|k| l[i * n + k] * col[k]).sum();
            col[i] = if i == c { 1.0 } else { -s } / l[i * n + i];
        }
    });
    let mut inv = vec![0f64; n * n];
    inv.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                let k0 = i.max(j);
                *v = t[i * n + k0..(i + 1) * n]
                    .iter()
                    .zip(&t[j * n + k0..(j + 1) * n])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        });
    inv
}

/// Prunes `w` (`rows × cols`, row-major) to `sparsity` with the OBS update, given H = X Xᵀ
/// (`cols × cols`). Returns the updated weights, zero where pruned, and which are kept.
pub fn prune_layer(
    w: &[f32],
    cols: usize,
    h: &[f64],
    sparsity: f64,
) -> Result<(Vec<f32>, Vec<bool>), String> {
    let rows = w.len() / cols.max(1);
    let mut w: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let mut h = h.to_vec();
    // Inputs that never fire carry no information: their weights go and H stays invertible.
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0;
            for r in 0..rows {
                w[r * cols + i] = 0.0;
            }
        }
    }
    let mean_diag = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols.max(1) as f64;
    for i in 0..cols {
        h[i * cols + i] += DAMP * mean_diag;
    }
    let hinv = inverse_from_cholesky(&cholesky(&h, cols)?, cols);
    // Upper factor U of H⁻¹ = Uᵀ U: row i holds the update a pruned column i spreads right.
    // Stored row-major, so that spreading runs along contiguous memory.
    let l = cholesky(&hinv, cols)?;
    let mut upper = vec![0f64; cols * cols];
    for i in 0..cols {
        for j in i..cols {
            upper[i * cols + j] = l[j * cols + i];
        }
    }
    let u = |i: usize, j: usize| upper[i * cols + j];
    let mut kept = vec![true; rows * cols];
    let mut start = 0;
    while start < cols {
        let end = (start + BLOCK).min(cols);
        // The block's mask: the lowest w² / U_ii² over all its rows and columns.
        let mut cand: Vec<(f64, usize)> = Vec::with_capacity(rows * (end - start));
        for r in 0..rows {
            for j in start..end {
                let d = u(j, j);
                cand.push((w[r * cols + j].powi(2) / (d * d), r * cols + j));
            }
        }
        let k = ((sparsity * cand.len() as f64).round() as usize).min(cand.len());
        cand.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &cand[..k] {
            kept[i] = false;
        }
        // Rows are independent once the block's mask is chosen.
        {
            use rayon::prelude::*;
            let kept = &kept;
            w.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
                let mut err = [0f64; BLOCK];
                for j in start..end {
                    if kept[r * cols + j] {
                        continue;
                    }
                    let e = row[j] / u(j, j);
                    err[j - start] = e;
                    // Spread the error over the block's remaining columns.
                    let uj = &upper[j * cols..(j + 1) * cols];
                    for c in j..end {
                        row[c] -= e * uj[c];
                    }
                    row[j] = 0.0;
                }
                // And over every column after the block.
                for j in start..end {
                    let e = err[j - start];
                    if e == 0.0 {
                        continue;
                    }
                    let uj = &upper[j * cols + end..(j + 1) * cols];
                    for (x, uc) in row[end..].iter_mut().zip(uj) {
                        *x -= e * uc;
                    }
                }
            });
        }
        start = end;
    }
    let out = w
        .iter()
        .zip(&kept)
        .map(|(&x, &k)| if k { x as f32 } else { 0.0 })
        .collect();
    Ok((out, kept))
}

/// Adds Σ x xᵀ over the `cols`-wide rows of `x` to `h` (`cols × cols`), its rows in parallel.
fn add_gram(h: &mut [f64], x: &[f32], cols: usize) {
    use rayon::prelude::*;
    h.par_chunks_mut(cols).enumerate().for_each(|(i, hrow)| {
        for row in x.chunks(cols) {
            let xi = row[i] as f64;
            if xi == 0.0 {
                continue;
            }
            for (hj, &xj) in hrow.iter_mut().zip(row) {
                *hj += xi * xj as f64;
            }
        }
    });
}

/// Magnitude pruning of one layer to `sparsity` (ties in flat order): the baseline.
pub fn magnitude_layer(w: &[f32], sparsity: f64) -> Vec<bool> {
    crate::train::magnitude_keep(w, sparsity)
        .iter()
        .map(|k| *k != 0.0)
        .collect()
}

/// Runs SparseGPT on every prunable Linear weight of `model` at its target sparsity (the global
/// target in global scope, the layer's own in layer scope), calibrated on the first `samples`
/// of `data`. Other prunable tensors (convolutions) are pruned by magnitude to the same target.
pub fn run(
    model: &Model,
    settings: &PruneSettings,
    data: &EvalData,
    samples: usize,
    progress: &Progress,
) -> Result<SparseGpt, PruneError> {
    let err = |m: String| PruneError::Calibration(format!("sparsegpt: {m}"));
    if settings.pattern != super::Pattern::Unstructured {
        return Err(err(format!(
            "prunes single weights; the {} pattern is not supported",
            settings.pattern
        )));
    }
    // H = Σ x xᵀ of every Linear's (or MatMul's) inputs, by weight; `true` for a weight stored
    // [in, out], pruned as its transpose.
    let mut hs: HashMap<String, (usize, Vec<f64>, bool)> = HashMap::new();
    let graph = match crate::train::Trainable::graph_of(model) {
        Ok(graph) => {
            let n = super::calibrate::samples_used(data, samples);
            let b =
                super::calibrate::batches(&graph, data, n, 64, false, super::Criterion::SparseGpt)?;
            let params = crate::graph::load_params(&graph, model, None, &Device::Cpu)?;
            super::calibrate::observe_inputs(
                &graph,
                &params,
                &b,
                progress,
                "SparseGPT: calibrating",
                &mut |node, x| {
                    let Op::Linear { weight, .. } = &node.op else {
                        return Ok(());
                    };
                    let cols = x.dim(candle_core::D::Minus1)?;
                    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
                    let (_, h, _) = hs
                        .entry(weight.clone())
                        .or_insert_with(|| (cols, vec![0.0; cols * cols], false));
                    add_gram(h, &v, cols);
                    Ok(())
                },
            )?;
            Some(graph)
        }
        // A graph only tract runs (a transformer): the MatMuls' inputs are observed there.
        Err(why) if model.format == crate::model::ModelFormat::Onnx => {
            let mut grams: Vec<Vec<f64>> = Vec::new();
            let (weights, names) = super::calibrate::observe_through_tract(
                model,
                super::Criterion::SparseGpt,
                data,
                samples,
                progress,
                &why,
                &mut |k, rows, width| {
                    if grams.len() <= k {
                        grams.resize(k + 1, Vec::new());
                    }
                    grams[k].resize(width * width, 0.0);
                    add_gram(&mut grams[k], rows, width);
                },
            )?;
            for w in weights {
                let k = names
                    .binary_search(&w.activation)
                    .expect("names list every activation");
                let cols = (grams[k].len() as f64).sqrt() as usize;
                hs.insert(
                    model.tensors[w.tensor].name.clone(),
                    (cols, grams[k].clone(), !w.in_on_columns),
                );
            }
            None
        }
        Err(e) => {
            return Err(err(format!(
                "it runs the model on calibration data, and {e}"
            )));
        }
    };
    let targets: Vec<usize> = (0..model.tensors.len())
        .filter(|&t| settings.is_prunable(model, t))
        .collect();
    let mut tensors = Vec::new();
    let mut masks = MaskSet::new();
    let mut layers = Vec::new();
    for (k, e) in model.tensors.iter().enumerate() {
        let mut v = model.to_f32_vec(k);
        if targets.contains(&k) {
            progress.check()?;
            let s = settings.layer_target(&e.name);
            let kept = match hs.get(&e.name) {
                // A layer left dense (locked, or a zero target) is left as it is.
                _ if s == 0.0 => vec![true; e.numel],
                Some((cols, h, transposed))
                    if e.shape.len() == 2 && e.shape[usize::from(!transposed)] == *cols =>
                {
                    // [in, out]: pruned as its [out, in] transpose (the OBS update runs along
                    // each output's inputs), then turned back.
                    let rows = e.numel / cols;
                    if *transposed {
                        v = super::calibrate::transpose(&v, *cols, rows);
                    }
                    let (mut w_hat, mut kept) = prune_layer(&v, *cols, h, s)
                        .map_err(|m| err(format!("layer '{}': {m}", e.name)))?;
                    let base = magnitude_layer(&v, s);
                    let mag: Vec<f32> = v
                        .iter()
                        .zip(&base)
                        .map(|(&x, &k)| if k { x } else { 0.0 })
                        .collect();
                    layers.push(LayerResult {
                        name: e.name.clone(),
                        sparsity: 1.0
                            - kept.iter().filter(|k| **k).count() as f64 / v.len().max(1) as f64,
                        error: output_error(&v, &w_hat, *cols, h),
                        magnitude_error: output_error(&v, &mag, *cols, h),
                    });
                    if *transposed {
                        w_hat = super::calibrate::transpose(&w_hat, rows, *cols);
                        kept = super::calibrate::transpose(&kept, rows, *cols);
                    }
                    v = w_hat;
                    kept
                }
                _ => {
                    let kept = magnitude_layer(&v, s);
                    for (x, k) in v.iter_mut().zip(&kept) {
                        if !k {
                            *x = 0.0;
                        }
                    }
                    kept
                }
            };
            masks.insert(model, &e.name, Mask::from_kept(&kept))?;
            progress.report(
                (layers.len() as f32 / targets.len().max(1) as f32).min(1.0),
                "SparseGPT",
            );
        }
        tensors.push((e.name.clone(), e.shape.clone(), v));
    }
    let mut updated = Model::from_f32_tensors("sparsegpt", tensors);
    match graph {
        Some(graph) => graph.describe_in(&mut updated, model),
        None => updated.metadata = model.metadata.clone(),
    }
    Ok(SparseGpt {
        model: updated,
        masks,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_from_cholesky_inverts() {
        let a = [4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
        let inv = inverse_from_cholesky(&cholesky(&a, 3).unwrap(), 3);
        for i in 0..3 {
            for j in 0..3 {
                let p: f64 = (0..3).map(|k| a[i * 3 + k] * inv[k * 3 + j]).sum();
                assert!((p - (i == j) as u8 as f64).abs() < 1e-12, "({i},{j}) = {p}");
            }
        }
    }

    #[test]
    fn one_pruned_weight_moves_the_rest_by_the_obs_update() {
        // One row, two inputs, H = [[2, 1], [1, 2]] (undamped case checked by hand): pruning w0
        // changes w1 by −w0 · H⁻¹₀₁ / H⁻¹₀₀ = +w0 / 2, the closed-form OBS update.
        let h = [2.0, 1.0, 1.0, 2.0];
        let w = [0.1f32, 1.0];
        let (w_hat, kept) = prune_layer(&w, 2, &h, 0.5).unwrap();
        assert_eq!(kept, vec![false, true]);
        let damp = DAMP * 2.0;
        // With H's diagonal dampened to 2 + damp, H⁻¹₀₁ / H⁻¹₀₀ = −1 / (2 + damp).
        let want = 1.0 + 0.1 / (2.0 + damp);
        assert!((w_hat[1] as f64 - want).abs() < 1e-6, "{w_hat:?} vs {want}");
        assert_eq!(w_hat[0], 0.0);
        // And the output error is below what zeroing alone gives.
        assert!(output_error(&w, &w_hat, 2, &h) < output_error(&w, &[0.0, 1.0], 2, &h));
    }
}
