//! The real app under egui_kittest: widgets found by role and label, driven by pointer and
//! keyboard, with the results checked against the core library computed independently.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use prunescope::eval::{Evaluator, evaluator_for};
use prunescope::model::Model;
use prunescope::prune::{Pattern, PruneSettings, ScoreInputs, prune};
use prunescope::ui::{App, Prefs};
use prunescope::util::group_digits;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn harness() -> Harness<'static, App> {
    common::isolate();
    Harness::builder()
        .with_size(egui::vec2(1400.0, 900.0))
        .build_eframe(|cc| App::with_prefs(&cc.egui_ctx, None, Prefs::default()))
}

/// Steps the app until `done` holds; the worker answers on its own thread.
fn step_until(h: &mut Harness<'static, App>, what: &str, done: impl Fn(&App) -> bool) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(2));
    }
    // A few more frames so the panels draw what just arrived.
    for _ in 0..3 {
        h.step();
    }
}

fn settled(app: &App) -> bool {
    let s = app.state();
    s.model.is_some() && s.counts_current() && !app.busy()
}

/// The masks the core library builds for `settings`, independently of the app.
fn masks_for(model: &Model, settings: &PruneSettings) -> prunescope::prune::MaskSet {
    prune(
        model,
        settings,
        &ScoreInputs::default(),
        &prunescope::progress::Progress::none(),
    )
    .unwrap()
    .masks
}

fn sample() -> Model {
    prunescope::sample::open_sample().expect("the bundled sample opens")
}

#[test]
fn first_launch_shows_the_sample_model_and_its_accuracy() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let snap = h.state().state().model.as_ref().unwrap().snapshot.clone();
    assert!(snap.name.contains("digits_mlp"), "{}", snap.name);
    let dense = snap.eval.dense.expect("the sample model is runnable");
    let acc = dense.accuracy.unwrap();
    assert!(acc > 0.95, "dense accuracy {acc}");
    h.get_by_label_contains(&format!("Accuracy: dense {:.2}%", acc * 100.0));
    h.get_by_label("Parameters 17,226");
}

#[test]
fn dragging_the_global_slider_to_half_prunes_half_and_moves_accuracy() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);

    let rail = h
        .get_by_role_and_label(Role::Slider, "Global sparsity")
        .rect();
    // Grab the handle (at 0%) and drag it to the middle of the rail, which is 50%.
    let from = egui::pos2(rail.left() + rail.height() / 2.0, rail.center().y);
    h.drag_at(from);
    h.step();
    for i in 1..=10 {
        let x = from.x + (rail.center().x - from.x) * i as f32 / 10.0;
        h.hover_at(egui::pos2(x, rail.center().y));
        h.step();
    }
    h.drop_at(rail.center());
    h.step();
    let s = h.state().state().settings.sparsity;
    assert!((s - 0.5).abs() < 0.005, "slider gave {s}");

    step_until(&mut h, "counts for the new sparsity", |a| {
        settled(a) && a.state().metrics_current()
    });
    let state = h.state().state();
    let preview = state.model.as_ref().unwrap().preview.clone().unwrap();

    // Independent: the core library on a freshly opened copy of the model.
    let model = sample();
    let settings = state.settings.clone();
    let expected = prune(
        &model,
        &settings,
        &ScoreInputs::default(),
        &prunescope::progress::Progress::none(),
    )
    .unwrap();
    assert_eq!(preview.alloc, expected.alloc);
    assert_eq!(
        expected.alloc.pruned,
        (s * expected.alloc.prunable as f64).round() as u64
    );
    h.get_by_label(&format!(
        "Pruned {} of {} prunable",
        group_digits(expected.alloc.pruned),
        group_digits(expected.alloc.prunable)
    ));
    h.get_by_label(&format!(
        "Sparsity {:.2}%",
        expected.alloc.sparsity() * 100.0
    ));

    let now = state
        .model
        .as_ref()
        .unwrap()
        .metrics
        .clone()
        .unwrap()
        .result
        .unwrap();
    let direct = evaluator_for(&model)
        .unwrap()
        .unwrap()
        .evaluate(&model, &expected.masks)
        .unwrap();
    assert_eq!(now.accuracy, direct.accuracy);
    assert!((now.loss.unwrap() - direct.loss.unwrap()).abs() < 1e-9);
    h.get_by_label_contains(&format!("→ now {:.2}%", direct.accuracy.unwrap() * 100.0));
}

#[test]
fn two_four_pattern_gives_two_of_every_four_in_the_mask() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.get_by_role_and_label(Role::ComboBox, "Pattern").click();
    h.run_steps(4);
    h.get_by_label("2:4").click();
    h.run_steps(4);
    assert_eq!(
        h.state().state().settings.pattern,
        Pattern::NM { n: 2, m: 4 }
    );
    step_until(&mut h, "a 2:4 heatmap", |a| {
        settled(a)
            && a.state()
                .model
                .as_ref()
                .unwrap()
                .heatmap
                .as_ref()
                .is_some_and(|hm| {
                    hm.generation >= a.state().settings_generation && hm.view.one_to_one()
                })
    });
    let state = h.state().state();
    let m = state.model.as_ref().unwrap();
    for l in &m.preview.as_ref().unwrap().alloc.layers {
        assert_eq!(
            l.pruned * 2,
            l.numel,
            "{}",
            m.snapshot.tensors[l.tensor].name
        );
    }
    // The mask drawn for the selected layer, checked group by group against a brute force.
    let hm = m.heatmap.as_ref().unwrap();
    let v = &hm.view;
    let values = v.values.as_ref().unwrap();
    assert_eq!(
        (v.grid_h, v.grid_w),
        (v.total_rows, v.total_cols),
        "the whole layer is on screen"
    );
    for r in 0..v.grid_h {
        for g in 0..v.grid_w / 4 {
            let idx: Vec<usize> = (0..4).map(|k| r * v.grid_w + g * 4 + k).collect();
            let kept: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|&i| v.kept_fraction[i] == 1.0)
                .collect();
            assert_eq!(kept.len(), 2, "row {r} group {g}");
            let mut by_mag = idx.clone();
            by_mag.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
            let mut top: Vec<usize> = by_mag[..2].to_vec();
            top.sort();
            assert_eq!(kept, top, "row {r} group {g}: the two largest |w| are kept");
        }
    }
    h.get_by_label("Sparsity 50.00%");
}

