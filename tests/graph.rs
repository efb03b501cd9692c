//! prunescope's trainable graph against plain loops written out by hand (convolution, pooling,
//! normalisation), against finite differences (the backward pass), and its refusals.

mod common;

use candle_core::{Device, Tensor, Var};
use prunescope::graph::{Graph, Mode, Params, load_params};
use prunescope::model::Model;
use prunescope::util::SplitMix64;

fn randn(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn graph(json: &str) -> Graph {
    Graph::from_json(json).unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Direct convolution: out[b][o][i][j] = bias[o] + Σ x[b][g·cin+c][i·s−p+di·d][j·s−p+dj·d]·w[o][c][di][dj].
#[allow(clippy::too_many_arguments)]
fn conv_ref(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    b: &[f32],
    stride: usize,
    pad: [usize; 2],
    dil: usize,
    groups: usize,
) -> (Vec<f32>, [usize; 4]) {
    let [n, c, h, wd] = xs;
    let [o, cg, kh, kw] = ws;
    let oh = (h + 2 * pad[0] - dil * (kh - 1) - 1) / stride + 1;
    let ow = (wd + 2 * pad[1] - dil * (kw - 1) - 1) / stride + 1;
    let og = o / groups;
    let mut out = vec![0f32; n * o * oh * ow];
    for bi in 0..n {
        for oc in 0..o {
            let g = oc / og;
            for i in 0..oh {
                for j in 0..ow {
                    let mut s = b[oc];
                    for ci in 0..cg {
                        let cin = g * cg + ci;
                        for di in 0..kh {
                            for dj in 0..kw {
                                let y = (i * stride + di * dil) as isize - pad[0] as isize;
                                let xx = (j * stride + dj * dil) as isize - pad[1] as isize;
                                if y < 0 || xx < 0 || y >= h as isize || xx >= wd as isize {
                                    continue;
                                }
                                s += x[((bi * c + cin) * h + y as usize) * wd + xx as usize]
                                    * w[((oc * cg + ci) * kh + di) * kw + dj];
                            }
                        }
                    }
                    out[((bi * o + oc) * oh + i) * ow + j] = s;
                }
            }
        }
    }
    (out, [n, o, oh, ow])
}

fn conv_graph(stride: usize, pad: [usize; 2], dil: usize, groups: usize, c: usize) -> Graph {
    graph(&format!(
        r#"{{"kind": "graph", "inputs": [{{"name": "x", "shape": [{c}, 7, 6]}}],
            "nodes": [{{"name": "conv", "op": "conv2d", "weight": "w", "bias": "b",
                        "stride": [{stride}, {stride}], "padding": [{}, {}],
                        "dilation": [{dil}, {dil}], "groups": {groups},
                        "inputs": ["x"], "output": "y"}}],
            "output": "y"}}"#,
        pad[0], pad[1]
    ))
}

#[test]
fn conv2d_matches_the_direct_sum() {
    let mut rng = SplitMix64::new(1);
    // 16 output channels take the native engine's direct kernel, 6 its im2col + GEMM path.
    for (stride, pad, dil, groups, o) in [
        (1, [1, 1], 1, 1, 6),
        (2, [1, 2], 1, 1, 6),
        (1, [0, 0], 2, 1, 6),
        (2, [2, 1], 1, 2, 6),
        (1, [1, 1], 1, 1, 16),
        (2, [1, 2], 2, 1, 16),
        (1, [0, 1], 1, 1, 8),
    ] {
        let c = 4;
        let ws = [o, c / groups, 3, 2];
        let w = randn(&mut rng, ws.iter().product());
        let b = randn(&mut rng, o);
        let xs = [3, c, 7, 6];
        let x = randn(&mut rng, xs.iter().product());
        let g = conv_graph(stride, pad, dil, groups, c);
        let model = Model::from_f32_tensors(
            "conv",
            vec![
                ("w".into(), ws.to_vec(), w.clone()),
                ("b".into(), vec![o], b.clone()),
            ],
        );
        let out_shape = g.check(&model).unwrap();
        let params = load_params(&g, &model, None, &Device::Cpu).unwrap();
        let (y, _) = g.forward(&[t(&x, &xs)], &params, Mode::Eval).unwrap();
        let (want, ws_out) = conv_ref(&x, xs, &w, ws, &b, stride, pad, dil, groups);
        assert_eq!(y.dims(), &ws_out, "case {stride} {pad:?} {dil} {groups}");
        assert_eq!(out_shape, ws_out[1..]);
        close(&flat(&y), &want, 1e-4, "conv");
        // prunescope's own kernels (channels-last im2col + GEMM) against the same sum.
        let fast = fast_params(&g, &model);
        let (shape, yf) =
            prunescope::graph::fast::forward(&g, &[(xs.to_vec(), &x)], &fast).unwrap();
        assert_eq!(shape, ws_out);
        close(&yf, &want, 1e-4, "native conv");
    }
}

