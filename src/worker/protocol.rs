//! Everything that crosses between the UI and the worker.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use crate::analysis::{HeatmapView, Histogram, HistogramSplit, SizeReport};
use crate::eval::Metrics;
use crate::progress::CancelFlag;
use crate::prune::{Allocation, PruneSettings};

/// Identifies a job for progress, cancel and results.
pub type JobId = u64;

/// Identifies an opened model; answers about an older model are dropped by the UI.
pub type ModelId = u64;

/// UI → worker.
#[derive(Debug)]
pub enum Command {
    /// Open a model; the current one stays open until this one has loaded and been analysed.
    Open {
        job: JobId,
        cancel: CancelFlag,
        source: OpenSource,
    },
    /// The state the UI wants shown. Only the newest queued preview runs.
    Preview(Box<PreviewRequest>),
    /// Write pruned weights, masks and/or a recipe.
    Export {
        job: JobId,
        cancel: CancelFlag,
        request: ExportRequest,
    },
    /// Evaluate the open model on other data from now on.
    SetData {
        job: JobId,
        cancel: CancelFlag,
        source: crate::eval::DataSource,
    },
    /// Measure every layer's sensitivity (from the cache when it holds this sweep).
    Sensitivity {
        job: JobId,
        cancel: CancelFlag,
        spec: crate::sensitivity::SweepSpec,
        /// Which tensors are prunable (and so swept).
        settings: PruneSettings,
        /// Measure again even when the cache has the answer.
        fresh: bool,
    },
    /// Split the settings' target across layers by the current sensitivity curves.
    Plan {
        generation: u64,
        model: ModelId,
        settings: PruneSettings,
    },
    /// Plan the settings' target with every rule and measure each plan.
    Compare {
        job: JobId,
        cancel: CancelFlag,
        settings: PruneSettings,
    },
    /// Forget the open model's experiment history.
    ClearHistory { model: ModelId },
    /// Train the open model: fine-tune, a schedule, or the lottery-ticket experiment.
    Train {
        job: JobId,
        cancel: CancelFlag,
        request: TrainRequest,
    },
    /// Bring back the model the last fine-tune or schedule replaced.
    Undo { model: ModelId },
    /// Measure the layers pruned by `settings` in every storage format (its own thread).
    Latency {
        job: JobId,
        cancel: CancelFlag,
        settings: PruneSettings,
        spec: crate::latency::LatencySpec,
    },
    /// Prune with `settings` and again with criterion `other` in its place; compare the masks
    /// layer by layer and measure both.
    CompareCriteria {
        job: JobId,
        cancel: CancelFlag,
        settings: PruneSettings,
        other: crate::prune::Criterion,
    },
    /// Split the settings' global target across layers by OWL (outlier-weighted).
    OwlPlan {
        job: JobId,
        cancel: CancelFlag,
        settings: PruneSettings,
    },
    /// Prune the open model with SparseGPT at `settings`' targets; the result, with its updated
    /// weights, replaces it (Undo brings the original back).
    SparseGpt {
        job: JobId,
        cancel: CancelFlag,
        settings: PruneSettings,
    },
    /// A job that panics, to prove panics are contained (tests and `--self-test`).
    #[doc(hidden)]
    PanicForTest { job: JobId },
    /// Stop the worker thread.
    Shutdown,
}

