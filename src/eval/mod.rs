//! Evaluation: how well a (masked) model does on real data.
//!
//! Everything that can run a model implements [`Evaluator`]; the worker only sees the trait.
//! Today the sample MLP implements it; an ONNX graph run through tract will be the next.

mod mlp;

pub use mlp::{
    ARCH_METADATA_KEY, Activation, MlpArch, MlpEvaluator, MlpLayer, metrics, mlp_forward,
};

use crate::model::Model;
use crate::prune::MaskSet;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// Fraction correct, 0..=1.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    pub samples: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("architecture metadata '{key}' is invalid: {msg}")]
    Arch { key: &'static str, msg: String },
    #[error("tensor '{tensor}': {msg}")]
    Tensor { tensor: String, msg: String },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("evaluation failed: {0}")]
    Compute(String),
}

impl From<candle_core::Error> for EvalError {
    fn from(e: candle_core::Error) -> Self {
        EvalError::Compute(e.to_string())
    }
}

/// Something that can score a model with masks applied.
pub trait Evaluator: Send + Sync {
    /// What is measured, for people: "UCI digits test split, 360 images".
    fn describe(&self) -> String;
    fn evaluate(&self, model: &Model, masks: &MaskSet) -> Result<Metrics, EvalError>;
}

/// The evaluator a model's metadata describes, if any. Models without an architecture we
/// can run (most files) get `Ok(None)`: they can be pruned but not measured.
pub fn evaluator_for(model: &Model) -> Result<Option<Box<dyn Evaluator>>, EvalError> {
    match model.metadata.get(ARCH_METADATA_KEY) {
        None => Ok(None),
        Some(json) => {
            let arch = MlpArch::from_json(json)?;
            Ok(Some(Box::new(MlpEvaluator::new(model, arch)?)))
        }
    }
}
