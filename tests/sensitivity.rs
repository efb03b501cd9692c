//! Sensitivity sweeps, budget plans and the experiment history, each checked against a
//! second computation: whole-model evaluations of explicitly pruned models, PyTorch's own
//! sweep, hand-worked allocations, and brute-force budgets.

mod common;

use std::path::Path;
use std::process::Command;

use prunescope::eval::{Evaluator, Metrics, evaluator_for};
use prunescope::history::{History, Record};
use prunescope::model::Model;
use prunescope::progress::Progress;
use prunescope::prune::{
    Criterion, PruneSettings, Rule, Scope, ScoreIndex, ScoreInputs, allocate, prune,
};
use prunescope::sensitivity::{
    Curve, DEFAULT_GRID, MetricKind, Point, Sensitivity, SweepSpec, compare_rules, groups, plan,
    sweep,
};

fn isolate() {
    common::isolate();
}

fn index(model: &Model, c: Criterion) -> ScoreIndex {
    ScoreIndex::build(model, c, 0, &ScoreInputs::default(), &Progress::none()).unwrap()
}

/// The model pruned explicitly: `tensors` at sparsity `s` (layer-wise), everything else dense,
/// through the library's ordinary pruning path, evaluated on the whole model.
fn explicit(model: &Model, ev: &dyn Evaluator, tensors: &[String], s: f64) -> Metrics {
    let mut settings = PruneSettings {
        scope: Scope::Layer,
        ..Default::default()
    };
    for t in tensors {
        settings.layer_mut(t).sparsity = s;
    }
    let masks = prune(model, &settings, &ScoreInputs::default(), &Progress::none())
        .unwrap()
        .masks;
    ev.evaluate(model, &masks).unwrap()
}

fn full_sweep(model: &Model, ev: &dyn Evaluator, grid: &[f64]) -> Sensitivity {
    let settings = PruneSettings::default();
    let spec = SweepSpec::for_settings(&settings, grid.to_vec());
    sweep(
        model,
        &index(model, Criterion::Magnitude),
        ev,
        &spec,
        groups(model, &settings),
        None,
        &Progress::none(),
        |_| {},
    )
    .unwrap()
}

fn assert_same_metrics(a: &Metrics, b: &Metrics, what: &str) {
    assert_eq!(a.accuracy, b.accuracy, "{what}: accuracy");
    let (la, lb) = (a.loss.unwrap(), b.loss.unwrap());
    assert!((la - lb).abs() < 1e-6, "{what}: loss {la} vs {lb}");
}

#[test]
fn every_point_equals_an_independent_evaluation_of_the_explicitly_pruned_model() {
    isolate();
    for id in ["mlp", "cnn"] {
        let model = prunescope::sample::open_named(id).unwrap();
        let ev = evaluator_for(&model).unwrap().unwrap();
        let grid = [0.0, 0.3, 0.6, 0.9, 0.99];
        let sens = full_sweep(&model, &ev, &grid);
        assert!(sens.complete);
        assert_eq!(sens.metric, MetricKind::Accuracy);
        let prunable = (0..model.tensors.len())
            .filter(|&t| PruneSettings::default().is_prunable(&model, t))
            .count();
        assert_eq!(sens.layers.len(), prunable, "{id}: one row per layer");
        for c in &sens.layers {
            assert_eq!(c.points.len(), grid.len(), "{id} {:?}", c.name);
            for p in &c.points {
                let want = explicit(&model, &ev, &c.name, p.sparsity);
                assert_same_metrics(
                    &p.metrics,
                    &want,
                    &format!("{id} {:?} at {}", c.name, p.sparsity),
                );
            }
        }
        // Pruning a layer hard costs accuracy somewhere: the curves are not flat by accident.
        let dense = sens.dense_value();
        assert!(
            sens.layers
                .iter()
                .any(|c| c.points.last().unwrap().metrics.accuracy.unwrap() < dense - 0.2),
            "{id}"
        );
    }
}

