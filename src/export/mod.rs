//! Taking results away: pruned weights, masks and recipes, all written atomically.

pub mod compact;
mod recipe;

pub use recipe::{LayerResult, RECIPE_FORMAT, Recipe, RecipeError, RecipeInput};

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::model::Model;
use crate::progress::Progress;
use crate::prune::{Mask, MaskSet};
use crate::util::atomic_write;

/// One tensor to write: its header entry and how many bytes its data has.
#[derive(Clone)]
pub struct TensorSpec<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [usize],
    pub len: usize,
}

/// Writes a safetensors file: header (tensors in the given order, contiguous), then each
/// tensor's data from `write_data(i, writer)`, which must write exactly `len` bytes.
pub fn write_safetensors<W: Write>(
    w: &mut W,
    metadata: &BTreeMap<String, String>,
    tensors: &[TensorSpec],
    mut write_data: impl FnMut(usize, &mut W) -> io::Result<()>,
) -> io::Result<()> {
    if tensors.iter().any(|t| t.name == "__metadata__") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a tensor named __metadata__ cannot be stored in safetensors (the name is reserved)",
        ));
    }
    let mut json = header_json(metadata, tensors).into_bytes();
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    while !(json.len() + 8).is_multiple_of(8) {
        json.push(b' ');
    }
    w.write_all(&(json.len() as u64).to_le_bytes())?;
    w.write_all(&json)?;
    for i in 0..tensors.len() {
        write_data(i, w)?;
    }
    Ok(())
}

/// The header JSON, written directly: a `serde_json::Map` of a million tensors costs seconds
/// and gigabytes. The bytes are exactly what serializing that map gives (keys in byte order,
/// each entry's fields in byte order), so files stay identical to earlier versions' output.
fn header_json(metadata: &BTreeMap<String, String>, tensors: &[TensorSpec]) -> String {
    use std::fmt::Write as _;
    let quoted = |s: &str| serde_json::to_string(s).expect("strings always serialise");
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        offsets.push(offset);
        offset += t.len;
    }
    let mut keys: Vec<(&str, Option<usize>)> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name, Some(i)))
        .collect();
    if !metadata.is_empty() {
        keys.push(("__metadata__", None));
    }
    keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut out = String::with_capacity(64 + tensors.len() * 96);
    out.push('{');
    for (k, (name, i)) in keys.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        out.push_str(&quoted(name));
        out.push(':');
        match i {
            None => {
                out.push('{');
                for (j, (mk, mv)) in metadata.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{}:{}", quoted(mk), quoted(mv));
                }
                out.push('}');
            }
            Some(i) => {
                let t = &tensors[*i];
                let _ = write!(
                    out,
                    "{{\"data_offsets\":[{},{}],\"dtype\":{},\"shape\":[",
                    offsets[*i],
                    offsets[*i] + t.len,
                    quoted(t.dtype)
                );
                for (d, n) in t.shape.iter().enumerate() {
                    if d > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{n}");
                }
                out.push_str("]}");
            }
        }
    }
    out.push('}');
    out
}

