//! Criteria: how important each weight is. Scores are non-negative; bigger means keep.
//!
//! Scores are compared as *keys*: `u32`s whose order is the order of the scores, with NaN
//! below everything. A NaN weight carries no usable magnitude, so it ranks lowest and is the
//! first to be pruned; +Inf ranks highest and is the last.

use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::util::{fnv1a, mix64};

/// How scores are computed. LAMP needs each layer's sorted magnitudes and the data-driven
/// criteria (Taylor, OBD, Wanda) need calibration samples: their scores are computed once per
/// index (see [`super::calibrate`]) and read from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// |w|: the classic baseline (Han et al., 2015).
    #[default]
    Magnitude,
    /// The L2 norm: for single weights it orders exactly as |w|; it differs from L1 only where
    /// weights are scored in groups.
    L2,
    /// Layer-adaptive magnitude (Lee et al., 2021): w² over the sum of w² of the weights of the
    /// same layer at least as large, so one global threshold gives each layer its own sparsity.
    Lamp,
    /// First-order Taylor |w · ∂L/∂w| on calibration samples (SNIP at initialisation).
    Taylor,
    /// Optimal Brain Damage: ½ · w² · H_jj, the Hessian diagonal approximated by the empirical
    /// Fisher (the mean squared per-sample gradient).
    Obd,
    /// Wanda (Sun et al., 2023): |w_ij| · ‖X_j‖₂ over the layer's calibration inputs, compared
    /// within each output row.
    Wanda,
    /// SparseGPT (Frantar & Alistarh, 2023): layer-wise Optimal Brain Surgeon with the
    /// calibration Hessian; it updates the kept weights, so it runs as a whole operation
    /// ([`super::sparsegpt`]) rather than as scores behind the sliders.
    SparseGpt,
    /// Average percentage of zeros (Hu et al., 2016): a channel whose activations are mostly
    /// zero after its ReLU does little. Neurons and channels only.
    Apoz,
    /// Mean absolute activation of a channel on the calibration samples. Neurons and channels
    /// only.
    MeanActivation,
    /// Movement (Sanh et al., 2020): −Σ_t w_t · ∂L/∂w_t accumulated over steps of fine-tuning,
    /// so weights that training pushes towards zero score lowest. As a criterion it fine-tunes a
    /// copy on the calibration samples ([`super::calibrate::MOVEMENT_EPOCHS`] epochs of SGD);
    /// `prunescope schedule --criterion movement` accumulates it during the real fine-tuning.
    Movement,
    /// A seeded uniform random score per weight: the control every study needs.
    Random,
}

