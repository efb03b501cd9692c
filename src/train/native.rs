//! Fine-tuning MLPs with their masks held, in plain loops and single-threaded `gemm` calls.
//!
//! A tiny model trains in microseconds per step, so per-step overhead decides the speed: every
//! buffer is allocated once, each product is one `gemm` call on one thread (splitting a
//! 64×128×64 product across threads costs more than it saves), and no autograd graph is built.
//! Pruned weights stay exactly zero: their gradients are zeroed before the optimiser step and
//! the mask is applied again after it.

use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::data::Dataset;
use crate::eval::{Activation, Metrics, MlpArch, Outputs, score};
use crate::model::Model;
use crate::progress::Progress;
use crate::prune::MaskSet;
use crate::util::SplitMix64;

/// The optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Optim {
    /// SGD with (PyTorch-style) momentum.
    #[default]
    Sgd,
    /// Adam with decoupled weight decay (Loshchilov & Hutter; PyTorch's AdamW).
    AdamW,
}

impl Optim {
    pub fn parse(s: &str) -> Option<Optim> {
        match s {
            "sgd" => Some(Optim::Sgd),
            "adamw" => Some(Optim::AdamW),
            _ => None,
        }
    }
}

/// How the learning rate moves over the steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Multiply by `gamma` every `every` epochs.
    Step { every: usize, gamma: f64 },
    /// Linear warm-up over `warmup` steps, then half a cosine down to 0.
    Cosine { warmup: usize },
}

impl LrSchedule {
    /// The learning rate at `step` (0-based) of `total` steps with `per_epoch` steps an epoch.
    pub fn lr(self, base: f64, step: usize, total: usize, per_epoch: usize) -> f64 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every, gamma } => {
                let epoch = step / per_epoch.max(1);
                base * gamma.powi((epoch / every.max(1)) as i32)
            }
            LrSchedule::Cosine { warmup } => {
                if step < warmup {
                    base * (step + 1) as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let t = (step - warmup) as f64 / span;
                    base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

/// Knowledge distillation from the dense model: `(1 − α)·CE + α·T²·KL(teacher_T ‖ student_T)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distill {
    pub temperature: f64,
    pub alpha: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: Optim,
    /// SGD momentum.
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: LrSchedule,
    pub seed: u64,
    pub distill: Option<Distill>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            epochs: 5,
            batch_size: 64,
            lr: 0.05,
            optimizer: Optim::Sgd,
            momentum: 0.9,
            weight_decay: 0.0,
            schedule: LrSchedule::Constant,
            seed: 0,
            distill: None,
        }
    }
}

/// One layer: `act(x Wᵀ + b)`, W `[out, in]` row-major.
#[derive(Clone, Debug)]
pub struct Layer {
    pub weight_name: String,
    pub bias_name: Option<String>,
    pub out: usize,
    pub inp: usize,
    pub w: Vec<f32>,
    /// Zeros when the model has no bias (then it is not trained).
    pub b: Vec<f32>,
    pub relu: bool,
    /// 1 where the weight is kept, 0 where pruned; `None`: dense.
    pub mask: Option<Vec<f32>>,
    /// The same for the bias, when the user made biases prunable.
    pub bias_mask: Option<Vec<f32>>,
}

/// An MLP as plain vectors.
#[derive(Clone, Debug)]
pub struct Net {
    pub layers: Vec<Layer>,
    /// Each layer's movement −Σ_t w_t·∂L/∂w_t over the training steps since
    /// [`super::Trainee::track_movement`]; while it is kept, schedules prune by it.
    pub movement: Option<Vec<Vec<f64>>>,
}

impl Net {
    /// The model's MLP with `masks` applied to its weights (biases are never masked here).
    /// The dense model as a distillation teacher, where `cfg` asks for distillation.
    pub fn teacher_for(
        model: &Model,
        arch: &MlpArch,
        cfg: &FinetuneConfig,
    ) -> Result<Option<Net>, TrainError> {
        cfg.distill
            .map(|_| Net::from_model(model, arch, &MaskSet::new()))
            .transpose()
    }

