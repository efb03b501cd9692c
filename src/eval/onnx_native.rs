//! ONNX graphs run by prunescope's own kernels ([`super::onnx_kernels`]).
//!
//! tract runs every ONNX graph; this interpreter covers the operators that transformer encoders
//! exported from PyTorch use, and runs them faster: matrix products through `gemm` (the crate
//! candle uses) with a Linear's bias and a following GELU applied in one pass over the product,
//! and the Transpose that PyTorch puts in front of every Linear weight read in place instead of
//! copied on each mask change. Shape arithmetic that depends on constants only is folded once,
//! when the graph is read; the rest runs on every batch and costs microseconds.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use tract_onnx::pb;

use super::onnx::{Feed, batch_rows, mask_key};
use super::onnx_kernels::{self as k, R, Val};
use super::{Engine, EvalError, Outputs, Runner};
use crate::data::{ArrayValues, EvalData};
use crate::graph::onnx_import::{attr, attr_f, attr_i, attr_ints, tensor_ints};
use crate::model::{DType, Model};
use crate::prune::MaskSet;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bin {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    /// The remainder with the divisor's sign (ONNX Mod, fmod = 0).
    Mod,
    Max,
    Min,
    Equal,
    Less,
    Greater,
    LessEq,
    GreaterEq,
    And,
    Or,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Un {
    Erf,
    Sqrt,
    Exp,
    Log,
    Tanh,
    Relu,
    Sigmoid,
    Neg,
    Abs,
    Reciprocal,
    Not,
    IsNaN,
}

#[derive(Clone, Debug)]
enum Op {
    Bin(Bin),
    Un(Un),
    /// x·Φ(x), fused from the five nodes PyTorch exports for it.
    Gelu,
    Cast(i32),
    /// Bounds from attributes (opset < 11); later opsets pass them as inputs.
    Clip {
        min: Option<f32>,
        max: Option<f32>,
    },
    Identity,
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Gather(i64),
    /// Axes from the attribute (opset < 13), else from input 1.
    Unsqueeze(Option<Vec<i64>>),
    Squeeze(Option<Vec<i64>>),
    Concat(i64),
    Reshape(bool),
    Flatten(i64),
    Transpose(Option<Vec<usize>>),
    Slice,
    Expand,
    ConstantOfShape(Val),
    Range,
    Where,
    /// `bt`: input 1 is a 2-D weight stored transposed (`[out, in]`); input 2, where present, a
    /// bias added to every row; `gelu`: GELU applied after it.
    MatMul {
        bt: bool,
        gelu: bool,
    },
    Gemm {
        alpha: f32,
        beta: f32,
        ta: bool,
        tb: bool,
    },
    Softmax {
        axis: i64,
        legacy: bool,
    },
    LayerNorm {
        axis: i64,
        eps: f32,
    },
    Reduce {
        kind: k::Reduce,
        axes: Option<Vec<i64>>,
        keepdims: bool,
        noop_empty: bool,
    },
}

fn parse(n: &pb::NodeProto, opset: i64) -> R<Op> {
    let ai = |name: &str, d: i64| attr_i(n, name, d);
    let af = |name: &str, d: f32| attr_f(n, name, d);
    let ints = |name: &str| attr_ints(n, name);
    let reduce = |kind| Op::Reduce {
        kind,
        axes: ints("axes"),
        keepdims: ai("keepdims", 1) != 0,
        noop_empty: ai("noop_with_empty_axes", 0) != 0,
    };
    Ok(match n.op_type.as_str() {
        "Add" => Op::Bin(Bin::Add),
        "Sub" => Op::Bin(Bin::Sub),
        "Mul" => Op::Bin(Bin::Mul),
        "Div" => Op::Bin(Bin::Div),
        "Pow" => Op::Bin(Bin::Pow),
        // fmod = 1 (the dividend's sign, C's fmod) is what floats need; integers take either.
        "Mod" if ai("fmod", 0) == 0 => Op::Bin(Bin::Mod),
        "Max" if n.input.len() == 2 => Op::Bin(Bin::Max),
        "Min" if n.input.len() == 2 => Op::Bin(Bin::Min),
        "Equal" => Op::Bin(Bin::Equal),
        "Less" => Op::Bin(Bin::Less),
        "Greater" => Op::Bin(Bin::Greater),
        "LessOrEqual" => Op::Bin(Bin::LessEq),
        "GreaterOrEqual" => Op::Bin(Bin::GreaterEq),
        "And" => Op::Bin(Bin::And),
        "Or" => Op::Bin(Bin::Or),
        "Erf" => Op::Un(Un::Erf),
        "Sqrt" => Op::Un(Un::Sqrt),
        "Exp" => Op::Un(Un::Exp),
        "Log" => Op::Un(Un::Log),
        "Tanh" => Op::Un(Un::Tanh),
        "Relu" => Op::Un(Un::Relu),
        "Sigmoid" => Op::Un(Un::Sigmoid),
        "Neg" => Op::Un(Un::Neg),
        "Abs" => Op::Un(Un::Abs),
        "Reciprocal" => Op::Un(Un::Reciprocal),
        "Not" => Op::Un(Un::Not),
        "IsNaN" => Op::Un(Un::IsNaN),
        "Cast" => Op::Cast(ai("to", 0) as i32),
        "Clip" => Op::Clip {
            min: attr(n, "min").map(|a| a.f),
            max: attr(n, "max").map(|a| a.f),
        },
        "Identity" | "Dropout" => Op::Identity,
        "Shape" => Op::Shape {
            start: ai("start", 0),
            end: attr(n, "end").map(|a| a.i),
        },
        "Gather" => Op::Gather(ai("axis", 0)),
        "Unsqueeze" => Op::Unsqueeze(ints("axes")),
        "Squeeze" => Op::Squeeze(ints("axes")),
        "Concat" => Op::Concat(ai("axis", 0)),
        "Reshape" => Op::Reshape(ai("allowzero", 0) != 0),
        "Flatten" => Op::Flatten(ai("axis", 1)),
        "Transpose" => Op::Transpose(
            ints("perm")
                .map(|p| p.iter().map(|&v| usize::try_from(v)).collect())
                .transpose()
                .map_err(|_| "a negative axis in perm".to_string())?,
        ),
        "Slice" if opset >= 10 => Op::Slice,
        "Expand" => Op::Expand,
        "ConstantOfShape" => {
            Op::ConstantOfShape(match attr(n, "value").and_then(|a| a.t.as_ref()) {
                Some(t) => tensor_val(t)?,
                None => Val::f(vec![1], vec![0.0]),
            })
        }
        "Range" => Op::Range,
        "Where" => Op::Where,
        "MatMul" => Op::MatMul {
            bt: false,
            gelu: false,
        },
        "Gemm" => Op::Gemm {
            alpha: af("alpha", 1.0),
            beta: af("beta", 1.0),
            ta: ai("transA", 0) != 0,
            tb: ai("transB", 0) != 0,
        },
        "Softmax" => Op::Softmax {
            axis: ai("axis", if opset >= 13 { -1 } else { 1 }),
            legacy: opset < 13,
        },
        "LayerNormalization" => Op::LayerNorm {
            axis: ai("axis", -1),
            eps: af("epsilon", 1e-5),
        },
        "ReduceSum" => reduce(k::Reduce::Sum),
        "ReduceMean" => reduce(k::Reduce::Mean),
        "ReduceMax" => reduce(k::Reduce::Max),
        other => {
            return Err(format!(
                "operator {other} is not in prunescope's ONNX interpreter"
            ));
        }
    })
}

/// A tensor written in the graph (a Constant's value, ConstantOfShape's fill).
fn tensor_val(t: &pb::TensorProto) -> R<Val> {
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is negative")))
        .collect::<R<_>>()?;
    let n = k::checked_numel(&shape)?;
    if !t.external_data.is_empty() {
        return Err("a constant with external data".into());
    }
    let raw = &t.raw_data;
    let fixed = |size: usize| -> R<()> {
        if raw.len() != n * size {
            return Err(format!("{} bytes for a {shape:?} tensor", raw.len()));
        }
        Ok(())
    };
    let v = match t.data_type {
        1 if !raw.is_empty() => {
            fixed(4)?;
            Val::f(
                shape,
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                    .collect(),
            )
        }
        1 => Val::f(shape, t.float_data.clone()),
        11 if !raw.is_empty() => {
            fixed(8)?;
            Val::f(
                shape,
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32)
                    .collect(),
            )
        }
        11 => Val::f(shape, t.double_data.iter().map(|&v| v as f32).collect()),
        // Integers as the graph importer reads them, the byte count checked first.
        6 | 7 => {
            if !raw.is_empty() {
                fixed(if t.data_type == 7 { 8 } else { 4 })?;
            }
            Val::I(shape, Arc::new(tensor_ints(t).expect("int32 or int64")))
        }
        9 if !raw.is_empty() => {
            fixed(1)?;
            Val::B(shape, Arc::new(raw.iter().map(|&b| b != 0).collect()))
        }
        9 => Val::B(
            shape,
            Arc::new(t.int32_data.iter().map(|&v| v != 0).collect()),
        ),
        other => return Err(format!("a constant of element type {other}")),
    };
    if k::numel(v.shape())
        != match &v {
            Val::F(_, d) => d.len(),
            Val::I(_, d) => d.len(),
            Val::B(_, d) => d.len(),
        }
    {
        return Err(format!(
            "a constant {:?} with the wrong number of values",
            v.shape()
        ));
    }
    Ok(v)
}

