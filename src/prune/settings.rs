//! What the user asked for: criterion, pattern, scope, targets. Serialised as the recipe core.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Criterion, PruneError};
use crate::model::Model;

/// The granularity of a cut: single weights, N:M (keep N of every M consecutive weights along
/// the input dim), or whole Linear neurons / conv channels with their dependency groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Pattern {
    #[default]
    Unstructured,
    NM {
        n: usize,
        m: usize,
    },
    /// Output neurons of Linear layers, each with its group's slices.
    Neuron,
    /// Output channels (filters) of convolutions, each with its group's slices.
    Channel,
    /// Attention heads: a head's query, key and value features and the output projection's
    /// matching inputs, together.
    Head,
    /// Whole b × b blocks of each layer's 2-D view.
    Block {
        b: usize,
    },
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, PruneError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("unstructured") {
            return Ok(Pattern::Unstructured);
        }
        if s.eq_ignore_ascii_case("neuron") {
            return Ok(Pattern::Neuron);
        }
        if s.eq_ignore_ascii_case("channel") {
            return Ok(Pattern::Channel);
        }
        if s.eq_ignore_ascii_case("head") {
            return Ok(Pattern::Head);
        }
        if let Some(b) = s.strip_prefix("block:") {
            let b = b
                .trim()
                .parse()
                .map_err(|_| PruneError::PatternSyntax(s.to_string()))?;
            let p = Pattern::Block { b };
            p.validate()?;
            return Ok(p);
        }
        let (n, m) = s
            .split_once(':')
            .and_then(|(n, m)| Some((n.trim().parse().ok()?, m.trim().parse().ok()?)))
            .ok_or_else(|| PruneError::PatternSyntax(s.to_string()))?;
        let p = Pattern::NM { n, m };
        p.validate()?;
        Ok(p)
    }
    pub fn validate(self) -> Result<(), PruneError> {
        match self {
            Pattern::NM { n, m } if n == 0 || n >= m || m > 256 => {
                Err(PruneError::BadPattern { n, m })
            }
            Pattern::Block { b } if b == 0 || b > 1024 => Err(PruneError::PatternSyntax(format!(
                "block:{b} (the block side must be 1 to 1024)"
            ))),
            _ => Ok(()),
        }
    }
    /// Fraction of weights an N:M pattern removes.
    pub fn fixed_sparsity(self) -> Option<f64> {
        match self {
            Pattern::NM { n, m } => Some(1.0 - n as f64 / m as f64),
            _ => None,
        }
    }

    /// Whether whole channels go with their dependency groups.
    pub fn structured(self) -> bool {
        matches!(self, Pattern::Neuron | Pattern::Channel | Pattern::Head)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Unstructured => f.write_str("unstructured"),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
            Pattern::Neuron => f.write_str("neuron"),
            Pattern::Channel => f.write_str("channel"),
            Pattern::Head => f.write_str("head"),
            Pattern::Block { b } => write!(f, "block:{b}"),
        }
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One threshold for the whole model, or one target per tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Global,
    Layer,
    /// Per-layer targets planned from sensitivity curves (see [`Rule`]); allocated exactly as
    /// layer-wise, so a recipe replays without the curves.
    Sensitivity,
}

/// How a sensitivity-guided plan splits the budget across layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The same sparsity in every layer.
    Uniform,
    /// One magnitude threshold across layers (the global scope).
    Global,
    /// Equal marginal loss: the cheapest weights, by the curves' drop per weight, go first.
    #[default]
    Marginal,
    /// One tolerated drop for every layer, bisected until the budget is met.
    Threshold,
    /// Sparsity inversely proportional to the layer's normalised drop.
    Inverse,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::Uniform,
        Rule::Global,
        Rule::Marginal,
        Rule::Threshold,
        Rule::Inverse,
    ];
    pub fn cli_name(self) -> &'static str {
        match self {
            Rule::Uniform => "uniform",
            Rule::Global => "global",
            Rule::Marginal => "marginal",
            Rule::Threshold => "threshold",
            Rule::Inverse => "inverse",
        }
    }
    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.cli_name() == s)
    }
    pub fn label(self) -> &'static str {
        match self {
            Rule::Uniform => "uniform per layer",
            Rule::Global => "global magnitude",
            Rule::Marginal => "equal marginal loss",
            Rule::Threshold => "drop threshold",
            Rule::Inverse => "inverse to drop",
        }
    }
    pub fn tooltip(self) -> &'static str {
        match self {
            Rule::Uniform => {
                "Uniform: every layer loses the same fraction, whatever its curve says — the baseline."
            }
            Rule::Global => {
                "Global magnitude: one |w| threshold over all layers; the curves are not used."
            }
            Rule::Marginal => {
                "Equal marginal loss: weights go where the curves say they cost the least accuracy per weight removed, until the budget is met."
            }
            Rule::Threshold => {
                "Drop threshold: every layer is pruned as far as its curve stays within one tolerated drop, and that tolerance is bisected until the budget is met (NVIDIA ModelOpt's FastNAS)."
            }
            Rule::Inverse => {
                "Inverse: each layer's sparsity is inversely proportional to its normalised average drop (fasterai's to_layer_targets)."
            }
        }
    }
}