    pub fn from_model(model: &Model, arch: &MlpArch, masks: &MaskSet) -> Result<Net, TrainError> {
        let mut layers = Vec::new();
        for l in &arch.layers {
            let t = model
                .find(&l.weight)
                .ok_or_else(|| TrainError::Compute(format!("tensor '{}' is missing", l.weight)))?;
            let shape = &model.tensors[t].shape;
            if shape.len() != 2 {
                return Err(TrainError::Compute(format!(
                    "'{}' has shape {shape:?}, not [out, in]",
                    l.weight
                )));
            }
            let (out, inp) = (shape[0], shape[1]);
            let mut w = model.to_f32_vec(t);
            let mask = masks.get(&l.weight).map(|m| {
                m.apply(&mut w);
                (0..m.len()).map(|i| m.kept(i) as u8 as f32).collect()
            });
            let mut bias_mask = None;
            let b = match &l.bias {
                Some(name) => {
                    let bt = model.find(name).ok_or_else(|| {
                        TrainError::Compute(format!("tensor '{name}' is missing"))
                    })?;
                    let mut b = model.to_f32_vec(bt);
                    bias_mask = masks.get(name).map(|m| {
                        m.apply(&mut b);
                        (0..m.len()).map(|i| m.kept(i) as u8 as f32).collect()
                    });
                    b
                }
                None => vec![0.0; out],
            };
            if b.len() != out {
                return Err(TrainError::Compute(format!(
                    "bias of '{}' has {} values, not {out}",
                    l.weight,
                    b.len()
                )));
            }
            layers.push(Layer {
                weight_name: l.weight.clone(),
                bias_name: l.bias.clone(),
                out,
                inp,
                w,
                b,
                relu: l.activation == Activation::Relu,
                mask,
                bias_mask,
            });
        }
        if layers.is_empty() {
            return Err(TrainError::Compute("the MLP has no layers".into()));
        }
        for w in layers.windows(2) {
            if w[0].out != w[1].inp {
                return Err(TrainError::Compute(format!(
                    "'{}' gives {} values, '{}' takes {}",
                    w[0].weight_name, w[0].out, w[1].weight_name, w[1].inp
                )));
            }
        }
        Ok(Net {
            layers,
            movement: None,
        })
    }

    pub fn input_dim(&self) -> usize {
        self.layers[0].inp
    }

    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out)
    }

    /// Logits of `rows` samples (`x`: `rows × input_dim`).
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut h = x.to_vec();
        for l in &self.layers {
            let mut z = vec![0f32; rows * l.out];
            dense_forward(l, &h, rows, &mut z);
            h = z;
        }
        h
    }

    /// Accuracy and loss on a labelled dataset.
    pub fn metrics(&self, d: &Dataset) -> Result<Metrics, TrainError> {
        let logits = self.forward(&d.inputs, d.len());
        let out = Outputs::new(logits, vec![self.classes()]);
        Ok(score(&out, d.len(), Some(&d.labels), None)?)
    }

    /// Every trained tensor by name: weights and the biases the model has.
    pub fn tensors(&self) -> super::NamedTensors {
        let mut out = Vec::new();
        for l in &self.layers {
            out.push((l.weight_name.clone(), vec![l.out, l.inp], l.w.clone()));
            if let Some(b) = &l.bias_name {
                out.push((b.clone(), vec![l.out], l.b.clone()));
            }
        }
        out
    }

    /// Fraction of the layer weights their masks prune (0 without masks).
    pub fn masked_sparsity(&self) -> f64 {
        let (p, n) = self.layers.iter().fold((0usize, 0usize), |(p, n), l| {
            let pruned = l
                .mask
                .as_ref()
                .map_or(0, |m| m.iter().filter(|v| **v == 0.0).count());
            (p + pruned, n + l.w.len())
        });
        p as f64 / n.max(1) as f64
    }

    /// Weights (and biases) pruned by the masks that are not exactly zero (0 after every step).
    pub fn masked_nonzeros(&self) -> usize {
        let count = |v: &[f32], m: &Option<Vec<f32>>| {
            m.as_ref().map_or(0, |m| {
                v.iter()
                    .zip(m)
                    .filter(|(w, m)| **m == 0.0 && **w != 0.0)
                    .count()
            })
        };
        self.layers
            .iter()
            .map(|l| count(&l.w, &l.mask) + count(&l.b, &l.bias_mask))
            .sum()
    }
}

/// `z = act(h Wᵀ + b)` for `rows` samples, one thread.
fn dense_forward(l: &Layer, h: &[f32], rows: usize, z: &mut [f32]) {
    crate::graph::fast::matmul_serial(rows, l.out, l.inp, h, &l.w, 1, l.inp, z, 0, l.out);
    for r in z.chunks_mut(l.out) {
        for (v, b) in r.iter_mut().zip(&l.b) {
            *v += b;
            if l.relu && *v < 0.0 {
                *v = 0.0;
            }
        }
    }
}

/// Optimiser state of one layer.
struct State {
    mw: Vec<f32>,
    mb: Vec<f32>,
    vw: Vec<f32>,
    vb: Vec<f32>,
}

/// One training epoch's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub lr: f64,
    /// Fraction of the prunable weights pruned at the end of the epoch.
    pub sparsity: f64,
}

impl EpochStats {
    /// An epoch's figures from its training sums `(loss × samples, correct, samples)`, the
    /// test metrics, the learning rate of its last step and the sparsity at its end.
    pub(crate) fn new(
        epoch: usize,
        (loss_sum, correct, samples): (f64, usize, usize),
        test: &Metrics,
        lr: f64,
        sparsity: f64,
    ) -> EpochStats {
        let n = samples.max(1) as f64;
        EpochStats {
            epoch,
            train_loss: loss_sum / n,
            train_accuracy: correct as f64 / n,
            test_loss: test.loss.unwrap_or(f64::NAN),
            test_accuracy: test.accuracy.unwrap_or(f64::NAN),
            lr,
            sparsity,
        }
    }

