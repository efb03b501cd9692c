//! `prunescope bench large`: a synthetic checkpoint with Llama-2-7B's shapes, written once as
//! bf16 safetensors shards with an index, then opened, analysed, slid, masked and exported as
//! the app does, with the time and the resident memory of each step.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::analysis::{all_histograms, all_histograms_with};
use crate::export::{TensorSpec, export_weights, write_safetensors};
use crate::model::Model;
use crate::progress::Progress;
use crate::prune::{Criterion, PruneSettings, ScoreIndex, ScoreInputs, allocate, build_masks};
use crate::util::atomic_write;

const INDEX: &str = "model.safetensors.index.json";
const SHARDS: usize = 3;

/// Llama-2-7B: hidden 4096, MLP 11008, vocabulary 32000, 32 blocks. `params` is the nominal
/// size, as in model names (7e9 is Llama-2-7B's 6.74 billion); smaller ones keep the widths
/// and take fewer blocks, and below about a billion the widths shrink too.
pub fn llama_shapes(params: u64) -> Vec<(String, Vec<usize>)> {
    let params = (params as f64 * 6_738_415_616.0 / 7e9) as u64;
    let (mut d, vocab) = (4096usize, 32000usize);
    let inter = |d: usize| (d * 11008 / 4096).div_ceil(64) * 64;
    let per_block = |d: usize| (4 * d * d + 3 * d * inter(d) + 2 * d) as u64;
    let mut blocks =
        ((params as f64 - 2.0 * (vocab * d) as f64) / per_block(d) as f64).round() as i64;
    if blocks < 2 {
        // Two blocks, and the width that gives about `params`: 2·V·d + 2·(4 + 3·2.6875)·d².
        blocks = 2;
        let (a, b) = (2.0 * 12.0625, 2.0 * vocab as f64);
        let w = (-b + (b * b + 4.0 * a * params as f64).sqrt()) / (2.0 * a);
        d = ((w / 64.0).round() as usize).max(1) * 64;
    }
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, d])];
    for i in 0..blocks as usize {
        let p = format!("model.layers.{i}");
        for n in ["q", "k", "v", "o"] {
            out.push((format!("{p}.self_attn.{n}_proj.weight"), vec![d, d]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![inter(d), d]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![inter(d), d]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, inter(d)]));
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    }
    out.push(("model.norm.weight".into(), vec![d]));
    out.push(("lm_head.weight".into(), vec![vocab, d]));
    out
}

#[derive(Debug, Serialize)]
pub struct LargeReport {
    pub params: u64,
    pub dtype: String,
    pub path: String,
    pub shards: usize,
    pub tensors: usize,
    pub file_bytes: u64,
    /// Whether this run wrote the checkpoint (else it was there from an earlier run).
    pub generated: bool,
    pub generate_ms: f64,
    /// Open (map, parse) and analysis (score index, histograms), the shards evicted from the
    /// page cache first (`posix_fadvise(DONTNEED)`): the cold figure.
    pub open_ms: f64,
    /// The same again with the shards in the page cache.
    pub open_warm_ms: f64,
    pub index_bytes: usize,
    /// Peak resident memory of the process (VmHWM): mapped file pages read count here too.
    pub peak_rss_mb: f64,
    /// Peak anonymous resident memory (sampled every 10 ms): the process's own memory,
    /// beyond the mapping.
    pub peak_anon_mb: f64,
    pub slider_update_us: f64,
    pub full_masks_ms: f64,
    /// Memory the masks themselves take (one bit per weight).
    pub masks_mb: f64,
    pub histograms_ms: f64,
    pub export_ms: Option<f64>,
    pub export_peak_anon_mb: Option<f64>,
    pub export_mb_s: Option<f64>,
    /// Why the export was not timed (not enough free disk), if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_skipped: Option<String>,
    /// What bounds each figure, from the figures themselves.
    pub bounds: BTreeMap<String, String>,
    pub threads: usize,
}

