//! Pruning: criteria turn weights into scores, a plan turns settings into per-tensor pruned
//! counts, and masks record exactly which weights go.
//!
//! The interactive path is built for speed: each tensor's score keys are sorted once per
//! (model, criterion) in a [`ScoreIndex`]; any new target sparsity is then answered by binary
//! search over those sorted keys ([`allocate`]), in microseconds for 100M+ parameters. Full
//! masks ([`build_masks`]) are one parallel pass over the weights.

mod alloc;
pub mod blocks;
pub mod calibrate;
mod criterion;
mod index;
mod mask;
mod nm;
pub mod owl;
mod settings;
pub mod sparsegpt;
pub mod structured;

pub use alloc::{Allocation, LayerAlloc, StructuredCut, allocate};
pub use calibrate::DEFAULT_CALIBRATION;
pub use criterion::{Criterion, ScoreInputs, key_of_score, score_of_key};
pub use index::{ScoreIndex, radix_sort_u32};
pub use mask::{
    Mask, MaskSet, build_layer_mask, build_masks, masked_f32, masked_f32_into, remask_f32,
};
pub use nm::{NmLines, nm_lines, nm_pruned_count};
pub use settings::{LayerSettings, Pattern, PruneSettings, Rule, Scope};

/// Errors in pruning settings or recipes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PruneError {
    #[error("invalid N:M pattern {n}:{m}: need 0 < N < M ≤ 256")]
    BadPattern { n: usize, m: usize },
    #[error("sparsity {0} is outside 0..=1")]
    BadSparsity(f64),
    #[error("tensor '{0}' is not in the model")]
    UnknownTensor(String),
    #[error("tensor '{0}' cannot be pruned: its dtype is not floating point or it is empty")]
    NotAnalysable(String),
    #[error(
        "cannot parse granularity '{0}': expected unstructured, N:M such as 2:4, block:B such as block:4, neuron or channel"
    )]
    PatternSyntax(String),
    #[error(
        "the score index of {model} needs {need_mb} MB (four bytes a weight for its {dtypes} tensors) and this machine has {avail_mb} MB available; bf16 and f16 checkpoints take a compact index (a few MB)"
    )]
    IndexTooLarge {
        model: String,
        dtypes: String,
        need_mb: u64,
        avail_mb: u64,
    },
    /// A structured cut is impossible: no graph, or no groups of the asked kind.
    #[error("{0}")]
    Structured(String),
    /// A criterion could not be scored: no or unsuitable calibration data, or a model that
    /// cannot be run.
    #[error("{0}")]
    Calibration(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<crate::progress::Cancelled> for PruneError {
    fn from(_: crate::progress::Cancelled) -> Self {
        PruneError::Cancelled
    }
}

/// Everything one pruning run produces.
pub struct Pruned {
    pub index: ScoreIndex,
    pub alloc: Allocation,
    pub masks: MaskSet,
    /// For criteria that update the kept weights (SparseGPT): the model to export and
    /// evaluate instead of the input, and each layer's reconstruction error.
    pub updated: Option<sparsegpt::SparseGpt>,
}

/// Validates the settings, scores the model, allocates and builds the masks: the one path
/// that the GUI's export and the CLI both take, so equal settings give equal bytes.
pub fn prune(
    model: &crate::model::Model,
    settings: &PruneSettings,
    inputs: &ScoreInputs,
    progress: &crate::progress::Progress,
) -> Result<Pruned, PruneError> {
    settings.validate(model)?;
    let index = ScoreIndex::build(model, settings.criterion, settings.seed, inputs, progress)?;
    if settings.criterion.updates_weights() {
        let data = inputs.calibration.ok_or_else(|| {
            PruneError::Calibration(
                "sparsegpt needs calibration data: load evaluation data first (--data in the CLI)"
                    .into(),
            )
        })?;
        let updated = sparsegpt::run(model, settings, data, inputs.samples, progress)?;
        let alloc = Allocation::of_masks(model, settings, &updated.masks);
        return Ok(Pruned {
            index,
            alloc,
            masks: updated.masks.clone(),
            updated: Some(updated),
        });
    }
    let alloc = allocate(model, &index, settings);
    let masks = build_masks(model, &index, settings, &alloc, progress)?;
    Ok(Pruned {
        index,
        alloc,
        masks,
        updated: None,
    })
}