    /// Whether this epoch's test accuracy beats `best` (any figure beats an unknown one).
    pub(crate) fn improves_on(&self, best: f64) -> bool {
        self.test_accuracy > best || best.is_nan()
    }
}

#[derive(Clone, Debug)]
pub struct FinetuneResult {
    pub before: Metrics,
    pub after: Metrics,
    pub epochs: Vec<EpochStats>,
    /// Training samples per second over the optimisation steps alone.
    pub samples_per_s: f64,
    /// The best weights by test accuracy (the last ones when none beat the start).
    pub net: Net,
    /// Stopped by Cancel: `net` is the best so far.
    pub cancelled: bool,
}

/// Trains `net` on `train` with its masks held; `test` is measured after every epoch. Returns
/// the last epoch's weights, or when cancelled the best seen (the start included).
/// `teacher` (the dense model) enables distillation when `cfg.distill` asks for it.
pub fn finetune(
    net: Net,
    teacher: Option<&Net>,
    train: &Dataset,
    test: &Dataset,
    cfg: &FinetuneConfig,
    progress: &Progress,
    on_epoch: impl FnMut(&EpochStats, &Net),
) -> Result<FinetuneResult, TrainError> {
    finetune_with(
        net,
        teacher,
        train,
        test,
        cfg,
        progress,
        on_epoch,
        |_, _| {},
    )
}

/// Checks that the data fits the network: widths, labels, something to train on.
pub fn check_data(net: &Net, train: &Dataset, test: &Dataset) -> Result<(), TrainError> {
    if train.dim != net.input_dim() || test.dim != net.input_dim() {
        return Err(TrainError::Compute(format!(
            "the model takes {} values per sample, the data has {}",
            net.input_dim(),
            train.dim
        )));
    }
    if train.is_empty() || test.is_empty() {
        return Err(TrainError::Compute("no training or test samples".into()));
    }
    if let Some(&bad) = train
        .labels
        .iter()
        .chain(&test.labels)
        .find(|&&y| y as usize >= net.classes())
    {
        return Err(TrainError::Compute(format!(
            "label {bad} is out of range for {} outputs",
            net.classes()
        )));
    }
    Ok(())
}

/// [`finetune`], calling `before_step(step, net)` before every optimiser step (0-based): a
/// gradual schedule moves the masks there, late rewinding records the weights. The optimiser
/// state and the learning-rate schedule run across the whole training.
#[allow(clippy::too_many_arguments)]
pub fn finetune_with(
    mut net: Net,
    teacher: Option<&Net>,
    train: &Dataset,
    test: &Dataset,
    cfg: &FinetuneConfig,
    progress: &Progress,
    mut on_epoch: impl FnMut(&EpochStats, &Net),
    mut before_step: impl FnMut(usize, &mut Net),
) -> Result<FinetuneResult, TrainError> {
    check_data(&net, train, test)?;
    let before = net.metrics(test)?;
    let bs = cfg.batch_size.max(1);
    let per_epoch = train.len().div_ceil(bs);
    let total = per_epoch * cfg.epochs;
    let mut trainer = Trainer::new(&net, bs);
    let mut rng = SplitMix64::new(cfg.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut epochs = Vec::new();
    // The start is a candidate: a cancel in the first epoch keeps the untrained weights.
    let mut best: Option<(f64, Net)> = Some((before.accuracy.unwrap_or(f64::NAN), net.clone()));
    let mut step = 0usize;
    let mut train_secs = 0.0;
    let mut seen = 0usize;
    let mut cancelled = false;
    'epochs: for epoch in 0..cfg.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        let t0 = std::time::Instant::now();
        for chunk in order.chunks(bs) {
            if progress.check().is_err() {
                cancelled = true;
                train_secs += t0.elapsed().as_secs_f64();
                break 'epochs;
            }
            before_step(step, &mut net);
            let lr = cfg.schedule.lr(cfg.lr, step, total, per_epoch);
            let (l, c) = trainer.step(&mut net, teacher, train, chunk, cfg, lr, step + 1);
            loss_sum += l * chunk.len() as f64;
            correct += c;
            seen += chunk.len();
            step += 1;
        }
        train_secs += t0.elapsed().as_secs_f64();
        let m = net.metrics(test)?;
        let stats = EpochStats::new(
            epoch + 1,
            (loss_sum, correct, train.len()),
            &m,
            cfg.schedule
                .lr(cfg.lr, step.saturating_sub(1), total, per_epoch),
            net.masked_sparsity(),
        );
        if best.as_ref().is_none_or(|(a, _)| stats.improves_on(*a)) {
            best = Some((stats.test_accuracy, net.clone()));
        }
        progress.report(
            (epoch + 1) as f32 / cfg.epochs.max(1) as f32,
            &format!(
                "epoch {}/{}: loss {:.4}, test accuracy {:.2}%",
                epoch + 1,
                cfg.epochs,
                stats.train_loss,
                stats.test_accuracy * 100.0
            ),
        );
        on_epoch(&stats, &net);
        epochs.push(stats);
    }
    let net = match (cancelled, best) {
        (true, Some((_, b))) => b,
        (_, _) => net,
    };
    let after = net.metrics(test)?;
    Ok(FinetuneResult {
        before,
        after,
        epochs,
        samples_per_s: if train_secs > 0.0 {
            seen as f64 / train_secs
        } else {
            0.0
        },
        net,
        cancelled,
    })
}

