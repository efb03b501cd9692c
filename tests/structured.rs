//! Structured pruning and compaction: the channels that go are the lowest by the group's L1
//! norm, counted by explicit loops; every slice of a group goes with them; the compacted
//! model computes the masked model's outputs on the digits test set, at every cut of every
//! group, with shapes that check.

use std::path::Path;

use candle_core::{Device, Tensor};
use prunescope::graph::{Graph, Mode, load_params};
use prunescope::model::Model;
use prunescope::progress::Progress;
use prunescope::prune::{MaskSet, Pattern, PruneSettings, ScoreInputs, prune, structured};
use prunescope::train::Trainable;

fn sample(name: &str) -> Model {
    Model::open(Path::new(&format!("sample_models/{name}.safetensors"))).unwrap()
}

fn settings(pattern: Pattern, s: f64, round: usize) -> PruneSettings {
    PruneSettings {
        pattern,
        sparsity: s,
        round_width: round,
        ..Default::default()
    }
}

/// Logits of `model` (masks applied) on the first 64 digits of the test split.
fn logits(graph: &Graph, model: &Model, masks: Option<&MaskSet>) -> Vec<f32> {
    let test = prunescope::data::digits_split().unwrap().test;
    let n = 64;
    let mut shape = vec![n];
    shape.extend(&graph.inputs[0].shape);
    let x = Tensor::from_slice(&test.inputs[..n * test.dim], shape, &Device::Cpu).unwrap();
    let p = load_params(graph, model, masks, &Device::Cpu).unwrap();
    let (y, _) = graph.forward(&[x], &p, Mode::Eval).unwrap();
    y.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn the_lowest_l1_channels_go_with_every_slice_of_their_group() {
    let model = sample("digits_rescnn");
    let graph = Trainable::graph_of(&model).unwrap();
    let groups = graph.dependency_groups(&model).unwrap();
    let p = prune(
        &model,
        &settings(Pattern::Channel, 0.5, 1),
        &ScoreInputs::default(),
        &Progress::none(),
    )
    .unwrap();
    for g in &groups.groups {
        // The group's L1 norm per channel, over its convolution and Linear weights' slices.
        let mut l1 = vec![0f64; g.channels];
        for m in &g.members {
            let t = model.find(&m.tensor).unwrap();
            let shape = &model.tensors[t].shape;
            if shape.len() < 2 {
                continue;
            }
            let v = model.to_f32_vec(t);
            let inner: usize = shape[m.axis + 1..].iter().product();
            for (i, x) in v.iter().enumerate() {
                let coord = (i / inner) % shape[m.axis];
                l1[(coord - m.offset) / m.per_channel] += x.abs() as f64;
            }
        }
        let mut order: Vec<usize> = (0..g.channels).collect();
        order.sort_by(|&a, &b| l1[a].total_cmp(&l1[b]));
        let gone: Vec<usize> = order[..g.channels / 2].to_vec();
        // Every member: exactly the slices of the removed channels are pruned.
        for m in &g.members {
            let t = model.find(&m.tensor).unwrap();
            let shape = &model.tensors[t].shape;
            let mask = p.masks.get(&m.tensor).expect("every member is masked");
            let inner: usize = shape[m.axis + 1..].iter().product();
            for i in 0..mask.len() {
                let c = ((i / inner) % shape[m.axis] - m.offset) / m.per_channel;
                // A tensor sliced by two groups (a conv's inputs and outputs) loses both.
                if gone.contains(&c) {
                    assert!(!mask.kept(i), "{} entry {i} (channel {c})", m.tensor);
                }
            }
        }
        // And the producer's kept rows are exactly the other channels.
        let prod = &g.members[0];
        let t = model.find(&prod.tensor).unwrap();
        let inner: usize = model.tensors[t].shape[1..].iter().product();
        let mask = p.masks.get(&prod.tensor).unwrap();
        for c in 0..g.channels {
            let any_kept = (0..inner).any(|k| mask.kept(c * inner + k));
            assert_eq!(any_kept, !gone.contains(&c), "{} row {c}", prod.tensor);
        }
    }
}

#[test]
fn kept_widths_round_up_to_the_multiple_asked_for() {
    assert_eq!(structured::removed_channels(16, 0.5, 8), 8);
    assert_eq!(structured::removed_channels(16, 0.6, 8), 8); // 6.4 kept → 8
    assert_eq!(structured::removed_channels(16, 0.6, 1), 9); // 6.4 kept → 7
    assert_eq!(structured::removed_channels(16, 1.0, 8), 8); // at least one multiple stays
    assert_eq!(structured::removed_channels(16, 1.0, 1), 15); // at least one channel
    assert_eq!(structured::removed_channels(6, 0.5, 8), 3); // narrower than the multiple
    assert_eq!(structured::removed_channels(0, 0.5, 8), 0);
    // 1 − 0.7 is 0.30000000000000004 in floating point: still 24 of 80 kept, 30 of 100.
    assert_eq!(structured::removed_channels(80, 0.7, 8), 56);
    assert_eq!(structured::removed_channels(100, 0.7, 1), 70);
}

#[test]
fn compacted_models_compute_the_masked_outputs_at_every_cut() {
    for (name, pattern) in [
        ("digits_rescnn", Pattern::Channel),
        ("digits_cnn", Pattern::Channel),
        ("digits_mlp", Pattern::Neuron),
    ] {
        let model = sample(name);
        let graph = Trainable::graph_of(&model).unwrap();
        for s in [0.1, 0.3, 0.5, 0.7, 0.9] {
            let p = prune(
                &model,
                &settings(pattern, s, 1),
                &ScoreInputs::default(),
                &Progress::none(),
            )
            .unwrap();
            let c = prunescope::export::compact::compact(&model, &p.masks).unwrap();
            // No dangling shape: the smaller model's graph checks against its tensors.
            graph
                .check(&c.model)
                .unwrap_or_else(|e| panic!("{name} at {s}: {e}"));
            let (a, b) = (
                logits(&graph, &model, Some(&p.masks)),
                logits(&graph, &c.model, None),
            );
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name} at {s}: outputs differ by {worst}");
            // Every pruned channel was removed: as many parameters as the masks keep in the
            // tensors that groups slice, plus the rest.
            let removed: usize = c.report.groups.iter().map(|g| g.removed).sum();
            let asked: usize = structured::plan(
                &model,
                &structured::order_for(&model, &p.index).unwrap(),
                &settings(pattern, s, 1),
            )
            .iter()
            .sum();
            assert_eq!(removed, asked, "{name} at {s}");
            assert!(c.report.params_after < c.report.params_before);
            // The slider's count of what compaction leaves agrees with the compaction itself.
            let cut = p.alloc.structured.unwrap();
            assert_eq!(cut.compacted_params, c.report.params_after);
            assert_eq!(cut.removed as usize, removed);
            assert!(c.report.macs_after.unwrap() < c.report.macs_before.unwrap());
            // And its multiply-adds, counted from kept entries, agree with the smaller graph's.
            assert_eq!(
                cut.macs,
                Some((c.report.macs_before.unwrap(), c.report.macs_after.unwrap())),
                "{name} at {s}"
            );
        }
    }
}

