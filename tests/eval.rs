//! Evaluation of users' own models: ONNX graphs exported by PyTorch, run through tract, scored
//! on user data, against what onnxruntime gives on the same data (dense, and pruned in NumPy by
//! `tools/make_onnx_fixtures.py`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use prunescope::data::DataSpec;
use prunescope::eval::{
    DataSource, EnginePref, Evaluator, evaluator_for, evaluator_with, evaluator_with_data,
};
use prunescope::model::Model;
use prunescope::progress::Progress;
use prunescope::prune::{MaskSet, PruneSettings, prune};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("digits_eval.json")).unwrap()).unwrap()
}

fn file_data(name: &str) -> DataSource {
    DataSource::File {
        path: fixture(name),
        spec: DataSpec::default(),
    }
}

/// Global magnitude pruning at sparsity `s`.
fn pruned_at(model: &Model, s: f64) -> MaskSet {
    let s = PruneSettings {
        sparsity: s,
        ..PruneSettings::default()
    };
    prune(model, &s, &Default::default(), &Progress::none())
        .unwrap()
        .masks
}

fn half(model: &Model) -> MaskSet {
    pruned_at(model, 0.5)
}

/// Fidelity against onnxruntime's on the file pruned in NumPy.
fn close_fidelity(f: &prunescope::eval::Fidelity, want: &Value) {
    close(f.cosine, &want["cosine"], 1e-5, "cosine");
    close(f.rel_l2, &want["rel_l2"], 1e-5, "rel_l2");
    close(
        f.top1_agreement,
        &want["top1_agreement"],
        1e-12,
        "top-1 agreement",
    );
}

fn close(a: f64, b: &Value, tol: f64, what: &str) {
    let b = b.as_f64().unwrap_or_else(|| panic!("{what}: no reference"));
    assert!((a - b).abs() <= tol, "{what}: ours {a}, onnxruntime {b}");
}

const DIGITS_MODELS: [&str; 4] = [
    "digits_mlp_opset13.onnx",
    "digits_mlp_opset17.onnx",
    "digits_cnn_opset13.onnx",
    "digits_cnn_opset17.onnx",
];

#[test]
fn pytorch_exports_score_what_onnxruntime_scores_dense_and_pruned() {
    let r = reference();
    for (name, engine) in DIGITS_MODELS
        .iter()
        .flat_map(|n| [(*n, EnginePref::Tract), (*n, EnginePref::Candle)])
    {
        let model = Model::open(&fixture(name)).unwrap();
        let ev = evaluator_with(&model, &file_data("digits_test.npz"), engine).unwrap();
        let dense = ev.evaluate(&model, &MaskSet::new()).unwrap();
        let want = &r[name]["dense"];
        assert_eq!(dense.samples, 360);
        // Accuracy is a count of 360: equal up to the division's rounding.
        close(dense.accuracy.unwrap(), &want["accuracy"], 1e-12, name);
        close(dense.top5.unwrap(), &want["top5"], 1e-12, name);
        close(dense.loss.unwrap(), &want["loss"], 1e-5, name);
        let pruned = ev.evaluate(&model, &half(&model)).unwrap();
        let want = &r[name]["pruned50"];
        close(pruned.accuracy.unwrap(), &want["accuracy"], 1e-12, name);
        close(pruned.loss.unwrap(), &want["loss"], 1e-4, name);
        let f = pruned.fidelity.unwrap();
        let wf = &want["fidelity"];
        close_fidelity(&f, wf);
    }
}

#[test]
fn the_candle_graph_imported_from_onnx_gives_tracts_outputs() {
    for name in DIGITS_MODELS {
        let model = Model::open(&fixture(name)).unwrap();
        let data = file_data("digits_test.npz");
        let tract = evaluator_with(&model, &data, EnginePref::Tract).unwrap();
        let candle = evaluator_with(&model, &data, EnginePref::Candle).unwrap();
        let native = evaluator_with(&model, &data, EnginePref::Native).unwrap();
        assert_eq!(tract.engine().label(), "evaluate only");
        assert_eq!(candle.engine().label(), "evaluate + train");
        let masks = half(&model);
        for m in [MaskSet::new(), masks] {
            let a = tract.outputs(&model, &m).unwrap();
            for other in [&candle, &native] {
                let b = other.outputs(&model, &m).unwrap();
                assert_eq!((a.rows, a.cols), (b.rows, b.cols));
                let worst = a
                    .values
                    .iter()
                    .zip(&b.values)
                    .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{name}, {}: outputs differ from tract's by {worst}",
                    other.engine().name
                );
            }
        }
    }
    // Auto picks one of them and says the graph trains.
    let model = Model::open(&fixture("digits_cnn_opset13.onnx")).unwrap();
    let ev = evaluator_with_data(&model, &file_data("digits_test.npz")).unwrap();
    ev.evaluate(&model, &MaskSet::new()).unwrap();
    let e = ev.engine();
    assert_eq!(e.label(), "evaluate + train");
    assert!(e.why.contains("faster"), "{}", e.why);
}

