//! A small typed graph that prunescope can run forward and backward on candle: the layers of
//! common CNNs and MLPs. Fine-tuning and gradient-based criteria build on it; ONNX graphs whose
//! operators all fall in this set are imported into it ([`onnx_import`]).
//!
//! The description is JSON (in a safetensors file's `prunescope.arch` metadata, or a sidecar
//! `MODEL.arch.json`); weights are referred to by tensor name. Shapes are per sample: the batch
//! dimension is implicit everywhere.

pub mod fast;
pub mod onnx_import;

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::Model;

mod groups;
pub use groups::{Blocked, Group, Groups, Member, dependency_groups};

/// The `kind` of a graph description (the MLP description says "mlp").
pub const GRAPH_KIND: &str = "graph";

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("graph description: {0}")]
    Json(String),
    #[error("node '{node}': {msg}")]
    Node { node: String, msg: String },
    #[error("node '{node}', tensor '{tensor}': {msg}")]
    Tensor {
        node: String,
        tensor: String,
        msg: String,
    },
    #[error("{0}")]
    Compute(String),
}

impl From<candle_core::Error> for GraphError {
    fn from(e: candle_core::Error) -> Self {
        GraphError::Compute(e.to_string())
    }
}

fn one2() -> [usize; 2] {
    [1, 1]
}
fn one() -> usize {
    1
}
fn bn_eps() -> f64 {
    1e-5
}
fn bn_momentum() -> f64 {
    0.1
}

/// One operation. Weights are tensor names in the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `x Wᵀ + b` over the last dimension, W in PyTorch's `[out, in]` layout.
    Linear {
        weight: String,
        #[serde(default)]
        bias: Option<String>,
    },
    /// 2-D convolution of `[C, H, W]` samples; W is `[out, in / groups, kh, kw]`.
    Conv2d {
        weight: String,
        #[serde(default)]
        bias: Option<String>,
        #[serde(default = "one2")]
        stride: [usize; 2],
        #[serde(default)]
        padding: [usize; 2],
        #[serde(default = "one2")]
        dilation: [usize; 2],
        #[serde(default = "one")]
        groups: usize,
    },
    /// Batch normalisation over channels (dimension 0 of a sample). Inference uses the running
    /// statistics; training uses the batch's and updates the running ones (PyTorch's momentum).
    BatchNorm {
        weight: String,
        bias: String,
        running_mean: String,
        running_var: String,
        #[serde(default = "bn_eps")]
        eps: f64,
        #[serde(default = "bn_momentum")]
        momentum: f64,
    },
    Relu,
    /// The exact (erf) GELU, PyTorch's default.
    Gelu,
    Tanh,
    Sigmoid,
    MaxPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    AvgPool {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    /// Mean over the spatial dimensions: `[C, H, W]` → `[C]` (or `[C, 1, 1]` with keep_dims).
    GlobalAvgPool {
        #[serde(default)]
        keep_dims: bool,
    },
    /// Everything but the batch into one dimension.
    Flatten,
    /// To the given per-sample shape (same number of elements).
    Reshape {
        shape: Vec<usize>,
    },
    /// Zeroes a fraction p of the activations in training (scaled by 1/(1−p)); identity in
    /// inference.
    Dropout {
        p: f64,
    },
    /// Normalisation over the last dimension.
    LayerNorm {
        weight: String,
        #[serde(default)]
        bias: Option<String>,
        #[serde(default = "bn_eps")]
        eps: f64,
    },
    /// Softmax over the last dimension.
    Softmax,
    Add,
    /// Concatenation along a per-sample axis (0 = the first dimension after the batch).
    Concat {
        axis: usize,
    },
    /// Matrix product of two values (batched over every leading dimension).
    MatMul,
}

