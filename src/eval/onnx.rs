//! ONNX graphs evaluated by tract.
//!
//! The graph is parsed once. The prunable initializers become graph inputs, so a change of masks
//! passes new weights to the same optimized plan instead of rebuilding it (rebuilding a
//! transformer costs 70–170 ms; see STACK-NOTES). Every initializer's bytes come from the opened
//! [`Model`], never from files tract would read itself, so external data is checked once, by the
//! model reader.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prost::Message;
use tract_linalg::multithread::{Executor, multithread_tract_scope};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::{Engine, EvalError, Outputs, Runner};
use crate::data::{ArrayValues, EvalData};
use crate::model::Model;
use crate::prune::{Mask, MaskSet};

/// Largest number of input elements in one batch: keeps a transformer's activations in the
/// hundreds of megabytes while small models take the whole data set in one run.
const BATCH_ELEMENTS: usize = 1 << 16;

/// A graph input that data feeds.
#[derive(Clone, Debug)]
pub struct DataInput {
    pub name: String,
    /// ONNX element type code (1 float, 7 int64, …).
    pub elem_type: i32,
    /// Declared dimensions: `Some(n)` fixed, `None` symbolic; `None` overall when undeclared.
    pub dims: Option<Vec<Option<usize>>>,
}

impl DataInput {
    /// Values per sample when every dimension after the first is fixed.
    pub fn fixed_sample_len(&self) -> Option<usize> {
        let dims = self.dims.as_ref()?;
        dims.get(1..)?.iter().copied().product::<Option<usize>>()
    }

