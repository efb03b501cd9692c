//! `prunescope bench interactive`: the interactive path on a synthetic model with
//! GPT-2-small's shapes, timed in medians.

pub mod large;

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::analysis::{all_histograms, heatmap, histogram, size_report, split_histogram};
use crate::model::Model;
use crate::progress::Progress;
use crate::prune::{
    Criterion, PruneSettings, ScoreIndex, ScoreInputs, allocate, build_layer_mask, build_masks,
};
use crate::util::SplitMix64;

/// GPT-2 small: 12 blocks of (768×2304, 768×768, 768×3072, 3072×768) and a 50257×768 embedding.
pub fn gpt2_like_shapes(params: u64) -> Vec<(String, Vec<usize>)> {
    const D: usize = 768;
    let block = (D * 2304 + D * D + D * 3072 + 3072 * D) as f64;
    let full = 50257.0 * D as f64 + 12.0 * block;
    let f = params as f64 / full;
    let blocks = ((12.0 * f).round() as usize).max(1);
    let vocab = ((50257.0 * f).round() as usize).max(1);
    let mut shapes = vec![("wte.weight".to_string(), vec![vocab, D])];
    for b in 0..blocks {
        shapes.push((format!("h.{b}.attn.c_attn.weight"), vec![D, 2304]));
        shapes.push((format!("h.{b}.attn.c_proj.weight"), vec![D, D]));
        shapes.push((format!("h.{b}.mlp.c_fc.weight"), vec![D, 3072]));
        shapes.push((format!("h.{b}.mlp.c_proj.weight"), vec![3072, D]));
    }
    shapes
}

/// A model of those shapes filled with seeded N(0, 0.02²) weights.
pub fn synthetic_model(params: u64) -> Model {
    let tensors = gpt2_like_shapes(params)
        .into_par_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let mut rng = SplitMix64::new(0xB00 + i as u64);
            let v = (0..n).map(|_| (rng.normal() * 0.02) as f32).collect();
            (name, shape, v)
        })
        .collect();
    Model::from_f32_tensors("synthetic-gpt2-shapes", tensors)
}

#[derive(Debug, Serialize)]
pub struct InteractiveReport {
    pub params: u64,
    pub tensors: usize,
    pub threads: usize,
    /// Scoring and sorting every tensor once (the precompute).
    pub load_ms: f64,
    /// New global sparsity 0.5 → 0.6: thresholds, kept counts and size estimates.
    pub slider_update_us: f64,
    /// Every mask at 60 % sparsity.
    pub full_masks_ms: f64,
    /// Histograms of all tensors (128 bins).
    pub histograms_ms: f64,
    /// Exact kept/pruned histogram split of the largest tensor (the selected-layer view).
    pub largest_layer_split_ms: f64,
    /// Mask of the largest tensor alone plus its 256×256 heatmap.
    pub largest_layer_heatmap_ms: f64,
    pub index_bytes: usize,
    pub targets: Targets,
}