#[test]
fn layer_wise_sliders_and_locks_act_on_single_layers() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.get_by_label("Layer-wise").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::Slider, "target fc2.weight")
        .set_value_accesskit(80.0);
    h.run_steps(4);
    step_until(&mut h, "layer-wise counts", settled);
    let fc2 = |a: &App| {
        let m = a.state().model.as_ref().unwrap();
        let t = m
            .snapshot
            .tensors
            .iter()
            .position(|t| t.name == "fc2.weight")
            .unwrap();
        m.preview
            .as_ref()
            .unwrap()
            .alloc
            .for_tensor(t)
            .unwrap()
            .pruned
    };
    assert_eq!(fc2(h.state()), (0.8f64 * 8192.0).round() as usize);
    h.get_by_role_and_label(Role::CheckBox, "lock fc2.weight")
        .click();
    h.run_steps(4);
    step_until(&mut h, "the lock", |a| settled(a) && fc2(a) == 0);
    assert!(h.state().state().settings.layer("fc2.weight").locked);
}

#[test]
fn opening_a_corrupt_file_shows_the_error_and_keeps_the_model() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let before = h.state().state().model.as_ref().unwrap().snapshot.id;

    h.get_by_label("File").click();
    h.run_steps(4);
    h.get_by_label_contains("Open path").click();
    h.run_steps(4);
    let bad = fixture("truncated.safetensors");
    let field = h.get_by_role_and_label(
        Role::TextInput,
        "Model file (.safetensors, .pt, .pth, .bin, .npz, .onnx), or a sharded checkpoint's folder or index",
    );
    field.focus();
    field.type_text(&bad.display().to_string());
    h.run_steps(4);
    h.get_by_role_and_label(Role::Button, "Open").click();
    h.run_steps(4);
    step_until(&mut h, "the error", |a| {
        !a.state().errors.is_empty() && !a.busy()
    });

    let state = h.state().state();
    let err = state.errors.join("\n");
    assert!(err.contains("truncated.safetensors"), "{err}");
    assert!(err.contains("still open"), "{err}");
    assert_eq!(
        state.model.as_ref().unwrap().snapshot.id,
        before,
        "the sample model stays"
    );
    h.get_by_label_contains("truncated.safetensors");
    assert!(
        !h.query_all_by_label_contains("digits_mlp.safetensors")
            .collect::<Vec<_>>()
            .is_empty()
    );

    // The app is still usable: a valid model opens after the failure.
    h.state_mut().open_path(fixture("tiny.npz"));
    step_until(&mut h, "the npz model", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.name.contains("tiny.npz"))
            && settled(a)
    });
}

#[test]
fn a_recipe_exported_from_the_app_replays_byte_identical_in_the_cli() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let dir = common::tempdir("gui");
    let mut settings = PruneSettings {
        sparsity: 0.7,
        min_keep: 0.2,
        ..Default::default()
    };
    settings.layer_mut("fc3.weight").locked = true;
    h.state_mut().state_mut().settings = settings;
    step_until(&mut h, "counts", settled);
    let weights = dir.join("w.safetensors");
    let recipe = dir.join("r.json");
    let settings = h.state().state().settings.clone();
    h.state_mut().export(prunescope::worker::ExportRequest {
        settings,
        weights: Some(weights.clone()),
        masks: None,
        recipe: Some(recipe.clone()),
        compacted: None,
    });
    step_until(&mut h, "the export", |a| {
        a.state()
            .notice
            .as_deref()
            .is_some_and(|n| n.starts_with("Wrote"))
    });

    // Replayed by the CLI on the sample's file on disk (the same bytes as the bundled one).
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample_models/digits_mlp.safetensors");
    let replay = dir.join("replay.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args([
            "prune",
            file.to_str().unwrap(),
            "--recipe",
            recipe.to_str().unwrap(),
        ])
        .args(["--out", replay.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        std::fs::read(&replay).unwrap()
    );

    // The recipe carries the lock: fc3 stayed dense.
    let r = prunescope::export::Recipe::load(&recipe).unwrap();
    assert!(r.settings.layer("fc3.weight").locked);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_hostile_file_shows_an_error_and_keeps_the_open_model() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let before = h.state().state().model.as_ref().unwrap().snapshot.id;
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture("hostile"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n != "pt_memo_bomb.pt" && n != "pt_control_chars.pt"
        })
        .collect();
    files.sort();
    assert!(files.len() > 20);
    for f in files {
        h.state_mut().state_mut().errors.clear();
        h.state_mut().open_path(f.clone());
        step_until(&mut h, "the error", |a| {
            !a.state().errors.is_empty() && !a.busy()
        });
        let state = h.state().state();
        let err = state.errors.join("\n");
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(err.contains(&*name), "{name}: {err}");
        assert_eq!(
            state.model.as_ref().unwrap().snapshot.id,
            before,
            "{name}: the sample model stays"
        );
    }
}

