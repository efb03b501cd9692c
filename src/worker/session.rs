//! The worker thread's loop and the state it owns.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::protocol::*;
use crate::analysis::{Histogram, all_histograms_with, heatmap, size_report, split_histogram};
use crate::eval::{Evaluator, evaluator_for};
use crate::export::{Recipe, export_masks};
use crate::model::Model;
use crate::progress::{CancelFlag, Progress};
use crate::prune::{
    Allocation, Mask, MaskSet, PruneError, PruneSettings, ScoreIndex, ScoreInputs, allocate,
    build_layer_mask, build_masks, calibrate,
};
use crate::sensitivity::{Sensitivity, SweepSpec};

/// Trained models Undo can step back through.
const UNDO_DEPTH: usize = 8;

/// Samples whose predictions the dataset gallery shows.
pub const GALLERY_SAMPLES: usize = 120;

/// Bins of every weight histogram.
pub const HISTOGRAM_BINS: usize = 128;

type Wake = Arc<dyn Fn() + Send + Sync>;

/// An open model and everything derived from it.
struct Session {
    id: ModelId,
    model: Arc<Model>,
    index: Arc<ScoreIndex>,
    histograms: Vec<Option<Arc<Histogram>>>,
    evaluator: Option<Arc<dyn Evaluator>>,
    cache: Option<Computed>,
    /// SHA-256 of the model (runnable models only).
    hash: Option<String>,
    history: crate::history::History,
    history_dirty: bool,
    /// The user cleared the history: the next save replaces the file instead of merging.
    history_cleared: bool,
    /// Multiplications per weight per sample, for FLOPs.
    uses: Option<Vec<(String, f64)>>,
    sweeps: Arc<Mutex<Sweeps>>,
    latency: Arc<Mutex<LatencyRuns>>,
    /// The graph's dependency groups, or why structured pruning cannot follow it: read once
    /// at open for the table, the layer panel and every structured preview.
    groups: Result<Arc<crate::graph::Groups>, String>,
}

/// Latency measurements of this model (by layer shape, mask, format, batch and device), and
/// the run in progress.
#[derive(Default)]
struct LatencyRuns {
    cache: crate::latency::LatencyCache,
    cancel: Option<CancelFlag>,
}

/// Sensitivity results of this model: by cache key, and the newest one (plans use it).
#[derive(Default)]
struct Sweeps {
    by_key: HashMap<String, Arc<Sensitivity>>,
    current: Option<Arc<Sensitivity>>,
    /// A sweep is running (one at a time).
    running: bool,
    /// Its cancel flag: opening another model or choosing other data stops it.
    cancel: Option<CancelFlag>,
    /// Bumped when the data changes: a sweep started before reports nothing after.
    generation: u64,
}

/// Metrics for one set of settings and the gallery's predictions under them.
type MetricsResult = (
    Result<crate::eval::Metrics, String>,
    Option<Arc<crate::eval::Predictions>>,
);

/// Results for one set of settings, filled in as the preview pipeline gets to them.
struct Computed {
    settings: PruneSettings,
    alloc: Allocation,
    layer_masks: Vec<Option<Arc<Mask>>>,
    all_masks: Option<Arc<MaskSet>>,
    detail_sent: Option<usize>,
    heatmap_sent: Option<HeatmapRequest>,
    sizes: crate::analysis::SizeReport,
    compute_us: f64,
    metrics: Option<MetricsResult>,
}

/// A training run's result, before it becomes the open model.
struct Trained {
    /// What the figures were measured on (the training split's test part).
    data: String,
    /// Every trained tensor by name.
    tensors: crate::train::NamedTensors,
    /// (pruned weights, prunable weights) of the result.
    zeros: (u64, u64),
    derived: Derived,
    message: String,
    /// The settings it was pruned by, and its test figures, for the history.
    settings: PruneSettings,
    metrics: crate::eval::Metrics,
    source: String,
}

/// A fine-tune's result as the model it becomes: `(before, after)` test figures,
/// `(epochs, samples/s, cancelled)`, and a note on the engine for the message.
fn finetuned(
    split: &crate::data::Split,
    settings: PruneSettings,
    zeros: (u64, u64),
    (before, after): (&crate::eval::Metrics, crate::eval::Metrics),
    (epochs, samples_per_s, cancelled): (usize, f64, bool),
    tensors: crate::train::NamedTensors,
    engine: &str,
) -> Trained {
    let pct = |m: &crate::eval::Metrics| m.accuracy.unwrap_or(f64::NAN) * 100.0;
    let message = format!(
        "{}: accuracy {:.2}% → {:.2}% in {epochs} epochs ({samples_per_s:.0} samples/s{engine})",
        if cancelled {
            "Cancelled, best epoch kept"
        } else {
            "Fine-tuned"
        },
        pct(before),
        pct(&after),
    );
    Trained {
        data: format!("{}, {} samples", split.test.name, split.test.len()),
        source: format!("fine-tune, {epochs} epochs"),
        metrics: after,
        settings,
        tensors,
        zeros,
        derived: Derived {
            what: "fine-tuned".into(),
            settings: None,
        },
        message,
    }
}

/// How a model the worker made came to be, and the settings the UI should take with it.
struct Derived {
    what: String,
    settings: Option<PruneSettings>,
}

struct Worker {
    /// Models replaced by a fine-tune, newest last: Undo reinstalls them.
    undo: Vec<Arc<Model>>,
    rx: Receiver<Command>,
    tx: Sender<Event>,
    wake: Wake,
    ids: Arc<AtomicU64>,
    jobs: super::Jobs,
    pending: VecDeque<Command>,
    session: Option<Session>,
    shutting_down: bool,
}

pub(super) fn run(
    rx: Receiver<Command>,
    tx: Sender<Event>,
    wake: Wake,
    ids: Arc<AtomicU64>,
    jobs: super::Jobs,
) {
    let mut w = Worker {
        undo: Vec::new(),
        rx,
        tx,
        wake,
        ids,
        jobs,
        pending: VecDeque::new(),
        session: None,
        shutting_down: false,
    };
    while !w.shutting_down {
        if w.pending.is_empty() {
            w.poll();
        }
        if w.pending.is_empty() {
            // Idle: the moment to write what the history gained.
            w.save_history();
            match w.rx.recv() {
                Ok(c) => w.pending.push_back(c),
                Err(_) => break,
            }
        }
        w.poll();
        let Some(cmd) = w.pending.pop_front() else {
            continue;
        };
        if matches!(cmd, Command::Preview(_)) && w.newer_preview_queued() {
            continue;
        }
        w.handle(cmd);
    }
}

impl Worker {
    /// Moves everything waiting in the channel into `pending`.
    fn poll(&mut self) {
        while let Ok(c) = self.rx.try_recv() {
            self.pending.push_back(c);
        }
    }

    fn newer_preview_queued(&mut self) -> bool {
        self.poll();
        self.pending
            .iter()
            .any(|c| matches!(c, Command::Preview(_)))
    }

    fn emit(&self, e: Event) {
        if self.tx.send(e).is_ok() {
            (self.wake)();
        }
    }

    fn handle(&mut self, cmd: Command) {
        let job = match &cmd {
            Command::Open { job, .. }
            | Command::Export { job, .. }
            | Command::SetData { job, .. }
            | Command::Sensitivity { job, .. }
            | Command::Compare { job, .. }
            | Command::Train { job, .. }
            | Command::Latency { job, .. }
            | Command::CompareCriteria { job, .. }
            | Command::SparseGpt { job, .. }
            | Command::OwlPlan { job, .. }
            | Command::PanicForTest { job } => Some(*job),
            Command::Preview(_)
            | Command::Plan { .. }
            | Command::ClearHistory { .. }
            | Command::Undo { .. }
            | Command::Shutdown => None,
        };
        let result = catch_unwind(AssertUnwindSafe(|| self.dispatch(cmd)));
        if let Err(panic) = result {
            let error = internal_error(panic.as_ref());
            match job {
                Some(job) => self.emit(Event::JobFailed { job, error }),
                None => self.emit(Event::PreviewError {
                    generation: 0,
                    error,
                }),
            }
            // Derived results may be half-built; recompute them from scratch next time.
            if let Some(s) = self.session.as_mut() {
                s.cache = None;
            }
        }
    }