#[derive(Debug, Serialize)]
pub struct Targets {
    pub slider_update_us: f64,
    pub full_masks_ms: f64,
    pub histograms_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

pub fn interactive(params: u64, mut log: impl FnMut(&str)) -> InteractiveReport {
    log(&format!("generating {params} synthetic weights…"));
    let model = synthetic_model(params);
    let none = Progress::none();
    let inputs = ScoreInputs::default();
    log("precomputing sorted scores…");
    let mut index = None;
    let load_ms = time_ms(3, || {
        index = Some(
            ScoreIndex::build(&model, Criterion::Magnitude, 0, &inputs, &none).expect("no cancel"),
        );
    });
    let index = index.expect("built above");
    let at = |s: f64| PruneSettings {
        sparsity: s,
        ..Default::default()
    };
    let (s5, s6) = (at(0.5), at(0.6));
    log("slider updates…");
    let mut samples = Vec::new();
    for i in 0..201 {
        let s = if i % 2 == 0 { &s6 } else { &s5 };
        let t = Instant::now();
        let a = allocate(&model, &index, s);
        let r = size_report(&model, &a, s.pattern);
        std::hint::black_box((a, r));
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let slider_update_us = median(samples);
    let alloc = allocate(&model, &index, &s6);
    log("full masks…");
    let full_masks_ms = time_ms(5, || {
        std::hint::black_box(build_masks(&model, &index, &s6, &alloc, &none).expect("no cancel"));
    });
    log("histograms…");
    let histograms_ms = time_ms(3, || {
        std::hint::black_box(all_histograms(&model, 128, &none).expect("no cancel"));
    });
    let largest = (0..model.tensors.len())
        .max_by_key(|&t| model.tensors[t].numel)
        .unwrap_or(0);
    let l = alloc
        .for_tensor(largest)
        .expect("every tensor is prunable")
        .clone();
    let hist = histogram(&model, largest, 128);
    let mask = build_layer_mask(&model, &index, &s6, &l);
    let largest_layer_split_ms = time_ms(5, || {
        std::hint::black_box(split_histogram(&model, largest, &hist, Some(&mask)));
    });
    let (rows, cols) = model.tensors[largest].matrix_dims();
    let largest_layer_heatmap_ms = time_ms(5, || {
        let m = build_layer_mask(&model, &index, &s6, &l);
        std::hint::black_box(heatmap(
            &model,
            largest,
            Some(&m),
            0..rows,
            0..cols,
            256,
            256,
        ));
    });
    InteractiveReport {
        params: model.total_params(),
        tensors: model.tensors.len(),
        threads: rayon::current_num_threads(),
        load_ms,
        slider_update_us,
        full_masks_ms,
        histograms_ms,
        largest_layer_split_ms,
        largest_layer_heatmap_ms,
        index_bytes: index.heap_bytes(),
        targets: Targets {
            slider_update_us: 16_000.0,
            full_masks_ms: 100.0,
            histograms_ms: 200.0,
        },
    }
}

/// One engine's figures in `bench eval`.
#[derive(Debug, Serialize)]
pub struct EngineTiming {
    pub engine: &'static str,
    /// Threads chosen, where the engine chooses.
    pub detail: String,
    pub dense_ms: f64,
    pub eval_ms: f64,
    pub plan_builds: usize,
}

/// `prunescope bench eval`: what one evaluation costs, dense and right after a mask change.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub samples: usize,
    pub engine: &'static str,
    pub detail: String,
    pub path: &'static str,
    pub runs: usize,
    /// Median of one dense evaluation.
    pub dense_ms: f64,
    /// Median of one masked evaluation, each after the masks changed (50 % ↔ 60 % global
    /// magnitude sparsity), weights re-masked included.
    pub eval_ms: f64,
    /// Plans tract built over all those runs: 1 means no mask change rebuilt the model.
    pub plan_builds: usize,
    pub dense_accuracy: Option<f64>,
    /// Every engine that runs this model, timed the same way (the figures above are the
    /// engine `auto` picks).
    pub engines: Vec<EngineTiming>,
}

pub fn eval(
    model: &Model,
    source: &crate::eval::DataSource,
    engine: crate::eval::EnginePref,
    runs: usize,
    log: impl Fn(&str),
) -> anyhow::Result<EvalReport> {
    use crate::eval::{EnginePref, Evaluator};
    let mut engines = Vec::new();
    let all = [EnginePref::Tract, EnginePref::Candle, EnginePref::Native];
    let timed: &[EnginePref] = match engine {
        EnginePref::Auto => &all,
        _ => &[],
    };
    for &pref in timed {
        if let Ok(ev) = crate::eval::evaluator_with(model, source, pref) {
            let r = eval_one(model, &ev, runs)?;
            engines.push(EngineTiming {
                engine: ev.engine().name,
                detail: ev.detail(),
                dense_ms: r.dense_ms,
                eval_ms: r.eval_ms,
                plan_builds: r.plan_builds,
            });
        }
    }
    let ev = crate::eval::evaluator_with(model, source, engine)?;
    let mut report = eval_one(model, &ev, runs)?;
    if engine != EnginePref::Auto {
        engines.push(EngineTiming {
            engine: report.engine,
            detail: report.detail.clone(),
            dense_ms: report.dense_ms,
            eval_ms: report.eval_ms,
            plan_builds: report.plan_builds,
        });
    }
    report.engines = engines;
    log(&format!(
        "{}: dense {:.3} ms, masked after a change {:.3} ms ({} runs each, {})",
        report.model, report.dense_ms, report.eval_ms, runs, report.engine
    ));
    Ok(report)
}

fn eval_one(
    model: &Model,
    ev: &crate::eval::DataEvaluator,
    runs: usize,
) -> anyhow::Result<EvalReport> {
    use crate::eval::Evaluator;
    let masks_at = |s: f64| -> anyhow::Result<crate::prune::MaskSet> {
        let settings = PruneSettings {
            sparsity: s,
            ..PruneSettings::default()
        };
        Ok(crate::prune::prune(model, &settings, &Default::default(), &Progress::none())?.masks)
    };
    let masks = [masks_at(0.5)?, masks_at(0.6)?];
    // Warm-up: the first run picks the executor and builds the plan.
    let dense = ev.evaluate(model, &crate::prune::MaskSet::new())?;
    ev.run(model, Some(&masks[0]))?;
    let mut dense_t: Vec<f64> = Vec::with_capacity(runs);
    let mut masked_t = Vec::with_capacity(runs);
    for i in 0..runs {
        let t0 = Instant::now();
        ev.run(model, None)?;
        dense_t.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        ev.run(model, Some(&masks[(i + 1) % 2]))?;
        masked_t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let engine = ev.engine();
    let report = EvalReport {
        model: model.display_name(),
        data: ev.describe(),
        samples: ev.data().samples,
        engine: engine.name,
        detail: ev.detail(),
        path: engine.label(),
        runs,
        dense_ms: median(dense_t),
        eval_ms: median(masked_t),
        plan_builds: ev.plan_builds(),
        dense_accuracy: dense.accuracy,
        engines: Vec::new(),
    };
    Ok(report)
}

/// `prunescope bench sensitivity`: one full sweep, timed in medians.
#[derive(Debug, Serialize)]
pub struct SensitivityReport {
    pub model: String,
    pub data: String,
    pub engine: &'static str,
    /// Rows swept (layers, tied tensors counted once).
    pub layers: usize,
    pub grid: Vec<f64>,
    /// Evaluations per sweep (points at sparsity 0 reuse the dense metrics).
    pub evaluations: usize,
    /// One whole sweep: the dense evaluation, every mask and every evaluation.
    pub sweep_ms: f64,
    pub evals_per_s: f64,
    pub per_point_ms: f64,
    /// The same sweep evaluating the whole masked model at every point (no reuse of the dense
    /// activations ahead of the swept layer): what the partial evaluation saves.
    pub whole_model_sweep_ms: f64,
    pub runs: usize,
    pub threads: usize,
}

/// Forwards to an evaluator but evaluates every point on the whole model.
struct WholeModel<'a>(&'a dyn crate::eval::Evaluator);

impl crate::eval::Evaluator for WholeModel<'_> {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn engine(&self) -> crate::eval::Engine {
        self.0.engine()
    }
    fn evaluate(
        &self,
        model: &Model,
        masks: &crate::prune::MaskSet,
    ) -> Result<crate::eval::Metrics, crate::eval::EvalError> {
        self.0.evaluate(model, masks)
    }
}

