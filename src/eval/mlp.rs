//! A multilayer perceptron described by JSON in the safetensors metadata, run with candle.

use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Engine, EvalError, Metrics, Outputs, Runner, score};
use crate::data::{ArrayValues, EvalData};
use crate::model::Model;
use crate::prune::MaskSet;

/// Metadata key holding the architecture JSON.
pub const ARCH_METADATA_KEY: &str = "prunescope.arch";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    None,
}

/// One `y = act(x Wᵀ + b)` layer, weights in PyTorch's `[out, in]` layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpLayer {
    pub weight: String,
    pub bias: Option<String>,
    pub activation: Activation,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpArch {
    /// Always "mlp" today; the tag leaves room for other architectures.
    pub kind: String,
    pub input_dim: usize,
    pub layers: Vec<MlpLayer>,
    /// The dataset whose test split measures this model ("uci-digits").
    pub dataset: String,
}

impl MlpArch {
    /// The same network as a [`crate::graph::Graph`] (Linear and ReLU nodes), for the code
    /// that runs graphs: calibration, dependency groups.
    pub fn to_graph(&self) -> crate::graph::Graph {
        use crate::graph::{GRAPH_KIND, Graph, InputSpec, Node, Op};
        let mut nodes = Vec::new();
        let mut value = "x".to_string();
        for (i, l) in self.layers.iter().enumerate() {
            let out = format!("h{i}");
            nodes.push(Node {
                name: format!("linear{i}"),
                op: Op::Linear {
                    weight: l.weight.clone(),
                    bias: l.bias.clone(),
                },
                inputs: vec![value],
                output: out.clone(),
            });
            value = out;
            if l.activation == Activation::Relu {
                let out = format!("a{i}");
                nodes.push(Node {
                    name: format!("relu{i}"),
                    op: Op::Relu,
                    inputs: vec![value],
                    output: out.clone(),
                });
                value = out;
            }
        }
        Graph {
            kind: GRAPH_KIND.into(),
            inputs: vec![InputSpec {
                name: "x".into(),
                shape: vec![self.input_dim],
            }],
            nodes,
            output: value,
            dataset: Some(self.dataset.clone()),
        }
    }

    pub fn from_json(s: &str) -> Result<MlpArch, EvalError> {
        let arch: MlpArch = serde_json::from_str(s).map_err(|e| EvalError::Arch {
            key: ARCH_METADATA_KEY,
            msg: e.to_string(),
        })?;
        if arch.kind != "mlp" {
            return Err(EvalError::Arch {
                key: ARCH_METADATA_KEY,
                msg: format!("kind '{}' is not supported (only 'mlp')", arch.kind),
            });
        }
        if arch.layers.is_empty() {
            return Err(EvalError::Arch {
                key: ARCH_METADATA_KEY,
                msg: "no layers".into(),
            });
        }
        Ok(arch)
    }
}

/// Runs `x` through the layers; shared by training and evaluation so both see one model.
pub fn mlp_forward(
    x: &Tensor,
    layers: &[(Tensor, Option<Tensor>, Activation)],
) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for (w, b, act) in layers {
        h = h.matmul(&w.t()?)?;
        if let Some(b) = b {
            h = h.broadcast_add(b)?;
        }
        if *act == Activation::Relu {
            h = h.relu()?;
        }
    }
    Ok(h)
}

/// Runs an MLP with candle, on the one f32 input array of the data.
pub struct MlpRunner {
    arch: MlpArch,
    /// The inputs, `samples × input_dim`.
    x: Arc<Vec<f32>>,
    samples: usize,
    dense: std::sync::Mutex<Option<Arc<DenseCache>>>,
    /// Run the forward pass on candle (the training path) instead of prunescope's kernels.
    candle: bool,
}

/// The dense model's layers and the input each layer receives, so that a variant that differs
/// from layer k on starts at layer k.
struct DenseCache {
    /// The model these values belong to (its address): another model gets a new cache.
    model: usize,
    layers: Vec<NativeLayer>,
    /// `inputs[k]`: what layer k receives, `samples × in_k`, row-major.
    inputs: Vec<Arc<Vec<f32>>>,
}

/// One layer's weights as plain vectors (`[out, in]` row-major).
#[derive(Clone)]
struct NativeLayer {
    out: usize,
    inp: usize,
    weight: Arc<Vec<f32>>,
    bias: Option<Arc<Vec<f32>>>,
    activation: Activation,
}

