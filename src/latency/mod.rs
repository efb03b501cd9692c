//! What a cut buys in time: every prunable layer, with the current masks, run in each storage
//! format at several batch sizes, on the CPU or on a GPU adapter through wgpu; speedup against
//! sparsity per format; the cost model `T = β·s + γ·B + τ` fitted to the measurements; and the
//! flags that say when a format will not pay.
//!
//! Layers are measured as their 2-D view (`rows × cols`; a conv weight `[O, I, kh, kw]` as
//! `O × I·kh·kw`, i.e. one output position per batch column), so figures compare formats, not
//! whole-network inference.

pub mod fit;

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::kernels::{BlockSparse, Csr, Dense, NmCompressed, compact};
use crate::model::Model;
use crate::progress::{Cancelled, Progress};
use crate::prune::{MaskSet, NmLines, Pattern, PruneSettings, nm_lines};
use crate::util::SplitMix64;

pub use fit::{FitParams, fit_cost_model};

/// A storage format for a pruned layer, and the kernel that multiplies by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Dense,
    Masked,
    Csr,
    Nm,
    Block,
    Rows,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Dense,
        Format::Masked,
        Format::Csr,
        Format::Nm,
        Format::Block,
        Format::Rows,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Format::Dense => "dense",
            Format::Masked => "masked dense",
            Format::Csr => "CSR",
            Format::Nm => "N:M compressed",
            Format::Block => "block-sparse",
            Format::Rows => "rows/cols removed",
        }
    }

    /// One sentence on what the format does, for tooltips and the CLI's help.
    pub fn explain(self) -> &'static str {
        match self {
            Format::Dense => "The original weights, every one multiplied: the baseline.",
            Format::Masked => {
                "Pruned weights set to zero but still stored and multiplied, as a mask in PyTorch does: no faster than dense."
            }
            Format::Csr => {
                "Compressed sparse rows: only the kept weights and their column indices are stored and multiplied."
            }
            Format::Nm => {
                "N of every M consecutive weights kept, stored as values plus small in-group positions (only for an N:M pattern)."
            }
            Format::Block => {
                "The matrix cut into b×b blocks; a block is stored (densely) when any weight in it is kept."
            }
            Format::Rows => {
                "Rows (output neurons) and columns (inputs) whose weights are all pruned are removed: a physically smaller dense layer."
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Gpu,
}

impl Device {
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "cpu" => Some(Device::Cpu),
            "gpu" => Some(Device::Gpu),
            _ => None,
        }
    }
}

/// What to measure.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencySpec {
    pub batches: Vec<usize>,
    pub device: Device,
    /// Block side for the block-sparse format.
    pub block: usize,
    /// Also measure speedup against sparsity on the largest layer.
    pub curves: bool,
    /// Time spent on one measurement after warm-up; repetitions stop at this or at 500.
    pub budget_ms: f64,
}

impl Default for LatencySpec {
    fn default() -> Self {
        LatencySpec {
            batches: DEFAULT_BATCHES.to_vec(),
            device: Device::Cpu,
            block: 4,
            curves: true,
            budget_ms: 40.0,
        }
    }
}

pub const DEFAULT_BATCHES: [usize; 4] = [1, 8, 32, 128];

/// Sparsities of the speedup-against-sparsity curves (N:M has its own fixed points).
pub const CURVE_SPARSITIES: [f64; 6] = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98];

/// The N:M patterns on the N:M curve.
const CURVE_NM: [(usize, usize); 3] = [(2, 4), (1, 4), (1, 8)];

/// A format slower than this fraction of dense's speed is flagged (closer is timing noise).
const BREAK_EVEN: f64 = 0.95;

/// Fewest timed runs of a measurement, whatever the budget.
const MIN_RUNS: usize = 9;
const MAX_RUNS: usize = 500;

/// The assumed power draw behind the energy estimate (not measured).
pub const ASSUMED_CPU_WATTS: f64 = 15.0;
pub const ASSUMED_GPU_WATTS: f64 = 300.0;

/// A median with its spread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub runs: usize,
}

impl Timing {
    pub fn from_samples(mut ms: Vec<f64>) -> Timing {
        if ms.is_empty() {
            return Timing::default();
        }
        ms.sort_by(f64::total_cmp);
        Timing {
            median_ms: ms[ms.len() / 2],
            min_ms: ms[0],
            max_ms: ms[ms.len() - 1],
            runs: ms.len(),
        }
    }
}

