//! Models as prunescope sees them: named tensors with shapes and dtypes over one backing store.
//!
//! Loading never copies a safetensors file: it is memory-mapped and tensors are byte ranges
//! into the map. Values are decoded to f32 in chunks when analysis needs them.

mod dtype;
pub mod onnx_io;
pub mod pickle;
mod safetensors_io;
pub mod sharded;
mod torch_io;
pub mod zip;

pub use dtype::DType;
pub use safetensors_io::parse_safetensors;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::util::natural_cmp;

/// Everything that can go wrong while opening a model. Messages name the file and tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The OS error is part of the message, not a separate source, so that a chained report
    /// (`{:#}`) does not say it twice.
    #[error("{path}: {}", crate::util::io_message(error))]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: tensor '{tensor}': {msg}")]
    Tensor {
        path: String,
        tensor: String,
        msg: String,
    },
    #[error(
        "{path}: unsupported file type (expected .safetensors, .pt, .pth, .bin, .npz or .onnx)"
    )]
    Unsupported { path: String },
}

/// Where a model came from, for titles, recipes and recent-file lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    File(PathBuf),
    /// Compiled into the binary (the bundled sample), with a display name.
    Builtin(&'static str),
}

impl ModelSource {
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::File(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            ModelSource::Builtin(n) => (*n).to_string(),
        }
    }
    pub fn path(&self) -> Option<&Path> {
        match self {
            ModelSource::File(p) => Some(p),
            ModelSource::Builtin(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    Safetensors,
    PyTorch,
    Npz,
    Onnx,
}

impl ModelFormat {
    pub fn label(self) -> &'static str {
        match self {
            ModelFormat::Safetensors => "safetensors",
            ModelFormat::PyTorch => "PyTorch state dict",
            ModelFormat::Npz => "NumPy .npz",
            ModelFormat::Onnx => "ONNX",
        }
    }
}

/// One named tensor: its shape, dtype and where its bytes live in the backing store.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub numel: usize,
    pub(crate) bytes: Range<usize>,
}

/// Rows and columns of the 2-D view of a tensor of `shape`: `[d0, rest]`.
pub fn matrix_dims(shape: &[usize], numel: usize) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, ..] => (*r, if *r == 0 { 0 } else { numel / r }),
    }
}

impl TensorEntry {
    /// Whether prunescope can decode the values (floating dtypes with at least one element).
    pub fn analysable(&self) -> bool {
        self.dtype.is_float() && self.numel > 0
    }
    /// The default for "prunable": every floating tensor with two or more dimensions.
    pub fn default_prunable(&self) -> bool {
        self.analysable() && self.shape.len() >= 2
    }
    /// Rows and columns of the 2-D view used for heatmaps and CSR sizes: `[d0, rest]`.
    pub fn matrix_dims(&self) -> (usize, usize) {
        matrix_dims(&self.shape, self.numel)
    }
    /// Width of one kernel block in the 2-D view (kh·kw for conv weights), if any.
    pub fn block_cols(&self) -> Option<usize> {
        if self.shape.len() > 2 {
            Some(self.shape[2..].iter().product())
        } else {
            None
        }
    }
    /// The module path: everything before the last dot (`encoder.layer.0.attention`).
    pub fn module_path(&self) -> &str {
        self.name.rsplit_once('.').map(|(m, _)| m).unwrap_or("")
    }
}

pub(crate) enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
    Static(&'static [u8]),
    /// A mapped archive plus the bytes that had to be rewritten (inflated, gathered, swapped).
    /// Tensor ranges below `map.len()` lie in the map; ranges from `map.len()` on lie in
    /// `extra`, shifted by `map.len()`.
    Mapped {
        map: Primary,
        extra: Vec<u8>,
    },
    /// The shards of a checkpoint, mapped, laid end to end: shard `i` covers
    /// `starts[i]..starts[i] + maps[i].len()`.
    Shards {
        maps: Vec<memmap2::Mmap>,
        starts: Vec<usize>,
    },
}

/// The bytes an archive was read from: a map of the file, or a buffer (tests, fuzzing).
pub(crate) enum Primary {
    Mmap(memmap2::Mmap),
    Bytes(Vec<u8>),
}

impl std::ops::Deref for Primary {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Primary::Mmap(m) => m,
            Primary::Bytes(b) => b,
        }
    }
}

