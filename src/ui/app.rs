//! The eframe app: owns the worker handle, the UI-side state (snapshots from the worker) and
//! the panels. Events are drained in `logic`; panels draw in `ui`; the preview the worker
//! should compute is sent at the end of each frame, only when it changed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use egui::{Key, KeyboardShortcut, Modifiers};
use serde::{Deserialize, Serialize};

use super::controls::ControlsPanel;
use super::dialogs::{DataDialog, ExportDialog, OpenPathDialog};
use super::heatmap_view::HeatmapPanel;
use super::plots::{HistogramPanel, OverviewPanel};
use super::table::LayerTable;
use super::{summary, theme};
use crate::prune::PruneSettings;
use crate::worker::{
    EvalInfo, Event, ExportRequest, HeatmapRequest, HeatmapSnapshot, JobId, LayerDetail,
    MetricsSnapshot, ModelId, ModelSnapshot, OpenSource, PreviewRequest, PreviewSnapshot,
    WorkerHandle,
};

/// How long `logic` may spend draining worker events per frame.
const EVENT_BUDGET: Duration = Duration::from_millis(5);
const RECENT_MAX: usize = 10;
const PREFS_KEY: &str = "prunescope.prefs";

pub const OPEN_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);
pub const OPEN_PATH_SHORTCUT: KeyboardShortcut =
    KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::O);
pub const EXPORT_SHORTCUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::E);

/// The small part of the app that survives a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Prefs {
    pub recent: Vec<PathBuf>,
    pub log_y: bool,
}

impl Prefs {
    fn remember(&mut self, path: &Path) {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.recent.retain(|p| p != &path);
        self.recent.insert(0, path);
        self.recent.truncate(RECENT_MAX);
    }
}

/// What the worker has told us about the open model.
pub struct ModelView {
    pub snapshot: Arc<ModelSnapshot>,
    pub preview: Option<Arc<PreviewSnapshot>>,
    pub detail: Option<Arc<LayerDetail>>,
    pub heatmap: Option<Arc<HeatmapSnapshot>>,
    pub metrics: Option<MetricsSnapshot>,
    pub preview_error: Option<(u64, String)>,
    /// How the model is evaluated now (the data can change after opening).
    pub eval: EvalInfo,
    /// The experiment history, oldest first (one record per configuration and data).
    pub history: Vec<Arc<crate::history::Record>>,
}

impl ModelView {
    fn new(snapshot: Arc<ModelSnapshot>) -> ModelView {
        ModelView {
            eval: snapshot.eval.clone(),
            history: snapshot.history.iter().cloned().map(Arc::new).collect(),
            snapshot,
            preview: None,
            detail: None,
            heatmap: None,
            metrics: None,
            preview_error: None,
        }
    }
}

/// A job the worker is running, as shown in the status bar.
#[derive(Clone, Debug)]
pub struct JobView {
    pub id: JobId,
    pub label: String,
    pub fraction: f32,
    pub message: String,
}

/// Everything the panels read and the settings they change.
pub struct AppState {
    pub model: Option<ModelView>,
    pub settings: PruneSettings,
    pub selected: Option<usize>,
    /// Generation of the newest preview sent to the worker.
    pub generation: u64,
    pub jobs: Vec<JobView>,
    pub errors: Vec<String>,
    pub notice: Option<String>,
    pub prefs: Prefs,
    /// Generation at which the current settings were first sent.
    pub settings_generation: u64,
    /// Sensitivity curves of the open model (partial while a sweep runs).
    pub sensitivity: Option<Arc<crate::sensitivity::Sensitivity>>,
    /// The newest latency run of the open model (partial while it runs), and its sizes.
    pub latency: Option<Arc<crate::latency::LatencyReport>>,
    pub latency_sizes: Option<Arc<Vec<crate::analysis::StorageSize>>>,
    /// The newest sensitivity plan, or why there is none.
    pub plan: Option<Result<Arc<crate::sensitivity::Plan>, String>>,
    /// Two criteria's cuts compared (the criteria window).
    pub criteria: Option<Arc<crate::worker::CriteriaComparison>>,
    /// Every rule's plan at one target, measured.
    pub comparison: Option<Arc<Vec<crate::worker::CompareRow>>>,
    /// The current (or last) training run's curves.
    pub training: Option<super::recovery::TrainView>,
    plan_generation: u64,
    /// What the last plan request was for (the settings without per-layer targets).
    plan_sent: Option<PruneSettings>,
    /// A plan was asked for and has not come back: previews wait for it, so no configuration
    /// is measured (and recorded) with the new target but the old plan's layer targets.
    plan_pending: bool,
    sent: Option<(
        ModelId,
        PruneSettings,
        Option<usize>,
        Option<HeatmapRequest>,
    )>,
    open_jobs: HashSet<JobId>,
}

impl AppState {
    fn new(prefs: Prefs) -> AppState {
        AppState {
            model: None,
            settings: PruneSettings::default(),
            selected: None,
            generation: 0,
            settings_generation: 0,
            sensitivity: None,
            latency: None,
            latency_sizes: None,
            plan: None,
            comparison: None,
            criteria: None,
            training: None,
            plan_generation: 0,
            plan_sent: None,
            plan_pending: false,
            jobs: Vec::new(),
            errors: Vec::new(),
            notice: None,
            prefs,
            sent: None,
            open_jobs: HashSet::new(),
        }
    }