pub fn sensitivity(
    model: &Model,
    source: &crate::eval::DataSource,
    grid: Vec<f64>,
    runs: usize,
    log: impl Fn(&str),
) -> anyhow::Result<SensitivityReport> {
    use crate::eval::Evaluator;
    use crate::sensitivity::{SweepSpec, groups, sweep};
    let settings = PruneSettings::default();
    let spec = SweepSpec::for_settings(&settings, grid);
    let none = Progress::none();
    let index = ScoreIndex::build(
        model,
        Criterion::Magnitude,
        0,
        &ScoreInputs::default(),
        &none,
    )?;
    let mut times = Vec::new();
    let mut whole = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        // A fresh evaluator each run, so the dense pass and its cached activations are timed
        // too; the engine is chosen (and warmed) before the clock starts.
        let ev = crate::eval::evaluator_with_data(model, source)?;
        ev.run(model, None)?;
        let t0 = Instant::now();
        let s = sweep(
            model,
            &index,
            &ev,
            &spec,
            groups(model, &settings),
            None,
            &none,
            |_| {},
        )?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        let ev = crate::eval::evaluator_with_data(model, source)?;
        ev.run(model, None)?;
        let t0 = Instant::now();
        let w = WholeModel(&ev);
        sweep(
            model,
            &index,
            &w,
            &spec,
            groups(model, &settings),
            None,
            &none,
            |_| {},
        )?;
        whole.push(t0.elapsed().as_secs_f64() * 1e3);
        last = Some((s, ev.engine().name));
    }
    let (s, engine) = last.expect("runs ≥ 1");
    let sweep_ms = median(times);
    let report = SensitivityReport {
        model: model.display_name(),
        data: s.data.clone(),
        engine,
        layers: s.layers.len(),
        grid: s.grid.clone(),
        evaluations: s.evaluations,
        sweep_ms,
        evals_per_s: s.evaluations as f64 / (sweep_ms / 1e3),
        per_point_ms: sweep_ms / s.evaluations.max(1) as f64,
        whole_model_sweep_ms: median(whole),
        runs,
        threads: rayon::current_num_threads(),
    };
    log(&format!(
        "{}: {} layers × {} sparsities, {} evaluations in {:.2} ms ({:.0}/s); whole-model \
         evaluation per point: {:.2} ms",
        report.model,
        report.layers,
        report.grid.len(),
        report.evaluations,
        report.sweep_ms,
        report.evals_per_s,
        report.whole_model_sweep_ms
    ));
    Ok(report)
}

