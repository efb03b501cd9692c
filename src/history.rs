//! The experiment history: every configuration that was evaluated, per model, so the Pareto
//! front of metric against size can be drawn and any point restored.
//!
//! One JSON file per model content hash under the data directory, shared by the GUI and the
//! CLI, rewritten atomically.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::eval::Metrics;
use crate::model::Model;
use crate::prune::{Allocation, PruneSettings};
use crate::sensitivity::MetricKind;

/// Records kept per model; the oldest go first.
pub const MAX_RECORDS: usize = 5000;

/// One evaluated configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// "gui" or "cli".
    pub source: String,
    pub model_hash: String,
    pub settings: PruneSettings,
    /// What it was measured on.
    pub data: String,
    pub metric: MetricKind,
    /// The metric's value (accuracy, or cosine fidelity without labels).
    pub value: f64,
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub fidelity: Option<f64>,
    /// Fraction of prunable weights removed.
    pub sparsity: f64,
    pub params: u64,
    /// Weights left non-zero in the whole model.
    pub nonzeros: u64,
    pub csr_bytes: u64,
    /// Estimated multiply-add FLOPs per sample of the Linear and Conv2d layers, where the
    /// graph's shapes are known.
    pub flops: Option<f64>,
}

impl Record {
    /// The same configuration measured the same way: equal settings and data, and either both
    /// plain measurements (GUI or CLI) or the same kind of training run.
    pub fn same_configuration(&self, o: &Record) -> bool {
        let plain = |r: &Record| r.source == "gui" || r.source == "cli";
        self.settings == o.settings
            && self.data == o.data
            && (plain(self) && plain(o) || self.source == o.source)
    }

    /// A record of `metrics` for `settings` and their allocation.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: &str,
        model: &Model,
        model_hash: &str,
        settings: &PruneSettings,
        alloc: &Allocation,
        csr_bytes: u64,
        metrics: &Metrics,
        data: &str,
        flops: Option<f64>,
    ) -> Record {
        Record::measured(
            source,
            model,
            model_hash,
            settings,
            (alloc.pruned, alloc.prunable),
            csr_bytes,
            metrics,
            data,
            flops,
        )
    }

    /// A record from the pruned and prunable weight counts (a trained model has no
    /// allocation of its own).
    #[allow(clippy::too_many_arguments)]
    pub fn measured(
        source: &str,
        model: &Model,
        model_hash: &str,
        settings: &PruneSettings,
        (pruned, prunable): (u64, u64),
        csr_bytes: u64,
        metrics: &Metrics,
        data: &str,
        flops: Option<f64>,
    ) -> Record {
        let kind = MetricKind::of(metrics);
        let params = model.total_params();
        Record {
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source: source.into(),
            model_hash: model_hash.into(),
            settings: settings.clone(),
            data: data.into(),
            metric: kind,
            value: kind.value(metrics),
            accuracy: metrics.accuracy,
            loss: metrics.loss,
            fidelity: metrics.fidelity.map(|f| f.cosine),
            sparsity: if prunable == 0 {
                0.0
            } else {
                pruned as f64 / prunable as f64
            },
            params,
            nonzeros: params - pruned,
            csr_bytes,
            flops,
        }
    }
}

/// Estimated FLOPs per sample (2 per multiply-add) of the layers in `uses` after pruning.
pub fn flops(model: &Model, alloc: &Allocation, uses: &[(String, f64)]) -> f64 {
    uses.iter()
        .filter_map(|(name, u)| {
            let t = model.find(name)?;
            let kept = alloc
                .for_tensor(t)
                .map_or(model.tensors[t].numel, |l| l.kept());
            Some(2.0 * kept as f64 * u)
        })
        .sum()
}

/// A model's history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub model_hash: String,
    pub records: Vec<Record>,
}

/// Where histories live: `$PRUNESCOPE_DATA_DIR`, else `$XDG_DATA_HOME/prunescope`, else
/// `~/.local/share/prunescope`.
pub fn data_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PRUNESCOPE_DATA_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("prunescope"));
    }
    std::env::var_os("HOME").map(|h| {
        PathBuf::from(h)
            .join(".local")
            .join("share")
            .join("prunescope")
    })
}

fn file_for(hash: &str) -> Option<PathBuf> {
    // The hash is hex from our own hasher; anything else is not used as a file name.
    if hash.is_empty() || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(data_dir()?.join("history").join(format!("{hash}.json")))
}