/// Writes named f32 tensors atomically (training output, tests).
pub fn write_f32_safetensors(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> io::Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, s, v)| TensorSpec {
            name: n,
            dtype: "F32",
            shape: s,
            len: v.len() * 4,
        })
        .collect();
    atomic_write(path, |w| {
        write_safetensors(w, metadata, &specs, |i, w| {
            for v in &tensors[i].2 {
                w.write_all(&v.to_le_bytes())?;
            }
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_byte_identical_to_serialising_a_json_map() {
        // The reference: the serde_json map the writer used to build.
        let mut metadata = BTreeMap::new();
        metadata.insert("prunescope.arch".to_string(), "{\"a\": [1, 2]}".to_string());
        metadata.insert("z\u{1b}".to_string(), "\"q\"\n".to_string());
        let specs = [
            TensorSpec {
                name: "fc2.weight",
                dtype: "F32",
                shape: &[3, 4],
                len: 48,
            },
            TensorSpec {
                name: "Fc1.bias",
                dtype: "BF16",
                shape: &[],
                len: 2,
            },
            TensorSpec {
                name: "emb\u{e9}\"x",
                dtype: "U8",
                shape: &[0, 7],
                len: 0,
            },
            TensorSpec {
                name: "a_b",
                dtype: "I64",
                shape: &[1],
                len: 8,
            },
        ];
        let mut header = serde_json::Map::new();
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
        let mut offset = 0usize;
        for t in &specs {
            header.insert(
                t.name.to_string(),
                serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.len]}),
            );
            offset += t.len;
        }
        let reference = serde_json::to_string(&header).unwrap();
        assert_eq!(header_json(&metadata, &specs), reference);
        assert_eq!(
            header_json(&BTreeMap::new(), &specs[..1]),
            r#"{"fc2.weight":{"data_offsets":[0,48],"dtype":"F32","shape":[3,4]}}"#
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: cannot write: {}", crate::util::io_message(error))]
    Io { path: String, error: io::Error },
    /// An output would replace an input or another output of the same command.
    #[error("{0}")]
    Conflict(String),
    /// The output format cannot hold this model or these masks.
    #[error("{0}")]
    Unsupported(String),
    #[error("tensor '{0}' has a dtype whose elements are not whole bytes; it cannot be masked")]
    NotByteAddressable(String),
    #[error("cancelled")]
    Cancelled,
}

/// Every tensor of the model as it is written to safetensors: same name, dtype, shape and bytes.
pub fn tensor_specs(model: &Model) -> Vec<TensorSpec<'_>> {
    model
        .tensors
        .iter()
        .enumerate()
        .map(|(t, e)| TensorSpec {
            name: &e.name,
            dtype: e.dtype.safetensors_name(),
            shape: &e.shape,
            len: model.tensor_bytes(t).len(),
        })
        .collect()
}

/// Writes the model with pruned weights set to zero: same names, shapes, dtypes and metadata
/// as the input; unmasked tensors are copied byte for byte.
pub fn export_pruned(
    model: &Model,
    masks: &MaskSet,
    path: &Path,
    progress: &Progress,
) -> Result<(), ExportError> {
    for (name, _) in masks.iter() {
        let Some(t) = model.find(name) else { continue };
        if model.tensors[t].dtype.size_bytes().is_none() {
            return Err(ExportError::NotByteAddressable(name.to_string()));
        }
    }
    if !model.shards.is_empty() && sharded_output(path) {
        return export_shards(model, masks, path, progress);
    }
    let all: Vec<usize> = (0..model.tensors.len()).collect();
    let mut written = 0usize;
    write_pruned_file(
        model,
        masks,
        &all,
        &model.metadata,
        path,
        progress,
        &mut written,
    )
}

/// Whether `path` asks for a checkpoint's shards rather than one file: an index file name, a
/// folder, or a name without an extension.
pub fn sharded_output(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".index.json") || path.is_dir() || path.extension().is_none()
}