impl Op {
    pub fn label(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::Conv2d { .. } => "conv2d",
            Op::BatchNorm { .. } => "batch_norm",
            Op::Relu => "relu",
            Op::Gelu => "gelu",
            Op::Tanh => "tanh",
            Op::Sigmoid => "sigmoid",
            Op::MaxPool { .. } => "max_pool",
            Op::AvgPool { .. } => "avg_pool",
            Op::GlobalAvgPool { .. } => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::Reshape { .. } => "reshape",
            Op::Dropout { .. } => "dropout",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Softmax => "softmax",
            Op::Add => "add",
            Op::Concat { .. } => "concat",
            Op::MatMul => "matmul",
        }
    }

    /// The weights this op reads, with their role.
    pub fn params(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        match self {
            Op::Linear { weight, bias } | Op::Conv2d { weight, bias, .. } => {
                v.push(("weight", weight.as_str()));
                if let Some(b) = bias {
                    v.push(("bias", b.as_str()));
                }
            }
            Op::BatchNorm {
                weight,
                bias,
                running_mean,
                running_var,
                ..
            } => {
                v.push(("weight", weight.as_str()));
                v.push(("bias", bias.as_str()));
                v.push(("running_mean", running_mean.as_str()));
                v.push(("running_var", running_var.as_str()));
            }
            Op::LayerNorm { weight, bias, .. } => {
                v.push(("weight", weight.as_str()));
                if let Some(b) = bias {
                    v.push(("bias", b.as_str()));
                }
            }
            _ => {}
        }
        v
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    #[serde(flatten)]
    pub op: Op,
    pub inputs: Vec<String>,
    pub output: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    /// Per-sample shape.
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// Always "graph".
    pub kind: String,
    pub inputs: Vec<InputSpec>,
    pub nodes: Vec<Node>,
    /// The value the graph returns.
    pub output: String,
    /// The dataset whose test split measures this model ("uci-digits"), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

/// Looks up a weight's shape for shape inference: (node, tensor) → shape.
pub type ParamShape<'a> = &'a dyn Fn(&str, &str) -> Result<Vec<usize>, GraphError>;

/// Inference, or training (batch statistics, dropout with a seeded mask).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

/// Trainable and running tensors by name, as candle tensors.
pub type Params = HashMap<String, Tensor>;

/// New running statistics computed by BatchNorm in training mode: (tensor name, value).
pub type RunningUpdates = Vec<(String, Tensor)>;

impl Graph {
    /// Parses a description, naming the node whose entry is malformed.
    pub fn from_json(s: &str) -> Result<Graph, GraphError> {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| GraphError::Json(e.to_string()))?;
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != GRAPH_KIND {
            return Err(GraphError::Json(format!(
                "kind '{kind}' is not '{GRAPH_KIND}'"
            )));
        }
        let nodes = v
            .get("nodes")
            .and_then(|n| n.as_array())
            .ok_or_else(|| GraphError::Json("no 'nodes' list".into()))?;
        for (i, n) in nodes.iter().enumerate() {
            if let Err(e) = serde_json::from_value::<Node>(n.clone()) {
                let name = n
                    .get("name")
                    .and_then(|x| x.as_str())
                    .map_or(format!("#{i}"), str::to_string);
                return Err(GraphError::Node {
                    node: name,
                    msg: e.to_string(),
                });
            }
        }
        serde_json::from_value(v).map_err(|e| GraphError::Json(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a graph always serialises")
    }

    /// Checks the graph against the model's tensors and infers every value's per-sample shape.
    /// Returns the output's per-sample shape.
    pub fn check(&self, model: &Model) -> Result<Vec<usize>, GraphError> {
        let shape_of = |node: &str, name: &str| -> Result<Vec<usize>, GraphError> {
            let t = model.find(name).ok_or_else(|| GraphError::Tensor {
                node: node.into(),
                tensor: name.into(),
                msg: "missing from the model".into(),
            })?;
            if !model.tensors[t].analysable() {
                return Err(GraphError::Tensor {
                    node: node.into(),
                    tensor: name.into(),
                    msg: format!("dtype {} is not a float type", model.tensors[t].dtype),
                });
            }
            Ok(model.tensors[t].shape.clone())
        };
        self.infer(&|node, name| shape_of(node, name))
    }

    /// Shape inference with weight shapes from `param_shape(node, tensor)`.
    pub fn infer(&self, param_shape: ParamShape) -> Result<Vec<usize>, GraphError> {
        let shapes = self.infer_all(param_shape)?;
        shapes
            .get(self.output.as_str())
            .cloned()
            .ok_or_else(|| GraphError::Json(format!("the output '{}' is never made", self.output)))
    }

    /// How many times each weight of a Linear or Conv2d is multiplied per sample (its
    /// multiply-adds per sample are this times its non-zero weights): the positions a Linear
    /// sees (tokens), the output pixels of a convolution.
    pub fn weight_uses(&self, model: &Model) -> Result<Vec<(String, f64)>, GraphError> {
        let shape_of = |_: &str, name: &str| -> Result<Vec<usize>, GraphError> {
            model
                .find(name)
                .map(|t| model.tensors[t].shape.clone())
                .ok_or_else(|| GraphError::Json(format!("tensor '{name}' is missing")))
        };
        let shapes = self.infer_all(&shape_of)?;
        let mut uses = Vec::new();
        for n in &self.nodes {
            let input = n.inputs.first().and_then(|v| shapes.get(v.as_str()));
            let output = shapes.get(n.output.as_str());
            match (&n.op, input, output) {
                (Op::Linear { weight, .. }, Some(x), _) => {
                    let positions: usize = x[..x.len().saturating_sub(1)].iter().product();
                    uses.push((weight.clone(), positions as f64));
                }
                (Op::Conv2d { weight, .. }, _, Some(y)) if y.len() == 3 => {
                    uses.push((weight.clone(), (y[1] * y[2]) as f64));
                }
                _ => {}
            }
        }
        Ok(uses)
    }

    /// Gives `derived` (new weights made from `original`: compacted, updated) `original`'s
    /// metadata, and, where `original` is ONNX, this graph as its description, so the
    /// safetensors it is written to runs wherever prunescope does.
    pub fn describe_in(&self, derived: &mut Model, original: &Model) {
        derived.metadata = original.metadata.clone();
        if original.format == crate::model::ModelFormat::Onnx {
            derived
                .metadata
                .insert(crate::eval::ARCH_METADATA_KEY.into(), self.to_json());
        }
    }

    /// The dependency groups of this graph over `model`'s tensors (see [`dependency_groups`]).
    pub fn dependency_groups(&self, model: &Model) -> Result<Groups, GraphError> {
        dependency_groups(self, &|node, name| {
            model
                .find(name)
                .map(|t| model.tensors[t].shape.clone())
                .ok_or_else(|| GraphError::Tensor {
                    node: node.into(),
                    tensor: name.into(),
                    msg: "missing from the model".into(),
                })
        })
    }

    /// Every value's per-sample shape.
    fn infer_all<'g>(
        &'g self,
        param_shape: ParamShape,
    ) -> Result<HashMap<&'g str, Vec<usize>>, GraphError> {
        let mut shapes: HashMap<&str, Vec<usize>> = HashMap::new();
        for i in &self.inputs {
            shapes.insert(&i.name, i.shape.clone());
        }
        for n in &self.nodes {
            let err = |msg: String| GraphError::Node {
                node: n.name.clone(),
                msg,
            };
            let terr = |tensor: &str, msg: String| GraphError::Tensor {
                node: n.name.clone(),
                tensor: tensor.into(),
                msg,
            };
            let mut ins = Vec::new();
            for v in &n.inputs {
                ins.push(
                    shapes
                        .get(v.as_str())
                        .cloned()
                        .ok_or_else(|| err(format!("reads '{v}', which no earlier node makes")))?,
                );
            }
            let arity = match n.op {
                Op::Add | Op::MatMul => 2,
                Op::Concat { .. } => ins.len().max(2),
                _ => 1,
            };
            if ins.len() != arity {
                return Err(err(format!(
                    "{} takes {arity} input(s), not {}",
                    n.op.label(),
                    ins.len()
                )));
            }
            let x = &ins[0];
            let p = |role: &str| -> Result<Vec<usize>, GraphError> {
                let name =
                    n.op.params()
                        .into_iter()
                        .find(|(r, _)| *r == role)
                        .map(|(_, t)| t)
                        .expect("role exists");
                param_shape(&n.name, name)
            };
            let pname = |role: &str| -> String {
                n.op.params()
                    .into_iter()
                    .find(|(r, _)| *r == role)
                    .map(|(_, t)| t.to_string())
                    .unwrap_or_default()
            };
            let out: Vec<usize> = match &n.op {
                Op::Linear { bias, .. } => {
                    let w = p("weight")?;
                    let last = *x.last().ok_or_else(|| err("input is a scalar".into()))?;
                    if w.len() != 2 || w[1] != last {
                        return Err(terr(
                            &pname("weight"),
                            format!("shape {w:?} does not take {last} inputs ([out, {last}])"),
                        ));
                    }
                    if bias.is_some() && p("bias")? != [w[0]] {
                        return Err(terr(
                            &pname("bias"),
                            format!("shape {:?} is not [{}]", p("bias")?, w[0]),
                        ));
                    }
                    let mut o = x.clone();
                    *o.last_mut().expect("not scalar") = w[0];
                    o
                }
                Op::Conv2d {
                    bias,
                    stride,
                    padding,
                    dilation,
                    groups,
                    ..
                } => {
                    let w = p("weight")?;
                    if x.len() != 3 {
                        return Err(err(format!("input {x:?} is not [C, H, W]")));
                    }
                    if *groups == 0 || stride.contains(&0) || dilation.contains(&0) {
                        return Err(err("groups, stride and dilation must be ≥ 1".into()));
                    }
                    if w.len() != 4
                        || w[1] * groups != x[0]
                        || w[0] % groups != 0
                        || w[2] == 0
                        || w[3] == 0
                    {
                        return Err(terr(
                            &pname("weight"),
                            format!(
                                "shape {w:?} does not fit {} input channels in {groups} group(s)",
                                x[0]
                            ),
                        ));
                    }
                    if bias.is_some() && p("bias")? != [w[0]] {
                        return Err(terr(&pname("bias"), format!("shape is not [{}]", w[0])));
                    }
                    let mut o = vec![w[0]];
                    for d in 0..2 {
                        let span = dilation[d] * (w[2 + d] - 1) + 1;
                        let padded = x[1 + d] + 2 * padding[d];
                        if padded < span {
                            return Err(err(format!(
                                "kernel {:?} is larger than the padded input {x:?}",
                                &w[2..]
                            )));
                        }
                        o.push((padded - span) / stride[d] + 1);
                    }
                    o
                }
                Op::BatchNorm { .. } => {
                    let c = *x.first().ok_or_else(|| err("input is a scalar".into()))?;
                    for role in ["weight", "bias", "running_mean", "running_var"] {
                        if p(role)? != [c] {
                            return Err(terr(
                                &pname(role),
                                format!("shape {:?} is not [{c}] (one per channel)", p(role)?),
                            ));
                        }
                    }
                    x.clone()
                }
                Op::LayerNorm { bias, .. } => {
                    let last = *x.last().ok_or_else(|| err("input is a scalar".into()))?;
                    if p("weight")? != [last] {
                        return Err(terr(&pname("weight"), format!("shape is not [{last}]")));
                    }
                    if bias.is_some() && p("bias")? != [last] {
                        return Err(terr(&pname("bias"), format!("shape is not [{last}]")));
                    }
                    x.clone()
                }
                Op::Relu | Op::Gelu | Op::Tanh | Op::Sigmoid | Op::Softmax | Op::Dropout { .. } => {
                    if let Op::Dropout { p } = n.op
                        && !(0.0..1.0).contains(&p)
                    {
                        return Err(err(format!("dropout p = {p} is outside [0, 1)")));
                    }
                    x.clone()
                }
                Op::MaxPool { kernel, stride } | Op::AvgPool { kernel, stride } => {
                    if x.len() != 3 {
                        return Err(err(format!("input {x:?} is not [C, H, W]")));
                    }
                    if kernel.contains(&0) || stride.contains(&0) {
                        return Err(err("kernel and stride must be ≥ 1".into()));
                    }
                    if x[1] < kernel[0] || x[2] < kernel[1] {
                        return Err(err(format!("kernel {kernel:?} is larger than {x:?}")));
                    }
                    vec![
                        x[0],
                        (x[1] - kernel[0]) / stride[0] + 1,
                        (x[2] - kernel[1]) / stride[1] + 1,
                    ]
                }
                Op::GlobalAvgPool { keep_dims } => {
                    if x.len() != 3 {
                        return Err(err(format!("input {x:?} is not [C, H, W]")));
                    }
                    if *keep_dims {
                        vec![x[0], 1, 1]
                    } else {
                        vec![x[0]]
                    }
                }
                Op::Flatten => vec![x.iter().product()],
                Op::Reshape { shape } => {
                    if shape.iter().product::<usize>() != x.iter().product::<usize>() {
                        return Err(err(format!("cannot reshape {x:?} to {shape:?}")));
                    }
                    shape.clone()
                }
                Op::Add => {
                    if ins[0] != ins[1] {
                        return Err(err(format!(
                            "adds {:?} and {:?}: shapes must be equal",
                            ins[0], ins[1]
                        )));
                    }
                    x.clone()
                }
                Op::Concat { axis } => {
                    let mut o = x.clone();
                    if *axis >= o.len() {
                        return Err(err(format!("axis {axis} is outside {x:?}")));
                    }
                    for s in &ins[1..] {
                        let same_rest = s.len() == x.len()
                            && s.iter()
                                .zip(x)
                                .enumerate()
                                .all(|(d, (a, b))| d == *axis || a == b);
                        if !same_rest {
                            return Err(err(format!("cannot concatenate {x:?} and {s:?}")));
                        }
                        o[*axis] += s[*axis];
                    }
                    o
                }
                Op::MatMul => {
                    let (a, b) = (&ins[0], &ins[1]);
                    let ok = a.len() == b.len()
                        && !a.is_empty()
                        && a[..a.len() - 1].len() == b[..b.len() - 1].len()
                        && a.len() >= 2
                        && a[..a.len() - 2] == b[..b.len() - 2]
                        && a[a.len() - 1] == b[b.len() - 2];
                    if !ok {
                        return Err(err(format!("cannot multiply {a:?} by {b:?}")));
                    }
                    let mut o = a.clone();
                    *o.last_mut().expect("rank ≥ 2") = b[b.len() - 1];
                    o
                }
            };
            if shapes.insert(&n.output, out).is_some() {
                return Err(err(format!(
                    "writes '{}', which already has a value",
                    n.output
                )));
            }
        }
        Ok(shapes)
    }

    /// Every tensor the graph reads, in order of first use.
    pub fn param_names(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for n in &self.nodes {
            for (_, t) in n.op.params() {
                if !seen.iter().any(|s: &String| s == t) {
                    seen.push(t.to_string());
                }
            }
        }
        seen
    }

    /// The tensors training updates by gradient (not BatchNorm's running statistics).
    pub fn trainable_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for n in &self.nodes {
            for (role, t) in n.op.params() {
                if !role.starts_with("running") && !v.iter().any(|s: &String| s == t) {
                    v.push(t.to_string());
                }
            }
        }
        v
    }

    /// Runs the graph on batched inputs (`[B, …per-sample shape]`, in the order of
    /// [`Graph::inputs`]). Returns the output and, in training, BatchNorm's new running
    /// statistics.
    pub fn forward(
        &self,
        inputs: &[Tensor],
        params: &Params,
        mode: Mode,
    ) -> Result<(Tensor, RunningUpdates), GraphError> {
        self.forward_observed(inputs, params, mode, &mut |_, _| {})
    }

    /// [`Graph::forward`], showing `observe` each node with its first input before it runs
    /// (calibration reads the inputs of Linear and Conv2d layers this way).
    pub fn forward_observed(
        &self,
        inputs: &[Tensor],
        params: &Params,
        mode: Mode,
        observe: &mut dyn FnMut(&Node, &Tensor),
    ) -> Result<(Tensor, RunningUpdates), GraphError> {
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        for (spec, t) in self.inputs.iter().zip(inputs) {
            values.insert(&spec.name, t.clone());
        }
        let mut updates = Vec::new();
        for (k, n) in self.nodes.iter().enumerate() {
            let get = |v: &str| -> Result<&Tensor, GraphError> {
                values.get(v).ok_or_else(|| GraphError::Node {
                    node: n.name.clone(),
                    msg: format!("reads '{v}', which has no value"),
                })
            };
            let w = |name: &str| -> Result<&Tensor, GraphError> {
                params.get(name).ok_or_else(|| GraphError::Tensor {
                    node: n.name.clone(),
                    tensor: name.into(),
                    msg: "no value given".into(),
                })
            };
            let x = get(&n.inputs[0])?;
            observe(n, x);
            let out = match &n.op {
                Op::Linear { weight, bias } => {
                    let y = x.broadcast_matmul(&w(weight)?.t()?)?;
                    match bias {
                        Some(b) => y.broadcast_add(w(b)?)?,
                        None => y,
                    }
                }
                Op::Conv2d {
                    weight,
                    bias,
                    stride,
                    padding,
                    dilation,
                    groups,
                } => {
                    let kernel = w(weight)?;
                    if stride[0] != stride[1] || dilation[0] != dilation[1] {
                        return Err(GraphError::Node {
                            node: n.name.clone(),
                            msg: "unequal strides or dilations along H and W are not supported"
                                .into(),
                        });
                    }
                    let (xp, pad) = if padding[0] == padding[1] {
                        (x.clone(), padding[0])
                    } else {
                        (
                            x.pad_with_zeros(2, padding[0], padding[0])?
                                .pad_with_zeros(3, padding[1], padding[1])?,
                            0,
                        )
                    };
                    let y = xp.conv2d(kernel, pad, stride[0], dilation[0], *groups)?;
                    match bias {
                        Some(b) => y.broadcast_add(&w(b)?.reshape(((), 1, 1))?)?,
                        None => y,
                    }
                }
                Op::BatchNorm {
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    eps,
                    momentum,
                } => {
                    let rank = x.rank();
                    // Per-channel vectors shaped to broadcast over [B, C, …].
                    let shape: Vec<usize> = (0..rank)
                        .map(|d| if d == 1 { x.dim(1).unwrap_or(1) } else { 1 })
                        .collect();
                    let chan = |t: &Tensor| t.reshape(shape.as_slice());
                    let (mean, var) = match mode {
                        Mode::Eval => (chan(w(running_mean)?)?, chan(w(running_var)?)?),
                        Mode::Train { .. } => {
                            let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
                            let mean = x.mean_keepdim(dims.as_slice())?;
                            let centered = x.broadcast_sub(&mean)?;
                            let var = centered.sqr()?.mean_keepdim(dims.as_slice())?;
                            let count = x.elem_count() / x.dim(1)?;
                            // PyTorch keeps the unbiased variance as the running one.
                            let unbiased = (var.flatten_all()?.detach()
                                * (count as f64 / (count.max(2) - 1) as f64))?;
                            let m = *momentum;
                            updates.push((
                                running_mean.clone(),
                                ((w(running_mean)? * (1.0 - m))?
                                    + (mean.flatten_all()?.detach() * m)?)?,
                            ));
                            updates.push((
                                running_var.clone(),
                                ((w(running_var)? * (1.0 - m))? + (unbiased * m)?)?,
                            ));
                            (mean, var)
                        }
                    };
                    let norm = x
                        .broadcast_sub(&mean)?
                        .broadcast_div(&(var + *eps)?.sqrt()?)?;
                    norm.broadcast_mul(&chan(w(weight)?)?)?
                        .broadcast_add(&chan(w(bias)?)?)?
                }
                Op::LayerNorm { weight, bias, eps } => {
                    let mean = x.mean_keepdim(D::Minus1)?;
                    let centered = x.broadcast_sub(&mean)?;
                    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                    let y = centered
                        .broadcast_div(&(var + *eps)?.sqrt()?)?
                        .broadcast_mul(w(weight)?)?;
                    match bias {
                        Some(b) => y.broadcast_add(w(b)?)?,
                        None => y,
                    }
                }
                Op::Relu => x.relu()?,
                Op::Gelu => x.gelu_erf()?,
                Op::Tanh => x.tanh()?,
                Op::Sigmoid => {
                    // 1 / (1 + e^(−x)), from differentiable primitives.
                    (x.neg()?.exp()? + 1.0)?.recip()?
                }
                Op::Softmax => {
                    let max = x.max_keepdim(D::Minus1)?.detach();
                    let e = x.broadcast_sub(&max)?.exp()?;
                    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
                }
                Op::MaxPool { kernel, stride } => {
                    x.max_pool2d_with_stride((kernel[0], kernel[1]), (stride[0], stride[1]))?
                }
                Op::AvgPool { kernel, stride } => {
                    x.avg_pool2d_with_stride((kernel[0], kernel[1]), (stride[0], stride[1]))?
                }
                Op::GlobalAvgPool { keep_dims } => {
                    if *keep_dims {
                        x.mean_keepdim((2, 3))?
                    } else {
                        x.mean((2, 3))?
                    }
                }
                Op::Flatten => x.flatten_from(1)?,
                Op::Reshape { shape } => {
                    let mut s = vec![x.dim(0)?];
                    s.extend(shape);
                    x.reshape(s)?
                }
                Op::Dropout { p } => match mode {
                    Mode::Eval => x.clone(),
                    Mode::Train { seed } if *p > 0.0 => {
                        let mut rng = crate::util::SplitMix64::new(
                            seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                        );
                        let keep = 1.0 / (1.0 - p);
                        let mask: Vec<f32> = (0..x.elem_count())
                            .map(|_| {
                                if rng.next_f64() < *p {
                                    0.0
                                } else {
                                    keep as f32
                                }
                            })
                            .collect();
                        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
                        (x * mask)?
                    }
                    Mode::Train { .. } => x.clone(),
                },
                Op::Add => (x + get(&n.inputs[1])?)?,
                Op::Concat { axis } => {
                    let parts: Vec<&Tensor> =
                        n.inputs.iter().map(|v| get(v)).collect::<Result<_, _>>()?;
                    Tensor::cat(&parts, axis + 1)?
                }
                Op::MatMul => x.matmul(get(&n.inputs[1])?)?,
            };
            values.insert(&n.output, out);
        }
        let out = values.remove(self.output.as_str()).ok_or_else(|| {
            GraphError::Json(format!("the output '{}' is never made", self.output))
        })?;
        Ok((out, updates))
    }
}

/// Loads the graph's tensors from the model as f32 candle tensors, with masks applied.
pub fn load_params(
    graph: &Graph,
    model: &Model,
    masks: Option<&crate::prune::MaskSet>,
    device: &Device,
) -> Result<Params, GraphError> {
    let mut params = Params::new();
    for name in graph.param_names() {
        let t = model.find(&name).ok_or_else(|| GraphError::Tensor {
            node: "(weights)".into(),
            tensor: name.clone(),
            msg: "missing from the model".into(),
        })?;
        let v = crate::prune::masked_f32(model, t, masks);
        let tensor = Tensor::from_vec(v, model.tensors[t].shape.as_slice(), device)?;
        params.insert(name, tensor.to_dtype(DType::F32)?);
    }
    Ok(params)
}