    fn describe(&self) -> String {
        let dims = match &self.dims {
            None => "any shape".to_string(),
            Some(d) => format!(
                "[{}]",
                d.iter()
                    .map(|x| x.map_or("?".to_string(), |v| v.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!("'{}' {} {}", self.name, elem_name(self.elem_type), dims)
    }
}

/// The parsed graph, with the initializers' bytes left out (they come from the model).
pub struct GraphInfo {
    proto: pb::ModelProto,
    pub data_inputs: Vec<DataInput>,
    path: String,
}

impl GraphInfo {
    pub fn read(model: &Model) -> Result<GraphInfo, EvalError> {
        let path = model
            .source
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| model.display_name());
        let gerr = |msg: String| EvalError::Graph {
            path: path.clone(),
            msg,
        };
        let mut proto = pb::ModelProto::decode(model.backing_bytes())
            .map_err(|e| gerr(format!("not a valid ONNX protobuf: {e}")))?;
        let g = proto
            .graph
            .as_mut()
            .ok_or_else(|| gerr("the file holds no graph".into()))?;
        let mut init_names = BTreeSet::new();
        for t in &mut g.initializer {
            // The model holds these bytes already (external data included): keep the clone
            // cheap and keep tract away from the file system.
            t.raw_data = Vec::new();
            t.float_data = Vec::new();
            t.int32_data = Vec::new();
            t.int64_data = Vec::new();
            t.double_data = Vec::new();
            t.uint64_data = Vec::new();
            t.external_data = Vec::new();
            t.data_location = None;
            if model.find(&t.name).is_none() {
                return Err(gerr(format!(
                    "initializer '{}' was not read with the model",
                    t.name
                )));
            }
            init_names.insert(t.name.clone());
        }
        let data_inputs: Vec<DataInput> = g
            .input
            .iter()
            .filter(|i| !init_names.contains(&i.name))
            .map(|i| {
                let tensor = match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                    Some(pb::type_proto::Value::TensorType(t)) => Some(t),
                    _ => None,
                };
                DataInput {
                    name: i.name.clone(),
                    elem_type: tensor.map_or(1, |t| t.elem_type),
                    dims: tensor.and_then(|t| t.shape.as_ref()).map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match d.value {
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v))
                                    if v > 0 =>
                                {
                                    Some(v as usize)
                                }
                                _ => None,
                            })
                            .collect()
                    }),
                }
            })
            .collect();
        if data_inputs.is_empty() {
            return Err(gerr("the graph has no inputs to feed data to".into()));
        }
        if g.output.is_empty() {
            return Err(gerr("the graph has no outputs".into()));
        }
        Ok(GraphInfo {
            proto,
            data_inputs,
            path,
        })
    }

    /// Imports the graph into prunescope's graph with the given per-sample input shapes.
    pub fn import(
        &self,
        model: &Model,
        shapes: &[(String, Vec<usize>)],
    ) -> Result<crate::graph::Graph, String> {
        crate::graph::onnx_import::import(&self.proto, model, shapes)
    }

    /// Every 2-D initializer that a MatMul or Gemm multiplies an activation by: what Wanda
    /// needs to collect through tract. PyTorch's Linear reaches its MatMul through a Transpose
    /// ([out, in], input features along the columns); a plain initializer is [in, out].
    pub fn matmul_weights(&self, model: &Model) -> Vec<MatmulWeight> {
        let Some(g) = self.proto.graph.as_ref() else {
            return Vec::new();
        };
        let inits: BTreeSet<&str> = g.initializer.iter().map(|i| i.name.as_str()).collect();
        let transposed: HashMap<&str, &str> = g
            .node
            .iter()
            .filter(|n| n.op_type == "Transpose" && n.input.len() == 1 && n.output.len() == 1)
            .filter(|n| inits.contains(n.input[0].as_str()))
            .filter(|n| {
                n.attribute
                    .iter()
                    .find(|a| a.name == "perm")
                    .is_none_or(|a| a.ints == [1, 0])
            })
            .map(|n| (n.output[0].as_str(), n.input[0].as_str()))
            .collect();
        let flag = |n: &pb::NodeProto, name: &str| {
            n.attribute
                .iter()
                .find(|a| a.name == name)
                .is_some_and(|a| a.i != 0)
        };
        let mut out = Vec::new();
        for n in &g.node {
            let gemm = n.op_type == "Gemm";
            if !(n.op_type == "MatMul" || gemm) || n.input.len() < 2 || (gemm && flag(n, "transA"))
            {
                continue;
            }
            let b = n.input[1].as_str();
            let (name, mut in_on_columns) = match transposed.get(b) {
                Some(w) => (*w, true),
                None if inits.contains(b) => (b, false),
                None => continue,
            };
            if gemm && flag(n, "transB") {
                in_on_columns = !in_on_columns;
            }
            let Some(t) = model.find(name) else { continue };
            if model.tensors[t].shape.len() != 2 || inits.contains(n.input[0].as_str()) {
                continue;
            }
            // A Gemm adds its bias itself: it belongs to the weight's output features.
            let bias = n
                .input
                .get(2)
                .filter(|b| gemm && inits.contains(b.as_str()))
                .cloned();
            out.push(MatmulWeight {
                tensor: t,
                activation: n.input[0].clone(),
                output: n.output.first().cloned().unwrap_or_default(),
                in_on_columns,
                bias,
            });
        }
        out
    }

    /// The attention heads of the graph, as dependency groups: wherever the query, key and
    /// value projections are each split by a Reshape into H heads of D features, and an output
    /// projection reads the heads' merged context, head h is the D output features
    /// h·D..(h+1)·D of the three projections (weights and biases) with the same D input
    /// features of the output projection (the group's last member). Each group's `channels`
    /// counts heads.
    pub fn attention_groups(&self, model: &Model) -> Vec<crate::graph::Group> {
        self.attention_blocks(model)
            .into_iter()
            .map(|b| b.group)
            .collect()
    }

    /// [`GraphInfo::attention_groups`], each with why the graph could not run with fewer
    /// heads, if it could not: a Reshape that splits the heads with anything but `-1` for
    /// their count (a constant, or a value computed at run time, which prunescope cannot
    /// follow), or one that merges them into a constant width.
    pub fn attention_blocks(&self, model: &Model) -> Vec<AttentionBlock> {
        use crate::graph::{Group, Member};
        let Some(g) = self.proto.graph.as_ref() else {
            return Vec::new();
        };
        let weights = self.matmul_weights(model);
        let producer: HashMap<&str, &pb::NodeProto> = g
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
            .collect();
        let mut consumers: HashMap<&str, Vec<&pb::NodeProto>> = HashMap::new();
        for n in &g.node {
            for i in &n.input {
                consumers.entry(i.as_str()).or_default().push(n);
            }
        }
        let inits: HashMap<&str, &pb::TensorProto> =
            g.initializer.iter().map(|i| (i.name.as_str(), i)).collect();
        // Computed from constants only (a scale such as Cast(Sqrt(Constant))).
        fn is_constant(
            v: &str,
            producer: &HashMap<&str, &pb::NodeProto>,
            inits: &HashMap<&str, &pb::TensorProto>,
            depth: usize,
        ) -> bool {
            if inits.contains_key(v) {
                return true;
            }
            match producer.get(v) {
                Some(n) if n.op_type == "Constant" => true,
                Some(n) if depth > 0 && !n.input.is_empty() => n
                    .input
                    .iter()
                    .all(|i| is_constant(i, producer, inits, depth - 1)),
                _ => false,
            }
        }
        let constant = |name: &str| is_constant(name, &producer, &inits, 4);
        let by_output: HashMap<&str, usize> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| (w.output.as_str(), i))
            .collect();
        let out_features = |w: &MatmulWeight| {
            let s = &model.tensors[w.tensor].shape;
            if w.in_on_columns { s[0] } else { s[1] }
        };
        // Projections split into heads: (heads, head dim, bias, why the count is fixed) by
        // weight.
        type Split = (usize, usize, Option<String>, Option<String>);
        let mut split: HashMap<usize, Split> = HashMap::new();
        for (i, w) in weights.iter().enumerate() {
            let out = out_features(w);
            let mut value = w.output.as_str();
            let mut bias = w.bias.clone().filter(|b| {
                model
                    .find(b)
                    .is_some_and(|t| model.tensors[t].shape == [out])
            });
            if w.bias.is_some() && bias.is_none() {
                // A Gemm bias of another shape (broadcast): its slices cannot follow the heads.
                continue;
            }
            // The one consumer that reads the values (Shape nodes read only the shape).
            let only = |v: &str| {
                let mut readers = consumers.get(v)?.iter().filter(|n| n.op_type != "Shape");
                let n = readers.next()?;
                readers.next().is_none().then_some(*n)
            };
            if let Some(n) = only(value).filter(|n| n.op_type == "Add" && n.input.len() == 2) {
                let other = if n.input[0] == value {
                    &n.input[1]
                } else {
                    &n.input[0]
                };
                match model.find(other) {
                    // One bias a projection: a second (Gemm's and an Add's) would not be
                    // sliced with the heads.
                    Some(b)
                        if bias.is_none()
                            && inits.contains_key(other.as_str())
                            && model.tensors[b].shape == [out] =>
                    {
                        bias = Some(other.clone());
                        value = n.output[0].as_str();
                    }
                    _ => continue,
                }
            }
            let Some(r) = only(value).filter(|n| n.op_type == "Reshape" && n.input.len() == 2)
            else {
                continue;
            };
            let Some(shape) = shape_entries(&r.input[1], &producer, &inits) else {
                continue;
            };
            let heads = match shape.as_slice() {
                [.., Some(h), Some(d)] if *h > 0 && *d > 0 && (*h * *d) as usize == out => {
                    *h as usize
                }
                [.., _, Some(d)] if *d > 0 && out % *d as usize == 0 => out / *d as usize,
                [.., Some(h), _] if *h > 0 && out % *h as usize == 0 => *h as usize,
                _ => continue,
            };
            let fixed = (shape[shape.len() - 2] != Some(-1)).then(|| {
                format!(
                    "Reshape '{}' splits the heads with a shape whose head count is not -1",
                    r.name
                )
            });
            if heads > 1 && shape.len() >= 3 {
                split.insert(i, (heads, out / heads, bias, fixed));
            }
        }
        // Back from a value through reshapes, transposes and constant scalings to the
        // projection that made it.
        fn trace<'a>(
            mut v: &'a str,
            producer: &HashMap<&'a str, &'a pb::NodeProto>,
            by_output: &HashMap<&'a str, usize>,
            constant: &dyn Fn(&str) -> bool,
        ) -> Option<usize> {
            for _ in 0..8 {
                if let Some(&w) = by_output.get(v) {
                    return Some(w);
                }
                let n = producer.get(v)?;
                v = match n.op_type.as_str() {
                    "Transpose" | "Reshape" | "Cast" | "Identity" => n.input.first()?,
                    "Add" | "Mul" | "Div" | "Sub" if n.input.len() == 2 => {
                        match (constant(&n.input[0]), constant(&n.input[1])) {
                            (false, true) => &n.input[0],
                            (true, false) => &n.input[1],
                            _ => return None,
                        }
                    }
                    _ => return None,
                };
            }
            None
        }
        let trace = |v: &'_ str| trace(v, &producer, &by_output, &constant);
        // Back from the attention probabilities to the product of queries and keys.
        fn scores_matmul<'a, 'k>(
            v: &str,
            producer: &HashMap<&'k str, &'a pb::NodeProto>,
            by_output: &HashMap<&'k str, usize>,
            depth: usize,
        ) -> Option<&'a pb::NodeProto> {
            let n = producer.get(v)?;
            if n.op_type == "MatMul" && !by_output.contains_key(v) {
                return Some(n);
            }
            if depth == 0
                || by_output.contains_key(v)
                || matches!(
                    n.op_type.as_str(),
                    "LayerNormalization" | "Shape" | "Constant"
                )
            {
                return None;
            }
            let inputs: &[String] = if n.op_type == "Reshape" {
                &n.input[..1]
            } else {
                &n.input
            };
            inputs
                .iter()
                .find_map(|i| scores_matmul(i, producer, by_output, depth - 1))
        }
        let mut groups = Vec::new();
        for o in &weights {
            // The output projection reads Reshape(Transpose(MatMul(probabilities, values))).
            // The output projection reads the heads' context, MatMul(probabilities, values),
            // through the Transpose and Reshapes that merge the heads.
            let mut merge_fixed = None;
            let Some(ctx) = (|| {
                let mut v = o.activation.as_str();
                let mut merged = false;
                for _ in 0..6 {
                    let n = producer.get(v)?;
                    match n.op_type.as_str() {
                        "Reshape" | "Transpose" => {
                            merged |= n.op_type == "Transpose";
                            if n.op_type == "Reshape"
                                && shape_entries(n.input.get(1)?, &producer, &inits)
                                    .is_none_or(|s| s.iter().any(|e| e.is_some_and(|e| e > 0)))
                            {
                                merge_fixed = Some(format!(
                                    "Reshape '{}' merges the heads into a fixed width",
                                    n.name
                                ));
                            }
                            v = n.input.first()?;
                        }
                        "MatMul" if merged && n.input.len() == 2 && !by_output.contains_key(v) => {
                            return Some(*n);
                        }
                        _ => return None,
                    }
                }
                None
            })() else {
                continue;
            };
            let Some(v) = trace(&ctx.input[1]) else {
                continue;
            };
            let Some(qk) = scores_matmul(&ctx.input[0], &producer, &by_output, 12) else {
                continue;
            };
            let (Some(q), Some(k)) = (trace(&qk.input[0]), trace(&qk.input[1])) else {
                continue;
            };
            let parts: Option<Vec<&Split>> = [q, k, v].iter().map(|p| split.get(p)).collect();
            let Some(parts) = parts else { continue };
            let (heads, dim) = (parts[0].0, parts[0].1);
            let in_o = {
                let s = &model.tensors[o.tensor].shape;
                if o.in_on_columns { s[1] } else { s[0] }
            };
            if parts.iter().any(|p| (p.0, p.1) != (heads, dim)) || in_o != heads * dim {
                continue;
            }
            let member = |t: usize, axis: usize| Member {
                tensor: model.tensors[t].name.clone(),
                axis,
                offset: 0,
                per_channel: dim,
            };
            let mut members = Vec::new();
            for (p, part) in [q, k, v].iter().zip(&parts) {
                let w = &weights[*p];
                members.push(member(w.tensor, if w.in_on_columns { 0 } else { 1 }));
                if let Some(t) = part.2.as_deref().and_then(|b| model.find(b)) {
                    members.push(member(t, 0));
                }
            }
            members.push(member(o.tensor, if o.in_on_columns { 1 } else { 0 }));
            let fixed = parts.iter().find_map(|p| p.3.clone()).or(merge_fixed);
            groups.push(AttentionBlock {
                group: Group {
                    channels: heads,
                    members,
                    head_dim: Some(dim),
                },
                fixed,
            });
        }
        groups
    }

    pub fn describe_inputs(&self) -> String {
        self.data_inputs
            .iter()
            .map(DataInput::describe)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn gerr(&self, msg: String) -> EvalError {
        EvalError::Graph {
            path: self.path.clone(),
            msg,
        }
    }
}