#[test]
fn a_model_without_a_graph_or_without_that_kind_of_channel_says_so() {
    let bare = Model::from_f32_tensors("bare", vec![("w".into(), vec![4, 4], vec![1.0; 16])]);
    let e = prune(
        &bare,
        &settings(Pattern::Channel, 0.5, 8),
        &ScoreInputs::default(),
        &Progress::none(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("follows the model's graph"), "{e}");
    let e = prune(
        &sample("digits_mlp"),
        &settings(Pattern::Channel, 0.5, 8),
        &ScoreInputs::default(),
        &Progress::none(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("try --granularity neuron"), "{e}");
}

#[test]
fn an_onnx_model_compacts_to_a_smaller_onnx_that_computes_the_same() {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("prunescope-compact-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = env!("CARGO_BIN_EXE_prunescope");
    let input = "tests/fixtures/onnx/digits_cnn_opset17.onnx";
    let (masked, masks, small) = (
        dir.join("masked.onnx"),
        dir.join("masks.safetensors"),
        dir.join("small.onnx"),
    );
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let p = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "prune",
        input,
        "--granularity",
        "channel",
        "--sparsity",
        "0.5",
        "--round-width",
        "1",
        "--out",
        &p(&masked),
        "--masks",
        &p(&masks),
    ]);
    let out = run(&[
        "compact",
        input,
        "--masks",
        &p(&masks),
        "--out",
        &p(&small),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["params_after"].as_u64() < report["params_before"].as_u64());

    // In prunescope: the compacted ONNX, read back, computes the masked model's outputs.
    let original = Model::open(Path::new(input)).unwrap();
    let graph = Trainable::graph_of(&original).unwrap();
    let small_model = Model::open(&small).unwrap();
    graph.check(&small_model).unwrap();
    let masks = prunescope::export::load_masks(&original, &masks).unwrap();
    let (a, b) = (
        logits(&graph, &original, Some(&masks)),
        logits(&graph, &small_model, None),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "outputs differ by {worst}");

    // In onnxruntime, where Python with onnxruntime is at hand.
    onnxruntime_agrees(&masked, &small);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `tools/check_compacted_onnx.py`: onnxruntime gives the masked and the compacted ONNX
/// file the same outputs, and the compacted one is smaller. SKIPPED without Python's onnx and
/// onnxruntime.
fn onnxruntime_agrees(masked: &Path, small: &Path) {
    use std::process::Command;
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let python =
        std::env::var("PRUNESCOPE_PYTHON").unwrap_or_else(|_| "/work/pyenv/bin/python".into());
    match Command::new(&python)
        .args(["tools/check_compacted_onnx.py", &p(masked), &p(small)])
        .output()
    {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout);
            eprintln!("onnxruntime: {line}");
            let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
            assert_eq!(v["ok"], true);
        }
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            eprintln!(
                "SKIPPED: {python} lacks onnx or onnxruntime; the onnxruntime check was not run"
            )
        }
        Ok(o) => panic!(
            "onnxruntime check failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!("SKIPPED: no Python at {python} ({e}); the onnxruntime check was not run")
        }
    }
}

