//! The data-driven criteria against independent computations: gradients by central finite
//! differences of a loss written out in f64, Wanda's norms by hand, and per-row pruning by
//! counting.

use prunescope::data::{ArrayValues, DataArray, EvalData};
use prunescope::eval::ARCH_METADATA_KEY;
use prunescope::model::Model;
use prunescope::progress::Progress;
use prunescope::prune::{Criterion, PruneSettings, ScoreInputs, calibrate, prune};

const D: usize = 3;
const H: usize = 4;
const C: usize = 3;
const N: usize = 5;
/// The parameters in the order the loss below reads them.
const NAMES: [&str; 4] = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"];

fn values(m: &Model, k: usize) -> Vec<f32> {
    m.to_f32_vec(m.find(NAMES[k]).unwrap())
}

fn toy() -> (Model, EvalData) {
    let mut rng = prunescope::util::SplitMix64::new(11);
    let mut r = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect()
    };
    let tensors = vec![
        ("l1.weight".to_string(), vec![H, D], r(H * D)),
        ("l1.bias".to_string(), vec![H], r(H)),
        ("l2.weight".to_string(), vec![C, H], r(C * H)),
        ("l2.bias".to_string(), vec![C], r(C)),
    ];
    let x = r(N * D);
    let mut m = Model::from_f32_tensors("toy", tensors);
    m.metadata.insert(
        ARCH_METADATA_KEY.into(),
        serde_json::json!({
            "kind": "mlp", "input_dim": D, "dataset": "none",
            "layers": [
                {"weight": "l1.weight", "bias": "l1.bias", "activation": "relu"},
                {"weight": "l2.weight", "bias": "l2.bias", "activation": "none"}
            ]
        })
        .to_string(),
    );
    let data = EvalData {
        name: "toy".into(),
        inputs: vec![DataArray {
            name: "x".into(),
            shape: vec![N, D],
            values: ArrayValues::F32(x),
        }],
        labels: Some(vec![0, 2, 1, 2, 0]),
        samples: N,
    };
    (m, data)
}

/// The toy's cross-entropy on sample `i` (or the mean over all with `None`), in f64, from
/// flat parameter vectors.
fn loss(p: &[Vec<f64>; 4], x: &[f32], labels: &[u32], i: Option<usize>) -> f64 {
    let samples: Vec<usize> = match i {
        Some(i) => vec![i],
        None => (0..N).collect(),
    };
    let mut total = 0.0;
    for &s in &samples {
        let xs: Vec<f64> = x[s * D..(s + 1) * D].iter().map(|v| *v as f64).collect();
        let h: Vec<f64> = (0..H)
            .map(|j| (p[1][j] + (0..D).map(|k| p[0][j * D + k] * xs[k]).sum::<f64>()).max(0.0))
            .collect();
        let z: Vec<f64> = (0..C)
            .map(|c| p[3][c] + (0..H).map(|j| p[2][c * H + j] * h[j]).sum::<f64>())
            .collect();
        let mx = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        total += lse - z[labels[s] as usize];
    }
    total / samples.len() as f64
}

fn params_f64(m: &Model) -> [Vec<f64>; 4] {
    std::array::from_fn(|k| values(m, k).iter().map(|v| *v as f64).collect())
}

/// ∂loss/∂p[t][j] by central differences.
fn fd_grad(m: &Model, data: &EvalData, i: Option<usize>) -> [Vec<f64>; 4] {
    fd_grad_at(&params_f64(m), data, i)
}

/// ∂loss/∂p[t][j] by central differences, at parameters `p`.
fn fd_grad_at(p: &[Vec<f64>; 4], data: &EvalData, i: Option<usize>) -> [Vec<f64>; 4] {
    let ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    let labels = data.labels.as_ref().unwrap();
    std::array::from_fn(|t| {
        (0..p[t].len())
            .map(|j| {
                let h = 1e-5;
                let mut a = p.clone();
                a[t][j] += h;
                let mut b = p.clone();
                b[t][j] -= h;
                (loss(&a, x, labels, i) - loss(&b, x, labels, i)) / (2.0 * h)
            })
            .collect()
    })
}

fn scores(m: &Model, data: &EvalData, c: Criterion) -> Vec<Option<Vec<f32>>> {
    let inputs = ScoreInputs {
        calibration: Some(data),
        samples: N,
        ..Default::default()
    };
    calibrate::tensor_scores(m, c, &inputs, &Progress::none()).unwrap()
}

