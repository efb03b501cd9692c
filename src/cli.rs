//! The command line: a second face on the same core as the GUI.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::data::DataSpec;
use crate::eval::{DataSource, EnginePref, Evaluator, evaluator_with};
use crate::export::{Recipe, check_outputs, export_masks, export_weights};
use crate::model::Model;
use crate::progress::{CancelFlag, Progress};
use crate::prune::{Criterion, Pattern, PruneSettings, Scope, ScoreInputs, prune};
use crate::util::{group_digits, human_bytes, printable};

#[derive(Parser, Debug)]
#[command(
    name = "prunescope",
    version,
    about = "Open a neural network, shape its sparsity, see what each cut costs.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// A model to open in the app (same as `prunescope gui MODEL`).
    pub model: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open the desktop app (the default), on MODEL or on the bundled sample.
    Gui { model: Option<PathBuf> },
    /// Print every tensor: shape, dtype, parameters, zeros, whether it is prunable.
    Inspect {
        model: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The dependency groups of a model's graph: the tensor slices removed together with each
    /// output channel (conv filters, Linear neurons), and the channels that cannot be removed.
    Groups {
        model: PathBuf,
        /// Print {"groups": [{"channels": C, "members": [{"tensor": NAME, "axis": A}]}]}.
        #[arg(long)]
        json: bool,
    },
    /// Prune a model and write the pruned weights (and optionally masks and a recipe).
    Prune(PruneArgs),
    /// Make a structurally pruned model physically smaller: every channel its masks leave
    /// unused is removed from each tensor of its dependency group (safetensors out, with the
    /// graph; outputs equal the masked model's).
    Compact(CompactArgs),
    /// Evaluate a model, dense or pruned, on data: accuracy, loss and, when pruned, fidelity.
    Eval(EvalArgs),
    /// Prune each layer alone across a grid of sparsities and measure the model: how much
    /// each layer can take.
    Sensitivity(SensitivityArgs),
    /// Fine-tune a pruned model with its masks held (pruned weights stay exactly zero).
    Finetune(FinetuneArgs),
    /// Prune to a target on a schedule (one-shot, iterative, gradual AGP) with fine-tuning.
    Schedule(ScheduleArgs),
    /// The lottery-ticket experiment: iterative magnitude pruning with rewinding, against a
    /// re-initialised and a random-mask control.
    Lottery(LotteryArgs),
    /// Train the sample MLP on the bundled digits data (fixed seed) and save it with its
    /// initial weights.
    Train(TrainArgs),
    /// Benchmarks that print JSON.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

/// How to prune: the flags `prune` and `eval` share.
#[derive(Args, Debug, Default)]
pub struct PruneFlags {
    /// Fraction of prunable weights to remove (0..=1). Not needed for N:M or --recipe.
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// global: one threshold across all prunable tensors; layer: S in every tensor;
    /// sensitivity: per-layer targets planned from measured sensitivity curves (needs data);
    /// owl: per-layer targets from each layer's share of outlier Wanda scores (needs data).
    #[arg(long, default_value = "global")]
    pub scope: String,
    /// --scope owl: a score is an outlier above this many times its layer's mean.
    #[arg(long, default_value_t = crate::prune::owl::DEFAULT_M)]
    pub owl_m: f64,
    /// --scope owl: layers' targets range over S ± this.
    #[arg(long, default_value_t = crate::prune::owl::DEFAULT_LAMBDA)]
    pub owl_lambda: f64,
    /// How --scope sensitivity splits the budget: marginal (equal marginal loss), threshold
    /// (one tolerated drop, bisected), inverse (inversely proportional to the drop), uniform
    /// or global.
    #[arg(long, default_value = "marginal")]
    pub rule: String,
    /// The sensitivity grid for --scope sensitivity (default 0,0.1,…,0.9,0.95,0.99).
    #[arg(long)]
    pub grid: Option<String>,
    /// Global scope: every tensor keeps at least this fraction of its weights.
    #[arg(long, default_value_t = 0.0)]
    pub min_keep: f64,
    /// magnitude, l2, lamp, taylor, obd, wanda or random. taylor, obd and wanda score on
    /// calibration samples: the first --calibration samples of --data (or of the model's own
    /// dataset).
    #[arg(long, default_value = "magnitude")]
    pub criterion: String,
    /// Seed of the random criterion.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Calibration samples for taylor, obd and wanda.
    #[arg(long, default_value_t = crate::prune::DEFAULT_CALIBRATION)]
    pub calibration: usize,
    /// unstructured, or N:M such as 2:4.
    #[arg(long, default_value = "unstructured")]
    pub pattern: String,
    /// What goes at once: unstructured, N:M, block:B (b × b blocks of each layer), neuron (a
    /// Linear's output with its dependency group), channel (a conv filter with its group) or
    /// head (an attention head of an ONNX transformer: its query, key and value features and
    /// the output projection's matching inputs). Overrides --pattern.
    #[arg(long)]
    pub granularity: Option<String>,
    /// Structured cuts keep widths that are multiples of this (1: any width).
    #[arg(long, default_value_t = 8)]
    pub round_width: usize,
    /// Replay a recipe saved by the GUI or by --save-recipe instead of the flags above.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Apply the recipe even though it was made on a different file.
    #[arg(long)]
    pub ignore_hash: bool,
}

impl PruneFlags {
    /// Whether any flag asks for pruning.
    fn any(&self) -> bool {
        self.sparsity.is_some()
            || self.recipe.is_some()
            || self.pattern != "unstructured"
            || self
                .granularity
                .as_deref()
                .is_some_and(|g| g != "unstructured")
    }
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    pub model: PathBuf,
    #[command(flatten)]
    pub flags: PruneFlags,
    /// Data that --scope sensitivity measures on: `digits` or a .npz / .safetensors file.
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long)]
    pub x: Option<String>,
    #[arg(long)]
    pub y: Option<String>,
    /// Where to write the pruned weights (.safetensors, or .onnx for an ONNX model).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the masks (safetensors, u8, 1 = kept).
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// Also write the recipe that reproduces this result.
    #[arg(long)]
    pub save_recipe: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CompactArgs {
    pub model: PathBuf,
    /// Masks saved by `prune --masks` or the app (safetensors, u8, 1 = kept).
    #[arg(long, conflicts_with = "recipe", required_unless_present = "recipe")]
    pub masks: Option<PathBuf>,
    /// A recipe to replay for the masks (for data-driven criteria, with --data).
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Apply the recipe even though it was made on a different file.
    #[arg(long)]
    pub ignore_hash: bool,
    /// Data for a recipe's data-driven criterion: `digits` or a .npz / .safetensors file.
    #[arg(long)]
    pub data: Option<String>,
    /// The smaller model: .safetensors (with its graph), or .onnx for an ONNX model.
    #[arg(long)]
    pub out: PathBuf,
    /// Print what compaction removed as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    pub model: PathBuf,
    /// `digits` (the bundled test split), or a .npz / .safetensors file of named arrays.
    /// Default: the model's own data set, or the digits for a model that takes 64 values.
    #[arg(long)]
    pub data: Option<String>,
    /// The input array of a one-input model (default x).
    #[arg(long)]
    pub x: Option<String>,
    /// The label array (default y; without labels, only fidelity is measured).
    #[arg(long)]
    pub y: Option<String>,
    /// auto (the fastest where a graph runs on several), tract, candle or native
    /// (prunescope's own CPU kernels).
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Masks written by `prune --masks` (u8, 1 = kept) instead of pruning flags.
    #[arg(long, conflicts_with_all = ["sparsity", "recipe"])]
    pub masks: Option<PathBuf>,
    #[command(flatten)]
    pub flags: PruneFlags,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SensitivityArgs {
    pub model: PathBuf,
    /// As for `prunescope eval`.
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long)]
    pub x: Option<String>,
    #[arg(long)]
    pub y: Option<String>,
    /// Sparsities to measure, comma-separated (default 0,0.1,…,0.9,0.95,0.99).
    #[arg(long)]
    pub grid: Option<String>,
    /// As for `prunescope prune`: magnitude, l2, lamp, taylor, obd, wanda or random.
    #[arg(long, default_value = "magnitude")]
    pub criterion: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Calibration samples (of --data) for taylor, obd and wanda.
    #[arg(long, default_value_t = crate::prune::DEFAULT_CALIBRATION)]
    pub calibration: usize,
    /// unstructured, or N:M (then each layer is measured dense and at 1 − N/M).
    #[arg(long, default_value = "unstructured")]
    pub pattern: String,
    /// auto, tract, candle or native.
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Also plan and measure every allocation rule at these overall sparsities
    /// (comma-separated), added to the output as "compare".
    #[arg(long)]
    pub compare: Option<String>,
    /// Write the table as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Measure again even when the cache holds this sweep.
    #[arg(long)]
    pub fresh: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// How to train: the flags `finetune`, `schedule` and `lottery` share.