/// Samples the process's anonymous resident memory in the background.
struct AnonPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl AnonPeak {
    fn start() -> AnonPeak {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kb) = status_kb("RssAnon:") {
                    p.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        AnonPeak { peak, stop }
    }
    fn reset(&self) {
        self.peak
            .store(status_kb("RssAnon:").unwrap_or(0), Ordering::Relaxed);
    }
    fn mb(&self) -> f64 {
        self.peak.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for AnonPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Free bytes for an unprivileged user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a valid statvfs to fill.
    (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0).then(|| s.f_bavail * s.f_frsize)
}

/// Evicts a file's pages from the page cache, so the next read comes from the disk.
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: a valid descriptor; the advice only drops clean cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// bf16 bits of one synthetic weight: a random sign and mantissa with the exponent in a
/// narrow band (|w| in [2^-10, 2^-2)), so magnitudes repeat as real bf16 weights' do.
#[inline]
fn weight_bits(x: u64) -> u16 {
    let sign = ((x >> 63) as u16) << 15;
    let exp = (117 + (x >> 40) % 8) as u16;
    let mant = (x & 0x7f) as u16;
    sign | exp << 7 | mant
}

/// Writes the checkpoint into `dir` (skipped when an earlier run left the same one there).
fn generate(dir: &Path, shapes: &[(String, Vec<usize>)], tag: &str) -> anyhow::Result<bool> {
    let index = dir.join(INDEX);
    if let Ok(text) = std::fs::read_to_string(&index)
        && serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|j| j["metadata"]["prunescope_bench"].as_str().map(|s| s == tag))
            == Some(true)
        && (1..=SHARDS).all(|i| dir.join(shard_name(i)).is_file())
    {
        return Ok(false);
    }
    let bytes: u64 = shapes
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<usize>() as u64)
        .sum();
    std::fs::create_dir_all(dir)?;
    if let Some(free) = free_bytes(dir)
        && free < bytes + (1 << 30)
    {
        anyhow::bail!(
            "{}: the checkpoint needs {:.1} GB and 1 GB to spare; {:.1} GB are free",
            dir.display(),
            bytes as f64 / 1e9,
            free as f64 / 1e9
        );
    }
    // Shards of about equal size, tensors in order.
    let per = bytes.div_ceil(SHARDS as u64);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); SHARDS];
    let mut acc = 0u64;
    for (i, (_, s)) in shapes.iter().enumerate() {
        let g = ((acc / per) as usize).min(SHARDS - 1);
        groups[g].push(i);
        acc += 2 * s.iter().product::<usize>() as u64;
    }
    let mut weight_map = serde_json::Map::new();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (g, ids) in groups.iter().enumerate() {
        let name = shard_name(g + 1);
        let specs: Vec<TensorSpec> = ids
            .iter()
            .map(|&i| TensorSpec {
                name: &shapes[i].0,
                dtype: "BF16",
                shape: &shapes[i].1,
                len: 2 * shapes[i].1.iter().product::<usize>(),
            })
            .collect();
        atomic_write(&dir.join(&name), |w| {
            write_safetensors(w, &meta, &specs, |k, w| {
                let i = ids[k];
                let n = specs[k].len / 2;
                let mut rng = crate::util::SplitMix64::new(i as u64 + 1);
                let mut buf = Vec::with_capacity(1 << 20);
                for _ in 0..n {
                    buf.extend_from_slice(&weight_bits(rng.next_u64()).to_le_bytes());
                    if buf.len() >= 1 << 20 {
                        w.write_all(&buf)?;
                        buf.clear();
                    }
                }
                w.write_all(&buf)
            })
        })?;
        for &i in ids {
            weight_map.insert(shapes[i].0.clone(), name.clone().into());
        }
    }
    let index_json = serde_json::json!({
        "metadata": {"total_size": bytes, "prunescope_bench": tag},
        "weight_map": weight_map,
    });
    atomic_write(&index, |w| {
        w.write_all(serde_json::to_string_pretty(&index_json)?.as_bytes())
    })?;
    Ok(true)
}

fn shard_name(i: usize) -> String {
    format!("model-{i:05}-of-{SHARDS:05}.safetensors")
}