    /// Whether an answer of `generation` is for the newest settings: settings changed since the
    /// last preview was sent have no answer yet.
    fn answers_newest(&self, generation: u64) -> bool {
        generation >= self.settings_generation
            && self.settings_generation > 0
            && self.sent.as_ref().is_some_and(|s| s.1 == self.settings)
    }

    /// Whether the shown counts answer the newest settings.
    pub fn counts_current(&self) -> bool {
        self.model
            .as_ref()
            .and_then(|m| m.preview.as_ref())
            .is_some_and(|p| self.answers_newest(p.generation))
    }

    /// Whether the shown accuracy answers the newest settings.
    pub fn metrics_current(&self) -> bool {
        self.model
            .as_ref()
            .and_then(|m| m.metrics.as_ref())
            .is_some_and(|p| self.answers_newest(p.generation))
    }

    /// Replaces the settings with restored ones (history, comparison) exactly as recorded: a
    /// sensitivity plan is not recomputed over them.
    pub fn restore(&mut self, settings: PruneSettings) {
        self.plan_sent = Some(plan_key(&settings));
        self.plan_pending = false;
        // The plan shown belonged to other settings.
        self.plan = None;
        self.settings = settings;
    }

    /// A sensitivity plan for the current settings is on its way.
    pub fn planning(&self) -> bool {
        self.plan_pending
    }

    /// In sensitivity-guided scope, asks for a plan whenever what it depends on changed.
    fn sync_plan(&mut self, worker: &WorkerHandle) {
        let Some(m) = &self.model else { return };
        if self.settings.scope != crate::prune::Scope::Sensitivity || self.sensitivity.is_none() {
            return;
        }
        let key = plan_key(&self.settings);
        if self.plan_sent.as_ref() == Some(&key) {
            return;
        }
        let generation = self.plan_generation + 1;
        let cmd = crate::worker::Command::Plan {
            generation,
            model: m.snapshot.id,
            settings: self.settings.clone(),
        };
        if worker.send(cmd).is_ok() {
            self.plan_generation = generation;
            self.plan_sent = Some(key);
            self.plan_pending = true;
        }
    }

    /// Sends the preview the panels now want, if it differs from the last one sent.
    fn sync_preview(&mut self, worker: &WorkerHandle, heatmap: Option<HeatmapRequest>) {
        let Some(m) = &self.model else { return };
        if self.settings.scope == crate::prune::Scope::Sensitivity && self.plan_pending {
            return;
        }
        let want = (m.snapshot.id, self.settings.clone(), self.selected, heatmap);
        if self.sent.as_ref() == Some(&want) {
            return;
        }
        let generation = self.generation + 1;
        let request = PreviewRequest {
            generation,
            model: want.0,
            settings: want.1.clone(),
            selected: want.2,
            heatmap: want.3.clone(),
        };
        // A full queue means the worker is busy; the next frame tries again.
        if worker.preview(request).is_ok() {
            self.generation = generation;
            if self.sent.as_ref().is_none_or(|s| s.1 != want.1) {
                self.settings_generation = generation;
            }
            self.sent = Some(want);
        }
    }