/// Buffers for one batch size, allocated once.
struct Trainer {
    /// Inputs of each layer: `acts[0]` the batch, `acts[l + 1]` layer l's output.
    acts: Vec<Vec<f32>>,
    /// Gradient with respect to each layer's output (pre-activation where it matters).
    grads: Vec<Vec<f32>>,
    /// `dz` transposed, `out × batch`, for the weight gradient.
    dzt: Vec<f32>,
    gw: Vec<Vec<f32>>,
    gb: Vec<Vec<f32>>,
    states: Vec<State>,
    teacher_logits: Vec<f32>,
    labels: Vec<u32>,
}

impl Trainer {
    fn new(net: &Net, bs: usize) -> Trainer {
        let mut acts = vec![vec![0f32; bs * net.input_dim()]];
        acts.extend(net.layers.iter().map(|l| vec![0f32; bs * l.out]));
        let zeros = |n: usize| vec![0f32; n];
        Trainer {
            grads: net.layers.iter().map(|l| zeros(bs * l.out)).collect(),
            dzt: zeros(bs * net.layers.iter().map(|l| l.out).max().unwrap_or(0)),
            gw: net.layers.iter().map(|l| zeros(l.w.len())).collect(),
            gb: net.layers.iter().map(|l| zeros(l.out)).collect(),
            states: net
                .layers
                .iter()
                .map(|l| State {
                    mw: zeros(l.w.len()),
                    mb: zeros(l.out),
                    vw: zeros(l.w.len()),
                    vb: zeros(l.out),
                })
                .collect(),
            teacher_logits: zeros(bs * net.classes()),
            acts,
            labels: Vec::with_capacity(bs),
        }
    }