/// A Constant node's value, from whichever attribute holds it.
fn constant_val(n: &pb::NodeProto) -> R<Val> {
    let a = n.attribute.first().ok_or("a Constant without a value")?;
    match a.name.as_str() {
        "value" => tensor_val(a.t.as_ref().ok_or("a Constant without a tensor")?),
        "value_float" => Ok(Val::f(vec![], vec![a.f])),
        "value_floats" => Ok(Val::f(vec![a.floats.len()], a.floats.clone())),
        "value_int" => Ok(Val::I(vec![], Arc::new(vec![a.i]))),
        "value_ints" => Ok(Val::I(vec![a.ints.len()], Arc::new(a.ints.clone()))),
        other => Err(format!("a Constant given by '{other}'")),
    }
}

/// An initializer that masks never touch, decoded from the model's bytes.
fn initializer_val(model: &Model, t: usize) -> R<Val> {
    let e = &model.tensors[t];
    let b = model.tensor_bytes(t);
    let shape = e.shape.clone();
    Ok(match e.dtype {
        DType::I64 => Val::I(
            shape,
            Arc::new(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
                    .collect(),
            ),
        ),
        DType::I32 => Val::I(
            shape,
            Arc::new(
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64)
                    .collect(),
            ),
        ),
        DType::Bool => Val::B(shape, Arc::new(b.iter().map(|&v| v != 0).collect())),
        ref d => return Err(format!("initializer '{}' has element type {d}", e.name)),
    })
}