#[test]
fn a_graph_outside_the_trainable_set_says_which_node_stops_it() {
    let model = Model::open(&fixture("encoder_two_inputs.onnx")).unwrap();
    let ev = evaluator_with_data(&model, &file_data("encoder_data.npz")).unwrap();
    let e = ev.engine();
    // tract or prunescope's ONNX interpreter, whichever is faster: neither trains.
    assert!(["tract", "native"].contains(&e.name), "{}", e.name);
    assert_eq!(e.label(), "evaluate only");
    assert!(e.why.contains("Gather"), "{}", e.why);
    let err = evaluator_with(&model, &file_data("encoder_data.npz"), EnginePref::Candle)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cannot run on candle"), "{err}");
}

#[test]
fn a_two_input_encoder_without_labels_gives_fidelity() {
    let model = Model::open(&fixture("encoder_two_inputs.onnx")).unwrap();
    let ev = evaluator_with_data(&model, &file_data("encoder_data.npz")).unwrap();
    assert!(
        ev.describe().contains("without labels"),
        "{}",
        ev.describe()
    );
    let dense = ev.evaluate(&model, &MaskSet::new()).unwrap();
    assert_eq!((dense.accuracy, dense.loss), (None, None));
    scores_the_encoder_as_onnxruntime(&ev, &model);
}

/// The two-input encoder's dense embedding and its fidelity at 50 % against onnxruntime's
/// figures for the same file (tools/make_onnx_fixtures.py).
fn scores_the_encoder_as_onnxruntime(ev: &prunescope::eval::DataEvaluator, model: &Model) {
    let r = reference();
    let want = &r["encoder_two_inputs.onnx"];
    let out = ev.dense_outputs(model).unwrap();
    for (a, b) in out
        .row(0)
        .iter()
        .zip(want["dense_output_first_row"].as_array().unwrap())
    {
        close(*a as f64, b, 1e-5, "embedding");
    }
    let f = ev.evaluate(model, &half(model)).unwrap().fidelity.unwrap();
    close_fidelity(&f, &want["pruned50"]["fidelity"]);
}

#[test]
fn a_mask_change_reuses_the_plan() {
    let model = Model::open(&fixture("digits_cnn_opset17.onnx")).unwrap();
    let ev = evaluator_with(&model, &file_data("digits_test.npz"), EnginePref::Tract).unwrap();
    let dense = ev.evaluate(&model, &MaskSet::new()).unwrap();
    let mut last = None;
    for s in [0.2, 0.4, 0.6, 0.8] {
        let m = ev.evaluate(&model, &pruned_at(&model, s)).unwrap();
        last = Some(m);
    }
    assert_eq!(ev.plan_builds(), 1, "a mask change rebuilt the model");
    assert!(last.unwrap().accuracy < dense.accuracy);
    // Back to dense: the same numbers as before any pruning (no stale masked weights).
    assert_eq!(ev.evaluate(&model, &MaskSet::new()).unwrap(), dense);
}

#[test]
fn masking_a_tensor_outside_the_default_set_rebuilds_once_and_applies() {
    // BatchNorm scales are 1-D, so not prunable by default: masking one must still take effect.
    for engine in [EnginePref::Tract, EnginePref::Candle] {
        let model = Model::open(&fixture("digits_cnn_opset17.onnx")).unwrap();
        masked_bn_scale_applies(&model, engine);
    }
}