#[test]
fn the_export_dialog_refuses_to_overwrite_the_open_model() {
    let dir = common::tempdir("gui");
    let model = dir.join("m.npz");
    std::fs::copy(fixture("tiny.npz"), &model).unwrap();
    let original = std::fs::read(&model).unwrap();
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.state_mut().open_path(model.clone());
    step_until(&mut h, "the npz model", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.name.contains("m.npz"))
            && settled(a)
    });
    h.get_by_label("File").click();
    h.run_steps(4);
    h.get_by_label_contains("Export…").click();
    h.run_steps(4);
    // Replace the suggested path with the model's own, spelled differently.
    let spelled = format!("{}/./m.npz", dir.display());
    h.get_by_role_and_label(Role::TextInput, "Pruned weights path")
        .set_text_value_accesskit(&spelled);
    h.run_steps(4);
    h.get_by_label_contains("would destroy the input");
    let export = h.get_by_role_and_label(Role::Button, "Export");
    assert!(
        egui_kittest::kittest::NodeT::accesskit_node(&export).is_disabled(),
        "Export stays disabled"
    );
    export.click();
    h.run_steps(4);
    assert_eq!(std::fs::read(&model).unwrap(), original);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens the Evaluation data window, types `path` and presses "Use this file".
fn choose_data(h: &mut Harness<'static, App>, path: &Path) {
    h.get_by_label("File").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::Button, "Evaluation data…")
        .click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::TextInput, "Data file")
        .focus();
    h.run_steps(2);
    // Select what an earlier choice left there, so typing replaces it.
    h.key_combination_modifiers(egui::Modifiers::COMMAND, &[egui::Key::A]);
    h.run_steps(2);
    h.get_by_role_and_label(Role::TextInput, "Data file")
        .type_text(&path.display().to_string());
    h.run_steps(4);
    h.get_by_role_and_label(Role::Button, "Use this file")
        .click();
    h.run_steps(4);
}

#[test]
fn an_onnx_model_without_labels_gets_data_from_the_dialog_and_shows_fidelity() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let onnx = fixture("onnx/encoder_two_inputs.onnx");
    h.state_mut().open_path(onnx.clone());
    step_until(&mut h, "the encoder", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.name.contains("encoder"))
            && settled(a)
    });
    h.get_by_label_contains("Accuracy: n/a — File → Evaluation data");

    // Data that does not fit: an error, and nothing changes.
    choose_data(&mut h, &fixture("onnx/digits_test.npz"));
    step_until(&mut h, "the data error", |a| {
        !a.state().errors.is_empty() && !a.busy()
    });
    let err = h.state().state().errors.join("\n");
    assert!(err.contains("input_ids"), "{err}");
    assert!(
        h.state()
            .state()
            .model
            .as_ref()
            .unwrap()
            .eval
            .dense
            .is_none()
    );

    choose_data(&mut h, &fixture("onnx/encoder_data.npz"));
    step_until(&mut h, "the new data", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.eval.dense.is_some())
            && !a.busy()
    });
    h.get_by_label_contains("Fidelity to the dense model");
    h.get_by_label_contains("[evaluate only]");

    h.state_mut().state_mut().settings.sparsity = 0.5;
    step_until(&mut h, "metrics at 50%", |a| {
        settled(a) && a.state().metrics_current()
    });
    let shown = h
        .state()
        .state()
        .model
        .as_ref()
        .unwrap()
        .metrics
        .clone()
        .unwrap()
        .result
        .unwrap()
        .fidelity
        .unwrap();
    // Independent: the library, on a fresh copy of the model and data.
    let model = Model::open(&onnx).unwrap();
    let settings = h.state().state().settings.clone();
    let masks = masks_for(&model, &settings);
    let ev = prunescope::eval::evaluator_with_data(
        &model,
        &prunescope::eval::DataSource::File {
            path: fixture("onnx/encoder_data.npz"),
            spec: Default::default(),
        },
    )
    .unwrap();
    let direct = ev.evaluate(&model, &masks).unwrap().fidelity.unwrap();
    // tract may pick a different thread count here than in the app: sums differ in the last bits.
    assert!(
        (shown.cosine - direct.cosine).abs() < 1e-6,
        "{shown:?} vs {direct:?}"
    );
    assert!(
        (shown.rel_l2 - direct.rel_l2).abs() < 1e-6,
        "{shown:?} vs {direct:?}"
    );
    assert_eq!(shown.top1_agreement, direct.top1_agreement);
    h.get_by_label_contains(&format!(
        "top-1 agreement {:.1}%",
        direct.top1_agreement * 100.0
    ));
}

#[test]
fn the_samples_menu_opens_the_cnn_and_the_gallery_shows_what_pruning_changed() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.get_by_label("File").click();
    h.run_steps(4);
    h.get_by_label("Samples").click();
    h.run_steps(4);
    h.get_by_label("Digits residual CNN (BatchNorm)").click();
    step_until(&mut h, "the residual CNN", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.name.contains("digits_rescnn"))
            && settled(a)
    });
    h.get_by_label_contains("[evaluate + train]");
    h.state_mut().state_mut().settings.sparsity = 0.6;
    step_until(&mut h, "metrics at 60%", |a| {
        settled(a) && a.state().metrics_current()
    });
    h.get_by_label("View").click();
    h.run_steps(4);
    h.get_by_label("Dataset samples").click();
    h.run_steps(6);
    // Independent: the library's predictions on the same samples.
    let model = prunescope::sample::open_named("rescnn").unwrap();
    let settings = h.state().state().settings.clone();
    let masks = masks_for(&model, &settings);
    let ev = evaluator_for(&model).unwrap().unwrap();
    let (_, p) = ev.evaluate_with_predictions(&model, &masks, 120).unwrap();
    let p = p.unwrap();
    let changed = p
        .dense
        .iter()
        .zip(&p.pruned)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed > 0,
        "60% should change some predictions of the residual CNN"
    );
    h.get_by_label_contains(&format!("{changed} of 120 predictions changed."));
    let i = (0..120).find(|&i| p.dense[i] != p.pruned[i]).unwrap();
    h.get_by_label_contains(&format!(
        "sample {i}: label {}, dense {}, pruned {}",
        ev.samples(120).unwrap().labels.unwrap()[i],
        p.dense[i],
        p.pruned[i]
    ));
}