    /// One optimiser step on the samples `idx`; returns the batch's mean loss and how many it
    /// classified right (before the step).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        net: &mut Net,
        teacher: Option<&Net>,
        data: &Dataset,
        idx: &[usize],
        cfg: &FinetuneConfig,
        lr: f64,
        t: usize,
    ) -> (f64, usize) {
        let b = idx.len();
        let dim = data.dim;
        let x = &mut self.acts[0];
        for (r, &i) in idx.iter().enumerate() {
            x[r * dim..(r + 1) * dim].copy_from_slice(&data.inputs[i * dim..(i + 1) * dim]);
        }
        self.labels.clear();
        self.labels.extend(idx.iter().map(|&i| data.labels[i]));
        for (l, layer) in net.layers.iter().enumerate() {
            let (ins, outs) = self.acts.split_at_mut(l + 1);
            dense_forward(
                layer,
                &ins[l][..b * layer.inp],
                b,
                &mut outs[0][..b * layer.out],
            );
        }
        let classes = net.classes();
        // Distillation needs a teacher: without one (schedules, lottery) it is off.
        let distill = cfg.distill.filter(|_| teacher.is_some());
        if let Some(tn) = teacher {
            let logits = tn.forward(&self.acts[0][..b * dim], b);
            self.teacher_logits[..b * classes].copy_from_slice(&logits);
        }
        // Softmax cross-entropy (and the distillation term) and its gradient wrt the logits.
        let last = net.layers.len() - 1;
        let logits = &self.acts[last + 1][..b * classes];
        let dz = &mut self.grads[last][..b * classes];
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let inv_b = 1.0 / b as f32;
        for r in 0..b {
            let row = &logits[r * classes..(r + 1) * classes];
            let y = self.labels[r] as usize;
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            let arg = crate::eval::argmax(row);
            correct += (arg == y) as usize;
            let ce = (sum.ln() + max - row[y]) as f64;
            let g = &mut dz[r * classes..(r + 1) * classes];
            let hard = distill.map_or(1.0, |d| 1.0 - d.alpha as f32);
            for (j, gj) in g.iter_mut().enumerate() {
                let p = (row[j] - max).exp() / sum;
                *gj = hard * (p - (j == y) as u8 as f32) * inv_b;
            }
            loss += hard as f64 * ce;
            if let Some(d) = distill {
                let tt = d.temperature as f32;
                let trow = &self.teacher_logits[r * classes..(r + 1) * classes];
                let smax = row.iter().map(|v| v / tt).fold(f32::NEG_INFINITY, f32::max);
                let tmax = trow
                    .iter()
                    .map(|v| v / tt)
                    .fold(f32::NEG_INFINITY, f32::max);
                let ssum: f32 = row.iter().map(|v| (v / tt - smax).exp()).sum();
                let tsum: f32 = trow.iter().map(|v| (v / tt - tmax).exp()).sum();
                let mut kl = 0.0f64;
                for j in 0..classes {
                    let ps = (row[j] / tt - smax).exp() / ssum;
                    let pt = (trow[j] / tt - tmax).exp() / tsum;
                    if pt > 0.0 {
                        kl += (pt as f64) * ((pt as f64).ln() - (ps.max(1e-30) as f64).ln());
                    }
                    // d/dz of α·T²·KL = α·T·(p_s − p_t).
                    g[j] += d.alpha as f32 * tt * (ps - pt) * inv_b;
                }
                loss += d.alpha * d.temperature * d.temperature * kl;
            }
        }
        loss /= b as f64;
        // Backward, last layer first.
        for l in (0..net.layers.len()).rev() {
            let layer = &net.layers[l];
            let (out, inp) = (layer.out, layer.inp);
            let dz = &self.grads[l][..b * out];
            // dzᵀ, so that dW = dzᵀ · h is one row-major product.
            let dzt = &mut self.dzt[..out * b];
            for r in 0..b {
                for o in 0..out {
                    dzt[o * b + r] = dz[r * out + o];
                }
            }
            crate::graph::fast::matmul_serial(
                out,
                inp,
                b,
                dzt,
                &self.acts[l][..b * inp],
                inp,
                1,
                &mut self.gw[l],
                0,
                inp,
            );
            let gb = &mut self.gb[l];
            gb.iter_mut().for_each(|v| *v = 0.0);
            for r in 0..b {
                for (g, d) in gb.iter_mut().zip(&dz[r * out..(r + 1) * out]) {
                    *g += d;
                }
            }
            if l > 0 {
                let (lower, upper) = self.grads.split_at_mut(l);
                let dh = &mut lower[l - 1][..b * inp];
                crate::graph::fast::matmul_serial(
                    b,
                    inp,
                    out,
                    &upper[0][..b * out],
                    &layer.w,
                    inp,
                    1,
                    dh,
                    0,
                    inp,
                );
                // Through the ReLU of layer l − 1 (its output is this layer's input).
                if net.layers[l - 1].relu {
                    for (g, a) in dh.iter_mut().zip(&self.acts[l][..b * inp]) {
                        if *a <= 0.0 {
                            *g = 0.0;
                        }
                    }
                }
            }
        }
        for (l, layer) in net.layers.iter_mut().enumerate() {
            if let Some(m) = &layer.mask {
                for (g, m) in self.gw[l].iter_mut().zip(m) {
                    *g *= m;
                }
            }
            if let Some(mv) = net.movement.as_mut() {
                super::recovery::add_movement(&mut mv[l], &layer.w, &self.gw[l]);
            }
            let st = &mut self.states[l];
            let has_bias = layer.bias_name.is_some();
            update(
                cfg,
                lr,
                t,
                &mut layer.w,
                &self.gw[l],
                &mut st.mw,
                &mut st.vw,
            );
            if has_bias {
                update(
                    cfg,
                    lr,
                    t,
                    &mut layer.b,
                    &self.gb[l],
                    &mut st.mb,
                    &mut st.vb,
                );
            }
            if let Some(m) = &layer.mask {
                for (w, m) in layer.w.iter_mut().zip(m) {
                    *w *= m;
                }
            }
        }
        (loss, correct)
    }
}

