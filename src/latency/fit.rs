//! The cost model of a sparse kernel, `T = β·s + γ·B + τ`: β per stored value `s`, γ per
//! structural unit `B` (a row, an N:M group, a block), τ per call. Fitted by least squares.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitParams {
    /// Nanoseconds per stored value.
    pub beta_ns: f64,
    /// Nanoseconds per structural unit; `None` when the points cannot tell it apart from β
    /// (every point has the same ratio of units to values, or the same units).
    pub gamma_ns: Option<f64>,
    /// Microseconds per call.
    pub tau_us: f64,
    /// Fraction of the variance of the times the fit explains.
    pub r2: f64,
    pub points: usize,
}

impl FitParams {
    /// The model's time in ms for `s` values and `b` units.
    pub fn predict_ms(&self, s: f64, b: f64) -> f64 {
        (self.beta_ns * s + self.gamma_ns.unwrap_or(0.0) * b) * 1e-6 + self.tau_us * 1e-3
    }
}

/// Fits `(s, B, ms)` points with non-negative constants: the full model where it is
/// determined with points to spare and every constant comes out ≥ 0, else without γ
/// (where `B` does not vary independently of `s`, or γ would be negative), else without τ.
pub fn fit_cost_model(points: &[(f64, f64, f64)]) -> Option<FitParams> {
    // Columns scaled to unit size so that the normal equations stay well conditioned.
    let ss = points
        .iter()
        .map(|p| p.0.abs())
        .fold(0.0, f64::max)
        .max(1.0);
    let bs = points
        .iter()
        .map(|p| p.1.abs())
        .fold(0.0, f64::max)
        .max(1.0);
    // Candidate models as (uses γ, uses τ), richest first.
    let (beta, gamma, tau) = [(true, true), (false, true), (true, false), (false, false)]
        .into_iter()
        .find_map(|(with_gamma, with_tau)| {
            let k = 1 + usize::from(with_gamma) + usize::from(with_tau);
            // One point more than constants, so r² says something.
            if points.len() <= k {
                return None;
            }
            let rows: Vec<([f64; 3], f64)> = points
                .iter()
                .map(|&(s, b, t)| {
                    let mut r = [s / ss, 0.0, 0.0];
                    let mut i = 1;
                    if with_gamma {
                        r[i] = b / bs;
                        i += 1;
                    }
                    if with_tau {
                        r[i] = 1.0;
                    }
                    (r, t)
                })
                .collect();
            let x = solve_least_squares(&rows, k)?;
            if x.iter().any(|v| *v < 0.0) {
                return None;
            }
            let gamma = with_gamma.then(|| x[1] / bs);
            let tau = if with_tau { x[k - 1] } else { 0.0 };
            Some((x[0] / ss, gamma, tau))
        })?;
    let predict = |s: f64, b: f64| beta * s + gamma.unwrap_or(0.0) * b + tau;
    let mean = points.iter().map(|p| p.2).sum::<f64>() / points.len() as f64;
    let total: f64 = points.iter().map(|p| (p.2 - mean).powi(2)).sum();
    let resid: f64 = points
        .iter()
        .map(|p| (p.2 - predict(p.0, p.1)).powi(2))
        .sum();
    Some(FitParams {
        beta_ns: beta * 1e6,
        gamma_ns: gamma.map(|g| g * 1e6),
        tau_us: tau * 1e3,
        r2: if total > 0.0 {
            1.0 - resid / total
        } else {
            1.0
        },
        points: points.len(),
    })
}

