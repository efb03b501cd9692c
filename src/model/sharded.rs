//! Sharded safetensors checkpoints: a `*.safetensors.index.json` whose `weight_map` names, for
//! every tensor, the shard file that holds it. Every shard is memory-mapped (never read whole);
//! tensors are byte ranges into one address space laid over the shards, in shard order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::safetensors_io::{ParseError, parse_safetensors};
use super::{Backing, Model, ModelError, ModelFormat, ModelSource};
use crate::progress::Progress;

/// One shard of a checkpoint: its file, the tensors it holds (in file order) and its own
/// `__metadata__`, so that an export can write the same shards back.
#[derive(Clone, Debug)]
pub struct Shard {
    pub file: PathBuf,
    pub tensors: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// The checkpoint's index file, when `path` names one: the index itself, a folder holding
/// exactly one, or a shard (`…-00001-of-00003.safetensors`) with its index beside it.
pub fn index_for(path: &Path) -> Result<Option<PathBuf>, ModelError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        return Ok(Some(path.to_path_buf()));
    }
    let dir_err = |msg: String| ModelError::Format {
        path: path.display().to_string(),
        msg,
    };
    if path.is_dir() {
        let mut indexes = Vec::new();
        let mut shards = 0;
        let entries = std::fs::read_dir(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            error: e,
        })?;
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".safetensors.index.json") {
                indexes.push(e.path());
            } else if n.ends_with(".safetensors") {
                shards += 1;
            }
        }
        indexes.sort();
        return match indexes.len() {
            1 => Ok(indexes.pop()),
            0 if shards == 0 => Err(dir_err(
                "is a directory, not a model file, and holds no sharded checkpoint (no *.safetensors.index.json)".into(),
            )),
            0 => Err(dir_err(format!(
                "is a directory with {shards} .safetensors file(s) and no *.safetensors.index.json: open a file itself, or add the index that says which shard holds which tensor"
            ))),
            n => Err(dir_err(format!(
                "{n} *.safetensors.index.json files in one folder: open the one you mean"
            ))),
        };
    }
    // A shard of a checkpoint: the index beside it that lists it.
    if is_shard_name(&name)
        && let Some(dir) = path.parent()
        && let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".safetensors.index.json")
                && std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&name))
            {
                return Ok(Some(e.path()));
            }
        }
    }
    Ok(None)
}

/// `model-00001-of-00003.safetensors` and the like.
fn is_shard_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".safetensors") else {
        return false;
    };
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    parts.len() == 4
        && parts[1] == "of"
        && [parts[0], parts[2]]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Opens the checkpoint an index file describes, mapping its shards one by one (progress and
/// cancel between shards).
pub fn open_index(index: &Path, progress: &Progress) -> Result<Model, ModelError> {
    let ip = index.display().to_string();
    let fmt = |msg: String| ModelError::Format {
        path: ip.clone(),
        msg,
    };
    let text = std::fs::read(index).map_err(|e| ModelError::Io {
        path: ip.clone(),
        error: e,
    })?;
    if text.len() > 256 << 20 {
        return Err(fmt(format!(
            "{} bytes is far larger than any index file",
            text.len()
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| fmt(format!("not a safetensors index (invalid JSON: {e})")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(fmt(
            "not a safetensors index: no \"weight_map\" object naming each tensor's shard".into(),
        ));
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    // Shards in natural name order; tensors each index entry promises.
    let mut files: Vec<String> = Vec::new();
    let mut promised: HashMap<String, String> = HashMap::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(fmt(format!(
                "tensor '{tensor}': its shard is not a file name"
            )));
        };
        if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
            return Err(fmt(format!(
                "tensor '{tensor}': shard '{file}' is not a plain file name beside the index"
            )));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
        promised.insert(tensor.clone(), file.to_string());
    }
    if files.is_empty() {
        return Err(fmt("the index names no tensors".into()));
    }
    files.sort_by(|a, b| crate::util::natural_cmp(a, b));
    let mut maps = Vec::with_capacity(files.len());
    let mut starts = Vec::with_capacity(files.len());
    let mut entries = Vec::new();
    let mut shards = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut offset = 0usize;
    for (i, file) in files.iter().enumerate() {
        progress.check().map_err(|_| fmt("cancelled".into()))?;
        progress.report(
            i as f32 / files.len() as f32,
            &format!("Mapping shard {} of {}: {file}", i + 1, files.len()),
        );
        let path = dir.join(file);
        if !path.exists() {
            // The first of its tensors by name, so the message is the same every time.
            let example = promised
                .iter()
                .filter(|(_, f)| *f == file)
                .map(|(t, _)| t.as_str())
                .min_by(|a, b| crate::util::natural_cmp(a, b))
                .unwrap_or("");
            return Err(fmt(format!(
                "shard '{file}' is missing (the index puts tensor '{example}' there)"
            )));
        }
        let mmap = super::map_regular_file(&path)?;
        let sp = path.display().to_string();
        let (mut es, metadata) = parse_safetensors(&mmap).map_err(|e| match e {
            ParseError::File(msg) => ModelError::Format {
                path: sp.clone(),
                msg,
            },
            ParseError::Tensor(tensor, msg) => ModelError::Tensor {
                path: sp.clone(),
                tensor,
                msg,
            },
        })?;
        es.sort_by_key(|e| e.bytes.start);
        let mut names = Vec::with_capacity(es.len());
        for mut e in es {
            match promised.get(&e.name) {
                Some(f) if f == file => {}
                Some(f) => {
                    return Err(fmt(format!(
                        "tensor '{}' is in shard '{file}' but the index puts it in '{f}'",
                        e.name
                    )));
                }
                None => {
                    return Err(fmt(format!(
                        "shard '{file}' holds tensor '{}', which the index does not list",
                        e.name
                    )));
                }
            }
            if let Some(other) = seen.insert(e.name.clone(), file.clone()) {
                return Err(fmt(format!(
                    "tensor '{}' is in both '{other}' and '{file}'",
                    e.name
                )));
            }
            names.push(e.name.clone());
            e.bytes = e.bytes.start + offset..e.bytes.end + offset;
            entries.push(e);
        }
        shards.push(Shard {
            file: path,
            tensors: names,
            metadata,
        });
        starts.push(offset);
        offset += mmap.len();
        maps.push(mmap);
    }
    if let Some((tensor, file)) = promised
        .iter()
        .filter(|(t, _)| !seen.contains_key(*t))
        .min_by(|a, b| crate::util::natural_cmp(a.0, b.0))
    {
        return Err(fmt(format!(
            "the index puts tensor '{tensor}' in shard '{file}', which does not hold it"
        )));
    }
    progress.report(1.0, "Shards mapped");
    let metadata = shards
        .first()
        .map(|s| s.metadata.clone())
        .unwrap_or_default();
    let mut model = Model::new(
        ModelSource::File(index.to_path_buf()),
        ModelFormat::Safetensors,
        entries,
        metadata,
        Backing::Shards { maps, starts },
    );
    model.data_files = shards.iter().map(|s| s.file.clone()).collect();
    model.shards = shards;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::is_shard_name;

    #[test]
    fn shard_names_are_recognised() {
        assert!(is_shard_name("model-00001-of-00003.safetensors"));
        assert!(is_shard_name("diffusion_pytorch_model-2-of-2.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
        assert!(!is_shard_name("model-00001-of-x.safetensors"));
        assert!(!is_shard_name("a-of-1.safetensors"));
    }
}