    fn handle(&mut self, e: Event) {
        let current = self.model.as_ref().map(|m| m.snapshot.id);
        match e {
            Event::JobStarted { job, label } => {
                self.jobs.push(JobView {
                    id: job,
                    label,
                    fraction: 0.0,
                    message: String::new(),
                });
            }
            Event::Progress {
                job,
                fraction,
                message,
            } => {
                if let Some(j) = self.jobs.iter_mut().find(|j| j.id == job) {
                    j.fraction = fraction;
                    j.message = message;
                }
            }
            Event::JobFinished { job, message } => {
                self.jobs.retain(|j| j.id != job);
                if !self.open_jobs.remove(&job) && message.starts_with("Wrote") {
                    self.notice = Some(message);
                }
            }
            Event::JobFailed { job, error } => {
                let label = self
                    .jobs
                    .iter()
                    .find(|j| j.id == job)
                    .map(|j| j.label.clone());
                self.jobs.retain(|j| j.id != job);
                let opening = self.open_jobs.remove(&job);
                let mut msg = match label {
                    Some(l) => format!("{l} failed: {error}"),
                    None => error,
                };
                if opening && self.model.is_some() {
                    msg.push_str(" — the model that was open is still open.");
                }
                self.errors.push(msg);
            }
            Event::JobCancelled { job } => {
                self.jobs.retain(|j| j.id != job);
                self.open_jobs.remove(&job);
                self.notice = Some("Cancelled.".into());
            }
            Event::ModelOpened(snapshot) => {
                if let Some(p) = &snapshot.path {
                    self.prefs.remember(p);
                }
                // Global knobs carry over; per-tensor settings belong to the old model's names,
                // except for a model trained from the open one (same names, and a schedule's
                // result comes with the settings that select its zeros).
                if let Some(adopt) = &snapshot.adopt {
                    self.settings = adopt.clone();
                } else if snapshot.derived.is_none() {
                    self.settings.layers.clear();
                }
                self.selected = snapshot
                    .tensors
                    .iter()
                    .position(|t| t.default_prunable)
                    .or_else(|| snapshot.tensors.iter().position(|t| t.analysable));
                self.notice = Some(match &snapshot.derived {
                    Some(how) => format!("The model is now {how}."),
                    None => format!("Opened {} in {:.0} ms.", snapshot.name, snapshot.load_ms),
                });
                self.model = Some(ModelView::new(snapshot));
                self.sent = None;
                self.sensitivity = None;
                self.latency = None;
                self.criteria = None;
                self.latency_sizes = None;
                self.plan = None;
                self.comparison = None;
                self.plan_sent = None;
                if self.settings.scope == crate::prune::Scope::Sensitivity {
                    self.settings.scope = crate::prune::Scope::Global;
                }
            }
            Event::Preview(p) => {
                let Some(m) = self.model.as_mut().filter(|_| current == Some(p.model)) else {
                    return;
                };
                let generation = p.generation;
                if keep_newest(&mut m.preview, p, |p| p.generation)
                    && m.preview_error
                        .as_ref()
                        .is_some_and(|(g, _)| *g <= generation)
                {
                    m.preview_error = None;
                }
            }
            Event::LayerDetail(d) => {
                let Some(m) = self.model.as_mut().filter(|_| current == Some(d.model)) else {
                    return;
                };
                if m.detail
                    .as_ref()
                    .is_none_or(|old| old.generation <= d.generation || old.tensor != d.tensor)
                {
                    m.detail = Some(d);
                }
            }
            Event::Heatmap(h) => {
                let Some(m) = self.model.as_mut().filter(|_| current == Some(h.model)) else {
                    return;
                };
                keep_newest(&mut m.heatmap, h, |h| h.generation);
            }
            Event::Metrics(s) => {
                let Some(m) = self.model.as_mut().filter(|_| current == Some(s.model)) else {
                    return;
                };
                keep_newest(&mut m.metrics, s, |s| s.generation);
            }
            Event::EvalChanged { model, info } => {
                let Some(m) = self.model.as_mut().filter(|_| current == Some(model)) else {
                    return;
                };
                m.eval = info;
                m.metrics = None;
                // Ask again so the worker measures the current settings on the new data.
                self.sent = None;
                // Curves measured on other data plan nothing now; the planned targets stay, as
                // the user's own layer-wise settings.
                self.sensitivity = None;
                self.plan = None;
                self.comparison = None;
                self.plan_sent = None;
                self.plan_pending = false;
                if self.settings.scope == crate::prune::Scope::Sensitivity {
                    self.settings.scope = crate::prune::Scope::Layer;
                    self.notice = Some(
                        "Other data: the sensitivity plan's targets are kept as layer-wise \
                         targets; run the analysis on the new data to plan again."
                            .into(),
                    );
                }
            }
            Event::OwlPlanned { model, settings } => {
                if current == Some(model) {
                    // Only the targets: anything else changed while OWL ran stays.
                    self.settings.scope = settings.scope;
                    for (name, l) in &settings.layers {
                        self.settings.layer_mut(name).sparsity = l.sparsity;
                    }
                    self.notice = Some(
                        "OWL set each layer's target from its outliers: layer-wise scope, the \
                         table's sliders show them."
                            .into(),
                    );
                }
            }
            Event::CriteriaCompared { model, result } => {
                if current == Some(model) {
                    self.criteria = Some(result);
                }
            }
            Event::Latency {
                model,
                report,
                sizes,
            } => {
                if current == Some(model) {
                    self.latency = Some(report);
                    self.latency_sizes = sizes;
                }
            }
            Event::Sensitivity { model, result } => {
                if current == Some(model) {
                    self.sensitivity = Some(result);
                    // New curves: plan again.
                    self.plan_sent = None;
                }
            }
            Event::Plan {
                generation,
                model,
                result,
            } => {
                if current != Some(model) || generation != self.plan_generation {
                    return;
                }
                self.plan_pending = false;
                // Only a plan for what the settings ask now (not one overtaken by an edit
                // whose request could not be sent yet).
                if self.plan_sent.as_ref() != Some(&plan_key(&self.settings)) {
                    return;
                }
                if let Ok(p) = &result
                    && self.settings.scope == crate::prune::Scope::Sensitivity
                {
                    p.apply(&mut self.settings);
                }
                self.plan = Some(result);
            }
            Event::Comparison { model, rows } => {
                if current == Some(model) {
                    self.comparison = Some(rows);
                }
            }
            Event::Training { model, update } => {
                if current != Some(model) {
                    return;
                }
                use crate::worker::TrainUpdate as U;
                match update {
                    U::Started { kind, start } => {
                        self.training = Some(super::recovery::TrainView {
                            kind,
                            start,
                            ..Default::default()
                        });
                    }
                    other => {
                        let Some(v) = self.training.as_mut() else {
                            return;
                        };
                        match other {
                            U::Epoch(e) => v.epochs.push(e),
                            U::Timeline(t) => v.timeline.push(t),
                            U::Level(l) => v.levels.push(l),
                            U::LotteryDense(d) => v.lottery_dense = Some(d),
                            U::Done(msg) => v.done = Some(msg),
                            U::Started { .. } => {}
                        }
                    }
                }
            }
            Event::Recorded { model, record } => {
                let Some(m) = self.model.as_mut().filter(|_| current == Some(model)) else {
                    return;
                };
                m.history.retain(|r| !r.same_configuration(&record));
                m.history.push(record);
            }
            Event::PreviewError { generation, error } => match self.model.as_mut() {
                // A failure outside a preview (a plan, for one) must not leave previews held.
                Some(_) | None if generation == 0 && self.plan_pending => {
                    self.plan_pending = false;
                    self.errors.push(error);
                }
                Some(m) if generation > 0 => m.preview_error = Some((generation, error)),
                _ => self.errors.push(error),
            },
        }
    }
}

/// What a sensitivity plan depends on: the settings without the per-layer targets it sets.
fn plan_key(s: &PruneSettings) -> PruneSettings {
    let mut k = s.clone();
    for l in k.layers.values_mut() {
        l.sparsity = 0.0;
    }
    k
}

