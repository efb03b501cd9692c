//! Evaluation: how well a (masked) model does on real data.
//!
//! An engine ([`Runner`]) turns a model, masks and data into outputs: candle for the MLPs that
//! prunescope trains, tract for ONNX graphs. [`DataEvaluator`] scores those outputs against the
//! data's labels and against the dense model's outputs; the worker only sees [`Evaluator`].

mod mlp;
mod onnx;
mod score;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use mlp::{ARCH_METADATA_KEY, Activation, MlpArch, MlpLayer, MlpRunner, metrics, mlp_forward};
pub use onnx::OnnxRunner;
pub use score::{Fidelity, Metrics, Outputs, argmax, score};

use crate::data::{DataSpec, EvalData};
use crate::model::{Model, ModelFormat};
use crate::prune::MaskSet;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("architecture metadata '{key}' is invalid: {msg}")]
    Arch { key: &'static str, msg: String },
    #[error("tensor '{tensor}': {msg}")]
    Tensor { tensor: String, msg: String },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("the data does not fit the model: {0}")]
    Input(String),
    #[error("labels: {0}")]
    Labels(String),
    #[error("ONNX graph {path}: {msg}")]
    Graph { path: String, msg: String },
    #[error("evaluation failed: {0}")]
    Compute(String),
}

impl From<candle_core::Error> for EvalError {
    fn from(e: candle_core::Error) -> Self {
        EvalError::Compute(e.to_string())
    }
}

/// Which engine runs a model, and whether prunescope can train it there.
#[derive(Clone, Debug, PartialEq)]
pub struct Engine {
    /// "candle" or "tract".
    pub name: &'static str,
    pub trainable: bool,
    /// One sentence for people: why this path.
    pub why: String,
}

impl Engine {
    /// "evaluate + train" or "evaluate only".
    pub fn label(&self) -> &'static str {
        if self.trainable {
            "evaluate + train"
        } else {
            "evaluate only"
        }
    }
}

/// Runs a model on fixed data.
pub trait Runner: Send + Sync {
    /// The outputs on the data, with `masks` applied (`None`: the dense model).
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError>;
    fn engine(&self) -> Engine;
    /// How many times the engine has built an executable plan (tract); 0 where nothing is built.
    fn plan_builds(&self) -> usize {
        0
    }
}

/// Something that can score a model with masks applied.
pub trait Evaluator: Send + Sync {
    /// What is measured, for people: "uci-digits/test, 360 samples".
    fn describe(&self) -> String;
    fn engine(&self) -> Engine;
    /// Metrics with `masks` applied; fidelity compares with the dense model.
    fn evaluate(&self, model: &Model, masks: &MaskSet) -> Result<Metrics, EvalError>;
}

/// A runner, its data, and the dense outputs that fidelity compares with (computed once).
pub struct DataEvaluator {
    runner: Box<dyn Runner>,
    data: Arc<EvalData>,
    notes: Vec<String>,
    dense: Mutex<Option<Arc<Outputs>>>,
}

impl DataEvaluator {
    pub fn new(runner: Box<dyn Runner>, data: Arc<EvalData>, notes: Vec<String>) -> Self {
        DataEvaluator {
            runner,
            data,
            notes,
            dense: Mutex::new(None),
        }
    }

    pub fn data(&self) -> &EvalData {
        &self.data
    }

    /// The dense model's outputs, computed on first use.
    pub fn dense_outputs(&self, model: &Model) -> Result<Arc<Outputs>, EvalError> {
        let mut d = self.dense.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = d.as_ref() {
            return Ok(o.clone());
        }
        let o = Arc::new(self.runner.run(model, None)?);
        *d = Some(o.clone());
        Ok(o)
    }

    /// Runs the engine, uncached (benchmarks).
    pub fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        self.runner.run(model, masks)
    }

    pub fn plan_builds(&self) -> usize {
        self.runner.plan_builds()
    }

    /// The outputs with masks applied (the dense ones when there are no masks).
    pub fn outputs(&self, model: &Model, masks: &MaskSet) -> Result<Arc<Outputs>, EvalError> {
        if masks.is_empty() {
            self.dense_outputs(model)
        } else {
            Ok(Arc::new(self.runner.run(model, Some(masks))?))
        }
    }
}