/// One optimiser update of `w` by gradient `g`, PyTorch's formulas.
fn update(
    cfg: &FinetuneConfig,
    lr: f64,
    t: usize,
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let lr32 = lr as f32;
    let wd = cfg.weight_decay as f32;
    match cfg.optimizer {
        Optim::Sgd => {
            let mom = cfg.momentum as f32;
            for i in 0..w.len() {
                let gi = g[i] + wd * w[i];
                // PyTorch: the buffer starts as the first gradient.
                m[i] = if t == 1 { gi } else { mom * m[i] + gi };
                w[i] -= lr32 * if mom > 0.0 { m[i] } else { gi };
            }
        }
        Optim::AdamW => {
            let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
            let c1 = 1.0 - b1.powi(t as i32);
            let c2 = 1.0 - b2.powi(t as i32);
            for i in 0..w.len() {
                w[i] -= lr32 * wd * w[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / c1;
                let vh = v[i] / c2;
                w[i] -= lr32 * mh / (vh.sqrt() + eps);
            }
        }
    }
}

/// The seed of the 80/20 split of a user's labelled file.
const FILE_SPLIT_SEED: u64 = 20_241_126;

/// The training and test data of a fine-tune: the model's own dataset split (the digits), or a
/// labelled `.npz` / `.safetensors` file split 80/20 by a seeded shuffle.
pub fn training_split(
    dataset: &str,
    source: &crate::eval::DataSource,
    seed: u64,
) -> Result<crate::data::Split, TrainError> {
    use crate::eval::DataSource;
    let err = |e: crate::data::DataError| TrainError::Eval(e.into());
    match source {
        DataSource::Default => crate::data::by_name(dataset).map_err(err),
        DataSource::Digits => crate::data::digits_split().map_err(err),
        DataSource::File { path, spec } => {
            let d = crate::data::load_eval_data(path, &["x".to_string()], spec).map_err(err)?;
            let Some(labels) = d.labels.clone() else {
                return Err(TrainError::Compute(format!(
                    "{}: fine-tuning needs labels (an array named y, or --y NAME)",
                    d.name
                )));
            };
            let [input] = &d.inputs[..] else {
                return Err(TrainError::Compute(format!(
                    "{}: an MLP takes one input array, the file gives {}",
                    d.name,
                    d.inputs.len()
                )));
            };
            let crate::data::ArrayValues::F32(values) = &input.values else {
                return Err(TrainError::Compute(format!(
                    "array '{}' holds integers; the MLP takes floats",
                    input.name
                )));
            };
            let classes = labels.iter().max().map_or(0, |m| *m as usize + 1);
            let all = Dataset {
                name: d.name.clone(),
                inputs: values.clone(),
                labels,
                dim: input.sample_len(),
                classes,
            };
            // A fixed split: runs with different training seeds are scored on the same test set.
            let _ = seed;
            Ok(all.split_seeded(0.2, FILE_SPLIT_SEED))
        }
    }
}

/// Writes the model with the fine-tuned tensors in place of the originals (every tensor as
/// F32; the architecture and other metadata kept), atomically.
pub fn write_finetuned(
    model: &Model,
    net: &Net,
    cfg: &FinetuneConfig,
    out: &std::path::Path,
) -> Result<(), TrainError> {
    write_trained(model, net.tensors(), cfg, out)
}

/// [`write_finetuned`] for trained tensors by name (a graph's).
pub fn write_trained(
    model: &Model,
    tensors: super::NamedTensors,
    cfg: &FinetuneConfig,
    out: &std::path::Path,
) -> Result<(), TrainError> {
    let trained: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(n, s, v)| (n, (s, v))).collect();
    let mut tensors = Vec::with_capacity(model.tensors.len());
    for (t, e) in model.tensors.iter().enumerate() {
        if !e.analysable() {
            return Err(TrainError::Compute(format!(
                "tensor '{}' ({}) cannot be written as F32",
                e.name, e.dtype
            )));
        }
        let (shape, values) = trained
            .get(&e.name)
            .cloned()
            .unwrap_or_else(|| (e.shape.clone(), model.to_f32_vec(t)));
        tensors.push((e.name.clone(), shape, values));
    }
    let mut meta = model.metadata.clone();
    // The architecture travels with the weights, also when it came from a sidecar file.
    if let Ok(Some(arch)) = crate::eval::arch_json(model) {
        meta.insert(crate::eval::ARCH_METADATA_KEY.into(), arch);
    }
    meta.insert(
        "prunescope.finetune".into(),
        serde_json::to_string(cfg).map_err(|e| TrainError::Compute(e.to_string()))?,
    );
    crate::export::write_f32_safetensors(out, &meta, &tensors)
        .map_err(|e| TrainError::Compute(format!("{}: {}", out.display(), e)))
}

/// Where a fine-tune runs: prunescope's CPU loops, or candle on a device (CPU, or a CUDA /
/// Metal GPU in builds with the `cuda` / `metal` feature).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum TrainDevice {
    #[default]
    Native,
    CandleCpu,
    Cuda(usize),
    Metal(usize),
}

impl TrainDevice {
    pub fn parse(s: &str) -> Option<TrainDevice> {
        let (kind, n) = match s.split_once(':') {
            Some((k, n)) => (k, n.parse().ok()?),
            None => (s, 0),
        };
        match kind {
            "native" | "cpu" => Some(TrainDevice::Native),
            "candle" | "candle-cpu" => Some(TrainDevice::CandleCpu),
            "cuda" => Some(TrainDevice::Cuda(n)),
            "metal" => Some(TrainDevice::Metal(n)),
            _ => None,
        }
    }

    /// The candle device, or why there is none in this build.
    pub fn candle(&self) -> Result<Option<candle_core::Device>, TrainError> {
        let unavailable = |what: &str, feature: &str, e: candle_core::Error| {
            TrainError::Compute(format!(
                "{what} is not available: {e} (build with `--features {feature}` where its \
                 toolkit is installed)"
            ))
        };
        Ok(match self {
            TrainDevice::Native => None,
            TrainDevice::CandleCpu => Some(candle_core::Device::Cpu),
            TrainDevice::Cuda(n) => Some(
                candle_core::Device::new_cuda(*n)
                    .map_err(|e| unavailable(&format!("CUDA device {n}"), "cuda", e))?,
            ),
            TrainDevice::Metal(n) => Some(
                candle_core::Device::new_metal(*n)
                    .map_err(|e| unavailable(&format!("Metal device {n}"), "metal", e))?,
            ),
        })
    }