fn sweep_job(app: &App) -> Option<f32> {
    app.state()
        .jobs
        .iter()
        .find(|j| j.label == "Sensitivity")
        .map(|j| j.fraction)
}

#[test]
fn a_sensitivity_sweep_shows_progress_cancels_resumes_and_guides_the_layer_sliders() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.get_by_label("View").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::CheckBox, "Sensitivity")
        .click();
    h.run_steps(4);
    // A long grid, so that the sweep is still running when Cancel is pressed.
    let grid: Vec<f64> = (0..120).map(|i| i as f64 / 120.0).collect();
    let text = grid
        .iter()
        .map(|v| format!("{v}"))
        .collect::<Vec<_>>()
        .join(",");
    h.get_by_role_and_label(Role::TextInput, "Grid").focus();
    h.run_steps(2);
    h.key_combination_modifiers(egui::Modifiers::COMMAND, &[egui::Key::A]);
    h.run_steps(2);
    h.get_by_role_and_label(Role::TextInput, "Grid")
        .type_text(&text);
    h.run_steps(2);
    h.get_by_role_and_label(Role::Button, "Run").click();
    let start = Instant::now();
    loop {
        h.step();
        let s = h.state().state();
        if sweep_job(h.state()).is_some_and(|f| f > 0.0)
            && s.sensitivity.as_ref().is_some_and(|c| c.points_done() > 0)
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.get_by_label_contains("Sensitivity: fc");
    h.get_all_by_role_and_label(Role::Button, "Cancel")
        .next()
        .unwrap()
        .click();
    step_until(&mut h, "the sweep to stop", |a| sweep_job(a).is_none());
    let partial = h.state().state().sensitivity.clone().unwrap();
    assert!(!partial.complete);
    let kept = partial.points_done();
    assert!(kept > 0 && kept < 3 * grid.len(), "{kept}");
    h.get_by_label_contains("(unfinished)");

    h.get_by_role_and_label(Role::Button, "Resume").click();
    step_until(&mut h, "the sweep to finish", |a| {
        a.state().sensitivity.as_ref().is_some_and(|c| c.complete) && sweep_job(a).is_none()
    });
    let done = h.state().state().sensitivity.clone().unwrap();
    assert_eq!(done.layers.len(), 3);
    for c in &done.layers {
        assert_eq!(c.points.len(), grid.len(), "{:?}", c.name);
    }
    // The finished points of the cancelled run were kept, not measured again.
    for (a, b) in partial.layers.iter().zip(&done.layers) {
        for p in &a.points {
            assert!(b.points.contains(p));
        }
    }

    // The curves go to CSV and JSON where the "Save to" field says.
    let dir = common::tempdir("sens-save");
    let base = dir.join("curves");
    h.get_by_role_and_label(Role::TextInput, "Save to").focus();
    h.run_steps(2);
    h.key_combination_modifiers(egui::Modifiers::COMMAND, &[egui::Key::A]);
    h.run_steps(2);
    h.get_by_role_and_label(Role::TextInput, "Save to")
        .type_text(&base.display().to_string());
    h.run_steps(2);
    h.get_by_role_and_label(Role::Button, "Save CSV").click();
    h.run_steps(2);
    h.get_by_role_and_label(Role::Button, "Save JSON").click();
    h.run_steps(2);
    let csv = std::fs::read_to_string(base.with_extension("csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * grid.len());
    let json: prunescope::sensitivity::Sensitivity =
        serde_json::from_str(&std::fs::read_to_string(base.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json.layers, done.layers);

    h.state_mut().state_mut().settings.sparsity = 0.8;
    h.run_steps(2);
    h.get_by_role_and_label(Role::RadioButton, "Sensitivity-guided")
        .click();
    step_until(&mut h, "the plan and its counts", |a| {
        let s = a.state();
        s.plan.as_ref().is_some_and(|p| p.is_ok()) && settled(a) && s.metrics_current()
    });
    let state = h.state().state();
    let plan = state.plan.clone().unwrap().unwrap();
    let targets: Vec<f64> = ["fc1.weight", "fc2.weight", "fc3.weight"]
        .iter()
        .map(|t| state.settings.layer(t).sparsity)
        .collect();
    assert!(
        targets.iter().any(|t| (t - 0.8).abs() > 0.01),
        "the plan is not uniform: {targets:?}"
    );
    for (name, s) in &plan.targets {
        assert_eq!(state.settings.layer(name).sparsity, *s);
    }
    let preview = state.model.as_ref().unwrap().preview.clone().unwrap();
    assert_eq!(
        preview.alloc.pruned,
        (0.8 * preview.alloc.prunable as f64).round() as u64
    );
    // The table's sliders show the plan.
    for (name, s) in &plan.targets {
        let label = format!("target {name}");
        let node = h.get_by_label(&label);
        let shown = node.accesskit_node().numeric_value().unwrap();
        assert!(
            (shown - s * 100.0).abs() <= 0.005 + 1e-9,
            "{name}: {shown} vs {s}"
        );
    }
    h.get_by_label_contains("Predicted accuracy");
}

#[test]
fn the_history_records_each_evaluated_configuration_and_restores_one() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    for s in [0.3, 0.6] {
        h.state_mut().state_mut().settings.sparsity = s;
        step_until(&mut h, "metrics", |a| {
            settled(a) && a.state().metrics_current()
        });
    }
    let m = h.state().state().model.as_ref().unwrap();
    let records: Vec<_> = m.history.iter().map(|r| (**r).clone()).collect();
    for s in [0.0, 0.3, 0.6] {
        assert!(
            records.iter().any(|r| r.settings.sparsity == s),
            "no record at {s}: {records:?}"
        );
    }
    h.get_by_label("View").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::CheckBox, "Experiment history")
        .click();
    h.run_steps(4);
    h.get_by_label_contains(&format!("{} configurations", records.len()));
    let r = records
        .iter()
        .find(|r| r.settings.sparsity == 0.3)
        .unwrap()
        .clone();
    h.state_mut().state_mut().restore(r.settings.clone());
    step_until(&mut h, "metrics of the restored settings", |a| {
        settled(a) && a.state().metrics_current()
    });
    let state = h.state().state();
    assert_eq!(state.settings, r.settings);
    let now = state.model.as_ref().unwrap().metrics.clone().unwrap();
    assert_eq!(now.result.unwrap().accuracy, r.accuracy);
}

#[test]
fn the_chart_png_is_written_with_its_pixels() {
    let dir = common::tempdir("png");
    let path = dir.join("chart.png");
    let mut img = egui::ColorImage::filled([3, 2], egui::Color32::from_rgb(10, 20, 30));
    img.pixels[4] = egui::Color32::from_rgb(200, 100, 50);
    prunescope::ui::write_png(&path, &img).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (3, 2));
    assert_eq!(&buf[..4], &[10, 20, 30, 255]);
    assert_eq!(&buf[16..20], &[200, 100, 50, 255]);
}