/// Writes a sharded checkpoint pruned: the same shard files (names, tensors, metadata) and the
/// same index, into the folder `path` names (or holds, for an index file name). Each file is
/// written atomically, one tensor at a time, so memory stays within a buffer; a failed or
/// cancelled export removes the shards it had written.
pub fn export_shards(
    model: &Model,
    masks: &MaskSet,
    path: &Path,
    progress: &Progress,
) -> Result<(), ExportError> {
    let source = model.source.path().ok_or_else(|| {
        ExportError::Unsupported("a sharded export needs the checkpoint's index file".into())
    })?;
    let (dir, index_name) = if path.to_string_lossy().ends_with(".index.json") {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.file_name().map(|n| n.to_os_string()),
        )
    } else {
        (
            path.to_path_buf(),
            source.file_name().map(|n| n.to_os_string()),
        )
    };
    let index_name = index_name.ok_or_else(|| ExportError::Conflict("no index name".into()))?;
    std::fs::create_dir_all(&dir).map_err(|e| ExportError::Io {
        path: dir.display().to_string(),
        error: e,
    })?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let outputs: Vec<PathBuf> = model
        .shards
        .iter()
        .map(|s| dir.join(s.file.file_name().unwrap_or_default()))
        .chain(std::iter::once(dir.join(&index_name)))
        .collect();
    let inputs: Vec<&Path> = std::iter::once(source)
        .chain(model.shards.iter().map(|s| s.file.as_path()))
        .collect();
    for o in &outputs {
        if let Some(i) = inputs.iter().find(|i| same(o, i)) {
            return Err(ExportError::Conflict(format!(
                "{}: writing there would replace the checkpoint's own {}; choose another folder",
                o.display(),
                i.display()
            )));
        }
    }
    let mut done: Vec<&PathBuf> = Vec::new();
    let mut written = 0usize;
    let result = (|| {
        for (shard, out) in model.shards.iter().zip(&outputs) {
            let ids: Vec<usize> = shard.tensors.iter().filter_map(|n| model.find(n)).collect();
            write_pruned_file(
                model,
                masks,
                &ids,
                &shard.metadata,
                out,
                progress,
                &mut written,
            )?;
            done.push(out);
        }
        let index = std::fs::read(source).map_err(|e| ExportError::Io {
            path: source.display().to_string(),
            error: e,
        })?;
        let out = &outputs[outputs.len() - 1];
        atomic_write(out, |w| w.write_all(&index)).map_err(write_error(out))
    })();
    if result.is_err() {
        for p in done {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// Writes the tensors `ids` of the model, pruned by `masks`, as one safetensors file.
fn write_pruned_file(
    model: &Model,
    masks: &MaskSet,
    ids: &[usize],
    metadata: &BTreeMap<String, String>,
    path: &Path,
    progress: &Progress,
    written: &mut usize,
) -> Result<(), ExportError> {
    let all = tensor_specs(model);
    let specs: Vec<TensorSpec> = ids.iter().map(|&t| all[t].clone()).collect();
    let total: usize = all.iter().map(|s| s.len).sum::<usize>().max(1);
    let io_err = write_error(path);
    atomic_write(path, |w| {
        write_safetensors(w, metadata, &specs, |i, w| {
            if progress.check().is_err() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let t = ids[i];
            let bytes = model.tensor_bytes(t);
            match masks.get(&model.tensors[t].name) {
                None => w.write_all(bytes)?,
                Some(mask) => {
                    let size = model.tensors[t].dtype.size_bytes().unwrap_or(1);
                    write_masked(w, bytes, mask, size)?;
                }
            }
            *written += bytes.len();
            progress.report(*written as f32 / total as f32, "Writing weights");
            Ok(())
        })
    })
    .map_err(io_err)
}

/// Writes `bytes` (elements of `size` bytes) with the pruned elements zeroed.
fn write_masked(w: &mut impl Write, bytes: &[u8], mask: &Mask, size: usize) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 16);
    for (i, el) in bytes.chunks_exact(size).enumerate() {
        if mask.kept(i) {
            buf.extend_from_slice(el);
        } else {
            buf.extend(std::iter::repeat_n(0u8, size));
        }
        if buf.len() >= 1 << 16 {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)
}

/// Whether an output path asks for ONNX (its extension is `.onnx`, any case).
pub fn onnx_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// Writes the pruned weights to `path` in the format its extension names: `.onnx` writes the
/// ONNX graph with pruned initializers (the model must be ONNX), anything else safetensors.
pub fn export_weights(
    model: &Model,
    masks: &MaskSet,
    path: &Path,
    progress: &Progress,
) -> Result<(), ExportError> {
    if onnx_path(path) {
        export_onnx(model, masks, path, progress)
    } else {
        export_pruned(model, masks, path, progress)
    }
}

/// Writes the ONNX model with the pruned initializers' values zeroed in place: the output is
/// the input file byte for byte except those values, so every other initializer, node and
/// attribute is untouched and any runtime that ran the input runs the output.
pub fn export_onnx(
    model: &Model,
    masks: &MaskSet,
    path: &Path,
    progress: &Progress,
) -> Result<(), ExportError> {
    use crate::model::onnx_io::{Storage, initializers};
    if model.format != crate::model::ModelFormat::Onnx {
        return Err(ExportError::Unsupported(format!(
            "{}: an .onnx output needs an ONNX model (this is {}); write .safetensors instead",
            path.display(),
            model.format.label()
        )));
    }
    let buf = model.backing_bytes();
    let inits = initializers(buf).map_err(|e| ExportError::Unsupported(e.to_string()))?;
    let mut patches = Vec::new();
    for (init, _) in &inits {
        let Some(mask) = masks.get(&init.name) else {
            continue;
        };
        if init.storage != Storage::InPlace {
            return Err(ExportError::Unsupported(format!(
                "tensor '{}' is stored {} in the ONNX file, so a pruned copy cannot be written in place; export .safetensors instead",
                init.name,
                if init.storage == Storage::External {
                    "as external data"
                } else {
                    "as varints"
                }
            )));
        }
        let size = init.dtype.size_bytes().unwrap_or(1);
        patches.push((init.data.clone(), mask, size));
    }
    patches.sort_by_key(|(r, _, _)| r.start);
    let total = buf.len().max(1);
    atomic_write(path, |w| {
        let mut at = 0;
        for (r, mask, size) in &patches {
            if progress.check().is_err() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            w.write_all(&buf[at..r.start])?;
            write_masked(w, &buf[r.clone()], mask, *size)?;
            at = r.end;
            progress.report(at as f32 / total as f32, "Writing ONNX");
        }
        w.write_all(&buf[at..])
    })
    .map_err(write_error(path))
}

/// Maps a failed write of `path`: an interrupted write is the user's cancel, anything else an
/// I/O error naming the file.
fn write_error(path: &Path) -> impl Fn(io::Error) -> ExportError + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::Interrupted {
            ExportError::Cancelled
        } else {
            ExportError::Io {
                path: path.display().to_string(),
                error: e,
            }
        }
    }
}

