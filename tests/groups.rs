//! Dependency groups: the bundled residual CNN listed exactly, the CLI's JSON, and graphs
//! with a Concat, a Flatten, shared and blocking operations checked by hand.

use std::process::Command;

use prunescope::graph::{Graph, Groups, Member};
use prunescope::model::Model;
use prunescope::train::Trainable;

fn m(tensor: &str, axis: usize) -> Member {
    Member {
        tensor: tensor.into(),
        axis,
        offset: 0,
        per_channel: 1,
    }
}

fn names(members: &[Member]) -> Vec<(String, usize, usize, usize)> {
    members
        .iter()
        .map(|m| (m.tensor.clone(), m.axis, m.offset, m.per_channel))
        .collect()
}

fn sample_groups(name: &str) -> Groups {
    let path = format!("sample_models/{name}.safetensors");
    let model = Model::open(std::path::Path::new(&path)).unwrap();
    Trainable::graph_of(&model)
        .unwrap()
        .dependency_groups(&model)
        .unwrap()
}

#[test]
fn the_residual_cnn_has_exactly_its_two_groups() {
    let g = sample_groups("digits_rescnn");
    let bn = |p: &str| {
        ["weight", "bias", "running_mean", "running_var"]
            .map(|r| m(&format!("{p}.{r}"), 0))
            .to_vec()
    };
    // The stem's channels and the residual block's output are one channel space (the Add),
    // read by the block's first conv and, after pooling, by the classifier.
    let mut stem = vec![m("conv1.weight", 0), m("conv1.bias", 0)];
    stem.extend(bn("bn1"));
    stem.push(m("block.conv1.weight", 1));
    stem.extend([m("block.conv2.weight", 0), m("block.conv2.bias", 0)]);
    stem.extend(bn("block.bn2"));
    stem.push(m("fc.weight", 1));
    let mut inner = vec![m("block.conv1.weight", 0), m("block.conv1.bias", 0)];
    inner.extend(bn("block.bn1"));
    inner.push(m("block.conv2.weight", 1));
    assert_eq!(g.groups.len(), 2, "{g:#?}");
    assert_eq!(g.groups[0].channels, 16);
    assert_eq!(names(&g.groups[0].members), names(&stem));
    assert_eq!(g.groups[1].channels, 16);
    assert_eq!(names(&g.groups[1].members), names(&inner));
    // The classifier's outputs are the model's: never pruned.
    assert_eq!(g.blocked.len(), 1);
    assert_eq!(g.blocked[0].tensors, ["fc.weight", "fc.bias"]);
    assert_eq!(g.blocked[0].channels, 10);
}

#[test]
fn a_flatten_widens_each_channel_into_the_linear_after_it() {
    let g = sample_groups("digits_cnn");
    assert_eq!(g.groups.len(), 2);
    assert_eq!(
        names(&g.groups[1].members),
        names(&[
            m("conv2.weight", 0),
            m("conv2.bias", 0),
            // 32 channels of 4×4 pixels: channel c is fc inputs 16c..16c+15.
            Member {
                per_channel: 16,
                ..m("fc.weight", 1)
            },
        ])
    );
}

#[test]
fn the_cli_prints_the_groups_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args([
            "groups",
            "sample_models/digits_rescnn.safetensors",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[1]["channels"], 16);
    assert_eq!(
        groups[1]["members"][0],
        serde_json::json!({"tensor": "block.conv1.weight", "axis": 0})
    );
    // A model without a graph: a one-line reason, exit code 1.
    let out = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(["groups", "tests/fixtures/onnx/encoder_two_inputs.onnx"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Gather"), "{err}");
}

/// A model of zeros with these tensors and this graph.
fn graph_model(graph: serde_json::Value, shapes: &[(&str, Vec<usize>)]) -> (Graph, Model) {
    let tensors = shapes
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone(), vec![0.1; s.iter().product()]))
        .collect();
    let model = Model::from_f32_tensors("graph", tensors);
    (Graph::from_json(&graph.to_string()).unwrap(), model)
}