fn is_float(d: &DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

enum Slot {
    Computed,
    Const(Val),
    /// A float initializer, read with its mask on each mask change.
    Weight(usize),
    Input(usize),
}

struct Step {
    op: Op,
    name: String,
    op_type: String,
    inputs: Vec<Option<usize>>,
    output: usize,
    /// Values no later step reads, dropped after this one.
    free: Vec<usize>,
}

/// An ONNX graph compiled for prunescope's kernels, with the data it evaluates.
pub struct NativeOnnx {
    steps: Vec<Step>,
    consts: Vec<(usize, Val)>,
    weights: Vec<(usize, usize)>,
    /// Slot and data input (by position among the graph's data inputs).
    inputs: Vec<(usize, usize)>,
    output: usize,
    slots: usize,
    feeds: Vec<Feed>,
    /// Each data input's ONNX element type.
    input_types: Vec<i32>,
    data: Arc<EvalData>,
    batch: usize,
    /// Masked weights by tensor.
    cache: Mutex<HashMap<usize, Cached>>,
}

/// A weight with its mask applied, and that mask (with the key that identifies it).
struct Cached {
    key: u64,
    mask: Option<crate::prune::Mask>,
    val: Val,
}

impl NativeOnnx {
    /// Compiles `proto` (whose data inputs are `input_names`, fed by `feeds`), or says which
    /// node stops it.
    pub(crate) fn new(
        proto: &pb::ModelProto,
        model: &Model,
        input_names: &[(String, i32)],
        feeds: Vec<Feed>,
        data: Arc<EvalData>,
        batch: usize,
    ) -> R<NativeOnnx> {
        let g = proto.graph.as_ref().ok_or("the file holds no graph")?;
        let opset = proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(1, |o| o.version);
        let out_name = g
            .output
            .first()
            .ok_or("the graph has no outputs")?
            .name
            .clone();
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if producer.insert(o, i).is_some() {
                    return Err(format!("value '{o}' is produced twice"));
                }
            }
        }
        // The nodes the output needs, found backwards from it.
        let mut needed = vec![false; g.node.len()];
        let mut stack = vec![out_name.as_str()];
        while let Some(v) = stack.pop() {
            if let Some(&i) = producer.get(v)
                && !std::mem::replace(&mut needed[i], true)
            {
                stack.extend(
                    g.node[i]
                        .input
                        .iter()
                        .filter(|s| !s.is_empty())
                        .map(String::as_str),
                );
            }
        }
        let mut slot_of: HashMap<String, usize> = HashMap::new();
        let mut slots: Vec<Slot> = Vec::new();
        let mut add = |name: &str, s: Slot, slots: &mut Vec<Slot>| {
            slots.push(s);
            slot_of.insert(name.to_string(), slots.len() - 1);
        };
        for init in &g.initializer {
            let t = model
                .find(&init.name)
                .ok_or_else(|| format!("initializer '{}' is not in the model", init.name))?;
            let s = if is_float(&model.tensors[t].dtype) {
                Slot::Weight(t)
            } else {
                Slot::Const(initializer_val(model, t)?)
            };
            add(&init.name, s, &mut slots);
        }
        for (k, (name, _)) in input_names.iter().enumerate() {
            add(name, Slot::Input(k), &mut slots);
        }
        let mut order = Vec::new();
        for (i, n) in g.node.iter().enumerate().filter(|&(i, _)| needed[i]) {
            let err = |e: String| format!("node '{}' ({}): {e}", n.name, n.op_type);
            if !n.domain.is_empty() && n.domain != "ai.onnx" {
                return Err(err(format!(
                    "operator domain '{}' is not supported",
                    n.domain
                )));
            }
            for o in n.output.iter().skip(1).filter(|o| !o.is_empty()) {
                let read = g
                    .node
                    .iter()
                    .enumerate()
                    .any(|(j, m)| needed[j] && m.input.contains(o));
                if read || *o == out_name {
                    return Err(err(format!(
                        "its output '{o}' is used; only the first is computed"
                    )));
                }
            }
            let out = n.output.first().ok_or_else(|| err("no output".into()))?;
            if n.op_type == "Constant" {
                add(out, Slot::Const(constant_val(n).map_err(err)?), &mut slots);
            } else {
                let op = parse(n, opset).map_err(err)?;
                add(out, Slot::Computed, &mut slots);
                order.push((i, op));
            }
        }
        // Steps in dependency order (Kahn); files need not list nodes sorted.
        let mut steps: Vec<Option<Step>> = Vec::new();
        let mut pending: Vec<(usize, Op)> = order;
        let mut ready: HashSet<usize> = (0..slots.len())
            .filter(|&s| !matches!(slots[s], Slot::Computed))
            .collect();
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for (i, op) in pending {
                let n = &g.node[i];
                let mut inputs = Vec::new();
                let mut blocked = false;
                for name in &n.input {
                    if name.is_empty() {
                        inputs.push(None);
                        continue;
                    }
                    let s = *slot_of.get(name).ok_or_else(|| {
                        format!("node '{}' reads '{name}', which nothing produces", n.name)
                    })?;
                    blocked |= !ready.contains(&s);
                    inputs.push(Some(s));
                }
                if blocked {
                    rest.push((i, op));
                    continue;
                }
                let output = slot_of[&n.output[0]];
                ready.insert(output);
                steps.push(Some(Step {
                    op,
                    name: n.name.clone(),
                    op_type: n.op_type.clone(),
                    inputs,
                    output,
                    free: Vec::new(),
                }));
            }
            if rest.len() == before {
                return Err(format!(
                    "the graph has a cycle through node '{}'",
                    g.node[rest[0].0].name
                ));
            }
            pending = rest;
        }
        let output = *slot_of
            .get(&out_name)
            .ok_or_else(|| format!("the output '{out_name}' is never produced"))?;
        fuse(&mut steps, &slots, model, output);
        // Steps on constants only run once, here.
        for step in steps.iter_mut() {
            let Some(s) = step else { continue };
            let consts = s
                .inputs
                .iter()
                .flatten()
                .all(|&i| matches!(slots[i], Slot::Const(_)));
            if !consts {
                continue;
            }
            let ins: Vec<Option<&Val>> = s
                .inputs
                .iter()
                .map(|i| {
                    i.and_then(|i| match &slots[i] {
                        Slot::Const(v) => Some(v),
                        _ => None,
                    })
                })
                .collect();
            let v =
                eval(&s.op, &ins).map_err(|e| format!("node '{}' ({}): {e}", s.name, s.op_type))?;
            slots[s.output] = Slot::Const(v);
            *step = None;
        }
        let mut steps: Vec<Step> = steps.into_iter().flatten().collect();
        let mut last = vec![None; slots.len()];
        for (i, s) in steps.iter().enumerate() {
            for &x in s.inputs.iter().flatten() {
                last[x] = Some(i);
            }
        }
        for (x, l) in last.iter().enumerate() {
            if let Some(i) = *l
                && x != output
            {
                steps[i].free.push(x);
            }
        }
        let mut consts = Vec::new();
        let mut weights = Vec::new();
        let mut inputs = Vec::new();
        for (i, s) in slots.into_iter().enumerate() {
            match s {
                Slot::Const(v) => consts.push((i, v)),
                Slot::Weight(t) => weights.push((i, t)),
                Slot::Input(k) => inputs.push((i, k)),
                Slot::Computed => {}
            }
        }
        // Weights no step reads (folded away or unused) are not read on mask changes.
        let read: HashSet<usize> = steps
            .iter()
            .flat_map(|s| s.inputs.iter().flatten().copied())
            .collect();
        weights.retain(|(s, _)| read.contains(s) || *s == output);
        Ok(NativeOnnx {
            steps,
            consts,
            weights,
            inputs,
            output,
            slots: last.len(),
            feeds,
            input_types: input_names.iter().map(|(_, e)| *e).collect(),
            data,
            batch,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Every weight with its mask, reusing those whose mask is unchanged.
    fn weights(&self, model: &Model, masks: Option<&MaskSet>) -> Vec<(usize, Val)> {
        use rayon::prelude::*;
        let keys: Vec<u64> = self
            .weights
            .par_iter()
            .map(|&(_, t)| mask_key(model, t, masks))
            .collect();
        // Stale entries are taken out under the lock and rebuilt without it: a pool thread
        // waiting on it may run another sweep point's evaluation, which would lock it again.
        let (mut out, stale) = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let mut out: Vec<Option<Val>> = Vec::with_capacity(self.weights.len());
            let mut stale: Vec<(usize, u64, Option<Cached>)> = Vec::new();
            for (&(_, t), &k) in self.weights.iter().zip(&keys) {
                match cache.get(&t) {
                    Some(c) if c.key == k => out.push(Some(c.val.clone())),
                    _ => {
                        out.push(None);
                        stale.push((t, k, cache.remove(&t)));
                    }
                }
            }
            (out, stale)
        };
        let fresh: Vec<(usize, Cached)> = stale
            .into_par_iter()
            .map(|(t, key, old)| {
                let e = &model.tensors[t];
                let mask = masks.and_then(|m| m.get(&e.name));
                // The copy under the old mask, where no batch still holds it: only the entries
                // whose bit changed are rewritten, in memory already faulted in.
                let mut v = Vec::new();
                if let Some(Cached {
                    mask: was,
                    val: Val::F(_, d),
                    ..
                }) = old
                    && let Ok(mut d) = Arc::try_unwrap(d)
                {
                    if crate::prune::remask_f32(model, t, was.as_ref(), mask, &mut d) {
                        let val = Val::f(e.shape.clone(), d);
                        return (
                            t,
                            Cached {
                                key,
                                mask: mask.cloned(),
                                val,
                            },
                        );
                    }
                    v = d;
                }
                crate::prune::masked_f32_into(model, t, masks, &mut v);
                let val = Val::f(e.shape.clone(), v);
                (
                    t,
                    Cached {
                        key,
                        mask: mask.cloned(),
                        val,
                    },
                )
            })
            .collect();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        for (t, c) in fresh {
            for (slot, _) in out
                .iter_mut()
                .zip(&self.weights)
                .filter(|(o, w)| o.is_none() && w.1 == t)
            {
                *slot = Some(c.val.clone());
            }
            cache.insert(t, c);
        }
        self.weights
            .iter()
            .zip(out)
            .map(|(&(s, _), v)| (s, v.expect("every weight is cached or fresh")))
            .collect()
    }

    fn input(&self, k: usize, start: usize, real: usize) -> R<Val> {
        let f = &self.feeds[k];
        let a = &self.data.inputs[f.array];
        let per = a.sample_len();
        let mut shape = vec![self.batch];
        shape.extend(&f.sample_shape);
        let float = matches!(self.input_types[k], 1 | 10 | 11 | 16);
        Ok(match (&a.values, float) {
            // A boolean input (a mask, say) from its 0/1 array.
            (ArrayValues::I64(v), false) if self.input_types[k] == 9 => Val::B(
                shape,
                Arc::new(
                    batch_rows(v, per, self.batch, start, real)
                        .into_iter()
                        .map(|x| x != 0)
                        .collect(),
                ),
            ),
            (ArrayValues::F32(v), true) => {
                Val::f(shape, batch_rows(v, per, self.batch, start, real))
            }
            (ArrayValues::I64(v), true) => Val::f(
                shape,
                batch_rows(v, per, self.batch, start, real)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect(),
            ),
            (ArrayValues::I64(v), false) => {
                Val::I(shape, Arc::new(batch_rows(v, per, self.batch, start, real)))
            }
            (ArrayValues::F32(_), false) => {
                return Err(format!(
                    "array '{}' holds floats; the model's input takes integers",
                    a.name
                ));
            }
        })
    }

    fn run_batch(
        &self,
        weights: &[(usize, Val)],
        start: usize,
        real: usize,
    ) -> Result<(Vec<usize>, Vec<f32>), EvalError> {
        let mut vals: Vec<Option<Val>> = vec![None; self.slots];
        for (s, v) in self.consts.iter().chain(weights) {
            vals[*s] = Some(v.clone());
        }
        for &(s, k) in &self.inputs {
            vals[s] = Some(self.input(k, start, real).map_err(EvalError::Input)?);
        }
        let profile =
            crate::graph::fast::env_flag(&crate::graph::fast::PROFILE, "PRUNESCOPE_PROFILE");
        let mut times: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
        for step in &self.steps {
            let t0 = std::time::Instant::now();
            let err = |e: String| {
                EvalError::Compute(format!("node '{}' ({}): {e}", step.name, step.op_type))
            };
            let ins: Vec<Option<&Val>> = step
                .inputs
                .iter()
                .map(|i| i.and_then(|i| vals[i].as_ref()))
                .collect();
            let v = eval(&step.op, &ins).map_err(err)?;
            vals[step.output] = Some(v);
            for &f in &step.free {
                // A float value no one else holds goes back to the buffer pool.
                if let Some(Val::F(_, d)) = vals[f].take()
                    && let Ok(d) = Arc::try_unwrap(d)
                {
                    crate::graph::fast::recycle(d);
                }
            }
            if profile {
                let t = times
                    .entry(format!("{:?}", step.op).chars().take(40).collect())
                    .or_default();
                t.0 += 1;
                t.1 += t0.elapsed().as_secs_f64() * 1e3;
            }
        }
        for (op, (n, ms)) in &times {
            eprintln!("{op:<40} {n:>5} {ms:>9.3} ms");
        }
        let y = vals[self.output]
            .take()
            .ok_or_else(|| EvalError::Compute("the graph gave no output".into()))?;
        let y = cast(&y, 1).map_err(EvalError::Compute)?;
        let (shape, v) = y.floats().map_err(EvalError::Compute)?;
        if shape.first() != Some(&self.batch) {
            return Err(EvalError::Compute(format!(
                "the output has shape {shape:?}; its first dimension should count the {} samples \
                 of the batch",
                self.batch
            )));
        }
        let per: usize = shape[1..].iter().product();
        // Padding rows of the last batch are dropped.
        Ok((shape[1..].to_vec(), v[..real * per].to_vec()))
    }
}

