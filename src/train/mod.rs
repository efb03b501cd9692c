//! Training the sample model: an MLP on the bundled digits, with candle-nn, fixed seed.
//!
//! The initial weights are returned and saved too: lottery-ticket rewinding needs them.

mod graph;
mod native;
mod recovery;

pub use graph::{
    GraphFinetune, SampleArch, finetune_graph, magnitude_keep, sample_graph, train_graph,
};
pub use native::{
    Distill, EpochStats, FinetuneConfig, FinetuneResult, Layer, LrSchedule, Net, Optim,
    TrainDevice, check_data, finetune, finetune_on, finetune_where, finetune_with, training_split,
    write_finetuned, write_trained,
};
pub use recovery::{
    AnyTrainee, GraphNet, LotteryLevel, LotteryResult, Rewind, Schedule, ScheduleResult,
    TimelinePoint, TrainRun, Trainee, add_movement, agp_sparsity, iterative_sparsity, lottery,
    movement_keep, run_schedule,
};

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::Serialize;

use crate::data::{Dataset, Split};
use crate::eval::{Activation, EvalError, Metrics, MlpArch, MlpLayer, mlp_forward};
use crate::progress::Progress;
use crate::util::SplitMix64;

#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub hidden: Vec<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            hidden: vec![128, 64],
            epochs: 40,
            batch_size: 32,
            lr: 2e-3,
            weight_decay: 1e-4,
            seed: 0,
        }
    }
}

/// What prunescope can train in a model: an MLP on its own loops, or a graph on candle (the
/// CNN samples, graphs described in metadata or a sidecar, ONNX graphs that import).
#[derive(Clone, Debug)]
pub enum Trainable {
    Mlp(MlpArch),
    Graph(crate::graph::Graph),
}

impl Trainable {
    pub fn of(model: &crate::model::Model) -> Result<Trainable, TrainError> {
        if model.format == crate::model::ModelFormat::Onnx {
            return crate::eval::import_onnx_graph(model)
                .map(Trainable::Graph)
                .map_err(|e| {
                    TrainError::Compute(format!(
                        "this ONNX graph does not import into a trainable graph: {e}"
                    ))
                });
        }
        let Some(j) = crate::eval::arch_json(model)? else {
            return Err(TrainError::Compute(format!(
                "{}: no architecture prunescope can train (weights only; the samples, or a \
                 safetensors model with its graph in the metadata or a sidecar \
                 MODEL.arch.json)",
                model.display_name()
            )));
        };
        if let Ok(a) = MlpArch::from_json(&j) {
            return Ok(Trainable::Mlp(a));
        }
        crate::graph::Graph::from_json(&j)
            .map(Trainable::Graph)
            .map_err(|e| TrainError::Compute(format!("the architecture cannot be trained: {e}")))
    }

    /// The data set whose split trains it by default.
    pub fn dataset(&self) -> &str {
        match self {
            Trainable::Mlp(a) => &a.dataset,
            Trainable::Graph(g) => g.dataset.as_deref().unwrap_or("uci-digits"),
        }
    }

    /// The trainee of `model`'s weights under this description, `masks` held.
    pub fn trainee(
        &self,
        model: &crate::model::Model,
        masks: &crate::prune::MaskSet,
    ) -> Result<AnyTrainee, TrainError> {
        Ok(match self {
            Trainable::Mlp(a) => AnyTrainee::Mlp(Net::from_model(model, a, masks)?),
            Trainable::Graph(g) => {
                AnyTrainee::Graph(GraphNet::from_model(model, g.clone(), masks)?)
            }
        })
    }

    /// The network as a graph (an MLP becomes its Linear and ReLU nodes).
    pub fn graph(&self) -> crate::graph::Graph {
        match self {
            Trainable::Mlp(a) => a.to_graph(),
            Trainable::Graph(g) => g.clone(),
        }
    }

    /// `model`'s network as a graph, for the analyses that run or read it (calibration,
    /// dependency groups); the error says why there is none.
    pub fn graph_of(model: &crate::model::Model) -> Result<crate::graph::Graph, String> {
        match Trainable::of(model) {
            Ok(t) => Ok(t.graph()),
            Err(TrainError::Compute(msg)) => Err(msg),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The description as stored in a model's metadata.
    pub fn to_json(&self) -> String {
        match self {
            Trainable::Mlp(a) => serde_json::to_string(a).expect("plain data serialises"),
            Trainable::Graph(g) => g.to_json(),
        }
    }
}

/// Named f32 tensors: (name, shape, values).
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

pub struct TrainResult {
    /// The architecture description saved in the metadata (an MLP's or a graph's JSON).
    pub arch: String,
    pub config: TrainConfig,
    pub init: NamedTensors,
    pub trained: NamedTensors,
    pub test: Metrics,
    /// Mean training loss per epoch.
    pub epoch_loss: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training failed: {0}")]
    Compute(String),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("cancelled")]
    Cancelled,
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Compute(e.to_string())
    }
}

