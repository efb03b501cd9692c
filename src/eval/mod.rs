//! Evaluation: how well a (masked) model does on real data.
//!
//! An engine ([`Runner`]) turns a model, masks and data into outputs: candle for the MLPs that
//! prunescope trains, tract for ONNX graphs. [`DataEvaluator`] scores those outputs against the
//! data's labels and against the dense model's outputs; the worker only sees [`Evaluator`].

mod graph_runner;
mod mlp;
mod onnx;
mod onnx_kernels;
mod onnx_native;
mod score;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use graph_runner::{FastRunner, Fastest, GraphRunner};
pub use mlp::{ARCH_METADATA_KEY, Activation, MlpArch, MlpLayer, MlpRunner, metrics, mlp_forward};
pub use onnx::{GraphInfo, MatmulWeight, OnnxRunner};
pub use onnx_native::NativeOnnx;
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
    /// How the engine runs, once it has run (threads chosen, for one).
    fn detail(&self) -> String {
        String::new()
    }
    /// The outputs when `masks` covers only a few tensors: an engine that can start from the
    /// dense model's values just ahead of the first masked tensor does (sensitivity sweeps).
    fn run_partial(&self, model: &Model, masks: &MaskSet) -> Result<Outputs, EvalError> {
        self.run(model, Some(masks))
    }
    /// Multiplications per weight per sample of each Linear and Conv2d weight, where the
    /// engine knows the graph's shapes (estimated FLOPs).
    fn weight_uses(&self, _model: &Model) -> Option<Vec<(String, f64)>> {
        None
    }
}

/// The first samples of the data, for showing: pixels where a sample is an image.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleView {
    pub count: usize,
    /// (height, width) when every sample is one grey image.
    pub image: Option<(usize, usize)>,
    /// `count × height × width` values scaled to 0..=1 (empty without images).
    pub pixels: Vec<f32>,
    pub labels: Option<Vec<u32>>,
}

/// Top-1 predictions of the dense and the pruned model on the first samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictions {
    pub dense: Vec<u32>,
    pub pruned: Vec<u32>,
}

/// Something that can score a model with masks applied.
pub trait Evaluator: Send + Sync {
    /// What is measured, for people: "uci-digits/test, 360 samples".
    fn describe(&self) -> String;
    fn engine(&self) -> Engine;
    /// Metrics with `masks` applied; fidelity compares with the dense model.
    fn evaluate(&self, model: &Model, masks: &MaskSet) -> Result<Metrics, EvalError>;
    /// The first `n` samples, for a gallery.
    fn samples(&self, _n: usize) -> Option<SampleView> {
        None
    }
    /// Metrics where `masks` covers a few tensors (a sensitivity point); the same numbers as
    /// [`Evaluator::evaluate`], sooner where the engine reuses the dense computation.
    fn evaluate_partial(&self, model: &Model, masks: &MaskSet) -> Result<Metrics, EvalError> {
        self.evaluate(model, masks)
    }
    /// Identifies what is measured (the data's content and labels), for caches.
    fn fingerprint(&self) -> String {
        self.describe()
    }
    /// Multiplications per weight per sample (see [`Runner::weight_uses`]).
    fn weight_uses(&self, _model: &Model) -> Option<Vec<(String, f64)>> {
        None
    }
    /// The samples data-driven criteria calibrate with: a bundled dataset's training split
    /// where the evaluation uses its test split, else the evaluation data itself.
    fn shared_data(&self) -> Option<Arc<EvalData>> {
        None
    }
    /// The fingerprint of [`Evaluator::shared_data`], computed once.
    fn calibration_fingerprint(&self) -> Option<&str> {
        None
    }
    /// Metrics, and the predictions on the first `n` samples where each sample gets one row
    /// of outputs.
    fn evaluate_with_predictions(
        &self,
        model: &Model,
        masks: &MaskSet,
        _n: usize,
    ) -> Result<(Metrics, Option<Predictions>), EvalError> {
        Ok((self.evaluate(model, masks)?, None))
    }
}

