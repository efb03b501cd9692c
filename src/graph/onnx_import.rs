//! ONNX → [`Graph`]: the graphs PyTorch exports for MLPs and CNNs, node by node.
//!
//! Anything outside the trainable set is refused with the node that stops it; such models
//! still evaluate through tract. The patterns handled are the ones `torch.onnx.export(...,
//! dynamo=False, do_constant_folding=False)` writes: `Gemm` with `transB=1` for a Linear on
//! 2-D input, `MatMul(x, Transpose(W))` plus `Add(b)` on higher ranks, `ReduceMean` over H and
//! W for a global average pool.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use super::{GRAPH_KIND, Graph, InputSpec, Node, Op};
use crate::model::Model;

pub(crate) fn attr<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

pub(crate) fn attr_i(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

pub(crate) fn attr_f(n: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

pub(crate) fn attr_ints(n: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

/// Integer values of a constant tensor (int64 or int32), from any of its encodings.
pub(crate) fn tensor_ints(t: &pb::TensorProto) -> Option<Vec<i64>> {
    match t.data_type {
        7 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        7 => Some(t.int64_data.clone()),
        6 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
        ),
        6 => Some(t.int32_data.iter().map(|&v| v as i64).collect()),
        _ => None,
    }
}

fn usize2(v: &[i64], what: &str, node: &str) -> Result<[usize; 2], String> {
    match v {
        [a, b] if *a > 0 && *b > 0 => Ok([*a as usize, *b as usize]),
        _ => Err(format!(
            "node '{node}': {what} {v:?} is not two positive values"
        )),
    }
}

/// Imports `proto` whose data inputs have the given per-sample shapes.
pub fn import(
    proto: &pb::ModelProto,
    model: &Model,
    inputs: &[(String, Vec<usize>)],
) -> Result<Graph, String> {
    let g = proto.graph.as_ref().ok_or("the file holds no graph")?;
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let is_float_init = |name: &str| {
        inits.contains(name)
            && model
                .find(name)
                .is_some_and(|t| model.tensors[t].analysable())
    };
    let int_init = |name: &str| -> Option<Vec<i64>> {
        let t = model.find(name)?;
        let e = &model.tensors[t];
        let b = model.tensor_bytes(t);
        match e.dtype {
            crate::model::DType::I64 => Some(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            crate::model::DType::I32 => Some(
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                    .collect(),
            ),
            _ => None,
        }
    };
    let mut consts: HashMap<String, Vec<i64>> = HashMap::new();
    let mut transposed: HashMap<String, String> = HashMap::new();
    let mut alias: HashMap<String, String> = HashMap::new();
    // Batched rank of every value, for axis arguments.
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (name, shape) in inputs {
        rank.insert(name.clone(), shape.len() + 1);
    }
    // Readers of each value (and the graph's outputs), so that folding an Add into a Linear's
    // bias is done only where no one else reads the product without the bias.
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *readers.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &g.output {
        *readers.entry(o.name.as_str()).or_default() += 1;
    }
    let mut nodes: Vec<Node> = Vec::new();
    // Value made by a Linear without bias → index in `nodes` (for folding a following Add).
    let mut biasless: HashMap<String, usize> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        let name = if n.name.is_empty() {
            format!("{}_{i}", n.op_type)
        } else {
            n.name.clone()
        };
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            return Err(format!(
                "node '{name}' is {} from domain '{}', which prunescope cannot train",
                n.op_type, n.domain
            ));
        }
        let resolve = |v: &str| alias.get(v).cloned().unwrap_or_else(|| v.to_string());
        let input = |k: usize| -> Result<String, String> {
            n.input
                .get(k)
                .filter(|s| !s.is_empty())
                .map(|s| resolve(s))
                .ok_or_else(|| format!("node '{name}' ({}) lacks input {k}", n.op_type))
        };
        let out = n
            .output
            .first()
            .cloned()
            .ok_or_else(|| format!("node '{name}' has no output"))?;
        let r = |v: &str| rank.get(v).copied();
        let unsupported = |why: &str| -> String { format!("node '{name}' ({}): {why}", n.op_type) };
        macro_rules! push {
            ($op:expr, $ins:expr, $rank:expr) => {{
                let (op, ins, out_rank) = ($op, $ins, $rank);
                rank.insert(out.clone(), out_rank);
                nodes.push(Node {
                    name: name.clone(),
                    op,
                    inputs: ins,
                    output: out.clone(),
                });
            }};
        }
        match n.op_type.as_str() {
            "Constant" => {
                let v = attr(n, "value")
                    .and_then(|a| a.t.as_ref())
                    .and_then(tensor_ints)
                    .ok_or_else(|| {
                        unsupported("only integer constants (shapes, axes) are supported")
                    })?;
                consts.insert(out, v);
            }
            "Identity" => {
                alias.insert(out, input(0)?);
            }
            "Transpose" => {
                let w = input(0)?;
                let perm = attr_ints(n, "perm").unwrap_or_default();
                if !(is_float_init(&w) && perm == [1, 0]) {
                    return Err(unsupported(
                        "only the transpose of a weight matrix is supported",
                    ));
                }
                transposed.insert(out, w);
            }
            "Gemm" => {
                let (x, w) = (input(0)?, input(1)?);
                if attr_f(n, "alpha", 1.0) != 1.0
                    || attr_f(n, "beta", 1.0) != 1.0
                    || attr_i(n, "transA", 0) != 0
                    || attr_i(n, "transB", 0) != 1
                    || !is_float_init(&w)
                {
                    return Err(unsupported(
                        "only Gemm(x, W, b) with transB=1 and a weight W (nn.Linear) is supported",
                    ));
                }
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    Some(b) if is_float_init(b) => Some(b.clone()),
                    Some(_) => return Err(unsupported("the bias is not a weight")),
                    None => None,
                };
                let rk = r(&x).unwrap_or(2);
                push!(Op::Linear { weight: w, bias }, vec![x], rk);
            }
            "MatMul" => {
                let (a, b) = (input(0)?, input(1)?);
                if let Some(w) = transposed.get(&b) {
                    let rk = r(&a).unwrap_or(2);
                    biasless.insert(out.clone(), nodes.len());
                    push!(
                        Op::Linear {
                            weight: w.clone(),
                            bias: None,
                        },
                        vec![a],
                        rk
                    );
                } else if inits.contains(b.as_str()) || inits.contains(a.as_str()) {
                    return Err(unsupported(
                        "a weight multiplied without the Transpose of nn.Linear is not supported",
                    ));
                } else {
                    let rk = r(&a).unwrap_or(2);
                    push!(Op::MatMul, vec![a, b], rk);
                }
            }
            "Add" => {
                let (a, b) = (input(0)?, input(1)?);
                let (value, weight) = match (is_float_init(&a), is_float_init(&b)) {
                    (false, false) => {
                        let rk = r(&a).max(r(&b)).unwrap_or(2);
                        push!(Op::Add, vec![a, b], rk);
                        continue;
                    }
                    (true, false) => (b, a),
                    (false, true) => (a, b),
                    (true, true) => return Err(unsupported("adds two weights")),
                };
                let Some(&k) = biasless.get(&value) else {
                    return Err(unsupported("only a Linear's bias can be added as a weight"));
                };
                let raw = n
                    .input
                    .iter()
                    .find(|v| resolve(v) == value)
                    .cloned()
                    .unwrap_or_default();
                if readers.get(raw.as_str()).copied().unwrap_or(0) != 1 {
                    return Err(unsupported(
                        "the product without its bias is read elsewhere; cannot fold the bias",
                    ));
                }
                let Op::Linear { weight: w, bias } = &mut nodes[k].op else {
                    return Err(unsupported("only a Linear's bias can be added as a weight"));
                };
                let out_f = model.find(w).map(|t| model.tensors[t].shape.clone());
                let b_shape = model.find(&weight).map(|t| model.tensors[t].shape.clone());
                match (out_f, b_shape) {
                    (Some(ws), Some(bs)) if ws.len() == 2 && bs == [ws[0]] => {
                        *bias = Some(weight);
                    }
                    _ => {
                        return Err(unsupported(
                            "adds a weight that is not a [out] bias of the preceding Linear",
                        ));
                    }
                }
                biasless.remove(&value);
                alias.insert(out.clone(), value.clone());
                if let Some(rk) = r(&value) {
                    rank.insert(out, rk);
                }
            }
            "Conv" => {
                let (x, w) = (input(0)?, input(1)?);
                if !is_float_init(&w) {
                    return Err(unsupported("the kernel is not a weight"));
                }
                let auto_pad = attr(n, "auto_pad")
                    .map(|a| String::from_utf8_lossy(&a.s).into_owned())
                    .unwrap_or_default();
                if !(auto_pad.is_empty() || auto_pad == "NOTSET") {
                    return Err(unsupported(
                        "auto_pad is not supported; export explicit pads",
                    ));
                }
                let pads = attr_ints(n, "pads").unwrap_or(vec![0; 4]);
                let [pt, pl, pb, pr] = pads[..] else {
                    return Err(unsupported("only 2-D convolutions are supported"));
                };
                if pt != pb || pl != pr || pt < 0 || pl < 0 {
                    return Err(unsupported("asymmetric padding is not supported"));
                }
                let stride = usize2(
                    &attr_ints(n, "strides").unwrap_or(vec![1, 1]),
                    "strides",
                    &name,
                )?;
                let dilation = usize2(
                    &attr_ints(n, "dilations").unwrap_or(vec![1, 1]),
                    "dilations",
                    &name,
                )?;
                let groups = attr_i(n, "group", 1).max(1) as usize;
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    Some(b) if is_float_init(b) => Some(b.clone()),
                    Some(_) => return Err(unsupported("the bias is not a weight")),
                    None => None,
                };
                push!(
                    Op::Conv2d {
                        weight: w,
                        bias,
                        stride,
                        padding: [pt as usize, pl as usize],
                        dilation,
                        groups,
                    },
                    vec![x],
                    4
                );
            }
            "BatchNormalization" => {
                if attr_i(n, "training_mode", 0) != 0 || n.output.len() > 1 {
                    return Err(unsupported(
                        "only inference-mode BatchNormalization is supported",
                    ));
                }
                let x = input(0)?;
                let p: Vec<String> = (1..5).map(&input).collect::<Result<_, _>>()?;
                if !p.iter().all(|t| is_float_init(t)) {
                    return Err(unsupported(
                        "its scale, bias, mean and variance must be weights",
                    ));
                }
                let rk = r(&x).unwrap_or(4);
                push!(
                    Op::BatchNorm {
                        weight: p[0].clone(),
                        bias: p[1].clone(),
                        running_mean: p[2].clone(),
                        running_var: p[3].clone(),
                        eps: attr_f(n, "epsilon", 1e-5) as f64,
                        // ONNX keeps the old statistics' share; PyTorch the new batch's.
                        momentum: 1.0 - attr_f(n, "momentum", 0.9) as f64,
                    },
                    vec![x],
                    rk
                );
            }
            op @ ("Relu" | "Tanh" | "Sigmoid" | "Gelu") => {
                if op == "Gelu"
                    && attr(n, "approximate").is_some_and(|a| a.s != b"none" && !a.s.is_empty())
                {
                    return Err(unsupported("only the exact (erf) GELU is supported"));
                }
                let x = input(0)?;
                let rk = r(&x).unwrap_or(2);
                let op = match op {
                    "Relu" => Op::Relu,
                    "Tanh" => Op::Tanh,
                    "Sigmoid" => Op::Sigmoid,
                    _ => Op::Gelu,
                };
                push!(op, vec![x], rk);
            }
            "Softmax" => {
                let x = input(0)?;
                let rk = r(&x).unwrap_or(2);
                let default = if opset >= 13 { -1 } else { 1 };
                let axis = attr_i(n, "axis", default);
                let last = axis == -1 || axis == rk as i64 - 1;
                // Before opset 13 Softmax flattened from `axis`: the same as the last
                // dimension only for 2-D input.
                if !last || (opset < 13 && rk != 2) {
                    return Err(unsupported(
                        "only a softmax over the last dimension is supported",
                    ));
                }
                push!(Op::Softmax, vec![x], rk);
            }
            "Dropout" => {
                let x = input(0)?;
                let p = match n.input.get(1).filter(|s| !s.is_empty()) {
                    Some(ratio) => {
                        let t = model.find(ratio);
                        match t.map(|t| model.to_f32_vec(t)) {
                            Some(v) if v.len() == 1 => v[0] as f64,
                            _ => return Err(unsupported("the ratio is not a constant")),
                        }
                    }
                    None => attr_f(n, "ratio", 0.5) as f64,
                };
                let rk = r(&x).unwrap_or(2);
                push!(Op::Dropout { p }, vec![x], rk);
            }
            op @ ("MaxPool" | "AveragePool") => {
                let x = input(0)?;
                let kernel = usize2(
                    &attr_ints(n, "kernel_shape").unwrap_or_default(),
                    "kernel_shape",
                    &name,
                )?;
                let stride = usize2(
                    &attr_ints(n, "strides").unwrap_or(vec![1, 1]),
                    "strides",
                    &name,
                )?;
                let pads = attr_ints(n, "pads").unwrap_or_default();
                let dil = attr_ints(n, "dilations").unwrap_or_default();
                let auto_pad = attr(n, "auto_pad")
                    .map(|a| String::from_utf8_lossy(&a.s).into_owned())
                    .unwrap_or_default();
                if !(auto_pad.is_empty() || auto_pad == "NOTSET" || auto_pad == "VALID")
                    || pads.iter().any(|&p| p != 0)
                    || dil.iter().any(|&d| d != 1)
                    || attr_i(n, "ceil_mode", 0) != 0
                    || n.output.len() > 1
                {
                    return Err(unsupported(
                        "only pools without padding, dilation or ceil_mode are supported",
                    ));
                }
                let op = if op == "MaxPool" {
                    Op::MaxPool { kernel, stride }
                } else {
                    Op::AvgPool { kernel, stride }
                };
                push!(op, vec![x], 4);
            }
            "GlobalAveragePool" => {
                let x = input(0)?;
                push!(Op::GlobalAvgPool { keep_dims: true }, vec![x], 4);
            }
            "ReduceMean" => {
                let x = input(0)?;
                let axes = match n.input.get(1).filter(|s| !s.is_empty()) {
                    Some(_) => {
                        let a = input(1)?;
                        consts.get(&a).cloned().or_else(|| int_init(&a))
                    }
                    None => attr_ints(n, "axes"),
                };
                let keep = attr_i(n, "keepdims", 1) != 0;
                let spatial = matches!(axes.as_deref(), Some([2, 3]) | Some([-2, -1]));
                if r(&x) != Some(4) || !spatial {
                    return Err(unsupported(
                        "only a mean over H and W of [N, C, H, W] (a global average pool) is \
                         supported",
                    ));
                }
                push!(
                    Op::GlobalAvgPool { keep_dims: keep },
                    vec![x],
                    if keep { 4 } else { 2 }
                );
            }
            "Flatten" => {
                let x = input(0)?;
                if attr_i(n, "axis", 1) != 1 {
                    return Err(unsupported("only Flatten from axis 1 is supported"));
                }
                push!(Op::Flatten, vec![x], 2);
            }
            "Reshape" => {
                let x = input(0)?;
                let s = input(1)?;
                let shape = consts
                    .get(&s)
                    .cloned()
                    .or_else(|| int_init(&s))
                    .ok_or_else(|| unsupported("the target shape is computed, not constant"))?;
                let per: Option<Vec<usize>> = match shape.split_first() {
                    Some((&b, rest)) if (b == -1 || b == 0) && rest.iter().all(|&d| d > 0) => {
                        Some(rest.iter().map(|&d| d as usize).collect())
                    }
                    _ => None,
                };
                let per = per.ok_or_else(|| {
                    unsupported(
                        "only a reshape that keeps the batch (first entry -1 or 0) is supported",
                    )
                })?;
                let rk = per.len() + 1;
                push!(Op::Reshape { shape: per }, vec![x], rk);
            }
            "LayerNormalization" => {
                let x = input(0)?;
                let rk = r(&x).unwrap_or(2);
                let axis = attr_i(n, "axis", -1);
                if !(axis == -1 || axis == rk as i64 - 1) || n.output.len() > 1 {
                    return Err(unsupported(
                        "only a layer norm over the last dimension is supported",
                    ));
                }
                let w = input(1)?;
                let bias = n.input.get(2).filter(|s| !s.is_empty()).cloned();
                if !is_float_init(&w) || bias.as_deref().is_some_and(|b| !is_float_init(b)) {
                    return Err(unsupported("its scale and bias must be weights"));
                }
                push!(
                    Op::LayerNorm {
                        weight: w,
                        bias,
                        eps: attr_f(n, "epsilon", 1e-5) as f64,
                    },
                    vec![x],
                    rk
                );
            }
            "Concat" => {
                let ins: Vec<String> = (0..n.input.len()).map(&input).collect::<Result<_, _>>()?;
                let rk = ins.first().and_then(|v| r(v)).unwrap_or(2);
                let mut axis = attr_i(n, "axis", 1);
                if axis < 0 {
                    axis += rk as i64;
                }
                if axis < 1 || ins.iter().any(|v| inits.contains(v.as_str())) {
                    return Err(unsupported(
                        "only concatenation of values along a non-batch axis",
                    ));
                }
                push!(
                    Op::Concat {
                        axis: axis as usize - 1
                    },
                    ins,
                    rk
                );
            }
            other => {
                return Err(format!(
                    "node '{name}' is {other}, which is not in prunescope's trainable set"
                ));
            }
        }
    }
    let output = g
        .output
        .first()
        .map(|o| {
            alias
                .get(&o.name)
                .cloned()
                .unwrap_or_else(|| o.name.clone())
        })
        .ok_or("the graph has no output")?;
    if g.output.len() > 1 {
        return Err("the graph has several outputs; only one-output graphs are trained".into());
    }
    let graph = Graph {
        kind: GRAPH_KIND.into(),
        inputs: inputs
            .iter()
            .map(|(name, shape)| InputSpec {
                name: name.clone(),
                shape: shape.clone(),
            })
            .collect(),
        nodes,
        output,
        dataset: None,
    };
    graph.check(model).map_err(|e| e.to_string())?;
    Ok(graph)
}