#[test]
fn block_pruning_removes_the_lowest_mean_magnitude_blocks_whole() {
    let mut rng = prunescope::util::SplitMix64::new(9);
    let mut r = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect()
    };
    // A 10 × 7 matrix (edge blocks of 1 row and 1 column at b = 3) and a conv kernel.
    let model = Model::from_f32_tensors(
        "blocks",
        vec![
            ("a".into(), vec![10, 7], r(70)),
            ("k".into(), vec![4, 2, 3, 3], r(72)),
        ],
    );
    for (b, s) in [(3usize, 0.5f64), (3, 0.2), (2, 0.75), (1, 0.4)] {
        let settings = settings(Pattern::Block { b }, s, 1);
        let p = prune(
            &model,
            &settings,
            &ScoreInputs::default(),
            &Progress::none(),
        )
        .unwrap();
        for (t, e) in model.tensors.iter().enumerate() {
            let v = model.to_f32_vec(t);
            let (rows, cols) = e.matrix_dims();
            // Blocks by explicit loops: their cells and mean |w|.
            let mut blocks: Vec<(f64, usize, Vec<usize>)> = Vec::new();
            for br in 0..rows.div_ceil(b) {
                for bc in 0..cols.div_ceil(b) {
                    let cells: Vec<usize> = (br * b..((br + 1) * b).min(rows))
                        .flat_map(|i| (bc * b..((bc + 1) * b).min(cols)).map(move |j| i * cols + j))
                        .collect();
                    let mean =
                        cells.iter().map(|&i| v[i].abs() as f64).sum::<f64>() / cells.len() as f64;
                    blocks.push((mean, blocks.len(), cells));
                }
            }
            blocks.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            // The prefix of whole blocks closest to the target (the smaller on a tie).
            let target = (s * e.numel as f64).round() as i64;
            let mut best = (i64::MAX, 0usize);
            let mut sum = 0i64;
            for j in 0..=blocks.len() {
                let d = (sum - target).abs();
                if d < best.0 {
                    best = (d, j);
                }
                if j < blocks.len() {
                    sum += blocks[j].2.len() as i64;
                }
            }
            let mut kept = vec![true; e.numel];
            for blk in &blocks[..best.1] {
                for &i in &blk.2 {
                    kept[i] = false;
                }
            }
            let mask = p.masks.get(&e.name).unwrap();
            let got: Vec<bool> = (0..e.numel).map(|i| mask.kept(i)).collect();
            assert_eq!(got, kept, "{} at b={b}, s={s}", e.name);
            let l = p.alloc.for_tensor(t).unwrap();
            assert_eq!(l.pruned, kept.iter().filter(|k| !**k).count());
        }
    }
}