/// A runner, its data, and the dense outputs that fidelity compares with (computed once).
pub struct DataEvaluator {
    runner: Box<dyn Runner>,
    data: Arc<EvalData>,
    /// What data-driven criteria calibrate on: a bundled dataset's training split (so the
    /// test figures stay honest), or the chosen file itself.
    calibration: Arc<EvalData>,
    notes: Vec<String>,
    dense: Mutex<Option<Arc<Outputs>>>,
    fingerprint: std::sync::OnceLock<String>,
    calibration_fingerprint: std::sync::OnceLock<String>,
}

impl DataEvaluator {
    pub fn new(runner: Box<dyn Runner>, data: Arc<EvalData>, notes: Vec<String>) -> Self {
        DataEvaluator {
            runner,
            calibration: data.clone(),
            data,
            notes,
            dense: Mutex::new(None),
            fingerprint: std::sync::OnceLock::new(),
            calibration_fingerprint: std::sync::OnceLock::new(),
        }
    }

    pub fn data(&self) -> &EvalData {
        &self.data
    }

    /// The calibration samples (see [`Evaluator::shared_data`]).
    pub fn calibration(&self) -> &EvalData {
        &self.calibration
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

    pub fn detail(&self) -> String {
        self.runner.detail()
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
    fn shared_data(&self) -> Option<Arc<EvalData>> {
        Some(self.calibration.clone())
    }
    fn calibration_fingerprint(&self) -> Option<&str> {
        Some(
            self.calibration_fingerprint
                .get_or_init(|| self.calibration.fingerprint()),
        )
    }
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
        Ok(self.evaluate_with_predictions(model, masks, 0)?.0)
    }

    fn evaluate_partial(&self, model: &Model, masks: &MaskSet) -> Result<Metrics, EvalError> {
        let dense = self.dense_outputs(model)?;
        let out = if masks.is_empty() {
            dense.clone()
        } else {
            Arc::new(self.runner.run_partial(model, masks)?)
        };
        score(
            &out,
            self.data.samples,
            self.data.labels.as_deref(),
            Some(&dense),
        )
    }

    fn fingerprint(&self) -> String {
        self.fingerprint
            .get_or_init(|| self.data.fingerprint())
            .clone()
    }

    fn weight_uses(&self, model: &Model) -> Option<Vec<(String, f64)>> {
        self.runner.weight_uses(model)
    }

    fn evaluate_with_predictions(
        &self,
        model: &Model,
        masks: &MaskSet,
        n: usize,
    ) -> Result<(Metrics, Option<Predictions>), EvalError> {
        let dense = self.dense_outputs(model)?;
        let out = self.outputs(model, masks)?;
        let m = score(
            &out,
            self.data.samples,
            self.data.labels.as_deref(),
            Some(&dense),
        )?;
        let per_sample = out.rows == self.data.samples;
        let p = (n > 0 && per_sample).then(|| {
            let k = n.min(out.rows);
            let top = |o: &Outputs| (0..k).map(|r| argmax(o.row(r)) as u32).collect();
            Predictions {
                dense: top(&dense),
                pruned: top(&out),
            }
        });
        Ok((m, p))
    }

    fn samples(&self, n: usize) -> Option<SampleView> {
        let count = n.min(self.data.samples);
        let first = self.data.inputs.first()?;
        let sample = &first.shape[1..];
        // An image: [H, W], [1, H, W], or 64 values (the 8×8 digits).
        let hw = match sample {
            [h, w] | [1, h, w] => Some((*h, *w)),
            [64] => Some((8, 8)),
            _ => None,
        }
        .filter(|&(h, w)| h * w <= 4096 && self.data.inputs.len() == 1);
        let pixels = match (&first.values, hw) {
            (crate::data::ArrayValues::F32(v), Some((h, w))) => {
                let v = &v[..count * h * w];
                let (lo, hi) = v
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                let span = (hi - lo).max(1e-12);
                v.iter().map(|&x| (x - lo) / span).collect()
            }
            _ => Vec::new(),
        };
        Some(SampleView {
            count,
            image: hw.filter(|_| !pixels.is_empty()),
            pixels,
            labels: self.data.labels.as_ref().map(|l| l[..count].to_vec()),
        })
    }
}

/// The runner for a graph that candle runs: the one asked for, or the fastest of candle,
/// prunescope's kernels (where they cover every op) and tract (for ONNX files).
fn choose(
    candle: GraphRunner,
    tract: Option<Box<dyn Runner>>,
    engine: EnginePref,
) -> Result<Box<dyn Runner>, EvalError> {
    let native = FastRunner::new(&candle);
    Ok(match engine {
        EnginePref::Candle => Box::new(candle),
        EnginePref::Native => Box::new(native.ok_or_else(|| {
            EvalError::Input(
                "prunescope's kernels do not cover every op of this graph (Concat, MatMul)".into(),
            )
        })?),
        EnginePref::Tract => match tract {
            Some(t) => t,
            None => {
                return Err(EvalError::Input(
                    "tract runs ONNX files; this model's graph runs on candle".into(),
                ));
            }
        },
        EnginePref::Auto => {
            let mut all: Vec<Box<dyn Runner>> = Vec::new();
            if let Some(n) = native {
                all.push(Box::new(n));
            }
            all.push(Box::new(candle));
            all.extend(tract);
            Box::new(Fastest::new(all))
        }
    })
}

/// Parses an ONNX model's graph and imports it into prunescope's graph, with every declared
/// input dimension that is not fixed taken as 1 (fuzzing; no data or engine involved).
pub fn import_onnx_graph(model: &Model) -> Result<crate::graph::Graph, String> {
    let info = onnx::GraphInfo::read(model).map_err(|e| e.to_string())?;
    let shapes: Vec<(String, Vec<usize>)> = info
        .data_inputs
        .iter()
        .map(|i| {
            let dims = i.dims.clone().unwrap_or_default();
            let per = dims.iter().skip(1).map(|d| d.unwrap_or(1)).collect();
            (i.name.clone(), per)
        })
        .collect();
    info.import(model, &shapes)
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

/// The architecture description of a model: its `prunescope.arch` metadata, or a sidecar
/// `MODEL.arch.json` beside the file (`model.safetensors` → `model.arch.json`).
pub fn arch_json(model: &Model) -> Result<Option<String>, EvalError> {
    if let Some(j) = model.metadata.get(ARCH_METADATA_KEY) {
        return Ok(Some(j.clone()));
    }
    let Some(path) = model.source.path() else {
        return Ok(None);
    };
    let Some(stem) = path.file_stem() else {
        return Ok(None);
    };
    let sidecar = path.with_file_name(format!("{}.arch.json", stem.to_string_lossy()));
    match std::fs::read_to_string(&sidecar) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EvalError::Arch {
            key: ARCH_METADATA_KEY,
            msg: format!("{}: {}", sidecar.display(), crate::util::io_message(&e)),
        }),
    }
}