impl Backing {
    /// The primary bytes: the whole file where there is one.
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Mapped { map, .. } => map,
            Backing::Owned(v) => v,
            Backing::Static(s) => s,
            // The first shard: a whole safetensors file, as elsewhere.
            Backing::Shards { maps, .. } => maps.first().map_or(&[], |m| &m[..]),
        }
    }
    fn range(&self, r: Range<usize>) -> &[u8] {
        match self {
            Backing::Shards { maps, starts } => {
                let i = starts.partition_point(|&s| s <= r.start).saturating_sub(1);
                &maps[i][r.start - starts[i]..r.end - starts[i]]
            }
            Backing::Mapped { map, extra } if r.start >= map.len() => {
                &extra[r.start - map.len()..r.end - map.len()]
            }
            _ => &self.bytes()[r],
        }
    }
}

/// An opened model. Tensors are in natural name order, which is the "layer order" used to
/// break ties between equal scores.
pub struct Model {
    pub source: ModelSource,
    pub format: ModelFormat,
    pub tensors: Vec<TensorEntry>,
    /// The safetensors `__metadata__` (empty for other formats).
    pub metadata: BTreeMap<String, String>,
    backing: Backing,
    /// Tensor index by name: lookups are per mask and per layer, so they must not scan.
    by_name: HashMap<String, usize>,
    /// Other files the weights were read from (an ONNX model's external data, a checkpoint's
    /// shards): inputs that an output must not replace.
    pub data_files: Vec<PathBuf>,
    /// A sharded checkpoint's shards (empty for single files).
    pub shards: Vec<sharded::Shard>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Per tensor, the counts of each 16-bit pattern (`None` for tensors that are not 16-bit
/// floats); see [`Model::pattern_counts`].
pub type PatternCounts = Vec<Option<Vec<u64>>>;

/// Decode chunk size: large enough to amortise dispatch, small enough to stay in L1/L2.
pub const DECODE_CHUNK: usize = 4096;

impl Model {
    pub(crate) fn new(
        source: ModelSource,
        format: ModelFormat,
        mut tensors: Vec<TensorEntry>,
        metadata: BTreeMap<String, String>,
        backing: Backing,
    ) -> Self {
        // Names are unique (every reader refuses duplicates), so an unstable sort is exact.
        tensors.sort_unstable_by(|a, b| natural_cmp(&a.name, &b.name));
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            by_name.entry(t.name.clone()).or_insert(i);
        }
        Self {
            source,
            format,
            tensors,
            metadata,
            backing,
            by_name,
            data_files: Vec::new(),
            shards: Vec::new(),
        }
    }

    /// Opens a model file, choosing the reader by extension (and by content for `.bin`).
    pub fn open(path: &Path) -> Result<Model, ModelError> {
        Model::open_with(path, &crate::progress::Progress::none())
    }

    /// [`Model::open`] with progress and cancel: a sharded checkpoint (its index, its folder or
    /// any of its shards) reports each shard it maps.
    pub fn open_with(
        path: &Path,
        progress: &crate::progress::Progress,
    ) -> Result<Model, ModelError> {
        if let Some(index) = sharded::index_for(path)? {
            return sharded::open_index(&index, progress);
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "safetensors" => safetensors_io::open_safetensors(path),
            "pt" | "pth" => torch_io::open_pytorch(path),
            "npz" => torch_io::open_npz(path),
            "onnx" => onnx_io::open_onnx(path),
            "bin" => {
                // `.bin` is used both for PyTorch zips and for safetensors renamed by hand.
                let head = read_head(path, 4)?;
                if head.starts_with(b"PK") {
                    torch_io::open_pytorch(path)
                } else {
                    safetensors_io::open_safetensors(path)
                }
            }
            _ => Err(ModelError::Unsupported {
                path: path.display().to_string(),
            }),
        }
    }

    /// Reads a model of the given format from bytes in memory, with the same checks as
    /// [`Model::open`] (tests and fuzzing use it).
    pub fn from_bytes(
        name: &'static str,
        format: ModelFormat,
        bytes: Vec<u8>,
    ) -> Result<Model, ModelError> {
        let source = ModelSource::Builtin(name);
        match format {
            ModelFormat::Safetensors => safetensors_io::from_backing(source, Backing::Owned(bytes)),
            ModelFormat::PyTorch => torch_io::read_pytorch(source, Primary::Bytes(bytes)),
            ModelFormat::Npz => torch_io::read_npz(source, Primary::Bytes(bytes)),
            ModelFormat::Onnx => onnx_io::read_onnx(source, Primary::Bytes(bytes), None),
        }
    }

    /// Opens safetensors bytes compiled into the binary.
    pub fn from_static_safetensors(
        name: &'static str,
        bytes: &'static [u8],
    ) -> Result<Model, ModelError> {
        safetensors_io::from_backing(ModelSource::Builtin(name), Backing::Static(bytes))
    }

    /// Opens safetensors bytes held in memory (tests, generated models).
    pub fn from_safetensors_bytes(name: &'static str, bytes: Vec<u8>) -> Result<Model, ModelError> {
        safetensors_io::from_backing(ModelSource::Builtin(name), Backing::Owned(bytes))
    }

    /// Builds a model from f32 tensors in memory (benchmarks, tests).
    pub fn from_f32_tensors(
        name: &'static str,
        tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    ) -> Model {
        let mut data = Vec::new();
        let mut entries = Vec::new();
        for (tname, shape, values) in tensors {
            let start = data.len();
            data.reserve(values.len() * 4);
            for v in &values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            entries.push(TensorEntry {
                name: tname,
                numel: values.len(),
                shape,
                dtype: DType::F32,
                bytes: start..data.len(),
            });
        }
        Model::new(
            ModelSource::Builtin(name),
            ModelFormat::Safetensors,
            entries,
            BTreeMap::new(),
            Backing::Owned(data),
        )
    }

    pub fn display_name(&self) -> String {
        self.source.display_name()
    }

    /// Every file the model was read from, labelled for messages: the model and any data files.
    pub fn input_files(&self) -> Vec<(&'static str, &Path)> {
        self.source
            .path()
            .map(|p| ("model", p))
            .into_iter()
            .chain(
                self.data_files
                    .iter()
                    .map(|p| ("model's data file", p.as_path())),
            )
            .collect()
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Raw little-endian bytes of tensor `t`, in its own dtype.
    pub fn tensor_bytes(&self, t: usize) -> &[u8] {
        self.backing.range(self.tensors[t].bytes.clone())
    }

    /// The primary bytes of the backing store: the whole file for safetensors, .pt, .npz and
    /// .onnx (bytes copied out of it are not included).
    pub fn backing_bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// Decodes elements `start..start + out.len()` of tensor `t` to f32.
    /// Panics if `t` is not analysable or the range is out of bounds (callers check).
    pub fn read_f32(&self, t: usize, start: usize, out: &mut [f32]) {
        let e = &self.tensors[t];
        let bytes = self.tensor_bytes(t);
        e.dtype.decode_f32(bytes, start, out);
    }

    /// Decodes the whole tensor to f32.
    pub fn to_f32_vec(&self, t: usize) -> Vec<f32> {
        let mut v = vec![0.0; self.tensors[t].numel];
        self.read_f32(t, 0, &mut v);
        v
    }

    /// Calls `f(start, chunk)` over the tensor in decoded chunks of [`DECODE_CHUNK`] values.
    pub fn for_each_chunk(&self, t: usize, range: Range<usize>, mut f: impl FnMut(usize, &[f32])) {
        // f32 stored aligned on a little-endian machine: the bytes are the values, no copy.
        if cfg!(target_endian = "little") && self.tensors[t].dtype == DType::F32 {
            let bytes = &self.tensor_bytes(t)[4 * range.start..4 * range.end];
            // SAFETY: every bit pattern is a valid f32; `align_to` only hands out the aligned
            // middle, and an empty prefix and suffix mean it covers all of `bytes`.
            let (pre, vals, post) = unsafe { bytes.align_to::<f32>() };
            if pre.is_empty() && post.is_empty() {
                for (k, c) in vals.chunks(DECODE_CHUNK).enumerate() {
                    f(range.start + k * DECODE_CHUNK, c);
                }
                return;
            }
        }
        let mut buf = [0f32; DECODE_CHUNK];
        let mut i = range.start;
        while i < range.end {
            let n = (range.end - i).min(DECODE_CHUNK);
            self.read_f32(t, i, &mut buf[..n]);
            f(i, &buf[..n]);
            i += n;
        }
    }

    /// How to decode tensor `t`'s elements when it is a 16-bit float stored as one (bf16, f16).
    pub fn half_decoder(&self, t: usize) -> Option<fn(u16) -> f32> {
        let e = &self.tensors[t];
        if self.tensor_bytes(t).len() != 2 * e.numel {
            return None;
        }
        match e.dtype {
            DType::BF16 => Some(|b| half::bf16::from_bits(b).to_f32()),
            DType::F16 => Some(|b| half::f16::from_bits(b).to_f32()),
            _ => None,
        }
    }

    /// How many elements of a 16-bit tensor hold each of the 65,536 bit patterns: from these
    /// counts the score index and the histogram follow exactly, without decoding a weight.
    pub fn pattern_counts(
        &self,
        t: usize,
        progress: &crate::progress::Progress,
    ) -> Option<Vec<u64>> {
        use rayon::prelude::*;
        self.half_decoder(t)?;
        let bytes = self.tensor_bytes(t);
        let count = |acc: &mut Vec<u64>, chunk: &[u8]| {
            for b in chunk.chunks_exact(2) {
                acc[u16::from_le_bytes([b[0], b[1]]) as usize] += 1;
            }
        };
        // Big tensors split across cores, one table per worker thread.
        Some(
            bytes
                .par_chunks(2 << 20)
                .fold(
                    || vec![0u64; 1 << 16],
                    |mut acc, chunk| {
                        if progress.check().is_ok() {
                            count(&mut acc, chunk);
                        }
                        acc
                    },
                )
                .reduce(
                    || vec![0u64; 1 << 16],
                    |mut a, b| {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x += y;
                        }
                        a
                    },
                ),
        )
    }

    /// [`Model::pattern_counts`] of every tensor (`None` for those not 16-bit floats), with
    /// progress: the one pass over a bf16 checkpoint that its index and histograms share.
    pub fn all_pattern_counts(
        &self,
        progress: &crate::progress::Progress,
    ) -> Result<PatternCounts, crate::progress::Cancelled> {
        let total: u64 = self
            .tensors
            .iter()
            .map(|e| e.numel as u64)
            .sum::<u64>()
            .max(1);
        let mut done = 0u64;
        let mut out = Vec::with_capacity(self.tensors.len());
        for (t, e) in self.tensors.iter().enumerate() {
            progress.check()?;
            out.push(self.pattern_counts(t, progress));
            progress.check()?;
            done += e.numel as u64;
            progress.report(done as f32 / total as f32, "Counting weights");
        }
        Ok(out)
    }

    pub fn total_params(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel as u64).sum()
    }

