//! OWL, outlier-weighted layer-wise sparsity (Yin et al., 2024, as llm-compressor implements
//! it): layers holding more outliers — Wanda scores above M times their layer's mean — keep
//! more of their weights. Each layer's sparsity is S + λ·(1 − 2·D), D its outlier ratio scaled
//! to [0, 1] across layers, then shifted so the weights removed in all still make S.

use super::{PruneError, PruneSettings, Scope};
use crate::data::EvalData;
use crate::model::Model;
use crate::progress::Progress;

/// The outlier threshold, in multiples of the layer's mean score.
pub const DEFAULT_M: f64 = 5.0;
/// The largest departure from the target in either direction.
pub const DEFAULT_LAMBDA: f64 = 0.08;

/// Fraction of `scores` above `m` times their mean (the layer outlier distribution, LOD).
pub fn outlier_ratio(scores: &[f32], m: f64) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    let finite = || scores.iter().filter(|s| s.is_finite());
    let mean = finite().map(|&s| s as f64).sum::<f64>() / scores.len() as f64;
    finite().filter(|&&s| s as f64 > m * mean).count() as f64 / scores.len() as f64
}

/// Per-layer sparsities from outlier ratios `lod` and layer sizes `numel` for target `s`.
pub fn sparsities(lod: &[f64], numel: &[usize], s: f64, lambda: f64) -> Vec<f64> {
    let (lo, hi) = lod
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let mut out: Vec<f64> = lod
        .iter()
        .map(|&x| {
            let d = if hi > lo { (x - lo) / (hi - lo) } else { 0.5 };
            s + lambda * (1.0 - 2.0 * d)
        })
        .collect();
    // Shift so the weights removed over all layers are the target's share.
    let total: f64 = numel.iter().map(|&n| n as f64).sum();
    if total > 0.0 {
        let removed: f64 = out.iter().zip(numel).map(|(x, &n)| x * n as f64).sum();
        let shift = s - removed / total;
        for x in &mut out {
            *x = (*x + shift).clamp(0.0, 1.0);
        }
    }
    out
}

/// Turns `settings` (global target S) into layer-wise targets by OWL, from Wanda scores on the
/// first `samples` calibration samples of `data`.
pub fn plan(
    model: &Model,
    settings: &PruneSettings,
    data: &EvalData,
    samples: usize,
    m: f64,
    lambda: f64,
    progress: &Progress,
) -> Result<PruneSettings, PruneError> {
    let scores = super::calibrate::wanda_raw(model, data, samples, progress)?;
    let layers: Vec<usize> = (0..model.tensors.len())
        .filter(|&t| {
            settings.is_prunable(model, t) && !settings.layer(&model.tensors[t].name).locked
        })
        .collect();
    let lod: Vec<f64> = layers
        .iter()
        .map(|&t| scores[t].as_deref().map_or(0.0, |s| outlier_ratio(s, m)))
        .collect();
    let numel: Vec<usize> = layers.iter().map(|&t| model.tensors[t].numel).collect();
    let mut out = settings.clone();
    out.scope = Scope::Layer;
    for (&t, s) in layers
        .iter()
        .zip(sparsities(&lod, &numel, settings.sparsity, lambda))
    {
        out.layer_mut(&model.tensors[t].name).sparsity = s;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outliers_by_hand() {
        // Mean 1.4; above 2 × mean = 2.8: only the 5.
        assert_eq!(outlier_ratio(&[0.5, 0.5, 0.5, 0.5, 5.0], 2.0), 0.2);
        assert_eq!(outlier_ratio(&[1.0; 4], 2.0), 0.0);
        assert_eq!(outlier_ratio(&[], 2.0), 0.0);
    }

    #[test]
    fn more_outliers_keep_more_and_the_total_holds() {
        // Three equal layers with ratios 0, 0.05 and 0.1: D = 0, 0.5, 1, so S + λ, S, S − λ.
        let s = sparsities(&[0.0, 0.05, 0.1], &[100, 100, 100], 0.5, 0.08);
        let want = [0.58, 0.5, 0.42];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{s:?}");
        }
        // Unequal sizes: shifted so that Σ s·n = S · Σ n.
        let n = [100usize, 300];
        let s = sparsities(&[0.0, 0.1], &n, 0.5, 0.08);
        let removed: f64 = s.iter().zip(n).map(|(x, n)| x * n as f64).sum();
        assert!((removed - 200.0).abs() < 1e-9, "{s:?}");
        assert!(s[0] > s[1]);
    }
}