#[test]
fn fine_tuning_in_the_app_grows_its_curve_raises_accuracy_and_undoes() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.state_mut().state_mut().settings.sparsity = 0.9;
    step_until(&mut h, "metrics at 90 %", |a| {
        settled(a) && a.state().metrics_current()
    });
    let acc = |a: &App| {
        a.state()
            .model
            .as_ref()
            .unwrap()
            .metrics
            .clone()
            .unwrap()
            .result
            .unwrap()
            .accuracy
            .unwrap()
    };
    let before = acc(h.state());
    let pruned_before = h
        .state()
        .state()
        .model
        .as_ref()
        .unwrap()
        .preview
        .clone()
        .unwrap()
        .alloc
        .pruned;
    h.get_by_label("View").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::CheckBox, "Recover (fine-tune, schedules, lottery)")
        .click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::Button, "Start").click();
    step_until(&mut h, "the fine-tuned model", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.derived.as_deref() == Some("fine-tuned"))
            && settled(a)
            && a.state().metrics_current()
    });
    let view = h.state().state().training.clone().unwrap();
    assert_eq!(view.kind, "finetune");
    assert_eq!(view.epochs.len(), 5, "one point per epoch on the curve");
    let after = acc(h.state());
    assert!(after > before + 0.1, "{before} → {after}");
    h.get_by_label_contains(&format!("→ now {:.2}%", after * 100.0));
    // The same settings still select exactly the weights that are zero now.
    let state = h.state().state();
    assert_eq!(state.settings.sparsity, 0.9);
    let m = state.model.as_ref().unwrap();
    assert_eq!(m.preview.clone().unwrap().alloc.pruned, pruned_before);

    h.get_by_role_and_label(Role::Button, "Undo training")
        .click();
    step_until(&mut h, "the model before training", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.derived.as_deref() == Some("restored"))
            && settled(a)
            && a.state().metrics_current()
    });
    assert_eq!(acc(h.state()), before);
    // The run entered the history of the model it started from, beside the plain measurement.
    let m = h.state().state().model.as_ref().unwrap();
    let trained = m
        .history
        .iter()
        .find(|r| r.source.starts_with("fine-tune"))
        .expect("the fine-tune was recorded");
    assert_eq!(trained.settings.sparsity, 0.9);
    assert_eq!(trained.accuracy, Some(after));
    assert!(
        m.history
            .iter()
            .any(|r| r.source == "gui" && r.settings.sparsity == 0.9),
        "the untrained measurement at 90 % is still there"
    );
}

#[test]
fn a_gradual_schedule_by_movement_runs_from_the_recovery_panel() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.get_by_label("View").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::CheckBox, "Recover (fine-tune, schedules, lottery)")
        .click();
    h.run_steps(4);
    h.get_by_label("Schedule").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::CheckBox, "Prune by movement")
        .click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::Button, "Start").click();
    step_until(&mut h, "the scheduled model", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.derived.as_deref() == Some("pruned on a schedule"))
            && settled(a)
    });
    let m = h.state().state().model.as_ref().unwrap();
    let a = &m.preview.as_ref().unwrap().alloc;
    assert!(
        (a.pruned as f64 / a.prunable as f64 - 0.9).abs() < 1e-3,
        "{} of {}",
        a.pruned,
        a.prunable
    );
    // The run is recorded, with what it pruned by, in the history of the model it started from.
    h.get_by_role_and_label(Role::Button, "Undo training")
        .click();
    step_until(&mut h, "the model before training", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.derived.as_deref() == Some("restored"))
            && settled(a)
    });
    let m = h.state().state().model.as_ref().unwrap();
    assert!(
        m.history
            .iter()
            .any(|r| r.source == "schedule: AGP by movement"),
        "{:?}",
        m.history.iter().map(|r| &r.source).collect::<Vec<_>>()
    );
}