fn masked_bn_scale_applies(model: &Model, engine: EnginePref) {
    let ev = evaluator_with(model, &file_data("digits_test.npz"), engine).unwrap();
    let dense = ev.evaluate(model, &MaskSet::new()).unwrap();
    let bn = model
        .tensors
        .iter()
        .find(|t| t.shape.len() == 1 && t.name.contains("bn1.weight"))
        .unwrap();
    let mut masks = MaskSet::new();
    masks
        .insert(
            model,
            &bn.name.clone(),
            prunescope::prune::Mask::all_pruned(bn.numel),
        )
        .unwrap();
    let m = ev.evaluate(model, &masks).unwrap();
    assert!(m.accuracy < dense.accuracy, "{m:?} vs {dense:?}");
    // tract needs BatchNorm's parameters constant: one rebuild, and the dense plan is kept.
    let builds = if engine == EnginePref::Tract { 2 } else { 0 };
    assert_eq!(ev.plan_builds(), builds);
    assert_eq!(ev.evaluate(model, &MaskSet::new()).unwrap(), dense);
    assert_eq!(ev.plan_builds(), builds);
}

#[test]
fn the_bundled_digits_fit_a_model_that_takes_64_values() {
    // The default data of an ONNX model that takes 64 values (or 1×8×8) is the digits test
    // split: a different split from the fixture's, so only a sanity bound.
    for name in ["digits_mlp_opset17.onnx", "digits_cnn_opset13.onnx"] {
        let model = Model::open(&fixture(name)).unwrap();
        let ev = evaluator_for(&model).unwrap().unwrap();
        let m = ev.evaluate(&model, &MaskSet::new()).unwrap();
        assert_eq!(m.samples, 360);
        assert!(m.accuracy.unwrap() > 0.9, "{name}: {m:?}");
    }
    let enc = Model::open(&fixture("encoder_two_inputs.onnx")).unwrap();
    let e = evaluator_for(&enc).err().unwrap().to_string();
    assert!(
        e.contains("needs data") && e.contains("'input_ids' int64"),
        "{e}"
    );
}

/// Writes a safetensors data file with the given f32/i64 arrays.
fn write_data(dir: &Path, name: &str, arrays: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let tensors = arrays
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), v.clone()))
        .collect();
    let model = Model::from_f32_tensors("data", tensors);
    let path = dir.join(name);
    prunescope::export::export_pruned(&model, &MaskSet::new(), &path, &Progress::none()).unwrap();
    path
}

