//! Criteria: how important each weight is. Scores are non-negative; bigger means keep.
//!
//! Scores are compared as *keys*: `u32`s whose order is the order of the scores, with NaN
//! below everything. A NaN weight carries no usable magnitude, so it ranks lowest and is the
//! first to be pruned; +Inf ranks highest and is the last.

use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::util::{fnv1a, mix64};

/// How scores are computed. Later criteria (Taylor, Fisher, Wanda, activations) need data,
/// which reaches them through [`ScoreInputs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// |w|: the classic baseline (Han et al., 2015).
    #[default]
    Magnitude,
    /// A seeded uniform random score per weight: the control every study needs.
    Random,
}

impl Criterion {
    pub const ALL: [Criterion; 2] = [Criterion::Magnitude, Criterion::Random];

    pub fn label(self) -> &'static str {
        match self {
            Criterion::Magnitude => "magnitude |w|",
            Criterion::Random => "random (seeded)",
        }
    }
    pub fn cli_name(self) -> &'static str {
        match self {
            Criterion::Magnitude => "magnitude",
            Criterion::Random => "random",
        }
    }
    pub fn parse(s: &str) -> Option<Criterion> {
        Criterion::ALL.into_iter().find(|c| c.cli_name() == s)
    }
    /// Whether scoring needs calibration data (none of today's criteria does).
    pub fn needs_data(self) -> bool {
        false
    }
    /// Whether the score depends on the seed.
    pub fn seeded(self) -> bool {
        matches!(self, Criterion::Random)
    }
    pub fn tooltip(self) -> &'static str {
        match self {
            Criterion::Magnitude => {
                "Magnitude: weights closest to zero contribute least to the output, so they go first."
            }
            Criterion::Random => {
                "Random: every weight gets a seeded random score; a criterion that beats this baseline has learned something."
            }
        }
    }

    /// Fills `out` with the keys of elements `start..start + out.len()` of tensor `t`.
    pub fn fill_keys(
        self,
        model: &Model,
        seed: u64,
        t: usize,
        start: usize,
        values: &mut [f32],
        out: &mut [u32],
    ) {
        match self {
            Criterion::Magnitude => {
                let n = out.len();
                model.read_f32(t, start, &mut values[..n]);
                for (o, v) in out.iter_mut().zip(&values[..n]) {
                    *o = key_of_score(v.abs());
                }
            }
            Criterion::Random => {
                let salt = seed ^ fnv1a(&model.tensors[t].name).rotate_left(17);
                for (i, o) in out.iter_mut().enumerate() {
                    *o = random_key(salt, (start + i) as u64);
                }
            }
        }
    }
}

/// Data that data-driven criteria will need; empty for magnitude and random.
#[derive(Default)]
pub struct ScoreInputs<'a> {
    /// Calibration inputs for activation- or gradient-based criteria.
    pub calibration: Option<&'a crate::data::Dataset>,
    /// 16-bit tensors' bit-pattern counts already taken (the pass at open that the histograms
    /// share), so the magnitude index need not read the weights again.
    pub patterns: Option<&'a crate::model::PatternCounts>,
}

#[inline]
fn random_key(salt: u64, idx: u64) -> u32 {
    let h = mix64(salt ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // 24 random bits make an exact f32 in [0, 1).
    key_of_score((h >> 40) as f32 / (1u32 << 24) as f32)
}

/// The order-preserving key of a non-negative score; NaN maps below every number.
#[inline]
pub fn key_of_score(s: f32) -> u32 {
    if s.is_nan() { 0 } else { s.abs().to_bits() + 1 }
}

/// Inverse of [`key_of_score`].
#[inline]
pub fn score_of_key(k: u32) -> f32 {
    if k == 0 {
        f32::NAN
    } else {
        f32::from_bits(k - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_like_scores_with_nan_lowest() {
        let scores = [0.0f32, 1e-30, 0.5, 1.0, 3.0e38, f32::INFINITY];
        for w in scores.windows(2) {
            assert!(key_of_score(w[0]) < key_of_score(w[1]), "{w:?}");
        }
        assert!(key_of_score(f32::NAN) < key_of_score(0.0));
        assert_eq!(key_of_score(-0.0), key_of_score(0.0));
        for s in scores {
            assert_eq!(score_of_key(key_of_score(s)), s);
        }
    }
}