    /// Size of all tensor data, in bytes, as stored.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes.len() as u64).sum()
    }

    /// SHA-256 of the source file (or of the in-memory bytes for built-in models).
    pub fn content_hash(&self) -> Result<String, ModelError> {
        match &self.source {
            // A checkpoint: its index and every shard, each hashed, then the list.
            ModelSource::File(p) if !self.shards.is_empty() => {
                let mut all = Vec::new();
                for f in std::iter::once(p).chain(self.shards.iter().map(|s| &s.file)) {
                    let h = crate::util::sha256_file(f).map_err(|e| ModelError::Io {
                        path: f.display().to_string(),
                        error: e,
                    })?;
                    all.extend_from_slice(h.as_bytes());
                }
                Ok(crate::util::sha256_hex(&all))
            }
            ModelSource::File(p) => crate::util::sha256_file(p).map_err(|e| ModelError::Io {
                path: p.display().to_string(),
                error: e,
            }),
            ModelSource::Builtin(_) => Ok(crate::util::sha256_hex(self.backing.bytes())),
        }
    }
}

fn read_head(path: &Path, n: usize) -> Result<Vec<u8>, ModelError> {
    use std::io::Read;
    let mut f = open_regular_file(path)?;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let k = f.read(&mut buf[got..]).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            error: e,
        })?;
        if k == 0 {
            break;
        }
        got += k;
    }
    buf.truncate(got);
    Ok(buf)
}