fn data_error(model: &str, data: &Path, spec: DataSpec) -> String {
    let model = Model::open(&fixture(model)).unwrap();
    let source = DataSource::File {
        path: data.to_path_buf(),
        spec,
    };
    match evaluator_with_data(&model, &source) {
        Ok(ev) => ev
            .evaluate(&model, &MaskSet::new())
            .unwrap_err()
            .to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn data_that_does_not_fit_is_refused_with_names_and_shapes() {
    let dir = common::tempdir("eval-data-errors");
    let p = write_data(
        &dir,
        "wide.safetensors",
        &[("x", vec![3, 63], vec![0.0; 189])],
    );
    let e = data_error("digits_cnn_opset17.onnx", &p, DataSpec::default());
    assert!(
        e.contains("'x'") && e.contains("[3, 63]") && e.contains("[samples, 1, 8, 8]"),
        "{e}"
    );
    let p = write_data(
        &dir,
        "labels.safetensors",
        &[
            ("x", vec![2, 64], vec![0.0; 128]),
            ("y", vec![2], vec![3.0, 10.0]),
        ],
    );
    let e = data_error("digits_mlp_opset17.onnx", &p, DataSpec::default());
    assert!(
        e.contains("label 1 is 10") && e.contains("10 classes"),
        "{e}"
    );
    let p = write_data(
        &dir,
        "fraction.safetensors",
        &[
            ("x", vec![2, 64], vec![0.0; 128]),
            ("y", vec![2], vec![0.5, 1.0]),
        ],
    );
    let e = data_error("digits_mlp_opset17.onnx", &p, DataSpec::default());
    assert!(e.contains("'y'") && e.contains("label 0 is 0.5"), "{e}");
    let p = write_data(
        &dir,
        "named.safetensors",
        &[("pixels", vec![2, 64], vec![0.0; 128])],
    );
    let e = data_error("digits_mlp_opset17.onnx", &p, DataSpec::default());
    assert!(e.contains("--x") && e.contains("pixels"), "{e}");
    // --x picks it; --y that is missing is an error, not silently no labels.
    let spec = DataSpec {
        x: Some("pixels".into()),
        y: Some("labels".into()),
    };
    let e = data_error("digits_mlp_opset17.onnx", &p, spec);
    assert!(e.contains("'labels'") && e.contains("missing"), "{e}");
    let spec = DataSpec {
        x: Some("pixels".into()),
        y: None,
    };
    let model = Model::open(&fixture("digits_mlp_opset17.onnx")).unwrap();
    let ev = evaluator_with_data(
        &model,
        &DataSource::File {
            path: p.clone(),
            spec,
        },
    )
    .unwrap();
    assert_eq!(ev.evaluate(&model, &MaskSet::new()).unwrap().samples, 2);
    // A two-input model needs both arrays by their input names.
    let p = write_data(
        &dir,
        "ids.safetensors",
        &[("input_ids", vec![2, 12], vec![1.0; 24])],
    );
    let e = data_error("encoder_two_inputs.onnx", &p, DataSpec::default());
    assert!(
        e.contains("'attention_mask'") && e.contains("missing"),
        "{e}"
    );
    // Float data for an integer input.
    let p = write_data(
        &dir,
        "floats.safetensors",
        &[
            ("input_ids", vec![2, 12], vec![1.0; 24]),
            ("attention_mask", vec![2, 12], vec![1.0; 24]),
        ],
    );
    let e = data_error("encoder_two_inputs.onnx", &p, DataSpec::default());
    assert!(e.contains("holds floats") && e.contains("int64"), "{e}");
    // NaN inputs.
    let mut v = vec![0.0; 128];
    v[70] = f32::NAN;
    let p = write_data(&dir, "nan.safetensors", &[("x", vec![2, 64], v)]);
    let e = data_error("digits_mlp_opset17.onnx", &p, DataSpec::default());
    assert!(e.contains("element 70 is NaN"), "{e}");
    let e = data_error(
        "digits_mlp_opset17.onnx",
        &dir.join("absent.npz"),
        DataSpec::default(),
    );
    assert!(e.contains("absent.npz"), "{e}");
}

#[test]
fn graphs_tract_cannot_run_give_errors_that_name_the_file() {
    for (name, says) in [
        ("bad_cycle.onnx", "Loop"),
        ("bad_unknown_op.onnx", "NoSuchOperator"),
    ] {
        let model = Model::open(&fixture(name)).unwrap();
        let e = match evaluator_with(&model, &file_data("digits_test.npz"), EnginePref::Tract) {
            Ok(ev) => ev.evaluate(&model, &MaskSet::new()).unwrap_err(),
            Err(e) => e,
        }
        .to_string();
        assert!(e.contains(name) && e.contains(says), "{e}");
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    common::isolate();
    let out = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_eval_prints_one_json_object_and_masks_replay_the_same_numbers() {
    let r = reference();
    let model = fixture("digits_mlp_opset17.onnx");
    let data = fixture("digits_test.npz");
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let (ok, out, err) = cli(&["eval", m, "--data", d, "--sparsity", "0.5", "--json"]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    let want = &r["digits_mlp_opset17.onnx"];
    assert_eq!(j["samples"], 360);
    close(
        j["accuracy"].as_f64().unwrap(),
        &want["pruned50"]["accuracy"],
        1e-12,
        "acc",
    );
    close(
        j["dense"]["accuracy"].as_f64().unwrap(),
        &want["dense"]["accuracy"],
        1e-12,
        "dense",
    );
    assert_eq!(j["pruned"], true);
    assert_eq!(j["path"], "evaluate + train");
    close(
        j["fidelity"]["top1_agreement"].as_f64().unwrap(),
        &want["pruned50"]["fidelity"]["top1_agreement"],
        1e-12,
        "agreement",
    );
    // The masks that `prune` writes give the same evaluation.
    let dir = common::tempdir("eval-cli");
    let masks = dir.join("m.safetensors");
    let pruned = dir.join("p.onnx");
    let (ok, _, err) = cli(&[
        "prune",
        m,
        "--sparsity",
        "0.5",
        "--out",
        pruned.to_str().unwrap(),
        "--masks",
        masks.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&[
        "eval",
        m,
        "--data",
        d,
        "--masks",
        masks.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let k: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(k["accuracy"], j["accuracy"]);
    assert_eq!(k["loss"], j["loss"]);
    // And so does the pruned ONNX file itself, evaluated dense.
    let (ok, out, err) = cli(&["eval", pruned.to_str().unwrap(), "--data", d, "--json"]);
    assert!(ok, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["accuracy"], j["accuracy"]);
    assert_eq!(p["pruned"], false);
    assert_eq!(p["fidelity"], Value::Null);
    // Unpruned: no fidelity; the human-readable form names the engine.
    let (ok, out, _) = cli(&["eval", m, "--data", d]);
    assert!(
        ok && out.contains("evaluate + train") && out.contains("dense:"),
        "{out}"
    );
    // Errors go to stderr and fail.
    let (ok, _, err) = cli(&["eval", m, "--data", "/nonexistent/d.npz"]);
    assert!(!ok && err.contains("/nonexistent/d.npz"), "{err}");
}

#[test]
fn the_sample_mlp_evaluates_on_user_data_too() {
    // The bundled sample runs on candle; a user file with its 64-value inputs feeds it.
    let sample = prunescope::sample::open_sample().unwrap();
    let ev = evaluator_with_data(&sample, &file_data("digits_test.npz")).unwrap();
    assert_eq!(ev.engine().label(), "evaluate + train");
    let m = ev.evaluate(&sample, &MaskSet::new()).unwrap();
    assert_eq!(m.samples, 360);
    assert!(m.accuracy.unwrap() > 0.9, "{m:?}");
}

#[test]
fn bench_eval_reports_medians_and_no_rebuild() {
    let model = fixture("digits_mlp_opset17.onnx");
    let data = fixture("digits_test.npz");
    let (ok, out, err) = cli(&[
        "bench",
        "eval",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--runs",
        "3",
        "--json",
    ]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert!(j["eval_ms"].as_f64().unwrap() > 0.0);
    assert!(j["dense_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(j["plan_builds"], 1);
    assert_eq!(j["samples"], 360);
    let engines: Vec<&str> = j["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["engine"].as_str().unwrap())
        .collect();
    assert_eq!(engines, ["tract", "candle", "native"]);
}

/// A small ONNX model built node by node (prost types), for import cases PyTorch rarely writes.
fn onnx_model(
    nodes: Vec<tract_onnx::pb::NodeProto>,
    inits: &[(&str, Vec<i64>)],
    x: &[i64],
) -> Model {
    use prost::Message;
    use tract_onnx::pb;
    let value_info = |name: &str, dims: &[i64]| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            denotation: String::new(),
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                        })
                        .collect(),
                }),
            })),
        }),
        doc_string: String::new(),
    };
    let initializer = inits
        .iter()
        .map(|(name, dims)| {
            let n: i64 = dims.iter().product();
            pb::TensorProto {
                name: name.to_string(),
                dims: dims.clone(),
                data_type: 1,
                raw_data: (0..n)
                    .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
                    .collect(),
                ..Default::default()
            }
        })
        .collect();
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            name: "g".into(),
            node: nodes,
            initializer,
            input: vec![value_info("x", x)],
            output: vec![value_info("out", &[])],
            ..Default::default()
        }),
        ..Default::default()
    };
    Model::from_bytes(
        "built.onnx",
        prunescope::model::ModelFormat::Onnx,
        model.encode_to_vec(),
    )
    .unwrap()
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<tract_onnx::pb::AttributeProto>,
) -> tract_onnx::pb::NodeProto {
    tract_onnx::pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

#[test]
fn the_importer_refuses_what_it_would_get_wrong() {
    use prunescope::eval::import_onnx_graph;
    use tract_onnx::pb::AttributeProto;
    let perm = AttributeProto {
        name: "perm".into(),
        ints: vec![1, 0],
        r#type: 7,
        ..Default::default()
    };
    // y = x·Wᵀ is read by the bias Add and by a ReLU: folding b into the Linear would give the
    // ReLU y + b.
    let linear = |extra: Vec<tract_onnx::pb::NodeProto>| {
        let mut nodes = vec![
            node("Transpose", &["W"], "Wt", vec![perm.clone()]),
            node("MatMul", &["x", "Wt"], "y", vec![]),
            node("Add", &["y", "b"], "z", vec![]),
        ];
        nodes.extend(extra);
        nodes
    };
    let shared = onnx_model(
        linear(vec![
            node("Relu", &["y"], "r", vec![]),
            node("Add", &["z", "r"], "out", vec![]),
        ]),
        &[("W", vec![3, 4]), ("b", vec![3])],
        &[2, 4],
    );
    let e = import_onnx_graph(&shared).unwrap_err();
    assert!(e.contains("read elsewhere"), "{e}");
    // The sole reader: the bias folds, and the graph is a Linear.
    let single = onnx_model(
        linear(vec![node("Relu", &["z"], "out", vec![])]),
        &[("W", vec![3, 4]), ("b", vec![3])],
        &[2, 4],
    );
    let g = import_onnx_graph(&single).unwrap();
    assert_eq!(g.nodes.len(), 2, "{g:?}");
    // A weight of another shape is not a bias.
    let pos = onnx_model(
        linear(vec![node("Relu", &["z"], "out", vec![])]),
        &[("W", vec![3, 4]), ("b", vec![2, 3])],
        &[2, 4],
    );
    let e = import_onnx_graph(&pos).unwrap_err();
    assert!(e.contains("not a [out] bias"), "{e}");
    // A pool with auto_pad SAME would be imported unpadded.
    let attr_ints = |name: &str, v: Vec<i64>| AttributeProto {
        name: name.into(),
        ints: v,
        r#type: 7,
        ..Default::default()
    };
    let same = AttributeProto {
        name: "auto_pad".into(),
        s: b"SAME_UPPER".to_vec(),
        r#type: 3,
        ..Default::default()
    };
    let pool = onnx_model(
        vec![node(
            "MaxPool",
            &["x"],
            "out",
            vec![
                attr_ints("kernel_shape", vec![3, 3]),
                attr_ints("strides", vec![2, 2]),
                same,
            ],
        )],
        &[("unused", vec![2, 2])],
        &[1, 1, 8, 8],
    );
    let e = import_onnx_graph(&pool).unwrap_err();
    assert!(e.contains("MaxPool"), "{e}");
}

#[test]
fn a_model_exported_with_a_fixed_batch_runs_in_batches_of_that_size() {
    // cnn_bn_residual_opset17.onnx was exported without a dynamic batch axis: its input is
    // [2, 1, 8, 8]. 360 digits run as 180 batches, and every engine agrees.
    let model = Model::open(&fixture("cnn_bn_residual_opset17.onnx")).unwrap();
    let masks = half(&model);
    let run = |e| {
        evaluator_with(&model, &DataSource::Digits, e)
            .unwrap()
            .evaluate(&model, &masks)
            .unwrap()
    };
    let (t, c) = (run(EnginePref::Tract), run(EnginePref::Candle));
    assert_eq!(t.samples, 360);
    assert_eq!(t.accuracy, c.accuracy);
    assert!((t.loss.unwrap() - c.loss.unwrap()).abs() < 1e-5);
}

/// Largest difference between two engines' outputs, relative to the largest output.
fn max_rel_diff(a: &prunescope::eval::Outputs, b: &prunescope::eval::Outputs) -> f64 {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols));
    let scale = a.values.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.values
        .iter()
        .zip(&b.values)
        .map(|(x, y)| ((x - y).abs() / scale) as f64)
        .fold(0.0, f64::max)
}