#[test]
fn head_pruning_in_the_app_cuts_what_the_library_cuts_and_shows_the_heads() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let path = fixture("onnx/attention_heads.onnx");
    h.state_mut().open_path(path.clone());
    step_until(&mut h, "the attention model", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.name.contains("attention_heads"))
            && settled(a)
    });
    h.get_by_role_and_label(Role::ComboBox, "Pattern").click();
    h.run_steps(4);
    h.get_by_label("head").click();
    h.run_steps(4);
    assert_eq!(h.state().state().settings.pattern, Pattern::Head);
    h.state_mut().state_mut().settings.sparsity = 0.5;
    let model = Model::open(&path).unwrap();
    h.state_mut().state_mut().selected = model.find("query.weight");
    step_until(&mut h, "a head cut at 50%", |a| {
        settled(a)
            && a.state()
                .model
                .as_ref()
                .and_then(|m| m.preview.as_ref())
                .is_some_and(|p| p.alloc.structured.is_some())
    });
    let settings = h.state().state().settings.clone();
    let lib = prune(
        &model,
        &settings,
        &ScoreInputs::default(),
        &prunescope::progress::Progress::none(),
    )
    .unwrap();
    let state = h.state().state();
    let preview = &state
        .model
        .as_ref()
        .unwrap()
        .preview
        .as_ref()
        .unwrap()
        .alloc;
    assert_eq!(preview.layers, lib.alloc.layers);
    h.get_by_label("Heads removed 2 of 4");
    // Head counts are not widths: no rounding control.
    assert!(h.query_by_label("Round widths to").is_none());
    h.get_by_label("Attention heads: 4 of 2 features, with 6 other tensor(s)");
}

fn latency_job(app: &App) -> Option<f32> {
    app.state()
        .jobs
        .iter()
        .find(|j| j.label == "Latency")
        .map(|j| j.fraction)
}

#[test]
fn a_latency_run_shows_progress_fills_the_charts_and_cancels() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    // Prune to 80 % first, so the masks the run measures are not trivial.
    let settings = PruneSettings {
        sparsity: 0.8,
        ..Default::default()
    };
    h.state_mut().state_mut().settings = settings.clone();
    step_until(&mut h, "the pruned counts", settled);
    h.get_by_label("View").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::CheckBox, "Latency").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::Button, "Measure latency")
        .click();
    let start = Instant::now();
    loop {
        h.step();
        let s = h.state().state();
        if latency_job(h.state()).is_some_and(|f| f > 0.0)
            && s.latency.as_ref().is_some_and(|r| !r.layers.is_empty())
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.run_steps(3);
    h.get_by_label_contains("Latency: ");
    // The totals table shows what has arrived.
    h.get_by_label("whole model (sum of layers)");
    h.get_all_by_role_and_label(Role::Button, "Cancel")
        .next()
        .unwrap()
        .click();
    step_until(&mut h, "the run to stop", |a| latency_job(a).is_none());
    let partial = h.state().state().latency.clone().unwrap();
    assert!(!partial.complete);
    h.get_by_label_contains("(unfinished)");

    // A whole run at batch 1 only: every prunable layer, its non-zeros as the core library's
    // masks have them, the curves drawn and the sizes measured.
    for b in ["8", "32", "128"] {
        h.get_by_role_and_label(Role::CheckBox, b).click();
        h.run_steps(2);
    }
    h.get_by_role_and_label(Role::Button, "Measure latency")
        .click();
    step_until(&mut h, "the run to finish", |a| {
        a.state().latency.as_ref().is_some_and(|r| r.complete) && latency_job(a).is_none()
    });
    let r = h.state().state().latency.clone().unwrap();
    assert_eq!(r.batches, vec![1]);
    let model = sample();
    let masks = masks_for(&model, &settings);
    let prunable: Vec<_> = (0..model.tensors.len())
        .filter(|&t| settings.is_prunable(&model, t) && model.tensors[t].shape.len() >= 2)
        .collect();
    assert_eq!(r.layers.len(), prunable.len());
    for (l, &t) in r.layers.iter().zip(&prunable) {
        assert_eq!(l.name, model.tensors[t].name);
        let kept = masks
            .get(&l.name)
            .map_or(model.tensors[t].numel, |m| m.count_kept());
        assert_eq!(l.nonzeros as usize, kept, "{}", l.name);
        // Each format measured once at batch 1; CSR stores exactly the kept weights.
        assert_eq!(l.measurements.len(), r.formats.len());
        assert_eq!(
            l.get(prunescope::latency::Format::Csr, 1).unwrap().stored,
            kept as u64
        );
    }
    assert!(!r.curves.is_empty());
    h.get_by_label_contains("Speedup over dense of");
    assert!(h.state().state().latency_sizes.is_some());
    h.get_by_role_and_label(Role::Button, "Sizes").click();
    h.run_steps(3);
    h.get_by_label_contains("raw and compressed by zstd");
}