#[test]
fn the_sample_mlp_sweep_gives_what_pytorch_gives() {
    isolate();
    let model = prunescope::sample::open_sample().unwrap();
    let ev = evaluator_for(&model).unwrap().unwrap();
    let sens = full_sweep(&model, &ev, &DEFAULT_GRID);
    // tools/bench_sensitivity_torch.py: torch.nn.utils.prune.l1_unstructured per point.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sensitivity_torch.json"),
    )
    .unwrap();
    let torch: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = torch["accuracy_prune_api"].as_array().unwrap();
    assert_eq!(rows.len(), sens.layers.len());
    for (row, c) in rows.iter().zip(&sens.layers) {
        for (want, p) in row.as_array().unwrap().iter().zip(&c.points) {
            let want = want.as_f64().unwrap();
            let got = p.metrics.accuracy.unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "{:?} at {}: ours {got}, PyTorch {want}",
                c.name,
                p.sparsity
            );
        }
    }
}

/// The sample MLP's layout with fc2 square and a copy of fc1's weights in a second tensor:
/// 64 → 64 → 64 → 10, where fc1 and fc2 hold the same bytes (tied).
fn tied_mlp() -> Model {
    let sample = prunescope::sample::open_sample().unwrap();
    let w1 = sample.to_f32_vec(sample.find("fc1.weight").unwrap())[..64 * 64].to_vec();
    let b1 = sample.to_f32_vec(sample.find("fc1.bias").unwrap())[..64].to_vec();
    let w3 = sample.to_f32_vec(sample.find("fc3.weight").unwrap());
    let b3 = sample.to_f32_vec(sample.find("fc3.bias").unwrap());
    let mut m = Model::from_f32_tensors(
        "tied",
        vec![
            ("fc1.weight".into(), vec![64, 64], w1.clone()),
            ("fc1.bias".into(), vec![64], b1.clone()),
            ("fc2.weight".into(), vec![64, 64], w1),
            ("fc2.bias".into(), vec![64], b1),
            ("fc3.weight".into(), vec![10, 64], w3),
            ("fc3.bias".into(), vec![10], b3),
        ],
    );
    m.metadata.insert(
        "prunescope.arch".into(),
        r#"{"kind":"mlp","input_dim":64,"dataset":"uci-digits","layers":[
            {"weight":"fc1.weight","bias":"fc1.bias","activation":"relu"},
            {"weight":"fc2.weight","bias":"fc2.bias","activation":"relu"},
            {"weight":"fc3.weight","bias":"fc3.bias","activation":"none"}]}"#
            .into(),
    );
    m
}

#[test]
fn tied_tensors_are_swept_together_as_one_row() {
    isolate();
    let model = tied_mlp();
    let g = groups(&model, &PruneSettings::default());
    assert_eq!(g.len(), 2);
    assert_eq!(g[0].names, vec!["fc1.weight", "fc2.weight"]);
    assert_eq!(g[0].numel, 2 * 64 * 64);
    assert_eq!(g[1].names, vec!["fc3.weight"]);
    let ev = evaluator_for(&model).unwrap().unwrap();
    let sens = full_sweep(&model, &ev, &[0.5, 0.9]);
    assert_eq!(sens.layers.len(), 2);
    for p in &sens.layers[0].points {
        // Both tied tensors pruned at once, as an explicit model would be.
        let want = explicit(
            &model,
            &ev,
            &["fc1.weight".into(), "fc2.weight".into()],
            p.sparsity,
        );
        assert_same_metrics(&p.metrics, &want, &format!("tied at {}", p.sparsity));
        let alone = explicit(&model, &ev, &["fc1.weight".into()], p.sparsity);
        assert_ne!(
            alone.loss, p.metrics.loss,
            "pruning one of the tied pair alone is a different model"
        );
    }
}