    /// The devices this build can offer, for a picker.
    pub fn available() -> Vec<(TrainDevice, String)> {
        let mut v = vec![
            (
                TrainDevice::Native,
                "CPU (prunescope's kernels)".to_string(),
            ),
            (TrainDevice::CandleCpu, "CPU (candle)".to_string()),
        ];
        if candle_core::utils::cuda_is_available() {
            v.push((TrainDevice::Cuda(0), "CUDA GPU 0 (candle)".into()));
        }
        if candle_core::utils::metal_is_available() {
            v.push((TrainDevice::Metal(0), "Metal GPU (candle)".into()));
        }
        v
    }
}

/// Cross-entropy of `logits` against `y`, plus, with a teacher, the distillation term
/// `α·T²·KL(teacher_T ‖ student_T)` with the cross-entropy weighted `1 − α`.
pub(crate) fn candle_loss(
    logits: &candle_core::Tensor,
    y: &candle_core::Tensor,
    teacher: Option<(Distill, &candle_core::Tensor)>,
) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::D;
    let ce = candle_nn::loss::cross_entropy(logits, y)?;
    let Some((d, tl)) = teacher else {
        return Ok(ce);
    };
    let rows = logits.dims()[0];
    let ls = candle_nn::ops::log_softmax(&(logits / d.temperature)?, D::Minus1)?;
    let pt = candle_nn::ops::softmax(&(tl / d.temperature)?, D::Minus1)?;
    // Guarded: a teacher probability that underflows to 0 must give 0, not NaN.
    let kl = (&pt * (pt.clamp(1e-30f32, 1f32)?.log()? - ls)?)?
        .sum_all()?
        .affine(1.0 / rows as f64, 0.0)?;
    (ce * (1.0 - d.alpha))? + (kl * (d.alpha * d.temperature * d.temperature))?
}

/// SGD with PyTorch's momentum, or candle's AdamW (PyTorch's formulas), over candle variables.
pub(crate) struct CandleOptimizer {
    vars: Vec<candle_core::Var>,
    adam: candle_nn::optim::AdamW,
    momentum: Vec<Option<candle_core::Tensor>>,
}