impl Runner for NativeOnnx {
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        let weights = self.weights(model, masks);
        Outputs::gather(self.data.samples, self.batch, |start, real| {
            catch_unwind(AssertUnwindSafe(|| self.run_batch(&weights, start, real))).unwrap_or_else(
                |p| {
                    Err(EvalError::Compute(format!(
                        "prunescope's ONNX interpreter panicked: {}",
                        super::onnx::panic_text(&p)
                    )))
                },
            )
        })
    }

    fn engine(&self) -> Engine {
        Engine {
            name: "native",
            trainable: false,
            why: "prunescope's ONNX interpreter runs the graph forward (inference only)".into(),
        }
    }

    fn detail(&self) -> String {
        "prunescope's ONNX interpreter".into()
    }
}

/// Rewrites PyTorch's export patterns into fused steps: `MatMul(x, Transpose(W))` reads W in
/// place, a following `Add(bias)` joins the product, and the five nodes of an erf GELU become
/// one, itself joined to the product before it.
fn fuse(steps: &mut [Option<Step>], slots: &[Slot], model: &Model, output: usize) {
    let uses = |steps: &[Option<Step>], v: usize| -> Vec<(usize, usize)> {
        let mut u: Vec<(usize, usize)> = steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .flat_map(|(i, s)| {
                s.inputs
                    .iter()
                    .enumerate()
                    .filter(move |(_, x)| **x == Some(v))
                    .map(move |(p, _)| (i, p))
            })
            .collect();
        if v == output {
            u.push((usize::MAX, 0));
        }
        u
    };
    let producer = |steps: &[Option<Step>], v: usize| {
        steps
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.output == v))
    };
    let shape_of = |v: usize| -> Option<Vec<usize>> {
        match &slots[v] {
            Slot::Weight(t) => Some(model.tensors[*t].shape.clone()),
            Slot::Const(c) => Some(c.shape().to_vec()),
            _ => None,
        }
    };
    // A one-element constant of rank 0 or 1: broadcasting it never changes another value's
    // shape, so folding it into a fused step keeps the graph's shapes.
    let scalar = |v: Option<usize>| -> Option<f64> {
        match &slots[v?] {
            Slot::Const(c) if c.shape().len() <= 1 => c.scalar().ok(),
            _ => None,
        }
    };
    let bin = |s: &Step, b: Bin| matches!(s.op, Op::Bin(x) if x == b);
    let other = |s: &Step, v: usize| -> Option<Option<usize>> {
        match s.inputs.as_slice() {
            [a, b] if *a == Some(v) => Some(*b),
            [a, b] if *b == Some(v) => Some(*a),
            _ => None,
        }
    };
    // MatMul(x, Transpose(W)) → MatMul(x, W) reading W transposed.
    for i in 0..steps.len() {
        let Some(s) = &steps[i] else { continue };
        let (Op::Transpose(Some(p)), [Some(w)]) = (&s.op, s.inputs.as_slice()) else {
            continue;
        };
        let w = *w;
        let two_d = matches!(slots[w], Slot::Weight(t) if model.tensors[t].shape.len() == 2);
        if p != &[1, 0] || !two_d {
            continue;
        }
        let u = uses(steps, s.output);
        let all_b = !u.is_empty()
            && u.iter().all(|&(c, pos)| {
                pos == 1
                    && c != usize::MAX
                    && matches!(
                        steps[c].as_ref().map(|s| &s.op),
                        Some(Op::MatMul { bt: false, .. })
                    )
            });
        if !all_b {
            continue;
        }
        for (c, _) in u {
            let m = steps[c].as_mut().expect("a use is a live step");
            m.inputs[1] = Some(w);
            m.op = Op::MatMul {
                bt: true,
                gelu: false,
            };
        }
        steps[i] = None;
    }
    // MatMul by a 2-D weight, then Add of a [N] bias → one step.
    for i in 0..steps.len() {
        let Some(s) = &steps[i] else { continue };
        let (Op::MatMul { bt, .. }, [_, Some(b)]) = (&s.op, s.inputs.as_slice()) else {
            continue;
        };
        let Some(bs) = shape_of(*b).filter(|s| s.len() == 2) else {
            continue;
        };
        let n = if *bt { bs[0] } else { bs[1] };
        let u = uses(steps, s.output);
        let [(a, _)] = u.as_slice() else { continue };
        let Some(add) = steps.get(*a).and_then(|x| x.as_ref()) else {
            continue;
        };
        if !bin(add, Bin::Add) {
            continue;
        }
        let Some(Some(bias)) = other(add, s.output) else {
            continue;
        };
        if shape_of(bias) != Some(vec![n]) {
            continue;
        }
        let out = add.output;
        let a = *a;
        let m = steps[i].as_mut().expect("live");
        m.inputs.push(Some(bias));
        m.output = out;
        steps[a] = None;
    }
    // x/√2 → Erf → +1 → ·x → ·0.5, as PyTorch writes GELU.
    let near = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() < 1e-6);
    for i in 0..steps.len() {
        let Some(e) = &steps[i] else { continue };
        let (Op::Un(Un::Erf), [Some(u)]) = (&e.op, e.inputs.as_slice()) else {
            continue;
        };
        let Some(d) = producer(steps, *u) else {
            continue;
        };
        let dv = steps[d].as_ref().expect("live");
        let x = match dv.inputs.as_slice() {
            [Some(x), c] if bin(dv, Bin::Div) && near(scalar(*c), std::f64::consts::SQRT_2) => *x,
            [Some(x), c] | [c, Some(x)]
                if bin(dv, Bin::Mul) && near(scalar(*c), std::f64::consts::FRAC_1_SQRT_2) =>
            {
                *x
            }
            _ => continue,
        };
        let single = |steps: &[Option<Step>], v: usize| match uses(steps, v).as_slice() {
            [(c, _)] if *c != usize::MAX => Some(*c),
            _ => None,
        };
        let Some(a) = single(steps, *u)
            .filter(|&c| c == i)
            .and(single(steps, e.output))
        else {
            continue;
        };
        let av = steps[a].as_ref().expect("live");
        if !(bin(av, Bin::Add) && near(scalar(other(av, e.output).flatten()), 1.0)) {
            continue;
        }
        let Some(m1) = single(steps, av.output) else {
            continue;
        };
        let m1v = steps[m1].as_ref().expect("live");
        if !(bin(m1v, Bin::Mul) && other(m1v, av.output) == Some(Some(x))) {
            continue;
        }
        let Some(m2) = single(steps, m1v.output) else {
            continue;
        };
        let m2v = steps[m2].as_ref().expect("live");
        if !(bin(m2v, Bin::Mul) && near(scalar(other(m2v, m1v.output).flatten()), 0.5)) {
            continue;
        }
        let g = steps[m2].as_mut().expect("live");
        g.op = Op::Gelu;
        g.inputs = vec![Some(x)];
        for dead in [d, i, a, m1] {
            steps[dead] = None;
        }
    }
    // A product whose only reader is a GELU applies it itself.
    for i in 0..steps.len() {
        let Some(s) = &steps[i] else { continue };
        let Op::MatMul { bt, gelu: false } = s.op else {
            continue;
        };
        let u = uses(steps, s.output);
        let [(g, _)] = u.as_slice() else { continue };
        if *g == usize::MAX || !matches!(steps[*g].as_ref().map(|s| &s.op), Some(Op::Gelu)) {
            continue;
        }
        let (g, out) = (*g, steps[*g].as_ref().expect("live").output);
        let m = steps[i].as_mut().expect("live");
        m.op = Op::MatMul { bt, gelu: true };
        m.output = out;
        steps[g] = None;
    }
}