#[test]
fn pools_batchnorm_layernorm_softmax_and_activations_match_their_formulas() {
    let mut rng = SplitMix64::new(2);
    let (n, c, h, w) = (2, 3, 4, 4);
    let x = randn(&mut rng, n * c * h * w);
    let gamma = randn(&mut rng, c);
    let beta = randn(&mut rng, c);
    let mean = randn(&mut rng, c);
    let var: Vec<f32> = (0..c).map(|i| 0.5 + i as f32).collect();
    let model = Model::from_f32_tensors(
        "m",
        vec![
            ("g".into(), vec![c], gamma.clone()),
            ("b".into(), vec![c], beta.clone()),
            ("m".into(), vec![c], mean.clone()),
            ("v".into(), vec![c], var.clone()),
            ("lg".into(), vec![w], vec![1.5; w]),
            ("lb".into(), vec![w], vec![0.25; w]),
        ],
    );
    let g = graph(
        r#"{"kind": "graph", "inputs": [{"name": "x", "shape": [3, 4, 4]}],
            "nodes": [
              {"name": "bn", "op": "batch_norm", "weight": "g", "bias": "b",
               "running_mean": "m", "running_var": "v", "eps": 0.001,
               "inputs": ["x"], "output": "bn"},
              {"name": "max", "op": "max_pool", "kernel": [2, 2], "stride": [2, 2],
               "inputs": ["x"], "output": "mx"},
              {"name": "avg", "op": "avg_pool", "kernel": [2, 2], "stride": [1, 2],
               "inputs": ["x"], "output": "av"},
              {"name": "gap", "op": "global_avg_pool", "inputs": ["x"], "output": "gap"},
              {"name": "ln", "op": "layer_norm", "weight": "lg", "bias": "lb", "eps": 1e-5,
               "inputs": ["x"], "output": "ln"},
              {"name": "sm", "op": "softmax", "inputs": ["x"], "output": "sm"},
              {"name": "gelu", "op": "gelu", "inputs": ["x"], "output": "ge"},
              {"name": "sig", "op": "sigmoid", "inputs": ["x"], "output": "si"}
            ],
            "output": "si"}"#,
    );
    g.check(&model).unwrap();
    let params = load_params(&g, &model, None, &Device::Cpu).unwrap();
    let at = |b: usize, ch: usize, i: usize, j: usize| x[((b * c + ch) * h + i) * w + j];
    // Forward the graph to each node's output by making it the output.
    let run = |out: &str| {
        let mut g2 = g.clone();
        g2.output = out.into();
        let (y, _) = g2
            .forward(&[t(&x, &[n, c, h, w])], &params, Mode::Eval)
            .unwrap();
        flat(&y)
    };
    let mut want = Vec::new();
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    want.push(
                        (at(b, ch, i, j) - mean[ch]) / (var[ch] + 0.001).sqrt() * gamma[ch]
                            + beta[ch],
                    );
                }
            }
        }
    }
    close(&run("bn"), &want, 1e-5, "batch norm");
    let fast = fast_params(&g, &model);
    let run_fast = |out: &str| {
        let mut g2 = g.clone();
        g2.output = out.into();
        prunescope::graph::fast::forward(&g2, &[(vec![n, c, h, w], &x)], &fast)
            .unwrap()
            .1
    };
    close(&run_fast("bn"), &want, 1e-5, "native batch norm");
    let mut mx = Vec::new();
    let mut av = Vec::new();
    let mut gap = Vec::new();
    for b in 0..n {
        for ch in 0..c {
            for i in 0..2 {
                for j in 0..2 {
                    let v = [
                        at(b, ch, 2 * i, 2 * j),
                        at(b, ch, 2 * i + 1, 2 * j),
                        at(b, ch, 2 * i, 2 * j + 1),
                        at(b, ch, 2 * i + 1, 2 * j + 1),
                    ];
                    mx.push(v.iter().cloned().fold(f32::MIN, f32::max));
                }
            }
            for i in 0..3 {
                for j in 0..2 {
                    let s = at(b, ch, i, 2 * j)
                        + at(b, ch, i + 1, 2 * j)
                        + at(b, ch, i, 2 * j + 1)
                        + at(b, ch, i + 1, 2 * j + 1);
                    av.push(s / 4.0);
                }
            }
            let mut s = 0.0;
            for i in 0..h {
                for j in 0..w {
                    s += at(b, ch, i, j);
                }
            }
            gap.push(s / (h * w) as f32);
        }
    }
    for (name, want) in [("mx", &mx), ("av", &av), ("gap", &gap)] {
        close(&run(name), want, 1e-5, name);
        close(&run_fast(name), want, 1e-5, name);
    }
    let rows: Vec<&[f32]> = x.chunks(w).collect();
    let mut ln = Vec::new();
    let mut sm = Vec::new();
    for r in &rows {
        let m = r.iter().sum::<f32>() / w as f32;
        let v = r.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / w as f32;
        ln.extend(r.iter().map(|a| (a - m) / (v + 1e-5).sqrt() * 1.5 + 0.25));
        let mx = r.iter().cloned().fold(f32::MIN, f32::max);
        let z: f32 = r.iter().map(|a| (a - mx).exp()).sum();
        sm.extend(r.iter().map(|a| (a - mx).exp() / z));
    }
    close(&run("ln"), &ln, 1e-4, "layer norm");
    close(&run("sm"), &sm, 1e-5, "softmax");
    close(&run_fast("ln"), &ln, 1e-4, "native layer norm");
    close(&run_fast("sm"), &sm, 1e-5, "native softmax");
    let gelu: Vec<f32> = x
        .iter()
        .map(|&a| 0.5 * a * (1.0 + erf(a as f64 / 2f64.sqrt()) as f32))
        .collect();
    close(&run("ge"), &gelu, 1e-5, "gelu");
    close(&run_fast("ge"), &gelu, 1e-5, "native gelu");
    let sig: Vec<f32> = x.iter().map(|&a| 1.0 / (1.0 + (-a).exp())).collect();
    close(&run("si"), &sig, 1e-6, "sigmoid");
    close(&run_fast("si"), &sig, 1e-6, "native sigmoid");
}