#[test]
fn a_cancelled_sweep_keeps_its_points_and_resumes_from_them() {
    isolate();
    let model = prunescope::sample::open_sample().unwrap();
    let ev = evaluator_for(&model).unwrap().unwrap();
    let settings = PruneSettings::default();
    let spec = SweepSpec::for_settings(&settings, DEFAULT_GRID.to_vec());
    let idx = index(&model, Criterion::Magnitude);
    let cancel = prunescope::progress::CancelFlag::new();
    let flag = cancel.clone();
    let progress = Progress::new(cancel, |_, _| {});
    let mut calls = 0;
    let partial = sweep(
        &model,
        &idx,
        &ev,
        &spec,
        groups(&model, &settings),
        None,
        &progress,
        |so_far| {
            calls += 1;
            if so_far.points_done() >= 10 {
                flag.cancel();
            }
        },
    )
    .unwrap();
    assert!(calls > 0);
    assert!(!partial.complete);
    let kept = partial.points_done();
    assert!((10..36).contains(&kept), "{kept} points kept");
    let mut evaluations_in_second_run = 0;
    let done = sweep(
        &model,
        &idx,
        &ev,
        &spec,
        groups(&model, &settings),
        Some(&partial),
        &Progress::none(),
        |s| evaluations_in_second_run = s.evaluations,
    )
    .unwrap();
    assert!(done.complete);
    assert_eq!(done.points_done(), 36);
    let fresh = full_sweep(&model, &ev, &DEFAULT_GRID);
    assert_eq!(
        done.layers, fresh.layers,
        "resumed curves equal a fresh sweep"
    );
    assert_eq!(
        done.evaluations, fresh.evaluations,
        "no point measured twice"
    );
}

/// A model of the given tensor sizes (values irrelevant to every rule but `global`).
fn sized(sizes: &[usize]) -> Model {
    Model::from_f32_tensors(
        "sized",
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let v = (0..n)
                    .map(|j| ((j * 7 + i * 13) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                (format!("l{i}.weight"), vec![n / 10, 10], v)
            })
            .collect(),
    )
}

fn metrics(acc: f64) -> Metrics {
    Metrics {
        samples: 100,
        accuracy: Some(acc),
        top5: None,
        loss: Some(1.0 - acc),
        fidelity: None,
    }
}

/// Curves through the given (sparsity, accuracy) points, dense accuracy 1.
fn curves(model: &Model, pts: &[&[(f64, f64)]]) -> Sensitivity {
    Sensitivity {
        metric: MetricKind::Accuracy,
        dense: metrics(1.0),
        grid: vec![0.0, 0.5, 1.0],
        criterion: Criterion::Magnitude,
        seed: 0,
        pattern: Default::default(),
        calibration: 0,
        data: "hand".into(),
        layers: pts
            .iter()
            .enumerate()
            .map(|(t, p)| Curve {
                name: vec![model.tensors[t].name.clone()],
                tensors: vec![t],
                numel: model.tensors[t].numel as u64,
                points: p
                    .iter()
                    .map(|&(s, a)| Point {
                        sparsity: s,
                        metrics: metrics(a),
                    })
                    .collect(),
            })
            .collect(),
        complete: true,
        sweep_ms: 0.0,
        evaluations: 0,
        cached: false,
    }
}

fn counts(model: &Model, sens: &Sensitivity, s: f64, rule: Rule) -> Vec<u64> {
    let settings = PruneSettings {
        sparsity: s,
        ..Default::default()
    };
    plan(
        model,
        &index(model, Criterion::Magnitude),
        &settings,
        sens,
        rule,
    )
    .unwrap()
    .layers
    .iter()
    .map(|l| l.pruned)
    .collect()
}

/// Layer A (100 weights) loses nothing up to 50 %, then 0.5 at 100 %; layer B (100) loses
/// 0.1 linearly.
fn hand_case() -> (Model, Sensitivity) {
    let m = sized(&[100, 100]);
    let s = curves(
        &m,
        &[
            &[(0.0, 1.0), (0.5, 1.0), (1.0, 0.5)],
            &[(0.0, 1.0), (0.5, 0.95), (1.0, 0.9)],
        ],
    );
    (m, s)
}

#[test]
fn equal_marginal_loss_takes_the_cheapest_weights_first() {
    let (m, s) = hand_case();
    // A's free half (slope 0), then B at 0.001 per weight, then A at 0.01 per weight.
    assert_eq!(counts(&m, &s, 0.5, Rule::Marginal), vec![50, 50]);
    assert_eq!(counts(&m, &s, 0.75, Rule::Marginal), vec![50, 100]);
    assert_eq!(counts(&m, &s, 0.9, Rule::Marginal), vec![80, 100]);
    let settings = PruneSettings {
        sparsity: 0.5,
        ..Default::default()
    };
    let p = plan(
        &m,
        &index(&m, Criterion::Magnitude),
        &settings,
        &s,
        Rule::Marginal,
    )
    .unwrap();
    // Predicted: dense minus A's drop at 50 % (0) and B's (0.05).
    assert!((p.predicted - 0.95).abs() < 1e-12, "{}", p.predicted);
}