#[test]
fn one_by_one_blocks_are_layer_wise_unstructured_pruning() {
    let model = sample("digits_mlp");
    let blocks = prune(
        &model,
        &settings(Pattern::Block { b: 1 }, 0.7, 1),
        &ScoreInputs::default(),
        &Progress::none(),
    )
    .unwrap();
    let mut layer = settings(Pattern::Unstructured, 0.7, 1);
    layer.scope = prunescope::prune::Scope::Layer;
    for t in 0..model.tensors.len() {
        if layer.is_prunable(&model, t) {
            layer.layer_mut(&model.tensors[t].name).sparsity = 0.7;
        }
    }
    let unstructured = prune(&model, &layer, &ScoreInputs::default(), &Progress::none()).unwrap();
    for (name, m) in unstructured.masks.iter() {
        assert!(blocks.masks.get(name) == Some(m), "{name}");
    }
}

#[test]
fn a_locked_layer_keeps_every_weight_whichever_group_would_slice_it() {
    let model = sample("digits_mlp");
    let mut s = settings(Pattern::Neuron, 0.5, 1);
    // fc3 reads fc2's neurons: locked, fc2's neurons must all stay; fc1's still go.
    s.layer_mut("fc3.weight").locked = true;
    let p = prune(&model, &s, &ScoreInputs::default(), &Progress::none()).unwrap();
    assert!(
        p.masks
            .get("fc3.weight")
            .is_none_or(|m| m.count_kept() == m.len())
    );
    let fc2 = p.masks.get("fc2.weight").unwrap();
    // fc2 [64, 128]: every row keeps something (no neuron of fc2 removed), half its inputs go.
    for r in 0..64 {
        assert!((0..128).any(|c| fc2.kept(r * 128 + c)), "fc2 row {r}");
    }
    assert_eq!(fc2.count_kept(), 64 * 64);
}

/// The attention fixtures' data, and its inputs as one flat array.
fn attention_data() -> (std::sync::Arc<prunescope::data::EvalData>, Vec<f32>) {
    let data = prunescope::data::load_eval_data(
        Path::new("tests/fixtures/onnx/attention_data.npz"),
        &["x".to_string()],
        &Default::default(),
    )
    .unwrap();
    let prunescope::data::ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    let x = x.clone();
    (std::sync::Arc::new(data), x)
}

/// `model`'s outputs on `data` through tract, `masks` applied.
fn tract_outputs(
    model: &Model,
    data: &std::sync::Arc<prunescope::data::EvalData>,
    masks: Option<&MaskSet>,
) -> Vec<f32> {
    use prunescope::eval::Runner;
    let info = prunescope::eval::GraphInfo::read(model).unwrap();
    prunescope::eval::OnnxRunner::new(model, info, data.clone())
        .unwrap()
        .run(model, masks)
        .unwrap()
        .values
}