/// Writes the masks as u8 tensors (1 = kept) under the weights' own names.
pub fn export_masks(model: &Model, masks: &MaskSet, path: &Path) -> Result<(), ExportError> {
    let mut names: Vec<(usize, &str)> = masks
        .iter()
        .filter_map(|(n, _)| model.find(n).map(|t| (t, n)))
        .collect();
    names.sort_unstable();
    let specs: Vec<TensorSpec> = names
        .iter()
        .map(|&(t, n)| TensorSpec {
            name: n,
            dtype: "U8",
            shape: &model.tensors[t].shape,
            len: model.tensors[t].numel,
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert(
        "prunescope.masks".to_string(),
        "1 = kept, 0 = pruned".to_string(),
    );
    atomic_write(path, |w| {
        write_safetensors(w, &meta, &specs, |i, w| {
            let mask = masks.get(names[i].1).expect("name came from the mask set");
            w.write_all(&mask.to_u8())
        })
    })
    .map_err(|e| ExportError::Io {
        path: path.display().to_string(),
        error: e,
    })
}

/// Reads masks written by [`export_masks`] (or by hand: any integer or float tensor, nonzero =
/// kept) and checks each against the model's tensor of the same name.
pub fn load_masks(model: &Model, path: &Path) -> Result<MaskSet, ExportError> {
    let p = path.display().to_string();
    let bad = |msg: String| ExportError::Unsupported(format!("masks {p}: {msg}"));
    let file = Model::open(path).map_err(|e| bad(e.to_string()))?;
    let mut masks = MaskSet::new();
    for (i, e) in file.tensors.iter().enumerate() {
        let t = model.find(&e.name).ok_or_else(|| {
            bad(format!(
                "mask '{}' names no tensor of {}",
                e.name,
                model.display_name()
            ))
        })?;
        if e.shape != model.tensors[t].shape {
            return Err(bad(format!(
                "mask '{}' has shape {:?}, the tensor {:?}",
                e.name, e.shape, model.tensors[t].shape
            )));
        }
        let bytes = file.tensor_bytes(i);
        let kept: Vec<bool> = match (&e.dtype, e.dtype.size_bytes()) {
            (crate::model::DType::Bool | crate::model::DType::U8, _) => {
                bytes.iter().map(|&b| b != 0).collect()
            }
            (d, _) if d.is_float() => file.to_f32_vec(i).iter().map(|&v| v != 0.0).collect(),
            (_, Some(size)) if size > 0 => bytes
                .chunks_exact(size)
                .map(|c| c.iter().any(|&b| b != 0))
                .collect(),
            (d, _) => return Err(bad(format!("mask '{}' has dtype {d}", e.name))),
        };
        masks
            .insert(model, &e.name, crate::prune::Mask::from_kept(&kept))
            .map_err(|err| bad(err.to_string()))?;
    }
    if masks.is_empty() {
        return Err(bad("the file holds no masks".into()));
    }
    Ok(masks)
}

/// What a path names on disk: its canonical form and, where it exists, its file identity
/// (device, inode), so that `./x.pt`, `dir/../x.pt`, symbolic links and hard links to one file
/// all compare equal.
#[derive(Debug, PartialEq, Eq)]
struct FileIdentity {
    canonical: std::path::PathBuf,
    inode: Option<(u64, u64)>,
}

fn identify(p: &Path) -> FileIdentity {
    let canonical = std::fs::canonicalize(p).unwrap_or_else(|_| {
        // Not there yet: resolve the directory, keep the name.
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        match p.file_name() {
            Some(n) => dir.join(n),
            None => dir,
        }
    });
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    };
    #[cfg(not(unix))]
    let inode = None;
    FileIdentity { canonical, inode }
}

impl FileIdentity {
    fn same_file(&self, other: &FileIdentity) -> bool {
        self.canonical == other.canonical
            || matches!((self.inode, other.inode), (Some(a), Some(b)) if a == b)
    }
}

/// Refuses a set of outputs in which one would replace an input (the model, a recipe being
/// replayed) or two would write the same file. Inputs and outputs are `(what, path)` pairs;
/// `what` names the flag or field in the message ("--out", "Masks").
pub fn check_outputs(
    inputs: &[(&str, &Path)],
    outputs: &[(&str, &Path)],
) -> Result<(), ExportError> {
    let ins: Vec<FileIdentity> = inputs.iter().map(|(_, p)| identify(p)).collect();
    let outs: Vec<FileIdentity> = outputs.iter().map(|(_, p)| identify(p)).collect();
    for (i, (what, p)) in outputs.iter().enumerate() {
        for (j, (in_what, in_p)) in inputs.iter().enumerate() {
            if outs[i].same_file(&ins[j]) {
                return Err(ExportError::Conflict(format!(
                    "{what} {} is the {in_what} {} itself; writing it would destroy the input. Choose another path",
                    p.display(),
                    in_p.display()
                )));
            }
        }
        for (k, (other, q)) in outputs.iter().enumerate().take(i) {
            if outs[i].same_file(&outs[k]) {
                return Err(ExportError::Conflict(format!(
                    "{what} {} and {other} {} are the same file; one would overwrite the other",
                    p.display(),
                    q.display()
                )));
            }
        }
    }
    Ok(())
}

/// The ONNX file's bytes with the named F32 initializers' values replaced (a fine-tune's
/// result): every other byte is the input's, so the graph, its attributes and every other
/// initializer are untouched.
pub fn patch_onnx(
    model: &Model,
    values: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<Vec<u8>, ExportError> {
    use crate::model::onnx_io::{Storage, initializers};
    if model.format != crate::model::ModelFormat::Onnx {
        return Err(ExportError::Unsupported(format!(
            "{} is not an ONNX model",
            model.display_name()
        )));
    }
    let mut buf = model.backing_bytes().to_vec();
    let inits = initializers(&buf).map_err(|e| ExportError::Unsupported(e.to_string()))?;
    for (init, _) in &inits {
        let Some((_, _, v)) = values.iter().find(|(n, _, _)| *n == init.name) else {
            continue;
        };
        if init.storage != Storage::InPlace || init.dtype != crate::model::DType::F32 {
            return Err(ExportError::Unsupported(format!(
                "tensor '{}' is not stored as F32 values inside the ONNX file, so trained values \
                 cannot be written back into it",
                init.name
            )));
        }
        if init.data.len() != v.len() * 4 {
            return Err(ExportError::Unsupported(format!(
                "tensor '{}': {} bytes in the file for {} trained values",
                init.name,
                init.data.len(),
                v.len()
            )));
        }
        for (chunk, x) in buf[init.data.clone()].chunks_exact_mut(4).zip(v) {
            chunk.copy_from_slice(&x.to_le_bytes());
        }
    }
    Ok(buf)
}
