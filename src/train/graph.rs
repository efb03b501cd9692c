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