    fn dispatch(&mut self, cmd: Command) {
        match cmd {
            Command::Open {
                job,
                cancel,
                source,
            } => self.open(job, cancel, source),
            Command::Preview(req) => self.preview(*req),
            Command::Export {
                job,
                cancel,
                request,
            } => self.export(job, cancel, request),
            Command::SetData { job, source, .. } => self.set_data(job, source),
            Command::Sensitivity {
                job,
                cancel,
                spec,
                settings,
                fresh,
            } => self.sensitivity(job, cancel, spec, settings, fresh),
            Command::Plan {
                generation,
                model,
                settings,
            } => self.plan(generation, model, settings),
            Command::Compare {
                job,
                cancel,
                settings,
            } => self.compare(job, cancel, settings),
            Command::Train {
                job,
                cancel,
                request,
            } => self.train(job, cancel, request),
            Command::Undo { model } => self.undo(model),
            Command::Latency {
                job,
                cancel,
                settings,
                spec,
            } => self.latency(job, cancel, settings, spec),
            Command::CompareCriteria {
                job,
                cancel,
                settings,
                other,
            } => self.compare_criteria(job, cancel, settings, other),
            Command::SparseGpt {
                job,
                cancel,
                settings,
            } => self.sparsegpt(job, cancel, settings),
            Command::OwlPlan {
                job,
                cancel,
                settings,
            } => self.owl_plan(job, cancel, settings),
            Command::ClearHistory { model } => {
                if let Some(s) = self.session.as_mut().filter(|s| s.id == model) {
                    s.history.records.clear();
                    s.history_dirty = true;
                    s.history_cleared = true;
                }
            }
            Command::PanicForTest { job } => {
                self.emit(Event::JobStarted {
                    job,
                    label: "Panic test".into(),
                });
                panic!("deliberate panic for testing");
            }
            Command::Shutdown => {
                self.save_history();
                self.shutting_down = true
            }
        }
    }

    /// Makes the session's score index fit the settings' criterion (and seed, for seeded
    /// criteria), rebuilding it as a visible job when it does not.
    fn ensure_index(&mut self, s: &PruneSettings) -> Result<Arc<ScoreIndex>, String> {
        let session = self.session.as_ref().ok_or("no model is open")?;
        if s.criterion.updates_weights() {
            return Err(format!(
                "{} changes the kept weights, so it is not a criterion the sliders can move \
                 over: use Run SparseGPT",
                s.criterion.label()
            ));
        }
        // Data-driven criteria calibrate on the evaluation data in use.
        let data = session.evaluator.as_ref().and_then(|e| e.shared_data());
        let inputs = score_inputs(session.evaluator.as_deref(), data.as_deref(), s);
        if index_fits(&session.index, s, &inputs) {
            return Ok(session.index.clone());
        }
        let job = self.ids.fetch_add(1, Ordering::Relaxed);
        // Registered before anyone hears of the job, so a Cancel right away finds its flag.
        let cancel = CancelFlag::new();
        super::register(&self.jobs, job, cancel.clone());
        self.emit(Event::JobStarted {
            job,
            label: format!("Scoring with {}", s.criterion.label()),
        });
        let progress = self.progress_for(job, cancel);
        let model = session.model.clone();
        match ScoreIndex::build(&model, s.criterion, s.seed, &inputs, &progress) {
            Ok(i) => {
                let session = self.session.as_mut().expect("checked above");
                session.index = Arc::new(i);
                session.cache = None;
                let index = session.index.clone();
                self.emit(Event::JobFinished {
                    job,
                    message: "Scores ready".into(),
                });
                Ok(index)
            }
            Err(PruneError::Cancelled) => {
                self.emit(Event::JobCancelled { job });
                Err(format!(
                    "scoring with {} was cancelled: the masks shown are from before",
                    s.criterion.label()
                ))
            }
            Err(e) => {
                self.emit(Event::JobFailed {
                    job,
                    error: e.to_string(),
                });
                Err(e.to_string())
            }
        }
    }

    /// Starts a sensitivity sweep on its own thread (the preview pipeline keeps answering),
    /// or answers from the cache.
    fn sensitivity(
        &mut self,
        job: JobId,
        cancel: CancelFlag,
        spec: SweepSpec,
        settings: PruneSettings,
        fresh: bool,
    ) {
        self.emit(Event::JobStarted {
            job,
            label: "Sensitivity".into(),
        });
        let fail = |w: &Self, error: String| w.emit(Event::JobFailed { job, error });
        let Some(s) = self.session.as_ref() else {
            return fail(self, "no model is open".into());
        };
        let Some(evaluator) = s.evaluator.clone() else {
            let why = self
                .session
                .as_ref()
                .map(|_| "no graph to run, or no data that fits it")
                .unwrap_or_default();
            return fail(
                self,
                crate::sensitivity::SensitivityError::NoData(why.into()).to_string(),
            );
        };
        if let Err(e) = settings.validate(&s.model) {
            return fail(self, e.to_string());
        }
        let groups = crate::sensitivity::groups(&s.model, &settings);
        if groups.is_empty() {
            return fail(self, "no prunable tensors to sweep".into());
        }
        // The file's hash was taken when it opened; only the sidecar and data files are read.
        let model_key = s
            .hash
            .as_deref()
            .and_then(|h| crate::sensitivity::model_key(&s.model, h));
        let key = crate::sensitivity::cache_key(
            model_key.as_deref().unwrap_or(""),
            &crate::sensitivity::sweep_data_key(evaluator.as_ref()),
            &spec,
            &groups,
        );
        let (model_id, model, sweeps) = (s.id, s.model.clone(), s.sweeps.clone());
        let resume = {
            let mut sw = sweeps.lock().unwrap_or_else(|e| e.into_inner());
            if sw.running {
                drop(sw);
                return fail(self, "a sensitivity sweep is already running".into());
            }
            let known = sw.by_key.get(&key).cloned().or_else(|| {
                (!fresh && model_key.is_some())
                    .then(|| crate::sensitivity::load_cached(&key).map(Arc::new))
                    .flatten()
            });
            match known {
                Some(k) if k.complete && !fresh => {
                    let mut k = (*k).clone();
                    k.cached = true;
                    let k = Arc::new(k);
                    sw.by_key.insert(key.clone(), k.clone());
                    sw.current = Some(k.clone());
                    drop(sw);
                    self.emit(Event::Sensitivity {
                        model: model_id,
                        result: k,
                    });
                    return self.emit(Event::JobFinished {
                        job,
                        message: "Sensitivity from the cache".into(),
                    });
                }
                Some(k) if !k.complete && !fresh => Some(k),
                _ => None,
            }
        };
        let index = match self.ensure_index(&PruneSettings {
            criterion: spec.criterion,
            seed: spec.seed,
            calibration: spec.calibration,
            ..Default::default()
        }) {
            Ok(i) => i,
            Err(e) => return fail(self, e),
        };
        let sweep_generation = {
            let mut sw = sweeps.lock().unwrap_or_else(|e| e.into_inner());
            sw.running = true;
            sw.cancel = Some(cancel.clone());
            sw.generation
        };
        let tx = self.tx.clone();
        let wake = self.wake.clone();
        let progress = self.progress_for(job, cancel.clone());
        let store = model_key.is_some();
        let thread_sweeps = sweeps.clone();
        let spawned = std::thread::Builder::new()
            .name("prunescope-sweep".into())
            .spawn(move || {
                let emit = |e: Event| {
                    if tx.send(e).is_ok() {
                        wake();
                    }
                };
                let mut last = Instant::now();
                let still_current = |sweeps: &Mutex<Sweeps>| {
                    sweeps.lock().unwrap_or_else(|e| e.into_inner()).generation == sweep_generation
                };
                let run = catch_unwind(AssertUnwindSafe(|| {
                    crate::sensitivity::sweep(
                        &model,
                        &index,
                        evaluator.as_ref(),
                        &spec,
                        groups,
                        resume.as_deref(),
                        &progress,
                        |so_far| {
                            // Enough updates for a chart that fills smoothly, not one per point.
                            if last.elapsed().as_millis() >= 50 && still_current(&thread_sweeps) {
                                last = Instant::now();
                                emit(Event::Sensitivity {
                                    model: model_id,
                                    result: Arc::new(so_far.clone()),
                                });
                            }
                        },
                    )
                }));
                let mut sw = thread_sweeps.lock().unwrap_or_else(|e| e.into_inner());
                sw.running = false;
                let result = match run {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(p) => Err(internal_error(p.as_ref())),
                };
                let current = sw.generation == sweep_generation;
                match result {
                    Ok(r) => {
                        let r = Arc::new(r);
                        sw.by_key.insert(key.clone(), r.clone());
                        // Only finished curves on the data now chosen plan anything.
                        if r.complete && current {
                            sw.current = Some(r.clone());
                        }
                        drop(sw);
                        let mut message = format!(
                            "Sensitivity: {} evaluations in {:.0} ms",
                            r.evaluations, r.sweep_ms
                        );
                        if r.complete
                            && store
                            && let Err(e) = crate::sensitivity::store_cached(&key, &r)
                        {
                            message.push_str(&format!(" (not cached: {e})"));
                        }
                        let complete = r.complete;
                        if current {
                            emit(Event::Sensitivity {
                                model: model_id,
                                result: r,
                            });
                        }
                        emit(if complete {
                            Event::JobFinished { job, message }
                        } else {
                            Event::JobCancelled { job }
                        });
                    }
                    Err(error) => {
                        drop(sw);
                        emit(Event::JobFailed { job, error });
                    }
                }
            });
        if spawned.is_err() {
            sweeps.lock().unwrap_or_else(|e| e.into_inner()).running = false;
            fail(self, "could not start a thread for the sweep".into());
        }
    }