/// `prunescope bench finetune`: masked fine-tuning of the sample MLP, timed.
#[derive(Debug, Serialize)]
pub struct FinetuneReport {
    pub model: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: &'static str,
    pub lr: f64,
    pub momentum: f64,
    /// Fraction of each weight matrix pruned (per-layer magnitude masks).
    pub sparsity: f64,
    /// Median over runs of the training steps alone (no evaluation).
    pub samples_per_s: f64,
    /// Test accuracy after fine-tuning (median run).
    pub test_accuracy: f64,
    pub dense_accuracy: f64,
    pub pruned_accuracy: f64,
    /// Pruned weights that were not exactly zero after training (must be 0).
    pub masked_nonzeros: usize,
    pub runs: usize,
}

pub fn finetune(epochs: usize, runs: usize, log: impl Fn(&str)) -> anyhow::Result<FinetuneReport> {
    use crate::prune::{LayerSettings, Scope};
    use crate::train::{FinetuneConfig, Net, finetune};
    let model = crate::sample::open_sample()?;
    let arch = crate::eval::MlpArch::from_json(
        model
            .metadata
            .get(crate::eval::ARCH_METADATA_KEY)
            .ok_or_else(|| anyhow::anyhow!("the sample has no architecture"))?,
    )?;
    let mut settings = PruneSettings {
        scope: Scope::Layer,
        ..Default::default()
    };
    for l in &arch.layers {
        settings.layers.insert(
            l.weight.clone(),
            LayerSettings {
                sparsity: 0.5,
                ..Default::default()
            },
        );
    }
    let masks = crate::prune::prune(
        &model,
        &settings,
        &ScoreInputs::default(),
        &Progress::none(),
    )?
    .masks;
    let split = crate::data::digits_split()?;
    let cfg = FinetuneConfig {
        epochs,
        ..Default::default()
    };
    let dense_accuracy = Net::from_model(&model, &arch, &crate::prune::MaskSet::new())?
        .metrics(&split.test)?
        .accuracy
        .unwrap_or(f64::NAN);
    let mut results = Vec::new();
    for _ in 0..runs {
        let net = Net::from_model(&model, &arch, &masks)?;
        let r = finetune(
            net,
            None,
            &split.train,
            &split.test,
            &cfg,
            &Progress::none(),
            |_, _| {},
        )?;
        results.push(r);
    }
    results.sort_by(|a, b| a.samples_per_s.total_cmp(&b.samples_per_s));
    let mid = &results[results.len() / 2];
    let report = FinetuneReport {
        model: model.display_name(),
        epochs,
        batch_size: cfg.batch_size,
        optimizer: "sgd",
        lr: cfg.lr,
        momentum: cfg.momentum,
        sparsity: 0.5,
        samples_per_s: mid.samples_per_s,
        test_accuracy: mid.after.accuracy.unwrap_or(f64::NAN),
        dense_accuracy,
        pruned_accuracy: mid.before.accuracy.unwrap_or(f64::NAN),
        masked_nonzeros: results.iter().map(|r| r.net.masked_nonzeros()).sum(),
        runs,
    };
    log(&format!(
        "{}: {:.0} samples/s, test accuracy {:.2}% (pruned {:.2}%, dense {:.2}%)",
        report.model,
        report.samples_per_s,
        report.test_accuracy * 100.0,
        report.pruned_accuracy * 100.0,
        report.dense_accuracy * 100.0
    ));
    Ok(report)
}

