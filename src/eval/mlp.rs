//! A multilayer perceptron described by JSON in the safetensors metadata, run with candle.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{EvalError, Evaluator, Metrics};
use crate::data::Dataset;
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

/// Evaluates an MLP on the test split of its dataset.
pub struct MlpEvaluator {
    arch: MlpArch,
    test: Dataset,
    x: Tensor,
    y: Tensor,
}

impl MlpEvaluator {
    /// Checks the architecture against the model's tensors and loads the test data.
    pub fn new(model: &Model, arch: MlpArch) -> Result<MlpEvaluator, EvalError> {
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
        let test = crate::data::by_name(&arch.dataset)?.test;
        Self::with_data(arch, test)
    }

    pub fn with_data(arch: MlpArch, test: Dataset) -> Result<MlpEvaluator, EvalError> {
        if test.dim != arch.input_dim {
            return Err(EvalError::Arch {
                key: ARCH_METADATA_KEY,
                msg: format!("input_dim {} but dataset has {}", arch.input_dim, test.dim),
            });
        }
        let x = Tensor::from_slice(&test.inputs, (test.len(), test.dim), &Device::Cpu)?;
        let y = Tensor::from_slice(&test.labels, test.len(), &Device::Cpu)?;
        Ok(MlpEvaluator { arch, test, x, y })
    }

    fn layer_tensors(
        &self,
        model: &Model,
        masks: &MaskSet,
    ) -> Result<Vec<(Tensor, Option<Tensor>, Activation)>, EvalError> {
        let load = |name: &str| -> Result<Tensor, EvalError> {
            let t = find_float(model, name)?;
            let mut v = model.to_f32_vec(t);
            if let Some(m) = masks.get(name) {
                for (i, x) in v.iter_mut().enumerate() {
                    if !m.kept(i) {
                        *x = 0.0;
                    }
                }
            }
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

impl Evaluator for MlpEvaluator {
    fn describe(&self) -> String {
        format!("{} split, {} images", self.test.name, self.test.len())
    }

    fn evaluate(&self, model: &Model, masks: &MaskSet) -> Result<Metrics, EvalError> {
        let layers = self.layer_tensors(model, masks)?;
        let logits = mlp_forward(&self.x, &layers)?;
        metrics(&logits, &self.y)
    }
}

/// Accuracy and mean cross-entropy of logits against labels.
pub fn metrics(logits: &Tensor, y: &Tensor) -> Result<Metrics, EvalError> {
    let loss = candle_nn::loss::cross_entropy(logits, y)?.to_scalar::<f32>()? as f64;
    let pred = logits.argmax(1)?;
    let correct = pred
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let n = y.dims1()?;
    Ok(Metrics {
        accuracy: correct / n as f64,
        loss,
        samples: n,
    })
}