#[derive(Clone, Debug, PartialEq)]
pub enum OpenSource {
    Path(PathBuf),
    /// The sample model compiled into the binary.
    Sample,
    /// One of the bundled samples, by id (`mlp`, `cnn`, `rescnn`).
    NamedSample(&'static str),
}

/// What the UI wants computed for the current model.
#[derive(Clone, Debug, PartialEq)]
pub struct PreviewRequest {
    /// Increases with every request; answers carry it so stale ones can be dropped.
    pub generation: u64,
    pub model: ModelId,
    pub settings: PruneSettings,
    /// Tensor whose histogram split is wanted.
    pub selected: Option<usize>,
    pub heatmap: Option<HeatmapRequest>,
}

/// A region of a tensor's 2-D view, to be shown in at most `max_w × max_h` cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeatmapRequest {
    pub tensor: usize,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    pub max_w: usize,
    pub max_h: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExportRequest {
    pub settings: PruneSettings,
    pub weights: Option<PathBuf>,
    pub masks: Option<PathBuf>,
    pub recipe: Option<PathBuf>,
    /// The structurally pruned model made smaller (see [`crate::export::compact`]).
    pub compacted: Option<PathBuf>,
}

impl ExportRequest {
    /// The chosen outputs, labelled as the export dialog labels them.
    pub fn outputs(&self) -> Vec<(&'static str, &std::path::Path)> {
        [
            ("Pruned weights", &self.weights),
            ("Masks", &self.masks),
            ("Recipe", &self.recipe),
            ("Compacted model", &self.compacted),
        ]
        .into_iter()
        .filter_map(|(what, p)| p.as_deref().map(|p| (what, p)))
        .collect()
    }
}

/// Worker → UI.
#[derive(Debug)]
pub enum Event {
    JobStarted {
        job: JobId,
        label: String,
    },
    Progress {
        job: JobId,
        fraction: f32,
        message: String,
    },
    JobFinished {
        job: JobId,
        message: String,
    },
    JobFailed {
        job: JobId,
        error: String,
    },
    JobCancelled {
        job: JobId,
    },
    /// A model finished loading and replaced the previous one.
    ModelOpened(Arc<ModelSnapshot>),
    /// Counts for new settings: the table, summary and overview.
    Preview(Arc<PreviewSnapshot>),
    /// Kept/pruned split of the selected tensor's histogram.
    LayerDetail(Arc<LayerDetail>),
    Heatmap(Arc<HeatmapSnapshot>),
    /// Accuracy and loss for the settings of `generation`.
    Metrics(MetricsSnapshot),
    /// The open model is now evaluated on other data; earlier metrics no longer apply.
    EvalChanged {
        model: ModelId,
        info: EvalInfo,
    },
    /// Sensitivity curves so far (sent as points arrive, and when the sweep ends).
    Sensitivity {
        model: ModelId,
        result: Arc<crate::sensitivity::Sensitivity>,
    },
    /// A sensitivity plan for the settings of `generation`.
    Plan {
        generation: u64,
        model: ModelId,
        result: Result<Arc<crate::sensitivity::Plan>, String>,
    },
    /// Every rule's plan at one target, measured.
    Comparison {
        model: ModelId,
        rows: Arc<Vec<CompareRow>>,
    },
    /// Progress of a training job.
    Training {
        model: ModelId,
        update: TrainUpdate,
    },
    /// Latency measured so far (after each layer), then the storage sizes at the end.
    Latency {
        model: ModelId,
        report: Arc<crate::latency::LatencyReport>,
        sizes: Option<Arc<Vec<crate::analysis::StorageSize>>>,
    },
    /// Layer-wise targets planned by OWL from the global target.
    OwlPlanned {
        model: ModelId,
        settings: PruneSettings,
    },
    /// Two criteria at the same settings, compared.
    CriteriaCompared {
        model: ModelId,
        result: Arc<CriteriaComparison>,
    },
    /// A configuration was evaluated and added to the experiment history.
    Recorded {
        model: ModelId,
        record: Arc<crate::history::Record>,
    },
    /// Settings the worker could not apply (invalid N:M, unknown tensor…).
    PreviewError {
        generation: u64,
        error: String,
    },
}

/// What to train.
#[derive(Clone, Debug)]
pub enum TrainRequest {
    /// Fine-tune the model pruned by `settings`, masks held.
    Finetune {
        settings: PruneSettings,
        config: crate::train::FinetuneConfig,
        device: crate::train::TrainDevice,
    },
    /// Prune the dense model to `target` on a schedule.
    Schedule {
        target: f64,
        schedule: crate::train::Schedule,
        config: crate::train::FinetuneConfig,
    },
    /// Iterative magnitude pruning with rewinding against two controls.
    Lottery {
        levels: usize,
        rate: f64,
        rewind: crate::train::Rewind,
        config: crate::train::FinetuneConfig,
    },
}

/// A training job's progress, streamed as it happens.
#[derive(Clone, Debug)]
pub enum TrainUpdate {
    /// A run began: what it is, and the accuracy it starts from.
    Started {
        kind: &'static str,
        start: f64,
    },
    Epoch(crate::train::EpochStats),
    Timeline(crate::train::TimelinePoint),
    /// The dense model the lottery starts from, then each level.
    LotteryDense(f64),
    Level(crate::train::LotteryLevel),
    /// Finished: what happened, in a sentence.
    Done(String),
}

/// One rule's plan and what it measured.
#[derive(Debug, Clone)]
pub struct CompareRow {
    pub plan: Result<crate::sensitivity::Plan, String>,
    /// The settings the plan makes (restorable).
    pub settings: Option<PruneSettings>,
    pub measured: Option<Result<Metrics, String>>,
    pub nonzeros: u64,
}

/// Static facts about a tensor, for the table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub numel: usize,
    pub analysable: bool,
    pub default_prunable: bool,
    /// NaN and ±Inf weights (ranked below / above every number by the criteria).
    pub nan: u64,
    pub inf: u64,
}