#[test]
fn the_onnx_interpreter_gives_tracts_outputs_dense_and_pruned() {
    // Transformer-style graphs (Gather, LayerNorm, erf GELU, attention with Softmax, Reshape
    // and Transpose chains, mean pooling) and a Gemm MLP, each against tract.
    for (name, data) in [
        ("encoder_two_inputs.onnx", "encoder_data.npz"),
        ("encoder_plain_matmul.onnx", "encoder_data.npz"),
        ("attention_heads.onnx", "attention_data.npz"),
        ("attention_heads_flexible.onnx", "attention_data.npz"),
        ("digits_mlp_opset13.onnx", "digits_test.npz"),
        ("digits_mlp_opset17.onnx", "digits_test.npz"),
    ] {
        let model = Model::open(&fixture(name)).unwrap();
        let native = evaluator_with(&model, &file_data(data), EnginePref::Native).unwrap();
        let tract = evaluator_with(&model, &file_data(data), EnginePref::Tract).unwrap();
        if !name.starts_with("digits") {
            // Graphs outside the trainable set: the interpreter, not the candle graph.
            assert_eq!(native.detail(), "prunescope's ONNX interpreter", "{name}");
        }
        for masks in [MaskSet::new(), half(&model), pruned_at(&model, 0.8)] {
            let a = native.run(&model, Some(&masks)).unwrap();
            let b = tract.run(&model, Some(&masks)).unwrap();
            let d = max_rel_diff(&a, &b);
            assert!(d < 1e-5, "{name}: outputs differ by {d} of the largest");
        }
        // Back to dense after pruning: the cached weights were re-read, not kept masked.
        let again = native.run(&model, None).unwrap();
        assert_eq!(again, native.run(&model, Some(&MaskSet::new())).unwrap());
    }
}