/// `act(x Wᵀ + b)` for `rows` samples, with the same kernel as the native graph engine.
fn native_layer(x: &[f32], rows: usize, l: &NativeLayer) -> Vec<f32> {
    let mut out = vec![0f32; rows * l.out];
    crate::graph::fast::matmul(
        rows, l.out, l.inp, x, &l.weight, 1, l.inp, &mut out, 0, l.out,
    );
    for r in out.chunks_mut(l.out) {
        if let Some(b) = &l.bias {
            for (v, bb) in r.iter_mut().zip(b.iter()) {
                *v += bb;
            }
        }
        if l.activation == Activation::Relu {
            for v in r.iter_mut() {
                *v = v.max(0.0);
            }
        }
    }
    out
}

impl MlpRunner {
    /// Checks the architecture against the model's tensors and the data against the first
    /// layer.
    pub fn new(model: &Model, arch: MlpArch, data: &EvalData) -> Result<MlpRunner, EvalError> {
        if arch.layers.is_empty() {
            return Err(EvalError::Arch {
                key: ARCH_METADATA_KEY,
                msg: "no layers".into(),
            });
        }
        let mut dim = arch.input_dim;
        for l in &arch.layers {
            let t = find_float(model, &l.weight)?;
            let shape = &model.tensors[t].shape;
            if shape.len() != 2 || shape[1] != dim {
                return Err(EvalError::Tensor {
                    tensor: l.weight.clone(),
                    msg: format!("shape {shape:?} does not take {dim} inputs"),
                });
            }
            dim = shape[0];
            if let Some(b) = &l.bias {
                let bt = find_float(model, b)?;
                if model.tensors[bt].shape != [dim] {
                    return Err(EvalError::Tensor {
                        tensor: b.clone(),
                        msg: format!("shape {:?} is not [{dim}]", model.tensors[bt].shape),
                    });
                }
            }
        }
        let [input] = &data.inputs[..] else {
            return Err(EvalError::Input(format!(
                "the MLP takes one input array, the data gives {}",
                data.inputs.len()
            )));
        };
        let ArrayValues::F32(values) = &input.values else {
            return Err(EvalError::Input(format!(
                "array '{}' holds integers; the MLP takes floats",
                input.name
            )));
        };
        if input.sample_len() != arch.input_dim {
            return Err(EvalError::Input(format!(
                "array '{}' has shape {:?}: {} values per sample, but the MLP takes {}",
                input.name,
                input.shape,
                input.sample_len(),
                arch.input_dim
            )));
        }
        Ok(MlpRunner {
            arch,
            x: Arc::new(values.clone()),
            samples: data.samples,
            dense: Default::default(),
            candle: false,
        })
    }

    /// Evaluates on candle, the engine training uses, instead of prunescope's kernels.
    pub fn use_candle(&mut self, on: bool) {
        self.candle = on;
    }