fn fast_params(g: &Graph, model: &Model) -> prunescope::graph::fast::FastParams {
    g.param_names()
        .into_iter()
        .map(|n| {
            let t = model.find(&n).unwrap();
            (n, (model.tensors[t].shape.clone(), model.to_f32_vec(t)))
        })
        .collect()
}

/// erf by its Maclaurin series (|x| small here), to 1e-12.
fn erf(x: f64) -> f64 {
    if x.abs() > 3.0 {
        return x.signum() * (1.0 - 1e-5);
    }
    let mut sum = 0.0;
    let mut term = x;
    let mut k = 0.0;
    while term.abs() > 1e-16 || k < 5.0 {
        sum += term / (2.0 * k + 1.0);
        k += 1.0;
        term *= -x * x / k;
        if k > 200.0 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn batchnorm_training_uses_batch_statistics_and_updates_the_running_ones() {
    let mut rng = SplitMix64::new(3);
    let (n, c, h, w) = (4, 2, 3, 3);
    let x = randn(&mut rng, n * c * h * w);
    let model = Model::from_f32_tensors(
        "m",
        vec![
            ("g".into(), vec![c], vec![2.0, 0.5]),
            ("b".into(), vec![c], vec![0.1, -0.1]),
            ("m".into(), vec![c], vec![0.3, -0.2]),
            ("v".into(), vec![c], vec![1.5, 0.7]),
        ],
    );
    let g = graph(
        r#"{"kind": "graph", "inputs": [{"name": "x", "shape": [2, 3, 3]}],
            "nodes": [{"name": "bn", "op": "batch_norm", "weight": "g", "bias": "b",
                       "running_mean": "m", "running_var": "v", "momentum": 0.1,
                       "inputs": ["x"], "output": "y"}],
            "output": "y"}"#,
    );
    let params = load_params(&g, &model, None, &Device::Cpu).unwrap();
    let (y, updates) = g
        .forward(&[t(&x, &[n, c, h, w])], &params, Mode::Train { seed: 0 })
        .unwrap();
    let y = flat(&y);
    let per = h * w;
    for ch in 0..c {
        let vals: Vec<f64> = (0..n)
            .flat_map(|b| (0..per).map(move |k| (b, k)))
            .map(|(b, k)| x[(b * c + ch) * per + k] as f64)
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let v = vals.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / vals.len() as f64;
        let (gm, bt) = ([2.0, 0.5][ch], [0.1, -0.1][ch]);
        for b in 0..n {
            for k in 0..per {
                let i = (b * c + ch) * per + k;
                let want = (x[i] as f64 - m) / (v + 1e-5).sqrt() * gm + bt;
                assert!((y[i] as f64 - want).abs() < 1e-4, "{} vs {want}", y[i]);
            }
        }
        let unbiased = v * vals.len() as f64 / (vals.len() - 1) as f64;
        let rm = flat(&updates.iter().find(|(n, _)| n == "m").unwrap().1);
        let rv = flat(&updates.iter().find(|(n, _)| n == "v").unwrap().1);
        let want_m = 0.9 * [0.3, -0.2][ch] + 0.1 * m;
        let want_v = 0.9 * [1.5, 0.7][ch] + 0.1 * unbiased;
        assert!((rm[ch] as f64 - want_m).abs() < 1e-5);
        assert!((rv[ch] as f64 - want_v).abs() < 1e-5);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = SplitMix64::new(4);
    let names = ["cw", "cb", "g", "b", "m", "v", "fw", "fb"];
    let shapes: [Vec<usize>; 8] = [
        vec![3, 2, 3, 3],
        vec![3],
        vec![3],
        vec![3],
        vec![3],
        vec![3],
        vec![4, 3],
        vec![4],
    ];
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .zip(&shapes)
        .map(|(n, s)| {
            (
                n.to_string(),
                s.clone(),
                randn(&mut rng, s.iter().product()),
            )
        })
        .collect();
    tensors[5].2 = vec![1.0, 1.5, 0.8];
    let g = graph(
        r#"{"kind": "graph", "inputs": [{"name": "x", "shape": [2, 5, 5]}],
            "nodes": [
              {"name": "conv", "op": "conv2d", "weight": "cw", "bias": "cb", "stride": [2, 2],
               "padding": [1, 1], "inputs": ["x"], "output": "c"},
              {"name": "bn", "op": "batch_norm", "weight": "g", "bias": "b",
               "running_mean": "m", "running_var": "v", "inputs": ["c"], "output": "n"},
              {"name": "act", "op": "tanh", "inputs": ["n"], "output": "a"},
              {"name": "gap", "op": "global_avg_pool", "inputs": ["a"], "output": "p"},
              {"name": "fc", "op": "linear", "weight": "fw", "bias": "fb",
               "inputs": ["p"], "output": "y"}],
            "output": "y"}"#,
    );
    let x = t(&randn(&mut rng, 3 * 2 * 5 * 5), &[3, 2, 5, 5]);
    let probe = t(&randn(&mut rng, 3 * 4), &[3, 4]);
    // loss = Σ y ⊙ probe, in f64 on the host for the finite differences.
    let loss_of = |tensors: &[(String, Vec<usize>, Vec<f32>)]| -> f64 {
        let params: Params = tensors
            .iter()
            .map(|(n, s, v)| (n.clone(), t(v, s)))
            .collect();
        let (y, _) = g
            .forward(std::slice::from_ref(&x), &params, Mode::Train { seed: 0 })
            .unwrap();
        flat(&y)
            .iter()
            .zip(flat(&probe))
            .map(|(a, b)| *a as f64 * b as f64)
            .sum()
    };
    let vars: Vec<Var> = tensors
        .iter()
        .map(|(_, s, v)| Var::from_tensor(&t(v, s)).unwrap())
        .collect();
    let params: Params = tensors
        .iter()
        .zip(&vars)
        .map(|((n, _, _), v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let (y, _) = g
        .forward(std::slice::from_ref(&x), &params, Mode::Train { seed: 0 })
        .unwrap();
    let grads = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for k in [0usize, 1, 2, 3, 6, 7] {
        let grad = flat(grads.get(vars[k].as_tensor()).unwrap());
        for i in [0, tensors[k].2.len() / 2, tensors[k].2.len() - 1] {
            let h = 1e-2f32;
            let mut plus = tensors.clone();
            plus[k].2[i] += h;
            let mut minus = tensors.clone();
            minus[k].2[i] -= h;
            let fd = (loss_of(&plus) - loss_of(&minus)) / (2.0 * h as f64);
            assert!(
                (grad[i] as f64 - fd).abs() < 2e-3 * (1.0 + fd.abs()),
                "d loss / d {}[{i}]: backward {} vs finite differences {fd}",
                names[k],
                grad[i]
            );
        }
    }
    // Running statistics are not trained.
    assert!(!g.trainable_names().contains(&"m".to_string()));
}

#[test]
fn descriptions_that_do_not_fit_the_weights_are_refused_by_node_and_tensor() {
    let model = Model::from_f32_tensors(
        "m",
        vec![
            ("fc.weight".into(), vec![10, 64], vec![0.0; 640]),
            ("fc.bias".into(), vec![9], vec![0.0; 9]),
        ],
    );
    let base = |node: &str| {
        format!(
            r#"{{"kind": "graph", "inputs": [{{"name": "x", "shape": [64]}}],
                "nodes": [{node}], "output": "y"}}"#
        )
    };
    let err = |json: String| match Graph::from_json(&json) {
        Ok(g) => g.check(&model).unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    let e = err(base(
        r#"{"name": "fc", "op": "linear", "weight": "fc.weight", "bias": "fc.bias",
            "inputs": ["x"], "output": "y"}"#,
    ));
    assert!(
        e.contains("node 'fc'") && e.contains("'fc.bias'") && e.contains("[10]"),
        "{e}"
    );
    let e = err(base(
        r#"{"name": "fc", "op": "linear", "weight": "fc2.weight", "inputs": ["x"], "output": "y"}"#,
    ));
    assert!(e.contains("'fc2.weight'") && e.contains("missing"), "{e}");
    let e = err(base(
        r#"{"name": "odd", "op": "fourier", "inputs": ["x"], "output": "y"}"#,
    ));
    assert!(e.contains("node 'odd'") && e.contains("fourier"), "{e}");
    let e = err(base(
        r#"{"name": "fc", "op": "linear", "weight": "fc.weight", "inputs": ["z"], "output": "y"}"#,
    ));
    assert!(e.contains("reads 'z'"), "{e}");
    let e = err(base(
        r#"{"name": "c", "op": "conv2d", "weight": "fc.weight", "inputs": ["x"], "output": "y"}"#,
    ));
    assert!(e.contains("node 'c'") && e.contains("[C, H, W]"), "{e}");
}

#[test]
fn a_sidecar_description_makes_a_plain_safetensors_file_runnable() {
    use prunescope::eval::{Evaluator, evaluator_for};
    // The bundled CNN's weights without its metadata, and its graph in MODEL.arch.json.
    let cnn = prunescope::sample::open_named("cnn").unwrap();
    let arch = cnn.metadata["prunescope.arch"].clone();
    let dir = common::tempdir("graph-sidecar");
    let tensors = (0..cnn.tensors.len())
        .map(|i| {
            (
                cnn.tensors[i].name.clone(),
                cnn.tensors[i].shape.clone(),
                cnn.to_f32_vec(i),
            )
        })
        .collect::<Vec<_>>();
    let path = dir.join("weights.safetensors");
    prunescope::export::write_f32_safetensors(&path, &Default::default(), &tensors).unwrap();
    let plain = Model::open(&path).unwrap();
    assert!(evaluator_for(&plain).unwrap().is_none());
    std::fs::write(dir.join("weights.arch.json"), &arch).unwrap();
    let ev = evaluator_for(&plain).unwrap().unwrap();
    let m = ev
        .evaluate(&plain, &prunescope::prune::MaskSet::new())
        .unwrap();
    let direct = evaluator_for(&cnn)
        .unwrap()
        .unwrap()
        .evaluate(&cnn, &prunescope::prune::MaskSet::new())
        .unwrap();
    assert_eq!(m.accuracy, direct.accuracy);
    assert!(m.accuracy.unwrap() > 0.95);
    assert_eq!(ev.engine().label(), "evaluate + train");
    // A broken sidecar is an error that names the node, not silence.
    std::fs::write(
        dir.join("weights.arch.json"),
        arch.replace("\"conv2\"", "\"conv9\"")
            .replace("conv2.weight", "conv9.weight"),
    )
    .unwrap();
    let e = evaluator_for(&plain).err().unwrap().to_string();
    assert!(e.contains("conv9.weight"), "{e}");
}

#[test]
fn the_bundled_cnn_samples_are_what_train_produces() {
    use prunescope::eval::{Evaluator, evaluator_for};
    use prunescope::train::{SampleArch, TrainConfig, sample_graph, train_graph};
    let data = prunescope::data::digits_split().unwrap();
    for (arch, id) in [(SampleArch::Cnn, "cnn"), (SampleArch::ResCnn, "rescnn")] {
        let sample = prunescope::sample::open_named(id).unwrap();
        let dense = evaluator_for(&sample)
            .unwrap()
            .unwrap()
            .evaluate(&sample, &prunescope::prune::MaskSet::new())
            .unwrap();
        assert!(dense.accuracy.unwrap() > 0.95, "{id}: {dense:?}");
        // Two epochs of the same recipe already learn; the full 30 made the sample.
        let (g, shapes) = sample_graph(arch);
        let cfg = TrainConfig {
            hidden: Vec::new(),
            epochs: 2,
            ..Default::default()
        };
        let r = train_graph(
            &g,
            &shapes,
            &cfg,
            &data,
            &prunescope::progress::Progress::none(),
        )
        .unwrap();
        assert!(r.test.accuracy.unwrap() > 0.5, "{id}: {:?}", r.test);
        assert!(r.epoch_loss[1] < r.epoch_loss[0]);
        // The description in the file is the one the code builds.
        assert_eq!(
            Graph::from_json(&sample.metadata["prunescope.arch"]).unwrap(),
            g
        );
        // Initial weights differ from trained ones, and are what the .init file holds.
        let init = Model::open(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("sample_models/digits_{id}.init.safetensors")),
        )
        .unwrap();
        assert_eq!(init.tensors.len(), sample.tensors.len());
        let t = sample.find("fc.weight").unwrap();
        let ti = init.find("fc.weight").unwrap();
        assert_ne!(sample.to_f32_vec(t), init.to_f32_vec(ti));
    }
}