#[test]
fn the_threshold_rule_bisects_one_tolerated_drop() {
    let (m, s) = hand_case();
    // reach_A(τ) = 50 + 100τ, reach_B(τ) = 1000τ; 50 + 1100τ = 100 → A 54.5…, B 45.4….
    assert_eq!(counts(&m, &s, 0.5, Rule::Threshold), vec![55, 45]);
}

#[test]
fn the_inverse_rule_splits_by_the_normalised_drop() {
    let (m, s) = hand_case();
    // Mean drops 0.25 and 0.075 → normalised 1 and 0.3 → weights 1/1.05 : 1/0.35 = 1 : 3.
    assert_eq!(counts(&m, &s, 0.5, Rule::Inverse), vec![25, 75]);
}

#[test]
fn uniform_and_global_rules_match_their_definitions() {
    let m = sized(&[100, 300]);
    let s = curves(&m, &[&[(0.0, 1.0), (1.0, 0.0)], &[(0.0, 1.0), (1.0, 0.9)]]);
    assert_eq!(counts(&m, &s, 0.5, Rule::Uniform), vec![50, 150]);
    let settings = PruneSettings {
        sparsity: 0.5,
        ..Default::default()
    };
    let idx = index(&m, Criterion::Magnitude);
    let alloc = allocate(&m, &idx, &settings);
    let want: Vec<u64> = alloc.layers.iter().map(|l| l.pruned as u64).collect();
    assert_eq!(counts(&m, &s, 0.5, Rule::Global), want);
}

#[test]
fn every_rule_removes_exactly_its_budget_within_locks_and_caps() {
    let m = sized(&[100, 370, 60, 1000]);
    let s = curves(
        &m,
        &[
            &[(0.0, 1.0), (0.5, 0.99), (1.0, 0.2)],
            &[(0.0, 1.0), (0.5, 1.0), (1.0, 0.9)],
            &[(0.0, 1.0), (0.5, 0.5), (1.0, 0.1)],
            &[(0.0, 1.0), (0.5, 0.97), (1.0, 0.6)],
        ],
    );
    let idx = index(&m, Criterion::Magnitude);
    for target in [0.0, 0.13, 0.5, 0.77, 0.9] {
        let mut settings = PruneSettings {
            sparsity: target,
            min_keep: 0.05,
            ..Default::default()
        };
        settings.layer_mut("l0.weight").locked = true;
        settings.layer_mut("l3.weight").max_sparsity = Some(0.6);
        let caps = [0u64, 370 - 19, 60 - 3, 600];
        let n: u64 = 1530;
        let requested = (target * n as f64).round() as u64;
        for p in compare_rules(&m, &idx, &settings, &s) {
            let p = p.unwrap();
            let total: u64 = p.layers.iter().map(|l| l.pruned).sum();
            assert_eq!(p.requested, requested);
            assert_eq!(
                total,
                requested.min(caps.iter().sum()),
                "{:?} at {target}",
                p.rule
            );
            for (l, cap) in p.layers.iter().zip(caps) {
                assert!(l.pruned <= cap, "{:?} at {target}: {:?}", p.rule, l);
            }
            // The plan in the settings allocates exactly these counts.
            let mut applied = settings.clone();
            p.apply(&mut applied);
            assert_eq!(applied.scope, Scope::Sensitivity);
            let alloc = allocate(&m, &idx, &applied);
            let got: Vec<u64> = alloc.layers.iter().map(|l| l.pruned as u64).collect();
            let want: Vec<u64> = p.layers.iter().map(|l| l.pruned).collect();
            assert_eq!(got, want, "{:?} at {target}", p.rule);
        }
    }
}

