//! Training a [`Graph`] on candle: the CNN samples, and later fine-tuning of imported models.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::{NamedTensors, TrainConfig, TrainError, TrainResult, batch, run_epochs};
use crate::data::Split;
use crate::graph::{GRAPH_KIND, Graph, InputSpec, Mode, Node, Op};
use crate::util::SplitMix64;

/// The bundled sample architectures beyond the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleArch {
    /// conv 1→16, ReLU, 2×2 max pool, conv 16→32, ReLU, flatten, linear 512→10.
    Cnn,
    /// conv 1→16 + BatchNorm + ReLU, a residual block of two 16→16 convs with BatchNorm, global
    /// average pool, linear 16→10.
    ResCnn,
}

impl SampleArch {
    pub fn parse(s: &str) -> Option<SampleArch> {
        match s {
            "cnn" => Some(SampleArch::Cnn),
            "rescnn" => Some(SampleArch::ResCnn),
            _ => None,
        }
    }
}

fn node(name: &str, op: Op, inputs: &[&str], output: &str) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        output: output.into(),
    }
}

fn conv(name: &str, input: &str, output: &str) -> Node {
    node(
        name,
        Op::Conv2d {
            weight: format!("{name}.weight"),
            bias: Some(format!("{name}.bias")),
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
        },
        &[input],
        output,
    )
}

fn bn(name: &str, input: &str, output: &str) -> Node {
    node(
        name,
        Op::BatchNorm {
            weight: format!("{name}.weight"),
            bias: format!("{name}.bias"),
            running_mean: format!("{name}.running_mean"),
            running_var: format!("{name}.running_var"),
            eps: 1e-5,
            momentum: 0.1,
        },
        &[input],
        output,
    )
}

/// A sample graph on 1×8×8 digits and the shapes of its tensors (PyTorch's names and layouts).
pub fn sample_graph(arch: SampleArch) -> (Graph, Vec<(String, Vec<usize>)>) {
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    let mut conv_shapes = |name: &str, cin: usize, cout: usize| {
        shapes.push((format!("{name}.weight"), vec![cout, cin, 3, 3]));
        shapes.push((format!("{name}.bias"), vec![cout]));
    };
    let nodes = match arch {
        SampleArch::Cnn => {
            conv_shapes("conv1", 1, 16);
            conv_shapes("conv2", 16, 32);
            vec![
                conv("conv1", "x", "c1"),
                node("relu1", Op::Relu, &["c1"], "r1"),
                node(
                    "pool",
                    Op::MaxPool {
                        kernel: [2, 2],
                        stride: [2, 2],
                    },
                    &["r1"],
                    "p1",
                ),
                conv("conv2", "p1", "c2"),
                node("relu2", Op::Relu, &["c2"], "r2"),
                node("flatten", Op::Flatten, &["r2"], "f"),
                node(
                    "fc",
                    Op::Linear {
                        weight: "fc.weight".into(),
                        bias: Some("fc.bias".into()),
                    },
                    &["f"],
                    "logits",
                ),
            ]
        }
        SampleArch::ResCnn => {
            conv_shapes("conv1", 1, 16);
            conv_shapes("block.conv1", 16, 16);
            conv_shapes("block.conv2", 16, 16);
            vec![
                conv("conv1", "x", "c1"),
                bn("bn1", "c1", "b1"),
                node("relu1", Op::Relu, &["b1"], "r1"),
                conv("block.conv1", "r1", "c2"),
                bn("block.bn1", "c2", "b2"),
                node("block.relu", Op::Relu, &["b2"], "r2"),
                conv("block.conv2", "r2", "c3"),
                bn("block.bn2", "c3", "b3"),
                node("block.add", Op::Add, &["r1", "b3"], "s"),
                node("relu2", Op::Relu, &["s"], "r3"),
                node("pool", Op::GlobalAvgPool { keep_dims: false }, &["r3"], "g"),
                node(
                    "fc",
                    Op::Linear {
                        weight: "fc.weight".into(),
                        bias: Some("fc.bias".into()),
                    },
                    &["g"],
                    "logits",
                ),
            ]
        }
    };
    for n in &nodes {
        if let Op::BatchNorm { .. } = n.op {
            for (_, t) in n.op.params() {
                shapes.push((t.to_string(), vec![16]));
            }
        }
    }
    let fc_in = match arch {
        SampleArch::Cnn => 32 * 4 * 4,
        SampleArch::ResCnn => 16,
    };
    shapes.push(("fc.weight".into(), vec![10, fc_in]));
    shapes.push(("fc.bias".into(), vec![10]));
    let graph = Graph {
        kind: GRAPH_KIND.into(),
        inputs: vec![InputSpec {
            name: "x".into(),
            shape: vec![1, 8, 8],
        }],
        nodes,
        output: "logits".into(),
        dataset: Some("uci-digits".into()),
    };
    (graph, shapes)
}