/// Stores `new` unless `slot` already holds an answer to a newer preview: answers can arrive
/// out of order relative to what is shown, and an older one must not replace a newer one.
/// Returns whether it was stored.
fn keep_newest<T>(slot: &mut Option<T>, new: T, generation: impl Fn(&T) -> u64) -> bool {
    let newer = slot
        .as_ref()
        .is_none_or(|old| generation(old) <= generation(&new));
    if newer {
        *slot = Some(new);
    }
    newer
}

/// Answers from file dialogs, which run on their own threads so the UI never waits on them.
enum DialogAnswer {
    Open(Option<PathBuf>),
    DataFile(Option<PathBuf>),
    SaveAs(super::dialogs::ExportTarget, Option<PathBuf>),
    SaveFile(SaveTarget, Option<PathBuf>),
    /// A file written off the UI thread (the chart's PNG): what was written, or the error.
    Saved(Result<String, String>),
}

/// Files the sensitivity and history windows save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaveTarget {
    Sensitivity(super::sensitivity::SaveKind),
    HistoryCsv,
    LotteryCsv,
}

/// The desktop app.
pub struct App {
    worker: WorkerHandle,
    state: AppState,
    controls: ControlsPanel,
    table: LayerTable,
    histogram: HistogramPanel,
    overview: OverviewPanel,
    heatmap: HeatmapPanel,
    open_path: OpenPathDialog,
    data: DataDialog,
    gallery: super::gallery::GalleryPanel,
    sensitivity: super::sensitivity::SensitivityPanel,
    latency: super::latency::LatencyPanel,
    criteria: super::criteria::CriteriaPanel,
    history: super::history::HistoryPanel,
    recovery: super::recovery::RecoveryPanel,
    export: ExportDialog,
    dialog_tx: Sender<DialogAnswer>,
    dialog_rx: Receiver<DialogAnswer>,
    dialog_open: bool,
    ctx: Option<egui::Context>,
}

impl App {
    /// Builds the app and starts opening `initial` (or the bundled sample model).
    pub fn new(cc: &eframe::CreationContext<'_>, initial: Option<PathBuf>) -> App {
        let prefs = cc
            .storage
            .and_then(|s| eframe::get_value::<Prefs>(s, PREFS_KEY))
            .unwrap_or_default();
        Self::with_prefs(&cc.egui_ctx, initial, prefs)
    }