    /// Starts job `job` as `label` and returns the open model with its calibration samples, or
    /// fails the job saying that `what` needs them.
    fn start_calibrated(
        &self,
        job: JobId,
        label: &str,
        what: &str,
    ) -> Option<(&Session, Arc<crate::data::EvalData>)> {
        self.emit(Event::JobStarted {
            job,
            label: label.into(),
        });
        let error = match self.session.as_ref() {
            None => "no model is open".to_string(),
            Some(s) => match s.evaluator.as_ref().and_then(|e| e.shared_data()) {
                Some(data) => return Some((s, data)),
                None => format!(
                    "{what} on calibration data: choose evaluation data for a model prunescope \
                     can run"
                ),
            },
        };
        self.emit(Event::JobFailed { job, error });
        None
    }

    fn owl_plan(&mut self, job: JobId, cancel: CancelFlag, settings: PruneSettings) {
        let fail = |w: &Self, error: String| w.emit(Event::JobFailed { job, error });
        let Some((s, data)) = self.start_calibrated(job, "OWL plan", "OWL counts outliers") else {
            return;
        };
        let progress = self.progress_for(job, cancel);
        match crate::prune::owl::plan(
            &s.model,
            &settings,
            &data,
            settings.calibration,
            crate::prune::owl::DEFAULT_M,
            crate::prune::owl::DEFAULT_LAMBDA,
            &progress,
        ) {
            Ok(planned) => {
                self.emit(Event::OwlPlanned {
                    model: s.id,
                    settings: planned,
                });
                self.emit(Event::JobFinished {
                    job,
                    message: "OWL targets set layer by layer".into(),
                });
            }
            Err(PruneError::Cancelled) => self.emit(Event::JobCancelled { job }),
            Err(e) => fail(self, e.to_string()),
        }
    }