#[test]
fn on_the_samples_equal_marginal_loss_is_at_least_as_good_as_uniform_and_global() {
    isolate();
    // Reported, not assumed: the numbers go to the README; the check is that planning and
    // measuring every rule works end to end on real curves.
    for id in ["mlp", "cnn", "rescnn"] {
        let model = prunescope::sample::open_named(id).unwrap();
        let ev = evaluator_for(&model).unwrap().unwrap();
        let sens = full_sweep(&model, &ev, &DEFAULT_GRID);
        let idx = index(&model, Criterion::Magnitude);
        for target in [0.8, 0.9] {
            let settings = PruneSettings {
                sparsity: target,
                ..Default::default()
            };
            let mut line = format!("{id} at {target}:");
            for p in compare_rules(&model, &idx, &settings, &sens) {
                let p = p.unwrap();
                assert!(p.reached());
                let mut applied = settings.clone();
                p.apply(&mut applied);
                let masks = prune(&model, &applied, &ScoreInputs::default(), &Progress::none())
                    .unwrap()
                    .masks;
                let acc = ev.evaluate(&model, &masks).unwrap().accuracy.unwrap();
                line.push_str(&format!(
                    " {} {:.4} (predicted {:.4});",
                    p.rule.cli_name(),
                    acc,
                    p.predicted
                ));
            }
            eprintln!("{line}");
        }
    }
}

#[test]
fn the_history_keeps_one_record_per_configuration_and_restores_its_settings() {
    isolate();
    let model = prunescope::sample::open_sample().unwrap();
    let ev = evaluator_for(&model).unwrap().unwrap();
    let hash = model.content_hash().unwrap();
    let idx = index(&model, Criterion::Magnitude);
    let mut h = History::load(&hash);
    h.records.clear();
    let mut recorded = Vec::new();
    for (i, s) in [0.3, 0.6, 0.3].iter().enumerate() {
        let mut settings = PruneSettings {
            sparsity: *s,
            min_keep: 0.1 * i as f64 % 0.2,
            ..Default::default()
        };
        settings.layer_mut("fc3.weight").locked = i == 1;
        let alloc = allocate(&model, &idx, &settings);
        let masks = prune(
            &model,
            &settings,
            &ScoreInputs::default(),
            &Progress::none(),
        )
        .unwrap()
        .masks;
        let m = ev.evaluate(&model, &masks).unwrap();
        let r = Record::new(
            "test", &model, &hash, &settings, &alloc, 0, &m, "digits", None,
        );
        recorded.push((settings, m, alloc.pruned));
        h.push(r);
    }
    // The first and third configurations are the same: one record, the newer.
    assert_eq!(h.records.len(), 2);
    h.save().unwrap();
    let back = History::load(&hash);
    assert_eq!(back, h);
    for r in &back.records {
        // Restoring the recorded settings reproduces the measured figures.
        let masks = prune(
            &model,
            &r.settings,
            &ScoreInputs::default(),
            &Progress::none(),
        )
        .unwrap()
        .masks;
        let m = ev.evaluate(&model, &masks).unwrap();
        assert_eq!(m.accuracy, r.accuracy);
        assert_eq!(model.total_params() - r.nonzeros, {
            allocate(&model, &idx, &r.settings).pruned
        });
    }
    let csv = back.to_csv();
    assert_eq!(csv.lines().count(), 3, "{csv}");
}