fn close(got: f32, want: f64, what: &str) {
    assert!(
        (got as f64 - want).abs() <= 2e-4 * want.abs() + 2e-6,
        "{what}: {got} vs {want}"
    );
}

#[test]
fn taylor_is_weight_times_the_finite_difference_gradient() {
    let (m, data) = toy();
    let s = scores(&m, &data, Criterion::Taylor);
    let g = fd_grad(&m, &data, None);
    for t in 0..4 {
        let w = values(&m, t);
        let st = s[m.find(NAMES[t]).unwrap()].as_ref().unwrap();
        for j in 0..w.len() {
            close(
                st[j],
                (w[j] as f64 * g[t][j]).abs(),
                &format!("{} #{j}", NAMES[t]),
            );
        }
    }
}

#[test]
fn obd_is_half_w_squared_times_the_mean_squared_per_sample_gradient() {
    let (m, data) = toy();
    let s = scores(&m, &data, Criterion::Obd);
    let per: Vec<[Vec<f64>; 4]> = (0..N).map(|i| fd_grad(&m, &data, Some(i))).collect();
    for t in 0..4 {
        let w = values(&m, t);
        let st = s[m.find(NAMES[t]).unwrap()].as_ref().unwrap();
        for j in 0..w.len() {
            let fisher = per.iter().map(|g| g[t][j] * g[t][j]).sum::<f64>() / N as f64;
            close(
                st[j],
                0.5 * (w[j] as f64).powi(2) * fisher,
                &format!("{} #{j}", NAMES[t]),
            );
        }
    }
}

#[test]
fn movement_sums_minus_w_times_g_over_the_sgd_steps_written_out_with_finite_differences() {
    let (m, data) = toy();
    let s = scores(&m, &data, Criterion::Movement);
    // The toy's five samples are one batch: each epoch is one full-batch SGD step.
    let mut p = params_f64(&m);
    let mut sum: [Vec<f64>; 4] = std::array::from_fn(|t| vec![0.0; p[t].len()]);
    for _ in 0..calibrate::MOVEMENT_EPOCHS {
        let g = fd_grad_at(&p, &data, None);
        for t in 0..4 {
            for j in 0..p[t].len() {
                sum[t][j] -= p[t][j] * g[t][j];
                p[t][j] -= calibrate::MOVEMENT_LR * g[t][j];
            }
        }
    }
    // Scores are the sums' ranks over the whole model: non-negative, in the sums' order
    // across tensors. Pairs whose sums the f32 training and the f64 reference could order
    // differently (closer than 1e-5 of the largest) are not compared.
    let all: Vec<(f64, f32)> = (0..4)
        .flat_map(|t| {
            let st = s[m.find(NAMES[t]).unwrap()].as_ref().unwrap().clone();
            sum[t].clone().into_iter().zip(st)
        })
        .collect();
    assert!(
        all.iter().any(|(v, _)| *v < 0.0),
        "some weight moved towards zero"
    );
    let scale = all.iter().map(|(v, _)| v.abs()).fold(0.0, f64::max);
    let mut compared = 0;
    for (a, sa) in &all {
        assert!(*sa >= 1.0, "scores are ranks from 1");
        for (b, sb) in &all {
            if a - b > 1e-5 * scale {
                assert!(sa > sb, "sums {a} > {b} but scores {sa} <= {sb}");
                compared += 1;
            }
        }
    }
    assert!(compared > 100, "{compared}");
}

#[test]
fn movement_scores_keep_the_order_of_sums_a_large_one_would_round_away() {
    // Shifted by −0.5 and rounded to f32, 1e-9 and 3e-9 would both become 0.5.
    let m = Model::from_f32_tensors(
        "m",
        vec![
            ("a".into(), vec![2, 2], vec![1.0; 4]),
            ("b".into(), vec![1, 2], vec![1.0; 2]),
        ],
    );
    let raw = std::collections::HashMap::from([
        ("a".to_string(), vec![-0.5, 1e-9, 3e-9, 1e-9]),
        ("b".to_string(), vec![f64::NAN, 2.0]),
    ]);
    let s = calibrate::movement_scores(&m, &raw);
    let a = s[0].as_ref().unwrap();
    let b = s[1].as_ref().unwrap();
    assert_eq!(a, &[1.0, 2.0, 3.0, 2.0], "equal sums share a rank");
    assert!(b[0].is_nan(), "a NaN sum is pruned first");
    assert_eq!(b[1], 4.0);
}