/// Least squares on the first `k` columns through the normal equations, by Gaussian
/// elimination with partial pivoting; `None` when they are (nearly) singular.
fn solve_least_squares(rows: &[([f64; 3], f64)], k: usize) -> Option<Vec<f64>> {
    let mut a = vec![vec![0f64; k + 1]; k];
    for (x, t) in rows {
        for i in 0..k {
            for j in 0..k {
                a[i][j] += x[i] * x[j];
            }
            a[i][k] += x[i] * t;
        }
    }
    let scale = (0..k).map(|i| a[i][i]).fold(0.0, f64::max);
    for col in 0..k {
        let pivot = (col..k).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[pivot][col].abs() <= 1e-9 * scale.max(1e-300) {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|i| a[i][k] / a[i][i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_known_constants_from_exact_timings() {
        // β = 0.4 ns per value, γ = 25 ns per row, τ = 12 µs, on shapes whose rows vary
        // independently of their non-zeros.
        let (beta, gamma, tau) = (0.4e-6, 25e-6, 12e-3);
        let mut pts = Vec::new();
        for rows in [256.0, 1024.0, 4096.0] {
            for nnz in [1e4, 1e5, 1e6, 4e6] {
                pts.push((nnz, rows, beta * nnz + gamma * rows + tau));
            }
        }
        let f = fit_cost_model(&pts).unwrap();
        assert!((f.beta_ns - 0.4).abs() < 1e-9, "{f:?}");
        assert!((f.gamma_ns.unwrap() - 25.0).abs() < 1e-6, "{f:?}");
        assert!((f.tau_us - 12.0).abs() < 1e-6, "{f:?}");
        assert!((f.r2 - 1.0).abs() < 1e-12);
        assert!((f.predict_ms(2e6, 512.0) - (beta * 2e6 + gamma * 512.0 + tau)).abs() < 1e-9);
    }

    #[test]
    fn noisy_timings_give_close_constants() {
        // ±2 % deterministic noise: the fit stays within a few per cent of the truth.
        // γ·B and β·s of similar size, so both are identifiable through the noise.
        let (beta, gamma, tau) = (1.0e-6, 200e-6, 5e-3);
        let mut pts = Vec::new();
        let mut k = 0;
        for rows in [128.0, 512.0, 2048.0, 8192.0] {
            for nnz in [5e4, 2e5, 8e5, 3.2e6] {
                let noise = 1.0 + 0.02 * ((k * 7 % 5) as f64 - 2.0) / 2.0;
                k += 1;
                pts.push((nnz, rows, (beta * nnz + gamma * rows + tau) * noise));
            }
        }
        let f = fit_cost_model(&pts).unwrap();
        assert!((f.beta_ns - 1.0).abs() < 0.05, "{f:?}");
        assert!((f.gamma_ns.unwrap() - 200.0).abs() < 10.0, "{f:?}");
        assert!(f.r2 > 0.99);
    }

    #[test]
    fn constant_structure_fits_beta_and_tau_only() {
        // One layer shape at several sparsities: B never changes, so γ is not identifiable.
        let pts: Vec<_> = [1e5, 2e5, 4e5, 8e5]
            .iter()
            .map(|&s| (s, 1024.0, 2e-6 * s + 0.05))
            .collect();
        let f = fit_cost_model(&pts).unwrap();
        assert_eq!(f.gamma_ns, None);
        assert!((f.beta_ns - 2.0).abs() < 1e-9);
        // τ absorbs the constant γ·B.
        assert!((f.tau_us - 50.0).abs() < 1e-6);
    }

    #[test]
    fn too_few_or_degenerate_points_fit_nothing() {
        assert!(fit_cost_model(&[(1.0, 1.0, 1.0)]).is_none());
        // All at one s: only the through-origin β fits, and only if the times agree with it.
        let f = fit_cost_model(&[(5.0, 1.0, 1.0); 4]).unwrap();
        assert_eq!((f.gamma_ns, f.tau_us), (None, 0.0));
        assert!((f.beta_ns - 0.2e6).abs() < 1e-6);
    }

    #[test]
    fn constants_are_never_negative() {
        // Times that fall with more rows would need γ < 0: γ is dropped instead.
        let pts = [
            (1e5, 100.0, 1.0),
            (1e5, 200.0, 0.9),
            (2e5, 100.0, 2.0),
            (2e5, 200.0, 1.9),
            (4e5, 300.0, 3.8),
        ];
        let f = fit_cost_model(&pts).unwrap();
        assert!(f.gamma_ns.is_none_or(|g| g >= 0.0) && f.beta_ns >= 0.0 && f.tau_us >= 0.0);
    }
}