#[test]
fn a_folder_of_shards_opens_through_open_path_and_prunes() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.get_by_label("File").click();
    h.run_steps(4);
    h.get_by_label_contains("Open path").click();
    h.run_steps(4);
    let dir = fixture("sharded");
    let field = h.get_by_role_and_label(
        Role::TextInput,
        "Model file (.safetensors, .pt, .pth, .bin, .npz, .onnx), or a sharded checkpoint's folder or index",
    );
    field.focus();
    field.type_text(&dir.display().to_string());
    h.run_steps(4);
    h.get_by_role_and_label(Role::Button, "Open").click();
    step_until(&mut h, "the checkpoint", |a| {
        a.state()
            .model
            .as_ref()
            .is_some_and(|m| m.snapshot.name.contains("index.json"))
            && settled(a)
    });
    let model = Model::open(&dir).unwrap();
    let snap = &h.state().state().model.as_ref().unwrap().snapshot;
    assert_eq!(snap.tensors.len(), model.tensors.len());
    // Every shard's tensors are in the table, the last shard's too.
    h.get_by_label("head");
    h.get_by_label("embed");
    // The global slider prunes across the shards exactly as the core library does.
    let settings = PruneSettings {
        sparsity: 0.5,
        ..Default::default()
    };
    h.state_mut().state_mut().settings = settings.clone();
    step_until(&mut h, "the pruned counts", settled);
    let masks = masks_for(&model, &settings);
    let pruned: u64 = masks
        .iter()
        .map(|(_, m)| (m.len() - m.count_kept()) as u64)
        .sum();
    h.get_by_label_contains(&format!("Pruned {} of", group_digits(pruned)));

    // Dropping any one shard onto the window opens the whole checkpoint again.
    let before = h.state().state().model.as_ref().unwrap().snapshot.id;
    h.input_mut()
        .dropped_files
        .push(std::sync::Arc::new(Dropped(
            dir.join("model-00002-of-00003.safetensors"),
        )));
    step_until(&mut h, "the dropped shard's checkpoint", |a| {
        a.state().model.as_ref().is_some_and(|m| {
            m.snapshot.id != before && m.snapshot.tensors.len() == model.tensors.len()
        }) && settled(a)
    });
}

/// A file dropped on the window (egui leaves the handle to the integration).
#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn neuron_pruning_shows_the_group_and_the_compacted_size_and_wanda_prunes_rows_alike() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let model = sample();
    h.get_by_role_and_label(Role::ComboBox, "Pattern").click();
    h.run_steps(4);
    h.get_by_label("neuron").click();
    h.run_steps(4);
    assert_eq!(h.state().state().settings.pattern, Pattern::Neuron);
    h.get_by_label("Round widths to");
    h.state_mut().state_mut().settings.sparsity = 0.5;
    let fc1 = model.find("fc1.weight").unwrap();
    h.state_mut().state_mut().selected = Some(fc1);
    step_until(&mut h, "a neuron cut at 50%", |a| {
        settled(a)
            && a.state()
                .model
                .as_ref()
                .and_then(|m| m.preview.as_ref())
                .is_some_and(|p| p.alloc.structured.is_some())
    });
    // What the core library cuts and compacts, independently of the app.
    let settings = h.state().state().settings.clone();
    let masks = masks_for(&model, &settings);
    let c = prunescope::export::compact::compact(&model, &masks).unwrap();
    let cut = 100.0 * (1.0 - c.report.params_after as f64 / model.total_params() as f64);
    h.get_by_label(&format!(
        "· compacted {} (−{cut:.1}%)",
        group_digits(c.report.params_after)
    ));
    let removed: usize = c.report.groups.iter().map(|g| g.removed).sum();
    h.get_by_label(&format!("Channels removed {removed} of 192"));
    // The compute it removes: the compacted model's multiply-adds, as compaction counts them.
    let (before, after) = (c.report.macs_before.unwrap(), c.report.macs_after.unwrap());
    assert!(after < before);
    h.get_by_label(&format!(
        "· {} of {} multiply-adds a sample (−{:.1}%)",
        group_digits(after),
        group_digits(before),
        100.0 * (1.0 - after as f64 / before as f64)
    ));
    // fc1's neurons: 128 channels tied to its bias and fc2's inputs.
    h.get_by_label("Dependency group of its output channels: 128 channels, with 2 other tensor(s)");

    // Wanda needs data: the sample has its digits, so it can be chosen.
    h.get_by_role_and_label(Role::ComboBox, "Pattern").click();
    h.run_steps(4);
    h.get_by_label("unstructured").click();
    h.run_steps(4);
    h.get_by_role_and_label(Role::ComboBox, "Criterion").click();
    h.run_steps(4);
    h.get_by_label("Wanda |w|·‖X‖").click();
    h.run_steps(4);
    h.get_by_label("Calibration samples");
    step_until(&mut h, "Wanda scores", |a| {
        settled(a) && a.state().settings.criterion == prunescope::prune::Criterion::Wanda
    });
    let settings = h.state().state().settings.clone();
    let data = prunescope::eval::evaluator_with_data(&model, &Default::default()).unwrap();
    let lib = prune(
        &model,
        &settings,
        &ScoreInputs {
            calibration: Some(data.calibration()),
            samples: settings.calibration,
            ..Default::default()
        },
        &prunescope::progress::Progress::none(),
    )
    .unwrap();
    let state = h.state().state();
    let preview = &state
        .model
        .as_ref()
        .unwrap()
        .preview
        .as_ref()
        .unwrap()
        .alloc;
    assert_eq!(preview.layers, lib.alloc.layers);
    // Every row of fc1 keeps the same number of weights, give or take one.
    let mask = lib.masks.get("fc1.weight").unwrap();
    let kept: Vec<usize> = (0..128)
        .map(|r| (0..64).filter(|&c| mask.kept(r * 64 + c)).count())
        .collect();
    assert!(
        kept.iter().max().unwrap() - kept.iter().min().unwrap() <= 1,
        "{kept:?}"
    );
}