/// Opens a file for reading only if it is a regular file. A FIFO would block the open (and
/// the UI with it), a directory maps as "No such device", a device reads forever: each gets a
/// sentence instead. The open itself does not block, so the check happens on what was opened.
pub fn open_regular_file(path: &Path) -> Result<std::fs::File, ModelError> {
    let p = || path.display().to_string();
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| ModelError::Io {
        path: p(),
        error: e,
    })?;
    let meta = file.metadata().map_err(|e| ModelError::Io {
        path: p(),
        error: e,
    })?;
    if meta.is_dir() {
        return Err(ModelError::Format {
            path: p(),
            msg: "is a directory, not a model file".into(),
        });
    }
    if !meta.is_file() {
        return Err(ModelError::Format {
            path: p(),
            msg: "is not a regular file (a FIFO, socket or device); prunescope opens only regular files".into(),
        });
    }
    Ok(file)
}

/// Memory-maps a regular file read-only; an empty file is an error, since no format is empty.
pub(crate) fn map_regular_file(path: &Path) -> Result<memmap2::Mmap, ModelError> {
    let file = open_regular_file(path)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return Err(ModelError::Format {
            path: path.display().to_string(),
            msg: "the file is empty".into(),
        });
    }
    // SAFETY: the map is read-only; if another process truncates the file while it is open
    // reads could fault, which is the accepted trade-off of every mmap-based model viewer.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::Io {
        path: path.display().to_string(),
        error: e,
    })
}