/// The attention fixture's (E = 8, H = 4 heads of D = 2) output on its data, computed by hand
/// in f64 with only the heads in `kept`: a smaller attention block, not a masked one.
fn attention_by_hand(m: &Model, x: &[f32], kept: &[usize]) -> Vec<f64> {
    let (e, d, t) = (8, 2, 3);
    let p = |name: &str| -> Vec<f64> {
        m.to_f32_vec(m.find(name).unwrap())
            .iter()
            .map(|v| *v as f64)
            .collect()
    };
    let (wq, bq, wk, bk, wv, bv, wo, bo) = (
        p("query.weight"),
        p("query.bias"),
        p("key.weight"),
        p("key.bias"),
        p("value.weight"),
        p("value.bias"),
        p("out.weight"),
        p("out.bias"),
    );
    let linear = |w: &[f64], b: &[f64], row: &[f64]| -> Vec<f64> {
        (0..e)
            .map(|o| b[o] + (0..e).map(|i| w[o * e + i] * row[i]).sum::<f64>())
            .collect()
    };
    let mut out = Vec::new();
    for s in x.chunks(t * e) {
        let rows: Vec<Vec<f64>> = s
            .chunks(e)
            .map(|r| r.iter().map(|v| *v as f64).collect())
            .collect();
        let q: Vec<Vec<f64>> = rows.iter().map(|r| linear(&wq, &bq, r)).collect();
        let k: Vec<Vec<f64>> = rows.iter().map(|r| linear(&wk, &bk, r)).collect();
        let v: Vec<Vec<f64>> = rows.iter().map(|r| linear(&wv, &bv, r)).collect();
        let mut mean = vec![0f64; e];
        for qa in &q {
            let mut ctx = vec![0f64; e];
            for &h in kept {
                let score: Vec<f64> = (0..t)
                    .map(|u| {
                        (0..d).map(|j| qa[h * d + j] * k[u][h * d + j]).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = score.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = score.iter().map(|s| (s - mx).exp()).sum();
                for u in 0..t {
                    let pr = (score[u] - mx).exp() / z;
                    for j in 0..d {
                        ctx[h * d + j] += pr * v[u][h * d + j];
                    }
                }
            }
            // The output projection reads only the kept heads' features.
            for (o, mo) in mean.iter_mut().enumerate() {
                let y = bo[o]
                    + kept
                        .iter()
                        .flat_map(|&h| h * d..(h + 1) * d)
                        .map(|i| wo[o * e + i] * ctx[i])
                        .sum::<f64>();
                *mo += y / t as f64;
            }
        }
        out.extend(mean);
    }
    out
}

#[test]
fn attention_heads_are_found_in_an_exported_transformer_and_cut_whole() {
    let dir = Path::new("tests/fixtures/onnx");
    let m = Model::open(&dir.join("attention_heads.onnx")).unwrap();
    let groups = structured::groups_of(&m).unwrap();
    assert_eq!(groups.groups.len(), 1);
    let g = &groups.groups[0];
    assert_eq!((g.channels, g.head_dim), (4, Some(2)));
    let listed: Vec<(&str, usize, usize)> = g
        .members
        .iter()
        .map(|m| (m.tensor.as_str(), m.axis, m.per_channel))
        .collect();
    assert_eq!(
        listed,
        [
            ("query.weight", 0, 2),
            ("query.bias", 0, 2),
            ("key.weight", 0, 2),
            ("key.bias", 0, 2),
            ("value.weight", 0, 2),
            ("value.bias", 0, 2),
            ("out.weight", 1, 2),
        ]
    );
    // Heads ranked by the L1 norm of all their weights, summed by hand.
    let w = |n: &str| m.to_f32_vec(m.find(n).unwrap());
    let l1: Vec<f64> = (0..4)
        .map(|h| {
            let mut s = 0.0;
            for n in ["query.weight", "key.weight", "value.weight"] {
                s += w(n)[h * 16..(h + 1) * 16]
                    .iter()
                    .map(|v| v.abs() as f64)
                    .sum::<f64>();
            }
            s + (0..8)
                .flat_map(|o| [o * 8 + 2 * h, o * 8 + 2 * h + 1])
                .map(|i| w("out.weight")[i].abs() as f64)
                .sum::<f64>()
        })
        .collect();
    let mut by_l1: Vec<usize> = (0..4).collect();
    by_l1.sort_by(|&a, &b| l1[a].total_cmp(&l1[b]));
    // Head counts are not rounded to the width multiple (8 would keep all four).
    let s = settings(Pattern::Head, 0.5, 8);
    let masks = prune(&m, &s, &ScoreInputs::default(), &Progress::none())
        .unwrap()
        .masks;
    let gone = &by_l1[..2];
    let kept: Vec<usize> = (0..4).filter(|h| !gone.contains(h)).collect();
    for (name, per_row) in [
        ("query.weight", 8),
        ("key.weight", 8),
        ("value.weight", 8),
        ("query.bias", 1),
        ("key.bias", 1),
        ("value.bias", 1),
    ] {
        let mk = masks.get(name).unwrap();
        for i in 0..mk.len() {
            let head = i / per_row / 2;
            assert_eq!(mk.kept(i), kept.contains(&head), "{name} #{i}");
        }
    }
    let mo = masks.get("out.weight").unwrap();
    for i in 0..64 {
        assert_eq!(mo.kept(i), kept.contains(&(i % 8 / 2)), "out.weight #{i}");
    }
    assert!(masks.get("out.bias").is_none());
    // The masked model through tract computes what the smaller block computes.
    let (data, x) = attention_data();
    for (masks, heads) in [(None, vec![0, 1, 2, 3]), (Some(&masks), kept.clone())] {
        let got = tract_outputs(&m, &data, masks);
        let want = attention_by_hand(&m, &x, &heads);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() < 1e-5,
                "heads {heads:?} #{i}: {g} vs {w}"
            );
        }
    }
    // This export's Reshapes fix the head count (view(B, -1, H, D)): no smaller model.
    match prunescope::export::compact::compact(&m, &masks) {
        Err(e) => assert!(e.to_string().contains("cannot run with fewer heads"), "{e}"),
        Ok(_) => panic!("a head cut was compacted"),
    }
}

