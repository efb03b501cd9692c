//! Fine-tuning with masks held, checked against candle's autograd and optimisers (an
//! independent implementation of the same formulas), closed forms, and the CLI's round trip.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{D, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use prunescope::data::Dataset;
use prunescope::eval::{Activation, MlpArch, mlp_forward};
use prunescope::model::Model;
use prunescope::progress::{CancelFlag, Progress};
use prunescope::prune::{PruneSettings, ScoreInputs, prune};
use prunescope::train::{Distill, FinetuneConfig, LrSchedule, Net, Optim, finetune};

fn sample() -> (Model, MlpArch) {
    let model = prunescope::sample::open_sample().unwrap();
    let arch = MlpArch::from_json(&model.metadata["prunescope.arch"]).unwrap();
    (model, arch)
}

fn masks_at(model: &Model, s: f64) -> prunescope::prune::MaskSet {
    let settings = PruneSettings {
        sparsity: s,
        ..Default::default()
    };
    prune(model, &settings, &ScoreInputs::default(), &Progress::none())
        .unwrap()
        .masks
}

/// The first `n` training images.
fn small_batch(n: usize) -> Dataset {
    let split = prunescope::data::digits_split().unwrap();
    let t = split.train;
    Dataset {
        name: "first".into(),
        inputs: t.inputs[..n * t.dim].to_vec(),
        labels: t.labels[..n].to_vec(),
        dim: t.dim,
        classes: t.classes,
    }
}

/// Two full-batch steps with candle: autograd for the gradients, the optimiser by `opt_step`,
/// the mask multiplied in after each step. Returns the weights and biases in layer order.
fn candle_reference(
    net: &Net,
    teacher: Option<&Net>,
    d: &Dataset,
    cfg: &FinetuneConfig,
    steps: usize,
) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let vars: Vec<(Var, Var)> = net
        .layers
        .iter()
        .map(|l| {
            (
                Var::from_slice(&l.w, (l.out, l.inp), &dev).unwrap(),
                Var::from_slice(&l.b, l.out, &dev).unwrap(),
            )
        })
        .collect();
    let masks: Vec<Option<Tensor>> = net
        .layers
        .iter()
        .map(|l| {
            l.mask
                .as_ref()
                .map(|m| Tensor::from_slice(m, (l.out, l.inp), &dev).unwrap())
        })
        .collect();
    let x = Tensor::from_slice(&d.inputs, (d.len(), d.dim), &dev).unwrap();
    let y = Tensor::from_slice(&d.labels, d.len(), &dev).unwrap();
    let acts: Vec<Activation> = net
        .layers
        .iter()
        .map(|l| {
            if l.relu {
                Activation::Relu
            } else {
                Activation::None
            }
        })
        .collect();
    let teacher_logits = teacher.map(|t| {
        Tensor::from_vec(t.forward(&d.inputs, d.len()), (d.len(), t.classes()), &dev).unwrap()
    });
    let all: Vec<Var> = vars
        .iter()
        .flat_map(|(w, b)| [w.clone(), b.clone()])
        .collect();
    let mut adam = AdamW::new(
        all.clone(),
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )
    .unwrap();
    let mut momentum: Vec<Option<Tensor>> = vec![None; all.len()];
    for _ in 0..steps {
        let layers: Vec<_> = vars
            .iter()
            .zip(&acts)
            .map(|((w, b), a)| (w.as_tensor().clone(), Some(b.as_tensor().clone()), *a))
            .collect();
        let logits = mlp_forward(&x, &layers).unwrap();
        let mut loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        if let (Some(dst), Some(tl)) = (cfg.distill, &teacher_logits) {
            let t = dst.temperature;
            let ls = candle_nn::ops::log_softmax(&(&logits / t).unwrap(), D::Minus1).unwrap();
            let pt = candle_nn::ops::softmax(&(tl / t).unwrap(), D::Minus1).unwrap();
            let lt = pt.log().unwrap();
            let kl = (pt * (lt - ls).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .affine(1.0 / d.len() as f64, 0.0)
                .unwrap();
            loss = ((loss * (1.0 - dst.alpha)).unwrap() + (kl * (dst.alpha * t * t)).unwrap())
                .unwrap();
        }
        match cfg.optimizer {
            Optim::AdamW => adam.backward_step(&loss).unwrap(),
            Optim::Sgd => {
                let grads = loss.backward().unwrap();
                for (i, v) in all.iter().enumerate() {
                    let g = grads.get(v.as_tensor()).unwrap().clone();
                    let buf = match &momentum[i] {
                        None => g,
                        Some(m) => ((m * cfg.momentum).unwrap() + g).unwrap(),
                    };
                    v.set(&(v.as_tensor() - (&buf * cfg.lr).unwrap()).unwrap())
                        .unwrap();
                    momentum[i] = Some(buf);
                }
            }
        }
        for ((w, _), m) in vars.iter().zip(&masks) {
            if let Some(m) = m {
                w.set(&(w.as_tensor() * m).unwrap()).unwrap();
            }
        }
    }
    vars.iter()
        .flat_map(|(w, b)| {
            [
                w.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                b.as_tensor().to_vec1::<f32>().unwrap(),
            ]
        })
        .collect()
}