#[test]
fn a_flattened_image_reaches_linear_norm_and_add_in_logical_order_on_the_native_engine() {
    // The native engine keeps a flattened image channels-last; every reader must still see
    // PyTorch's (c, h, w) order. Checked against sums written out over the logical input.
    let mut rng = SplitMix64::new(7);
    let (n, c, h, w) = (5, 3, 2, 2);
    let f = c * h * w;
    let x = randn(&mut rng, n * f);
    let (w1, b1) = (randn(&mut rng, 2 * f), randn(&mut rng, 2));
    let w2 = randn(&mut rng, 8 * f);
    let (gamma, beta, mean) = (randn(&mut rng, f), randn(&mut rng, f), randn(&mut rng, f));
    let var: Vec<f32> = (0..f).map(|i| 0.5 + i as f32 / 4.0).collect();
    let model = Model::from_f32_tensors(
        "flat",
        vec![
            ("w1".into(), vec![2, f], w1.clone()),
            ("b1".into(), vec![2], b1.clone()),
            ("w2".into(), vec![8, f], w2.clone()),
            ("g".into(), vec![f], gamma.clone()),
            ("b".into(), vec![f], beta.clone()),
            ("m".into(), vec![f], mean.clone()),
            ("v".into(), vec![f], var.clone()),
        ],
    );
    // Fewer outputs than samples (the weight is reordered), more (the batch is), a ReLU that
    // keeps the layout, a BatchNorm over features and an Add of the two layouts.
    let g = graph(
        r#"{"kind": "graph", "inputs": [{"name": "x", "shape": [3, 2, 2]}],
            "nodes": [
              {"name": "flat", "op": "flatten", "inputs": ["x"], "output": "f"},
              {"name": "narrow", "op": "linear", "weight": "w1", "bias": "b1",
               "inputs": ["f"], "output": "y1"},
              {"name": "wide", "op": "linear", "weight": "w2", "inputs": ["f"], "output": "y2"},
              {"name": "relu", "op": "relu", "inputs": ["f"], "output": "r"},
              {"name": "bn", "op": "batch_norm", "weight": "g", "bias": "b",
               "running_mean": "m", "running_var": "v", "eps": 0.001,
               "inputs": ["r"], "output": "bn"},
              {"name": "sum", "op": "add", "inputs": ["f", "bn"], "output": "s"}
            ],
            "output": "s"}"#,
    );
    g.check(&model).unwrap();
    let fast = fast_params(&g, &model);
    let run = |out: &str| {
        let mut g2 = g.clone();
        g2.output = out.into();
        prunescope::graph::fast::forward(&g2, &[(vec![n, c, h, w], &x)], &fast).unwrap()
    };
    let linear = |wt: &[f32], b: Option<&[f32]>, outs: usize| -> Vec<f32> {
        let mut y = Vec::new();
        for s in 0..n {
            for o in 0..outs {
                let dot: f32 = (0..f).map(|k| wt[o * f + k] * x[s * f + k]).sum();
                y.push(dot + b.map_or(0.0, |b| b[o]));
            }
        }
        y
    };
    let (shape, y1) = run("y1");
    assert_eq!(shape, [n, 2]);
    close(&y1, &linear(&w1, Some(&b1), 2), 1e-4, "narrow linear");
    close(&run("y2").1, &linear(&w2, None, 8), 1e-4, "wide linear");
    close(&run("f").1, &x, 0.0, "flatten");
    let bn: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let k = i % f;
            (v.max(0.0) - mean[k]) / (var[k] + 0.001).sqrt() * gamma[k] + beta[k]
        })
        .collect();
    close(&run("bn").1, &bn, 1e-5, "relu + batch norm");
    let sum: Vec<f32> = x.iter().zip(&bn).map(|(a, b)| a + b).collect();
    close(&run("s").1, &sum, 1e-5, "add");
}