/// Times `f` after two warm-up calls: at least [`MIN_RUNS`] runs, then more until `budget_ms`
/// is spent, so fast kernels get hundreds of samples and slow ones a stable median still.
pub fn time_it(budget_ms: f64, mut f: impl FnMut()) -> Timing {
    f();
    f();
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < MIN_RUNS
        || (samples.len() < MAX_RUNS && start.elapsed().as_secs_f64() * 1e3 < budget_ms)
    {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Timing::from_samples(samples)
}

/// A layer in one format, ready to run.
pub enum Kernel {
    Dense(Dense),
    Csr(Csr),
    Nm(NmCompressed),
    Block(BlockSparse),
}

impl Kernel {
    pub fn rows(&self) -> usize {
        match self {
            Kernel::Dense(d) => d.rows,
            Kernel::Csr(c) => c.rows,
            Kernel::Nm(n) => n.rows,
            Kernel::Block(b) => b.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Kernel::Dense(d) => d.cols,
            Kernel::Csr(c) => c.cols,
            Kernel::Nm(n) => n.cols,
            Kernel::Block(b) => b.cols,
        }
    }

    pub fn matvec(&self, x: &[f32], batch: usize, y: &mut [f32]) {
        match self {
            Kernel::Dense(d) => d.matvec(x, batch, y),
            Kernel::Csr(c) => c.matvec(x, batch, y),
            Kernel::Nm(n) => n.matvec(x, batch, y),
            Kernel::Block(b) => b.matvec(x, batch, y),
        }
    }

    /// Values the kernel multiplies: non-zeros, plus the padding of blocks and N:M groups.
    pub fn stored(&self) -> u64 {
        (match self {
            Kernel::Dense(d) => d.w.len(),
            Kernel::Csr(c) => c.values.len(),
            Kernel::Nm(n) => n.values.len(),
            Kernel::Block(b) => b.values.len(),
        }) as u64
    }

    /// The structural units the cost model's γ is paid per: rows for dense and CSR, groups
    /// for N:M, kept blocks for block-sparse.
    pub fn structural(&self) -> u64 {
        (match self {
            Kernel::Dense(d) => d.rows,
            Kernel::Csr(c) => c.rows,
            Kernel::Nm(n) => n.rows * n.cols.div_ceil(n.m),
            Kernel::Block(b) => b.blocks(),
        }) as u64
    }

    /// Bytes the kernel streams per call (f32 values, its indices).
    pub fn bytes(&self) -> u64 {
        (match self {
            Kernel::Dense(d) => d.w.len() * 4,
            Kernel::Csr(c) => c.bytes(),
            Kernel::Nm(n) => n.bytes(),
            Kernel::Block(b) => b.bytes(),
        }) as u64
    }
}

/// One layer in one format at one batch size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    pub format: Format,
    pub batch: usize,
    #[serde(flatten)]
    pub timing: Timing,
    pub stored: u64,
    pub structural: u64,
    pub bytes: u64,
    /// Dense median over this median.
    pub speedup: f64,
    /// Realized efficiency: speedup over the theoretical `1/(1−s)` of the layer's sparsity.
    pub rho: f64,
    pub cached: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerLatency {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub numel: u64,
    pub nonzeros: u64,
    pub sparsity: f64,
    /// `numel / nonzeros`: what a format that skips every zero for free would reach.
    pub theoretical: f64,
    /// Rows and columns with at least one kept weight (the compacted layer's shape).
    pub kept_rows: usize,
    pub kept_cols: usize,
    pub measurements: Vec<Measurement>,
}

impl LayerLatency {
    pub fn get(&self, format: Format, batch: usize) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.format == format && m.batch == batch)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurvePoint {
    pub sparsity: f64,
    pub ms: f64,
    pub speedup: f64,
    pub stored: u64,
    pub structural: u64,
    /// `n:m` for the N:M curve.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
}

/// Speedup against sparsity for one format on one layer, each point with the structure that
/// format prefers (magnitude for CSR, whole blocks, whole rows, N:M groups).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Curve {
    pub format: Format,
    pub batch: usize,
    pub layer: String,
    pub dense_ms: f64,
    pub points: Vec<CurvePoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fit {
    pub format: Format,
    pub batch: usize,
    #[serde(flatten)]
    pub params: FitParams,
}

/// The whole model in one format: the sum of its layers' medians.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelTotal {
    pub format: Format,
    pub batch: usize,
    pub ms: f64,
    pub speedup: f64,
    /// Measured time × the assumed power: an estimate, not a measurement.
    pub energy_mj_estimate: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Flag {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    pub text: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device: Device,
    pub name: String,
    pub backend: String,
    /// A CPU emulation of a GPU (Mesa llvmpipe or lavapipe): correct, but its timings say
    /// nothing about hardware.
    pub software: bool,
    pub threads: usize,
}

impl DeviceInfo {
    pub fn cpu() -> DeviceInfo {
        let name = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|n| n.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        DeviceInfo {
            device: Device::Cpu,
            name,
            backend: "prunescope CPU kernels (rayon, AVX2 where present; gemm for batches ≥ 4)"
                .into(),
            software: false,
            threads: rayon::current_num_threads(),
        }
    }

    pub fn label(&self) -> String {
        match self.device {
            Device::Cpu => format!("CPU: {} ({} threads)", self.name, self.threads),
            Device::Gpu => format!(
                "GPU: {} ({}, {})",
                self.name,
                self.backend,
                if self.software {
                    "software: timings are not hardware figures"
                } else {
                    "hardware"
                }
            ),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencyReport {
    pub device: DeviceInfo,
    pub batches: Vec<usize>,
    pub formats: Vec<Format>,
    pub block: usize,
    pub layers: Vec<LayerLatency>,
    pub model: Vec<ModelTotal>,
    pub curves: Vec<Curve>,
    pub fits: Vec<Fit>,
    pub flags: Vec<Flag>,
    pub energy_assumption: String,
    /// Layers a format could not run on (too large for the GPU's buffers, …), with why.
    pub skipped: Vec<String>,
    pub measured: usize,
    pub cached: usize,
    pub elapsed_ms: f64,
    pub complete: bool,
}

/// What identifies a measurement for the cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub rows: usize,
    pub cols: usize,
    pub mask: u64,
    pub format: Format,
    pub batch: usize,
    pub device: Device,
    pub block: usize,
}

pub type LatencyCache = HashMap<CacheKey, Timing>;

/// Where the kernels run.
pub enum Engine {
    Cpu,
    #[cfg(feature = "gpu")]
    Gpu(crate::kernels::gpu::Gpu),
}

impl Engine {
    /// The engine for `device`: the GPU adapter wgpu finds, or an error saying why none.
    pub fn for_device(device: Device) -> Result<Engine, String> {
        match device {
            Device::Cpu => Ok(Engine::Cpu),
            #[cfg(feature = "gpu")]
            Device::Gpu => crate::kernels::gpu::Gpu::new().map(Engine::Gpu),
            #[cfg(not(feature = "gpu"))]
            Device::Gpu => Err("this build has no GPU support (the `gpu` feature is off)".into()),
        }
    }

    pub fn info(&self) -> DeviceInfo {
        match self {
            Engine::Cpu => DeviceInfo::cpu(),
            #[cfg(feature = "gpu")]
            Engine::Gpu(g) => g.info(),
        }
    }

    fn device(&self) -> Device {
        match self {
            Engine::Cpu => Device::Cpu,
            #[cfg(feature = "gpu")]
            Engine::Gpu(_) => Device::Gpu,
        }
    }

    /// Medians of `kernel` at each batch size (inputs drawn once per size).
    fn time(
        &self,
        kernel: &Kernel,
        batches: &[usize],
        budget_ms: f64,
        progress: &Progress,
    ) -> Result<Vec<Timing>, String> {
        let mut out = Vec::new();
        match self {
            Engine::Cpu => {
                for &b in batches {
                    progress.check().map_err(|_| "cancelled".to_string())?;
                    let x = random_input(b * kernel.cols(), b as u64);
                    let mut y = vec![0f32; b * kernel.rows()];
                    out.push(time_it(budget_ms, || kernel.matvec(&x, b, &mut y)));
                }
            }
            #[cfg(feature = "gpu")]
            Engine::Gpu(g) => {
                let k = g.upload(kernel)?;
                for &b in batches {
                    progress.check().map_err(|_| "cancelled".to_string())?;
                    out.push(g.time(&k, b, budget_ms)?);
                }
            }
        }
        Ok(out)
    }
}

pub fn random_input(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(0x1A7E ^ seed);
    (0..len).map(|_| rng.normal() as f32).collect()
}

/// A 64-bit FNV-1a hash of a keep pattern, for the cache.
fn hash_keep(keep: &[bool]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for chunk in keep.chunks(64) {
        let mut word = 0u64;
        for (i, k) in chunk.iter().enumerate() {
            word |= (*k as u64) << i;
        }
        for byte in word.to_le_bytes() {
            h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h ^ keep.len() as u64
}

/// The tensors a latency run measures: prunable, with a 2-D view.
pub fn layers(model: &Model, settings: &PruneSettings) -> Vec<usize> {
    (0..model.tensors.len())
        .filter(|&t| settings.is_prunable(model, t) && model.tensors[t].shape.len() >= 2)
        .filter(|&t| model.tensors[t].numel > 0)
        .collect()
}

/// A tensor's weights with its N:M groups laid out as consecutive runs of `m` columns, the
/// layout the N:M kernel reads: one row per outer index, each of its lines (see
/// [`crate::prune::nm_lines`]: for a conv, the input channels at one kernel position) padded
/// with zeros to a multiple of `m`, so a short group never borrows weights of the next line.
pub fn nm_layout(w: &[f32], lines: NmLines, m: usize) -> Dense {
    let NmLines { outer, len, stride } = lines;
    let lp = len.div_ceil(m.max(1)) * m.max(1);
    let mut out = vec![0f32; outer * stride * lp];
    for o in 0..outer {
        for r in 0..stride {
            for i in 0..len {
                out[(o * stride + r) * lp + i] = w[o * len * stride + i * stride + r];
            }
        }
    }
    Dense {
        rows: outer,
        cols: stride * lp,
        w: out,
    }
}

/// Which rows and which columns of a `rows × cols` keep pattern hold any kept weight.
fn kept_lines(keep: &[bool], rows: usize, cols: usize) -> (Vec<bool>, Vec<bool>) {
    let mut r = vec![false; rows];
    let mut c = vec![false; cols];
    for (i, k) in keep.iter().enumerate() {
        if *k {
            r[i / cols] = true;
            c[i % cols] = true;
        }
    }
    (r, c)
}

/// The kernel of `format` for weights `dense` under `keep` (None where the format does not
/// apply: N:M without an N:M pattern).
fn build(
    format: Format,
    dense: &Dense,
    masked: &Dense,
    keep: &[bool],
    nm: Option<(usize, usize, &Dense)>,
    block: usize,
) -> Option<Kernel> {
    Some(match format {
        Format::Dense => Kernel::Dense(Dense {
            rows: dense.rows,
            cols: dense.cols,
            w: dense.w.clone(),
        }),
        Format::Masked => Kernel::Dense(Dense {
            rows: masked.rows,
            cols: masked.cols,
            w: masked.w.clone(),
        }),
        Format::Csr => Kernel::Csr(Csr::from_dense(masked, Some(keep))),
        Format::Nm => {
            let (n, m, ordered) = nm?;
            Kernel::Nm(NmCompressed::from_dense(ordered, n, m))
        }
        Format::Block => Kernel::Block(BlockSparse::from_dense(masked, Some(keep), block)),
        Format::Rows => {
            let (rows, cols) = kept_lines(keep, masked.rows, masked.cols);
            Kernel::Dense(compact(masked, &rows, &cols))
        }
    })
}

/// Measures every prunable layer of `model` under `masks` in each format at each batch size,
/// then the curves, fits, totals and flags. `cache` answers measurements already made;
/// `partial` sees the report after each layer. Cancelling returns what was measured so far
/// with `complete: false`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &Model,
    masks: &MaskSet,
    settings: &PruneSettings,
    spec: &LatencySpec,
    engine: &Engine,
    cache: &mut LatencyCache,
    progress: &Progress,
    mut partial: impl FnMut(&LatencyReport),
) -> LatencyReport {
    let start = Instant::now();
    let nm = match settings.pattern {
        Pattern::NM { n, m } => Some((n, m)),
        _ => None,
    };
    // N:M applies to the current masks only under an N:M pattern; its curve is drawn anyway.
    let curve_formats: Vec<Format> = Format::ALL
        .into_iter()
        .filter(|f| engine_supports(engine, *f))
        .collect();
    let formats: Vec<Format> = curve_formats
        .iter()
        .copied()
        .filter(|f| nm.is_some() || *f != Format::Nm)
        .collect();
    let device = engine.device();
    let mut report = LatencyReport {
        device: engine.info(),
        batches: spec.batches.clone(),
        formats: formats.clone(),
        block: spec.block,
        ..Default::default()
    };
    let (watts, what) = assumed_power(&report.device);
    report.energy_assumption =
        format!("energy = measured time × an assumed {watts} W ({what}); not measured");
    let ts = layers(model, settings);
    let units = ts.len() * formats.len() + usize::from(spec.curves) * curve_units(&curve_formats);
    let done = std::cell::Cell::new(0usize);
    let tick = |what: &str| {
        progress.report(done.get() as f32 / units.max(1) as f32, what);
        done.set(done.get() + 1);
    };
    'layers: for &t in &ts {
        let e = &model.tensors[t];
        let (rows, cols) = e.matrix_dims();
        let w = crate::prune::masked_f32(model, t, None);
        let keep: Vec<bool> = match masks.get(&e.name) {
            Some(m) => (0..m.len()).map(|i| m.kept(i)).collect(),
            None => vec![true; w.len()],
        };
        let masked_w: Vec<f32> = w
            .iter()
            .zip(&keep)
            .map(|(v, k)| if *k { *v } else { 0.0 })
            .collect();
        let mask_hash = hash_keep(&keep);
        let dense = Dense { rows, cols, w };
        let masked = Dense {
            rows,
            cols,
            w: masked_w,
        };
        let ordered = nm.map(|(_, m)| nm_layout(&masked.w, nm_lines(e), m));
        let nonzeros = keep.iter().filter(|k| **k).count() as u64;
        let (kr, kc) = kept_lines(&keep, rows, cols);
        let kept_rows = kr.iter().filter(|k| **k).count();
        let kept_cols = kc.iter().filter(|k| **k).count();
        let numel = e.numel as u64;
        let sparsity = 1.0 - nonzeros as f64 / numel.max(1) as f64;
        let theoretical = numel as f64 / nonzeros.max(1) as f64;
        let mut layer = LayerLatency {
            name: e.name.clone(),
            rows,
            cols,
            numel,
            nonzeros,
            sparsity,
            theoretical,
            kept_rows,
            kept_cols,
            measurements: Vec::new(),
        };
        for &format in &formats {
            tick(&format!("{} · {}", e.name, format.label()));
            let nm_args = nm.zip(ordered.as_ref()).map(|((n, m), o)| (n, m, o));
            let Some(kernel) = build(format, &dense, &masked, &keep, nm_args, spec.block) else {
                continue;
            };
            let key = |batch: usize| CacheKey {
                rows,
                cols,
                mask: if format == Format::Dense {
                    0
                } else {
                    mask_hash
                },
                format,
                batch,
                device,
                block: if format == Format::Block {
                    spec.block
                } else {
                    0
                },
            };
            let missing: Vec<usize> = spec
                .batches
                .iter()
                .copied()
                .filter(|b| !cache.contains_key(&key(*b)))
                .collect();
            match engine.time(&kernel, &missing, spec.budget_ms, progress) {
                Ok(timings) => {
                    report.measured += timings.len();
                    for (b, t) in missing.iter().zip(timings) {
                        cache.insert(key(*b), t);
                    }
                }
                Err(_) if progress.check().is_err() => break 'layers,
                Err(why) => {
                    report
                        .skipped
                        .push(format!("{} · {}: {why}", e.name, format.label()));
                    continue;
                }
            }
            for &batch in &spec.batches {
                let timing = cache[&key(batch)];
                let cached = !missing.contains(&batch);
                report.cached += usize::from(cached);
                layer.measurements.push(Measurement {
                    format,
                    batch,
                    timing,
                    stored: kernel.stored(),
                    structural: kernel.structural(),
                    bytes: kernel.bytes(),
                    speedup: 0.0,
                    rho: 0.0,
                    cached,
                });
            }
        }
        // Dense again, last, keeping the faster median of the two passes: measured first
        // alone it would carry whatever warm-up the machine still needed, flattering the rest.
        let fresh: Vec<usize> = layer
            .measurements
            .iter()
            .filter(|m| m.format == Format::Dense && !m.cached)
            .map(|m| m.batch)
            .collect();
        if !fresh.is_empty()
            && let Some(k) = build(Format::Dense, &dense, &masked, &keep, None, spec.block)
            && let Ok(again) = engine.time(&k, &fresh, spec.budget_ms, progress)
        {
            for (b, t) in fresh.iter().zip(again) {
                if let Some(m) = layer
                    .measurements
                    .iter_mut()
                    .find(|m| m.format == Format::Dense && m.batch == *b)
                    && t.median_ms < m.timing.median_ms
                {
                    m.timing = t;
                    cache.insert(
                        CacheKey {
                            rows,
                            cols,
                            mask: 0,
                            format: Format::Dense,
                            batch: *b,
                            device,
                            block: 0,
                        },
                        t,
                    );
                }
            }
        }
        // Speedups against this layer's own dense time at the same batch.
        let dense_ms: HashMap<usize, f64> = layer
            .measurements
            .iter()
            .filter(|m| m.format == Format::Dense)
            .map(|m| (m.batch, m.timing.median_ms))
            .collect();
        for m in &mut layer.measurements {
            if let Some(d) = dense_ms.get(&m.batch) {
                m.speedup = d / m.timing.median_ms.max(1e-12);
                m.rho = m.speedup / theoretical;
            }
        }
        report.layers.push(layer);
        finish(&mut report, spec);
        partial(&report);
        if progress.check().is_err() {
            break;
        }
    }
    let cancelled = progress.check().is_err();
    if spec.curves
        && !cancelled
        && let Some(&t) = ts.iter().max_by_key(|&&t| model.tensors[t].numel)
        && let Ok(c) = curves(model, t, spec, engine, &curve_formats, progress, &tick)
    {
        report.curves = c;
    }
    report.complete = progress.check().is_ok() && report.layers.len() == ts.len();
    finish(&mut report, spec);
    report.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    progress.report(1.0, "latency measured");
    report
}

/// Timed kernels on the curves: dense twice, four formats at each sparsity, three N:M points.
fn curve_units(formats: &[Format]) -> usize {
    let per_s = formats
        .iter()
        .filter(|f| {
            matches!(
                f,
                Format::Masked | Format::Csr | Format::Block | Format::Rows
            )
        })
        .count();
    2 + per_s * CURVE_SPARSITIES.len()
        + if formats.contains(&Format::Nm) {
            CURVE_NM.len()
        } else {
            0
        }
}

fn engine_supports(engine: &Engine, format: Format) -> bool {
    // Block-sparse has no GPU kernel.
    !(engine.device() == Device::Gpu && format == Format::Block)
}

/// Speedup against sparsity on layer `t`, for each format at each batch size.
fn curves(
    model: &Model,
    t: usize,
    spec: &LatencySpec,
    engine: &Engine,
    formats: &[Format],
    progress: &Progress,
    tick: &dyn Fn(&str),
) -> Result<Vec<Curve>, Cancelled> {
    let e = &model.tensors[t];
    let (rows, cols) = e.matrix_dims();
    let w = crate::prune::masked_f32(model, t, None);
    let dense = Dense {
        rows,
        cols,
        w: w.clone(),
    };
    let time = |k: &Kernel| -> Result<Vec<Timing>, Cancelled> {
        progress.check()?;
        tick(&format!("{}: speedup against sparsity", e.name));
        engine
            .time(k, &spec.batches, spec.budget_ms, progress)
            .map_err(|_| Cancelled)
    };
    let dense_t = time(&Kernel::Dense(Dense {
        rows,
        cols,
        w: w.clone(),
    }))?;
    let mut out: Vec<Curve> = Vec::new();
    let mut push = |format: Format, sparsity: f64, pattern: Option<String>, k: &Kernel| {
        let ts = time(k)?;
        for (bi, &batch) in spec.batches.iter().enumerate() {
            let d = dense_t[bi].median_ms;
            let point = CurvePoint {
                sparsity,
                ms: ts[bi].median_ms,
                speedup: d / ts[bi].median_ms.max(1e-12),
                stored: k.stored(),
                structural: k.structural(),
                pattern: pattern.clone(),
            };
            match out
                .iter_mut()
                .find(|c| c.format == format && c.batch == batch)
            {
                Some(c) => c.points.push(point),
                None => out.push(Curve {
                    format,
                    batch,
                    layer: e.name.clone(),
                    dense_ms: d,
                    points: vec![point],
                }),
            }
        }
        Ok(())
    };
    // Scores for each structure: |w| per weight, the L2 norm per block and per row.
    let mags: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let b = spec.block.max(1);
    let (brows, bcols) = (rows.div_ceil(b), cols.div_ceil(b));
    let mut block_norm = vec![0f64; brows * bcols];
    let mut row_norm = vec![0f64; rows];
    for r in 0..rows {
        for c in 0..cols {
            let v = (w[r * cols + c] as f64).powi(2);
            block_norm[(r / b) * bcols + c / b] += v;
            row_norm[r] += v;
        }
    }
    let top = |scores: &[f64], s: f64| -> Vec<bool> {
        let keep = ((1.0 - s) * scores.len() as f64).round() as usize;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let mut k = vec![false; scores.len()];
        for &i in order.iter().take(keep) {
            k[i] = true;
        }
        k
    };
    let mags64: Vec<f64> = mags.iter().map(|v| *v as f64).collect();
    for &s in &CURVE_SPARSITIES {
        for &format in formats {
            let keep: Vec<bool> = match format {
                Format::Csr | Format::Masked => top(&mags64, s),
                Format::Block => {
                    let kb = top(&block_norm, s);
                    (0..rows * cols)
                        .map(|i| kb[(i / cols / b) * bcols + (i % cols) / b])
                        .collect()
                }
                Format::Rows => {
                    let kr = top(&row_norm, s);
                    (0..rows * cols).map(|i| kr[i / cols]).collect()
                }
                Format::Dense | Format::Nm => continue,
            };
            // Nothing left to multiply (a small layer at a high sparsity): no point to time.
            if !keep.contains(&true) {
                continue;
            }
            let masked = Dense {
                rows,
                cols,
                w: w.iter()
                    .zip(&keep)
                    .map(|(v, k)| if *k { *v } else { 0.0 })
                    .collect(),
            };
            let Some(k) = build(format, &dense, &masked, &keep, None, b) else {
                continue;
            };
            push(format, s, None, &k)?;
        }
    }
    if formats.contains(&Format::Nm) {
        // N:M at its own fixed sparsities, whatever the current pattern is.
        for (n, m) in CURVE_NM {
            let k = Kernel::Nm(NmCompressed::from_dense(
                &nm_layout(&w, nm_lines(e), m),
                n,
                m,
            ));
            push(
                Format::Nm,
                1.0 - n as f64 / m as f64,
                Some(format!("{n}:{m}")),
                &k,
            )?;
        }
    }
    // Dense again, last (as for the layers): the faster of the two medians is the baseline.
    let again = time(&Kernel::Dense(dense))?;
    for c in &mut out {
        let bi = spec.batches.iter().position(|b| *b == c.batch).unwrap_or(0);
        c.dense_ms = c.dense_ms.min(again[bi].median_ms);
        for p in &mut c.points {
            p.speedup = c.dense_ms / p.ms.max(1e-12);
        }
    }
    Ok(out)
}

/// The power behind the energy estimate: a software adapter is the CPU working.
fn assumed_power(d: &DeviceInfo) -> (f64, &'static str) {
    match d.device {
        Device::Gpu if !d.software => (ASSUMED_GPU_WATTS, "a data-centre GPU's board power"),
        Device::Gpu => (
            ASSUMED_CPU_WATTS,
            "a software GPU adapter is the CPU: a laptop-class CPU package under load",
        ),
        Device::Cpu => (ASSUMED_CPU_WATTS, "a laptop-class CPU package under load"),
    }
}

/// Totals, fits and flags from the layers (and curves) measured so far.
fn finish(report: &mut LatencyReport, spec: &LatencySpec) {
    let watts = assumed_power(&report.device).0;
    report.model.clear();
    for &batch in &spec.batches {
        let dense: f64 = report
            .layers
            .iter()
            .filter_map(|l| l.get(Format::Dense, batch))
            .map(|m| m.timing.median_ms)
            .sum();
        for &format in &report.formats {
            let all: Option<Vec<f64>> = report
                .layers
                .iter()
                .map(|l| l.get(format, batch).map(|m| m.timing.median_ms))
                .collect();
            let Some(all) = all.filter(|a| !a.is_empty()) else {
                continue;
            };
            let ms: f64 = all.iter().sum();
            report.model.push(ModelTotal {
                format,
                batch,
                ms,
                speedup: dense / ms.max(1e-12),
                energy_mj_estimate: ms * watts,
            });
        }
    }
    report.fits.clear();
    for &format in &report.formats {
        for &batch in &spec.batches {
            // The layers as they are, and the largest one across the curve's sparsities.
            let points: Vec<(f64, f64, f64)> = report
                .layers
                .iter()
                .filter_map(|l| l.get(format, batch))
                .map(|m| (m.stored as f64, m.structural as f64, m.timing.median_ms))
                .chain(
                    report
                        .curves
                        .iter()
                        .filter(|c| c.format == format && c.batch == batch)
                        .flat_map(|c| &c.points)
                        .map(|p| (p.stored as f64, p.structural as f64, p.ms)),
                )
                .collect();
            if let Some(params) = fit_cost_model(&points) {
                report.fits.push(Fit {
                    format,
                    batch,
                    params,
                });
            }
        }
    }
    report.flags = flags(report);
}

fn flags(report: &LatencyReport) -> Vec<Flag> {
    let mut out = Vec::new();
    if report.batches.contains(&1)
        && let Some(bw) = dense_bandwidth(report)
    {
        out.push(Flag {
            kind: "memory-bound".into(),
            layer: None,
            format: None,
            batch: Some(1),
            text: format!(
                "decode-like (batch 1): memory-bound: each weight is used once per call, so time follows the bytes a format streams ({bw:.1} GB/s reached by dense), not its multiply-adds"
            ),
        });
    }
    for l in &report.layers {
        let odd = |kept: usize, all: usize| kept < all && !kept.is_multiple_of(8);
        if report.formats.contains(&Format::Rows)
            && (odd(l.kept_rows, l.rows) || odd(l.kept_cols, l.cols))
        {
            out.push(Flag {
                kind: "odd-width".into(),
                layer: Some(l.name.clone()),
                format: Some(Format::Rows),
                batch: None,
                text: format!(
                    "{}: {}×{} left after removing empty rows and columns, not a multiple of 8: vector units and GPUs run such widths slower",
                    l.name, l.kept_rows, l.kept_cols
                ),
            });
        }
        // Masked dense is dense by construction; a format within noise of dense is no flag.
        for &format in &report.formats {
            if matches!(format, Format::Dense | Format::Masked) {
                continue;
            }
            let slow: Vec<&Measurement> = l
                .measurements
                .iter()
                .filter(|m| m.format == format && m.speedup < BREAK_EVEN)
                .collect();
            if slow.is_empty() {
                continue;
            }
            let at: Vec<String> = slow
                .iter()
                .map(|m| format!("{} ({:.2}×)", m.batch, m.speedup))
                .collect();
            out.push(Flag {
                kind: "below-break-even".into(),
                layer: Some(l.name.clone()),
                format: Some(format),
                batch: (slow.len() == 1).then(|| slow[0].batch),
                text: format!(
                    "{}: below break-even: {} is slower than dense here at batch {}",
                    l.name,
                    format.label(),
                    at.join(", ")
                ),
            });
        }
    }
    out
}

/// Bytes the dense kernel streamed per second at batch 1, over all layers.
fn dense_bandwidth(report: &LatencyReport) -> Option<f64> {
    let (bytes, ms) = report
        .layers
        .iter()
        .filter_map(|l| l.get(Format::Dense, 1))
        .fold((0u64, 0f64), |(b, t), m| {
            (b + m.bytes, t + m.timing.median_ms)
        });
    (ms > 0.0).then(|| bytes as f64 / (ms * 1e-3) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conv weight `[O, I, kh, kw]` with the 2:4 mask pruning's N:M geometry gives it (per
    /// output channel and kernel position, the N largest |w| of each run of M input channels),
    /// worked out here by direct loops.
    fn nm_masked_conv(o: usize, i: usize, k: usize, n: usize, m: usize) -> Vec<f32> {
        let mut rng = SplitMix64::new((o * 100 + i * 10 + k) as u64);
        let mut w: Vec<f32> = (0..o * i * k).map(|_| rng.normal() as f32).collect();
        for oo in 0..o {
            for kk in 0..k {
                for g in (0..i).step_by(m) {
                    let members: Vec<usize> = (g..(g + m).min(i))
                        .map(|ii| oo * i * k + ii * k + kk)
                        .collect();
                    let mut order = members.clone();
                    order.sort_by(|&a, &b| w[b].abs().total_cmp(&w[a].abs()));
                    for &drop in order.iter().skip(n) {
                        w[drop] = 0.0;
                    }
                }
            }
        }
        w
    }

    fn small_model() -> Model {
        let mut rng = SplitMix64::new(5);
        let mut t = |shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            (
                shape,
                (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>(),
            )
        };
        let (s1, w1) = t(vec![16, 32]);
        let (s2, w2) = t(vec![8, 3, 3, 3]);
        Model::from_f32_tensors(
            "t",
            vec![("fc.weight".into(), s1, w1), ("conv.weight".into(), s2, w2)],
        )
    }

    #[test]
    fn a_run_measures_every_layer_in_every_format_with_the_masks_counts() {
        let model = small_model();
        let settings = PruneSettings {
            pattern: Pattern::NM { n: 2, m: 4 },
            ..Default::default()
        };
        let p = crate::prune::prune(
            &model,
            &settings,
            &crate::prune::ScoreInputs::default(),
            &Progress::none(),
        )
        .unwrap();
        let spec = LatencySpec {
            batches: vec![1, 4],
            budget_ms: 0.5,
            ..Default::default()
        };
        let mut cache = LatencyCache::new();
        let r = run(
            &model,
            &p.masks,
            &settings,
            &spec,
            &Engine::Cpu,
            &mut cache,
            &Progress::none(),
            |_| {},
        );
        assert!(r.complete);
        assert_eq!(r.formats, Format::ALL.to_vec());
        assert_eq!(r.layers.len(), 2);
        for l in &r.layers {
            let kept = p.masks.get(&l.name).unwrap().count_kept() as u64;
            assert_eq!(l.nonzeros, kept, "{}", l.name);
            assert_eq!(l.measurements.len(), 6 * 2);
            assert_eq!(l.get(Format::Csr, 1).unwrap().stored, kept);
            assert_eq!(l.get(Format::Dense, 4).unwrap().speedup, 1.0);
            // N:M stores N per group: the kept weights (the conv's 3 channels pad to 4).
            let nm = l.get(Format::Nm, 1).unwrap();
            assert_eq!(
                nm.stored,
                if l.name == "fc.weight" {
                    kept
                } else {
                    8 * 9 * 2
                }
            );
        }
        assert!(!r.curves.is_empty() && !r.fits.is_empty());
        // A second run answers from the cache and measures nothing.
        let again = run(
            &model,
            &p.masks,
            &settings,
            &spec,
            &Engine::Cpu,
            &mut cache,
            &Progress::none(),
            |_| {},
        );
        assert_eq!(again.cached, 2 * 6 * 2);
        assert_eq!(
            again.layers[0].get(Format::Csr, 1).unwrap().timing,
            r.layers[0].get(Format::Csr, 1).unwrap().timing
        );
    }

    #[test]
    fn a_cancelled_run_is_marked_unfinished() {
        let model = small_model();
        let cancel = crate::progress::CancelFlag::new();
        cancel.cancel();
        let progress = Progress::new(cancel, |_, _| {});
        let r = run(
            &model,
            &MaskSet::new(),
            &PruneSettings::default(),
            &LatencySpec::default(),
            &Engine::Cpu,
            &mut LatencyCache::new(),
            &progress,
            |_| {},
        );
        assert!(!r.complete);
        assert!(r.layers.len() < 2);
    }

    #[test]
    fn the_nm_kernel_keeps_every_weight_an_nm_mask_kept_whatever_the_channel_count() {
        // Channel counts below, at and off a multiple of M: the kernel's product must equal the
        // masked conv's (as a matrix times the same input laid out the same way).
        for (o, i, k) in [(3, 1, 4), (4, 3, 9), (2, 4, 1), (5, 6, 4), (2, 9, 9)] {
            let masked = nm_masked_conv(o, i, k, 2, 4);
            // A conv [o, i, k, 1]: lines of i channels at each of the k kernel positions.
            let lines = NmLines {
                outer: o,
                len: i,
                stride: k,
            };
            let laid = nm_layout(&masked, lines, 4);
            let nm = NmCompressed::from_dense(&laid, 2, 4);
            // Nothing dropped, nothing invented: the kernel's weights are the laid-out mask's.
            assert_eq!(nm.to_dense().w, laid.w, "[{o}, {i}, {k}]");
            let kept = masked.iter().filter(|v| **v != 0.0).count();
            assert_eq!(laid.w.iter().filter(|v| **v != 0.0).count(), kept);
            // And the product equals the conv's matrix view on the correspondingly laid-out x.
            let x: Vec<f32> = random_input(i * k, 3);
            let xl = nm_layout(&x, NmLines { outer: 1, ..lines }, 4).w;
            let mut want = vec![0f32; o];
            Dense {
                rows: o,
                cols: i * k,
                w: masked.clone(),
            }
            .matvec(&x, 1, &mut want);
            let mut got = vec![0f32; o];
            nm.matvec(&xl, 1, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "[{o}, {i}, {k}]: {a} vs {b}");
            }
        }
    }
}