/// An attention block's heads (see [`GraphInfo::attention_blocks`]).
#[derive(Clone, Debug)]
pub struct AttentionBlock {
    pub group: crate::graph::Group,
    /// Why the graph cannot run with fewer heads, where it cannot.
    pub fixed: Option<String>,
}

/// A weight that a MatMul or Gemm multiplies `activation` by (see
/// [`GraphInfo::matmul_weights`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MatmulWeight {
    pub tensor: usize,
    pub activation: String,
    /// The MatMul's (or Gemm's) output.
    pub output: String,
    /// The weight is [out, in]: input features along its columns.
    pub in_on_columns: bool,
    /// A Gemm's own bias (its third input), where it has one.
    pub bias: Option<String>,
}

/// The entries of a Reshape's target shape, `None` where computed at run time: a constant, or a
/// Concat of constants and of single run-time entries (`Unsqueeze(Gather(Shape(…)))`).
fn shape_entries(
    name: &str,
    producer: &HashMap<&str, &pb::NodeProto>,
    inits: &HashMap<&str, &pb::TensorProto>,
) -> Option<Vec<Option<i64>>> {
    let ints = |t: &pb::TensorProto| -> Option<Vec<i64>> {
        if t.data_type != pb::tensor_proto::DataType::Int64 as i32 {
            return None;
        }
        if !t.int64_data.is_empty() {
            return Some(t.int64_data.clone());
        }
        Some(
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        )
    };
    let constant = |v: &str| -> Option<Vec<i64>> {
        if let Some(t) = inits.get(v) {
            return ints(t);
        }
        let n = producer.get(v)?;
        match n.op_type.as_str() {
            "Constant" => ints(n.attribute.iter().find(|a| a.name == "value")?.t.as_ref()?),
            _ => None,
        }
    };
    if let Some(c) = constant(name) {
        return Some(c.into_iter().map(Some).collect());
    }
    let n = producer.get(name)?;
    if n.op_type != "Concat" {
        return None;
    }
    let mut out = Vec::new();
    for i in &n.input {
        if let Some(c) = constant(i) {
            out.extend(c.into_iter().map(Some));
            continue;
        }
        // One entry: a scalar made a vector, constant or not.
        let u = producer
            .get(i.as_str())
            .filter(|u| u.op_type == "Unsqueeze")?;
        out.push(constant(u.input.first()?).and_then(|c| (c.len() == 1).then(|| c[0])));
    }
    Some(out)
}