    fn sparsegpt(&mut self, job: JobId, cancel: CancelFlag, mut settings: PruneSettings) {
        let fail = |w: &Self, error: String| w.emit(Event::JobFailed { job, error });
        let Some((s, data)) = self.start_calibrated(job, "SparseGPT", "SparseGPT calibrates")
        else {
            return;
        };
        settings.criterion = crate::prune::Criterion::SparseGpt;
        let progress = self.progress_for(job, cancel.clone());
        let model = s.model.clone();
        let inputs = score_inputs(None, Some(&data), &settings);
        let before = s
            .evaluator
            .as_ref()
            .map(|e| e.evaluate(&model, &MaskSet::new()));
        let p = match crate::prune::prune(&model, &settings, &inputs, &progress) {
            Ok(p) => p,
            Err(PruneError::Cancelled) => return self.emit(Event::JobCancelled { job }),
            Err(e) => return fail(self, e.to_string()),
        };
        let u = p.updated.expect("SparseGPT updates weights");
        let (err, mag): (f64, f64) = u
            .layers
            .iter()
            .fold((0.0, 0.0), |(a, b), l| (a + l.error, b + l.magnitude_error));
        let name: &'static str = Box::leak(
            format!(
                "{} (SparseGPT {:.0}%)",
                base_name(&model.display_name()),
                p.alloc.sparsity() * 100.0
            )
            .into_boxed_str(),
        );
        let m = if model.format == crate::model::ModelFormat::Onnx {
            // The same ONNX file with the updated initializers: it still runs through tract and
            // exports as ONNX.
            match u.onnx_bytes(&model).and_then(|b| {
                Model::from_bytes(name, crate::model::ModelFormat::Onnx, b)
                    .map_err(|e| crate::export::ExportError::Unsupported(e.to_string()))
            }) {
                Ok(m) => m,
                Err(e) => return fail(self, e.to_string()),
            }
        } else {
            let mut m = u.model;
            m.source = crate::model::ModelSource::Builtin(name);
            // In memory the model has no path: a sidecar architecture travels inside.
            if let Ok(Some(arch)) = crate::eval::arch_json(&model) {
                m.metadata
                    .insert(crate::eval::ARCH_METADATA_KEY.into(), arch);
            }
            m
        };
        let message = format!(
            "SparseGPT pruned {:.1}% of the prunable weights; output error on the calibration \
             samples {:.0}% below magnitude's at the same sparsity{}",
            p.alloc.sparsity() * 100.0,
            100.0 * (1.0 - err / mag.max(f64::MIN_POSITIVE)),
            match before {
                Some(Ok(b)) if b.accuracy.is_some() => format!(
                    " (dense accuracy was {:.2}%)",
                    b.accuracy.unwrap_or(0.0) * 100.0
                ),
                _ => String::new(),
            }
        );
        // The result's zeros are its cut: magnitude at the same targets shows exactly them.
        let mut adopt = settings.clone();
        adopt.criterion = crate::prune::Criterion::Magnitude;
        let derived = Derived {
            what: "SparseGPT".into(),
            settings: Some(adopt),
        };
        self.undo.push(model);
        if self.undo.len() > UNDO_DEPTH {
            self.undo.remove(0);
        }
        if self.install(
            job,
            Arc::new(m),
            &Progress::none(),
            Instant::now(),
            Some(derived),
        ) {
            self.emit(Event::JobFinished { job, message });
        } else {
            self.undo.pop();
        }
    }

    fn compare_criteria(
        &mut self,
        job: JobId,
        cancel: CancelFlag,
        settings: PruneSettings,
        other: crate::prune::Criterion,
    ) {
        self.emit(Event::JobStarted {
            job,
            label: "Comparing criteria".into(),
        });
        let Some(s) = self.session.as_ref() else {
            return self.emit(Event::JobFailed {
                job,
                error: "no model is open".into(),
            });
        };
        let progress = self.progress_for(job, cancel.clone());
        let mut other_settings = settings.clone();
        other_settings.criterion = other;
        let both = masks_for(s, &settings, &progress)
            .and_then(|(_, a)| Ok((a, masks_for(s, &other_settings, &progress)?.1)));
        let (a, b) = match both {
            Ok(x) => x,
            Err(_) if cancel.is_cancelled() => return self.emit(Event::JobCancelled { job }),
            Err(e) => {
                return self.emit(Event::JobFailed {
                    job,
                    error: format!("{e:#}"),
                });
            }
        };
        let overlap = crate::analysis::mask_overlap(&s.model, &a, &b);
        let measure = |m: &MaskSet| {
            s.evaluator
                .as_ref()
                .map(|e| e.evaluate(&s.model, m).map_err(|e| e.to_string()))
        };
        let metrics = [measure(&a), measure(&b)];
        let result = crate::worker::CriteriaComparison {
            criteria: [settings.criterion, other],
            settings,
            masks: [Arc::new(a), Arc::new(b)],
            overlap,
            metrics,
        };
        self.emit(Event::CriteriaCompared {
            model: s.id,
            result: Arc::new(result),
        });
        self.emit(Event::JobFinished {
            job,
            message: "Criteria compared".into(),
        });
    }

    fn latency(
        &mut self,
        job: JobId,
        cancel: CancelFlag,
        settings: PruneSettings,
        spec: crate::latency::LatencySpec,
    ) {
        self.emit(Event::JobStarted {
            job,
            label: "Latency".into(),
        });
        let fail = |w: &Self, error: String| w.emit(Event::JobFailed { job, error });
        let Some(s) = self.session.as_ref() else {
            return fail(self, "no model is open".into());
        };
        let progress = self.progress_for(job, cancel.clone());
        let masks = match masks_for(s, &settings, &progress) {
            Ok((_, m)) => m,
            Err(_) if cancel.is_cancelled() => return self.emit(Event::JobCancelled { job }),
            Err(e) => return fail(self, format!("{e:#}")),
        };
        if crate::latency::layers(&s.model, &settings).is_empty() {
            return fail(self, "no prunable matrices to measure".into());
        }
        let (model_id, model, runs) = (s.id, s.model.clone(), s.latency.clone());
        {
            let mut r = runs.lock().unwrap_or_else(|e| e.into_inner());
            if r.cancel.is_some() {
                drop(r);
                return fail(self, "a latency run is already going".into());
            }
            r.cancel = Some(cancel.clone());
        }
        let tx = self.tx.clone();
        let wake = self.wake.clone();
        let thread_runs = runs.clone();
        // Its own thread: sliders stay live meanwhile (their work perturbs the timings a
        // little, as any other load on the machine would).
        let spawned = std::thread::Builder::new()
            .name("prunescope-latency".into())
            .spawn(move || {
                let emit = |e: Event| {
                    if tx.send(e).is_ok() {
                        wake();
                    }
                };
                let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<bool, String> {
                    // The GPU device is made here, never on the UI thread.
                    let engine = crate::latency::Engine::for_device(spec.device)?;
                    // Measurements already made are answered from the cache, which is held
                    // only between layers so the UI never waits on it.
                    let mut cache = std::mem::take(
                        &mut thread_runs.lock().unwrap_or_else(|e| e.into_inner()).cache,
                    );
                    let mut last = Instant::now();
                    let report = crate::latency::run(
                        &model,
                        &masks,
                        &settings,
                        &spec,
                        &engine,
                        &mut cache,
                        &progress,
                        |so_far| {
                            if last.elapsed().as_millis() >= 50 {
                                last = Instant::now();
                                emit(Event::Latency {
                                    model: model_id,
                                    report: Arc::new(so_far.clone()),
                                    sizes: None,
                                });
                            }
                        },
                    );
                    thread_runs.lock().unwrap_or_else(|e| e.into_inner()).cache = cache;
                    let sizes = if report.complete {
                        crate::analysis::storage_sizes(
                            &model,
                            &masks,
                            settings.pattern,
                            spec.block,
                            &progress,
                        )
                        .ok()
                        .map(Arc::new)
                    } else {
                        None
                    };
                    let complete = report.complete && sizes.is_some();
                    emit(Event::Latency {
                        model: model_id,
                        report: Arc::new(report),
                        sizes,
                    });
                    Ok(complete)
                }));
                thread_runs.lock().unwrap_or_else(|e| e.into_inner()).cancel = None;
                match outcome {
                    Ok(Ok(true)) => emit(Event::JobFinished {
                        job,
                        message: "Latency measured".into(),
                    }),
                    Ok(Ok(false)) => emit(Event::JobCancelled { job }),
                    Ok(Err(error)) => emit(Event::JobFailed { job, error }),
                    Err(p) => emit(Event::JobFailed {
                        job,
                        error: internal_error(p.as_ref()),
                    }),
                }
            });
        if spawned.is_err() {
            runs.lock().unwrap_or_else(|e| e.into_inner()).cancel = None;
            fail(self, "could not start a thread for the latency run".into());
        }
    }

    fn plan(&mut self, generation: u64, model: ModelId, settings: PruneSettings) {
        let Some(s) = self.session.as_ref().filter(|s| s.id == model) else {
            return;
        };
        let result = match curves_for(s, &settings) {
            Err(e) => Err(e),
            Ok(sens) => match self.ensure_index(&settings) {
                Err(e) => Err(e),
                Ok(index) => {
                    let s = self.session.as_ref().expect("checked above");
                    crate::sensitivity::plan(&s.model, &index, &settings, &sens, settings.rule)
                        .map(Arc::new)
                        .map_err(|e| e.to_string())
                }
            },
        };
        self.emit(Event::Plan {
            generation,
            model,
            result,
        });
    }

    /// Every rule's plan at the settings' target, each measured on the evaluation data.
    fn compare(&mut self, job: JobId, cancel: CancelFlag, settings: PruneSettings) {
        self.emit(Event::JobStarted {
            job,
            label: "Comparing rules".into(),
        });
        let fail = |w: &Self, error: String| w.emit(Event::JobFailed { job, error });
        let index = match self.ensure_index(&settings) {
            Ok(i) => i,
            Err(e) => return fail(self, e),
        };
        let Some(s) = self.session.as_ref() else {
            return fail(self, "no model is open".into());
        };
        let sens = match curves_for(s, &settings) {
            Ok(c) => c,
            Err(e) => return fail(self, e),
        };
        let (model, evaluator, id) = (s.model.clone(), s.evaluator.clone(), s.id);
        let progress = self.progress_for(job, cancel.clone());
        let plans = crate::sensitivity::compare_rules(&model, &index, &settings, &sens);
        let total = plans.len();
        let mut rows = Vec::new();
        for (i, p) in plans.into_iter().enumerate() {
            if cancel.is_cancelled() {
                return self.emit(Event::JobCancelled { job });
            }
            progress.report(i as f32 / total as f32, "measuring");
            let row = match p {
                Err(e) => CompareRow {
                    plan: Err(e.to_string()),
                    settings: None,
                    measured: None,
                    nonzeros: 0,
                },
                Ok(plan) => {
                    let mut st = settings.clone();
                    plan.apply(&mut st);
                    let alloc = allocate(&model, &index, &st);
                    let measured = evaluator.as_ref().map(|e| {
                        build_masks(&model, &index, &st, &alloc, &Progress::none())
                            .map_err(|e| e.to_string())
                            .and_then(|m| e.evaluate(&model, &m).map_err(|e| e.to_string()))
                    });
                    if let (Some(Ok(m)), Some(e)) = (&measured, &evaluator) {
                        let csr =
                            crate::analysis::size_report(&model, &alloc, st.pattern).csr_bytes;
                        self.record(&st, &alloc, csr, m, &e.describe());
                    }
                    CompareRow {
                        plan: Ok(plan),
                        settings: Some(st),
                        measured,
                        nonzeros: model.total_params() - alloc.pruned,
                    }
                }
            };
            rows.push(row);
        }
        self.emit(Event::Comparison {
            model: id,
            rows: Arc::new(rows),
        });
        self.emit(Event::JobFinished {
            job,
            message: "Rules compared".into(),
        });
    }

    /// Runs a training job on the worker thread (MLPs train in milliseconds to seconds),
    /// streaming its progress; a fine-tune or schedule's result becomes the open model.
    fn train(&mut self, job: JobId, cancel: CancelFlag, request: TrainRequest) {
        use crate::train::{Net, lottery, training_split};
        let label = match &request {
            TrainRequest::Finetune { .. } => "Fine-tuning",
            TrainRequest::Schedule { .. } => "Pruning on a schedule",
            TrainRequest::Lottery { .. } => "Lottery tickets",
        };
        self.emit(Event::JobStarted {
            job,
            label: label.into(),
        });
        let fail = |w: &Self, error: String| w.emit(Event::JobFailed { job, error });
        let Some(s) = self.session.as_ref() else {
            return fail(self, "no model is open".into());
        };
        let (id, model) = (s.id, s.model.clone());
        let onnx = model.format == crate::model::ModelFormat::Onnx;
        let trainable = match crate::train::Trainable::of(&model) {
            Ok(t) => t,
            Err(e) => return fail(self, e.to_string()),
        };
        let arch_text = trainable.to_json();
        let dataset = trainable.dataset().to_string();
        let progress = self.progress_for(job, cancel.clone());
        let tx = self.tx.clone();
        let wake = self.wake.clone();
        let send = move |update: TrainUpdate| {
            if tx.send(Event::Training { model: id, update }).is_ok() {
                wake();
            }
        };
        let t0 = Instant::now();
        let data_desc = s.evaluator.as_ref().map(|e| e.describe());
        let outcome: Result<Option<Trained>, crate::train::TrainError> = (|| {
            match request {
                TrainRequest::Finetune {
                    settings,
                    config,
                    device,
                } => {
                    let index = self
                        .ensure_index(&settings)
                        .map_err(crate::train::TrainError::Compute)?;
                    settings
                        .validate(&model)
                        .map_err(|e| crate::train::TrainError::Compute(e.to_string()))?;
                    let alloc = allocate(&model, &index, &settings);
                    let masks = build_masks(&model, &index, &settings, &alloc, &progress)
                        .map_err(|e| crate::train::TrainError::Compute(e.to_string()))?;
                    let split =
                        training_split(&dataset, &crate::eval::DataSource::Default, config.seed)?;
                    let zeros = (
                        mask_pruned(&masks),
                        masks.iter().map(|(_, m)| m.len() as u64).sum::<u64>(),
                    );
                    let arch = match &trainable {
                        crate::train::Trainable::Mlp(arch) => arch,
                        crate::train::Trainable::Graph(graph) => {
                            let dev = device.candle()?.unwrap_or(candle_core::Device::Cpu);
                            send(TrainUpdate::Started {
                                kind: "finetune",
                                start: f64::NAN,
                            });
                            let r = crate::train::finetune_graph(
                                &model,
                                graph,
                                &masks,
                                &split,
                                &config,
                                &dev,
                                &progress,
                                |e| send(TrainUpdate::Epoch(e.clone())),
                            )?;
                            return Ok(Some(finetuned(
                                &split,
                                settings,
                                zeros,
                                (&r.before, r.after),
                                (r.epochs.len(), r.samples_per_s, r.cancelled),
                                r.tensors,
                                ", candle",
                            )));
                        }
                    };
                    let net = Net::from_model(&model, arch, &masks)?;
                    let teacher = Net::teacher_for(&model, arch, &config)?;
                    send(TrainUpdate::Started {
                        kind: "finetune",
                        start: net.metrics(&split.test)?.accuracy.unwrap_or(f64::NAN),
                    });
                    let r = crate::train::finetune_where(
                        device.candle()?.as_ref(),
                        net,
                        teacher.as_ref(),
                        &split.train,
                        &split.test,
                        &config,
                        &progress,
                        |e, _| send(TrainUpdate::Epoch(e.clone())),
                    )?;
                    Ok(Some(finetuned(
                        &split,
                        settings,
                        zeros,
                        (&r.before, r.after),
                        (r.epochs.len(), r.samples_per_s, r.cancelled),
                        r.net.tensors(),
                        "",
                    )))
                }
                TrainRequest::Schedule {
                    target,
                    schedule,
                    config,
                } => {
                    let split =
                        training_split(&dataset, &crate::eval::DataSource::Default, config.seed)?;
                    let net = trainable.trainee(&model, &MaskSet::new())?;
                    let (tensors, masks, metrics, sparsity) =
                        scheduled(net, target, schedule, &split, &config, &progress, &send)?;
                    // The result is pruned layer by layer to the target: so are the settings
                    // it comes with, which select exactly its zeros.
                    let mut settings = PruneSettings {
                        scope: crate::prune::Scope::Layer,
                        ..Default::default()
                    };
                    let prunable: u64 = masks.iter().map(|(_, m)| m.len() as u64).sum();
                    let pruned: u64 = masks
                        .iter()
                        .map(|(_, m)| m.iter().filter(|k| !**k).count() as u64)
                        .sum();
                    for (name, _) in &masks {
                        settings.layer_mut(name).sparsity = target;
                    }
                    let msg = format!(
                        "Schedule done: {:.2}% sparse, accuracy {:.2}%",
                        sparsity * 100.0,
                        metrics.accuracy.unwrap_or(f64::NAN) * 100.0
                    );
                    Ok(Some(Trained {
                        data: format!("{}, {} samples", split.test.name, split.test.len()),
                        source: match schedule {
                            crate::train::Schedule::OneShot => "schedule: one-shot".into(),
                            crate::train::Schedule::Iterative { rounds, .. } => {
                                format!("schedule: iterative, {rounds} rounds")
                            }
                            crate::train::Schedule::Agp { movement, .. } => if movement {
                                "schedule: AGP by movement"
                            } else {
                                "schedule: AGP"
                            }
                            .into(),
                        },
                        metrics,
                        settings: settings.clone(),
                        tensors,
                        zeros: (pruned, prunable),
                        derived: Derived {
                            what: "pruned on a schedule".into(),
                            settings: Some(settings),
                        },
                        message: msg,
                    }))
                }
                TrainRequest::Lottery {
                    levels,
                    rate,
                    rewind,
                    config,
                } => {
                    let init = crate::sample::init_weights_for(&model).ok_or_else(|| {
                        crate::train::TrainError::Compute(
                            "no initial weights: the lottery rewinds to them (the samples keep \
                             theirs; `prunescope lottery --init` takes any file)"
                                .into(),
                        )
                    })?;
                    let split =
                        training_split(&dataset, &crate::eval::DataSource::Default, config.seed)?;
                    send(TrainUpdate::Started {
                        kind: "lottery",
                        start: f64::NAN,
                    });
                    let on_level =
                        |l: &crate::train::LotteryLevel| send(TrainUpdate::Level(l.clone()));
                    let init = trainable.trainee(&init, &MaskSet::new())?;
                    let dense = lottery(
                        &init, &split, &config, levels, rate, rewind, &progress, on_level,
                    )?
                    .dense;
                    send(TrainUpdate::LotteryDense(dense));
                    Ok(None)
                }
            }
        })();
        match outcome {
            Ok(None) => {
                send(TrainUpdate::Done("Lottery finished".into()));
                self.emit(Event::JobFinished {
                    job,
                    message: "Lottery finished".into(),
                });
            }
            Ok(Some(Trained {
                data,
                tensors: trained_tensors,
                zeros,
                derived,
                message,
                settings,
                metrics,
                source,
            })) => {
                // The run enters the history of the model it started from, beside the
                // configurations measured without training.
                if let (Some(_), Some(s)) = (data_desc, self.session.as_mut())
                    && let Some(hash) = s.hash.clone()
                {
                    let record = crate::history::Record::measured(
                        &source, &model, &hash, &settings, zeros, 0, &metrics, &data, None,
                    );
                    s.history.push(record);
                    s.history_dirty = true;
                    // Written now: the open model is about to change.
                    self.save_history();
                }
                let mut tensors = Vec::new();
                for (t, e) in model.tensors.iter().enumerate() {
                    let trained = trained_tensors
                        .iter()
                        .find(|(n, _, _)| *n == e.name)
                        .cloned();
                    tensors.push(match trained {
                        Some(x) => x,
                        None => (e.name.clone(), e.shape.clone(), model.to_f32_vec(t)),
                    });
                }
                let name: &'static str = Box::leak(
                    format!("{} ({})", base_name(&model.display_name()), derived.what)
                        .into_boxed_str(),
                );
                let m = if onnx {
                    // The same ONNX file with the trained values in its initializers: it still
                    // evaluates through tract and exports as ONNX.
                    let bytes = match crate::export::patch_onnx(&model, &trained_tensors) {
                        Ok(b) => b,
                        Err(e) => return fail(self, e.to_string()),
                    };
                    match Model::from_bytes(name, crate::model::ModelFormat::Onnx, bytes) {
                        Ok(m) => m,
                        Err(e) => return fail(self, e.to_string()),
                    }
                } else {
                    let mut m = Model::from_f32_tensors(name, tensors);
                    m.metadata = model.metadata.clone();
                    // In memory the model has no path: a sidecar architecture travels inside.
                    m.metadata
                        .insert(crate::eval::ARCH_METADATA_KEY.into(), arch_text.clone());
                    m
                };
                self.undo.push(model);
                if self.undo.len() > UNDO_DEPTH {
                    self.undo.remove(0);
                }
                send(TrainUpdate::Done(message.clone()));
                if self.install(job, Arc::new(m), &Progress::none(), t0, Some(derived)) {
                    self.emit(Event::JobFinished { job, message });
                } else {
                    // The trained model did not take: the open one stays, and so does its undo.
                    self.undo.pop();
                }
            }
            Err(crate::train::TrainError::Cancelled) => self.emit(Event::JobCancelled { job }),
            Err(e) => fail(self, e.to_string()),
        }
    }

    fn undo(&mut self, model: ModelId) {
        if self.session.as_ref().is_none_or(|s| s.id != model) {
            return;
        }
        let Some(previous) = self.undo.pop() else {
            return;
        };
        let job = self.ids.fetch_add(1, Ordering::Relaxed);
        self.emit(Event::JobStarted {
            job,
            label: "Undo".into(),
        });
        let derived = Derived {
            what: "restored".into(),
            settings: None,
        };
        if self.install(
            job,
            previous,
            &Progress::none(),
            Instant::now(),
            Some(derived),
        ) {
            self.emit(Event::JobFinished {
                job,
                message: "Back to the model before training".into(),
            });
        }
    }

    fn save_history(&mut self) {
        if let Some(s) = self.session.as_mut().filter(|s| s.history_dirty) {
            s.history_dirty = false;
            let saved = if std::mem::take(&mut s.history_cleared) {
                s.history.save()
            } else {
                s.history.save_merged()
            };
            // A history that cannot be written costs only the history; say so once.
            if let Err(e) = saved {
                let error = format!("could not save the experiment history: {e}");
                let _ = self.tx.try_send(Event::PreviewError {
                    generation: 0,
                    error,
                });
            }
        }
    }

    fn progress_for(&self, job: JobId, cancel: CancelFlag) -> Progress<'static> {
        let tx = self.tx.clone();
        let wake = self.wake.clone();
        let last = std::sync::Mutex::new(Instant::now() - std::time::Duration::from_secs(1));
        Progress::new(cancel, move |fraction, message| {
            // At most ~30 progress events a second: enough for a smooth bar.
            let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
            if l.elapsed().as_millis() >= 33 || fraction >= 1.0 {
                *l = Instant::now();
                let _ = tx.try_send(Event::Progress {
                    job,
                    fraction,
                    message: message.to_string(),
                });
                wake();
            }
        })
    }

    fn open(&mut self, job: JobId, cancel: CancelFlag, source: OpenSource) {
        let label = match &source {
            OpenSource::Path(p) => format!("Opening {}", p.display()),
            OpenSource::Sample => "Opening the sample model".to_string(),
            OpenSource::NamedSample(id) => format!("Opening the {id} sample"),
        };
        self.emit(Event::JobStarted { job, label });
        let progress = self.progress_for(job, cancel.clone());
        let t0 = Instant::now();
        let model = match &source {
            OpenSource::Path(p) => Model::open_with(p, &progress),
            OpenSource::Sample => crate::sample::open_sample(),
            OpenSource::NamedSample(id) => crate::sample::open_named(id),
        };
        let model = match model {
            Ok(m) => Arc::new(m),
            Err(_) if cancel.is_cancelled() => return self.emit(Event::JobCancelled { job }),
            Err(e) => {
                return self.emit(Event::JobFailed {
                    job,
                    error: e.to_string(),
                });
            }
        };
        if !model.tensors.iter().any(|t| t.analysable()) {
            let error = format!(
                "{}: no floating-point tensors to prune ({} tensors in the file)",
                model.display_name(),
                model.tensors.len()
            );
            return self.emit(Event::JobFailed { job, error });
        }
        // Another model: the fine-tunes of this one can no longer be undone into it.
        self.undo.clear();
        if self.install(job, model, &progress, t0, None) {
            self.emit(Event::JobFinished {
                job,
                message: "Model opened".into(),
            });
        }
    }

    /// Analyses `model` and makes it the open one (histograms, index, evaluator, history).
    /// Returns false when it was cancelled or failed (and said so).
    fn install(
        &mut self,
        job: JobId,
        model: Arc<Model>,
        progress: &Progress,
        t0: Instant,
        derived: Option<Derived>,
    ) -> bool {
        // One pass over 16-bit tensors serves both the histograms and the score index.
        let histograms = match model.all_pattern_counts(progress).and_then(|patterns| {
            all_histograms_with(&model, HISTOGRAM_BINS, progress, Some(&patterns))
                .map(|h| (h, patterns))
        }) {
            Ok((h, p)) => (
                h.into_iter().map(|h| h.map(Arc::new)).collect::<Vec<_>>(),
                p,
            ),
            Err(_) => {
                self.emit(Event::JobCancelled { job });
                return false;
            }
        };
        let (histograms, patterns) = histograms;
        let index = match ScoreIndex::build(
            &model,
            Default::default(),
            0,
            &ScoreInputs {
                patterns: Some(&patterns),
                ..Default::default()
            },
            progress,
        ) {
            Ok(i) => Arc::new(i),
            Err(PruneError::Cancelled) => {
                self.emit(Event::JobCancelled { job });
                return false;
            }
            Err(e) => {
                self.emit(Event::JobFailed {
                    job,
                    error: e.to_string(),
                });
                return false;
            }
        };
        let (evaluator, eval) = match evaluator_for(&model) {
            Ok(e) => dense_eval(&model, e.map(|e| Arc::new(e) as Arc<dyn Evaluator>)),
            Err(e) => (
                None,
                EvalInfo {
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            ),
        };
        // History and caches are keyed by content, hashed only for models that can be measured.
        let hash = match evaluator {
            Some(_) => {
                progress.report(0.95, "hashing");
                model.content_hash().ok()
            }
            None => None,
        };
        let history = hash
            .as_deref()
            .map(crate::history::History::load)
            .unwrap_or_default();
        let uses = evaluator.as_ref().and_then(|e| e.weight_uses(&model));
        let dense_flops = uses
            .as_ref()
            .map(|u| crate::history::flops(&model, &Allocation::default(), u));
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let groups = crate::prune::structured::groups_of(&model)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let snapshot = ModelSnapshot {
            id,
            name: model.display_name(),
            path: model.source.path().map(|p| p.to_path_buf()),
            format: model.format.label(),
            tensors: model
                .tensors
                .iter()
                .enumerate()
                .map(|(t, e)| TensorInfo {
                    name: e.name.clone(),
                    shape: e.shape.clone(),
                    dtype: e.dtype.to_string(),
                    numel: e.numel,
                    analysable: e.analysable(),
                    default_prunable: e.default_prunable(),
                    nan: histograms[t].as_ref().map_or(0, |h| h.nan),
                    inf: histograms[t].as_ref().map_or(0, |h| h.pos_inf + h.neg_inf),
                })
                .collect(),
            histograms: histograms.clone(),
            total_params: model.total_params(),
            data_bytes: model.data_bytes(),
            eval,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            inputs: model
                .input_files()
                .into_iter()
                .map(|(_, p)| p.to_path_buf())
                .collect(),
            hash: hash.clone(),
            history: history.records.clone(),
            dense_flops,
            groups: groups.clone(),
            derived: derived.as_ref().map(|d| d.what.clone()),
            adopt: derived.and_then(|d| d.settings),
            can_undo: !self.undo.is_empty(),
        };
        self.save_history();
        // A sweep of the model being replaced would only spend the CPU on curves nobody sees.
        if let Some(old) = self.session.as_ref() {
            if let Some(c) = &old.sweeps.lock().unwrap_or_else(|e| e.into_inner()).cancel {
                c.cancel();
            }
            if let Some(c) = &old.latency.lock().unwrap_or_else(|e| e.into_inner()).cancel {
                c.cancel();
            }
        }
        self.session = Some(Session {
            id,
            model,
            index,
            histograms,
            evaluator,
            cache: None,
            hash,
            history,
            history_dirty: false,
            history_cleared: false,
            uses,
            sweeps: Default::default(),
            latency: Default::default(),
            groups,
        });
        self.emit(Event::ModelOpened(Arc::new(snapshot)));
        true
    }

    /// The preview pipeline: counts, then the selected layer, the heatmap and accuracy,
    /// giving up between steps as soon as a newer preview is queued.
    fn preview(&mut self, req: PreviewRequest) {
        let Some(session) = self.session.as_ref() else {
            return;
        };
        if session.id != req.model {
            return;
        }
        let generation = req.generation;
        let groups = || session.groups.clone().map_err(PruneError::Structured);
        if let Err(e) = req.settings.validate_given(&session.model, groups) {
            return self.emit(Event::PreviewError {
                generation,
                error: e.to_string(),
            });
        }
        if let Err(e) = self.ensure_index(&req.settings) {
            return self.emit(Event::PreviewError {
                generation,
                error: e,
            });
        }
        let session = self.session.as_mut().expect("checked above");
        let fresh = session
            .cache
            .as_ref()
            .is_none_or(|c| c.settings != req.settings);
        if fresh {
            let t0 = Instant::now();
            let alloc = allocate(&session.model, &session.index, &req.settings);
            let sizes = size_report(&session.model, &alloc, req.settings.pattern);
            let compute_us = t0.elapsed().as_secs_f64() * 1e6;
            let n = session.model.tensors.len();
            session.cache = Some(Computed {
                settings: req.settings.clone(),
                alloc,
                layer_masks: vec![None; n],
                all_masks: None,
                detail_sent: None,
                heatmap_sent: None,
                sizes,
                compute_us,
                metrics: None,
            });
        }
        // Every request gets its counts (cached when the settings did not change), so the UI
        // can tell by generation alone that what it shows answers its newest settings.
        let c = session.cache.as_ref().expect("filled above");
        let snap = PreviewSnapshot {
            generation,
            model: req.model,
            alloc: c.alloc.clone(),
            sizes: c.sizes,
            compute_us: c.compute_us,
        };
        self.emit(Event::Preview(Arc::new(snap)));

        if let Some(t) = req.selected {
            if self.newer_preview_queued() {
                return;
            }
            self.send_detail(&req, t);
        }
        if let Some(h) = &req.heatmap {
            if self.newer_preview_queued() {
                return;
            }
            self.send_heatmap(&req, h);
        }
        if self.newer_preview_queued() {
            return;
        }
        self.send_metrics(&req);
    }

    /// The mask of tensor `t` under the cached settings (`None`: the tensor is not pruned).
    fn layer_mask(&mut self, t: usize) -> Option<Arc<Mask>> {
        let s = self.session.as_mut()?;
        let c = s.cache.as_mut()?;
        if let Some(m) = &c.layer_masks[t] {
            return Some(m.clone());
        }
        // Reuse the full mask set when evaluation already built it; copy it once, not per request.
        let from_all = c
            .all_masks
            .as_ref()
            .and_then(|all| all.get(&s.model.tensors[t].name))
            .cloned();
        let m = match from_all {
            Some(m) => Arc::new(m),
            None => {
                let l = c.alloc.for_tensor(t)?;
                Arc::new(build_layer_mask(&s.model, &s.index, &c.settings, l))
            }
        };
        c.layer_masks[t] = Some(m.clone());
        Some(m)
    }

    fn send_detail(&mut self, req: &PreviewRequest, t: usize) {
        let Some(s) = self.session.as_ref() else {
            return;
        };
        if t >= s.model.tensors.len() || s.cache.as_ref().is_some_and(|c| c.detail_sent == Some(t))
        {
            return;
        }
        let Some(hist) = s.histograms[t].clone() else {
            return;
        };
        let mask = self.layer_mask(t);
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let split = split_histogram(&s.model, t, &hist, mask.as_deref());
        if let Some(c) = s.cache.as_mut() {
            c.detail_sent = Some(t);
        }
        let d = LayerDetail {
            generation: req.generation,
            model: req.model,
            tensor: t,
            split,
        };
        self.emit(Event::LayerDetail(Arc::new(d)));
    }

    fn send_heatmap(&mut self, req: &PreviewRequest, h: &HeatmapRequest) {
        let Some(s) = self.session.as_ref() else {
            return;
        };
        if h.tensor >= s.model.tensors.len()
            || !s.model.tensors[h.tensor].analysable()
            || s.cache
                .as_ref()
                .is_some_and(|c| c.heatmap_sent.as_ref() == Some(h))
        {
            return;
        }
        let mask = self.layer_mask(h.tensor);
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let view = heatmap(
            &s.model,
            h.tensor,
            mask.as_deref(),
            h.rows.clone(),
            h.cols.clone(),
            h.max_w,
            h.max_h,
        );
        if let Some(c) = s.cache.as_mut() {
            c.heatmap_sent = Some(h.clone());
        }
        let snap = HeatmapSnapshot {
            generation: req.generation,
            model: req.model,
            request: h.clone(),
            view,
        };
        self.emit(Event::Heatmap(Arc::new(snap)));
    }

    fn send_metrics(&mut self, req: &PreviewRequest) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let (Some(eval), Some(c)) = (s.evaluator.as_ref(), s.cache.as_mut()) else {
            return;
        };
        let (result, predictions) = match &c.metrics {
            Some(r) => r.clone(),
            None => {
                let masks = match &c.all_masks {
                    Some(m) => m.clone(),
                    None => match build_masks(
                        &s.model,
                        &s.index,
                        &c.settings,
                        &c.alloc,
                        &Progress::none(),
                    ) {
                        Ok(m) => {
                            let m = Arc::new(m);
                            c.all_masks = Some(m.clone());
                            m
                        }
                        Err(e) => {
                            let error = e.to_string();
                            return self.emit(Event::PreviewError {
                                generation: req.generation,
                                error,
                            });
                        }
                    },
                };
                let r = match eval.evaluate_with_predictions(&s.model, &masks, GALLERY_SAMPLES) {
                    Ok((m, p)) => (Ok(m), p.map(Arc::new)),
                    Err(e) => (Err(e.to_string()), None),
                };
                c.metrics = Some(r.clone());
                if let Ok(m) = &r.0 {
                    let (settings, alloc, csr) =
                        (c.settings.clone(), c.alloc.clone(), c.sizes.csr_bytes);
                    let desc = eval.describe();
                    self.record(&settings, &alloc, csr, m, &desc);
                }
                r
            }
        };
        self.emit(Event::Metrics(MetricsSnapshot {
            generation: req.generation,
            model: req.model,
            result,
            predictions,
        }));
    }

    /// Adds an evaluated configuration to the history (runnable models with a known hash).
    fn record(
        &mut self,
        settings: &PruneSettings,
        alloc: &Allocation,
        csr_bytes: u64,
        metrics: &crate::eval::Metrics,
        data: &str,
    ) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let Some(hash) = s.hash.clone() else {
            return;
        };
        let flops = s
            .uses
            .as_ref()
            .map(|u| crate::history::flops(&s.model, alloc, u));
        let record = crate::history::Record::new(
            "gui", &s.model, &hash, settings, alloc, csr_bytes, metrics, data, flops,
        );
        s.history.push(record.clone());
        s.history_dirty = true;
        let model = s.id;
        self.emit(Event::Recorded {
            model,
            record: Arc::new(record),
        });
    }

    fn set_data(&mut self, job: JobId, source: crate::eval::DataSource) {
        self.emit(Event::JobStarted {
            job,
            label: "Loading evaluation data".into(),
        });
        let Some(s) = self.session.as_mut() else {
            return self.emit(Event::JobFailed {
                job,
                error: "no model is open".into(),
            });
        };
        let built = crate::eval::evaluator_with_data(&s.model, &source)
            .map(|e| Arc::new(e) as Arc<dyn Evaluator>)
            .and_then(|e| e.evaluate(&s.model, &MaskSet::new()).map(|m| (e, m)));
        let (evaluator, dense) = match built {
            Ok(x) => x,
            // The evaluator in use stays: a bad data file loses nothing.
            Err(e) => {
                return self.emit(Event::JobFailed {
                    job,
                    error: e.to_string(),
                });
            }
        };
        let info = eval_info(evaluator.as_ref(), dense);
        if s.hash.is_none() {
            s.hash = s.model.content_hash().ok();
            if let Some(h) = &s.hash {
                s.history = crate::history::History::load(h);
            }
        }
        s.uses = evaluator.weight_uses(&s.model);
        s.evaluator = Some(evaluator);
        // Curves measured on other data no longer plan anything; a sweep on the old data stops.
        {
            let mut sw = s.sweeps.lock().unwrap_or_else(|e| e.into_inner());
            sw.current = None;
            sw.generation += 1;
            if let Some(c) = sw.cancel.take() {
                c.cancel();
            }
        }
        if let Some(c) = s.cache.as_mut() {
            c.metrics = None;
        }
        let model = s.id;
        let message = format!(
            "Evaluating on {}",
            info.evaluator.clone().unwrap_or_default()
        );
        self.emit(Event::EvalChanged { model, info });
        self.emit(Event::JobFinished { job, message });
    }

    fn export(&mut self, job: JobId, cancel: CancelFlag, req: ExportRequest) {
        self.emit(Event::JobStarted {
            job,
            label: "Exporting".into(),
        });
        let Some(s) = self.session.as_ref() else {
            return self.emit(Event::JobFailed {
                job,
                error: "no model is open".into(),
            });
        };
        let model = s.model.clone();
        let progress = self.progress_for(job, cancel.clone());
        let result = (|| -> anyhow::Result<String> {
            let outputs = req.outputs();
            crate::export::check_outputs(&model.input_files(), &outputs)?;
            let (alloc, masks) = masks_for(s, &req.settings, &progress)?;
            let mut written = Vec::new();
            if let Some(p) = &req.weights {
                crate::export::export_weights(&model, &masks, p, &progress)?;
                written.push(p.display().to_string());
            }
            if let Some(p) = &req.masks {
                export_masks(&model, &masks, p)?;
                written.push(p.display().to_string());
            }
            if let Some(p) = &req.recipe {
                let hash = model.content_hash()?;
                Recipe::new(&model, hash, &req.settings, &alloc).save(p)?;
                written.push(p.display().to_string());
            }
            if let Some(p) = &req.compacted {
                let c = crate::export::compact::compact(&model, &masks)?;
                crate::export::compact::write(&model, &masks, &c, p, &progress)?;
                written.push(format!(
                    "{} ({} → {} parameters)",
                    p.display(),
                    crate::util::group_digits(c.report.params_before),
                    crate::util::group_digits(c.report.params_after)
                ));
            }
            Ok(format!("Wrote {}", written.join(", ")))
        })();
        match result {
            Ok(message) => self.emit(Event::JobFinished { job, message }),
            Err(_) if cancel.is_cancelled() => self.emit(Event::JobCancelled { job }),
            Err(e) => self.emit(Event::JobFailed {
                job,
                error: format!("{e:#}"),
            }),
        }
    }
}