#[test]
fn the_onnx_interpreter_scores_what_onnxruntime_scores() {
    // Against onnxruntime's figures for the same file (tools/make_onnx_fixtures.py): the
    // dense embedding and the fidelity of the file pruned to 50 % in NumPy.
    let r = reference();
    let model = Model::open(&fixture("encoder_two_inputs.onnx")).unwrap();
    let ev = evaluator_with(&model, &file_data("encoder_data.npz"), EnginePref::Native).unwrap();
    scores_the_encoder_as_onnxruntime(&ev, &model);
    for name in ["digits_mlp_opset13.onnx", "digits_mlp_opset17.onnx"] {
        let model = Model::open(&fixture(name)).unwrap();
        let ev = evaluator_with(&model, &file_data("digits_test.npz"), EnginePref::Native).unwrap();
        let dense = ev.evaluate(&model, &MaskSet::new()).unwrap();
        close(
            dense.accuracy.unwrap(),
            &r[name]["dense"]["accuracy"],
            1e-12,
            "accuracy",
        );
    }
}

#[test]
fn a_torch_transformer_encoder_runs_on_the_interpreter_as_onnxruntime_runs_it() {
    // nn.TransformerEncoder as torch.nn exports it (tools/make_torch_encoder_fixture.py): the
    // fused in-projection sliced apart (Slice, Mod, Squeeze), the out-projection a Gemm.
    let model = Model::open(&fixture("torch_encoder.onnx")).unwrap();
    let data = DataSource::File {
        path: fixture("torch_encoder_data.npz"),
        spec: DataSpec {
            x: Some("ids".into()),
            ..DataSpec::default()
        },
    };
    let native = evaluator_with(&model, &data, EnginePref::Native).unwrap();
    assert_eq!(native.detail(), "prunescope's ONNX interpreter");
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("torch_encoder.json")).unwrap())
            .unwrap();
    let want: Vec<f64> = want["dense_outputs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    let out = native.dense_outputs(&model).unwrap();
    assert_eq!(out.values.len(), want.len());
    for (a, b) in out.values.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-5, "ours {a}, onnxruntime {b}");
    }
    let tract = evaluator_with(&model, &data, EnginePref::Tract).unwrap();
    let masks = half(&model);
    let d = max_rel_diff(
        &native.run(&model, Some(&masks)).unwrap(),
        &tract.run(&model, Some(&masks)).unwrap(),
    );
    assert!(
        d < 1e-5,
        "pruned outputs differ from tract's by {d} of the largest"
    );
}

#[test]
fn graphs_the_interpreter_cannot_run_say_which_node_stops_it() {
    for (name, says) in [
        ("bad_unknown_op.onnx", "NoSuchOperator"),
        ("bad_cycle.onnx", "cycle"),
        ("digits_cnn_opset17.onnx", "Conv"),
    ] {
        let model = Model::open(&fixture(name)).unwrap();
        let data = Arc::new(
            prunescope::data::load_eval_data(
                &fixture("digits_test.npz"),
                &["x".to_string()],
                &DataSpec::default(),
            )
            .unwrap(),
        );
        let info = prunescope::eval::GraphInfo::read(&model).unwrap();
        let runner = prunescope::eval::OnnxRunner::new(&model, info, data).unwrap();
        let e = runner.native(&model).err().expect(name);
        assert!(e.contains(says), "{name}: {e}");
    }
}