/// One data input, matched with its array and the per-sample shape the plan is built for.
#[derive(Clone)]
pub(crate) struct Feed {
    pub array: usize,
    pub sample_shape: Vec<usize>,
    datum: DatumType,
}

/// Identifies the mask `masks` holds for tensor `t` (0: none, the tensor dense), so that a
/// weight masked once is reused until its mask changes.
pub(crate) fn mask_key(model: &Model, t: usize, masks: Option<&MaskSet>) -> u64 {
    masks
        .and_then(|m| m.get(&model.tensors[t].name))
        .map_or(0, |m| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            m.words().hash(&mut h);
            h.finish() | 1
        })
}

/// Samples `start..start + real` of an array of `per` values each, the last one repeated up to
/// `batch` (the outputs of that padding are dropped).
pub(crate) fn batch_rows<T: Copy>(
    v: &[T],
    per: usize,
    batch: usize,
    start: usize,
    real: usize,
) -> Vec<T> {
    let mut buf = Vec::with_capacity(batch * per);
    buf.extend_from_slice(&v[start * per..(start + real) * per]);
    let last = (start + real - 1) * per;
    for _ in real..batch {
        buf.extend_from_slice(&v[last..last + per]);
    }
    buf
}

enum Slot {
    Data(usize),
    Weight(usize),
}

struct Built {
    plan: Arc<TypedRunnableModel>,
    slots: Vec<Slot>,
    /// Identifies the masks baked into constants (0: none).
    baked_key: u64,
}

/// Plans kept: the dense one and the latest, so that going back to dense costs no rebuild.
const PLANS_KEPT: usize = 2;

/// Masked weights handed to the plan, kept until their mask changes.
type WeightCache = HashMap<usize, (u64, TValue)>;

pub struct OnnxRunner {
    graph: GraphInfo,
    data: Arc<EvalData>,
    feeds: Vec<Feed>,
    notes: Vec<String>,
    batch: usize,
    /// Tensors passed as inputs by default: the prunable ones.
    /// Weights passed as inputs: the prunable ones, or none when tract needs them constant
    /// (then every mask change rebuilds).
    inputs: Mutex<BTreeSet<usize>>,
    plans: Mutex<Vec<Arc<Built>>>,
    cache: Mutex<WeightCache>,
    /// Chosen on the first run by timing one thread against all of them.
    executor: Mutex<Option<Executor>>,
    builds: std::sync::atomic::AtomicUsize,
    /// Threads of the chosen executor (0 before the first run).
    threads: std::sync::atomic::AtomicUsize,
    /// Why the graph cannot be trained (it does not import into prunescope's graph).
    why: String,
}