/// PyTorch's default initialisation: U(±1/√fan_in) for conv and linear weights and biases;
/// BatchNorm and LayerNorm start as the identity (scale 1, shift 0, statistics 0 and 1).
fn init_params(
    graph: &Graph,
    shapes: &[(String, Vec<usize>)],
    rng: &mut SplitMix64,
) -> NamedTensors {
    let mut fan_in: HashMap<&str, usize> = HashMap::new();
    let mut fill: HashMap<&str, f32> = HashMap::new();
    for n in &graph.nodes {
        match &n.op {
            Op::Linear { weight, .. } | Op::Conv2d { weight, .. } => {
                let shape = &shapes.iter().find(|(s, _)| s == weight).expect("shape").1;
                let f: usize = shape[1..].iter().product();
                for (_, t) in n.op.params() {
                    fan_in.insert(t, f);
                }
            }
            // Norms: scale and variance 1, shift and mean 0.
            _ => {
                for (role, t) in n.op.params() {
                    fill.insert(
                        t,
                        if matches!(role, "weight" | "running_var") {
                            1.0
                        } else {
                            0.0
                        },
                    );
                }
            }
        }
    }
    shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values = match (fan_in.get(name.as_str()), fill.get(name.as_str())) {
                (Some(&f), _) => {
                    let bound = 1.0 / (f as f64).sqrt();
                    (0..n)
                        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                        .collect()
                }
                (None, Some(&v)) => vec![v; n],
                (None, None) => vec![0.0; n],
            };
            (name.clone(), shape.clone(), values)
        })
        .collect()
}