impl CandleOptimizer {
    pub(crate) fn new(
        vars: Vec<candle_core::Var>,
        cfg: &FinetuneConfig,
    ) -> candle_core::Result<CandleOptimizer> {
        use candle_nn::optim::Optimizer;
        let adam = candle_nn::optim::AdamW::new(
            vars.clone(),
            candle_nn::optim::ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(CandleOptimizer {
            momentum: vec![None; vars.len()],
            vars,
            adam,
        })
    }

    /// One step on `loss` at learning rate `lr`.
    pub(crate) fn step(
        &mut self,
        loss: &candle_core::Tensor,
        cfg: &FinetuneConfig,
        lr: f64,
    ) -> candle_core::Result<()> {
        self.apply(&loss.backward()?, cfg, lr)
    }

    /// One step with gradients already taken.
    pub(crate) fn apply(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        cfg: &FinetuneConfig,
        lr: f64,
    ) -> candle_core::Result<()> {
        use candle_nn::optim::Optimizer;
        match cfg.optimizer {
            Optim::AdamW => {
                self.adam.set_learning_rate(lr);
                self.adam.step(grads)
            }
            Optim::Sgd => {
                for (v, m) in self.vars.iter().zip(self.momentum.iter_mut()) {
                    let Some(g) = grads.get(v.as_tensor()) else {
                        continue;
                    };
                    let g = (g + (v.as_tensor() * cfg.weight_decay)?)?;
                    let buf = match (m.as_ref(), cfg.momentum > 0.0) {
                        (Some(m), true) => ((m * cfg.momentum)? + g)?,
                        _ => g,
                    };
                    v.set(&(v.as_tensor() - (&buf * lr)?)?)?;
                    *m = Some(buf);
                }
                Ok(())
            }
        }
    }
}

/// [`finetune`] on prunescope's own loops, or [`finetune_on`] the candle device given: what a
/// `TrainDevice` chooses between.
#[allow(clippy::too_many_arguments)]
pub fn finetune_where(
    device: Option<&candle_core::Device>,
    net: Net,
    teacher: Option<&Net>,
    train: &Dataset,
    test: &Dataset,
    cfg: &FinetuneConfig,
    progress: &Progress,
    on_epoch: impl FnMut(&EpochStats, &Net),
) -> Result<FinetuneResult, TrainError> {
    match device {
        None => finetune(net, teacher, train, test, cfg, progress, on_epoch),
        Some(d) => finetune_on(d, net, teacher, train, test, cfg, progress, on_epoch),
    }
}

/// [`finetune`] on a candle device: the same steps (cross-entropy, optional distillation,
/// SGD with momentum or AdamW, masks applied after every step) with candle's autograd.
#[allow(clippy::too_many_arguments)]
pub fn finetune_on(
    device: &candle_core::Device,
    net: Net,
    teacher: Option<&Net>,
    train: &Dataset,
    test: &Dataset,
    cfg: &FinetuneConfig,
    progress: &Progress,
    mut on_epoch: impl FnMut(&EpochStats, &Net),
) -> Result<FinetuneResult, TrainError> {
    use candle_core::{D, Tensor, Var};
    check_data(&net, train, test)?;
    let distill = cfg.distill.filter(|_| teacher.is_some());
    let before = net.metrics(test)?;
    let dev = device;
    let vars: Vec<(Var, Var)> = net
        .layers
        .iter()
        .map(|l| {
            Ok((
                Var::from_slice(&l.w, (l.out, l.inp), dev)?,
                Var::from_slice(&l.b, l.out, dev)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let masks: Vec<Option<Tensor>> = net
        .layers
        .iter()
        .map(|l| {
            l.mask
                .as_ref()
                .map(|m| Tensor::from_slice(m, (l.out, l.inp), dev))
                .transpose()
        })
        .collect::<candle_core::Result<_>>()?;
    let all: Vec<Var> = vars
        .iter()
        .zip(&net.layers)
        .flat_map(|((w, b), l)| {
            let mut v = vec![w.clone()];
            if l.bias_name.is_some() {
                v.push(b.clone());
            }
            v
        })
        .collect();
    let mut opt = CandleOptimizer::new(all, cfg)?;
    let forward = |x: &Tensor| -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for ((w, b), l) in vars.iter().zip(&net.layers) {
            h = h
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if l.relu {
                h = h.relu()?;
            }
        }
        Ok(h)
    };
    let bs = cfg.batch_size.max(1);
    let per_epoch = train.len().div_ceil(bs);
    let total = per_epoch * cfg.epochs;
    let mut rng = SplitMix64::new(cfg.seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut step, mut seen, mut secs) = (0usize, 0usize, 0.0f64);
    let mut epochs = Vec::new();
    let mut current = net.clone();
    let mut best: Option<(f64, Net)> = Some((before.accuracy.unwrap_or(f64::NAN), net.clone()));
    let mut cancelled = false;
    let snapshot = |into: &mut Net| -> candle_core::Result<()> {
        for (l, (w, b)) in into.layers.iter_mut().zip(&vars) {
            l.w = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            l.b = b.as_tensor().to_vec1::<f32>()?;
        }
        Ok(())
    };
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
            let lr = cfg.schedule.lr(cfg.lr, step, total, per_epoch);
            let mut xs = Vec::with_capacity(chunk.len() * train.dim);
            for &i in chunk {
                xs.extend_from_slice(&train.inputs[i * train.dim..(i + 1) * train.dim]);
            }
            let ys: Vec<u32> = chunk.iter().map(|&i| train.labels[i]).collect();
            let x = Tensor::from_vec(xs.clone(), (chunk.len(), train.dim), dev)?;
            let y = Tensor::from_vec(ys.clone(), chunk.len(), dev)?;
            let logits = forward(&x)?;
            let teacher_logits = match (distill, teacher) {
                (Some(d), Some(t)) => Some((
                    d,
                    Tensor::from_vec(t.forward(&xs, chunk.len()), (chunk.len(), t.classes()), dev)?,
                )),
                _ => None,
            };
            let loss = candle_loss(&logits, &y, teacher_logits.as_ref().map(|(d, t)| (*d, t)))?;
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            correct += pred.iter().zip(&ys).filter(|(p, y)| p == y).count();
            loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            opt.step(&loss, cfg, lr)?;
            for ((w, _), m) in vars.iter().zip(&masks) {
                if let Some(m) = m {
                    w.set(&(w.as_tensor() * m)?)?;
                }
            }
            step += 1;
            seen += chunk.len();
        }
        secs += t0.elapsed().as_secs_f64();
        snapshot(&mut current)?;
        let m = current.metrics(test)?;
        let stats = EpochStats::new(
            epoch + 1,
            (loss_sum, correct, train.len()),
            &m,
            cfg.schedule
                .lr(cfg.lr, step.saturating_sub(1), total, per_epoch),
            current.masked_sparsity(),
        );
        if best.as_ref().is_none_or(|(a, _)| stats.improves_on(*a)) {
            best = Some((stats.test_accuracy, current.clone()));
        }
        progress.report(
            (epoch + 1) as f32 / cfg.epochs.max(1) as f32,
            &format!("epoch {}/{}", epoch + 1, cfg.epochs),
        );
        on_epoch(&stats, &current);
        epochs.push(stats);
    }
    snapshot(&mut current)?;
    let net = match (cancelled, best) {
        (true, Some((_, b))) => b,
        _ => current,
    };
    let after = net.metrics(test)?;
    Ok(FinetuneResult {
        before,
        after,
        epochs,
        samples_per_s: if secs > 0.0 { seen as f64 / secs } else { 0.0 },
        net,
        cancelled,
    })
}