/// The evaluator for a model and its default data, if the model can be run: `Ok(None)` for
/// weights without a graph (they can be pruned but not measured).
pub fn evaluator_for(model: &Model) -> Result<Option<DataEvaluator>, EvalError> {
    if model.format == ModelFormat::Onnx || arch_json(model)?.is_some() {
        evaluator_with_data(model, &DataSource::Default).map(Some)
    } else {
        Ok(None)
    }
}

fn default_or_digits(dataset: Option<&str>) -> Result<EvalData, EvalError> {
    match dataset {
        Some(d) => Ok(EvalData::from_dataset(&crate::data::by_name(d)?.test)),
        None => digits_test(),
    }
}

/// Which engine evaluates a graph that runs on both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnginePref {
    /// Time both on the first run and keep the faster.
    #[default]
    Auto,
    Tract,
    Candle,
    /// prunescope's own CPU kernels (graphs of convolutions, pools, norms and linear layers).
    Native,
}

impl EnginePref {
    pub fn parse(s: &str) -> Option<EnginePref> {
        match s {
            "auto" => Some(EnginePref::Auto),
            "tract" => Some(EnginePref::Tract),
            "candle" => Some(EnginePref::Candle),
            "native" => Some(EnginePref::Native),
            _ => None,
        }
    }
}

/// The evaluator for a model on the given data, on the faster engine.
pub fn evaluator_with_data(model: &Model, source: &DataSource) -> Result<DataEvaluator, EvalError> {
    evaluator_with(model, source, EnginePref::Auto)
}