fn arg<'a>(ins: &[Option<&'a Val>], i: usize) -> R<&'a Val> {
    ins.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("input {i} is missing"))
}

fn opt_ints(ins: &[Option<&Val>], i: usize) -> R<Option<Vec<i64>>> {
    ins.get(i).copied().flatten().map(Val::ints).transpose()
}

fn dims(v: &[i64]) -> R<Vec<usize>> {
    v.iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is negative")))
        .collect()
}

/// Applies a generic kernel to whichever element type `$v` holds.
macro_rules! any_kind {
    ($v:expr, |$s:ident, $d:ident| $body:expr) => {
        match $v {
            Val::F($s, $d) => {
                let (s, d) = $body?;
                Val::F(s, Arc::new(d))
            }
            Val::I($s, $d) => {
                let (s, d) = $body?;
                Val::I(s, Arc::new(d))
            }
            Val::B($s, $d) => {
                let (s, d) = $body?;
                Val::B(s, Arc::new(d))
            }
        }
    };
}

fn eval(op: &Op, ins: &[Option<&Val>]) -> R<Val> {
    let x = || arg(ins, 0);
    Ok(match op {
        Op::Bin(b) => binary(*b, x()?, arg(ins, 1)?)?,
        Op::Un(u) => unary(*u, x()?)?,
        Op::Gelu => {
            let (s, d) = x()?.floats()?;
            Val::f(s.to_vec(), k::map(d, k::gelu))
        }
        Op::Cast(to) => cast(x()?, *to)?,
        Op::Clip { min, max } => {
            let (s, d) = x()?.floats()?;
            let bound = |i: usize, attr: Option<f32>, none: f32| -> R<f32> {
                Ok(match ins.get(i).copied().flatten() {
                    Some(v) => v.scalar()? as f32,
                    None => attr.unwrap_or(none),
                })
            };
            let (lo, hi) = (
                bound(1, *min, f32::NEG_INFINITY)?,
                bound(2, *max, f32::INFINITY)?,
            );
            Val::f(s.to_vec(), k::map(d, |v| v.max(lo).min(hi)))
        }
        Op::Identity => x()?.clone(),
        Op::Shape { start, end } => {
            let s = x()?.shape();
            let r = s.len() as i64;
            let fix = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (a, b) = (fix(*start), fix(end.unwrap_or(r)));
            let v: Vec<i64> = s[a..b.max(a)].iter().map(|&d| d as i64).collect();
            Val::I(vec![v.len()], Arc::new(v))
        }
        Op::Gather(axis) => {
            let Val::I(si, idx) = arg(ins, 1)? else {
                return Err("Gather indices must be integers".into());
            };
            any_kind!(x()?, |s, d| k::gather(s, d, *axis, si, idx))
        }
        Op::Unsqueeze(axes) => {
            let v = x()?;
            let axes = match axes {
                Some(a) => a.clone(),
                None => arg(ins, 1)?.ints()?,
            };
            let rank = v.shape().len() + axes.len();
            let mut at: Vec<usize> = axes.iter().map(|&a| k::axis(a, rank)).collect::<R<_>>()?;
            at.sort_unstable();
            at.dedup();
            if at.len() != axes.len() {
                return Err(format!("repeated axes {axes:?}"));
            }
            let mut shape = v.shape().to_vec();
            for a in at {
                shape.insert(a, 1);
            }
            v.reshaped(shape)?
        }
        Op::Squeeze(axes) => {
            let v = x()?;
            let axes = match axes {
                Some(a) => Some(a.clone()),
                None => opt_ints(ins, 1)?,
            };
            let s = v.shape();
            let drop: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&a| k::axis(a, s.len())).collect::<R<_>>()?,
                None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
            };
            if let Some(&bad) = drop.iter().find(|&&a| s[a] != 1) {
                return Err(format!("cannot squeeze axis {bad} of {s:?}"));
            }
            let shape = s
                .iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, &d)| d)
                .collect();
            v.reshaped(shape)?
        }
        Op::Concat(axis) => {
            let vs: Vec<&Val> = ins.iter().flatten().copied().collect();
            let first = vs.first().ok_or("Concat of nothing")?;
            // Every part must hold the first one's element type.
            fn parts<'a, T>(
                vs: &[&'a Val],
                pick: impl Fn(&'a Val) -> Option<(&'a [usize], &'a [T])>,
            ) -> R<Vec<(&'a [usize], &'a [T])>> {
                vs.iter()
                    .map(|v| {
                        pick(v).ok_or_else(|| "Concat of tensors of different element types".into())
                    })
                    .collect()
            }
            match first {
                Val::F(..) => {
                    let p = parts(&vs, |v| v.floats().ok())?;
                    let (s, d) = k::concat(&p, *axis)?;
                    Val::f(s, d)
                }
                Val::I(..) => {
                    let p = parts(&vs, |v| match v {
                        Val::I(s, d) => Some((&s[..], &d[..])),
                        _ => None,
                    })?;
                    let (s, d) = k::concat(&p, *axis)?;
                    Val::I(s, Arc::new(d))
                }
                Val::B(..) => {
                    let p = parts(&vs, |v| match v {
                        Val::B(s, d) => Some((&s[..], &d[..])),
                        _ => None,
                    })?;
                    let (s, d) = k::concat(&p, *axis)?;
                    Val::B(s, Arc::new(d))
                }
            }
        }
        Op::Reshape(allowzero) => {
            let v = x()?;
            v.reshaped(k::reshape_target(
                v.shape(),
                &arg(ins, 1)?.ints()?,
                *allowzero,
            )?)?
        }
        Op::Flatten(axis) => {
            let v = x()?;
            let s = v.shape();
            let r = s.len() as i64;
            if *axis < -r || *axis > r {
                return Err(format!("axis {axis} is out of range for rank {r}"));
            }
            let a = if *axis < 0 { axis + r } else { *axis } as usize;
            v.reshaped(vec![k::numel(&s[..a]), k::numel(&s[a..])])?
        }
        Op::Transpose(perm) => {
            let v = x()?;
            let perm: Vec<usize> = perm
                .clone()
                .unwrap_or_else(|| (0..v.shape().len()).rev().collect());
            any_kind!(v, |s, d| k::transpose(s, d, &perm))
        }
        Op::Slice => {
            let (starts, ends) = (arg(ins, 1)?.ints()?, arg(ins, 2)?.ints()?);
            let (axes, steps) = (opt_ints(ins, 3)?, opt_ints(ins, 4)?);
            any_kind!(x()?, |s, d| k::slice(
                s,
                d,
                &starts,
                &ends,
                axes.as_deref(),
                steps.as_deref()
            ))
        }
        Op::Expand => {
            let to = dims(&arg(ins, 1)?.ints()?)?;
            any_kind!(x()?, |s, d| k::expand(s, d, &to))
        }
        Op::ConstantOfShape(v) => {
            let shape = dims(&x()?.ints()?)?;
            let n = k::checked_numel(&shape)?;
            match v {
                Val::F(_, d) => Val::f(shape, vec![*d.first().ok_or("an empty fill value")?; n]),
                Val::I(_, d) => Val::I(
                    shape,
                    Arc::new(vec![*d.first().ok_or("an empty fill value")?; n]),
                ),
                Val::B(_, d) => Val::B(
                    shape,
                    Arc::new(vec![*d.first().ok_or("an empty fill value")?; n]),
                ),
            }
        }
        Op::Range => {
            let (a, b, c) = (x()?, arg(ins, 1)?, arg(ins, 2)?);
            let (start, limit, delta) = (a.scalar()?, b.scalar()?, c.scalar()?);
            if delta == 0.0 {
                return Err("Range with a step of 0".into());
            }
            let n = ((limit - start) / delta).ceil().max(0.0);
            if n > k::MAX_ELEMENTS as f64 {
                return Err(format!("Range of {n} values"));
            }
            let n = n as usize;
            match (a, b, c) {
                (Val::I(..), Val::I(..), Val::I(..)) => {
                    let (s, d) = (start as i64, delta as i64);
                    Val::I(
                        vec![n],
                        Arc::new((0..n as i64).map(|i| s + i * d).collect()),
                    )
                }
                _ => Val::f(
                    vec![n],
                    (0..n).map(|i| (start + i as f64 * delta) as f32).collect(),
                ),
            }
        }
        Op::Where => {
            let Val::B(sc, c) = x()? else {
                return Err("Where's condition must be boolean".into());
            };
            match (arg(ins, 1)?, arg(ins, 2)?) {
                (Val::F(sx, dx), Val::F(sy, dy)) => {
                    let (s, d) = k::select(sc, c, sx, dx, sy, dy)?;
                    Val::f(s, d)
                }
                (Val::I(sx, dx), Val::I(sy, dy)) => {
                    let (s, d) = k::select(sc, c, sx, dx, sy, dy)?;
                    Val::I(s, Arc::new(d))
                }
                (Val::B(sx, dx), Val::B(sy, dy)) => {
                    let (s, d) = k::select(sc, c, sx, dx, sy, dy)?;
                    Val::B(s, Arc::new(d))
                }
                (p, q) => return Err(format!("Where of {} and {} tensors", p.kind(), q.kind())),
            }
        }
        Op::MatMul { bt, gelu } => {
            let (sa, a) = x()?.floats()?;
            let (sb, b) = arg(ins, 1)?.floats()?;
            let (s, mut y) = k::matmul(sa, a, sb, b, *bt)?;
            let n = s.last().copied().unwrap_or(1);
            let bias = ins
                .get(2)
                .copied()
                .flatten()
                .map(|v| v.floats())
                .transpose()?;
            if bias.is_some_and(|(_, b)| b.len() != n) {
                return Err(format!("a bias of the wrong length for {n} outputs"));
            }
            k::bias_gelu(&mut y, n, bias.map(|(_, b)| b), *gelu);
            Val::f(s, y)
        }
        Op::Gemm {
            alpha,
            beta,
            ta,
            tb,
        } => {
            let (sa, a) = x()?.floats()?;
            let (sb, b) = arg(ins, 1)?.floats()?;
            if sa.len() != 2 || sb.len() != 2 {
                return Err("Gemm takes 2-D inputs".into());
            }
            let at;
            let (sa, a): (&[usize], &[f32]) = if *ta {
                at = k::transpose(sa, a, &[1, 0])?;
                (&at.0, &at.1)
            } else {
                (sa, a)
            };
            let (s, mut y) = k::matmul(sa, a, sb, b, *tb)?;
            if *alpha != 1.0 {
                y.iter_mut().for_each(|v| *v *= alpha);
            }
            match ins.get(2).copied().flatten() {
                Some(c) => {
                    let (sc, c) = c.floats()?;
                    let beta = *beta;
                    let (s2, y2) = k::zip_map(&s, &y, sc, c, |p, q| p + beta * q)?;
                    if s2 != s {
                        return Err(format!("Gemm's C {sc:?} does not broadcast to {s:?}"));
                    }
                    Val::f(s2, y2)
                }
                None => Val::f(s, y),
            }
        }
        Op::Softmax { axis, legacy } => {
            let (s, d) = x()?.floats()?;
            Val::f(s.to_vec(), k::softmax(s, d, *axis, *legacy)?)
        }
        Op::LayerNorm { axis, eps } => {
            let (s, d) = x()?.floats()?;
            let (_, scale) = arg(ins, 1)?.floats()?;
            let bias = ins
                .get(2)
                .copied()
                .flatten()
                .map(|v| v.floats())
                .transpose()?;
            Val::f(
                s.to_vec(),
                k::layer_norm(s, d, *axis, *eps, scale, bias.map(|b| b.1))?,
            )
        }
        Op::Reduce {
            kind,
            axes,
            keepdims,
            noop_empty,
        } => {
            let v = x()?;
            let (s, d) = v.floats()?;
            let axes = match axes {
                Some(a) => a.clone(),
                None => opt_ints(ins, 1)?.unwrap_or_default(),
            };
            if axes.is_empty() && *noop_empty {
                return Ok(v.clone());
            }
            let mut at: Vec<usize> = if axes.is_empty() {
                (0..s.len()).collect()
            } else {
                axes.iter()
                    .map(|&a| k::axis(a, s.len()))
                    .collect::<R<_>>()?
            };
            at.sort_unstable();
            at.dedup();
            let (s, d) = k::reduce(s, d, &at, *keepdims, *kind);
            Val::f(s, d)
        }
    })
}