pub fn large(
    params: u64,
    dtype: &str,
    dir: &Path,
    log: impl Fn(&str),
) -> anyhow::Result<LargeReport> {
    if dtype != "bf16" {
        anyhow::bail!(
            "--dtype {dtype}: only bf16 is generated (the dtype of the checkpoints this benchmark stands for)"
        );
    }
    if !(1e6..=2e10).contains(&(params as f64)) {
        anyhow::bail!("--params {params}: choose 1e6..=2e10");
    }
    let shapes = llama_shapes(params);
    let total: u64 = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let tag = format!("llama-{total}-bf16");
    log(&format!(
        "{} tensors, {:.2}B parameters, {:.1} GB of bf16 in {SHARDS} shards under {}",
        shapes.len(),
        total as f64 / 1e9,
        2.0 * total as f64 / 1e9,
        dir.display()
    ));
    let anon = AnonPeak::start();
    let t = Instant::now();
    let generated = generate(dir, &shapes, &tag)?;
    let generate_ms = t.elapsed().as_secs_f64() * 1e3;
    log(&format!(
        "{} in {:.1} s",
        if generated {
            "generated"
        } else {
            "found from an earlier run"
        },
        generate_ms / 1e3
    ));
    let none = Progress::none();
    let shard_paths: Vec<PathBuf> = (1..=SHARDS).map(|i| dir.join(shard_name(i))).collect();
    let open_and_analyse = || -> anyhow::Result<(Model, ScoreIndex, f64)> {
        let t = Instant::now();
        let model = Model::open(&dir.join(INDEX))?;
        // As the app does at open: one pass counting patterns feeds index and histograms.
        let patterns = model.all_pattern_counts(&none)?;
        let inputs = ScoreInputs {
            patterns: Some(&patterns),
            ..Default::default()
        };
        let index = ScoreIndex::build(&model, Criterion::Magnitude, 0, &inputs, &none)?;
        let hist = all_histograms_with(&model, 128, &none, Some(&patterns))?;
        std::hint::black_box(hist);
        Ok((model, index, t.elapsed().as_secs_f64() * 1e3))
    };
    for p in &shard_paths {
        evict(p);
    }
    anon.reset();
    log("open + analysis, cold…");
    let (model, index, open_ms) = open_and_analyse()?;
    drop((model, index));
    log(&format!(
        "{:.1} s; again with the shards cached…",
        open_ms / 1e3
    ));
    let (model, index, open_warm_ms) = open_and_analyse()?;
    log(&format!("{:.1} s", open_warm_ms / 1e3));
    let at = |s: f64| PruneSettings {
        sparsity: s,
        ..Default::default()
    };
    let (s5, s6) = (at(0.5), at(0.6));
    let mut samples = Vec::new();
    for i in 0..41 {
        let s = if i % 2 == 0 { &s6 } else { &s5 };
        let t = Instant::now();
        std::hint::black_box(allocate(&model, &index, s));
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let slider_update_us = samples[samples.len() / 2];
    log(&format!(
        "slider update {slider_update_us:.0} µs; full masks…"
    ));
    let alloc = allocate(&model, &index, &s5);
    let t = Instant::now();
    let masks = build_masks(&model, &index, &s5, &alloc, &none)?;
    let full_masks_ms = t.elapsed().as_secs_f64() * 1e3;
    let masks_mb = masks
        .iter()
        .map(|(_, m)| m.words().len() * 8)
        .sum::<usize>() as f64
        / 1e6;
    log(&format!("{:.1} s; histograms…", full_masks_ms / 1e3));
    let t = Instant::now();
    std::hint::black_box(all_histograms(&model, 128, &none)?);
    let histograms_ms = t.elapsed().as_secs_f64() * 1e3;
    let peak_anon_mb = anon.mb();
    let file_bytes: u64 = shard_paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    // The export: the same shards again, pruned, then removed.
    let out = dir.join("pruned");
    let (mut export_ms, mut export_peak_anon_mb, mut export_mb_s, mut export_skipped) =
        (None, None, None, None);
    match free_bytes(dir) {
        Some(free) if free < file_bytes + (1 << 30) => {
            export_skipped = Some(format!(
                "the export needs {:.1} GB and 1 GB to spare; {:.1} GB are free",
                file_bytes as f64 / 1e9,
                free as f64 / 1e9
            ));
        }
        _ => {
            log("export…");
            anon.reset();
            let t = Instant::now();
            export_weights(&model, &masks, &out, &none)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            export_ms = Some(ms);
            export_mb_s = Some(file_bytes as f64 / 1e6 / (ms / 1e3));
            export_peak_anon_mb = Some(anon.mb());
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    let peak_rss_mb = status_kb("VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let gb_s = |ms: f64| file_bytes as f64 / 1e9 / (ms / 1e3);
    let mut bounds = BTreeMap::new();
    bounds.insert(
        "open_ms".into(),
        format!(
            "{:.2} GB/s of shards read cold, {:.2} GB/s cached: one pass counting 16-bit patterns feeds the score index and the histograms",
            gb_s(open_ms),
            gb_s(open_warm_ms)
        ),
    );
    bounds.insert(
        "slider_update_us".into(),
        "binary search over each tensor's distinct magnitudes: no pass over the weights".into(),
    );
    bounds.insert(
        "full_masks_ms".into(),
        format!(
            "{:.2} GB/s: one pass decoding every weight to compare it with its tensor's threshold",
            gb_s(full_masks_ms)
        ),
    );
    bounds.insert(
        "histograms_ms".into(),
        format!(
            "{:.2} GB/s: one pass counting 16-bit patterns (no decoding)",
            gb_s(histograms_ms)
        ),
    );
    if let Some(r) = export_mb_s {
        bounds.insert(
            "export_ms".into(),
            format!("{r:.0} MB/s written (the disk)"),
        );
    }
    Ok(LargeReport {
        params: total,
        dtype: dtype.into(),
        path: dir.display().to_string(),
        shards: SHARDS,
        tensors: shapes.len(),
        file_bytes,
        generated,
        generate_ms,
        open_ms,
        open_warm_ms,
        index_bytes: index.heap_bytes(),
        peak_rss_mb,
        peak_anon_mb,
        slider_update_us,
        full_masks_ms,
        masks_mb,
        histograms_ms,
        export_ms,
        export_peak_anon_mb,
        export_mb_s,
        export_skipped,
        bounds,
        threads: rayon::current_num_threads(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_7b_shapes_add_up_to_its_parameter_count() {
        let s = llama_shapes(7_000_000_000);
        let n: u64 = s
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        // Llama-2-7B: 6,738,415,616 parameters.
        assert_eq!(n, 6_738_415_616);
        assert_eq!(s.len(), 2 + 32 * 9 + 1);
        let small: u64 = llama_shapes(20_000_000)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        assert!((10_000_000..40_000_000).contains(&small), "{small}");
    }
}