fn conv(name: &str, input: &str, output: &str, groups: usize) -> serde_json::Value {
    serde_json::json!({"name": name, "op": "conv2d", "weight": format!("{name}.weight"),
        "bias": format!("{name}.bias"), "padding": [1, 1], "groups": groups,
        "inputs": [input], "output": output})
}

#[test]
fn a_concat_offsets_its_inputs_channels_in_the_layer_that_reads_it() {
    let (g, model) = graph_model(
        serde_json::json!({"kind": "graph", "inputs": [{"name": "x", "shape": [2, 5, 5]}],
        "output": "out", "nodes": [
            conv("a", "x", "ya", 1), conv("b", "x", "yb", 1),
            {"name": "cat", "op": "concat", "axis": 0, "inputs": ["ya", "yb"], "output": "y"},
            conv("c", "y", "yc", 1),
            {"name": "flat", "op": "flatten", "inputs": ["yc"], "output": "f"},
            {"name": "fc", "op": "linear", "weight": "fc.weight", "inputs": ["f"], "output": "out"}
        ]}),
        &[
            ("a.weight", vec![4, 2, 3, 3]),
            ("a.bias", vec![4]),
            ("b.weight", vec![3, 2, 3, 3]),
            ("b.bias", vec![3]),
            ("c.weight", vec![6, 7, 3, 3]),
            ("c.bias", vec![6]),
            ("fc.weight", vec![3, 150]),
        ],
    );
    let groups = g.dependency_groups(&model).unwrap();
    let lists: Vec<_> = groups
        .groups
        .iter()
        .map(|g| (g.channels, names(&g.members)))
        .collect();
    assert_eq!(
        lists,
        vec![
            (
                4,
                names(&[m("a.weight", 0), m("a.bias", 0), m("c.weight", 1)])
            ),
            (
                3,
                names(&[
                    m("b.weight", 0),
                    m("b.bias", 0),
                    Member {
                        offset: 4,
                        ..m("c.weight", 1)
                    }
                ])
            ),
            (
                6,
                names(&[
                    m("c.weight", 0),
                    m("c.bias", 0),
                    Member {
                        per_channel: 25,
                        ..m("fc.weight", 1)
                    }
                ])
            ),
        ]
    );
}

#[test]
fn channels_that_a_matmul_a_layer_norm_or_a_grouped_conv_needs_are_not_prunable() {
    let (g, model) = graph_model(
        serde_json::json!({"kind": "graph", "inputs": [{"name": "x", "shape": [6, 6]}],
        "output": "out", "nodes": [
            {"name": "q", "op": "linear", "weight": "q.weight", "inputs": ["x"], "output": "yq"},
            {"name": "k", "op": "linear", "weight": "k.weight", "inputs": ["x"], "output": "yk"},
            {"name": "v", "op": "linear", "weight": "v.weight", "inputs": ["x"], "output": "yv"},
            {"name": "ln", "op": "layer_norm", "weight": "ln.weight", "inputs": ["yv"], "output": "n"},
            {"name": "up", "op": "linear", "weight": "up.weight", "inputs": ["n"], "output": "u"},
            {"name": "act", "op": "relu", "inputs": ["u"], "output": "r"},
            {"name": "down", "op": "linear", "weight": "down.weight", "inputs": ["r"], "output": "d"},
            {"name": "att", "op": "mat_mul", "inputs": ["yq", "yk"], "output": "out0"},
            {"name": "res", "op": "add", "inputs": ["d", "x"], "output": "out"}
        ]}),
        &[
            ("q.weight", vec![6, 6]),
            ("k.weight", vec![4, 6]),
            ("v.weight", vec![6, 6]),
            ("ln.weight", vec![6]),
            ("up.weight", vec![12, 6]),
            ("down.weight", vec![6, 12]),
        ],
    );
    let groups = g.dependency_groups(&model).unwrap();
    // Only the MLP's hidden channels can go.
    assert_eq!(groups.groups.len(), 1, "{groups:#?}");
    assert_eq!(
        names(&groups.groups[0].members),
        names(&[m("up.weight", 0), m("down.weight", 1)])
    );
    let why = |t: &str| {
        groups
            .blocked
            .iter()
            .find(|b| b.tensors[0] == t)
            .map(|b| b.why.clone())
            .unwrap_or_default()
    };
    assert!(
        why("q.weight").contains("matmul 'att'"),
        "{}",
        why("q.weight")
    );
    assert!(
        why("v.weight").contains("layer_norm 'ln'"),
        "{}",
        why("v.weight")
    );
    assert!(
        why("down.weight").contains("cannot be removed"),
        "{}",
        why("down.weight")
    );

    let (g, model) = graph_model(
        serde_json::json!({"kind": "graph", "inputs": [{"name": "x", "shape": [4, 5, 5]}],
        "output": "out", "nodes": [
            conv("a", "x", "ya", 1), conv("dw", "ya", "yd", 4),
            {"name": "pool", "op": "global_avg_pool", "inputs": ["yd"], "output": "p"},
            {"name": "fc", "op": "linear", "weight": "fc.weight", "inputs": ["p"], "output": "out"}
        ]}),
        &[
            ("a.weight", vec![4, 4, 3, 3]),
            ("a.bias", vec![4]),
            ("dw.weight", vec![8, 1, 3, 3]),
            ("dw.bias", vec![8]),
            ("fc.weight", vec![2, 8]),
        ],
    );
    let groups = g.dependency_groups(&model).unwrap();
    assert!(groups.groups.is_empty(), "{groups:#?}");
    assert!(groups.blocked.iter().any(|b| b.why.contains("grouped")));
}