#[test]
fn wanda_uses_each_layers_own_inputs_and_prunes_every_row_alike() {
    let (m, data) = toy();
    let s = scores(&m, &data, Criterion::Wanda);
    // The first layer's inputs are the data: ‖X_k‖ over the five samples, by hand.
    let ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    let norm = |k: usize| {
        (0..N)
            .map(|i| (x[i * D + k] as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let w1 = values(&m, 0);
    let s1 = s[m.find("l1.weight").unwrap()].as_ref().unwrap();
    for row in 0..H {
        let raw: Vec<f64> = (0..D)
            .map(|k| (w1[row * D + k] as f64).abs() * norm(k))
            .collect();
        // The stored key is the weight's rank in its row by that raw score.
        for k in 0..D {
            let rank = (0..D)
                .filter(|&o| raw[o] < raw[k] || (raw[o] == raw[k] && o < k))
                .count();
            assert_eq!(
                s1[row * D + k],
                (rank + 1) as f32 / D as f32,
                "row {row} col {k}"
            );
        }
    }
    // Half of every row goes at 50% (global scope, so the layers share one threshold).
    let settings = PruneSettings {
        criterion: Criterion::Wanda,
        sparsity: 0.5,
        calibration: N,
        ..Default::default()
    };
    let inputs = ScoreInputs {
        calibration: Some(&data),
        samples: N,
        ..Default::default()
    };
    let p = prune(&m, &settings, &inputs, &Progress::none()).unwrap();
    for (name, rows, cols) in [("l1.weight", H, D), ("l2.weight", C, H)] {
        let mask = p.masks.get(name).unwrap();
        let kept: Vec<usize> = (0..rows)
            .map(|r| (0..cols).filter(|&c| mask.kept(r * cols + c)).count())
            .collect();
        let (lo, hi) = (kept.iter().min().unwrap(), kept.iter().max().unwrap());
        assert!(hi - lo <= 1, "{name}: kept per row {kept:?}");
    }
}

#[test]
fn data_criteria_without_data_or_labels_say_what_is_missing() {
    let (m, mut data) = toy();
    let e = calibrate::tensor_scores(
        &m,
        Criterion::Wanda,
        &ScoreInputs::default(),
        &Progress::none(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs calibration data"), "{e}");
    data.labels = None;
    let inputs = ScoreInputs {
        calibration: Some(&data),
        ..Default::default()
    };
    let e =
        calibrate::tensor_scores(&m, Criterion::Taylor, &inputs, &Progress::none()).unwrap_err();
    assert!(e.to_string().contains("labelled"), "{e}");
    // Wanda needs only inputs.
    assert!(calibrate::tensor_scores(&m, Criterion::Wanda, &inputs, &Progress::none()).is_ok());
    // Weights only: nothing to run.
    let bare = Model::from_f32_tensors("bare", vec![("w".into(), vec![2, 2], vec![1.0; 4])]);
    let e =
        calibrate::tensor_scores(&bare, Criterion::Obd, &inputs, &Progress::none()).unwrap_err();
    assert!(e.to_string().contains("obd runs the model"), "{e}");
}

#[test]
fn apoz_and_mean_activation_rank_neurons_by_their_activations() {
    use prunescope::prune::{Pattern, structured};
    let (m, data) = toy();
    let ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    // The hidden layer's activations, written out: relu(W1 x + b1) per sample and neuron.
    let (w1, b1) = (values(&m, 0), values(&m, 1));
    let h: Vec<Vec<f64>> = (0..N)
        .map(|i| {
            (0..H)
                .map(|j| {
                    let z = b1[j] as f64
                        + (0..D)
                            .map(|k| w1[j * D + k] as f64 * x[i * D + k] as f64)
                            .sum::<f64>();
                    z.max(0.0)
                })
                .collect()
        })
        .collect();
    for c in [Criterion::Apoz, Criterion::MeanActivation] {
        let inputs = ScoreInputs {
            calibration: Some(&data),
            samples: N,
            ..Default::default()
        };
        let index =
            prunescope::prune::ScoreIndex::build(&m, c, 0, &inputs, &Progress::none()).unwrap();
        let order = structured::order_for(&m, &index).unwrap();
        // The hidden neurons' group is the only one; its order follows the activity.
        let activity: Vec<f64> = (0..H)
            .map(|j| {
                let col = h.iter().map(|r| r[j]);
                if c == Criterion::Apoz {
                    col.filter(|v| *v != 0.0).count() as f64 / N as f64
                } else {
                    col.sum::<f64>() / N as f64
                }
            })
            .collect();
        // Ties in activity may order either way; the activities along the order must rise.
        let got = &order.order[0];
        for w in got.windows(2) {
            assert!(
                activity[w[0]] <= activity[w[1]] + 1e-6,
                "{c:?}: {got:?} vs {activity:?}"
            );
        }
        // Unstructured use is refused with the reason.
        let e = prune(
            &m,
            &PruneSettings {
                criterion: c,
                sparsity: 0.5,
                ..Default::default()
            },
            &inputs,
            &Progress::none(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("neuron or channel"), "{e}");
        let p = prune(
            &m,
            &PruneSettings {
                criterion: c,
                pattern: Pattern::Neuron,
                sparsity: 0.5,
                round_width: 1,
                ..Default::default()
            },
            &inputs,
            &Progress::none(),
        )
        .unwrap();
        // The two least active neurons lose their rows in l1.
        let mask = p.masks.get("l1.weight").unwrap();
        for &j in &got[..2] {
            assert!((0..D).all(|k| !mask.kept(j * D + k)), "{c:?}: neuron {j}");
        }
    }
}

#[test]
fn sparsegpt_beats_magnitude_on_each_layers_output_error_measured_directly() {
    let model = Model::open(std::path::Path::new("sample_models/digits_mlp.safetensors")).unwrap();
    let evaluator = prunescope::eval::evaluator_with_data(&model, &Default::default()).unwrap();
    let data = evaluator.calibration();
    assert_eq!(
        data.name, "uci-digits/train",
        "calibration avoids the test split"
    );
    let n = 64;
    let settings = PruneSettings {
        criterion: Criterion::SparseGpt,
        sparsity: 0.7,
        calibration: n,
        ..Default::default()
    };
    let inputs = ScoreInputs {
        calibration: Some(data),
        samples: n,
        ..Default::default()
    };
    let p = prune(&model, &settings, &inputs, &Progress::none()).unwrap();
    let u = p.updated.as_ref().unwrap();
    assert_eq!(u.layers.len(), 3);
    // fc1 reads the pixels: its output error, Σ over samples of ‖(W − Ŵ) x‖², by hand.
    let ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    let t = model.find("fc1.weight").unwrap();
    let (w, w_hat) = (
        model.to_f32_vec(t),
        u.model.to_f32_vec(u.model.find("fc1.weight").unwrap()),
    );
    let (rows, cols) = (128, 64);
    let direct: f64 = (0..n)
        .map(|s| {
            (0..rows)
                .map(|r| {
                    (0..cols)
                        .map(|c| {
                            (w[r * cols + c] - w_hat[r * cols + c]) as f64 * x[s * cols + c] as f64
                        })
                        .sum::<f64>()
                        .powi(2)
                })
                .sum::<f64>()
        })
        .sum();
    let fc1 = &u.layers[0];
    assert_eq!(fc1.name, "fc1.weight");
    assert!(
        (fc1.error - direct).abs() <= 1e-6 * direct.max(1.0),
        "{} vs {direct}",
        fc1.error
    );
    for l in &u.layers {
        assert!(
            (l.sparsity - 0.7).abs() < 0.01,
            "{}: {}",
            l.name,
            l.sparsity
        );
        assert!(
            l.error < l.magnitude_error,
            "{}: {} ≥ {}",
            l.name,
            l.error,
            l.magnitude_error
        );
    }
    // The masks say what is zero in the updated weights, and the kept weights moved.
    let mask = p.masks.get("fc1.weight").unwrap();
    assert!((0..w.len()).all(|i| mask.kept(i) || w_hat[i] == 0.0));
    assert!((0..w.len()).any(|i| mask.kept(i) && w_hat[i] != w[i]));
}

#[test]
fn owl_plans_each_layer_from_the_outliers_of_its_own_wanda_scores() {
    let (m, data) = toy();
    let ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    // Both layers' Wanda scores by hand: |w| times the norm of the input it reads — the data
    // for l1, the hidden ReLU activations for l2.
    let (w1, b1, w2) = (values(&m, 0), values(&m, 1), values(&m, 2));
    let hidden: Vec<Vec<f64>> = (0..N)
        .map(|i| {
            (0..H)
                .map(|j| {
                    (b1[j] as f64
                        + (0..D)
                            .map(|k| w1[j * D + k] as f64 * x[i * D + k] as f64)
                            .sum::<f64>())
                    .max(0.0)
                })
                .collect()
        })
        .collect();
    let norm1 = |k: usize| {
        (0..N)
            .map(|i| (x[i * D + k] as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let norm2 = |j: usize| hidden.iter().map(|h| h[j] * h[j]).sum::<f64>().sqrt();
    let raw1: Vec<f32> = (0..H * D)
        .map(|i| (w1[i].abs() as f64 * norm1(i % D)) as f32)
        .collect();
    let raw2: Vec<f32> = (0..C * H)
        .map(|i| (w2[i].abs() as f64 * norm2(i % H)) as f32)
        .collect();
    let scores = prunescope::prune::calibrate::wanda_raw(&m, &data, N, &Progress::none()).unwrap();
    for (name, raw) in [("l1.weight", &raw1), ("l2.weight", &raw2)] {
        let got = scores[m.find(name).unwrap()].as_ref().unwrap();
        for (a, b) in got.iter().zip(raw.iter()) {
            assert!((a - b).abs() <= 1e-5 * b.max(1.0), "{name}: {a} vs {b}");
        }
    }
    let settings = PruneSettings {
        sparsity: 0.5,
        ..Default::default()
    };
    for mult in [0.8, 1.0, 1.5] {
        let planned =
            prunescope::prune::owl::plan(&m, &settings, &data, N, mult, 0.1, &Progress::none())
                .unwrap();
        assert_eq!(planned.scope, prunescope::prune::Scope::Layer);
        let lod = [
            prunescope::prune::owl::outlier_ratio(&raw1, mult),
            prunescope::prune::owl::outlier_ratio(&raw2, mult),
        ];
        let want = prunescope::prune::owl::sparsities(&lod, &[H * D, C * H], 0.5, 0.1);
        for (name, w) in ["l1.weight", "l2.weight"].iter().zip(want) {
            let got = planned.layer(name).sparsity;
            assert!(
                (got - w).abs() < 1e-9,
                "M {mult}, {name}: {got} vs {w} (LOD {lod:?})"
            );
        }
    }
}

#[test]
fn the_prune_cli_scores_movement_on_the_calibration_samples() {
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_prunescope");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "sample_models/digits_mlp.safetensors",
            "--sparsity",
            "0.7",
            "--criterion",
            "movement",
            "--json",
        ];
        args.extend(extra);
        Command::new(bin).args(&args).output().unwrap()
    };
    let o = run(&["--calibration", "64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{v}");
    // Unlabelled data has no loss to differentiate.
    let dir = std::env::temp_dir().join(format!("prunescope-mv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let x = dir.join("x.safetensors");
    prunescope::export::write_f32_safetensors(
        &x,
        &Default::default(),
        &[("x".into(), vec![4, 64], vec![0.5; 256])],
    )
    .unwrap();
    let o = run(&["--data", x.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("labelled"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn commands_that_apply_masks_refuse_sparsegpt_instead_of_undoing_its_updates() {
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_prunescope");
    let out_dir = std::env::temp_dir().join(format!("prunescope-sgpt-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("ft.safetensors");
    for args in [
        vec![
            "sensitivity",
            "sample_models/digits_mlp.safetensors",
            "--criterion",
            "sparsegpt",
            "--grid",
            "0.5",
            "--fresh",
        ],
        vec![
            "finetune",
            "sample_models/digits_mlp.safetensors",
            "--criterion",
            "sparsegpt",
            "--sparsity",
            "0.5",
            "--epochs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    ] {
        let o = Command::new(bin).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("sparsegpt changes the kept weights"),
            "{args:?}: {err}"
        );
    }
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn sparsegpt_leaves_a_locked_layer_exactly_as_it_was() {
    let model = Model::open(std::path::Path::new("sample_models/digits_mlp.safetensors")).unwrap();
    let evaluator = prunescope::eval::evaluator_with_data(&model, &Default::default()).unwrap();
    let mut settings = PruneSettings {
        criterion: Criterion::SparseGpt,
        sparsity: 0.5,
        calibration: 64,
        ..Default::default()
    };
    settings.layer_mut("fc1.weight").locked = true;
    let inputs = ScoreInputs {
        calibration: Some(evaluator.calibration()),
        samples: 64,
        ..Default::default()
    };
    let p = prune(&model, &settings, &inputs, &Progress::none()).unwrap();
    let u = p.updated.unwrap();
    let name = "fc1.weight";
    // The digits' border pixels are blank in every sample; fc1's columns on them stay too.
    assert_eq!(
        u.model.to_f32_vec(u.model.find(name).unwrap()),
        model.to_f32_vec(model.find(name).unwrap())
    );
    assert_eq!(p.masks.get(name).unwrap().count_kept(), 128 * 64);
}

#[test]
fn the_cached_calibration_fingerprint_gives_the_same_index_key_as_the_data() {
    use prunescope::eval::Evaluator;
    let model = Model::open(std::path::Path::new("sample_models/digits_mlp.safetensors")).unwrap();
    let e = prunescope::eval::evaluator_with_data(&model, &Default::default()).unwrap();
    let plain = ScoreInputs {
        calibration: Some(e.calibration()),
        samples: 64,
        ..Default::default()
    };
    let cached = ScoreInputs {
        fingerprint: e.calibration_fingerprint(),
        calibration: Some(e.calibration()),
        samples: 64,
        ..Default::default()
    };
    let key = |i: &ScoreInputs| calibrate::calibration_key(Criterion::Wanda, i);
    assert!(key(&plain).is_some());
    assert_eq!(key(&plain), key(&cached));
    assert_eq!(
        calibrate::calibration_key(Criterion::Magnitude, &cached),
        None
    );
}

/// A data file of the ONNX fixtures, read for a model with these inputs.
fn onnx_data(file: &str, inputs: &[&str]) -> EvalData {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(file);
    let inputs: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
    prunescope::data::load_eval_data(&path, &inputs, &Default::default()).unwrap()
}

/// The toy as a training split (the same five samples to train on and to test on).
fn toy_split(data: &EvalData) -> prunescope::data::Split {
    let ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    let d = prunescope::data::Dataset {
        name: "toy".into(),
        inputs: x.clone(),
        labels: data.labels.clone().unwrap(),
        dim: D,
        classes: C,
    };
    prunescope::data::Split {
        train: d.clone(),
        test: d,
    }
}

#[test]
fn schedules_track_movement_as_the_finite_difference_sum_on_both_trainers() {
    use prunescope::train::{FinetuneConfig, GraphNet, Net, Trainee};
    let (m, data) = toy();
    let split = toy_split(&data);
    // Three full-batch steps of plain SGD.
    let cfg = FinetuneConfig {
        epochs: 3,
        batch_size: N,
        momentum: 0.0,
        ..Default::default()
    };
    let mut p = params_f64(&m);
    let mut sum: [Vec<f64>; 4] = std::array::from_fn(|t| vec![0.0; p[t].len()]);
    for _ in 0..cfg.epochs {
        let g = fd_grad_at(&p, &data, None);
        for t in 0..4 {
            for j in 0..p[t].len() {
                sum[t][j] -= p[t][j] * g[t][j];
                p[t][j] -= cfg.lr * g[t][j];
            }
        }
    }
    let arch =
        prunescope::eval::MlpArch::from_json(&m.metadata[prunescope::eval::ARCH_METADATA_KEY])
            .unwrap();
    let masks = prunescope::prune::MaskSet::new();
    let train = |mut t: prunescope::train::AnyTrainee| {
        t.track_movement();
        t.train(
            &split,
            &cfg,
            &Progress::none(),
            &mut |_| {},
            &mut |_, _| None,
            None,
        )
        .unwrap()
        .trainee
    };
    // prunescope's own loops, and candle's autograd on the same MLP as a graph.
    let native = train(prunescope::train::AnyTrainee::Mlp(
        Net::from_model(&m, &arch, &masks).unwrap(),
    ));
    let graph = train(prunescope::train::AnyTrainee::Graph(
        GraphNet::from_model(&m, arch.to_graph(), &masks).unwrap(),
    ));
    let prunescope::train::AnyTrainee::Mlp(native) = native else {
        unreachable!()
    };
    let mv = native.movement.as_ref().unwrap();
    for (l, t) in [(0, 0), (1, 2)] {
        for j in 0..sum[t].len() {
            close(
                mv[l][j] as f32,
                sum[t][j],
                &format!("native {} #{j}", NAMES[t]),
            );
        }
    }
    // Each trainer then prunes the lowest movement, which a sort of the sums names.
    for trainee in [prunescope::train::AnyTrainee::Mlp(native), graph] {
        let mut t = trainee;
        t.prune_layerwise(0.5);
        for (name, keep) in t.masks() {
            let k = NAMES.iter().position(|n| *n == name).unwrap();
            let mut order: Vec<usize> = (0..sum[k].len()).collect();
            order.sort_by(|&a, &b| sum[k][a].total_cmp(&sum[k][b]));
            let cut = (0.5 * order.len() as f64).round() as usize;
            for (r, &i) in order.iter().enumerate() {
                assert_eq!(keep[i], r >= cut, "{name} #{i}");
            }
        }
    }
}

#[test]
fn wanda_collects_a_transformers_inputs_through_tract_and_matches_a_gather_by_hand() {
    // Embedding → Linear (through a Transpose) → GELU → LayerNorm → masked mean: it does not
    // import into prunescope's graph, so only tract runs it.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx");
    let m = Model::open(&dir.join("encoder_two_inputs.onnx")).unwrap();
    assert!(prunescope::train::Trainable::graph_of(&m).is_err());
    let data = onnx_data("encoder_data.npz", &["input_ids", "attention_mask"]);
    let n = 16;
    let raw = calibrate::wanda_raw(&m, &data, n, &Progress::none()).unwrap();
    let ranked = calibrate::tensor_scores(
        &m,
        Criterion::Wanda,
        &ScoreInputs {
            calibration: Some(&data),
            samples: n,
            ..Default::default()
        },
        &Progress::none(),
    )
    .unwrap();
    // By hand: the projection's input is the embedding row of every token of the first n
    // samples (padding tokens included: the Linear sees them too).
    let embed = m.to_f32_vec(m.find("embed.weight").unwrap());
    let ArrayValues::I64(ids) = &data.input("input_ids").unwrap().values else {
        unreachable!()
    };
    let d = 16;
    let mut sq = vec![0f64; d];
    for &id in &ids[..n * 12] {
        for j in 0..d {
            sq[j] += (embed[id as usize * d + j] as f64).powi(2);
        }
    }
    let t = m.find("proj.weight").unwrap();
    let w = m.to_f32_vec(t);
    let got = raw[t].as_ref().unwrap();
    for o in 0..d {
        for j in 0..d {
            close(
                got[o * d + j],
                (w[o * d + j] as f64).abs() * sq[j].sqrt(),
                &format!("proj.weight[{o}][{j}]"),
            );
        }
    }
    // The criterion compares within each output row: its order there is the raw scores'.
    let r = ranked[t].as_ref().unwrap();
    for o in 0..d {
        let order = |s: &[f32]| {
            let mut v: Vec<usize> = (0..d).collect();
            v.sort_by(|&a, &b| s[o * d + a].total_cmp(&s[o * d + b]));
            v
        };
        assert_eq!(order(r), order(got), "row {o}");
    }
    // The embedding multiplies nothing: its rows compare by magnitude.
    let e = m.find("embed.weight").unwrap();
    let re = raw[e].as_ref().unwrap();
    assert!(re.iter().zip(&embed).all(|(s, w)| *s == w.abs()));

    // The same projection stored [in, out] and read by MatMul directly: input features run
    // down the rows, and an output neuron is a column, within which Wanda compares.
    let p = Model::open(&dir.join("encoder_plain_matmul.onnx")).unwrap();
    let tp = p.find("proj.weight").unwrap();
    assert_eq!(p.tensors[tp].shape, vec![d, d]);
    let wp = p.to_f32_vec(tp);
    let inputs = ScoreInputs {
        calibration: Some(&data),
        samples: n,
        ..Default::default()
    };
    let raw_p = calibrate::wanda_raw(&p, &data, n, &Progress::none()).unwrap();
    let ranked_p =
        calibrate::tensor_scores(&p, Criterion::Wanda, &inputs, &Progress::none()).unwrap();
    let (gp, rp) = (raw_p[tp].as_ref().unwrap(), ranked_p[tp].as_ref().unwrap());
    for j in 0..d {
        for o in 0..d {
            close(
                gp[j * d + o],
                (wp[j * d + o] as f64).abs() * sq[j].sqrt(),
                &format!("[in, out] proj.weight[{j}][{o}]"),
            );
            // The same weight as in the [out, in] file, so the same score.
            assert_eq!(gp[j * d + o], got[o * d + j]);
        }
    }
    for o in 0..d {
        let order = |s: &[f32]| {
            let mut v: Vec<usize> = (0..d).collect();
            v.sort_by(|&a, &b| s[a * d + o].total_cmp(&s[b * d + o]));
            v
        };
        assert_eq!(order(rp), order(gp), "column {o}");
    }
    // Pruned half by half: each output neuron loses the same count in both layouts.
    let settings = PruneSettings {
        sparsity: 0.5,
        criterion: Criterion::Wanda,
        calibration: n,
        ..Default::default()
    };
    let masks = prune(&p, &settings, &inputs, &Progress::none())
        .unwrap()
        .masks;
    let mk = masks.get("proj.weight").unwrap();
    for o in 0..d {
        let kept = (0..d).filter(|&j| mk.kept(j * d + o)).count();
        assert_eq!(kept, d / 2, "column {o}");
    }
}

#[test]
fn sparsegpt_runs_on_a_graph_only_tract_runs_in_both_weight_layouts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx");
    let data = onnx_data("encoder_data.npz", &["input_ids", "attention_mask"]);
    let n = 16;
    let settings = PruneSettings {
        criterion: Criterion::SparseGpt,
        sparsity: 0.5,
        calibration: n,
        ..Default::default()
    };
    let inputs = ScoreInputs {
        calibration: Some(&data),
        samples: n,
        ..Default::default()
    };
    let run = |file: &str| {
        let m = Model::open(&dir.join(file)).unwrap();
        let p = prune(&m, &settings, &inputs, &Progress::none()).unwrap();
        let u = p.updated.unwrap();
        let t = u.model.find("proj.weight").unwrap();
        (m, u.model.to_f32_vec(t), u.layers)
    };
    let (m, w_hat, layers) = run("encoder_two_inputs.onnx");
    // The projection's inputs by hand: the embedding row of every token of the first n samples.
    let embed = m.to_f32_vec(m.find("embed.weight").unwrap());
    let ArrayValues::I64(ids) = &data.input("input_ids").unwrap().values else {
        unreachable!()
    };
    let d = 16;
    let w = m.to_f32_vec(m.find("proj.weight").unwrap());
    // Σ over tokens of ‖(W − Ŵ) x‖², W [out, in].
    let error = |w_hat: &[f32]| -> f64 {
        ids[..n * 12]
            .iter()
            .map(|&id| {
                let x = &embed[id as usize * d..(id as usize + 1) * d];
                (0..d)
                    .map(|o| {
                        (0..d)
                            .map(|j| (w[o * d + j] - w_hat[o * d + j]) as f64 * x[j] as f64)
                            .sum::<f64>()
                            .powi(2)
                    })
                    .sum::<f64>()
            })
            .sum()
    };
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(a.cmp(&b)));
    let mut magnitude = w.clone();
    for &i in &order[..w.len() / 2] {
        magnitude[i] = 0.0;
    }
    let l = layers.iter().find(|l| l.name == "proj.weight").unwrap();
    let (got, base) = (error(&w_hat), error(&magnitude));
    assert!(
        (l.error - got).abs() <= 1e-6 * got.max(1.0),
        "{} vs {got}",
        l.error
    );
    assert!(
        (l.magnitude_error - base).abs() <= 1e-6 * base.max(1.0),
        "{} vs {base}",
        l.magnitude_error
    );
    assert!(got < base, "SparseGPT {got} vs magnitude {base}");
    assert_eq!(w_hat.iter().filter(|v| **v == 0.0).count(), w.len() / 2);
    // Stored [in, out] and read by MatMul directly: the same layer, transposed.
    let (_, w_hat_t, _) = run("encoder_plain_matmul.onnx");
    for o in 0..d {
        for j in 0..d {
            assert_eq!(w_hat_t[j * d + o], w_hat[o * d + j], "[{o}][{j}]");
        }
    }
}

#[test]
fn wanda_observes_a_graph_input_that_a_projection_reads_directly_through_tract() {
    // The attention fixture's query, key and value projections read the graph input x itself
    // (tract names inputs but does not label them as it labels node outputs).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx");
    let m = Model::open(&dir.join("attention_heads.onnx")).unwrap();
    let data = onnx_data("attention_data.npz", &["x"]);
    let raw = calibrate::wanda_raw(&m, &data, 5, &Progress::none()).unwrap();
    let ArrayValues::F32(x) = &data.inputs[0].values else {
        unreachable!()
    };
    // ‖x_j‖ over the 5 samples × 3 tokens, by hand.
    let e = 8;
    let norm: Vec<f64> = (0..e)
        .map(|j| {
            x.chunks(e)
                .map(|row| (row[j] as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    for name in ["query.weight", "key.weight", "value.weight"] {
        let t = m.find(name).unwrap();
        let w = m.to_f32_vec(t);
        let got = raw[t].as_ref().unwrap();
        for o in 0..e {
            for j in 0..e {
                close(
                    got[o * e + j],
                    (w[o * e + j] as f64).abs() * norm[j],
                    &format!("{name}[{o}][{j}]"),
                );
            }
        }
    }
}