/// An opened model, as the UI sees it.
#[derive(Debug)]
pub struct ModelSnapshot {
    pub id: ModelId,
    pub name: String,
    pub path: Option<PathBuf>,
    pub format: &'static str,
    pub tensors: Vec<TensorInfo>,
    pub histograms: Vec<Option<Arc<Histogram>>>,
    pub total_params: u64,
    pub data_bytes: u64,
    /// How the model is evaluated as it opens (File → Evaluation data… changes it later).
    pub eval: EvalInfo,
    pub load_ms: f64,
    /// Every file the model was read from (the file, external data): outputs must not be one.
    pub inputs: Vec<PathBuf>,
    /// SHA-256 of the model's bytes, for runnable models (history and caches are keyed by it).
    pub hash: Option<String>,
    /// Configurations evaluated on this model before, oldest first.
    pub history: Vec<crate::history::Record>,
    /// Estimated FLOPs per sample of the dense model, where the graph's shapes are known.
    pub dense_flops: Option<f64>,
    /// The dependency groups of the model's graph (which tensor slices go together with each
    /// channel), or why there are none.
    pub groups: Result<Arc<crate::graph::Groups>, String>,
    /// Made by prunescope from the model that was open ("fine-tuned", "undone"): the UI keeps
    /// its settings instead of starting over.
    pub derived: Option<String>,
    /// Settings to take with this model (a schedule's result: its per-layer targets).
    pub adopt: Option<PruneSettings>,
    /// Undo can bring back the model this one replaced.
    pub can_undo: bool,
}

/// Two criteria's cuts at the same settings: their masks, per-layer overlap and metrics.
#[derive(Debug)]
pub struct CriteriaComparison {
    pub criteria: [crate::prune::Criterion; 2],
    pub settings: PruneSettings,
    pub masks: [Arc<crate::prune::MaskSet>; 2],
    pub overlap: Vec<crate::analysis::LayerOverlap>,
    /// Measured on the evaluation data, where the model runs (the error otherwise).
    pub metrics: [Option<Result<Metrics, String>>; 2],
}

/// How the open model is evaluated: on what, by which engine, and its dense figures.
#[derive(Clone, Debug, Default)]
pub struct EvalInfo {
    /// What the evaluator measures, if the model can be run.
    pub evaluator: Option<String>,
    /// The engine that runs it, and whether prunescope can train it there.
    pub engine: Option<crate::eval::Engine>,
    /// Why the model cannot be evaluated, when it has a graph that cannot run.
    pub error: Option<String>,
    pub dense: Option<Metrics>,
    /// The first samples of the evaluation data, for the gallery.
    pub samples: Option<Arc<crate::eval::SampleView>>,
}

#[derive(Debug)]
pub struct PreviewSnapshot {
    pub generation: u64,
    pub model: ModelId,
    pub alloc: Allocation,
    pub sizes: SizeReport,
    pub compute_us: f64,
}

#[derive(Debug)]
pub struct LayerDetail {
    pub generation: u64,
    pub model: ModelId,
    pub tensor: usize,
    pub split: HistogramSplit,
}

#[derive(Debug)]
pub struct HeatmapSnapshot {
    pub generation: u64,
    pub model: ModelId,
    pub request: HeatmapRequest,
    pub view: HeatmapView,
}

#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    pub generation: u64,
    pub model: ModelId,
    pub result: Result<Metrics, String>,
    /// Dense and pruned top-1 predictions on the gallery's samples.
    pub predictions: Option<Arc<crate::eval::Predictions>>,
}
