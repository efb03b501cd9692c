//! The worker thread's loop and the state it owns.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::protocol::*;
use crate::analysis::{Histogram, all_histograms, heatmap, size_report, split_histogram};
use crate::eval::{Evaluator, evaluator_for};
use crate::export::{Recipe, export_masks};
use crate::model::Model;
use crate::progress::{CancelFlag, Progress};
use crate::prune::{
    Allocation, Mask, MaskSet, PruneError, PruneSettings, ScoreIndex, ScoreInputs, allocate,
    build_layer_mask, build_masks,
};

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
    evaluator: Option<Box<dyn Evaluator>>,
    cache: Option<Computed>,
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

struct Worker {
    rx: Receiver<Command>,
    tx: Sender<Event>,
    wake: Wake,
    ids: Arc<AtomicU64>,
    pending: VecDeque<Command>,
    session: Option<Session>,
    shutting_down: bool,
}

pub(super) fn run(rx: Receiver<Command>, tx: Sender<Event>, wake: Wake, ids: Arc<AtomicU64>) {
    let mut w = Worker {
        rx,
        tx,
        wake,
        ids,
        pending: VecDeque::new(),
        session: None,
        shutting_down: false,
    };
    while !w.shutting_down {
        if w.pending.is_empty() {
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
            | Command::PanicForTest { job } => Some(*job),
            Command::Preview(_) | Command::Shutdown => None,
        };
        let result = catch_unwind(AssertUnwindSafe(|| self.dispatch(cmd)));
        if let Err(panic) = result {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            let error = format!("internal error (the model is unchanged): {msg}");
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
            Command::PanicForTest { job } => {
                self.emit(Event::JobStarted {
                    job,
                    label: "Panic test".into(),
                });
                panic!("deliberate panic for testing");
            }
            Command::Shutdown => self.shutting_down = true,
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
            OpenSource::Path(p) => Model::open(p),
            OpenSource::Sample => crate::sample::open_sample(),
            OpenSource::NamedSample(id) => crate::sample::open_named(id),
        };
        let model = match model {
            Ok(m) => Arc::new(m),
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
        let histograms = match all_histograms(&model, HISTOGRAM_BINS, &progress) {
            Ok(h) => h.into_iter().map(|h| h.map(Arc::new)).collect::<Vec<_>>(),
            Err(_) => return self.emit(Event::JobCancelled { job }),
        };
        let index = match ScoreIndex::build(
            &model,
            Default::default(),
            0,
            &ScoreInputs::default(),
            &progress,
        ) {
            Ok(i) => Arc::new(i),
            Err(PruneError::Cancelled) => return self.emit(Event::JobCancelled { job }),
            Err(e) => {
                return self.emit(Event::JobFailed {
                    job,
                    error: e.to_string(),
                });
            }
        };
        let (evaluator, eval) = match evaluator_for(&model) {
            Ok(e) => dense_eval(&model, e.map(|e| Box::new(e) as Box<dyn Evaluator>)),
            Err(e) => (
                None,
                EvalInfo {
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            ),
        };
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
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
        };
        self.session = Some(Session {
            id,
            model,
            index,
            histograms,
            evaluator,
            cache: None,
        });
        self.emit(Event::ModelOpened(Arc::new(snapshot)));
        self.emit(Event::JobFinished {
            job,
            message: "Model opened".into(),
        });
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
        if let Err(e) = req.settings.validate(&session.model) {
            return self.emit(Event::PreviewError {
                generation,
                error: e.to_string(),
            });
        }
        // A different criterion (or seed, for seeded ones) needs a new index.
        let s = &req.settings;
        if session.index.criterion != s.criterion
            || (s.criterion.seeded() && session.index.seed != s.seed)
        {
            let job = self.ids.fetch_add(1, Ordering::Relaxed);
            self.emit(Event::JobStarted {
                job,
                label: format!("Scoring with {}", s.criterion.label()),
            });
            let progress = self.progress_for(job, CancelFlag::new());
            let model = session.model.clone();
            match ScoreIndex::build(
                &model,
                s.criterion,
                s.seed,
                &ScoreInputs::default(),
                &progress,
            ) {
                Ok(i) => {
                    let session = self.session.as_mut().expect("checked above");
                    session.index = Arc::new(i);
                    session.cache = None;
                    self.emit(Event::JobFinished {
                        job,
                        message: "Scores ready".into(),
                    });
                }
                Err(e) => {
                    return self.emit(Event::JobFailed {
                        job,
                        error: e.to_string(),
                    });
                }
            }
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
            .map(|e| Box::new(e) as Box<dyn Evaluator>)
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
        s.evaluator = Some(evaluator);
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
            let s_ = &req.settings;
            let index_fits = s.index.criterion == s_.criterion
                && (!s_.criterion.seeded() || s.index.seed == s_.seed);
            let pruned = if index_fits {
                s_.validate(&model)?;
                let alloc = allocate(&model, &s.index, s_);
                let masks = build_masks(&model, &s.index, s_, &alloc, &progress)?;
                (alloc, masks)
            } else {
                let p = crate::prune::prune(&model, s_, &ScoreInputs::default(), &progress)?;
                (p.alloc, p.masks)
            };
            let (alloc, masks) = pruned;
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

/// Runs the dense model once: an evaluator that cannot do that is dropped, and why is kept.
fn dense_eval(
    model: &Model,
    evaluator: Option<Box<dyn Evaluator>>,
) -> (Option<Box<dyn Evaluator>>, EvalInfo) {
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