/// `prunescope bench kernels`: one square f32 layer at batch 1 in every format, medians.
#[derive(Debug, Serialize)]
pub struct KernelsReport {
    pub size: usize,
    pub batch: usize,
    pub threads: usize,
    pub runs: usize,
    pub dense_ms: f64,
    pub csr_90_ms: f64,
    pub csr_95_ms: f64,
    pub nm_2_4_ms: f64,
    pub rows_50_ms: f64,
    /// Spread of the dense timings: (min, max) over the runs.
    pub dense_spread_ms: (f64, f64),
    /// Bytes the dense kernel streams per call, over its median time.
    pub bandwidth_gb_s: f64,
    /// CSR at 90 % with 16-bit indices: its bytes at that bandwidth (the memory floor).
    pub csr_90_floor_ms: f64,
    pub csr_90_vs_floor: f64,
    pub nm_2_4_speedup: f64,
    pub rows_50_speedup: f64,
    /// Largest difference of any kernel's output from the dense kernel on the same weights
    /// (on the CPU: each format against CPU dense; on a GPU: each GPU kernel against CPU dense).
    pub max_abs_err: f64,
    pub device: crate::latency::Device,
    /// The wgpu adapter (with `--device gpu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<Adapter>,
}

#[derive(Debug, Serialize)]
pub struct Adapter {
    pub name: String,
    pub backend: String,
    /// Mesa's llvmpipe or lavapipe: a CPU emulating a GPU; its timings are not hardware ones.
    pub software: bool,
}

impl KernelsReport {
    /// The five medians (dense, CSR 90 %, CSR 95 %, 2:4, half the rows) and what follows from
    /// them: the bandwidth dense reaches, CSR 90 %'s memory floor at it, the speedups.
    fn from_medians(
        size: usize,
        runs: usize,
        [dense_ms, csr_90_ms, csr_95_ms, nm_2_4_ms, rows_50_ms]: [f64; 5],
        dense_spread_ms: (f64, f64),
        csr_90_bytes: usize,
        max_abs_err: f64,
        adapter: Option<Adapter>,
    ) -> KernelsReport {
        let bandwidth_gb_s = (size * size * 4) as f64 / (dense_ms * 1e-3) / 1e9;
        let csr_90_floor_ms = csr_90_bytes as f64 / (bandwidth_gb_s * 1e9) * 1e3;
        KernelsReport {
            size,
            batch: 1,
            threads: rayon::current_num_threads(),
            runs,
            dense_ms,
            csr_90_ms,
            csr_95_ms,
            nm_2_4_ms,
            rows_50_ms,
            dense_spread_ms,
            bandwidth_gb_s,
            csr_90_floor_ms,
            csr_90_vs_floor: csr_90_ms / csr_90_floor_ms,
            nm_2_4_speedup: dense_ms / nm_2_4_ms,
            rows_50_speedup: dense_ms / rows_50_ms,
            max_abs_err,
            device: match adapter {
                Some(_) => crate::latency::Device::Gpu,
                None => crate::latency::Device::Cpu,
            },
            adapter,
        }
    }
}