fn binary(b: Bin, x: &Val, y: &Val) -> R<Val> {
    macro_rules! zip {
        ($sa:expr, $a:expr, $sb:expr, $bb:expr, $wrap:expr, |$p:ident, $q:ident| $e:expr) => {{
            let (s, d) = k::zip_map($sa, $a, $sb, $bb, |$p, $q| $e)?;
            $wrap(s, d)
        }};
    }
    let fv = |s, d| Val::F(s, Arc::new(d));
    let iv = |s, d| Val::I(s, Arc::new(d));
    let bv = |s, d| Val::B(s, Arc::new(d));
    let unsupported = || format!("{b:?} of {} and {} tensors", x.kind(), y.kind());
    Ok(match (x, y) {
        (Val::F(sa, a), Val::F(sb, c)) => {
            let (a, c) = (&a[..], &c[..]);
            match b {
                Bin::Add => zip!(sa, a, sb, c, fv, |p, q| p + q),
                Bin::Sub => zip!(sa, a, sb, c, fv, |p, q| p - q),
                Bin::Mul => zip!(sa, a, sb, c, fv, |p, q| p * q),
                Bin::Div => zip!(sa, a, sb, c, fv, |p, q| p / q),
                Bin::Pow => zip!(sa, a, sb, c, fv, |p, q| if q == 2.0 {
                    p * p
                } else {
                    p.powf(q)
                }),
                Bin::Max => zip!(sa, a, sb, c, fv, |p, q| p.max(q)),
                Bin::Min => zip!(sa, a, sb, c, fv, |p, q| p.min(q)),
                Bin::Equal => zip!(sa, a, sb, c, bv, |p, q| p == q),
                Bin::Less => zip!(sa, a, sb, c, bv, |p, q| p < q),
                Bin::Greater => zip!(sa, a, sb, c, bv, |p, q| p > q),
                Bin::LessEq => zip!(sa, a, sb, c, bv, |p, q| p <= q),
                Bin::GreaterEq => zip!(sa, a, sb, c, bv, |p, q| p >= q),
                Bin::And | Bin::Or | Bin::Mod => return Err(unsupported()),
            }
        }
        (Val::I(sa, a), Val::I(sb, c)) => {
            let (a, c) = (&a[..], &c[..]);
            match b {
                Bin::Add => zip!(sa, a, sb, c, iv, |p, q| p.wrapping_add(q)),
                Bin::Sub => zip!(sa, a, sb, c, iv, |p, q| p.wrapping_sub(q)),
                Bin::Mul => zip!(sa, a, sb, c, iv, |p, q| p.wrapping_mul(q)),
                // Integer division by zero is undefined in ONNX; 0 here rather than a panic.
                Bin::Div => zip!(sa, a, sb, c, iv, |p, q| p.checked_div(q).unwrap_or(0)),
                Bin::Pow => zip!(sa, a, sb, c, iv, |p, q| (p as f64).powf(q as f64) as i64),
                Bin::Mod => zip!(sa, a, sb, c, iv, |p, q| match p.checked_rem(q) {
                    Some(r) if r != 0 && (r < 0) != (q < 0) => r + q,
                    Some(r) => r,
                    None => 0,
                }),
                Bin::Max => zip!(sa, a, sb, c, iv, |p, q| p.max(q)),
                Bin::Min => zip!(sa, a, sb, c, iv, |p, q| p.min(q)),
                Bin::Equal => zip!(sa, a, sb, c, bv, |p, q| p == q),
                Bin::Less => zip!(sa, a, sb, c, bv, |p, q| p < q),
                Bin::Greater => zip!(sa, a, sb, c, bv, |p, q| p > q),
                Bin::LessEq => zip!(sa, a, sb, c, bv, |p, q| p <= q),
                Bin::GreaterEq => zip!(sa, a, sb, c, bv, |p, q| p >= q),
                Bin::And | Bin::Or => return Err(unsupported()),
            }
        }
        (Val::B(sa, a), Val::B(sb, c)) => {
            let (a, c) = (&a[..], &c[..]);
            match b {
                Bin::And => zip!(sa, a, sb, c, bv, |p, q| p && q),
                Bin::Or => zip!(sa, a, sb, c, bv, |p, q| p || q),
                Bin::Equal => zip!(sa, a, sb, c, bv, |p, q| p == q),
                _ => return Err(unsupported()),
            }
        }
        _ => return Err(unsupported()),
    })
}