#[test]
fn channels_a_concat_would_shift_by_a_fraction_or_a_batchnorm_reads_across_are_not_prunable() {
    // A tabular input of 3 features beside a conv's 4 channels of 2 × 2 flattened: the fixed
    // part is not whole channels, so the conv's channels cannot be located in fc's inputs.
    let (g, model) = graph_model(
        serde_json::json!({"kind": "graph",
        "inputs": [{"name": "img", "shape": [1, 2, 2]}, {"name": "tab", "shape": [3]}],
        "output": "out", "nodes": [
            conv("a", "img", "ya", 1),
            {"name": "flat", "op": "flatten", "inputs": ["ya"], "output": "f"},
            {"name": "cat", "op": "concat", "axis": 0, "inputs": ["tab", "f"], "output": "c"},
            {"name": "fc", "op": "linear", "weight": "fc.weight", "inputs": ["c"], "output": "out"}
        ]}),
        &[
            ("a.weight", vec![4, 1, 3, 3]),
            ("a.bias", vec![4]),
            ("fc.weight", vec![2, 19]),
        ],
    );
    let groups = g.dependency_groups(&model).unwrap();
    assert!(groups.groups.is_empty(), "{groups:#?}");
    assert!(groups.blocked.iter().any(|b| b.tensors[0] == "a.weight"));

    // A Linear's outputs on the last axis of [8, 32], normalised by a BatchNorm over the 8.
    let (g, model) = graph_model(
        serde_json::json!({"kind": "graph", "inputs": [{"name": "x", "shape": [8, 16]}],
        "output": "out", "nodes": [
            {"name": "up", "op": "linear", "weight": "up.weight", "inputs": ["x"], "output": "u"},
            {"name": "bn", "op": "batch_norm", "weight": "bn.weight", "bias": "bn.bias",
             "running_mean": "bn.mean", "running_var": "bn.var", "inputs": ["u"], "output": "b"},
            {"name": "down", "op": "linear", "weight": "down.weight", "inputs": ["b"], "output": "out"}
        ]}),
        &[
            ("up.weight", vec![32, 16]),
            ("bn.weight", vec![8]),
            ("bn.bias", vec![8]),
            ("bn.mean", vec![8]),
            ("bn.var", vec![8]),
            ("down.weight", vec![4, 32]),
        ],
    );
    let groups = g.dependency_groups(&model).unwrap();
    assert!(groups.groups.is_empty(), "{groups:#?}");
    let up = groups
        .blocked
        .iter()
        .find(|b| b.tensors[0] == "up.weight")
        .unwrap();
    assert!(
        up.why.contains("normalises along another axis"),
        "{}",
        up.why
    );
}