/// What a caught panic says to the user: the job failed, the model is as it was.
fn internal_error(panic: &(dyn std::any::Any + Send)) -> String {
    let msg = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    format!("internal error (the model is unchanged): {msg}")
}

/// The allocation and masks of `settings`: from the session's score index where it fits the
/// criterion, else from a fresh one.
fn masks_for(
    s: &Session,
    settings: &PruneSettings,
    progress: &Progress,
) -> anyhow::Result<(Allocation, MaskSet)> {
    let model = &s.model;
    let data = s.evaluator.as_ref().and_then(|e| e.shared_data());
    let inputs = score_inputs(s.evaluator.as_deref(), data.as_deref(), settings);
    Ok(if index_fits(&s.index, settings, &inputs) {
        settings.validate(model)?;
        let alloc = allocate(model, &s.index, settings);
        let masks = build_masks(model, &s.index, settings, &alloc, progress)?;
        (alloc, masks)
    } else {
        let p = crate::prune::prune(model, settings, &inputs, progress)?;
        (p.alloc, p.masks)
    })
}

/// What scoring for `settings` reads: the evaluation data as calibration samples, for the
/// criteria that need data.
fn score_inputs<'a>(
    evaluator: Option<&'a dyn Evaluator>,
    data: Option<&'a crate::data::EvalData>,
    settings: &PruneSettings,
) -> ScoreInputs<'a> {
    ScoreInputs {
        calibration: data.filter(|_| settings.criterion.needs_data()),
        samples: settings.calibration,
        fingerprint: evaluator.and_then(|e| e.calibration_fingerprint()),
        ..Default::default()
    }
}