pub fn kernels(
    size: usize,
    runs: usize,
    device: crate::latency::Device,
    log: impl Fn(&str),
) -> anyhow::Result<KernelsReport> {
    use crate::kernels::{Csr, Dense, NmCompressed, remove_rows};
    if size == 0 || size > 32_768 {
        anyhow::bail!("--size {size}: choose 1..=32768");
    }
    #[cfg(feature = "gpu")]
    let gpu = match device {
        crate::latency::Device::Gpu => {
            let g = crate::kernels::gpu::Gpu::new().map_err(|e| anyhow::anyhow!(e))?;
            log(&g.info().label());
            Some(g)
        }
        crate::latency::Device::Cpu => None,
    };
    #[cfg(not(feature = "gpu"))]
    if device == crate::latency::Device::Gpu {
        anyhow::bail!("this build has no GPU support (the `gpu` feature is off)");
    }
    log(&format!("{size}×{size} f32 layer, batch 1…"));
    let mut rng = SplitMix64::new(0x4B);
    let w: Vec<f32> = (0..size * size).map(|_| rng.normal() as f32).collect();
    let x: Vec<f32> = (0..size).map(|_| rng.normal() as f32).collect();
    let dense = Dense {
        rows: size,
        cols: size,
        w,
    };
    // Magnitude masks: on normal weights the kept positions are spread like random ones.
    let masked = |s: f64| -> Dense {
        let mut mags: Vec<f32> = dense.w.iter().map(|v| v.abs()).collect();
        let k = ((s * mags.len() as f64) as usize).min(mags.len() - 1);
        let t = *mags.select_nth_unstable_by(k, f32::total_cmp).1;
        Dense {
            rows: size,
            cols: size,
            w: dense
                .w
                .iter()
                .map(|v| if v.abs() < t { 0.0 } else { *v })
                .collect(),
        }
    };
    let (d90, d95) = (masked(0.9), masked(0.95));
    let (c90, c95) = (Csr::from_dense(&d90, None), Csr::from_dense(&d95, None));
    let nm = NmCompressed::from_dense(&dense, 2, 4);
    let half: Vec<bool> = (0..size).map(|r| r % 2 == 0).collect();
    let small = remove_rows(&dense, &half);
    #[cfg(feature = "gpu")]
    if let Some(g) = gpu {
        return kernels_gpu(&g, size, runs, [&dense, &d90, &d95, &small], nm, log);
    }
    let mut y = vec![0f32; size];
    let time = |f: &mut dyn FnMut()| -> Vec<f64> {
        for _ in 0..3 {
            f();
        }
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect()
    };
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let dense_t = time(&mut || dense.matvec(&x, 1, &mut y));
    let dense_spread_ms = (
        dense_t.iter().cloned().fold(f64::INFINITY, f64::min),
        dense_t.iter().cloned().fold(0.0, f64::max),
    );
    let dense_ms = med(dense_t);
    let csr_90_ms = med(time(&mut || c90.matvec(&x, 1, &mut y)));
    let csr_95_ms = med(time(&mut || c95.matvec(&x, 1, &mut y)));
    let nm_2_4_ms = med(time(&mut || nm.matvec(&x, 1, &mut y)));
    let mut ys = vec![0f32; small.rows];
    let rows_50_ms = med(time(&mut || small.matvec(&x, 1, &mut ys)));
    // Dense again, last: the median of both passes, so warm-up order cannot favour a format.
    let dense_ms = dense_ms.min(med(time(&mut || dense.matvec(&x, 1, &mut y))));
    // Correctness in the same run: each format against the dense kernel on its own weights.
    let out = |f: &dyn Fn(&mut [f32]), n: usize| {
        let mut v = vec![0f32; n];
        f(&mut v);
        v
    };
    let err = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs() as f64)
            .fold(0.0, f64::max)
    };
    let max_abs_err = [
        err(
            &out(&|y| c90.matvec(&x, 1, y), size),
            &out(&|y| d90.matvec(&x, 1, y), size),
        ),
        err(
            &out(&|y| c95.matvec(&x, 1, y), size),
            &out(&|y| d95.matvec(&x, 1, y), size),
        ),
        err(
            &out(&|y| nm.matvec(&x, 1, y), size),
            &out(&|y| nm.to_dense().matvec(&x, 1, y), size),
        ),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    let report = KernelsReport::from_medians(
        size,
        runs,
        [dense_ms, csr_90_ms, csr_95_ms, nm_2_4_ms, rows_50_ms],
        dense_spread_ms,
        c90.bytes(),
        max_abs_err,
        None,
    );
    let (bandwidth_gb_s, csr_90_floor_ms) = (report.bandwidth_gb_s, report.csr_90_floor_ms);
    log(&format!(
        "dense {:.3} ms ({:.1} GB/s), CSR 90 % {:.3} ms (floor {:.3}), CSR 95 % {:.3} ms, 2:4 {:.3} ms, half the rows {:.3} ms",
        dense_ms, bandwidth_gb_s, csr_90_ms, csr_90_floor_ms, csr_95_ms, nm_2_4_ms, rows_50_ms
    ));
    Ok(report)
}

