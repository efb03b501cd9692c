//! Compaction: a structurally pruned model made physically smaller. Every channel whose
//! readers' slices are all zero is removed from each tensor of its dependency group; what
//! remains is a dense model with narrower layers that computes exactly what the masked one
//! does (nothing reads a removed channel, so nothing downstream changes).

use serde::Serialize;

use crate::graph::Groups;
use crate::model::Model;
use crate::prune::MaskSet;

/// A compacted model and what compaction realised.
pub struct Compacted {
    /// The smaller model: every tensor f32, the input's metadata (its graph) kept.
    pub model: Model,
    pub report: CompactReport,
    /// Only the original ONNX graph can run it (attention heads removed from a graph that
    /// only tract runs): it is written as ONNX only.
    pub onnx_only: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompactReport {
    /// Per dependency group: its channels, and how many compaction removed.
    pub groups: Vec<GroupCut>,
    pub params_before: u64,
    pub params_after: u64,
    /// Multiply-adds per sample of the Linear and Conv2d layers, dense, before and after
    /// (`None` for graphs only tract runs, whose per-sample cost prunescope does not count).
    pub macs_before: Option<u64>,
    pub macs_after: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupCut {
    /// The tensors that make the group's channels.
    pub producers: Vec<String>,
    pub channels: usize,
    pub removed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("{0}")]
    Onnx(String),
    #[error(transparent)]
    Write(#[from] super::ExportError),
    #[error("compaction follows the model's graph, and {0}")]
    NoGraph(String),
    #[error("{0}")]
    Graph(#[from] crate::graph::GraphError),
    #[error(
        "nothing to compact: no channel of any dependency group is unused (structured masks, \
         --granularity neuron or channel, remove whole channels; unstructured ones rarely do)"
    )]
    Nothing,
}

/// The channels of each group that no reader uses: every slice of the group on an axis other
/// than 0 (the next layers' inputs) is zero in `values`, every tensor with its masks applied.
fn unused_channels(model: &Model, values: &[Vec<f32>], groups: &Groups) -> Vec<Vec<usize>> {
    groups
        .groups
        .iter()
        .map(|g| {
            // An attention head is read by the output projection alone, its last member.
            let readers: Vec<_> = match g.head_dim {
                Some(_) => g.members.last().into_iter().collect(),
                None => g.members.iter().filter(|m| m.axis > 0).collect(),
            };
            if readers.is_empty() {
                return Vec::new();
            }
            (0..g.channels)
                .filter(|&c| {
                    readers.iter().all(|m| {
                        let Some(t) = model.find(&m.tensor) else {
                            return false;
                        };
                        if !model.tensors[t].analysable() {
                            return false;
                        }
                        let v = &values[t];
                        let shape = &model.tensors[t].shape;
                        let lo = m.offset + c * m.per_channel;
                        slice_entries(shape, m.axis, lo..lo + m.per_channel).all(|i| v[i] == 0.0)
                    })
                })
                .collect()
        })
        .collect()
}

/// Flat indices of the entries whose coordinate on `axis` lies in `range`.
fn slice_entries(
    shape: &[usize],
    axis: usize,
    range: std::ops::Range<usize>,
) -> impl Iterator<Item = usize> + '_ {
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let d = shape[axis];
    (0..outer).flat_map(move |o| {
        range
            .clone()
            .flat_map(move |c| (0..inner).map(move |k| (o * d + c) * inner + k))
    })
}