/// Whether `index` scores as `settings` ask (criterion, seed, calibration data).
fn index_fits(index: &ScoreIndex, settings: &PruneSettings, inputs: &ScoreInputs) -> bool {
    index.criterion == settings.criterion
        && (!settings.criterion.seeded() || index.seed == settings.seed)
        && index.calibration == calibrate::calibration_key(settings.criterion, inputs)
}

/// The finished curves that plans for `settings` may use: measured with the same criterion
/// (and seed), pattern, and on the data now chosen.
fn curves_for(s: &Session, settings: &PruneSettings) -> Result<Arc<Sensitivity>, String> {
    let current = s
        .sweeps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .current
        .clone();
    let Some(sens) = current else {
        return Err("no finished sensitivity curves: run the sensitivity analysis first".into());
    };
    let seed_differs = settings.criterion.seeded() && sens.seed != settings.seed;
    let samples_differ =
        settings.criterion.needs_data() && sens.calibration != settings.calibration;
    if sens.criterion != settings.criterion
        || sens.pattern != settings.pattern
        || seed_differs
        || samples_differ
    {
        return Err(format!(
            "the curves were measured with {} / {}; run the analysis again for {} / {}",
            sens.criterion.cli_name(),
            sens.pattern,
            settings.criterion.cli_name(),
            settings.pattern
        ));
    }
    Ok(sens)
}