/// Per-tensor settings; a tensor absent from the map uses the defaults.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LayerSettings {
    /// `None`: the default rule (floating, ≥ 2 dims).
    pub prunable: Option<bool>,
    /// Keep this tensor dense whatever the other settings say.
    pub locked: bool,
    /// Target sparsity in layer-wise scope.
    pub sparsity: f64,
    /// Upper bound on this tensor's sparsity in global scope.
    pub max_sparsity: Option<f64>,
}

/// Everything that decides the masks. Equal settings on the same model give identical masks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PruneSettings {
    pub criterion: Criterion,
    pub seed: u64,
    /// Calibration samples for the data-driven criteria (the first this many of the data).
    pub calibration: usize,
    /// Structured cuts keep widths that are multiples of this (1: any width), because odd
    /// widths run slower on real hardware.
    pub round_width: usize,
    pub pattern: Pattern,
    pub scope: Scope,
    /// Global target: fraction of prunable weights to remove.
    pub sparsity: f64,
    /// Global scope: every tensor keeps at least this fraction of its weights.
    pub min_keep: f64,
    /// Sensitivity-guided scope: the rule that planned the per-layer targets.
    pub rule: Rule,
    pub layers: BTreeMap<String, LayerSettings>,
}

impl Default for PruneSettings {
    fn default() -> Self {
        Self {
            criterion: Criterion::Magnitude,
            seed: 0,
            calibration: super::DEFAULT_CALIBRATION,
            round_width: 8,
            pattern: Pattern::Unstructured,
            scope: Scope::Global,
            sparsity: 0.0,
            min_keep: 0.0,
            rule: Rule::Marginal,
            layers: BTreeMap::new(),
        }
    }
}

impl PruneSettings {
    pub fn layer(&self, name: &str) -> LayerSettings {
        self.layers.get(name).cloned().unwrap_or_default()
    }

    /// The sparsity tensor `name` is cut to when every layer takes its own share (block
    /// pruning, SparseGPT, structured groups): 0 when locked, the global target in global
    /// scope, else the layer's own target.
    pub fn layer_target(&self, name: &str) -> f64 {
        let l = self.layer(name);
        let s = if l.locked {
            0.0
        } else if self.scope == Scope::Global {
            self.sparsity
        } else {
            l.sparsity
        };
        s.clamp(0.0, 1.0)
    }

    pub fn layer_mut(&mut self, name: &str) -> &mut LayerSettings {
        self.layers.entry(name.to_string()).or_default()
    }

    /// Whether tensor `t` takes part in pruning (prunable and decodable).
    pub fn is_prunable(&self, model: &Model, t: usize) -> bool {
        let e = &model.tensors[t];
        self.prunable(&e.name, e.analysable(), e.default_prunable())
    }

    /// The prunable rule by name, for callers that hold tensor facts rather than the model:
    /// the user's override, else the default; never for a tensor that cannot be decoded.
    pub fn prunable(&self, name: &str, analysable: bool, default_prunable: bool) -> bool {
        analysable
            && self
                .layers
                .get(name)
                .and_then(|l| l.prunable)
                .unwrap_or(default_prunable)
    }

    /// Records the user's choice, keeping an override only where it differs from the default
    /// (so recipes stay minimal and a later change of default rule still applies).
    pub fn set_prunable(&mut self, name: &str, prunable: bool, default_prunable: bool) {
        self.layer_mut(name).prunable = (prunable != default_prunable).then_some(prunable);
    }

    /// Checks ranges and that every named tensor exists and can be pruned.
    pub fn validate(&self, model: &Model) -> Result<(), PruneError> {
        self.validate_given(model, || {
            super::structured::groups_of(model).map(std::sync::Arc::new)
        })
    }

    /// [`PruneSettings::validate`] with the model's dependency groups from `groups`, asked for
    /// only under a structured pattern (the worker keeps them from the model's opening rather
    /// than reading the graph again on every slider move).
    pub fn validate_given(
        &self,
        model: &Model,
        groups: impl FnOnce() -> Result<std::sync::Arc<crate::graph::Groups>, PruneError>,
    ) -> Result<(), PruneError> {
        self.pattern.validate()?;
        if self.pattern.structured() {
            super::structured::check_groups(model, &*groups()?, self.pattern)?;
        } else if self.criterion.channels_only() {
            return Err(PruneError::Structured(format!(
                "{} scores whole neurons and channels: choose the neuron or channel granularity \
                 (or head)",
                self.criterion.cli_name()
            )));
        }
        for s in [self.sparsity, self.min_keep] {
            if !(0.0..=1.0).contains(&s) {
                return Err(PruneError::BadSparsity(s));
            }
        }
        for (name, l) in &self.layers {
            let t = model
                .find(name)
                .ok_or_else(|| PruneError::UnknownTensor(name.clone()))?;
            if l.prunable == Some(true) && !model.tensors[t].analysable() {
                return Err(PruneError::NotAnalysable(name.clone()));
            }
            for s in [Some(l.sparsity), l.max_sparsity].into_iter().flatten() {
                if !(0.0..=1.0).contains(&s) {
                    return Err(PruneError::BadSparsity(s));
                }
            }
        }
        Ok(())
    }
}