    /// Builds the app without eframe storage (tests use this).
    pub fn with_prefs(ctx: &egui::Context, initial: Option<PathBuf>, prefs: Prefs) -> App {
        theme::install(ctx);
        let wake_ctx = ctx.clone();
        let worker = WorkerHandle::spawn(move || wake_ctx.request_repaint());
        let (dialog_tx, dialog_rx) = unbounded();
        let mut app = App {
            worker,
            state: AppState::new(prefs),
            controls: ControlsPanel::default(),
            table: LayerTable::default(),
            histogram: HistogramPanel::default(),
            overview: OverviewPanel,
            heatmap: HeatmapPanel::default(),
            open_path: OpenPathDialog::default(),
            data: DataDialog::default(),
            gallery: Default::default(),
            sensitivity: Default::default(),
            latency: Default::default(),
            criteria: Default::default(),
            history: Default::default(),
            recovery: Default::default(),
            export: ExportDialog::default(),
            dialog_tx,
            dialog_rx,
            dialog_open: false,
            ctx: Some(ctx.clone()),
        };
        app.open(initial.map_or(OpenSource::Sample, OpenSource::Path));
        app
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn state_mut(&mut self) -> &mut AppState {
        &mut self.state
    }

    /// Whether the worker is running a job (opening, exporting, scoring).
    pub fn busy(&self) -> bool {
        !self.state.jobs.is_empty()
    }

    /// Opens a model file in the background; the current model stays until it has loaded.
    pub fn open_path(&mut self, path: PathBuf) {
        self.open(OpenSource::Path(path));
    }

    fn open(&mut self, source: OpenSource) {
        match self.worker.open(source) {
            Ok(job) => {
                self.state.open_jobs.insert(job);
            }
            Err(e) => self.state.errors.push(e.to_string()),
        }
    }

    /// Starts an export of the current settings.
    pub fn export(&mut self, request: ExportRequest) {
        if let Err(e) = self.worker.export(request) {
            self.state.errors.push(e.to_string());
        }
    }

    /// Runs a native file dialog on its own thread (the UI never waits on it); its answer
    /// comes back through `dialog_rx`. One at a time. Returns false if no thread could start.
    fn spawn_dialog(
        &mut self,
        ctx: &egui::Context,
        ask: impl FnOnce() -> DialogAnswer + Send + 'static,
    ) -> bool {
        if self.dialog_open {
            return true;
        }
        let tx = self.dialog_tx.clone();
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("file-dialog".into())
            .spawn(move || {
                let _ = tx.send(ask());
                ctx.request_repaint();
            });
        self.dialog_open = spawned.is_ok();
        self.dialog_open
    }

    fn pick_file(&mut self, ctx: &egui::Context) {
        let spawned = self.spawn_dialog(ctx, || {
            DialogAnswer::Open(
                rfd::FileDialog::new()
                    .set_title("Open a model")
                    .add_filter(
                        "Models",
                        // `json`: a sharded checkpoint's *.safetensors.index.json.
                        &["safetensors", "pt", "pth", "bin", "npz", "onnx", "json"],
                    )
                    .add_filter("All files", &["*"])
                    .pick_file(),
            )
        });
        if !spawned {
            self.open_path.open = true;
        }
    }

    fn pick_data_file(&mut self, ctx: &egui::Context) {
        self.spawn_dialog(ctx, || {
            DialogAnswer::DataFile(
                rfd::FileDialog::new()
                    .set_title("Evaluation data")
                    .add_filter("Arrays", &["npz", "safetensors"])
                    .add_filter("All files", &["*"])
                    .pick_file(),
            )
        });
    }

    fn pick_save_path(
        &mut self,
        ctx: &egui::Context,
        target: super::dialogs::ExportTarget,
        current: PathBuf,
    ) {
        self.spawn_dialog(ctx, move || {
            let mut d = rfd::FileDialog::new().set_title(target.title());
            if let Some(dir) = current.parent().filter(|d| d.is_dir()) {
                d = d.set_directory(dir);
            }
            if let Some(name) = current.file_name() {
                d = d.set_file_name(name.to_string_lossy());
            }
            DialogAnswer::SaveAs(target, d.save_file())
        });
    }

    fn handle_dialog_answers(&mut self) {
        while let Ok(a) = self.dialog_rx.try_recv() {
            self.dialog_open = false;
            match a {
                DialogAnswer::Open(Some(p)) => self.open_path(p),
                DialogAnswer::Open(None) => {
                    self.state.notice = Some(
                        "No file chosen. If no dialog appeared, this desktop has no file-chooser portal: \
                         use File → Open path… or drop a file on the window."
                            .into(),
                    );
                }
                DialogAnswer::SaveAs(target, Some(p)) => self.export.set_path(target, p),
                DialogAnswer::SaveAs(_, None) => {}
                DialogAnswer::DataFile(Some(p)) => self.data.path = p.display().to_string(),
                DialogAnswer::DataFile(None) => {}
                DialogAnswer::SaveFile(target, Some(p)) => match target {
                    SaveTarget::Sensitivity(k) => {
                        // The field holds the name without the format's extension.
                        let shown = p.display().to_string();
                        let ext = format!(".{}", k.extension());
                        self.sensitivity.save_path =
                            shown.strip_suffix(&ext).unwrap_or(&shown).to_string();
                    }
                    SaveTarget::HistoryCsv => self.history.save_path = p.display().to_string(),
                    SaveTarget::LotteryCsv => self.save_file(SaveTarget::LotteryCsv, p),
                },
                DialogAnswer::SaveFile(_, None) => {}
                DialogAnswer::Saved(Ok(m)) => self.state.notice = Some(m),
                DialogAnswer::Saved(Err(e)) => self.state.errors.push(e),
            }
        }
    }

    fn pick_save_file(&mut self, ctx: &egui::Context, target: SaveTarget) {
        let (title, name) = match target {
            SaveTarget::Sensitivity(k) => {
                ("Save sensitivity", format!("sensitivity.{}", k.extension()))
            }
            SaveTarget::HistoryCsv => ("Save experiment history", "history.csv".to_string()),
            SaveTarget::LotteryCsv => ("Save lottery runs", "lottery.csv".to_string()),
        };
        self.spawn_dialog(ctx, move || {
            DialogAnswer::SaveFile(
                target,
                rfd::FileDialog::new()
                    .set_title(title)
                    .set_file_name(name)
                    .save_file(),
            )
        });
    }

    /// Writes what a window asked to save to `path` (atomically; never over the open model).
    fn save_file(&mut self, target: SaveTarget, path: PathBuf) {
        use std::io::Write;
        let inputs: Vec<(&'static str, PathBuf)> = self
            .state
            .model
            .as_ref()
            .map(|m| {
                m.snapshot
                    .inputs
                    .iter()
                    .map(|p| ("an input of the open model", p.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let inputs: Vec<(&'static str, &Path)> =
            inputs.iter().map(|(w, p)| (*w, p.as_path())).collect();
        if let Err(e) = crate::export::check_outputs(&inputs, &[("output", path.as_path())]) {
            self.state.errors.push(e.to_string());
            return;
        }
        let text = match target {
            SaveTarget::Sensitivity(super::sensitivity::SaveKind::Png) => {
                return self.save_chart_png(path);
            }
            SaveTarget::Sensitivity(super::sensitivity::SaveKind::Csv) => {
                self.state.sensitivity.as_ref().map(|s| s.to_csv())
            }
            SaveTarget::Sensitivity(super::sensitivity::SaveKind::Json) => {
                self.state.sensitivity.as_ref().map(|s| s.to_json())
            }
            SaveTarget::LotteryCsv => self.state.training.as_ref().map(|v| {
                let mut csv = String::from("level,remaining,ticket,reinit,random_mask\n");
                for l in &v.levels {
                    csv.push_str(&format!(
                        "{},{},{},{},{}\n",
                        l.level, l.remaining, l.ticket, l.reinit, l.random_mask
                    ));
                }
                csv
            }),
            SaveTarget::HistoryCsv => self.state.model.as_ref().map(|m| {
                crate::history::History {
                    model_hash: m.snapshot.hash.clone().unwrap_or_default(),
                    records: m.history.iter().map(|r| (**r).clone()).collect(),
                }
                .to_csv()
            }),
        };
        let Some(text) = text else {
            self.state.errors.push("Nothing to save yet.".into());
            return;
        };
        match crate::util::atomic_write(&path, |w| w.write_all(text.as_bytes())) {
            Ok(()) => self.state.notice = Some(format!("Wrote {}", path.display())),
            Err(e) => self.state.errors.push(format!(
                "{}: {}",
                path.display(),
                crate::util::io_message(&e)
            )),
        }
    }

    /// Takes a screenshot of the next frame and writes the chart's region as a PNG.
    fn save_chart_png(&mut self, path: PathBuf) {
        let (Some(rect), Some(ctx)) = (self.sensitivity.plot_rect, self.ctx.clone()) else {
            self.state
                .errors
                .push("The chart is not on screen: open View → Sensitivity.".into());
            return;
        };
        self.sensitivity.open = true;
        let tx = self.dialog_tx.clone();
        let ppp = ctx.pixels_per_point();
        let wake = ctx.clone();
        ctx.request_screenshot(move |image| {
            let region = image.region(&rect, Some(ppp));
            let result = super::write_png(&path, &region)
                .map(|()| format!("Wrote {}", path.display()))
                .map_err(|e| format!("{}: {e}", path.display()));
            let _ = tx.send(DialogAnswer::Saved(result));
            wake.request_repaint();
        });
        ctx.request_repaint();
    }

    fn sensitivity_action(
        &mut self,
        ctx: &egui::Context,
        a: super::sensitivity::SensitivityAction,
    ) {
        use super::sensitivity::SensitivityAction as A;
        match a {
            A::Run { grid, fresh } => {
                let spec = crate::sensitivity::SweepSpec::for_settings(&self.state.settings, grid);
                if let Err(e) = self
                    .worker
                    .sensitivity(spec, self.state.settings.clone(), fresh)
                {
                    self.state.errors.push(e.to_string());
                }
            }
            A::Cancel => {
                for j in self.state.jobs.iter().filter(|j| j.label == "Sensitivity") {
                    self.worker.cancel(j.id);
                }
            }
            A::Compare => {
                if let Err(e) = self.worker.compare(self.state.settings.clone()) {
                    self.state.errors.push(e.to_string());
                }
            }
            A::Save(kind, path) => self.save_file(SaveTarget::Sensitivity(kind), path),
            A::Browse(kind) => self.pick_save_file(ctx, SaveTarget::Sensitivity(kind)),
            A::Restore(s) => self.state.restore(*s),
        }
    }

    fn latency_action(&mut self, a: super::latency::LatencyAction) {
        use super::latency::LatencyAction as A;
        match a {
            A::Run(spec) => {
                if let Err(e) = self.worker.latency(self.state.settings.clone(), spec) {
                    self.state.errors.push(e.to_string());
                }
            }
            A::Cancel => {
                for j in self.state.jobs.iter().filter(|j| j.label == "Latency") {
                    self.worker.cancel(j.id);
                }
            }
        }
    }

    /// Presses the sensitivity window's Run with the default grid (tests).
    pub fn run_sensitivity(&mut self) {
        let ctx = self.ctx.clone().expect("built with a context");
        self.sensitivity_action(
            &ctx,
            super::sensitivity::SensitivityAction::Run {
                grid: crate::sensitivity::DEFAULT_GRID.to_vec(),
                fresh: true,
            },
        );
    }

    fn shortcuts(&mut self, ctx: &egui::Context) {
        let (open, open_path, export, escape) = ctx.input_mut(|i| {
            (
                i.consume_shortcut(&OPEN_SHORTCUT),
                i.consume_shortcut(&OPEN_PATH_SHORTCUT),
                i.consume_shortcut(&EXPORT_SHORTCUT),
                i.key_pressed(Key::Escape),
            )
        });
        // Check the longer shortcut first: Ctrl+Shift+O also matches Ctrl+O's logical keys.
        if open_path {
            self.open_path.open = true;
        } else if open {
            self.pick_file(ctx);
        }
        if export && self.state.model.is_some() {
            self.export.show_for(&self.state);
        }
        if escape {
            for j in &self.state.jobs {
                self.worker.cancel(j.id);
            }
        }
    }

    fn dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        if let Some(p) = dropped.into_iter().next() {
            self.open_path(p);
        }
    }

    fn menu_ui(&mut self, ui: &mut egui::Ui) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                let b = ui.add(egui::Button::new("Open…").shortcut_text(ui.ctx().format_shortcut(&OPEN_SHORTCUT)));
                if b.on_hover_text("Choose a .safetensors, .pt/.pth/.bin, .npz or .onnx file with the system file dialog.").clicked() {
                    self.pick_file(ui.ctx());
                }
                let b = ui.add(egui::Button::new("Open path…").shortcut_text(ui.ctx().format_shortcut(&OPEN_PATH_SHORTCUT)));
                if b.on_hover_text("Type or paste the path of a model file.").clicked() {
                    self.open_path.open = true;
                }
                ui.menu_button("Samples", |ui| {
                    for s in &crate::sample::SAMPLES {
                        if ui.button(s.title).on_hover_text(s.about).clicked() {
                            self.open(OpenSource::NamedSample(s.id));
                        }
                    }
                });
                ui.menu_button("Open recent", |ui| {
                    if self.state.prefs.recent.is_empty() {
                        ui.label("No recent files yet.");
                    }
                    let mut chosen = None;
                    for p in &self.state.prefs.recent {
                        if ui.button(p.display().to_string()).clicked() {
                            chosen = Some(p.clone());
                        }
                    }
                    if let Some(p) = chosen {
                        self.open_path(p);
                    }
                    if !self.state.prefs.recent.is_empty() && ui.button("Clear list").clicked() {
                        self.state.prefs.recent.clear();
                    }
                });
                let b = ui.add_enabled(self.state.model.is_some(), egui::Button::new("Evaluation data…"));
                if b.on_hover_text("Choose the data accuracy (or, without labels, fidelity to the dense model) is measured on.").clicked() {
                    self.data.open = true;
                }
                ui.separator();
                let can_export = self.state.model.is_some();
                let b = ui.add_enabled(
                    can_export,
                    egui::Button::new("Export…").shortcut_text(ui.ctx().format_shortcut(&EXPORT_SHORTCUT)),
                );
                if b.on_hover_text("Write the pruned weights, the masks and a recipe the CLI can replay.").clicked() {
                    self.export.show_for(&self.state);
                }
                ui.separator();
                if ui.button("Quit").clicked() {
                    ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
            ui.menu_button("View", |ui| {
                ui.checkbox(&mut self.state.prefs.log_y, "Log-scale histogram counts")
                    .on_hover_text("Heavy-tailed weight distributions hide their tails on a linear axis.");
                ui.checkbox(&mut self.sensitivity.open, "Sensitivity")
                    .on_hover_text("How much each layer can take: each pruned alone across a grid of sparsities, measured on the data.");
                ui.checkbox(&mut self.criteria.open, "Compare criteria")
                    .on_hover_text("Two criteria at the same settings: how much of their cuts overlap per layer, where they disagree, and what each measures.");
                ui.checkbox(&mut self.latency.open, "Latency")
                    .on_hover_text("What the cut buys in time: each layer in dense, masked, CSR, N:M, block-sparse and rows-removed form, timed on the CPU or a GPU.");
                ui.checkbox(&mut self.recovery.open, "Recover (fine-tune, schedules, lottery)")
                    .on_hover_text("Win back accuracy: fine-tune with the masks held, prune on a schedule, or run the lottery-ticket experiment.");
                ui.checkbox(&mut self.history.open, "Experiment history")
                    .on_hover_text("Every configuration evaluated, metric against size, with the Pareto front; click a point to restore it.");
                ui.checkbox(&mut self.gallery.open, "Dataset samples")
                    .on_hover_text("A gallery of test samples with the dense and the pruned model's predictions: see which ones a cut breaks.");
                if ui.button("Fit heatmap").clicked() {
                    self.heatmap.reset_view();
                }
            });
            ui.menu_button("Help", |ui| {
                ui.label(format!("prunescope {}", env!("CARGO_PKG_VERSION")));
                ui.label("Drop a model file on the window to open it.");
                ui.label("Esc cancels running jobs.");
                ui.label("Heatmap: scroll to zoom, drag to pan, double-click to fit.");
            });
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| self.jobs_ui(ui));
        });
    }

    fn jobs_ui(&mut self, ui: &mut egui::Ui) {
        let mut cancel = None;
        for j in &self.state.jobs {
            if ui
                .small_button("Cancel")
                .on_hover_text("Stop this job; the open model is not changed.")
                .clicked()
            {
                cancel = Some(j.id);
            }
            ui.add(
                egui::ProgressBar::new(j.fraction)
                    .desired_width(160.0)
                    .text(if j.message.is_empty() {
                        j.label.clone()
                    } else {
                        format!("{}: {}", j.label, j.message)
                    }),
            );
        }
        if let Some(id) = cancel {
            self.worker.cancel(id);
        }
        if self.state.jobs.is_empty()
            && let Some(n) = &self.state.notice
        {
            ui.label(egui::RichText::new(n).weak());
        }
    }

    fn errors_ui(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, e) in self.state.errors.iter().enumerate() {
            egui::Frame::new()
                .fill(theme::ERROR_BG)
                .inner_margin(6.0)
                .corner_radius(4.0)
                .show(ui, |ui| {
                    ui.horizontal(|ui| {
                        if ui
                            .small_button("×")
                            .on_hover_text("Dismiss this message")
                            .clicked()
                        {
                            dismiss = Some(i);
                        }
                        ui.label(egui::RichText::new(e).color(theme::ERROR_FG));
                    });
                });
        }
        if let Some(i) = dismiss {
            self.state.errors.remove(i);
        }
    }

    fn main_ui(&mut self, ui: &mut egui::Ui) -> Option<HeatmapRequest> {
        let Self {
            state,
            controls,
            table,
            histogram,
            overview,
            heatmap,
            ..
        } = self;
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(300.0)
            .min_size(240.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| controls.ui(ui, state));
            });
        let Some(model) = &state.model else {
            ui.centered_and_justified(|ui| {
                if state.jobs.is_empty() {
                    ui.label("No model open. Use File → Open, or drop a model file here.");
                } else {
                    ui.spinner();
                }
            });
            return None;
        };
        let snapshot = model.snapshot.clone();
        let mut heatmap_request = None;
        egui::Panel::bottom("detail")
            .resizable(true)
            .default_size(380.0)
            .min_size(200.0)
            .show(ui, |ui| {
                let selected = state.selected;
                ui.columns(2, |cols| {
                    let (left, right) = cols.split_at_mut(1);
                    let left = &mut left[0];
                    let right = &mut right[0];
                    let model = state.model.as_ref().expect("checked above");
                    let h = left.available_height();
                    left.allocate_ui(egui::vec2(left.available_width(), h * 0.62), |ui| {
                        histogram.ui(ui, model, &state.settings, selected, state.prefs.log_y);
                    });
                    if let Some(t) = overview.ui(left, model, &state.settings) {
                        state.selected = Some(t);
                    }
                    heatmap_request = heatmap.ui(right, model, selected);
                });
            });
        egui::CentralPanel::default().show(ui, |ui| {
            table.ui(ui, state, &snapshot);
        });
        heatmap_request
    }
}