impl Criterion {
    pub const ALL: [Criterion; 11] = [
        Criterion::Magnitude,
        Criterion::L2,
        Criterion::Lamp,
        Criterion::Taylor,
        Criterion::Obd,
        Criterion::Wanda,
        Criterion::SparseGpt,
        Criterion::Apoz,
        Criterion::MeanActivation,
        Criterion::Movement,
        Criterion::Random,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Criterion::Magnitude => "magnitude |w|",
            Criterion::L2 => "L2 norm",
            Criterion::Lamp => "LAMP (layer-adaptive)",
            Criterion::Taylor => "Taylor |w·∂L/∂w|",
            Criterion::Obd => "OBD (Fisher diagonal)",
            Criterion::Wanda => "Wanda |w|·‖X‖",
            Criterion::SparseGpt => "SparseGPT (updates weights)",
            Criterion::Apoz => "APoZ (channels)",
            Criterion::MeanActivation => "mean activation (channels)",
            Criterion::Movement => "movement −w·∂L/∂w",
            Criterion::Random => "random (seeded)",
        }
    }
    pub fn cli_name(self) -> &'static str {
        match self {
            Criterion::Magnitude => "magnitude",
            Criterion::L2 => "l2",
            Criterion::Lamp => "lamp",
            Criterion::Taylor => "taylor",
            Criterion::Obd => "obd",
            Criterion::Wanda => "wanda",
            Criterion::SparseGpt => "sparsegpt",
            Criterion::Apoz => "apoz",
            Criterion::MeanActivation => "mean-activation",
            Criterion::Movement => "movement",
            Criterion::Random => "random",
        }
    }
    pub fn parse(s: &str) -> Option<Criterion> {
        Criterion::ALL.into_iter().find(|c| c.cli_name() == s)
    }
    /// Whether scoring needs calibration data.
    pub fn needs_data(self) -> bool {
        matches!(
            self,
            Criterion::Taylor
                | Criterion::Obd
                | Criterion::Wanda
                | Criterion::SparseGpt
                | Criterion::Apoz
                | Criterion::MeanActivation
                | Criterion::Movement
        )
    }
    /// Whether pruning with it also changes the kept weights (a whole operation, not scores
    /// the sliders can move over).
    pub fn updates_weights(self) -> bool {
        self == Criterion::SparseGpt
    }
    /// Whether the criterion scores whole neurons and channels only (by their activations).
    pub fn channels_only(self) -> bool {
        matches!(self, Criterion::Apoz | Criterion::MeanActivation)
    }
    /// Whether scoring needs labels (a loss to differentiate), not only inputs.
    pub fn needs_labels(self) -> bool {
        matches!(
            self,
            Criterion::Taylor | Criterion::Obd | Criterion::Movement
        )
    }
    /// Whether scores are computed for whole tensors up front rather than weight by weight.
    pub fn precomputed(self) -> bool {
        (self.needs_data() && !self.updates_weights()) || self == Criterion::Lamp
    }
    /// Whether keys order exactly as |w| (so the 16-bit compact index serves).
    pub fn orders_as_magnitude(self) -> bool {
        matches!(self, Criterion::Magnitude | Criterion::L2)
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
            Criterion::L2 => {
                "L2 norm: for single weights it ranks exactly like magnitude; it differs only when weights are scored in groups (blocks, channels)."
            }
            Criterion::Lamp => {
                "LAMP: each weight's w² divided by the sum of w² of the larger weights in its layer, so one global threshold gives every layer its own sparsity and no layer is emptied."
            }
            Criterion::Taylor => {
                "Taylor: |w · ∂L/∂w| on the calibration samples estimates how much the loss rises when the weight is removed (at initialisation this is SNIP). Needs labelled data."
            }
            Criterion::Obd => {
                "Optimal Brain Damage: ½·w²·H, the loss's curvature along the weight, with the Hessian diagonal estimated by the mean squared per-sample gradient (empirical Fisher). Needs labelled data."
            }
            Criterion::Wanda => {
                "Wanda: |w| times the norm of the input it multiplies on the calibration samples, compared within each output row, so a small weight on a loud input survives. Needs input data."
            }
            Criterion::SparseGpt => {
                "SparseGPT: each Linear layer is pruned column block by column block, and every removed weight's error is pushed onto the weights still kept, using the calibration inputs' Hessian (Optimal Brain Surgeon), so the layer's output changes as little as possible. Needs input data."
            }
            Criterion::Apoz => {
                "APoZ: the fraction of a channel's activations that are zero on the calibration samples; a channel that is almost always off after its ReLU goes first. Neuron and channel granularity only."
            }
            Criterion::MeanActivation => {
                "Mean activation: how large a channel's activations are on average on the calibration samples; the quietest channels go first. Neuron and channel granularity only."
            }
            Criterion::Movement => {
                "Movement: −w·∂L/∂w summed over steps of fine-tuning on the calibration samples; weights that training pulls towards zero go first, even large ones, and small ones that grow stay. Needs labelled data."
            }
            Criterion::Random => {
                "Random: every weight gets a seeded random score; a criterion that beats this baseline has learned something."
            }
        }
    }

    /// Fills `out` with the keys of elements `start..start + out.len()` of tensor `t`, for the
    /// criteria scored weight by weight (the others read [`super::ScoreIndex::fill_keys`]).
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
            Criterion::Random => {
                let salt = seed ^ fnv1a(&model.tensors[t].name).rotate_left(17);
                for (i, o) in out.iter_mut().enumerate() {
                    *o = random_key(salt, (start + i) as u64);
                }
            }
            // Magnitude and L2 order alike. The precomputed criteria are read from the index,
            // which calls this only for the others; SparseGPT's index (kept beside the weights
            // it updates, see `prune`) is the magnitude one.
            _ => {
                let n = out.len();
                model.read_f32(t, start, &mut values[..n]);
                for (o, v) in out.iter_mut().zip(&values[..n]) {
                    *o = key_of_score(v.abs());
                }
            }
        }
    }
}

/// Data that data-driven criteria need; empty for the others.
#[derive(Default)]
pub struct ScoreInputs<'a> {
    /// Calibration samples for activation- or gradient-based criteria: the first
    /// [`ScoreInputs::samples`] of these are used.
    pub calibration: Option<&'a crate::data::EvalData>,
    /// How many calibration samples to use (0: the default, [`super::DEFAULT_CALIBRATION`]).
    pub samples: usize,
    /// The calibration data's fingerprint where the caller keeps it (the worker asks on every
    /// slider move whether its index still fits); computed from the data otherwise.
    pub fingerprint: Option<&'a str>,
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