#[test]
fn a_head_cut_compacts_to_a_smaller_onnx_where_the_reshapes_leave_the_count_free() {
    let dir = Path::new("tests/fixtures/onnx");
    // view(*shape, -1, D) and reshape(B, T, -1), as newer transformers write them.
    let m = Model::open(&dir.join("attention_heads_flexible.onnx")).unwrap();
    let masks = prune(
        &m,
        &settings(Pattern::Head, 0.5, 8),
        &ScoreInputs::default(),
        &Progress::none(),
    )
    .unwrap()
    .masks;
    let kept: Vec<usize> = (0..4)
        .filter(|h| masks.get("query.weight").unwrap().kept(h * 16))
        .collect();
    assert_eq!(kept.len(), 2);
    let c = prunescope::export::compact::compact(&m, &masks).unwrap();
    assert!(c.onnx_only);
    assert_eq!(c.report.groups[0].removed, 2);
    assert_eq!(c.report.macs_before, None);
    // 4 heads of 2 features: the projections keep 4 of 8 features, out keeps 4 of 8 inputs.
    assert_eq!(
        c.report.params_before - c.report.params_after,
        3 * (4 * 8 + 4) + 8 * 4
    );
    let out = std::env::temp_dir().join(format!("prunescope-heads-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let refused = prunescope::export::compact::write(
        &m,
        &masks,
        &c,
        &out.join("small.safetensors"),
        &Progress::none(),
    );
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("write it as .onnx")
    );
    let path = out.join("small.onnx");
    prunescope::export::compact::write(&m, &masks, &c, &path, &Progress::none()).unwrap();
    let small = Model::open(&path).unwrap();
    for (name, shape) in [
        ("query.weight", vec![4, 8]),
        ("key.bias", vec![4]),
        ("value.weight", vec![4, 8]),
        ("out.weight", vec![8, 4]),
        ("out.bias", vec![8]),
    ] {
        assert_eq!(
            small.tensors[small.find(name).unwrap()].shape,
            shape,
            "{name}"
        );
    }
    // The smaller graph computes the masked model's outputs and the kept heads' by hand.
    let (data, x) = attention_data();
    let want = attention_by_hand(&m, &x, &kept);
    let masked = tract_outputs(&m, &data, Some(&masks));
    let compacted = tract_outputs(&small, &data, None);
    for (i, w) in want.iter().enumerate() {
        assert!((masked[i] as f64 - w).abs() < 1e-5, "masked #{i}");
        assert!((compacted[i] as f64 - w).abs() < 1e-5, "compacted #{i}");
    }
    let masked_file = out.join("masked.onnx");
    prunescope::export::export_weights(&m, &masks, &masked_file, &Progress::none()).unwrap();
    onnxruntime_agrees(&masked_file, &path);
    let _ = std::fs::remove_dir_all(&out);
}