fn cli(args: &[&str]) -> std::process::Output {
    isolate();
    Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_cli_prints_the_curves_as_json_and_prunes_by_them() {
    let dir = common::tempdir("sens-cli");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample_models/digits_mlp.safetensors");
    let sample = sample.to_str().unwrap();
    let o = cli(&[
        "sensitivity",
        sample,
        "--grid",
        "0.1,0.5,0.9",
        "--json",
        "--fresh",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["metric"], "accuracy");
    assert!(v["dense"]["accuracy"].as_f64().unwrap() > 0.95);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[0]["name"], serde_json::json!(["fc1.weight"]));
    let pts = layers[0]["points"].as_array().unwrap();
    assert_eq!(pts.len(), 3);
    assert_eq!(pts[1]["sparsity"], 0.5);
    assert!(pts[1]["accuracy"].is_f64() && pts[1]["loss"].is_f64());

    let out = dir.join("planned.safetensors");
    let recipe = dir.join("planned.json");
    let o = cli(&[
        "prune",
        sample,
        "--sparsity",
        "0.8",
        "--scope",
        "sensitivity",
        "--rule",
        "marginal",
        "--data",
        "digits",
        "--out",
        out.to_str().unwrap(),
        "--save-recipe",
        recipe.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Exactly round(0.8 · N) weights go, split unevenly by the curves.
    let model = prunescope::sample::open_sample().unwrap();
    let pruned = Model::open(&out).unwrap();
    let n: usize = ["fc1.weight", "fc2.weight", "fc3.weight"]
        .iter()
        .map(|t| model.tensors[model.find(t).unwrap()].numel)
        .sum();
    let mut zeros = Vec::new();
    for t in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        let v = pruned.to_f32_vec(pruned.find(t).unwrap());
        zeros.push(v.iter().filter(|x| **x == 0.0).count());
    }
    assert_eq!(
        zeros.iter().sum::<usize>(),
        (0.8 * n as f64).round() as usize
    );
    let fracs: Vec<f64> = zeros
        .iter()
        .zip(["fc1.weight", "fc2.weight", "fc3.weight"])
        .map(|(z, t)| *z as f64 / model.tensors[model.find(t).unwrap()].numel as f64)
        .collect();
    assert!(
        fracs.iter().any(|f| (f - 0.8).abs() > 0.02),
        "not uniform: {fracs:?}"
    );
    let o = cli(&["eval", out.to_str().unwrap(), "--data", "digits", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The recipe replays the plan without any curves.
    let again = dir.join("again.safetensors");
    let o = cli(&[
        "prune",
        sample,
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
}

#[test]
fn sensitivity_without_a_runnable_model_says_what_it_needs() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.npz");
    let o = cli(&["sensitivity", f.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs data"), "{err}");
}

#[test]
fn flops_count_each_weight_once_per_output_position() {
    let model = prunescope::sample::open_named("cnn").unwrap();
    let ev = evaluator_for(&model).unwrap().unwrap();
    let uses = ev.weight_uses(&model).unwrap();
    // By hand: conv1 3×3, padding 1 on 8×8 → 64 positions; 2×2 pooling → conv2 on 4×4 → 16;
    // the linear layer once per sample.
    let want = [
        ("conv1.weight", 64.0),
        ("conv2.weight", 16.0),
        ("fc.weight", 1.0),
    ];
    assert_eq!(uses.len(), 3);
    for (name, u) in want {
        assert!(uses.contains(&(name.to_string(), u)), "{name}: {uses:?}");
    }
    let dense = prunescope::history::flops(&model, &Default::default(), &uses);
    assert_eq!(dense, 2.0 * (144.0 * 64.0 + 4608.0 * 16.0 + 5120.0));
    // Pruning conv2 by half removes half its multiply-adds.
    let settings = PruneSettings {
        scope: Scope::Layer,
        layers: [(
            "conv2.weight".to_string(),
            prunescope::prune::LayerSettings {
                sparsity: 0.5,
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    let alloc = allocate(&model, &index(&model, Criterion::Magnitude), &settings);
    let pruned = prunescope::history::flops(&model, &alloc, &uses);
    assert_eq!(dense - pruned, 2.0 * 2304.0 * 16.0);
}

#[test]
fn a_locked_tensor_of_a_tied_pair_passes_its_share_to_the_other() {
    isolate();
    let model = tied_mlp();
    let ev = evaluator_for(&model).unwrap().unwrap();
    let sens = full_sweep(&model, &ev, &[0.5, 0.9]);
    let idx = index(&model, Criterion::Magnitude);
    let mut settings = PruneSettings {
        sparsity: 0.3,
        ..Default::default()
    };
    settings.layer_mut("fc2.weight").locked = true;
    for p in compare_rules(&model, &idx, &settings, &sens) {
        let p = p.unwrap();
        let counts = p.tensor_counts();
        let fc2 = model.find("fc2.weight").unwrap();
        assert!(
            counts.iter().any(|&(t, c)| t == fc2 && c == 0),
            "{:?}: the locked tensor loses nothing",
            p.rule
        );
        let mut applied = settings.clone();
        p.apply(&mut applied);
        let alloc = allocate(&model, &idx, &applied);
        assert_eq!(alloc.pruned, p.pruned, "{:?}", p.rule);
        assert_eq!(p.pruned, p.requested, "{:?}: reachable, so reached", p.rule);
    }
}