/// Trains `input → hidden… → classes` with ReLU between layers, AdamW, shuffled minibatches.
pub fn train_mlp(
    cfg: &TrainConfig,
    data: &Split,
    progress: &Progress,
) -> Result<TrainResult, TrainError> {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(cfg.seed);
    let mut dims = vec![data.train.dim];
    dims.extend(&cfg.hidden);
    dims.push(data.train.classes);
    let mut init = NamedTensors::new();
    let mut layers = Vec::new();
    for i in 0..dims.len() - 1 {
        let (fan_in, fan_out) = (dims[i], dims[i + 1]);
        // PyTorch's nn.Linear default: U(-1/√fan_in, 1/√fan_in) for weight and bias.
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut u = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        let name = format!("fc{}", i + 1);
        init.push((
            format!("{name}.weight"),
            vec![fan_out, fan_in],
            u(fan_out * fan_in),
        ));
        init.push((format!("{name}.bias"), vec![fan_out], u(fan_out)));
        layers.push(MlpLayer {
            weight: format!("{name}.weight"),
            bias: Some(format!("{name}.bias")),
            activation: if i + 2 == dims.len() {
                Activation::None
            } else {
                Activation::Relu
            },
        });
    }
    let vars: Vec<Var> = init
        .iter()
        .map(|(_, s, v)| Var::from_tensor(&Tensor::from_slice(v, s.as_slice(), &dev)?))
        .collect::<candle_core::Result<_>>()?;
    let params = ParamsAdamW {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars.clone(), params)?;
    let forward_layers = |vars: &[Var]| -> Vec<(Tensor, Option<Tensor>, Activation)> {
        layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    vars[2 * i].as_tensor().clone(),
                    Some(vars[2 * i + 1].as_tensor().clone()),
                    l.activation,
                )
            })
            .collect()
    };
    let train = &data.train;
    let sample = [train.dim];
    let epoch_loss = run_epochs(cfg, train.len(), &mut rng, progress, |chunk, _| {
        let (x, y) = batch(train, chunk, &sample, &dev)?;
        let logits = mlp_forward(&x, &forward_layers(&vars))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        opt.backward_step(&loss)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    })?;
    let all: Vec<usize> = (0..data.test.len()).collect();
    let (xt, yt) = batch(&data.test, &all, &sample, &dev)?;
    let logits = mlp_forward(&xt, &forward_layers(&vars))?;
    let test = crate::eval::metrics(&logits, &yt)?;
    let trained = init
        .iter()
        .zip(&vars)
        .map(|((n, s, _), v)| {
            Ok((
                n.clone(),
                s.clone(),
                v.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let arch = MlpArch {
        kind: "mlp".into(),
        input_dim: data.train.dim,
        layers,
        dataset: "uci-digits".into(),
    };
    Ok(TrainResult {
        arch: serde_json::to_string(&arch).map_err(|e| TrainError::Compute(e.to_string()))?,
        config: cfg.clone(),
        init,
        trained,
        test,
        epoch_loss,
    })
}

/// The samples `idx` of `d` as a batch of shape `[idx.len(), …sample]`, and their labels.
fn batch(
    d: &Dataset,
    idx: &[usize],
    sample: &[usize],
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(idx.len() * d.dim);
    for &i in idx {
        x.extend_from_slice(&d.inputs[i * d.dim..(i + 1) * d.dim]);
    }
    let y: Vec<u32> = idx.iter().map(|&i| d.labels[i]).collect();
    let mut shape = vec![idx.len()];
    shape.extend(sample);
    Ok((
        Tensor::from_vec(x, shape, dev)?,
        Tensor::from_vec(y, idx.len(), dev)?,
    ))
}

/// The training loop both trainers share: each epoch shuffles the order with `rng` and calls
/// `step(batch, rng)` on every minibatch (it returns the batch's loss); progress and cancel
/// between epochs. Returns the mean loss of each epoch.
fn run_epochs(
    cfg: &TrainConfig,
    samples: usize,
    rng: &mut SplitMix64,
    progress: &Progress,
    mut step: impl FnMut(&[usize], &mut SplitMix64) -> Result<f64, TrainError>,
) -> Result<Vec<f64>, TrainError> {
    let mut order: Vec<usize> = (0..samples).collect();
    let mut epoch_loss = Vec::with_capacity(cfg.epochs);
    for epoch in 0..cfg.epochs {
        progress.check().map_err(|_| TrainError::Cancelled)?;
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let (mut sum, mut batches) = (0.0, 0usize);
        for chunk in order.chunks(cfg.batch_size) {
            sum += step(chunk, rng)?;
            batches += 1;
        }
        let mean = sum / batches.max(1) as f64;
        epoch_loss.push(mean);
        progress.report(
            (epoch + 1) as f32 / cfg.epochs as f32,
            &format!("epoch {}/{}: loss {mean:.4}", epoch + 1, cfg.epochs),
        );
    }
    Ok(epoch_loss)
}

/// Saves the trained model (with its architecture in the metadata) and its initial weights.
pub fn save(
    result: &TrainResult,
    out: &std::path::Path,
    init_out: &std::path::Path,
) -> std::io::Result<()> {
    use std::collections::BTreeMap;
    let mut meta = BTreeMap::new();
    meta.insert(
        crate::eval::ARCH_METADATA_KEY.to_string(),
        result.arch.clone(),
    );
    meta.insert(
        "prunescope.train".to_string(),
        serde_json::to_string(&result.config).map_err(std::io::Error::other)?,
    );
    meta.insert(
        "prunescope.test_accuracy".to_string(),
        format!("{:.6}", result.test.accuracy.unwrap_or(f64::NAN)),
    );
    if let Some(name) = init_out.file_name() {
        meta.insert(
            "prunescope.init_weights".to_string(),
            name.to_string_lossy().into_owned(),
        );
    }
    crate::export::write_f32_safetensors(out, &meta, &result.trained)?;
    let mut init_meta = BTreeMap::new();
    init_meta.insert(
        "prunescope.role".to_string(),
        "initial weights (before training)".to_string(),
    );
    crate::export::write_f32_safetensors(init_out, &init_meta, &result.init)
}