fn ours(net: Net, teacher: Option<&Net>, d: &Dataset, cfg: &FinetuneConfig) -> Vec<Vec<f32>> {
    let r = finetune(net, teacher, d, d, cfg, &Progress::none(), |_, _| {}).unwrap();
    r.net
        .layers
        .iter()
        .flat_map(|l| [l.w.clone(), l.b.clone()])
        .collect()
}

/// Equal to float noise: every entry within `tol`, and on average within 1e-6.
fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32, what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let diffs: Vec<f32> = x.iter().zip(y).map(|(p, q)| (p - q).abs()).collect();
        let worst = diffs.iter().cloned().fold(0.0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        assert!(worst < tol, "{what}: tensor {i} differs by {worst}");
        assert!(
            mean < 1e-6,
            "{what}: tensor {i} differs by {mean} on average"
        );
    }
}

#[test]
fn sgd_adamw_and_distillation_steps_match_candle_autograd() {
    let (model, arch) = sample();
    let masks = masks_at(&model, 0.6);
    let d = small_batch(64);
    let teacher = Net::from_model(&model, &arch, &Default::default()).unwrap();
    let cases = [
        (
            "sgd + momentum",
            FinetuneConfig {
                epochs: 3,
                batch_size: 64,
                lr: 0.05,
                ..Default::default()
            },
        ),
        (
            "adamw",
            FinetuneConfig {
                epochs: 3,
                batch_size: 64,
                lr: 1e-3,
                optimizer: Optim::AdamW,
                weight_decay: 0.01,
                ..Default::default()
            },
        ),
        (
            "sgd + distillation",
            FinetuneConfig {
                epochs: 3,
                batch_size: 64,
                lr: 0.05,
                distill: Some(Distill {
                    temperature: 4.0,
                    alpha: 0.7,
                }),
                ..Default::default()
            },
        ),
    ];
    for (what, cfg) in cases {
        let net = Net::from_model(&model, &arch, &masks).unwrap();
        let t = cfg.distill.map(|_| &teacher);
        let want = candle_reference(&net, t, &d, &cfg, cfg.epochs);
        let got = ours(net, t, &d, &cfg);
        // Adam divides by √v: where a gradient is nearly zero, summation order alone moves
        // m/√v, so an entry may differ by a fraction of one step (lr); formula errors would
        // move every entry by whole steps.
        let tol = match cfg.optimizer {
            Optim::AdamW => (cfg.lr / 10.0) as f32,
            Optim::Sgd => 2e-5,
        };
        assert_close(&got, &want, tol, what);
    }
}