#[derive(Args, Debug, Clone)]
pub struct TrainFlags {
    /// Epochs (finetune: 5; schedule: 10 in all; lottery: 15 per training).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// sgd (with --momentum) or adamw.
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Learning-rate schedule: constant, step:EVERY:GAMMA (epochs) or cosine:WARMUP (steps).
    #[arg(long = "lr-schedule", default_value = "constant")]
    pub lr_schedule: String,
    /// Knowledge distillation from the dense model: TEMPERATURE,ALPHA (e.g. 4,0.5).
    #[arg(long)]
    pub distill: Option<String>,
    /// Seed of the batch order.
    #[arg(long = "train-seed", default_value_t = 0)]
    pub train_seed: u64,
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    pub model: PathBuf,
    /// The sparsity to reach (per layer, by magnitude).
    #[arg(long)]
    pub sparsity: f64,
    /// oneshot, iterative (--rounds, --skip-below) or agp (--ramp, --every).
    #[arg(long, default_value = "agp")]
    pub kind: String,
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Iterative: skip a round's fine-tuning when pruning cost less accuracy than this.
    #[arg(long, default_value_t = 0.0)]
    pub skip_below: f64,
    /// AGP: the fraction of the steps over which sparsity ramps up.
    #[arg(long, default_value_t = 0.75)]
    pub ramp: f64,
    /// AGP: steps between mask updates.
    #[arg(long, default_value_t = 10)]
    pub every: usize,
    /// What each pruning step removes: magnitude (the smallest |w|) or movement (the lowest
    /// −Σ w·∂L/∂w accumulated since training began; agp only).
    #[arg(long, default_value = "magnitude")]
    pub criterion: String,
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long)]
    pub x: Option<String>,
    #[arg(long)]
    pub y: Option<String>,
    #[command(flatten)]
    pub train: TrainFlags,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LotteryArgs {
    pub model: PathBuf,
    /// Pruning levels.
    #[arg(long, default_value_t = 5)]
    pub levels: usize,
    /// Fraction of the remaining weights each level prunes (0.2 = 20 %).
    #[arg(long, default_value_t = 0.2)]
    pub rate: f64,
    /// Rewind survivors to their initial values (init) or to those after ITER steps of dense
    /// training.
    #[arg(long, default_value = "init")]
    pub rewind: String,
    /// The initial weights (default: the file the model's metadata names, beside it).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long)]
    pub x: Option<String>,
    #[arg(long)]
    pub y: Option<String>,
    #[command(flatten)]
    pub train: TrainFlags,
    /// A directory for each level's weights and masks and lottery.csv.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    pub model: PathBuf,
    /// Masks written by `prune --masks` (u8, 1 = kept) instead of pruning flags.
    #[arg(long, conflicts_with_all = ["sparsity", "recipe"])]
    pub masks: Option<PathBuf>,
    #[command(flatten)]
    pub flags: PruneFlags,
    /// Training data: `digits`, or a labelled .npz / .safetensors (split 80/20, seeded).
    /// Default: the model's own data set.
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long)]
    pub x: Option<String>,
    #[arg(long)]
    pub y: Option<String>,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Where to train: native (prunescope's CPU loops, the fastest on CPU), candle (candle on
    /// the CPU), cuda[:N] or metal[:N] (builds with the cuda / metal feature).
    #[arg(long, default_value = "native")]
    pub device: String,
    /// Where to write the fine-tuned model (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// mlp (the sample MLP), cnn (convolutions and max pooling) or rescnn (BatchNorm and a
    /// residual block).
    #[arg(long, default_value = "mlp")]
    pub arch: String,
    /// Default: sample_models/digits_ARCH.safetensors.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Default: sample_models/digits_ARCH.init.safetensors.
    #[arg(long)]
    pub init_out: Option<PathBuf>,
    /// Default: 40 for the MLP, 30 for the CNNs.
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The slider path on synthetic GPT-2-small shapes: precompute, slider, masks, histograms.
    Interactive {
        #[arg(long, default_value_t = 124_000_000)]
        params: u64,
        /// Print only the JSON report.
        #[arg(long)]
        json: bool,
    },
    /// One evaluation of MODEL on data, dense and after a mask change, timed in medians.
    Eval {
        model: PathBuf,
        /// As for `prunescope eval`.
        #[arg(long)]
        data: Option<String>,
        #[arg(long)]
        x: Option<String>,
        #[arg(long)]
        y: Option<String>,
        /// Timed runs of each kind.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Time this engine only (auto: every engine that runs the model, then the one the
        /// app picks).
        #[arg(long, default_value = "auto")]
        engine: String,
        /// Print only the JSON report.
        #[arg(long)]
        json: bool,
    },
    /// One square f32 layer at batch 1 in every kernel format (dense, CSR at 90 and 95 %, 2:4,
    /// half the rows removed), medians in ms.
    Kernels {
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// cpu, or gpu (the wgpu kernels on the adapter wgpu finds, checked against the CPU).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Every prunable layer of MODEL, pruned as the flags (or --masks) say, in each storage
    /// format (dense, masked, CSR, N:M, block-sparse, empty rows and columns removed) at each batch size:
    /// medians with their spread, speedups, realized efficiency, the fitted cost model, flags
    /// and the storage sizes.
    Latency(Box<LatencyArgs>),
    /// A synthetic checkpoint with Llama-2-7B's shapes (or fewer blocks for a smaller
    /// --params), written once into --path as bf16 shards with an index, then opened,
    /// analysed, slid, masked and exported: time and resident memory of each step.
    Large {
        /// Parameters (7e9: Llama-2-7B's 6.74 billion).
        #[arg(long, default_value = "7e9")]
        params: f64,
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Folder for the checkpoint (kept for later runs; the export is removed).
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Masked fine-tuning of the sample MLP (50 % per-layer magnitude masks, batch 64, SGD lr
    /// 0.05 momentum 0.9) on the digits training split: samples per second and test accuracy.
    Finetune {
        #[arg(long, default_value_t = 5)]
        epochs: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// A full sensitivity sweep (every layer × the default grid), timed in medians: the sample
    /// MLP on its 360 test images unless MODEL is given.
    Sensitivity {
        model: Option<PathBuf>,
        #[arg(long)]
        data: Option<String>,
        #[arg(long)]
        x: Option<String>,
        #[arg(long)]
        y: Option<String>,
        /// Sparsities (default 0,0.1,…,0.9,0.95,0.99).
        #[arg(long)]
        grid: Option<String>,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct LatencyArgs {
    pub model: PathBuf,
    /// Masks written by `prune --masks` (u8, 1 = kept) instead of pruning flags.
    #[arg(long, conflicts_with_all = ["sparsity", "recipe"])]
    pub masks: Option<PathBuf>,
    #[command(flatten)]
    pub flags: PruneFlags,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8,32,128")]
    pub batch: String,
    /// cpu, or gpu (wgpu compute shaders on the adapter wgpu finds).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Block side of the block-sparse format.
    #[arg(long, default_value_t = 4)]
    pub block: usize,
    /// Skip the speedup-against-sparsity curves on the largest layer.
    #[arg(long)]
    pub no_curves: bool,
    /// Milliseconds of timed runs per measurement (at least 9 runs each).
    #[arg(long, default_value_t = 40.0)]
    pub budget_ms: f64,
    #[arg(long)]
    pub json: bool,
}

/// A bench's log: its lines on stderr, unless only the JSON report is wanted.
fn stderr_unless(json: bool) -> impl Fn(&str) {
    move |m| {
        if !json {
            eprintln!("{m}");
        }
    }
}

/// A progress bar on stderr when it is a terminal; silent otherwise.
fn bar() -> Progress<'static> {
    if !std::io::stderr().is_terminal() {
        return Progress::none();
    }
    Progress::new(CancelFlag::new(), |f, msg| {
        let filled = (f * 30.0).round() as usize;
        eprint!(
            "\r[{}{}] {:3.0}% {msg:<40}",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            f * 100.0
        );
        if f >= 1.0 {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    })
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Gui { model: cli.model }) {
        #[cfg(feature = "gui")]
        Command::Gui { model } => crate::ui::run_gui(model),
        #[cfg(not(feature = "gui"))]
        Command::Gui { .. } => {
            bail!("this prunescope was built without the desktop app (feature \"gui\")")
        }
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Groups { model, json } => groups_cmd(&model, json),
        Command::Compact(a) => compact_cmd(a),
        Command::Prune(args) => prune_cmd(args),
        Command::Eval(args) => eval_cmd(args),
        Command::Sensitivity(args) => sensitivity_cmd(args),
        Command::Finetune(args) => finetune_cmd(args),
        Command::Schedule(args) => schedule_cmd(args),
        Command::Lottery(args) => lottery_cmd(args),
        Command::Train(args) => train_cmd(args),
        Command::Bench {
            which: BenchCommand::Interactive { params, json },
        } => {
            let report = crate::bench::interactive(params, stderr_unless(json));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench {
            which:
                BenchCommand::Eval {
                    model,
                    data,
                    x,
                    y,
                    runs,
                    engine,
                    json,
                },
        } => {
            let engine = EnginePref::parse(&engine).with_context(|| {
                format!("unknown engine '{engine}' (auto, tract, candle or native)")
            })?;
            let m = Model::open(&model)?;
            let source = data_source(data.as_deref(), x, y);
            let report = crate::bench::eval(&m, &source, engine, runs.max(1), stderr_unless(json))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench {
            which:
                BenchCommand::Kernels {
                    size,
                    runs,
                    device,
                    json,
                },
        } => {
            let device = crate::latency::Device::parse(&device)
                .with_context(|| format!("unknown device '{device}' (cpu or gpu)"))?;
            let report = crate::bench::kernels(size, runs.max(1), device, stderr_unless(json))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench {
            which: BenchCommand::Latency(args),
        } => latency_cmd(*args),
        Command::Bench {
            which:
                BenchCommand::Large {
                    params,
                    dtype,
                    path,
                    json,
                },
        } => {
            let report =
                crate::bench::large::large(params as u64, &dtype, &path, stderr_unless(json))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench {
            which: BenchCommand::Finetune { epochs, runs, json },
        } => {
            let report = crate::bench::finetune(epochs.max(1), runs.max(1), stderr_unless(json))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench {
            which:
                BenchCommand::Sensitivity {
                    model,
                    data,
                    x,
                    y,
                    grid,
                    runs,
                    json,
                },
        } => {
            let m = match &model {
                Some(p) => Model::open(p)?,
                None => crate::sample::open_sample()?,
            };
            let source = data_source(data.as_deref(), x, y);
            let grid = match grid {
                Some(g) => crate::sensitivity::parse_grid(&g)?,
                None => crate::sensitivity::DEFAULT_GRID.to_vec(),
            };
            let report =
                crate::bench::sensitivity(&m, &source, grid, runs.max(1), stderr_unless(json))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// `--data`, `--x`, `--y` as a data source.
fn data_source(data: Option<&str>, x: Option<String>, y: Option<String>) -> DataSource {
    match data {
        None => DataSource::Default,
        Some("digits") => DataSource::Digits,
        Some(p) => DataSource::File {
            path: PathBuf::from(p),
            spec: DataSpec { x, y },
        },
    }
}

/// One row of `inspect`.
#[derive(serde::Serialize)]
struct InspectRow<'a> {
    name: &'a str,
    shape: &'a [usize],
    dtype: String,
    params: usize,
    zeros: u64,
    sparsity: f64,
    nan: u64,
    inf: u64,
    prunable: bool,
}

fn inspect(path: &Path, json: bool) -> anyhow::Result<()> {
    let model = Model::open(path)?;
    let row = |t: usize| {
        let e = &model.tensors[t];
        let (zeros, nan, inf) = if e.analysable() {
            let h = crate::analysis::histogram(&model, t, 1);
            (h.zeros, h.nan, h.pos_inf + h.neg_inf)
        } else {
            (0, 0, 0)
        };
        InspectRow {
            name: &e.name,
            shape: &e.shape,
            dtype: e.dtype.to_string(),
            params: e.numel,
            zeros,
            sparsity: if e.numel == 0 {
                0.0
            } else {
                zeros as f64 / e.numel as f64
            },
            nan,
            inf,
            prunable: e.default_prunable(),
        }
    };
    // Rows are written as they are computed: a model of a million tensors must not need a
    // million JSON values in memory first.
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    if json {
        let head = serde_json::json!({
            "file": path.display().to_string(), "format": model.format.label(),
            "params": model.total_params(), "bytes": model.data_bytes(),
            "metadata": model.metadata,
        });
        let head = serde_json::to_string_pretty(&head)?;
        // The head's closing brace gives way to the tensor list.
        let head = head.strip_suffix('}').unwrap_or(&head).trim_end();
        write!(w, "{head},\n  \"tensors\": [")?;
        for t in 0..model.tensors.len() {
            w.write_all(if t == 0 { b"\n    " } else { b",\n    " })?;
            serde_json::to_writer(&mut w, &row(t))?;
        }
        writeln!(w, "\n  ]\n}}")?;
        w.flush()?;
        return Ok(());
    }
    writeln!(
        w,
        "{} ({}): {} tensors, {} parameters, {}",
        printable(&path.display().to_string()),
        model.format.label(),
        model.tensors.len(),
        group_digits(model.total_params()),
        human_bytes(model.data_bytes())
    )?;
    // The name column fits the longest name, so long module paths keep the table aligned, up to
    // a width past which alignment is lost anyway (and format widths must stay small).
    const MAX_NAME_COLUMN: usize = 100;
    let w_name = model
        .tensors
        .iter()
        .map(|t| printable(&t.name).chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, MAX_NAME_COLUMN);
    writeln!(
        w,
        "{:<w_name$} {:<18} {:<6} {:>12} {:>9} {:>8}",
        "name", "shape", "dtype", "params", "zeros", "prunable"
    )?;
    for t in 0..model.tensors.len() {
        let r = row(t);
        let note = if r.nan + r.inf > 0 {
            format!("  ({} NaN, {} Inf)", r.nan, r.inf)
        } else {
            String::new()
        };
        writeln!(
            w,
            "{:<w_name$} {:<18} {:<6} {:>12} {:>8.2}% {:>8}{note}",
            printable(r.name),
            format!("{:?}", r.shape),
            r.dtype,
            group_digits(r.params as u64),
            r.sparsity * 100.0,
            if r.prunable { "yes" } else { "no" },
        )?;
    }
    w.flush()?;
    Ok(())
}

fn groups_cmd(path: &Path, json: bool) -> anyhow::Result<()> {
    let model = Model::open(path)?;
    let groups = crate::prune::structured::groups_of(&model)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&groups)?);
        return Ok(());
    }
    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        w,
        "{}: {} dependency group(s)",
        model.display_name(),
        groups.groups.len()
    )?;
    for (i, g) in groups.groups.iter().enumerate() {
        match g.head_dim {
            Some(d) => writeln!(
                w,
                "group {}: {} attention heads of {d} features",
                i + 1,
                g.channels
            )?,
            None => writeln!(w, "group {}: {} channels", i + 1, g.channels)?,
        }
        for m in &g.members {
            let mut at = String::new();
            if m.offset > 0 {
                at += &format!(", from entry {}", m.offset);
            }
            if m.per_channel > 1 {
                at += &format!(", {} entries a channel", m.per_channel);
            }
            writeln!(w, "  {} axis {}{at}", printable(&m.tensor), m.axis)?;
        }
    }
    for b in &groups.blocked {
        writeln!(
            w,
            "not prunable: {} channels of {}: {}",
            b.channels,
            b.tensors.join(", "),
            b.why
        )?;
    }
    w.flush()?;
    Ok(())
}

/// Builds settings from the flags (everything the GUI can set globally).
pub fn settings_from_args(a: &PruneFlags) -> anyhow::Result<PruneSettings> {
    let pattern = match a.granularity.as_deref() {
        Some(g) => Pattern::parse(g)?,
        None => Pattern::parse(&a.pattern)?,
    };
    let criterion = match Criterion::parse(&a.criterion) {
        Some(c) => c,
        None => bail!(
            "unknown criterion '{}' (expected {})",
            a.criterion,
            Criterion::ALL.map(Criterion::cli_name).join(", ")
        ),
    };
    if a.calibration == 0 {
        bail!("--calibration must be at least 1 sample");
    }
    let scope = match a.scope.as_str() {
        "global" => Scope::Global,
        "layer" => Scope::Layer,
        "sensitivity" => Scope::Sensitivity,
        // Planned into layer-wise targets by `prune_from_flags`.
        "owl" => Scope::Global,
        other => bail!("unknown scope '{other}' (expected global, layer, sensitivity or owl)"),
    };
    let rule = crate::prune::Rule::parse(&a.rule).with_context(|| {
        format!(
            "unknown rule '{}' (marginal, threshold, inverse, uniform or global)",
            a.rule
        )
    })?;
    let sparsity = match (a.sparsity, pattern) {
        (Some(s), _) => s,
        (None, Pattern::NM { .. }) => 0.0,
        (None, _) => bail!("--sparsity is required (or --recipe, or an N:M --pattern)"),
    };
    if !(0.0..=1.0).contains(&sparsity) {
        bail!("--sparsity {sparsity} is outside 0..=1");
    }
    if !(0.0..=1.0).contains(&a.min_keep) {
        bail!("--min-keep {} is outside 0..=1", a.min_keep);
    }
    Ok(PruneSettings {
        criterion,
        seed: a.seed,
        calibration: a.calibration,
        round_width: a.round_width.max(1),
        pattern,
        scope,
        sparsity,
        min_keep: a.min_keep,
        rule,
        layers: Default::default(),
    })
}

/// Settings from flags or a recipe (checked against the model), and the pruned masks.
fn prune_from_flags(
    model: &Model,
    flags: &PruneFlags,
    data: &DataSource,
    progress: &Progress,
) -> anyhow::Result<(crate::prune::Pruned, PruneSettings)> {
    let (mut settings, recipe) = match &flags.recipe {
        Some(r) => {
            let recipe = Recipe::load(r)?;
            if !flags.ignore_hash {
                recipe.check_hash(&model.content_hash()?)?;
            }
            (recipe.settings.clone(), Some(recipe))
        }
        None => (settings_from_args(flags)?, None),
    };
    if recipe.is_none() && flags.scope == "owl" {
        if settings.pattern.fixed_sparsity().is_some() || settings.pattern.structured() {
            bail!("--scope owl plans unstructured or block sparsity per layer");
        }
        if !(flags.owl_m > 0.0 && (0.0..=1.0).contains(&flags.owl_lambda)) {
            bail!("--owl-m must be positive and --owl-lambda within 0..=1");
        }
        let e = crate::eval::evaluator_with_data(model, data).map_err(|e| {
            anyhow::anyhow!(
                "--scope owl counts outliers on calibration data, and there is none: {e}"
            )
        })?;
        settings = crate::prune::owl::plan(
            model,
            &settings,
            e.calibration(),
            settings.calibration,
            flags.owl_m,
            flags.owl_lambda,
            progress,
        )?;
        let mut targets: Vec<String> = settings
            .layers
            .iter()
            .map(|(n, l)| format!("{n} {:.1}%", l.sparsity * 100.0))
            .collect();
        targets.sort();
        eprintln!("OWL targets: {}", targets.join(", "));
    }
    if recipe.is_none() && settings.scope == Scope::Layer && flags.scope != "owl" {
        // Layer scope from the command line: the same target in every prunable tensor.
        for t in 0..model.tensors.len() {
            if settings.is_prunable(model, t) {
                settings.layer_mut(&model.tensors[t].name).sparsity = settings.sparsity;
            }
        }
    }
    if recipe.is_none() && settings.scope == Scope::Sensitivity {
        if settings.pattern.fixed_sparsity().is_some() {
            bail!("--scope sensitivity plans unstructured sparsity; N:M fixes every layer's");
        }
        let grid = match &flags.grid {
            Some(g) => crate::sensitivity::parse_grid(g)?,
            None => crate::sensitivity::DEFAULT_GRID.to_vec(),
        };
        let evaluator = crate::eval::evaluator_with_data(model, data)
            .map_err(|e| crate::sensitivity::SensitivityError::NoData(e.to_string()))?;
        let spec = crate::sensitivity::SweepSpec::for_settings(&settings, grid);
        let sens =
            crate::sensitivity::measure(model, &evaluator, &spec, &settings, true, progress)?;
        let index = crate::prune::ScoreIndex::build(
            model,
            settings.criterion,
            settings.seed,
            &spec.score_inputs(Some(evaluator.calibration())),
            progress,
        )?;
        let plan = crate::sensitivity::plan(model, &index, &settings, &sens, settings.rule)?;
        eprintln!(
            "{} plan from {} curves: predicted {} {:.4}{}",
            settings.rule.label(),
            sens.layers.len(),
            sens.metric.label(),
            plan.predicted,
            if plan.reached() {
                String::new()
            } else {
                format!(
                    "; the caps allow {} of the {} weights asked for",
                    group_digits(plan.pruned),
                    group_digits(plan.requested)
                )
            }
        );
        plan.apply(&mut settings);
    }
    let calibration = if settings.criterion.needs_data() {
        Some(crate::eval::evaluator_with_data(model, data).map_err(|e| {
            anyhow::anyhow!(
                "criterion {} scores on calibration data, and there is none: {e}",
                settings.criterion.cli_name()
            )
        })?)
    } else {
        None
    };
    let inputs = ScoreInputs {
        calibration: calibration.as_ref().map(|e| e.calibration()),
        samples: settings.calibration,
        ..Default::default()
    };
    let p = prune(model, &settings, &inputs, progress)?;
    if let Some(r) = &recipe
        && !flags.ignore_hash
    {
        r.check_result(model, &p.alloc)?;
    }
    Ok((p, settings))
}

fn prune_cmd(a: PruneArgs) -> anyhow::Result<()> {
    // Before any work: an output that names an input would destroy it.
    let mut inputs = vec![("model", a.model.as_path())];
    if let Some(r) = &a.flags.recipe {
        inputs.push(("recipe", r.as_path()));
    }
    let mut outputs = vec![("--out", a.out.as_path())];
    if let Some(m) = &a.masks {
        outputs.push(("--masks", m.as_path()));
    }
    if let Some(r) = &a.save_recipe {
        outputs.push(("--save-recipe", r.as_path()));
    }
    check_outputs(&inputs, &outputs)?;
    let model = Model::open(&a.model)?;
    // The model may have named more input files (ONNX external data): check those too.
    let mut all_inputs = model.input_files();
    all_inputs.extend(inputs.iter().skip(1).copied());
    check_outputs(&all_inputs, &outputs)?;
    let progress = bar();
    let data = data_source(a.data.as_deref(), a.x.clone(), a.y.clone());
    let (p, settings) = prune_from_flags(&model, &a.flags, &data, &progress)?;
    match &p.updated {
        Some(u) => write_updated(&model, u, &a.out, &progress)?,
        None => export_weights(&model, &p.masks, &a.out, &progress)?,
    }
    if let Some(m) = &a.masks {
        export_masks(&model, &p.masks, m)?;
    }
    if let Some(r) = &a.save_recipe {
        Recipe::new(&model, model.content_hash()?, &settings, &p.alloc)
            .save(r)
            .with_context(|| format!("{}: cannot write recipe", r.display()))?;
    }
    eprintln!(
        "pruned {} of {} prunable weights ({:.2}%){} → {}",
        group_digits(p.alloc.pruned),
        group_digits(p.alloc.prunable),
        p.alloc.sparsity() * 100.0,
        if p.alloc.reached() {
            String::new()
        } else {
            format!(
                "; target of {} not reachable under the caps",
                group_digits(p.alloc.requested)
            )
        },
        a.out.display()
    );
    Ok(())
}

fn compact_cmd(a: CompactArgs) -> anyhow::Result<()> {
    let mut inputs = vec![("model", a.model.as_path())];
    for (what, p) in [("masks", &a.masks), ("recipe", &a.recipe)] {
        if let Some(p) = p {
            inputs.push((what, p.as_path()));
        }
    }
    check_outputs(&inputs, &[("--out", a.out.as_path())])?;
    let model = Model::open(&a.model)?;
    let mut all_inputs = model.input_files();
    all_inputs.extend(inputs.iter().skip(1).copied());
    check_outputs(&all_inputs, &[("--out", a.out.as_path())])?;
    let progress = bar();
    let masks = match &a.masks {
        Some(m) => crate::export::load_masks(&model, m)?,
        None => {
            let flags = PruneFlags {
                recipe: a.recipe.clone(),
                ignore_hash: a.ignore_hash,
                ..Default::default()
            };
            let data = data_source(a.data.as_deref(), None, None);
            masks_only(prune_from_flags(&model, &flags, &data, &progress)?.0)?
        }
    };
    let c = crate::export::compact::compact(&model, &masks)?;
    crate::export::compact::write(&model, &masks, &c, &a.out, &progress)?;
    let r = &c.report;
    if a.json {
        println!("{}", serde_json::to_string_pretty(r)?);
    }
    let pct = |a: u64, b: u64| 100.0 * (1.0 - a as f64 / b.max(1) as f64);
    let macs = match (r.macs_before, r.macs_after) {
        (Some(b), Some(a)) => format!(
            "{} → {} multiply-adds a sample (−{:.1}%)",
            group_digits(b),
            group_digits(a),
            pct(a, b)
        ),
        _ => "multiply-adds not counted (the graph runs on tract only)".into(),
    };
    let what = if c.onnx_only { "heads" } else { "channels" };
    eprintln!(
        "compacted: {} → {} parameters (−{:.1}%), {macs}, {} of {} {what} removed → {}",
        group_digits(r.params_before),
        group_digits(r.params_after),
        pct(r.params_after, r.params_before),
        r.groups.iter().map(|g| g.removed).sum::<usize>(),
        r.groups.iter().map(|g| g.channels).sum::<usize>(),
        a.out.display()
    );
    Ok(())
}

/// The masks of a cut for commands that apply masks to the input's weights; a criterion that
/// also changes the kept weights (SparseGPT) would be silently undone there, so it is refused.
fn masks_only(p: crate::prune::Pruned) -> anyhow::Result<crate::prune::MaskSet> {
    if p.updated.is_some() {
        bail!(
            "sparsegpt changes the kept weights, which this command would not use: run \
             `prunescope prune --criterion sparsegpt … --out M` first, then use M (its zeros are \
             the cut)"
        );
    }
    Ok(p.masks)
}

/// Writes a model whose kept weights pruning changed (SparseGPT), and reports what it bought.
fn write_updated(
    model: &Model,
    u: &crate::prune::sparsegpt::SparseGpt,
    out: &Path,
    progress: &Progress,
) -> anyhow::Result<()> {
    if crate::export::onnx_path(out) {
        let bytes = u.onnx_bytes(model)?;
        crate::util::atomic_write(out, |w| w.write_all(&bytes))
            .with_context(|| format!("{}: cannot write", out.display()))?;
    } else {
        crate::export::export_pruned(&u.model, &u.masks, out, progress)?;
    }
    for l in &u.layers {
        eprintln!(
            "{}: {:.1}% pruned, output error on the calibration inputs {:.4e} (magnitude: {:.4e})",
            l.name,
            l.sparsity * 100.0,
            l.error,
            l.magnitude_error
        );
    }
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> anyhow::Result<()> {
    let model = Model::open(&a.model)?;
    let source = data_source(a.data.as_deref(), a.x.clone(), a.y.clone());
    let progress = bar();
    let mut recorded = None;
    let mut updated = None;
    let (masks, sparsity) = if let Some(m) = &a.masks {
        let masks = crate::export::load_masks(&model, m)?;
        let (kept, total) = masks.iter().fold((0u64, 0u64), |(k, n), (_, m)| {
            (k + m.count_kept() as u64, n + m.len() as u64)
        });
        (masks, Some(1.0 - kept as f64 / total.max(1) as f64))
    } else if a.flags.any() {
        let (p, settings) = prune_from_flags(&model, &a.flags, &source, &progress)?;
        let s = p.alloc.sparsity();
        recorded = Some((settings, p.alloc));
        updated = p.updated.map(|u| u.model);
        (p.masks, Some(s))
    } else {
        recorded = Some((
            PruneSettings::default(),
            crate::prune::Allocation::default(),
        ));
        (crate::prune::MaskSet::new(), None)
    };
    let engine = EnginePref::parse(&a.engine).with_context(|| {
        format!(
            "unknown engine '{}' (auto, tract, candle or native)",
            a.engine
        )
    })?;
    let evaluator = evaluator_with(&model, &source, engine)?;
    let engine = evaluator.engine();
    let dense = evaluator.evaluate(&model, &crate::prune::MaskSet::new())?;
    let t0 = std::time::Instant::now();
    // SparseGPT's changed weights are measured against the original dense outputs.
    let now = evaluator.evaluate(updated.as_ref().unwrap_or(&model), &masks)?;
    let eval_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The experiment history the GUI's Pareto view shows: settings the CLI measured too.
    if let (Some((settings, alloc)), Ok(hash)) = (&recorded, model.content_hash()) {
        let uses = evaluator.weight_uses(&model);
        let flops = uses
            .as_ref()
            .map(|u| crate::history::flops(&model, alloc, u));
        let sizes = crate::analysis::size_report(&model, alloc, settings.pattern);
        let mut h = crate::history::History::load(&hash);
        h.push(crate::history::Record::new(
            "cli",
            &model,
            &hash,
            settings,
            alloc,
            sizes.csr_bytes,
            &now,
            &evaluator.describe(),
            flops,
        ));
        if let Err(e) = h.save() {
            eprintln!("note: the experiment history was not saved: {e}");
        }
    }
    let pruned = sparsity.is_some();
    let labelled = |m: &crate::eval::Metrics| serde_json::json!({"accuracy": m.accuracy, "top5": m.top5, "loss": m.loss});
    let report = serde_json::json!({
        "model": a.model.display().to_string(),
        "data": evaluator.describe(),
        "engine": engine.name,
        "path": engine.label(),
        "samples": now.samples,
        "labels": now.accuracy.is_some(),
        "accuracy": now.accuracy,
        "top5": now.top5,
        "loss": now.loss,
        "pruned": pruned,
        "sparsity": sparsity,
        "dense": labelled(&dense),
        "fidelity": if pruned { now.fidelity } else { None },
        "eval_ms": eval_ms,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} on {} [{}: {}]",
        printable(&a.model.display().to_string()),
        evaluator.describe(),
        engine.name,
        engine.label()
    );
    let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.2}%", v * 100.0));
    if dense.accuracy.is_some() {
        println!(
            "dense:  accuracy {}  top-5 {}  loss {:.4}",
            pct(dense.accuracy),
            pct(dense.top5),
            dense.loss.unwrap_or(f64::NAN)
        );
        if let Some(s) = sparsity {
            println!(
                "pruned: accuracy {}  top-5 {}  loss {:.4}  ({:.2}% of prunable weights removed)",
                pct(now.accuracy),
                pct(now.top5),
                now.loss.unwrap_or(f64::NAN),
                s * 100.0
            );
        }
    }
    if let (Some(s), Some(f)) = (sparsity, now.fidelity) {
        println!(
            "fidelity at {:.2}% sparsity: top-1 agreement {:.2}%, cosine {:.5}, relative L2 {:.4}",
            s * 100.0,
            f.top1_agreement * 100.0,
            f.cosine,
            f.rel_l2
        );
    } else if dense.accuracy.is_none() {
        println!("no labels and no pruning: nothing to compare (add --sparsity or labels)");
    }
    Ok(())
}

fn sensitivity_cmd(a: SensitivityArgs) -> anyhow::Result<()> {
    use crate::sensitivity::{SweepSpec, measure, parse_grid};
    let model = Model::open(&a.model)?;
    let source = data_source(a.data.as_deref(), a.x.clone(), a.y.clone());
    let grid = match &a.grid {
        Some(g) => parse_grid(g)?,
        None => crate::sensitivity::DEFAULT_GRID.to_vec(),
    };
    let settings = settings_from_args(&PruneFlags {
        sparsity: Some(0.0),
        criterion: a.criterion.clone(),
        seed: a.seed,
        calibration: a.calibration,
        pattern: a.pattern.clone(),
        scope: "global".into(),
        rule: "marginal".into(),
        ..Default::default()
    })?;
    let engine = EnginePref::parse(&a.engine).with_context(|| {
        format!(
            "unknown engine '{}' (auto, tract, candle or native)",
            a.engine
        )
    })?;
    let evaluator = evaluator_with(&model, &source, engine)
        .map_err(|e| crate::sensitivity::SensitivityError::NoData(e.to_string()))?;
    let spec = SweepSpec::for_settings(&settings, grid);
    let progress = bar();
    let sens = measure(&model, &evaluator, &spec, &settings, !a.fresh, &progress)?;
    if let Some(p) = &a.csv {
        use std::io::Write as _;
        check_outputs(&model.input_files(), &[("--csv", p.as_path())])?;
        crate::util::atomic_write(p, |w| w.write_all(sens.to_csv().as_bytes()))
            .with_context(|| format!("{}: cannot write CSV", p.display()))?;
    }
    let mut compare = Vec::new();
    if let Some(targets) = &a.compare {
        let inputs = spec.score_inputs(Some(evaluator.calibration()));
        let index = crate::prune::ScoreIndex::build(
            &model,
            settings.criterion,
            settings.seed,
            &inputs,
            &progress,
        )?;
        for t in parse_grid(targets)? {
            let mut st = settings.clone();
            st.sparsity = t;
            for plan in crate::sensitivity::compare_rules(&model, &index, &st, &sens) {
                let plan = plan?;
                let mut applied = st.clone();
                plan.apply(&mut applied);
                let p = prune(&model, &applied, &inputs, &Progress::none())?;
                let m = evaluator.evaluate(&model, &p.masks)?;
                compare.push(serde_json::json!({
                    "target": t,
                    "rule": plan.rule.cli_name(),
                    "predicted": plan.predicted,
                    "measured": sens.metric.value(&m),
                    "accuracy": m.accuracy,
                    "loss": m.loss,
                    "fidelity": m.fidelity,
                    "pruned": p.alloc.pruned,
                    "nonzeros": model.total_params() - p.alloc.pruned,
                    "layers": plan.layers.iter().map(|l| serde_json::json!({
                        "name": l.name, "sparsity": l.sparsity(), "pruned": l.pruned
                    })).collect::<Vec<_>>(),
                }));
            }
        }
    }
    if a.json {
        let mut v = serde_json::to_value(&sens)?;
        if a.compare.is_some() {
            v["compare"] = serde_json::Value::Array(compare);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let dense = sens.dense_value();
    println!(
        "{} on {} — {} ({}), dense {:.4}{}",
        printable(&a.model.display().to_string()),
        sens.data,
        sens.metric.label(),
        spec.criterion.cli_name(),
        dense,
        if sens.cached { " [from cache]" } else { "" }
    );
    let points = spec.points();
    print!("{:<40}", "layer \\ sparsity");
    for s in &points {
        print!(" {:>7}", format!("{:.0}%", s * 100.0));
    }
    println!();
    for c in &sens.layers {
        let mut name = printable(&c.name.join(" + ")).into_owned();
        let chars = name.chars().count();
        if chars > 39 {
            // The end of a long name says the most (…layer.3.attn.weight); cut by characters.
            name = format!("…{}", name.chars().skip(chars - 38).collect::<String>());
        }
        print!("{name:<40}");
        for p in &c.points {
            print!(" {:>7.4}", sens.metric.value(&p.metrics));
        }
        println!();
    }
    println!(
        "{} evaluations in {:.1} ms",
        sens.evaluations, sens.sweep_ms
    );
    for row in &compare {
        println!(
            "target {:.0}% {:<10} predicted {:.4} measured {:.4} non-zeros {}",
            row["target"].as_f64().unwrap_or(0.0) * 100.0,
            row["rule"].as_str().unwrap_or(""),
            row["predicted"].as_f64().unwrap_or(f64::NAN),
            row["measured"].as_f64().unwrap_or(f64::NAN),
            row["nonzeros"]
        );
    }
    Ok(())
}

/// `step:EVERY:GAMMA`, `cosine:WARMUP` or `constant`.
pub fn parse_schedule(s: &str) -> anyhow::Result<crate::train::LrSchedule> {
    use crate::train::LrSchedule;
    let parts: Vec<&str> = s.split(':').collect();
    Ok(match parts.as_slice() {
        ["constant"] => LrSchedule::Constant,
        ["step", every, gamma] => LrSchedule::Step {
            every: every
                .parse()
                .context("step: EVERY must be a whole number of epochs")?,
            gamma: gamma.parse().context("step: GAMMA must be a number")?,
        },
        ["cosine", warmup] => LrSchedule::Cosine {
            warmup: warmup
                .parse()
                .context("cosine: WARMUP must be a number of steps")?,
        },
        ["cosine"] => LrSchedule::Cosine { warmup: 0 },
        _ => bail!("unknown schedule '{s}' (constant, step:EVERY:GAMMA or cosine:WARMUP)"),
    })
}

/// The training flags as a configuration.
fn train_config(
    t: &TrainFlags,
    default_epochs: usize,
) -> anyhow::Result<crate::train::FinetuneConfig> {
    use crate::train::{Distill, FinetuneConfig, Optim};
    let optimizer = Optim::parse(&t.optimizer)
        .with_context(|| format!("unknown optimizer '{}' (sgd or adamw)", t.optimizer))?;
    let distill = match &t.distill {
        None => None,
        Some(d) => {
            let (temp, alpha) = d
                .split_once(',')
                .context("--distill takes TEMPERATURE,ALPHA (e.g. 4,0.5)")?;
            let (temperature, alpha): (f64, f64) = (
                temp.trim()
                    .parse()
                    .context("--distill: temperature is not a number")?,
                alpha
                    .trim()
                    .parse()
                    .context("--distill: alpha is not a number")?,
            );
            if temperature <= 0.0 || !(0.0..=1.0).contains(&alpha) {
                bail!("--distill: need a temperature > 0 and 0 ≤ alpha ≤ 1");
            }
            Some(Distill { temperature, alpha })
        }
    };
    if !(t.lr > 0.0 && t.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    Ok(FinetuneConfig {
        epochs: t.epochs.unwrap_or(default_epochs),
        batch_size: t.batch_size.max(1),
        lr: t.lr,
        optimizer,
        momentum: t.momentum,
        weight_decay: t.weight_decay,
        schedule: parse_schedule(&t.lr_schedule)?,
        seed: t.train_seed,
        distill,
    })
}

fn schedule_cmd(a: ScheduleArgs) -> anyhow::Result<()> {
    use crate::train::{Schedule, training_split};
    check_outputs(
        &[("model", a.model.as_path())],
        &[("--out", a.out.as_path())],
    )?;
    if !(0.0..=1.0).contains(&a.sparsity) {
        bail!("--sparsity {} is outside 0..=1", a.sparsity);
    }
    if a.train.distill.is_some() {
        bail!("--distill is a fine-tune option; schedules train without a teacher");
    }
    let model = Model::open(&a.model)?;
    let kind = trainable_for_safetensors(&model)?;
    let cfg = train_config(&a.train, 10)?;
    let schedule = match a.kind.as_str() {
        "oneshot" => Schedule::OneShot,
        "iterative" => Schedule::Iterative {
            rounds: a.rounds.max(1),
            skip_below: a.skip_below,
        },
        "agp" => Schedule::Agp {
            ramp: a.ramp,
            every: a.every.max(1),
            movement: false,
        },
        other => bail!("unknown schedule '{other}' (oneshot, iterative or agp)"),
    };
    let schedule = match (a.criterion.as_str(), schedule) {
        ("magnitude", s) => s,
        ("movement", Schedule::Agp { ramp, every, .. }) => Schedule::Agp {
            ramp,
            every,
            movement: true,
        },
        ("movement", _) => bail!(
            "--criterion movement prunes by what training has accumulated, and {} prunes before \
             any training: use --kind agp",
            a.kind
        ),
        (other, _) => bail!(
            "schedules prune by magnitude or movement, not '{other}' (prune once with `prunescope \
             prune --criterion {other}` and fine-tune with `finetune --masks`)"
        ),
    };
    let source = data_source(a.data.as_deref(), a.x.clone(), a.y.clone());
    let split = training_split(kind.dataset(), &source, cfg.seed)?;
    let net = kind.trainee(&model, &crate::prune::MaskSet::new())?;
    schedule_out(net, &a, &model, schedule, &split, &cfg)
}

/// What schedules and the lottery train from the command line: they write safetensors, so an
/// ONNX model is refused here (`finetune --out NAME.onnx` and the app train it).
fn trainable_for_safetensors(model: &Model) -> anyhow::Result<crate::train::Trainable> {
    if model.format == crate::model::ModelFormat::Onnx {
        bail!(
            "{}: schedules and lottery tickets write safetensors, so they take the samples or \
             a safetensors model; an ONNX file is fine-tuned with `finetune --out NAME.onnx` or \
             in the app",
            model.display_name()
        );
    }
    Ok(crate::train::Trainable::of(model)?)
}

fn schedule_out<T: crate::train::Trainee>(
    net: T,
    a: &ScheduleArgs,
    model: &Model,
    schedule: crate::train::Schedule,
    split: &crate::data::Split,
    cfg: &crate::train::FinetuneConfig,
) -> anyhow::Result<()> {
    let progress = bar();
    let r = crate::train::run_schedule(net, a.sparsity, schedule, split, cfg, &progress, |_| {})?;
    crate::train::write_trained(model, r.net.tensors(), cfg, &a.out)?;
    if a.json {
        let v = serde_json::json!({
            "schedule": schedule,
            "target": a.sparsity,
            "sparsity": r.net.sparsity(),
            "timeline": r.timeline,
            "final": {"accuracy": r.final_accuracy, "loss": r.final_loss},
            "epochs": cfg.epochs,
            "out": a.out.display().to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for p in &r.timeline {
            println!(
                "step {:>6}  sparsity {:>6.2}%  accuracy {:>6.2}%  {}",
                p.step,
                p.sparsity * 100.0,
                p.test_accuracy * 100.0,
                p.event
            );
        }
        println!(
            "final: {:.2}% sparse, accuracy {:.2}% → {}",
            r.net.sparsity() * 100.0,
            r.final_accuracy * 100.0,
            a.out.display()
        );
    }
    Ok(())
}

fn lottery_cmd(a: LotteryArgs) -> anyhow::Result<()> {
    use crate::train::{Rewind, training_split};
    if a.train.distill.is_some() {
        bail!("--distill is a fine-tune option; lottery tickets train without a teacher");
    }
    let model = Model::open(&a.model)?;
    let kind = trainable_for_safetensors(&model)?;
    let init_model = match &a.init {
        Some(p) => {
            Model::open(p).with_context(|| format!("the initial weights ({})", p.display()))?
        }
        None => crate::sample::init_weights_for(&model).with_context(|| {
            format!(
                "{}: no initial weights beside it (the metadata's prunescope.init_weights); \
                 give them with --init",
                model.display_name()
            )
        })?,
    };
    if !(0.0 < a.rate && a.rate < 1.0) {
        bail!("--rate {} must lie strictly between 0 and 1", a.rate);
    }
    let rewind = match a.rewind.as_str() {
        "init" => Rewind::Init,
        n => Rewind::Iteration(
            n.parse()
                .with_context(|| format!("--rewind takes init or a number of steps, not '{n}'"))?,
        ),
    };
    check_outputs(
        &[("model", a.model.as_path())],
        &[("--out", a.out.as_path())],
    )?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create the directory", a.out.display()))?;
    let cfg = train_config(&a.train, 15)?;
    let source = data_source(a.data.as_deref(), a.x.clone(), a.y.clone());
    let split = training_split(kind.dataset(), &source, cfg.seed)?;
    let init = kind.trainee(&init_model, &crate::prune::MaskSet::new())?;
    lottery_out(init, &a, &model, rewind, &split, &cfg)
}

fn lottery_out<T: crate::train::Trainee>(
    init: T,
    a: &LotteryArgs,
    model: &Model,
    rewind: crate::train::Rewind,
    split: &crate::data::Split,
    cfg: &crate::train::FinetuneConfig,
) -> anyhow::Result<()> {
    let progress = bar();
    let r = crate::train::lottery(
        &init,
        split,
        cfg,
        a.levels.max(1),
        a.rate,
        rewind,
        &progress,
        |_| {},
    )?;
    let mut csv = String::from("level,remaining,ticket,reinit,random_mask\n");
    for (l, t) in r.levels.iter().zip(&r.tickets) {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            l.level, l.remaining, l.ticket, l.reinit, l.random_mask
        ));
        let w = a.out.join(format!("level_{}.safetensors", l.level));
        crate::train::write_trained(model, t.tensors(), cfg, &w)?;
        let mut masks = crate::prune::MaskSet::new();
        for (name, kept) in t.masks() {
            masks.insert(model, &name, crate::prune::Mask::from_kept(&kept))?;
        }
        export_masks(
            model,
            &masks,
            &a.out.join(format!("level_{}.masks.safetensors", l.level)),
        )?;
    }
    {
        use std::io::Write as _;
        let p = a.out.join("lottery.csv");
        crate::util::atomic_write(&p, |w| w.write_all(csv.as_bytes()))
            .with_context(|| format!("{}: cannot write", p.display()))?;
    }
    if a.json {
        let v = serde_json::json!({
            "dense": r.dense,
            "rate": a.rate,
            "rewind": rewind,
            "levels": r.levels,
            "out": a.out.display().to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("dense: {:.2}%", r.dense * 100.0);
        println!("level  remaining   ticket   reinit  random mask");
        for l in &r.levels {
            println!(
                "{:>5}  {:>8.2}%  {:>6.2}%  {:>6.2}%  {:>10.2}%",
                l.level,
                l.remaining * 100.0,
                l.ticket * 100.0,
                l.reinit * 100.0,
                l.random_mask * 100.0
            );
        }
    }
    Ok(())
}

/// `finetune` for a model described as a graph (the CNN samples): candle, masks held.
fn finetune_graph_cmd(
    a: &FinetuneArgs,
    model: &Model,
    graph: &crate::graph::Graph,
    source: &DataSource,
    progress: &Progress,
) -> anyhow::Result<()> {
    let masks = match &a.masks {
        Some(m) => crate::export::load_masks(model, m)?,
        None if a.flags.any() => {
            masks_only(prune_from_flags(model, &a.flags, source, progress)?.0)?
        }
        None => bail!("say what to prune: --masks, --recipe or --sparsity"),
    };
    let cfg = train_config(&a.train, 5)?;
    let dataset = graph.dataset.clone().unwrap_or_else(|| "uci-digits".into());
    let split = crate::train::training_split(&dataset, source, cfg.seed)?;
    let device = crate::train::TrainDevice::parse(&a.device)
        .with_context(|| format!("unknown device '{}'", a.device))?;
    let dev = device.candle()?.unwrap_or(candle_core::Device::Cpu);
    let onnx_out = crate::export::onnx_path(&a.out);
    let onnx_in = model.format == crate::model::ModelFormat::Onnx;
    if onnx_in && !onnx_out {
        bail!("an ONNX model fine-tunes into an .onnx file: give --out NAME.onnx");
    }
    let r =
        crate::train::finetune_graph(model, graph, &masks, &split, &cfg, &dev, progress, |_| {})?;
    if onnx_in {
        use std::io::Write as _;
        let bytes = crate::export::patch_onnx(model, &r.tensors)?;
        crate::util::atomic_write(&a.out, |w| w.write_all(&bytes))
            .with_context(|| format!("{}: cannot write", a.out.display()))?;
    } else {
        crate::train::write_trained(model, r.tensors, &cfg, &a.out)?;
    }
    let fig =
        |m: &crate::eval::Metrics| serde_json::json!({"accuracy": m.accuracy, "loss": m.loss});
    if a.json {
        let v = serde_json::json!({
            "before": fig(&r.before),
            "after": fig(&r.after),
            "epochs": r.epochs.len(),
            "per_epoch": r.epochs,
            "samples_per_s": r.samples_per_s,
            "device": a.device,
            "engine": "candle",
            "out": a.out.display().to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: accuracy {:.2}% → {:.2}%, {} epochs on candle, {:.0} samples/s → {}",
            printable(&a.model.display().to_string()),
            r.before.accuracy.unwrap_or(f64::NAN) * 100.0,
            r.after.accuracy.unwrap_or(f64::NAN) * 100.0,
            r.epochs.len(),
            r.samples_per_s,
            a.out.display()
        );
    }
    Ok(())
}

fn finetune_cmd(a: FinetuneArgs) -> anyhow::Result<()> {
    use crate::train::{Net, training_split};
    let mut inputs = vec![("model", a.model.as_path())];
    if let Some(m) = &a.masks {
        inputs.push(("masks", m.as_path()));
    }
    check_outputs(&inputs, &[("--out", a.out.as_path())])?;
    let model = Model::open(&a.model)?;
    let progress = bar();
    let source = data_source(a.data.as_deref(), a.x.clone(), a.y.clone());
    let arch = match crate::train::Trainable::of(&model)? {
        crate::train::Trainable::Graph(graph) => {
            return finetune_graph_cmd(&a, &model, &graph, &source, &progress);
        }
        crate::train::Trainable::Mlp(arch) => arch,
    };
    let masks = match &a.masks {
        Some(m) => crate::export::load_masks(&model, m)?,
        None if a.flags.any() => {
            masks_only(prune_from_flags(&model, &a.flags, &source, &progress)?.0)?
        }
        None => bail!(
            "say what to prune: --masks, --recipe or --sparsity (fine-tuning a dense model is training)"
        ),
    };
    let cfg = train_config(&a.train, 5)?;
    let split = training_split(&arch.dataset, &source, cfg.seed)?;
    let net = Net::from_model(&model, &arch, &masks)?;
    let teacher = Net::teacher_for(&model, &arch, &cfg)?;
    let device = crate::train::TrainDevice::parse(&a.device).with_context(|| {
        format!(
            "unknown device '{}' (native, candle, cuda[:N] or metal[:N])",
            a.device
        )
    })?;
    let r = crate::train::finetune_where(
        device.candle()?.as_ref(),
        net,
        teacher.as_ref(),
        &split.train,
        &split.test,
        &cfg,
        &progress,
        |_, _| {},
    )?;
    crate::train::write_finetuned(&model, &r.net, &cfg, &a.out)?;
    let fig =
        |m: &crate::eval::Metrics| serde_json::json!({"accuracy": m.accuracy, "loss": m.loss});
    if a.json {
        let v = serde_json::json!({
            "before": fig(&r.before),
            "after": fig(&r.after),
            "epochs": r.epochs.len(),
            "per_epoch": r.epochs,
            "samples_per_s": r.samples_per_s,
            "device": a.device,
            "train": split.train.name,
            "test": split.test.name,
            "out": a.out.display().to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let pct = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{:.2}%", v * 100.0));
        println!(
            "{} on {}: accuracy {} → {} (loss {:.4} → {:.4}), {} epochs, {:.0} samples/s → {}",
            printable(&a.model.display().to_string()),
            split.test.name,
            pct(r.before.accuracy),
            pct(r.after.accuracy),
            r.before.loss.unwrap_or(f64::NAN),
            r.after.loss.unwrap_or(f64::NAN),
            r.epochs.len(),
            r.samples_per_s,
            a.out.display()
        );
    }
    Ok(())
}

fn train_cmd(a: TrainArgs) -> anyhow::Result<()> {
    let arch = match a.arch.as_str() {
        "mlp" => None,
        other => Some(
            crate::train::SampleArch::parse(other)
                .with_context(|| format!("unknown architecture '{other}' (mlp, cnn or rescnn)"))?,
        ),
    };
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("sample_models/digits_{}.safetensors", a.arch)));
    let init_out = a.init_out.unwrap_or_else(|| {
        PathBuf::from(format!("sample_models/digits_{}.init.safetensors", a.arch))
    });
    check_outputs(&[], &[("--out", &out), ("--init-out", &init_out)])?;
    let data = crate::data::digits_split()?;
    let result = match arch {
        None => {
            let cfg = crate::train::TrainConfig {
                epochs: a.epochs.unwrap_or(40),
                seed: a.seed,
                ..Default::default()
            };
            crate::train::train_mlp(&cfg, &data, &bar())?
        }
        Some(arch) => {
            let cfg = crate::train::TrainConfig {
                hidden: Vec::new(),
                epochs: a.epochs.unwrap_or(30),
                seed: a.seed,
                ..Default::default()
            };
            let (graph, shapes) = crate::train::sample_graph(arch);
            crate::train::train_graph(&graph, &shapes, &cfg, &data, &bar())?
        }
    };
    crate::train::save(&result, &out, &init_out)
        .with_context(|| format!("{}: cannot write", out.display()))?;
    eprintln!(
        "test accuracy {:.2}% (loss {:.4}) on {} images; wrote {} and {}",
        result.test.accuracy.unwrap_or(f64::NAN) * 100.0,
        result.test.loss.unwrap_or(f64::NAN),
        result.test.samples,
        out.display(),
        init_out.display()
    );
    Ok(())
}

fn latency_cmd(a: LatencyArgs) -> anyhow::Result<()> {
    use crate::latency::{Device, Engine, LatencySpec};
    let device = Device::parse(&a.device)
        .with_context(|| format!("unknown device '{}' (cpu or gpu)", a.device))?;
    let batches = a
        .batch
        .split(',')
        .map(|b| match b.trim().parse::<usize>() {
            Ok(n) if (1..=4096).contains(&n) => Ok(n),
            _ => bail!("--batch: '{b}' is not a batch size in 1..=4096"),
        })
        .collect::<anyhow::Result<Vec<usize>>>()?;
    if a.block == 0 || a.block > 256 {
        bail!("--block {}: choose 1..=256", a.block);
    }
    let model = Model::open(&a.model)?;
    let progress = bar();
    let source = data_source(None, None, None);
    let (masks, settings) = match &a.masks {
        Some(m) => (
            crate::export::load_masks(&model, m)?,
            PruneSettings::default(),
        ),
        None if a.flags.any() => {
            let (p, settings) = prune_from_flags(&model, &a.flags, &source, &progress)?;
            (p.masks, settings)
        }
        None => (crate::prune::MaskSet::new(), PruneSettings::default()),
    };
    let engine = Engine::for_device(device).map_err(anyhow::Error::msg)?;
    let spec = LatencySpec {
        batches,
        device,
        block: a.block,
        curves: !a.no_curves,
        budget_ms: a.budget_ms.clamp(1.0, 10_000.0),
    };
    if !a.json {
        eprintln!("{}", engine.info().label());
    }
    let report = crate::latency::run(
        &model,
        &masks,
        &settings,
        &spec,
        &engine,
        &mut Default::default(),
        &progress,
        |_| {},
    );
    let sizes =
        crate::analysis::storage_sizes(&model, &masks, settings.pattern, a.block, &progress)?;
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            model: String,
            #[serde(flatten)]
            report: &'a crate::latency::LatencyReport,
            sizes: &'a [crate::analysis::StorageSize],
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Out {
                model: a.model.display().to_string(),
                report: &report,
                sizes: &sizes,
            })?
        );
        return Ok(());
    }
    println!("{}", report.device.label());
    for &batch in &report.batches {
        println!("\nbatch {batch}");
        println!(
            "  {:<32} {:>8} {:<15} {:>10} {:>9} {:>8} {:>6}",
            "layer", "sparsity", "format", "median ms", "spread", "speedup", "rho"
        );
        for l in &report.layers {
            for m in l.measurements.iter().filter(|m| m.batch == batch) {
                println!(
                    "  {:<32} {:>7.1}% {:<15} {:>10.4} {:>9} {:>7.2}× {:>6.2}",
                    truncate_name(&l.name, 32),
                    l.sparsity * 100.0,
                    m.format.label(),
                    m.timing.median_ms,
                    format!("±{:.0}%", spread_pct(&m.timing)),
                    m.speedup,
                    m.rho
                );
            }
        }
        for t in report.model.iter().filter(|t| t.batch == batch) {
            println!(
                "  whole model (sum of layers), {:<15} {:>10.4} ms {:>7.2}×  ≈{:.3} mJ (estimate)",
                t.format.label(),
                t.ms,
                t.speedup,
                t.energy_mj_estimate
            );
        }
    }
    if !report.fits.is_empty() {
        println!("\ncost model T = β·s + γ·B + τ (s: stored values, B: rows / groups / blocks)");
        for f in &report.fits {
            println!(
                "  {:<15} batch {:>4}: β {:.4} ns, γ {}, τ {:.1} µs, r² {:.3} ({} points)",
                f.format.label(),
                f.batch,
                f.params.beta_ns,
                f.params
                    .gamma_ns
                    .map_or("n/a (B does not vary)".into(), |g| format!("{g:.2} ns")),
                f.params.tau_us,
                f.params.r2,
                f.params.points
            );
        }
    }
    for c in report
        .curves
        .iter()
        .filter(|c| c.batch == report.batches[0])
    {
        let pts: Vec<String> = c
            .points
            .iter()
            .map(|p| format!("{:.0}%: {:.2}×", p.sparsity * 100.0, p.speedup))
            .collect();
        println!(
            "curve {} on {} (batch {}): {}",
            c.format.label(),
            c.layer,
            c.batch,
            pts.join(", ")
        );
    }
    for f in &report.flags {
        println!("! {}", f.text);
    }
    println!(
        "\nstorage (bytes, zstd level {}):",
        crate::analysis::ZSTD_LEVEL
    );
    for s in &sizes {
        println!(
            "  {:<22} {:>14} {:>14}",
            s.label,
            group_digits(s.bytes),
            group_digits(s.zstd_bytes)
        );
    }
    for s in &report.skipped {
        println!("skipped: {s}");
    }
    println!("{}", report.energy_assumption);
    Ok(())
}

fn spread_pct(t: &crate::latency::Timing) -> f64 {
    (t.max_ms - t.min_ms) / 2.0 / t.median_ms.max(1e-12) * 100.0
}

fn truncate_name(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}