    fn run_candle(&self, layers: &[NativeLayer]) -> Result<Outputs, EvalError> {
        let dev = candle_core::Device::Cpu;
        let t = |v: &Arc<Vec<f32>>, shape: &[usize]| Tensor::from_slice(v.as_slice(), shape, &dev);
        let layers = layers
            .iter()
            .map(|l| {
                Ok((
                    t(&l.weight, &[l.out, l.inp])?,
                    l.bias.as_ref().map(|b| t(b, &[l.out])).transpose()?,
                    l.activation,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = t(&self.x, &[self.samples, self.arch.input_dim])?;
        logit_outputs(&mlp_forward(&x, &layers)?)
    }

    /// The layers' weights with `masks` applied (all dense for `None`).
    fn native_layers(
        &self,
        model: &Model,
        masks: Option<&MaskSet>,
    ) -> Result<Vec<NativeLayer>, EvalError> {
        let load = |name: &str| -> Result<(usize, Arc<Vec<f32>>), EvalError> {
            let t = find_float(model, name)?;
            Ok((t, Arc::new(crate::prune::masked_f32(model, t, masks))))
        };
        self.arch
            .layers
            .iter()
            .map(|l| {
                let (t, weight) = load(&l.weight)?;
                let shape = &model.tensors[t].shape;
                Ok(NativeLayer {
                    out: shape[0],
                    inp: shape[1],
                    weight,
                    bias: l.bias.as_deref().map(load).transpose()?.map(|b| b.1),
                    activation: l.activation,
                })
            })
            .collect()
    }

    fn forward_from(&self, mut h: Arc<Vec<f32>>, layers: &[NativeLayer]) -> Outputs {
        for l in layers {
            h = Arc::new(native_layer(&h, self.samples, l));
        }
        let cols = layers.last().map_or(self.arch.input_dim, |l| l.out);
        Outputs::new(
            Arc::try_unwrap(h).unwrap_or_else(|a| (*a).clone()),
            vec![cols],
        )
    }

    fn dense_cache(&self, model: &Model) -> Result<Arc<DenseCache>, EvalError> {
        let id = model as *const Model as usize;
        let mut slot = self.dense.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref().filter(|c| c.model == id) {
            return Ok(c.clone());
        }
        let layers = self.native_layers(model, None)?;
        let mut inputs = vec![self.x.clone()];
        for l in layers.iter().take(layers.len() - 1) {
            let h = native_layer(inputs.last().expect("starts with x"), self.samples, l);
            inputs.push(Arc::new(h));
        }
        let c = Arc::new(DenseCache {
            model: id,
            layers,
            inputs,
        });
        *slot = Some(c.clone());
        Ok(c)
    }
}

impl Runner for MlpRunner {
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        let layers = self.native_layers(model, masks)?;
        if self.candle {
            return self.run_candle(&layers);
        }
        Ok(self.forward_from(self.x.clone(), &layers))
    }

    fn run_partial(&self, model: &Model, masks: &MaskSet) -> Result<Outputs, EvalError> {
        if self.candle {
            return self.run(model, Some(masks));
        }
        let c = self.dense_cache(model)?;
        let touched = |name: &str| masks.get(name).is_some();
        let first = self
            .arch
            .layers
            .iter()
            .position(|l| touched(&l.weight) || l.bias.as_deref().is_some_and(touched))
            .unwrap_or(self.arch.layers.len() - 1);
        // Only the masked tensors are copied; every other layer shares the cached dense one.
        let mut layers = Vec::with_capacity(self.arch.layers.len() - first);
        for (l, dense) in self.arch.layers.iter().zip(&c.layers).skip(first) {
            let mut n = dense.clone();
            if touched(&l.weight) {
                let t = find_float(model, &l.weight)?;
                n.weight = Arc::new(crate::prune::masked_f32(model, t, Some(masks)));
            }
            if let Some(b) = l.bias.as_deref().filter(|b| touched(b)) {
                let t = find_float(model, b)?;
                n.bias = Some(Arc::new(crate::prune::masked_f32(model, t, Some(masks))));
            }
            layers.push(n);
        }
        Ok(self.forward_from(c.inputs[first].clone(), &layers))
    }

    fn weight_uses(&self, _model: &Model) -> Option<Vec<(String, f64)>> {
        Some(
            self.arch
                .layers
                .iter()
                .map(|l| (l.weight.clone(), 1.0))
                .collect(),
        )
    }

    fn engine(&self) -> Engine {
        Engine {
            name: if self.candle { "candle" } else { "native" },
            trainable: true,
            why: if self.candle {
                "an MLP described in the file's metadata runs on candle, forward and backward"
            } else {
                "an MLP described in the file's metadata: prunescope's kernels evaluate it, \
                 candle trains it"
            }
            .into(),
        }
    }
}

fn find_float(model: &Model, name: &str) -> Result<usize, EvalError> {
    let t = model.find(name).ok_or_else(|| EvalError::Tensor {
        tensor: name.to_string(),
        msg: "named by the architecture but missing from the model".into(),
    })?;
    if !model.tensors[t].analysable() {
        return Err(EvalError::Tensor {
            tensor: name.to_string(),
            msg: format!("dtype {} cannot be evaluated", model.tensors[t].dtype),
        });
    }
    Ok(t)
}

/// Accuracy and mean cross-entropy of logits against labels (training's test figures).
pub fn metrics(logits: &Tensor, y: &Tensor) -> Result<Metrics, EvalError> {
    let out = logit_outputs(logits)?;
    let labels = y.to_vec1::<u32>()?;
    score(&out, out.rows, Some(&labels), None)
}

/// A `[samples, classes]` logits tensor as outputs.
fn logit_outputs(logits: &Tensor) -> Result<Outputs, EvalError> {
    let (_, cols) = logits.dims2()?;
    Ok(Outputs::new(
        logits.flatten_all()?.to_vec1::<f32>()?,
        vec![cols],
    ))
}