#[test]
fn pruned_weights_are_exactly_zero_after_every_step() {
    let (model, arch) = sample();
    let masks = masks_at(&model, 0.8);
    let d = small_batch(200);
    let net = Net::from_model(&model, &arch, &masks).unwrap();
    let pruned: usize = net
        .layers
        .iter()
        .map(|l| {
            l.mask
                .as_ref()
                .unwrap()
                .iter()
                .filter(|m| **m == 0.0)
                .count()
        })
        .sum();
    assert!(pruned > 10_000);
    for optimizer in [Optim::Sgd, Optim::AdamW] {
        // One step per epoch, so the callback sees the weights after every step.
        let cfg = FinetuneConfig {
            epochs: 15,
            batch_size: 200,
            lr: 0.05,
            optimizer,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut checked = 0;
        let r = finetune(
            net.clone(),
            None,
            &d,
            &d,
            &cfg,
            &Progress::none(),
            |_, n| {
                assert_eq!(n.masked_nonzeros(), 0);
                checked += 1;
            },
        )
        .unwrap();
        assert_eq!(checked, 15);
        // The kept weights did move.
        assert_ne!(r.net.layers[0].w, net.layers[0].w);
    }
}

#[test]
fn learning_rate_schedules_follow_their_closed_forms() {
    let base = 0.1;
    assert_eq!(LrSchedule::Constant.lr(base, 17, 100, 10), base);
    let step = LrSchedule::Step {
        every: 2,
        gamma: 0.5,
    };
    // Steps 0–19 are epochs 0–1 (×1), 20–39 epochs 2–3 (×0.5), 40… (×0.25).
    assert_eq!(step.lr(base, 19, 100, 10), 0.1);
    assert_eq!(step.lr(base, 20, 100, 10), 0.05);
    assert_eq!(step.lr(base, 45, 100, 10), 0.025);
    let cos = LrSchedule::Cosine { warmup: 10 };
    assert!((cos.lr(base, 0, 110, 10) - 0.01).abs() < 1e-12);
    assert!((cos.lr(base, 9, 110, 10) - 0.1).abs() < 1e-12);
    assert!((cos.lr(base, 10, 110, 10) - 0.1).abs() < 1e-12);
    // Halfway through the cosine: half the base rate.
    assert!((cos.lr(base, 60, 110, 10) - 0.05).abs() < 1e-12);
    assert!(cos.lr(base, 109, 110, 10) < 1e-4);
}

#[test]
fn cancel_mid_run_keeps_the_best_weights_and_a_consistent_model() {
    let (model, arch) = sample();
    let masks = masks_at(&model, 0.9);
    let split = prunescope::data::digits_split().unwrap();
    let net = Net::from_model(&model, &arch, &masks).unwrap();
    let cancel = CancelFlag::new();
    let flag = cancel.clone();
    let progress = Progress::new(cancel, |_, _| {});
    let cfg = FinetuneConfig {
        epochs: 50,
        ..Default::default()
    };
    let mut best = 0.0f64;
    let r = finetune(
        net,
        None,
        &split.train,
        &split.test,
        &cfg,
        &progress,
        |e, _| {
            best = best.max(e.test_accuracy);
            if e.epoch == 3 {
                flag.cancel();
            }
        },
    )
    .unwrap();
    assert!(r.cancelled);
    assert_eq!(r.epochs.len(), 3);
    assert_eq!(r.net.masked_nonzeros(), 0);
    assert_eq!(r.after.accuracy.unwrap(), best);
    assert!(r.after.accuracy.unwrap() > r.before.accuracy.unwrap());
}

#[test]
fn the_cli_fine_tunes_and_the_export_reloads_with_the_same_figures() {
    common::isolate();
    let dir = common::tempdir("finetune");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample_models/digits_mlp.safetensors");
    let out = dir.join("ft.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args([
            "finetune",
            sample.to_str().unwrap(),
            "--sparsity",
            "0.9",
            "--epochs",
            "4",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let before = v["before"]["accuracy"].as_f64().unwrap();
    let after = v["after"]["accuracy"].as_f64().unwrap();
    assert!(after > before + 0.2, "{before} → {after}");
    assert_eq!(v["epochs"], 4);
    assert_eq!(v["per_epoch"].as_array().unwrap().len(), 4);
    assert!(v["samples_per_s"].as_f64().unwrap() > 0.0);
    // The written model evaluates to the figures the fine-tune reported, and 90 % of its
    // prunable weights are exactly zero.
    let o = Command::new(env!("CARGO_BIN_EXE_prunescope"))
        .args(["eval", out.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["accuracy"].as_f64().unwrap(), after);
    assert!((e["loss"].as_f64().unwrap() - v["after"]["loss"].as_f64().unwrap()).abs() < 1e-6);
    let m = Model::open(&out).unwrap();
    let (zeros, total) = ["fc1.weight", "fc2.weight", "fc3.weight"]
        .iter()
        .map(|t| m.to_f32_vec(m.find(t).unwrap()))
        .fold((0, 0), |(z, n), v| {
            (z + v.iter().filter(|x| **x == 0.0).count(), n + v.len())
        });
    assert_eq!(zeros, (0.9 * total as f64).round() as usize);
}

#[test]
fn the_candle_device_path_trains_like_the_native_one() {
    let (model, arch) = sample();
    let masks = masks_at(&model, 0.7);
    let d = small_batch(128);
    let teacher = Net::from_model(&model, &arch, &Default::default()).unwrap();
    for cfg in [
        FinetuneConfig {
            epochs: 3,
            batch_size: 128,
            ..Default::default()
        },
        FinetuneConfig {
            epochs: 3,
            batch_size: 128,
            lr: 1e-3,
            optimizer: Optim::AdamW,
            weight_decay: 0.01,
            distill: Some(Distill {
                temperature: 2.0,
                alpha: 0.5,
            }),
            ..Default::default()
        },
    ] {
        let net = Net::from_model(&model, &arch, &masks).unwrap();
        let t = cfg.distill.map(|_| &teacher);
        let native = ours(net.clone(), t, &d, &cfg);
        let r = prunescope::train::finetune_on(
            &Device::Cpu,
            net,
            t,
            &d,
            &d,
            &cfg,
            &Progress::none(),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(r.net.masked_nonzeros(), 0);
        let candle: Vec<Vec<f32>> = r
            .net
            .layers
            .iter()
            .flat_map(|l| [l.w.clone(), l.b.clone()])
            .collect();
        let tol = match cfg.optimizer {
            Optim::AdamW => (cfg.lr / 10.0) as f32,
            Optim::Sgd => 2e-5,
        };
        assert_close(&candle, &native, tol, &format!("{:?}", cfg.optimizer));
    }
    // Without the cuda feature (CI), asking for a GPU is a clear error, not a crash.
    if !candle_core::utils::cuda_is_available() {
        let e = prunescope::train::TrainDevice::Cuda(0)
            .candle()
            .unwrap_err();
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}

#[test]
fn graphs_fine_tune_on_candle_with_masks_held_and_batchnorm_updated() {
    let model = prunescope::sample::open_named("rescnn").unwrap();
    let graph = prunescope::graph::Graph::from_json(&model.metadata["prunescope.arch"]).unwrap();
    let masks = masks_at(&model, 0.7);
    let split = prunescope::data::digits_split().unwrap();
    let cfg = FinetuneConfig {
        epochs: 2,
        ..Default::default()
    };
    let mut seen = 0;
    let r = prunescope::train::finetune_graph(
        &model,
        &graph,
        &masks,
        &split,
        &cfg,
        &Device::Cpu,
        &Progress::none(),
        |_| seen += 1,
    )
    .unwrap();
    assert_eq!(seen, 2);
    assert!(
        r.after.accuracy.unwrap() > r.before.accuracy.unwrap() + 0.3,
        "{:?} → {:?}",
        r.before.accuracy,
        r.after.accuracy
    );
    let get = |name: &str| &r.tensors.iter().find(|(n, _, _)| n == name).unwrap().2;
    for (name, m) in masks.iter() {
        let v = get(name);
        for (i, x) in v.iter().enumerate() {
            if !m.kept(i) {
                assert_eq!(*x, 0.0, "{name}[{i}] is pruned but {x}");
            }
        }
    }
    // BatchNorm trained in training mode: its running statistics moved.
    let rm = model.find("bn1.running_mean").unwrap();
    assert_ne!(get("bn1.running_mean"), &model.to_f32_vec(rm));
    // The written model evaluates to the reported accuracy.
    let dir = common::tempdir("graph-ft");
    let out = dir.join("ft.safetensors");
    prunescope::train::write_trained(&model, r.tensors.clone(), &cfg, &out).unwrap();
    let back = Model::open(&out).unwrap();
    let ev = prunescope::eval::evaluator_for(&back).unwrap().unwrap();
    let m = prunescope::eval::Evaluator::evaluate(&ev, &back, &Default::default()).unwrap();
    assert_eq!(m.accuracy, r.after.accuracy);
}

#[test]
fn distillation_without_a_teacher_is_off_and_an_early_cancel_keeps_the_start() {
    let (model, arch) = sample();
    let masks = masks_at(&model, 0.8);
    let d = small_batch(200);
    let plain = FinetuneConfig {
        epochs: 2,
        ..Default::default()
    };
    let with = FinetuneConfig {
        distill: Some(Distill {
            temperature: 4.0,
            alpha: 0.5,
        }),
        ..plain.clone()
    };
    let net = Net::from_model(&model, &arch, &masks).unwrap();
    assert_eq!(
        ours(net.clone(), None, &d, &with),
        ours(net.clone(), None, &d, &plain)
    );
    let cancel = CancelFlag::new();
    cancel.cancel();
    let r = finetune(
        net.clone(),
        None,
        &d,
        &d,
        &plain,
        &Progress::new(cancel, |_, _| {}),
        |_, _| {},
    )
    .unwrap();
    assert!(r.cancelled);
    assert!(r.epochs.is_empty());
    assert_eq!(
        r.net.layers[0].w, net.layers[0].w,
        "nothing trained, nothing changed"
    );
    assert_eq!(r.after.accuracy, r.before.accuracy);
}

#[test]
fn an_onnx_model_fine_tunes_into_the_same_onnx_graph_with_new_values() {
    common::isolate();
    let dir = common::tempdir("onnx-ft");
    let input =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/digits_mlp_opset17.onnx");
    let out = dir.join("ft.onnx");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_prunescope"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&[
        "finetune",
        input.to_str().unwrap(),
        "--sparsity",
        "0.8",
        "--epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let after = v["after"]["accuracy"].as_f64().unwrap();
    assert!(after > v["before"]["accuracy"].as_f64().unwrap());
    // tract runs the written file and agrees with what training measured.
    let o = run(&["eval", out.to_str().unwrap(), "--engine", "tract", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["accuracy"].as_f64().unwrap(), after);
    // Same length, same bytes outside the weights: the graph is the input's.
    let (a, b) = (std::fs::read(&input).unwrap(), std::fs::read(&out).unwrap());
    assert_eq!(a.len(), b.len());
    let m_in = Model::open(&input).unwrap();
    let m_out = Model::open(&out).unwrap();
    let (mut zeros, mut total) = (0usize, 0usize);
    for (t, e) in m_in.tensors.iter().enumerate() {
        assert_eq!(m_out.tensors[t].name, e.name);
        if e.shape.len() >= 2 {
            let v = m_out.to_f32_vec(t);
            zeros += v.iter().filter(|x| **x == 0.0).count();
            total += v.len();
        }
    }
    // The 80 % global cut is held through training.
    assert!(
        zeros >= (0.8 * total as f64).round() as usize,
        "{zeros} of {total}"
    );
    let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    let weight_bytes: usize = m_in.tensors.iter().map(|t| t.numel * 4).sum();
    assert!(differing <= weight_bytes, "only initializer bytes change");
    // An ONNX model does not fine-tune into safetensors silently.
    let o = run(&[
        "finetune",
        input.to_str().unwrap(),
        "--sparsity",
        "0.5",
        "--out",
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(".onnx"));
}

#[test]
fn graph_distillation_runs_and_needs_no_mlp() {
    let model = prunescope::sample::open_named("cnn").unwrap();
    let graph = prunescope::graph::Graph::from_json(&model.metadata["prunescope.arch"]).unwrap();
    let masks = masks_at(&model, 0.8);
    let split = prunescope::data::digits_split().unwrap();
    let cfg = FinetuneConfig {
        epochs: 1,
        distill: Some(Distill {
            temperature: 4.0,
            alpha: 0.7,
        }),
        ..Default::default()
    };
    let r = prunescope::train::finetune_graph(
        &model,
        &graph,
        &masks,
        &split,
        &cfg,
        &Device::Cpu,
        &Progress::none(),
        |e| assert!(e.train_loss.is_finite()),
    )
    .unwrap();
    assert!(r.after.accuracy.unwrap() > r.before.accuracy.unwrap());
}
