//! A multilayer perceptron described by JSON in the safetensors metadata, run with candle.

use candle_core::{Device, Tensor};
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
    x: Tensor,
}

impl MlpRunner {
    /// Checks the architecture against the model's tensors and the data against the first
    /// layer.
    pub fn new(model: &Model, arch: MlpArch, data: &EvalData) -> Result<MlpRunner, EvalError> {
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
        let x = Tensor::from_slice(values, (data.samples, arch.input_dim), &Device::Cpu)?;
        Ok(MlpRunner { arch, x })
    }

    fn layer_tensors(
        &self,
        model: &Model,
        masks: Option<&MaskSet>,
    ) -> Result<Vec<(Tensor, Option<Tensor>, Activation)>, EvalError> {
        let load = |name: &str| -> Result<Tensor, EvalError> {
            let t = find_float(model, name)?;
            let v = crate::prune::masked_f32(model, t, masks);
            Ok(Tensor::from_vec(
                v,
                model.tensors[t].shape.clone(),
                &Device::Cpu,
            )?)
        };
        self.arch
            .layers
            .iter()
            .map(|l| {
                Ok((
                    load(&l.weight)?,
                    l.bias.as_deref().map(load).transpose()?,
                    l.activation,
                ))
            })
            .collect()
    }
}

impl Runner for MlpRunner {
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        let layers = self.layer_tensors(model, masks)?;
        logit_outputs(&mlp_forward(&self.x, &layers)?)
    }

    fn engine(&self) -> Engine {
        Engine {
            name: "candle",
            trainable: true,
            why: "an MLP described in the file's metadata runs on candle, forward and backward"
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