#[test]
fn comparing_two_criteria_shows_their_overlap_and_both_accuracies() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.state_mut().state_mut().settings.sparsity = 0.7;
    let model = sample();
    h.state_mut().state_mut().selected = model.find("fc2.weight");
    step_until(&mut h, "the cut at 70%", settled);
    h.get_by_label("View").click();
    h.run_steps(4);
    h.get_by_label("Compare criteria").click();
    h.run_steps(4);
    h.get_by_label("Compare").click();
    step_until(&mut h, "the comparison", |a| {
        a.state().criteria.is_some() && !a.busy()
    });
    // The same comparison from the core library.
    let settings = h.state().state().settings.clone();
    let lamp = PruneSettings {
        criterion: prunescope::prune::Criterion::Lamp,
        ..settings.clone()
    };
    let (ma, mb) = (masks_for(&model, &settings), masks_for(&model, &lamp));
    let want = prunescope::analysis::mask_overlap(&model, &ma, &mb);
    let state = h.state().state();
    let c = state.criteria.as_ref().unwrap();
    assert_eq!(c.overlap, want);
    // LAMP gives each layer its own sparsity, so the cuts differ somewhere but not everywhere.
    assert!(want.iter().any(|o| o.iou() < 1.0) && want.iter().any(|o| o.iou() > 0.0));
    let evaluator = evaluator_for(&model).unwrap().unwrap();
    let acc = |m| evaluator.evaluate(&model, m).unwrap().accuracy.unwrap() * 100.0;
    h.get_by_label(&format!("magnitude |w|: accuracy {:.2}%", acc(&ma)));
    h.get_by_label(&format!("LAMP (layer-adaptive): accuracy {:.2}%", acc(&mb)));
    h.get_by_label("Where they disagree in fc2.weight");
}

#[test]
fn sparsegpt_in_the_app_gives_the_librarys_model_and_undo_brings_the_original_back() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.state_mut().state_mut().settings.sparsity = 0.7;
    step_until(&mut h, "the cut at 70%", settled);
    h.get_by_label("Run SparseGPT").click();
    step_until(&mut h, "the SparseGPT model", |a| {
        settled(a)
            && a.state()
                .model
                .as_ref()
                .is_some_and(|m| m.snapshot.name.contains("SparseGPT"))
    });
    // The same run in the core library, measured by an independent evaluator.
    let model = sample();
    let settings = PruneSettings {
        criterion: prunescope::prune::Criterion::SparseGpt,
        ..h.state().state().settings.clone()
    };
    let evaluator = prunescope::eval::evaluator_with_data(&model, &Default::default()).unwrap();
    let p = prune(
        &model,
        &settings,
        &ScoreInputs {
            calibration: Some(evaluator.calibration()),
            samples: settings.calibration,
            ..Default::default()
        },
        &prunescope::progress::Progress::none(),
    )
    .unwrap();
    let u = p.updated.unwrap();
    let acc = evaluator
        .evaluate(&u.model, &prunescope::prune::MaskSet::new())
        .unwrap()
        .accuracy
        .unwrap();
    h.get_by_label_contains(&format!("Accuracy: dense {:.2}%", acc * 100.0));
    assert_eq!(
        h.state().state().settings.criterion,
        prunescope::prune::Criterion::Magnitude
    );
    h.get_by_label("Undo").click();
    step_until(&mut h, "the original back", |a| {
        settled(a)
            && a.state()
                .model
                .as_ref()
                .is_some_and(|m| !m.snapshot.name.contains("SparseGPT"))
    });
}

#[test]
fn split_by_owl_sets_the_librarys_layer_targets() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    h.state_mut().state_mut().settings.sparsity = 0.6;
    step_until(&mut h, "the cut at 60%", settled);
    let before = h.state().state().settings.clone();
    h.get_by_label("Split by OWL").click();
    step_until(&mut h, "OWL targets", |a| {
        settled(a) && a.state().settings.scope == prunescope::prune::Scope::Layer
    });
    let model = sample();
    let evaluator = prunescope::eval::evaluator_with_data(&model, &Default::default()).unwrap();
    let want = prunescope::prune::owl::plan(
        &model,
        &before,
        evaluator.calibration(),
        before.calibration,
        prunescope::prune::owl::DEFAULT_M,
        prunescope::prune::owl::DEFAULT_LAMBDA,
        &prunescope::progress::Progress::none(),
    )
    .unwrap();
    assert_eq!(h.state().state().settings, want);
    h.get_by_label_contains("OWL set each layer's target");
}

#[test]
fn the_export_dialog_writes_the_compacted_model_the_library_makes() {
    let mut h = harness();
    step_until(&mut h, "the sample model", settled);
    let model = sample();
    h.state_mut().state_mut().settings = PruneSettings {
        pattern: Pattern::Neuron,
        sparsity: 0.5,
        ..Default::default()
    };
    step_until(&mut h, "the neuron cut", settled);
    h.get_by_label("File").click();
    h.run_steps(4);
    h.get_by_label_contains("Export…").click();
    h.run_steps(4);
    h.get_by_label("Compacted model");
    let dir = common::tempdir("gui-compact");
    let out = dir.join("small.safetensors");
    let settings = h.state().state().settings.clone();
    h.state_mut().export(prunescope::worker::ExportRequest {
        settings: settings.clone(),
        weights: None,
        masks: None,
        recipe: None,
        compacted: Some(out.clone()),
    });
    step_until(&mut h, "the export", |a| {
        a.state()
            .notice
            .as_deref()
            .is_some_and(|n| n.starts_with("Wrote"))
    });
    let want = prunescope::export::compact::compact(&model, &masks_for(&model, &settings)).unwrap();
    let got = Model::open(&out).unwrap();
    assert_eq!(got.total_params(), want.report.params_after);
    for (a, b) in got.tensors.iter().zip(&want.model.tensors) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
        let (ta, tb) = (
            got.find(&a.name).unwrap(),
            want.model.find(&b.name).unwrap(),
        );
        assert_eq!(got.to_f32_vec(ta), want.model.to_f32_vec(tb), "{}", a.name);
    }
    // And it runs: its graph travels in its metadata.
    let e = prunescope::eval::evaluator_for(&got).unwrap().unwrap();
    assert!(e.evaluate(&got, &prunescope::prune::MaskSet::new()).is_ok());
}