/// A schedule on any trainee, its timeline streamed: the trained tensors, its masks, its test
/// figures and sparsity.
#[allow(clippy::type_complexity)]
fn scheduled<T: crate::train::Trainee>(
    net: T,
    target: f64,
    schedule: crate::train::Schedule,
    split: &crate::data::Split,
    config: &crate::train::FinetuneConfig,
    progress: &Progress,
    send: &dyn Fn(TrainUpdate),
) -> Result<
    (
        crate::train::NamedTensors,
        Vec<(String, Vec<bool>)>,
        crate::eval::Metrics,
        f64,
    ),
    crate::train::TrainError,
> {
    send(TrainUpdate::Started {
        kind: "schedule",
        start: net.metrics(&split.test)?.accuracy.unwrap_or(f64::NAN),
    });
    let r = crate::train::run_schedule(net, target, schedule, split, config, progress, |p| {
        send(TrainUpdate::Timeline(p.clone()))
    })?;
    let metrics = r.net.metrics(&split.test)?;
    Ok((r.net.tensors(), r.net.masks(), metrics, r.net.sparsity()))
}

/// Pruned weights in a mask set.
fn mask_pruned(masks: &MaskSet) -> u64 {
    masks
        .iter()
        .map(|(_, m)| (m.len() - m.count_kept()) as u64)
        .sum()
}

/// A display name without the suffixes earlier trainings added ("x (fine-tuned)" → "x").
fn base_name(name: &str) -> &str {
    name.split(" (").next().unwrap_or(name)
}

/// Runs the dense model once: an evaluator that cannot do that is dropped, and why is kept.
fn dense_eval(
    model: &Model,
    evaluator: Option<Arc<dyn Evaluator>>,
) -> (Option<Arc<dyn Evaluator>>, EvalInfo) {
    let Some(e) = evaluator else {
        return (None, EvalInfo::default());
    };
    match e.evaluate(model, &MaskSet::new()) {
        Ok(m) => {
            let info = eval_info(e.as_ref(), m);
            (Some(e), info)
        }
        Err(err) => (
            None,
            EvalInfo {
                error: Some(err.to_string()),
                ..Default::default()
            },
        ),
    }
}

/// What the UI is told about a working evaluator and its dense figures.
fn eval_info(e: &dyn Evaluator, dense: crate::eval::Metrics) -> EvalInfo {
    EvalInfo {
        evaluator: Some(e.describe()),
        engine: Some(e.engine()),
        error: None,
        dense: Some(dense),
        samples: e.samples(GALLERY_SAMPLES).map(Arc::new),
    }
}