fn unary(u: Un, x: &Val) -> R<Val> {
    Ok(match (u, x) {
        (Un::Not, Val::B(s, d)) => Val::B(s.clone(), Arc::new(k::map(d, |v| !v))),
        (Un::IsNaN, Val::F(s, d)) => Val::B(s.clone(), Arc::new(k::map(d, f32::is_nan))),
        (Un::Neg, Val::I(s, d)) => Val::I(s.clone(), Arc::new(k::map(d, i64::wrapping_neg))),
        (Un::Abs, Val::I(s, d)) => Val::I(s.clone(), Arc::new(k::map(d, i64::wrapping_abs))),
        (_, Val::F(s, d)) => {
            let d: &[f32] = d;
            let v = match u {
                Un::Erf => k::map(d, k::erf),
                Un::Sqrt => k::map(d, f32::sqrt),
                Un::Exp => k::map(d, f32::exp),
                Un::Log => k::map(d, f32::ln),
                Un::Tanh => k::map(d, f32::tanh),
                Un::Relu => k::map(d, |v| v.max(0.0)),
                Un::Sigmoid => k::map(d, |v| 1.0 / (1.0 + (-v).exp())),
                Un::Neg => k::map(d, |v| -v),
                Un::Abs => k::map(d, f32::abs),
                Un::Reciprocal => k::map(d, |v| 1.0 / v),
                Un::Not | Un::IsNaN => return Err(format!("{u:?} of a float tensor")),
            };
            Val::f(s.clone(), v)
        }
        _ => return Err(format!("{u:?} of a {} tensor", x.kind())),
    })
}