/// Trains a one-input graph on a labelled split with AdamW and shuffled minibatches, fixed seed.
/// `shapes` gives every tensor the graph reads; they start from PyTorch's initialisation.
pub fn train_graph(
    graph: &Graph,
    shapes: &[(String, Vec<usize>)],
    cfg: &TrainConfig,
    data: &Split,
    progress: &crate::progress::Progress,
) -> Result<TrainResult, TrainError> {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(cfg.seed);
    let sample = graph.inputs[0].shape.clone();
    if sample.iter().product::<usize>() != data.train.dim {
        return Err(TrainError::Compute(format!(
            "the graph takes {sample:?} per sample, the data {} values",
            data.train.dim
        )));
    }
    graph
        .infer(&|node, t| {
            shapes
                .iter()
                .find(|(n, _)| n == t)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| crate::graph::GraphError::Tensor {
                    node: node.into(),
                    tensor: t.into(),
                    msg: "no shape given".into(),
                })
        })
        .map_err(|e| TrainError::Compute(e.to_string()))?;
    let init = init_params(graph, shapes, &mut rng);
    let trainable = graph.trainable_names();
    let mut vars: Vec<(String, Var)> = Vec::new();
    let mut state: HashMap<String, Tensor> = HashMap::new();
    for (name, shape, values) in &init {
        let t = Tensor::from_slice(values, shape.as_slice(), &dev)?;
        if trainable.contains(name) {
            vars.push((name.clone(), Var::from_tensor(&t)?));
        } else {
            state.insert(name.clone(), t);
        }
    }
    let params = ParamsAdamW {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
    let current = |vars: &[(String, Var)], state: &HashMap<String, Tensor>| {
        let mut p: crate::graph::Params = state.clone();
        for (n, v) in vars {
            p.insert(n.clone(), v.as_tensor().clone());
        }
        p
    };
    let train = &data.train;
    let epoch_loss = run_epochs(cfg, train.len(), &mut rng, progress, |chunk, rng| {
        let (x, y) = batch(train, chunk, &sample, &dev)?;
        let p = current(&vars, &state);
        let (logits, updates) = graph
            .forward(
                &[x],
                &p,
                Mode::Train {
                    seed: rng.next_u64(),
                },
            )
            .map_err(|e| TrainError::Compute(e.to_string()))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        opt.backward_step(&loss)?;
        for (name, t) in updates {
            state.insert(name, t);
        }
        Ok(loss.to_scalar::<f32>()? as f64)
    })?;
    let all: Vec<usize> = (0..data.test.len()).collect();
    let (xt, yt) = batch(&data.test, &all, &sample, &dev)?;
    let (logits, _) = graph
        .forward(&[xt], &current(&vars, &state), Mode::Eval)
        .map_err(|e| TrainError::Compute(e.to_string()))?;
    let test = crate::eval::metrics(&logits, &yt)?;
    let p = current(&vars, &state);
    let trained = init
        .iter()
        .map(|(n, s, _)| Ok((n.clone(), s.clone(), p[n].flatten_all()?.to_vec1::<f32>()?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(TrainResult {
        arch: graph.to_json(),
        config: cfg.clone(),
        init,
        trained,
        test,
        epoch_loss,
    })
}

/// A fine-tune of a graph (CNNs, imported ONNX graphs) on candle.
pub struct GraphFinetune {
    pub before: crate::eval::Metrics,
    pub after: crate::eval::Metrics,
    pub epochs: Vec<super::EpochStats>,
    pub samples_per_s: f64,
    /// Every parameter and running statistic after training (the best epoch's when cancelled).
    pub tensors: NamedTensors,
    pub cancelled: bool,
    /// The masks at the end (a schedule may have moved them), 1 = kept.
    pub masks: Vec<(String, Vec<bool>)>,
    /// The tensors before step `record_at`, when asked.
    pub recorded: Option<NamedTensors>,
    /// The movement given, with this run's added.
    pub movement: Option<HashMap<String, Vec<f64>>>,
}

/// Fine-tunes `graph`'s parameters from `model` with `masks` held (pruned weights are zeroed
/// after every step), SGD with momentum or AdamW, BatchNorm in training mode with its running
/// statistics updated; distillation from the model as given (before its masks) when asked.
#[allow(clippy::too_many_arguments)]
pub fn finetune_graph(
    model: &crate::model::Model,
    graph: &Graph,
    masks: &crate::prune::MaskSet,
    data: &Split,
    cfg: &super::FinetuneConfig,
    dev: &Device,
    progress: &crate::progress::Progress,
    on_epoch: impl FnMut(&super::EpochStats),
) -> Result<GraphFinetune, TrainError> {
    finetune_graph_with(
        model,
        graph,
        masks,
        data,
        cfg,
        dev,
        progress,
        on_epoch,
        |_, _| None,
        None,
        None,
    )
}

/// [`finetune_graph`] with a schedule's hooks: before step `t`, `prune_at(t, sparsity)` may
/// return a sparsity to prune the masked tensors to first (layer by layer, by magnitude, or by
/// movement when `movement` is given: every step then adds −w·∂L/∂w of each masked tensor to
/// it); the weights before step `record_at` are returned too (late rewinding).
#[allow(clippy::too_many_arguments)]
pub fn finetune_graph_with(
    model: &crate::model::Model,
    graph: &Graph,
    masks: &crate::prune::MaskSet,
    data: &Split,
    cfg: &super::FinetuneConfig,
    dev: &Device,
    progress: &crate::progress::Progress,
    mut on_epoch: impl FnMut(&super::EpochStats),
    mut prune_at: impl FnMut(usize, f64) -> Option<f64>,
    record_at: Option<usize>,
    mut movement: Option<HashMap<String, Vec<f64>>>,
) -> Result<GraphFinetune, TrainError> {
    use candle_core::D;
    let sample = graph.inputs[0].shape.clone();
    if graph.inputs.len() != 1 || sample.iter().product::<usize>() != data.train.dim {
        return Err(TrainError::Compute(format!(
            "the graph takes {sample:?} per sample, the data {} values",
            data.train.dim
        )));
    }
    let params = crate::graph::load_params(graph, model, Some(masks), dev)
        .map_err(|e| TrainError::Compute(e.to_string()))?;
    // The teacher for distillation: the model as given, before its masks.
    let teacher = match cfg.distill {
        Some(_) => Some(
            crate::graph::load_params(graph, model, None, dev)
                .map_err(|e| TrainError::Compute(e.to_string()))?,
        ),
        None => None,
    };
    let trainable = graph.trainable_names();
    let mut vars: Vec<(String, Var)> = Vec::new();
    let mut state: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &params {
        if trainable.contains(name) {
            vars.push((name.clone(), Var::from_tensor(t)?));
        } else {
            state.insert(name.clone(), t.clone());
        }
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut mask_of: Vec<Option<Tensor>> = vars
        .iter()
        .map(|(name, v)| {
            masks
                .get(name)
                .map(|m| {
                    let keep: Vec<f32> = (0..m.len()).map(|i| m.kept(i) as u8 as f32).collect();
                    Tensor::from_vec(keep, v.as_tensor().dims(), dev)
                })
                .transpose()
        })
        .collect::<candle_core::Result<_>>()?;
    let mut opt =
        super::native::CandleOptimizer::new(vars.iter().map(|(_, v)| v.clone()).collect(), cfg)?;
    let current = |vars: &[(String, Var)], state: &HashMap<String, Tensor>| {
        let mut p: crate::graph::Params = state.clone();
        for (n, v) in vars {
            p.insert(n.clone(), v.as_tensor().clone());
        }
        p
    };
    let evaluate = |vars: &[(String, Var)],
                    state: &HashMap<String, Tensor>|
     -> Result<crate::eval::Metrics, TrainError> {
        let p = current(vars, state);
        let mut logits = Vec::new();
        let idx: Vec<usize> = (0..data.test.len()).collect();
        for chunk in idx.chunks(512) {
            let (x, _) = batch(&data.test, chunk, &sample, dev)?;
            let (y, _) = graph
                .forward(&[x], &p, Mode::Eval)
                .map_err(|e| TrainError::Compute(e.to_string()))?;
            logits.push(y);
        }
        let logits = Tensor::cat(&logits, 0)?;
        let y = Tensor::from_slice(&data.test.labels, data.test.len(), dev)?;
        Ok(crate::eval::metrics(&logits, &y)?)
    };
    let snapshot = |vars: &[(String, Var)],
                    state: &HashMap<String, Tensor>|
     -> candle_core::Result<NamedTensors> {
        let p = current(vars, state);
        let mut out: NamedTensors = p
            .iter()
            .map(|(n, t)| {
                Ok((
                    n.clone(),
                    t.dims().to_vec(),
                    t.flatten_all()?.to_vec1::<f32>()?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    };
    let before = evaluate(&vars, &state)?;
    let train = &data.train;
    let bs = cfg.batch_size.max(1);
    let per_epoch = train.len().div_ceil(bs);
    let total = per_epoch * cfg.epochs;
    let mut rng = SplitMix64::new(cfg.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut step, mut seen, mut secs) = (0usize, 0usize, 0.0f64);
    let mut epochs = Vec::new();
    let mut best: Option<(f64, NamedTensors)> = Some((
        before.accuracy.unwrap_or(f64::NAN),
        snapshot(&vars, &state)?,
    ));
    let mut cancelled = false;
    let mut recorded = None;
    let masked_numel: usize = mask_of.iter().flatten().map(|m| m.elem_count()).sum();
    let mut pruned_now: usize = masks.iter().map(|(_, m)| m.len() - m.count_kept()).sum();
    'epochs: for epoch in 0..cfg.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let t0 = std::time::Instant::now();
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        for chunk in order.chunks(bs) {
            if progress.check().is_err() {
                cancelled = true;
                secs += t0.elapsed().as_secs_f64();
                break 'epochs;
            }
            let current_sparsity = pruned_now as f64 / masked_numel.max(1) as f64;
            if let Some(target) = prune_at(step, current_sparsity) {
                pruned_now = 0;
                for ((name, v), m) in vars.iter().zip(mask_of.iter_mut()) {
                    let Some(old) = m.as_ref() else { continue };
                    let keep = match movement.as_ref().and_then(|mv| mv.get(name)) {
                        Some(mv) => {
                            let old = old.flatten_all()?.to_vec1::<f32>()?;
                            super::recovery::movement_keep(mv, Some(&old), target)
                        }
                        None => {
                            let values = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                            magnitude_keep(&values, target)
                        }
                    };
                    pruned_now += keep.iter().filter(|k| **k == 0.0).count();
                    let new = Tensor::from_vec(keep, old.dims(), dev)?;
                    v.set(&(v.as_tensor() * &new)?)?;
                    *m = Some(new);
                }
            }
            if record_at == Some(step) {
                recorded = Some(snapshot(&vars, &state)?);
            }
            let lr = cfg.schedule.lr(cfg.lr, step, total, per_epoch);
            let (x, y) = batch(train, chunk, &sample, dev)?;
            let (logits, updates) = graph
                .forward(
                    std::slice::from_ref(&x),
                    &current(&vars, &state),
                    Mode::Train {
                        seed: rng.next_u64(),
                    },
                )
                .map_err(|e| TrainError::Compute(e.to_string()))?;
            let teacher_logits = match (cfg.distill, &teacher) {
                (Some(d), Some(tp)) => {
                    let (tl, _) = graph
                        .forward(&[x], tp, Mode::Eval)
                        .map_err(|e| TrainError::Compute(e.to_string()))?;
                    Some((d, tl))
                }
                _ => None,
            };
            let loss = super::native::candle_loss(
                &logits,
                &y,
                teacher_logits.as_ref().map(|(d, t)| (*d, t)),
            )?;
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            correct += pred
                .iter()
                .zip(chunk)
                .filter(|(p, i)| **p == train.labels[**i])
                .count();
            loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            let grads = loss.backward()?;
            if let Some(mv) = movement.as_mut() {
                for ((name, v), m) in vars.iter().zip(&mask_of) {
                    let (Some(_), Some(acc), Some(g)) =
                        (m, mv.get_mut(name), grads.get(v.as_tensor()))
                    else {
                        continue;
                    };
                    let g = g.flatten_all()?.to_vec1::<f32>()?;
                    let w = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    super::recovery::add_movement(acc, &w, &g);
                }
            }
            opt.apply(&grads, cfg, lr)?;
            for ((_, v), m) in vars.iter().zip(&mask_of) {
                if let Some(m) = m {
                    v.set(&(v.as_tensor() * m)?)?;
                }
            }
            for (name, t) in updates {
                state.insert(name, t);
            }
            step += 1;
            seen += chunk.len();
        }
        secs += t0.elapsed().as_secs_f64();
        let m = evaluate(&vars, &state)?;
        let stats = super::EpochStats::new(
            epoch + 1,
            (loss_sum, correct, train.len()),
            &m,
            cfg.schedule
                .lr(cfg.lr, step.saturating_sub(1), total, per_epoch),
            pruned_now as f64 / masked_numel.max(1) as f64,
        );
        if best.as_ref().is_none_or(|(a, _)| stats.improves_on(*a)) {
            best = Some((stats.test_accuracy, snapshot(&vars, &state)?));
        }
        progress.report(
            (epoch + 1) as f32 / cfg.epochs.max(1) as f32,
            &format!(
                "epoch {}/{}: test accuracy {:.2}%",
                epoch + 1,
                cfg.epochs,
                stats.test_accuracy * 100.0
            ),
        );
        on_epoch(&stats);
        epochs.push(stats);
    }
    let (tensors, after) = match (cancelled, best) {
        (true, Some((acc, t))) => {
            let mut m = evaluate(&vars, &state)?;
            // The best epoch's figures: its tensors are what is returned.
            m.accuracy = Some(acc);
            m.loss = epochs
                .iter()
                .find(|e| e.test_accuracy == acc)
                .map(|e| e.test_loss)
                .or(before.loss);
            (t, m)
        }
        _ => (snapshot(&vars, &state)?, evaluate(&vars, &state)?),
    };
    let final_masks = vars
        .iter()
        .zip(&mask_of)
        .filter_map(|((n, _), m)| m.as_ref().map(|m| (n.clone(), m)))
        .map(|(n, m)| {
            Ok((
                n,
                m.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| *v != 0.0)
                    .collect(),
            ))
        })
        .collect::<candle_core::Result<Vec<(String, Vec<bool>)>>>()?;
    Ok(GraphFinetune {
        before,
        after,
        epochs,
        samples_per_s: if secs > 0.0 { seen as f64 / secs } else { 0.0 },
        tensors,
        cancelled,
        masks: final_masks,
        recorded,
        movement,
    })
}

/// 1 for the weights a layer keeps at `sparsity`, 0 for its smallest |w| (ties by index).
pub fn magnitude_keep(values: &[f32], sparsity: f64) -> Vec<f32> {
    keep_all_but_lowest(values.len(), sparsity, |a, b| {
        values[a].abs().total_cmp(&values[b].abs())
    })
}

/// 1 for the entries of `n` kept at `sparsity`, 0 for the round(sparsity·n) that come first
/// under `lower` (ties by index).
pub fn keep_all_but_lowest(
    n: usize,
    sparsity: f64,
    lower: impl Fn(usize, usize) -> std::cmp::Ordering,
) -> Vec<f32> {
    let k = ((sparsity.clamp(0.0, 1.0) * n as f64).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| lower(a, b).then(a.cmp(&b)));
    let mut keep = vec![1f32; n];
    for &i in &order[..k] {
        keep[i] = 0.0;
    }
    keep
}

/// Accuracy and loss of a graph with the given tensors on a labelled dataset (candle, CPU).
pub fn eval_graph(
    graph: &Graph,
    tensors: &NamedTensors,
    test: &crate::data::Dataset,
) -> Result<crate::eval::Metrics, TrainError> {
    let dev = Device::Cpu;
    let mut p = crate::graph::Params::new();
    for (n, s, v) in tensors {
        p.insert(n.clone(), Tensor::from_slice(v, s.as_slice(), &dev)?);
    }
    let sample = graph.inputs[0].shape.clone();
    let idx: Vec<usize> = (0..test.len()).collect();
    let mut logits = Vec::new();
    for chunk in idx.chunks(512) {
        let (x, _) = batch(test, chunk, &sample, &dev)?;
        let (y, _) = graph
            .forward(&[x], &p, Mode::Eval)
            .map_err(|e| TrainError::Compute(e.to_string()))?;
        logits.push(y);
    }
    let logits = Tensor::cat(&logits, 0)?;
    let y = Tensor::from_slice(&test.labels, test.len(), &dev)?;
    Ok(crate::eval::metrics(&logits, &y)?)
}

/// Fresh initial values for every tensor of `graph` (PyTorch's defaults; norms at 1 and 0).
pub fn fresh_init(graph: &Graph, shapes: &[(String, Vec<usize>)], seed: u64) -> NamedTensors {
    init_params(graph, shapes, &mut SplitMix64::new(seed))
}