impl Evaluator for DataEvaluator {
    fn describe(&self) -> String {
        let mut s = format!(
            "{}, {} samples{}",
            self.data.name,
            self.data.samples,
            if self.data.labels.is_some() {
                ""
            } else {
                " without labels (fidelity to the dense model)"
            }
        );
        for n in &self.notes {
            s.push_str("; ");
            s.push_str(n);
        }
        s
    }

    fn engine(&self) -> Engine {
        self.runner.engine()
    }

    fn evaluate(&self, model: &Model, masks: &MaskSet) -> Result<Metrics, EvalError> {
        let dense = self.dense_outputs(model)?;
        let out = self.outputs(model, masks)?;
        score(
            &out,
            self.data.samples,
            self.data.labels.as_deref(),
            Some(&dense),
        )
    }
}

/// Where evaluation data comes from.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum DataSource {
    /// The model's own dataset (the sample MLP's), or the digits test split for a model that
    /// takes 64 values per sample.
    #[default]
    Default,
    /// The bundled digits test split.
    Digits,
    /// A `.npz` or `.safetensors` file of named arrays.
    File { path: PathBuf, spec: DataSpec },
}

fn digits_test() -> Result<EvalData, EvalError> {
    Ok(EvalData::from_dataset(&crate::data::digits_split()?.test))
}

/// The evaluator for a model and its default data, if the model can be run: `Ok(None)` for
/// weights without a graph (they can be pruned but not measured).
pub fn evaluator_for(model: &Model) -> Result<Option<DataEvaluator>, EvalError> {
    if model.format == ModelFormat::Onnx || model.metadata.contains_key(ARCH_METADATA_KEY) {
        evaluator_with_data(model, &DataSource::Default).map(Some)
    } else {
        Ok(None)
    }
}

/// The evaluator for a model on the given data.
pub fn evaluator_with_data(model: &Model, source: &DataSource) -> Result<DataEvaluator, EvalError> {
    if let Some(json) = model.metadata.get(ARCH_METADATA_KEY) {
        let arch = MlpArch::from_json(json)?;
        let data = match source {
            DataSource::Default => {
                EvalData::from_dataset(&crate::data::by_name(&arch.dataset)?.test)
            }
            DataSource::Digits => digits_test()?,
            DataSource::File { path, spec } => {
                crate::data::load_eval_data(path, &["x".to_string()], spec)?
            }
        };
        let runner = MlpRunner::new(model, arch, &data)?;
        return Ok(DataEvaluator::new(
            Box::new(runner),
            Arc::new(data),
            Vec::new(),
        ));
    }
    if model.format != ModelFormat::Onnx {
        return Err(EvalError::Input(format!(
            "{} holds weights only: there is no graph to run (export it to ONNX to evaluate it)",
            model.display_name()
        )));
    }
    let graph = onnx::GraphInfo::read(model)?;
    let data = match source {
        DataSource::Default | DataSource::Digits => {
            let takes_64 =
                graph.data_inputs.len() == 1 && graph.data_inputs[0].fixed_sample_len() == Some(64);
            if !takes_64 {
                return Err(EvalError::Input(format!(
                    "{} needs data: its inputs are {}; choose a .npz or .safetensors file \
                     (the bundled digits fit models that take 64 values per sample)",
                    model.display_name(),
                    graph.describe_inputs()
                )));
            }
            digits_test()?
        }
        DataSource::File { path, spec } => {
            let names: Vec<String> = graph.data_inputs.iter().map(|i| i.name.clone()).collect();
            crate::data::load_eval_data(path, &names, spec)?
        }
    };
    let data = Arc::new(data);
    let runner = OnnxRunner::new(model, graph, data.clone())?;
    let notes = runner.notes();
    Ok(DataEvaluator::new(Box::new(runner), data, notes))
}