impl OnnxRunner {
    pub fn new(model: &Model, graph: GraphInfo, data: Arc<EvalData>) -> Result<Self, EvalError> {
        let mut feeds = Vec::new();
        let mut notes = Vec::new();
        for input in &graph.data_inputs {
            // One-input models take the data's one array whatever its name.
            let array = if graph.data_inputs.len() == 1 && data.inputs.len() == 1 {
                Some(0)
            } else {
                data.inputs.iter().position(|a| a.name == input.name)
            };
            let Some(array) = array else {
                return Err(EvalError::Input(format!(
                    "the model's input {} has no array in {}",
                    input.describe(),
                    data.name
                )));
            };
            let a = &data.inputs[array];
            let sample: Vec<usize> = a.shape[1..].to_vec();
            let sample_shape = match &input.dims {
                None => sample,
                Some(dims) if dims.is_empty() => {
                    return Err(EvalError::Input(format!(
                        "the model's input {} is a scalar; data arrays hold samples",
                        input.describe()
                    )));
                }
                Some(dims) => {
                    let want = &dims[1..];
                    let fits = want.len() == sample.len()
                        && want
                            .iter()
                            .zip(&sample)
                            .all(|(w, s)| w.is_none_or(|w| w == *s));
                    if fits {
                        sample
                    } else if let Some(n) = input.fixed_sample_len()
                        && n == a.sample_len()
                    {
                        let to: Vec<usize> = want.iter().map(|d| d.unwrap_or(1)).collect();
                        notes.push(format!(
                            "array '{}' {:?} per sample reshaped to the model's {:?}",
                            a.name, sample, to
                        ));
                        to
                    } else {
                        return Err(EvalError::Input(format!(
                            "array '{}' has shape {:?} ({} values per sample), but the model's \
                             input {} expects [samples, {}]",
                            a.name,
                            a.shape,
                            a.sample_len(),
                            input.describe(),
                            want.iter()
                                .map(|x| x.map_or("?".to_string(), |v| v.to_string()))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            };
            let datum = datum_of(input.elem_type).ok_or_else(|| {
                graph.gerr(format!(
                    "input '{}' has element type {} which prunescope cannot feed",
                    input.name,
                    elem_name(input.elem_type)
                ))
            })?;
            if matches!(a.values, ArrayValues::F32(_)) && !datum.is_float() {
                return Err(EvalError::Input(format!(
                    "array '{}' holds floats, but the model's input {} takes {}",
                    a.name,
                    input.describe(),
                    elem_name(input.elem_type)
                )));
            }
            feeds.push(Feed {
                array,
                sample_shape,
                datum,
            });
        }
        let per_sample: usize = feeds
            .iter()
            .map(|f| f.sample_shape.iter().product::<usize>().max(1))
            .sum();
        // A batch size the model fixes (exported without a dynamic batch axis) is kept: its
        // graph may reshape with it. The last batch is padded either way.
        let fixed: Vec<usize> = graph
            .data_inputs
            .iter()
            .filter_map(|i| i.dims.as_ref().and_then(|d| d.first().copied().flatten()))
            .collect();
        let batch = match fixed.first() {
            Some(&b) if fixed.iter().all(|&f| f == b) => b,
            Some(_) => {
                return Err(EvalError::Input(format!(
                    "the model's inputs fix different batch sizes: {}",
                    graph.describe_inputs()
                )));
            }
            None => (BATCH_ELEMENTS / per_sample.max(1)).clamp(1, data.samples.max(1)),
        };
        let default_weights = graph
            .proto
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .filter_map(|i| model.find(&i.name))
            .filter(|&t| {
                model.tensors[t].default_prunable()
                    && weight_datum(&model.tensors[t].dtype).is_some()
            })
            .collect();
        Ok(OnnxRunner {
            graph,
            data,
            feeds,
            notes,
            batch,
            inputs: Mutex::new(default_weights),
            plans: Mutex::new(Vec::new()),
            cache: Mutex::new(HashMap::new()),
            executor: Mutex::new(None),
            builds: Default::default(),
            threads: Default::default(),
            why: String::new(),
        })
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    /// The graph in prunescope's trainable form, or why it has none.
    pub fn import_graph(&self, model: &Model) -> Result<crate::graph::Graph, String> {
        let shapes: Vec<(String, Vec<usize>)> = self
            .graph
            .data_inputs
            .iter()
            .zip(&self.feeds)
            .map(|(i, f)| (i.name.clone(), f.sample_shape.clone()))
            .collect();
        self.graph.import(model, &shapes)
    }

    /// This graph compiled for prunescope's ONNX interpreter, or why it cannot be.
    pub fn native(&self, model: &Model) -> Result<super::onnx_native::NativeOnnx, String> {
        let names: Vec<(String, i32)> = self
            .graph
            .data_inputs
            .iter()
            .map(|d| (d.name.clone(), d.elem_type))
            .collect();
        // Reading the graph folds its constants through the kernels: a panic there (a bug,
        // or a graph no test foresaw) leaves tract to run the model.
        catch_unwind(AssertUnwindSafe(|| {
            super::onnx_native::NativeOnnx::new(
                &self.graph.proto,
                model,
                &names,
                self.feeds.clone(),
                self.data.clone(),
                self.batch,
            )
        }))
        .unwrap_or_else(|p| Err(format!("the interpreter panicked: {}", panic_text(&p))))
    }

    pub fn set_untrainable_reason(&mut self, why: String) {
        self.why = why;
    }

    /// A plan whose constants carry the masks of the tensors that are not inputs: a kept one
    /// when those masks are unchanged, else a new one.
    fn plan(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Arc<Built>, EvalError> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let mut inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let baked = |inputs: &BTreeSet<usize>| -> Vec<(usize, &Mask)> {
            masks
                .into_iter()
                .flat_map(|m| m.iter())
                .filter_map(|(name, m)| model.find(name).map(|t| (t, m)))
                .filter(|(t, _)| !inputs.contains(t))
                .collect()
        };
        let key = |baked: &[(usize, &Mask)]| -> u64 {
            if baked.is_empty() {
                return 0;
            }
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for (t, m) in baked {
                t.hash(&mut h);
                m.words().hash(&mut h);
            }
            h.finish() | 1
        };
        let b = baked(&inputs);
        let k = key(&b);
        if let Some(p) = plans.iter().find(|p| p.baked_key == k) {
            return Ok(p.clone());
        }
        let guarded = |inputs: &BTreeSet<usize>, b: &[(usize, &Mask)], k: u64| {
            catch_unwind(AssertUnwindSafe(|| self.build(model, inputs, b, k, &[]))).unwrap_or_else(
                |p| {
                    Err(self
                        .graph
                        .gerr(format!("tract panicked: {}", panic_text(&p))))
                },
            )
        };
        let built = match guarded(&inputs, &b, k) {
            Ok(built) => built,
            Err(first) if !inputs.is_empty() => {
                // Some operators (BatchNorm, for one) need constant parameters: keep every
                // weight constant, and rebuild on mask changes instead.
                let none = BTreeSet::new();
                let b = baked(&none);
                let k = key(&b);
                let built = guarded(&none, &b, k).map_err(|_| first)?;
                inputs.clear();
                plans.clear();
                built
            }
            Err(e) => return Err(e),
        };
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let built = Arc::new(built);
        // Keep the dense plan (key 0) and the newest.
        plans.retain(|p| p.baked_key == 0);
        plans.push(built.clone());
        while plans.len() > PLANS_KEPT {
            plans.remove(0);
        }
        Ok(built)
    }

    fn build(
        &self,
        model: &Model,
        weights: &BTreeSet<usize>,
        baked: &[(usize, &Mask)],
        baked_key: u64,
        outputs: &[String],
    ) -> Result<Built, EvalError> {
        let mut proto = self.graph.proto.clone();
        let g = proto
            .graph
            .as_mut()
            .ok_or_else(|| self.graph.gerr("no graph".into()))?;
        let inits = std::mem::take(&mut g.initializer);
        for mut init in inits {
            let Some(t) = model.find(&init.name) else {
                return Err(self
                    .graph
                    .gerr(format!("initializer '{}' is unknown", init.name)));
            };
            if weights.contains(&t) {
                // Files from before IR 4 list initializers among the inputs too.
                g.input.retain(|i| i.name != init.name);
                g.input.push(pb::ValueInfoProto {
                    name: init.name.clone(),
                    r#type: Some(pb::TypeProto {
                        denotation: String::new(),
                        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                            elem_type: init.data_type,
                            shape: Some(pb::TensorShapeProto {
                                dim: init
                                    .dims
                                    .iter()
                                    .map(|&d| pb::tensor_shape_proto::Dimension {
                                        denotation: String::new(),
                                        value: Some(
                                            pb::tensor_shape_proto::dimension::Value::DimValue(d),
                                        ),
                                    })
                                    .collect(),
                            }),
                        })),
                    }),
                    doc_string: String::new(),
                });
            } else {
                let mut bytes = model.tensor_bytes(t).to_vec();
                if let Some((_, m)) = baked.iter().find(|(b, _)| *b == t) {
                    // Zero is all-zero bytes in every float format.
                    let size = bytes.len() / model.tensors[t].numel.max(1);
                    for i in (0..m.len()).filter(|&i| !m.kept(i)) {
                        bytes[i * size..(i + 1) * size].fill(0);
                    }
                }
                init.raw_data = bytes;
                g.initializer.push(init);
            }
        }
        let tract_err = |e: TractError| self.graph.gerr(format!("{e:#}"));
        let mut im = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(tract_err)?;
        let mut slots = Vec::new();
        let outlets = im.input_outlets().map_err(tract_err)?.to_vec();
        for (i, outlet) in outlets.iter().enumerate() {
            let name = im.node(outlet.node).name.clone();
            let (slot, fact) =
                if let Some(k) = self.graph.data_inputs.iter().position(|d| d.name == name) {
                    let f = &self.feeds[k];
                    let mut shape = vec![self.batch];
                    shape.extend(&f.sample_shape);
                    (Slot::Data(k), InferenceFact::dt_shape(f.datum, shape))
                } else if let Some(t) = model.find(&name).filter(|t| weights.contains(t)) {
                    let e = &model.tensors[t];
                    let dt = weight_datum(&e.dtype).ok_or_else(|| {
                        self.graph.gerr(format!(
                            "weight '{name}' has dtype {}, which masks cannot be applied to",
                            e.dtype
                        ))
                    })?;
                    (
                        Slot::Weight(t),
                        InferenceFact::dt_shape(dt, e.shape.clone()),
                    )
                } else {
                    return Err(self
                        .graph
                        .gerr(format!("input '{name}' is neither data nor a weight")));
                };
            im.set_input_fact(i, fact).map_err(tract_err)?;
            slots.push(slot);
        }
        if !outputs.is_empty() {
            let outlets = outputs
                .iter()
                .map(|name| {
                    // Graph inputs are sources, named but not labelled.
                    im.find_outlet_label(name)
                        .or_else(|| im.node_by_name(name).ok().map(|n| OutletId::new(n.id, 0)))
                        .ok_or_else(|| {
                            self.graph
                                .gerr(format!("no value named '{name}' to observe in the graph"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            im.select_output_outlets(&outlets).map_err(tract_err)?;
        }
        let plan = im
            .into_optimized()
            .map_err(tract_err)?
            .into_runnable()
            .map_err(tract_err)?;
        Ok(Built {
            plan,
            slots,
            baked_key,
        })
    }

    /// Weights `ts` with their masks applied, in each tensor's own element type: cached ones
    /// whose mask is unchanged, the rest built in parallel.
    fn weights(
        &self,
        model: &Model,
        ts: &[usize],
        masks: Option<&MaskSet>,
    ) -> Result<Vec<TValue>, EvalError> {
        use rayon::prelude::*;
        let keys: Vec<u64> = ts.par_iter().map(|&t| mask_key(model, t, masks)).collect();
        // The lock is not held across the parallel work below: a pool thread waiting on it may
        // run another sweep point's evaluation, which would lock it again.
        let mut out: Vec<Option<TValue>> = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            ts.iter()
                .zip(&keys)
                .map(|(t, k)| {
                    cache
                        .get(t)
                        .filter(|(old, _)| old == k)
                        .map(|c| c.1.clone())
                })
                .collect()
        };
        let stale: Vec<(usize, u64)> = ts
            .iter()
            .zip(&keys)
            .zip(&out)
            .filter(|(_, o)| o.is_none())
            .map(|((&t, &k), _)| (t, k))
            .collect();
        let fresh: Vec<(usize, u64, TValue)> = stale
            .par_iter()
            .map(|&(t, k)| {
                let e = &model.tensors[t];
                let v = crate::prune::masked_f32(model, t, masks);
                let dt = weight_datum(&e.dtype).unwrap_or(DatumType::F32);
                let terr = |err: String| EvalError::Tensor {
                    tensor: e.name.clone(),
                    msg: err,
                };
                // Moves the vector into the tensor: no copy for f32 weights.
                let array = tract_ndarray::ArrayD::from_shape_vec(e.shape.clone(), v)
                    .map_err(|err| terr(err.to_string()))?;
                let mut tensor = Tensor::from(array);
                if dt != DatumType::F32 {
                    tensor = tensor
                        .cast_to_dt(dt)
                        .map_err(|err| terr(format!("{err:#}")))?
                        .into_owned();
                }
                Ok((t, k, tensor.into_tvalue()))
            })
            .collect::<Result<_, EvalError>>()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        for (t, k, v) in fresh {
            for (slot, _) in out
                .iter_mut()
                .zip(ts)
                .filter(|(o, x)| o.is_none() && **x == t)
            {
                *slot = Some(v.clone());
            }
            cache.insert(t, (k, v));
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every weight is cached or fresh"))
            .collect())
    }

    fn data_tensor(&self, k: usize, start: usize, real: usize) -> Result<TValue, EvalError> {
        let f = &self.feeds[k];
        let a = &self.data.inputs[f.array];
        let per = a.sample_len();
        let mut shape = vec![self.batch];
        shape.extend(&f.sample_shape);
        let tensor = match &a.values {
            ArrayValues::F32(v) => {
                Tensor::from_shape(&shape, &batch_rows(v, per, self.batch, start, real))
            }
            ArrayValues::I64(v) => {
                Tensor::from_shape(&shape, &batch_rows(v, per, self.batch, start, real))
            }
        }
        .and_then(|t| Ok(t.cast_to_dt(f.datum)?.into_owned()))
        .map_err(|e| EvalError::Input(format!("array '{}': {e:#}", a.name)))?;
        Ok(tensor.into_tvalue())
    }

    fn run_all(
        &self,
        built: &Built,
        weights: &[Option<TValue>],
        executor: &Executor,
    ) -> Result<Outputs, EvalError> {
        Outputs::gather(self.data.samples, self.batch, |start, real| {
            let mut inputs: TVec<TValue> = tvec![];
            for (i, slot) in built.slots.iter().enumerate() {
                inputs.push(match slot {
                    Slot::Data(k) => self.data_tensor(*k, start, real)?,
                    Slot::Weight(_) => weights[i].clone().expect("weights are set for their slots"),
                });
            }
            let plan = built.plan.clone();
            let out = multithread_tract_scope(executor.clone(), || {
                catch_unwind(AssertUnwindSafe(|| plan.run(inputs)))
            })
            .map_err(|p| EvalError::Compute(format!("tract panicked: {}", panic_text(&p))))?
            .map_err(|e| EvalError::Compute(format!("{e:#}")))?;
            let y = out
                .into_iter()
                .next()
                .ok_or_else(|| EvalError::Compute("the graph gave no output".into()))?;
            let y = y
                .cast_to::<f32>()
                .map_err(|e| EvalError::Compute(format!("output: {e:#}")))?;
            let shape = y.shape().to_vec();
            if shape.first() != Some(&self.batch) {
                return Err(EvalError::Compute(format!(
                    "the output has shape {shape:?}; its first dimension should count the {} \
                     samples of the batch",
                    self.batch
                )));
            }
            let per: usize = shape[1..].iter().product();
            let view = y
                .to_plain_array_view::<f32>()
                .map_err(|e| EvalError::Compute(format!("output: {e:#}")))?;
            // Padding rows of the last batch are dropped.
            Ok((
                shape[1..].to_vec(),
                view.iter().take(real * per).copied().collect(),
            ))
        })
    }
}

impl OnnxRunner {
    /// Runs the dense model on its data, batch by batch, and shows `f` each of the named values
    /// as rows along its last axis: `f(k, rows, width)` for `names[k]`, every position of every
    /// real sample (tokens included; the padding samples of the last batch left out). What a
    /// weight multiplies, for Wanda's norms and SparseGPT's Hessians.
    pub fn observe(
        &self,
        model: &Model,
        names: &[String],
        progress: &crate::progress::Progress,
        label: &str,
        f: &mut dyn FnMut(usize, &[f32], usize),
    ) -> Result<(), EvalError> {
        let built = catch_unwind(AssertUnwindSafe(|| {
            self.build(model, &BTreeSet::new(), &[], 0, names)
        }))
        .unwrap_or_else(|p| {
            Err(self
                .graph
                .gerr(format!("tract panicked: {}", panic_text(&p))))
        })?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let executor = Executor::multithread(threads);
        let n = self.data.samples;
        let mut start = 0;
        while start < n {
            progress
                .check()
                .map_err(|_| EvalError::Compute("cancelled".into()))?;
            let real = self.batch.min(n - start);
            let mut inputs: TVec<TValue> = tvec![];
            for slot in &built.slots {
                match slot {
                    Slot::Data(k) => inputs.push(self.data_tensor(*k, start, real)?),
                    Slot::Weight(_) => unreachable!("every weight is a constant here"),
                }
            }
            let plan = built.plan.clone();
            let out = multithread_tract_scope(executor.clone(), || {
                catch_unwind(AssertUnwindSafe(|| plan.run(inputs)))
            })
            .map_err(|p| EvalError::Compute(format!("tract panicked: {}", panic_text(&p))))?
            .map_err(|e| EvalError::Compute(format!("{e:#}")))?;
            for ((k, y), name) in out.into_iter().enumerate().zip(names) {
                let y = y
                    .cast_to::<f32>()
                    .map_err(|e| EvalError::Compute(format!("'{name}': {e:#}")))?;
                let shape = y.shape().to_vec();
                let (Some(&width), Some(&b)) = (shape.last(), shape.first()) else {
                    return Err(EvalError::Compute(format!("'{name}' is a scalar")));
                };
                if shape.len() < 2 || b != self.batch {
                    return Err(EvalError::Compute(format!(
                        "'{name}' has shape {shape:?}, not one row of features a sample (or \
                         token) with the batch first"
                    )));
                }
                let view = y
                    .to_plain_array_view::<f32>()
                    .map_err(|e| EvalError::Compute(format!("'{name}': {e:#}")))?;
                let per: usize = shape[1..].iter().product();
                let rows = view
                    .as_slice()
                    .expect("plain arrays are contiguous")
                    .get(..real * per)
                    .unwrap_or(&[]);
                f(k, rows, width);
            }
            start += real;
            progress.report(start as f32 / n as f32, label);
        }
        Ok(())
    }
}

impl Runner for OnnxRunner {
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        let built = self.plan(model, masks)?;
        let ts: Vec<usize> = built
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Weight(t) => Some(*t),
                Slot::Data(_) => None,
            })
            .collect();
        let mut values = self.weights(model, &ts, masks)?.into_iter();
        let weights: Vec<Option<TValue>> = built
            .slots
            .iter()
            .map(|s| match s {
                Slot::Weight(_) => values.next(),
                Slot::Data(_) => None,
            })
            .collect();
        let chosen = self
            .executor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(exec) = chosen {
            return self.run_all(&built, &weights, &exec);
        }
        // First run: time one thread against all, keep the faster (small models lose to the
        // threads' overhead, transformers gain ~1.5×).
        let single = Executor::SingleThread;
        let t0 = Instant::now();
        let out = self.run_all(&built, &weights, &single)?;
        let one = t0.elapsed();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let forced = std::env::var("PRUNESCOPE_TRACT_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        let mut best = (single, 1);
        match forced {
            Some(n) if n > 1 => best = (Executor::multithread(n), n),
            Some(_) => {}
            None if threads > 1 => {
                // Time the single thread again, warm, against all threads.
                let t0 = Instant::now();
                self.run_all(&built, &weights, &best.0)?;
                let one = one.min(t0.elapsed());
                let multi = Executor::multithread(threads);
                self.run_all(&built, &weights, &multi)?;
                let t0 = Instant::now();
                self.run_all(&built, &weights, &multi)?;
                if t0.elapsed() < one {
                    best = (multi, threads);
                }
            }
            None => {}
        }
        self.threads
            .store(best.1, std::sync::atomic::Ordering::Relaxed);
        *self.executor.lock().unwrap_or_else(|e| e.into_inner()) = Some(best.0);
        Ok(out)
    }

    fn plan_builds(&self) -> usize {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn detail(&self) -> String {
        match self.threads.load(std::sync::atomic::Ordering::Relaxed) {
            0 => String::new(),
            1 => "tract, 1 thread".into(),
            n => format!("tract, {n} threads"),
        }
    }

    fn engine(&self) -> Engine {
        Engine {
            name: "tract",
            trainable: false,
            why: self.why.clone(),
        }
    }
}

pub(super) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| p.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
        .to_string()
}

fn datum_of(elem_type: i32) -> Option<DatumType> {
    Some(match elem_type {
        1 => DatumType::F32,
        2 => DatumType::U8,
        3 => DatumType::I8,
        4 => DatumType::U16,
        5 => DatumType::I16,
        6 => DatumType::I32,
        7 => DatumType::I64,
        9 => DatumType::Bool,
        10 => DatumType::F16,
        11 => DatumType::F64,
        12 => DatumType::U32,
        13 => DatumType::U64,
        _ => return None,
    })
}

fn weight_datum(d: &crate::model::DType) -> Option<DatumType> {
    use crate::model::DType as D;
    Some(match d {
        D::F32 => DatumType::F32,
        D::F16 => DatumType::F16,
        D::F64 => DatumType::F64,
        _ => return None,
    })
}

fn elem_name(elem_type: i32) -> String {
    match elem_type {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        16 => "bfloat16",
        other => return format!("type {other}"),
    }
    .to_string()
}
