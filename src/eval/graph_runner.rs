//! Runs a [`Graph`] on candle, and picks the faster engine when a graph runs on both.

use std::sync::Mutex;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::{Engine, EvalError, Outputs, Runner};
use crate::data::{ArrayValues, EvalData};
use crate::graph::{Graph, GraphError, Mode, load_params};
use crate::model::Model;
use crate::prune::MaskSet;

/// Samples per forward pass: bounds the activations' memory.
const CHUNK: usize = 1024;

impl From<GraphError> for EvalError {
    fn from(e: GraphError) -> Self {
        EvalError::Compute(e.to_string())
    }
}

pub struct GraphRunner {
    graph: Graph,
    inputs: Vec<Tensor>,
    samples: usize,
    why: String,
}

impl GraphRunner {
    /// Checks the graph against the model and feeds the data's arrays to its inputs, reshaped
    /// where the per-sample sizes agree. Returns the runner and notes on reshapes.
    pub fn new(
        model: &Model,
        graph: Graph,
        data: &EvalData,
        why: String,
    ) -> Result<(GraphRunner, Vec<String>), EvalError> {
        graph.check(model).map_err(|e| EvalError::Arch {
            key: super::ARCH_METADATA_KEY,
            msg: e.to_string(),
        })?;
        let mut inputs = Vec::new();
        let mut notes = Vec::new();
        for spec in &graph.inputs {
            let a = if graph.inputs.len() == 1 && data.inputs.len() == 1 {
                &data.inputs[0]
            } else {
                data.input(&spec.name).ok_or_else(|| {
                    EvalError::Input(format!(
                        "the model's input '{}' has no array in {}",
                        spec.name, data.name
                    ))
                })?
            };
            let want: usize = spec.shape.iter().product();
            if a.sample_len() != want {
                return Err(EvalError::Input(format!(
                    "array '{}' has shape {:?} ({} values per sample), but the model's input '{}' \
                     expects [samples, {}]",
                    a.name,
                    a.shape,
                    a.sample_len(),
                    spec.name,
                    spec.shape
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if a.shape[1..] != spec.shape[..] {
                notes.push(format!(
                    "array '{}' {:?} per sample reshaped to the model's {:?}",
                    a.name,
                    &a.shape[1..],
                    spec.shape
                ));
            }
            let values: Vec<f32> = match &a.values {
                ArrayValues::F32(v) => v.clone(),
                ArrayValues::I64(v) => v.iter().map(|&x| x as f32).collect(),
            };
            let mut shape = vec![data.samples];
            shape.extend(&spec.shape);
            inputs.push(Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        Ok((
            GraphRunner {
                graph,
                inputs,
                samples: data.samples,
                why,
            },
            notes,
        ))
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }
}

impl Runner for GraphRunner {
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        let params = load_params(&self.graph, model, masks, &Device::Cpu)?;
        Outputs::gather(self.samples, CHUNK, |start, len| {
            let batch: Vec<Tensor> = self
                .inputs
                .iter()
                .map(|t| t.narrow(0, start, len))
                .collect::<candle_core::Result<_>>()?;
            let (y, _) = self.graph.forward(&batch, &params, Mode::Eval)?;
            Ok((y.dims()[1..].to_vec(), y.flatten_all()?.to_vec1::<f32>()?))
        })
    }

    fn engine(&self) -> Engine {
        Engine {
            name: "candle",
            trainable: true,
            why: self.why.clone(),
        }
    }

    fn weight_uses(&self, model: &Model) -> Option<Vec<(String, f64)>> {
        self.graph.weight_uses(model).ok()
    }
}

/// Runs a graph with prunescope's own CPU kernels (inference only).
pub struct FastRunner {
    graph: Graph,
    inputs: Vec<(Vec<usize>, Vec<f32>)>,
    samples: usize,
    /// Whether a run is small enough to be faster on one thread (decided on the first run).
    serial: std::sync::OnceLock<bool>,
}

/// Multiply-adds of a whole run below which waking the other threads costs more than they
/// save (the digits MLP, about 0.8 M, runs in tens of microseconds).
const SERIAL_MACS: f64 = 4e6;

impl FastRunner {
    /// `None` when some op has no kernel here.
    pub fn new(candle: &GraphRunner) -> Option<FastRunner> {
        if !crate::graph::fast::supports(&candle.graph) {
            return None;
        }
        let inputs = candle
            .inputs
            .iter()
            .map(|t| {
                Some((
                    t.dims().to_vec(),
                    t.flatten_all().ok()?.to_vec1::<f32>().ok()?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(FastRunner {
            graph: candle.graph.clone(),
            inputs,
            samples: candle.samples,
            serial: std::sync::OnceLock::new(),
        })
    }
}

impl Runner for FastRunner {
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        let serial = *self.serial.get_or_init(|| {
            self.graph.weight_uses(model).is_ok_and(|uses| {
                let per_sample: f64 = uses
                    .iter()
                    .filter_map(|(w, u)| model.find(w).map(|t| u * model.tensors[t].numel as f64))
                    .sum();
                per_sample * (self.samples as f64) < SERIAL_MACS
            })
        });
        self.run_here(model, masks, serial)
    }

    fn engine(&self) -> Engine {
        Engine {
            name: "native",
            trainable: true,
            why: "prunescope's own CPU kernels run the graph forward; candle trains it".into(),
        }
    }

    fn weight_uses(&self, model: &Model) -> Option<Vec<(String, f64)>> {
        self.graph.weight_uses(model).ok()
    }
}

impl FastRunner {
    fn run_here(
        &self,
        model: &Model,
        masks: Option<&MaskSet>,
        serial: bool,
    ) -> Result<Outputs, EvalError> {
        use rayon::prelude::*;
        let names = self.graph.param_names();
        let param = |name: &String| {
            let t = model.find(name).ok_or_else(|| EvalError::Tensor {
                tensor: name.clone(),
                msg: "missing from the model".into(),
            })?;
            let v = crate::prune::masked_f32(model, t, masks);
            Ok((name.clone(), (model.tensors[t].shape.clone(), v)))
        };
        // Small models read their weights on this thread: waking the pool costs more.
        let weights: usize = names
            .iter()
            .filter_map(|n| model.find(n))
            .map(|t| model.tensors[t].numel)
            .sum();
        let params: crate::graph::fast::FastParams = if serial || weights < 1 << 20 {
            names.iter().map(param).collect::<Result<_, EvalError>>()?
        } else {
            names
                .par_iter()
                .map(param)
                .collect::<Result<_, EvalError>>()?
        };
        let threads = rayon::current_num_threads();
        if serial || threads < 2 || self.samples < SAMPLES_PER_THREAD * threads {
            return Outputs::gather(self.samples, CHUNK, |start, len| {
                self.forward_chunk(start, len, &params, serial)
            });
        }
        // Each thread runs every layer on its own share of the samples: one hand-off per run
        // instead of one per layer, whose wake-ups cost as much as a small layer's arithmetic.
        let per = self.samples.div_ceil(threads);
        let parts: Vec<Result<Outputs, EvalError>> = (0..threads)
            .into_par_iter()
            .map(|i| {
                let first = (i * per).min(self.samples);
                let len = per.min(self.samples - first);
                Outputs::gather(len, CHUNK, |start, len| {
                    self.forward_chunk(first + start, len, &params, true)
                })
            })
            .collect();
        let mut values = Vec::new();
        let mut sample_shape = Vec::new();
        for part in parts {
            let part = part?;
            if !part.values.is_empty() {
                sample_shape = part.sample_shape;
            }
            values.extend(part.values);
        }
        Ok(Outputs::new(values, sample_shape))
    }

    /// Samples `start..start + len` through the graph, on this thread alone when `serial`.
    fn forward_chunk(
        &self,
        start: usize,
        len: usize,
        params: &crate::graph::fast::FastParams,
        serial: bool,
    ) -> Result<(Vec<usize>, Vec<f32>), EvalError> {
        let batch: Vec<(Vec<usize>, &[f32])> = self
            .inputs
            .iter()
            .map(|(shape, v)| {
                let per: usize = shape[1..].iter().product();
                let mut s = shape.clone();
                s[0] = len;
                (s, &v[start * per..(start + len) * per])
            })
            .collect();
        let (shape, y) = if serial {
            crate::graph::fast::forward_serial(&self.graph, &batch, params)?
        } else {
            crate::graph::fast::forward(&self.graph, &batch, params)?
        };
        Ok((shape[1..].to_vec(), y))
    }
}

/// Samples each thread needs before the samples, not the layers, are split among threads.
const SAMPLES_PER_THREAD: usize = 16;

/// Two engines for one graph: the first run times both and keeps the faster.
pub struct Fastest {
    runners: Vec<Box<dyn Runner>>,
    chosen: Mutex<Option<(usize, String)>>,
    /// Held while the first run times the engines, so that `chosen` is never locked for long.
    timing: Mutex<()>,
}

impl Fastest {
    pub fn new(runners: Vec<Box<dyn Runner>>) -> Fastest {
        Fastest {
            runners,
            chosen: Mutex::new(None),
            timing: Mutex::new(()),
        }
    }
}

impl Runner for Fastest {
    fn run(&self, model: &Model, masks: Option<&MaskSet>) -> Result<Outputs, EvalError> {
        let chosen = |s: &Self| {
            s.chosen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|(k, _)| *k)
        };
        if let Some(k) = chosen(self) {
            return self.runners[k].run(model, masks);
        }
        let _timing = self.timing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = chosen(self) {
            return self.runners[k].run(model, masks);
        }
        // Each engine's first run includes one-off work (plans, thread pools): time the next
        // ones, the fastest of three where a run is short (a thread that happened to sleep
        // must not pick the engine). An engine that fails here (an op one of them cannot run)
        // is left out.
        let mut best: Option<(usize, f64, Outputs)> = None;
        let mut times = Vec::new();
        let mut first_error = None;
        for (k, r) in self.runners.iter().enumerate() {
            let timed = r.run(model, masks).and_then(|out| {
                let mut ms = f64::INFINITY;
                for _ in 0..3 {
                    let t0 = Instant::now();
                    r.run(model, masks)?;
                    let t = t0.elapsed().as_secs_f64() * 1e3;
                    ms = ms.min(t);
                    if t > 20.0 {
                        break;
                    }
                }
                Ok((out, ms))
            });
            let (out, ms) = match timed {
                Ok(x) => x,
                Err(e) => {
                    times.push(format!("{} failed: {e}", r.engine().name));
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            times.push(format!("{} {ms:.2} ms", r.engine().name));
            if best.as_ref().is_none_or(|b| ms < b.1) {
                best = Some((k, ms, out));
            }
        }
        let Some((k, _, out)) = best else {
            return Err(first_error.expect("at least one runner ran"));
        };
        *self.chosen.lock().unwrap_or_else(|e| e.into_inner()) = Some((k, times.join(", ")));
        Ok(out)
    }

    fn engine(&self) -> Engine {
        let chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let (k, times) = chosen.clone().unwrap_or((0, String::new()));
        let mut e = self.runners[k].engine();
        e.trainable = self.runners.iter().any(|r| r.engine().trainable);
        // The last engine is tract where the graph does not train: its reason says why.
        let base = if e.trainable {
            "every operator is in prunescope's trainable graph, so it trains on candle".to_string()
        } else {
            self.runners
                .last()
                .map(|r| r.engine().why)
                .unwrap_or_default()
        };
        e.why = format!(
            "{base}; it is evaluated by {}, the faster engine here ({times})",
            e.name
        );
        e
    }

    fn plan_builds(&self) -> usize {
        self.runners.iter().map(|r| r.plan_builds()).sum()
    }

    fn run_partial(&self, model: &Model, masks: &MaskSet) -> Result<Outputs, EvalError> {
        let chosen = self
            .chosen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(k, _)| *k);
        match chosen {
            Some(k) => self.runners[k].run_partial(model, masks),
            None => self.run(model, Some(masks)),
        }
    }

    fn weight_uses(&self, model: &Model) -> Option<Vec<(String, f64)>> {
        self.runners.iter().find_map(|r| r.weight_uses(model))
    }

    fn detail(&self) -> String {
        let chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        chosen
            .as_ref()
            .map(|(k, _)| self.runners[*k].detail())
            .unwrap_or_default()
    }
}