/// The evaluator for a model on the given data and engine.
pub fn evaluator_with(
    model: &Model,
    source: &DataSource,
    engine: EnginePref,
) -> Result<DataEvaluator, EvalError> {
    let mut e = evaluator_on(model, source, engine)?;
    // Evaluated on a bundled test split: calibrate on the same dataset's training split.
    if !matches!(source, DataSource::File { .. })
        && let Some(base) = e.data.name.strip_suffix("/test")
        && let Ok(split) = crate::data::by_name(base)
    {
        e.calibration = Arc::new(EvalData::from_dataset(&split.train));
    }
    Ok(e)
}

fn evaluator_on(
    model: &Model,
    source: &DataSource,
    engine: EnginePref,
) -> Result<DataEvaluator, EvalError> {
    let arch = if model.format == ModelFormat::Onnx {
        None
    } else {
        arch_json(model)?
    };
    if let Some(json) = arch.as_deref() {
        let kind = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string));
        if kind.as_deref() == Some(crate::graph::GRAPH_KIND) {
            let graph = crate::graph::Graph::from_json(json).map_err(|e| EvalError::Arch {
                key: ARCH_METADATA_KEY,
                msg: e.to_string(),
            })?;
            let data = match source {
                DataSource::Default => default_or_digits(graph.dataset.as_deref())?,
                DataSource::Digits => digits_test()?,
                DataSource::File { path, spec } => {
                    let names: Vec<String> = graph.inputs.iter().map(|i| i.name.clone()).collect();
                    crate::data::load_eval_data(path, &names, spec)?
                }
            };
            let (runner, notes) = GraphRunner::new(
                model,
                graph,
                &data,
                "prunescope's own graph, described in the file, runs on candle forward and \
                 backward"
                    .into(),
            )?;
            let runner = choose(runner, None, engine)?;
            return Ok(DataEvaluator::new(runner, Arc::new(data), notes));
        }
        if engine == EnginePref::Tract {
            return Err(EvalError::Input(
                "tract runs ONNX files; this MLP runs on prunescope's kernels or candle".into(),
            ));
        }
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
        let mut runner = MlpRunner::new(model, arch, &data)?;
        runner.use_candle(engine == EnginePref::Candle);
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
    let mut tract = OnnxRunner::new(model, graph, data.clone())?;
    let notes = tract.notes();
    let imported = if engine == EnginePref::Tract {
        Err(String::new())
    } else {
        tract.import_graph(model)
    };
    let runner: Box<dyn Runner> = match (imported, engine) {
        (Ok(graph), _) => {
            let why = "every operator is in prunescope's trainable graph; runs on candle, \
                       forward and backward"
                .to_string();
            let (candle, _) = GraphRunner::new(model, graph, &data, why)?;
            choose(candle, Some(Box::new(tract)), engine)?
        }
        (Err(why), EnginePref::Candle) => {
            return Err(EvalError::Input(format!(
                "this graph cannot run on candle: {why}"
            )));
        }
        (Err(why), EnginePref::Native) => match tract.native(model) {
            Ok(native) => Box::new(native),
            Err(e) => {
                return Err(EvalError::Input(format!(
                    "this graph cannot run on prunescope's kernels: {why}; nor on its ONNX \
                     interpreter: {e}"
                )));
            }
        },
        (Err(why), EnginePref::Auto) => match tract.native(model) {
            Ok(native) => {
                tract.set_untrainable_reason(format!(
                    "it evaluates only: it does not import into prunescope's trainable \
                         graph ({why})"
                ));
                Box::new(Fastest::new(vec![Box::new(native), Box::new(tract)]))
            }
            Err(e) => {
                tract.set_untrainable_reason(format!(
                    "the graph runs through tract only: it does not import into \
                         prunescope's trainable graph ({why}), nor run on prunescope's ONNX \
                         interpreter ({e})"
                ));
                Box::new(tract)
            }
        },
        (Err(_), EnginePref::Tract) => {
            tract.set_untrainable_reason(
                "evaluated by tract, as asked (whether it also trains was not checked)".into(),
            );
            Box::new(tract)
        }
    };
    Ok(DataEvaluator::new(runner, data, notes))
}