/// An integer wrapped to ONNX integer type `to` (uint8 2, int8 3, uint16 4, int16 5, int32 6,
/// int64 7, uint32 12, uint64 13), held as i64.
fn narrow(v: i64, to: i32) -> i64 {
    match to {
        2 => v as u8 as i64,
        3 => v as i8 as i64,
        4 => v as u16 as i64,
        5 => v as i16 as i64,
        6 => v as i32 as i64,
        12 => v as u32 as i64,
        _ => v,
    }
}

/// `Cast` to an ONNX element type: floats (f32, f64 kept as f32), integers (wrapped to the
/// target's width), booleans.
fn cast(x: &Val, to: i32) -> R<Val> {
    Ok(match (to, x) {
        (1 | 11, Val::F(..)) | (7 | 13, Val::I(..)) | (9, Val::B(..)) => x.clone(),
        (2..=6 | 12, Val::I(s, d)) => Val::I(s.clone(), Arc::new(k::map(d, |v| narrow(v, to)))),
        (1 | 11, Val::I(s, d)) => Val::f(s.clone(), k::map(d, |v| v as f32)),
        (1 | 11, Val::B(s, d)) => Val::f(s.clone(), k::map(d, |v| v as u8 as f32)),
        // Rust's `as` saturates and sends NaN to 0, where C leaves them undefined.
        (2..=7 | 12 | 13, Val::F(s, d)) => {
            Val::I(s.clone(), Arc::new(k::map(d, |v| narrow(v as i64, to))))
        }
        (2..=7 | 12 | 13, Val::B(s, d)) => Val::I(s.clone(), Arc::new(k::map(d, |v| v as i64))),
        (9, Val::F(s, d)) => Val::B(s.clone(), Arc::new(k::map(d, |v| v != 0.0))),
        (9, Val::I(s, d)) => Val::B(s.clone(), Arc::new(k::map(d, |v| v != 0))),
        _ => {
            return Err(format!(
                "Cast of a {} tensor to element type {to}",
                x.kind()
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_mod_takes_the_divisors_sign() {
        // ONNX Mod with fmod = 0 is Python's %, worked by hand: 7 % 3, -7 % 3, 7 % -3, -7 % -3.
        let a = Val::I(vec![4], Arc::new(vec![7, -7, 7, -7]));
        let b = Val::I(vec![4], Arc::new(vec![3, 3, -3, -3]));
        let Val::I(_, r) = binary(Bin::Mod, &a, &b).unwrap() else {
            panic!("an integer result")
        };
        assert_eq!(&r[..], &[1, 2, -2, -1]);
    }

    #[test]
    fn casts_wrap_to_the_target_width() {
        // Two's-complement wrapping, as C casts and onnxruntime do: 3e9 → int32, 300 → uint8,
        // 200 → int8.
        let a = Val::I(vec![3], Arc::new(vec![3_000_000_000, 300, 200]));
        let Val::I(_, r) = cast(&a, 6).unwrap() else {
            panic!("integers")
        };
        assert_eq!(r[0], -1_294_967_296);
        let Val::I(_, r) = cast(&a, 2).unwrap() else {
            panic!("integers")
        };
        assert_eq!(r[1], 44);
        let Val::I(_, r) = cast(&Val::f(vec![1], vec![200.0]), 3).unwrap() else {
            panic!("integers")
        };
        assert_eq!(r[0], -56);
    }
}