/// Removes the unused channels of every group from `model` (masks applied first).
pub fn compact(model: &Model, masks: &MaskSet) -> Result<Compacted, CompactError> {
    let (graph, groups, fixed) = match crate::train::Trainable::graph_of(model) {
        Ok(graph) => {
            let groups = graph.dependency_groups(model)?;
            let n = groups.groups.len();
            (Some(graph), groups, vec![None; n])
        }
        // A graph only tract runs: its attention heads are what can go.
        Err(e) => {
            let blocks = match model.format {
                crate::model::ModelFormat::Onnx => crate::eval::GraphInfo::read(model)
                    .map(|info| info.attention_blocks(model))
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            if blocks.is_empty() {
                return Err(CompactError::NoGraph(e));
            }
            let fixed = blocks.iter().map(|b| b.fixed.clone()).collect();
            let groups = Groups {
                groups: blocks.into_iter().map(|b| b.group).collect(),
                blocked: Vec::new(),
            };
            (None, groups, fixed)
        }
    };
    // Read once: the unused channels are found in these values and the smaller tensors are
    // gathered from them.
    let values: Vec<Vec<f32>> = (0..model.tensors.len())
        .map(|t| crate::prune::masked_f32(model, t, Some(masks)))
        .collect();
    let unused = unused_channels(model, &values, &groups);
    if unused.iter().all(Vec::is_empty) {
        return Err(CompactError::Nothing);
    }
    if let Some(why) = unused
        .iter()
        .zip(&fixed)
        .find_map(|(cs, f)| f.as_ref().filter(|_| !cs.is_empty()))
    {
        return Err(CompactError::Onnx(format!(
            "the graph cannot run with fewer heads: {why} (export the masked model instead)"
        )));
    }
    // Per tensor, per axis: which coordinates go.
    let mut gone: Vec<Vec<Vec<bool>>> = model
        .tensors
        .iter()
        .map(|e| e.shape.iter().map(|&d| vec![false; d]).collect())
        .collect();
    for (g, cs) in groups.groups.iter().zip(&unused) {
        for m in &g.members {
            let Some(t) = model.find(&m.tensor) else {
                continue;
            };
            for &c in cs {
                let lo = m.offset + c * m.per_channel;
                gone[t][m.axis][lo..lo + m.per_channel].fill(true);
            }
        }
    }
    let mut tensors = Vec::new();
    for (t, e) in model.tensors.iter().enumerate() {
        let v = &values[t];
        let keep: Vec<Vec<usize>> = gone[t]
            .iter()
            .map(|g| (0..g.len()).filter(|&i| !g[i]).collect())
            .collect();
        let shape: Vec<usize> = keep.iter().map(Vec::len).collect();
        tensors.push((e.name.clone(), shape, gather(v, &e.shape, &keep)));
    }
    let mut small = Model::from_f32_tensors("compacted", tensors);
    // An ONNX output keeps the original graph instead (`write_onnx`).
    if let Some(graph) = &graph {
        graph.describe_in(&mut small, model);
    }
    let macs = |m: &Model| -> Result<Option<u64>, CompactError> {
        let Some(graph) = &graph else {
            return Ok(None);
        };
        Ok(Some(
            graph
                .weight_uses(m)?
                .iter()
                .filter_map(|(w, uses)| {
                    m.find(w)
                        .map(|t| (*uses * m.tensors[t].numel as f64) as u64)
                })
                .sum(),
        ))
    };
    let report = CompactReport {
        groups: groups
            .groups
            .iter()
            .zip(&unused)
            .map(|(g, cs)| GroupCut {
                producers: g
                    .members
                    .iter()
                    .filter(|m| m.axis == 0 || g.head_dim.is_some())
                    .map(|m| m.tensor.clone())
                    .collect(),
                channels: g.channels,
                removed: cs.len(),
            })
            .collect(),
        params_before: model.total_params(),
        params_after: small.total_params(),
        macs_before: macs(model)?,
        macs_after: macs(&small)?,
    };
    Ok(Compacted {
        model: small,
        report,
        onnx_only: graph.is_none(),
    })
}

/// The entries of `v` (shaped `shape`) at the kept coordinates of every axis, row-major.
fn gather(v: &[f32], shape: &[usize], keep: &[Vec<usize>]) -> Vec<f32> {
    let mut out = Vec::with_capacity(keep.iter().map(Vec::len).product());
    fn walk(
        v: &[f32],
        shape: &[usize],
        keep: &[Vec<usize>],
        axis: usize,
        base: usize,
        out: &mut Vec<f32>,
    ) {
        if axis == shape.len() {
            out.push(v[base]);
            return;
        }
        for &i in &keep[axis] {
            walk(v, shape, keep, axis + 1, base * shape[axis] + i, out);
        }
    }
    if shape.is_empty() {
        out.extend_from_slice(v);
    } else {
        walk(v, shape, keep, 0, 0, &mut out);
    }
    out
}

/// Writes `c` to `path` in the format its extension names: ONNX ([`write_onnx`]), or else
/// safetensors carrying the graph.
pub fn write(
    original: &Model,
    masks: &MaskSet,
    c: &Compacted,
    path: &std::path::Path,
    progress: &crate::progress::Progress,
) -> Result<(), CompactError> {
    if super::onnx_path(path) {
        write_onnx(original, masks, c, path)
    } else if c.onnx_only {
        Err(CompactError::Onnx(format!(
            "only {}'s ONNX graph runs the smaller model (prunescope cannot describe it in \
             safetensors): write it as .onnx",
            original.display_name()
        )))
    } else {
        Ok(super::export_pruned(
            &c.model,
            &MaskSet::new(),
            path,
            progress,
        )?)
    }
}

/// Writes `c` as an ONNX model: `original`'s file with every initializer that compaction
/// narrowed or masks zeroed replaced, so onnxruntime runs the smaller model with the same graph.
pub fn write_onnx(
    original: &Model,
    masks: &MaskSet,
    c: &Compacted,
    path: &std::path::Path,
) -> Result<(), CompactError> {
    use crate::model::onnx_io::{Storage, initializers, replace_initializers};
    if original.format != crate::model::ModelFormat::Onnx {
        return Err(CompactError::Onnx(format!(
            "{} is not an ONNX model: write the compacted model as .safetensors",
            original.display_name()
        )));
    }
    let buf = original.backing_bytes();
    let inits = initializers(buf).map_err(CompactError::Onnx)?;
    let mut replace = std::collections::BTreeMap::new();
    for (e, small) in original.tensors.iter().zip(&c.model.tensors) {
        if e.shape == small.shape && masks.get(&e.name).is_none() {
            continue;
        }
        if let Some((init, _)) = inits.iter().find(|(i, _)| i.name == e.name) {
            if init.storage == Storage::External {
                return Err(CompactError::Onnx(format!(
                    "initializer '{}' is in an external data file; compacting such models to \
                     ONNX is not supported (write .safetensors)",
                    e.name
                )));
            }
            if init.dtype != crate::model::DType::F32 {
                return Err(CompactError::Onnx(format!(
                    "initializer '{}' is {}; compacted ONNX initializers are written as F32, \
                     which the graph would not accept (write .safetensors)",
                    e.name, init.dtype
                )));
            }
        }
        let t = c.model.find(&small.name).expect("same names");
        replace.insert(
            small.name.clone(),
            (small.shape.clone(), c.model.to_f32_vec(t)),
        );
    }
    let bytes = replace_initializers(buf, &replace).map_err(CompactError::Onnx)?;
    crate::util::atomic_write(path, |w| std::io::Write::write_all(w, &bytes)).map_err(|error| {
        super::ExportError::Io {
            path: path.display().to_string(),
            error,
        }
    })?;
    Ok(())
}