/// `bench kernels --device gpu`: the wgpu kernels on the same layers, each checked against
/// the CPU dense kernel on its weights.
#[cfg(feature = "gpu")]
fn kernels_gpu(
    gpu: &crate::kernels::gpu::Gpu,
    size: usize,
    runs: usize,
    [dense, d90, d95, small]: [&crate::kernels::Dense; 4],
    nm: crate::kernels::NmCompressed,
    log: impl Fn(&str),
) -> anyhow::Result<KernelsReport> {
    use crate::kernels::{Csr, Dense};
    use crate::latency::Kernel;
    let info = gpu.info();
    let copy = |d: &Dense| Dense {
        rows: d.rows,
        cols: d.cols,
        w: d.w.clone(),
    };
    let x = crate::latency::random_input(size, 1);
    let nm_dense = nm.to_dense();
    let cases: Vec<(Kernel, Dense)> = vec![
        (Kernel::Dense(copy(dense)), copy(dense)),
        (Kernel::Csr(Csr::from_dense(d90, None)), copy(d90)),
        (Kernel::Csr(Csr::from_dense(d95, None)), copy(d95)),
        (Kernel::Nm(nm), nm_dense),
        (Kernel::Dense(copy(small)), copy(small)),
    ];
    let mut medians = Vec::new();
    let mut spread = (0.0, 0.0);
    let mut max_abs_err = 0f64;
    // The run count sets the budget: about `runs` samples of a 4096² dense product.
    let budget_ms = runs as f64 * 2.0;
    for (i, (k, reference)) in cases.iter().enumerate() {
        max_abs_err = max_abs_err.max(
            gpu.max_err(k, reference, &x, 1)
                .map_err(anyhow::Error::msg)?,
        );
        let up = gpu.upload(k).map_err(anyhow::Error::msg)?;
        let t = gpu.time(&up, 1, budget_ms).map_err(anyhow::Error::msg)?;
        if i == 0 {
            spread = (t.min_ms, t.max_ms);
        }
        medians.push(t.median_ms);
    }
    let [dense_ms, csr_90_ms, csr_95_ms, nm_2_4_ms, rows_50_ms] = medians[..] else {
        unreachable!("five kernels")
    };
    log(&format!(
        "{}: dense {dense_ms:.3} ms, CSR 90 % {csr_90_ms:.3} ms, CSR 95 % {csr_95_ms:.3} ms, 2:4 {nm_2_4_ms:.3} ms, half the rows {rows_50_ms:.3} ms; max |GPU − CPU| {max_abs_err:.2e}",
        info.label()
    ));
    Ok(KernelsReport::from_medians(
        size,
        runs,
        [dense_ms, csr_90_ms, csr_95_ms, nm_2_4_ms, rows_50_ms],
        spread,
        Csr::from_dense(d90, None).bytes(),
        max_abs_err,
        Some(Adapter {
            name: info.name,
            backend: info.backend,
            software: info.software,
        }),
    ))
}