impl eframe::App for App {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        let start = Instant::now();
        while start.elapsed() < EVENT_BUDGET {
            let Some(e) = self.worker.try_recv() else {
                break;
            };
            self.state.handle(e);
        }
        if !self.worker.events().is_empty() {
            ctx.request_repaint();
        }
        self.handle_dialog_answers();
        self.shortcuts(ctx);
        self.dropped_files(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::Panel::top("menu").show(ui, |ui| self.menu_ui(ui));
        if !self.state.errors.is_empty() {
            egui::Panel::top("errors").show(ui, |ui| self.errors_ui(ui));
        }
        egui::Panel::bottom("summary").show(ui, |ui| summary::ui(ui, &self.state));
        let heatmap_request = self.main_ui(ui);

        let ctx = ui.ctx().clone();
        self.gallery.ui(&ctx, &self.state);
        if std::mem::take(&mut self.controls.plan_owl)
            && let Err(e) = self.worker.owl_plan(self.state.settings.clone())
        {
            self.state.errors.push(e.to_string());
        }
        if std::mem::take(&mut self.controls.run_sparsegpt)
            && let Err(e) = self.worker.sparsegpt(self.state.settings.clone())
        {
            self.state.errors.push(e.to_string());
        }
        if std::mem::take(&mut self.controls.undo)
            && let Some(m) = self.state.model.as_ref()
        {
            let _ = self.worker.send(crate::worker::Command::Undo {
                model: m.snapshot.id,
            });
        }
        if std::mem::take(&mut self.controls.open_sensitivity) {
            self.sensitivity.open = true;
        }
        if let Some(a) = self.sensitivity.ui(&ctx, &self.state) {
            self.sensitivity_action(&ctx, a);
        }
        if let Some(a) = self.latency.ui(&ctx, &self.state) {
            self.latency_action(a);
        }
        if let Some(super::criteria::CriteriaAction::Compare(other)) =
            self.criteria.ui(&ctx, &self.state)
            && let Err(e) = self
                .worker
                .compare_criteria(self.state.settings.clone(), other)
        {
            self.state.errors.push(e.to_string());
        }
        if let Some(a) = self.recovery.ui(&ctx, &self.state) {
            use super::recovery::RecoveryAction as R;
            match a {
                R::Start(request) => {
                    if let Err(e) = self.worker.train(request) {
                        self.state.errors.push(e.to_string());
                    }
                }
                R::Cancel => {
                    for j in self.state.jobs.iter().filter(|j| {
                        matches!(
                            j.label.as_str(),
                            "Fine-tuning" | "Pruning on a schedule" | "Lottery tickets"
                        )
                    }) {
                        self.worker.cancel(j.id);
                    }
                }
                R::SaveLottery(path) => self.save_file(SaveTarget::LotteryCsv, path),
                R::Undo => {
                    if let Some(m) = &self.state.model {
                        let _ = self.worker.send(crate::worker::Command::Undo {
                            model: m.snapshot.id,
                        });
                    }
                }
            }
        }
        if let Some(a) = self.history.ui(&ctx, &self.state) {
            match a {
                super::history::HistoryAction::Restore(s) => self.state.restore(*s),
                super::history::HistoryAction::SaveCsv(path) => {
                    self.save_file(SaveTarget::HistoryCsv, path)
                }
                super::history::HistoryAction::Browse => {
                    self.pick_save_file(&ctx, SaveTarget::HistoryCsv)
                }
                super::history::HistoryAction::Clear => {
                    if let Some(m) = self.state.model.as_mut() {
                        m.history.clear();
                        let _ = self.worker.send(crate::worker::Command::ClearHistory {
                            model: m.snapshot.id,
                        });
                    }
                }
            }
        }
        let mut browse = false;
        if let Some(source) = self.data.ui(&ctx, &mut browse) {
            match self.worker.set_data(source) {
                Ok(_) => {}
                Err(e) => self.state.errors.push(e.to_string()),
            }
        }
        if browse {
            self.pick_data_file(&ctx);
        }
        if let Some(action) = self.open_path.ui(&ctx, &self.state.prefs.recent) {
            self.open_path(action);
        }
        match self.export.ui(&ctx, &self.state) {
            Some(super::dialogs::ExportAction::Run(request)) => self.export(request),
            Some(super::dialogs::ExportAction::Browse(target, current)) => {
                self.pick_save_path(&ctx, target, current)
            }
            None => {}
        }
        drop_overlay(&ctx);
        self.state.sync_plan(&self.worker);
        self.state.sync_preview(&self.worker, heatmap_request);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, PREFS_KEY, &self.state.prefs);
    }
}

/// Dims the window while files are dragged over it, so the user knows a drop will open them.
fn drop_overlay(ctx: &egui::Context) {
    let hovering = ctx.input(|i| !i.raw.hovered_files.is_empty());
    if !hovering {
        return;
    }
    let painter = ctx.layer_painter(egui::LayerId::new(
        egui::Order::Foreground,
        egui::Id::unique("drop_overlay"),
    ));
    let rect = ctx.content_rect();
    painter.rect_filled(rect, 0.0, egui::Color32::from_black_alpha(180));
    painter.text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        "Drop to open this model",
        egui::FontId::proportional(24.0),
        egui::Color32::WHITE,
    );
}