impl History {
    /// The stored history of a model (empty when there is none or it cannot be read).
    pub fn load(model_hash: &str) -> History {
        let empty = History {
            model_hash: model_hash.into(),
            records: Vec::new(),
        };
        let Some(path) = file_for(model_hash) else {
            return empty;
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<History>(&t).ok())
            .filter(|h| h.model_hash == model_hash)
            .unwrap_or(empty)
    }

    /// Writes the history atomically.
    pub fn save(&self) -> std::io::Result<()> {
        use std::io::Write;
        let path = file_for(&self.model_hash).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no data directory")
        })?;
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let json = serde_json::to_string(self).expect("plain data serialises");
        crate::util::atomic_write(&path, |w| w.write_all(json.as_bytes()))
    }

    /// Writes the history after taking in records another process (the CLI) added to the file
    /// since it was loaded; records of the same configuration keep the newer one.
    pub fn save_merged(&mut self) -> std::io::Result<()> {
        let disk = History::load(&self.model_hash);
        let mut merged = disk.records;
        for r in std::mem::take(&mut self.records) {
            merged.retain(|o| !o.same_configuration(&r));
            merged.push(r);
        }
        merged.sort_by_key(|r| r.time);
        self.records = merged;
        if self.records.len() > MAX_RECORDS {
            let extra = self.records.len() - MAX_RECORDS;
            self.records.drain(..extra);
        }
        self.save()
    }

    /// Adds a record; an earlier record of the same settings on the same data is replaced
    /// (the newest measurement wins and the scatter has one point per configuration).
    pub fn push(&mut self, r: Record) {
        self.records.retain(|o| !o.same_configuration(&r));
        self.records.push(r);
        if self.records.len() > MAX_RECORDS {
            let extra = self.records.len() - MAX_RECORDS;
            self.records.drain(..extra);
        }
    }

    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "time,source,scope,rule,criterion,pattern,target,sparsity,accuracy,loss,fidelity,\
             nonzeros,params,csr_bytes,flops,data,settings_json\n",
        );
        let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
        for r in &self.records {
            let st = &r.settings;
            let settings = serde_json::to_string(st).expect("serialises");
            s.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\",\"{}\"\n",
                r.time,
                r.source,
                serde_json::to_value(st.scope)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                st.rule.cli_name(),
                st.criterion.cli_name(),
                st.pattern,
                st.sparsity,
                r.sparsity,
                f(r.accuracy),
                f(r.loss),
                f(r.fidelity),
                r.nonzeros,
                r.params,
                r.csr_bytes,
                f(r.flops),
                r.data.replace('"', "\"\""),
                settings.replace('"', "\"\""),
            ));
        }
        s
    }
}

/// Indices of the points on the Pareto front, cheapest first: no other point costs as little
/// or less and scores as well or better with one of the two strictly better.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0.is_finite() && points[i].1.is_finite())
        .collect();
    // Cheapest first; at equal cost the best score first, so it alone can enter the front.
    order.sort_by(|&a, &b| {
        points[a]
            .0
            .total_cmp(&points[b].0)
            .then(points[b].1.total_cmp(&points[a].1))
    });
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for i in order {
        if points[i].1 > best {
            best = points[i].1;
            front.push(i);
        }
    }
    front
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The front by definition, point against every other point.
    fn brute_front(p: &[(f64, f64)]) -> Vec<usize> {
        let mut f: Vec<usize> = (0..p.len())
            .filter(|&i| {
                !(0..p.len()).any(|j| {
                    j != i
                        && p[j].0 <= p[i].0
                        && p[j].1 >= p[i].1
                        && (p[j].0 < p[i].0 || p[j].1 > p[i].1)
                })
            })
            .collect();
        f.sort_by(|&a, &b| p[a].0.total_cmp(&p[b].0));
        // Exact duplicates: keep one.
        f.dedup_by(|a, b| p[*a] == p[*b]);
        f
    }

    #[test]
    fn pareto_front_matches_brute_force() {
        let mut rng = crate::util::SplitMix64::new(7);
        for _ in 0..200 {
            let n = 1 + rng.below(30) as usize;
            let p: Vec<(f64, f64)> = (0..n)
                .map(|_| (rng.below(10) as f64, rng.below(10) as f64))
                .collect();
            let got: Vec<(f64, f64)> = pareto_front(&p).iter().map(|&i| p[i]).collect();
            let want: Vec<(f64, f64)> = brute_front(&p).iter().map(|&i| p[i]).collect();
            assert_eq!(got, want, "{p:?}");
        }
    }
}
