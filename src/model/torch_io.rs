//! PyTorch checkpoints (`torch.save` zip archives) and NumPy `.npz` archives.
//!
//! Both are memory-mapped and read through our own bounded zip and pickle readers: every size
//! the file states is checked against the bytes that back it before anything is allocated,
//! contiguous little-endian tensors in stored members stay byte ranges into the map, and only
//! what must be rewritten (inflated members, strided views, big-endian or Fortran-order
//! arrays) is copied, within a budget tied to the file's size.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::pickle::{self, Id, Obj, Pickle};
use super::zip::{self, Member, Method};
use super::{Backing, DType, Model, ModelError, ModelFormat, ModelSource, Primary, TensorEntry};

/// Copies (strided views, byte swaps, transposes) may add at most this many times the file's
/// size, plus [`COPY_BUDGET_SLACK`]: tied weights double a file at most, and a file whose
/// views claim more is describing memory it does not have.
const COPY_BUDGET_FACTOR: u64 = 4;
const COPY_BUDGET_SLACK: u64 = 64 << 20;

/// More dimensions than any real tensor has (torch allows 64); a file claiming more is refused.
const MAX_DIMS: usize = 64;
/// torch names storages "0", "1", …; a long key is an attack on memory, not a checkpoint.
const MAX_KEY_BYTES: usize = 256;

/// The keys under which training checkpoints nest their weights, tried in this order when the
/// top level holds no tensors.
const NESTED_KEYS: [&str; 4] = ["state_dict", "model", "model_state_dict", "module"];

/// Tensors being assembled over one mapped file: ranges below `map.len()` point into the map,
/// ranges above it into `extra` (see [`Backing::Mapped`]).
struct Assembly<'a> {
    path: String,
    buf: &'a [u8],
    extra: Vec<u8>,
    budget: u64,
    entries: Vec<TensorEntry>,
}

impl<'a> Assembly<'a> {
    fn new(source: &ModelSource, buf: &'a [u8]) -> Self {
        Self {
            path: match source {
                ModelSource::File(p) => p.display().to_string(),
                ModelSource::Builtin(n) => (*n).to_string(),
            },
            buf,
            extra: Vec::new(),
            budget: (buf.len() as u64)
                .saturating_mul(COPY_BUDGET_FACTOR)
                .saturating_add(COPY_BUDGET_SLACK),
            entries: Vec::new(),
        }
    }
    fn file_err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Format {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }
    fn tensor_err(&self, tensor: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Tensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
    /// Reserves `n` bytes of copy budget, or says why not.
    fn reserve(&mut self, tensor: &str, n: u64) -> Result<(), ModelError> {
        if self.extra.len() as u64 + n > self.budget {
            return Err(self.tensor_err(
                tensor,
                format!(
                    "needs {n} more bytes of copies, beyond {COPY_BUDGET_FACTOR}× the file's {} bytes (views of shared storage this large are not supported)",
                    self.buf.len()
                ),
            ));
        }
        self.extra
            .try_reserve(n as usize)
            .map_err(|_| self.tensor_err(tensor, format!("cannot allocate {n} bytes")))
    }
    /// The virtual range of `extra[from..]`.
    fn extra_range(&self, from: usize) -> std::ops::Range<usize> {
        self.buf.len() + from..self.buf.len() + self.extra.len()
    }
    /// Bytes at a virtual range.
    fn bytes(&self, r: std::ops::Range<usize>) -> &[u8] {
        if r.start >= self.buf.len() {
            &self.extra[r.start - self.buf.len()..r.end - self.buf.len()]
        } else {
            &self.buf[r]
        }
    }
    /// A member's bytes as a virtual range: stored members in place, deflated ones inflated
    /// into `extra`.
    fn member_range(&mut self, m: &Member) -> Result<std::ops::Range<usize>, ModelError> {
        match m.method {
            Method::Stored => Ok(m.data.clone()),
            Method::Deflated => {
                // Inflation is bounded by the member's promise, the ratio limit and the memory
                // available, not by the copy budget: a compressed archive of sparse weights
                // legitimately inflates to many times its size.
                zip::check_inflate_bounds(m).map_err(|e| self.file_err(e))?;
                if let Some(avail) = crate::util::available_memory_bytes()
                    && m.size > avail
                {
                    return Err(self.file_err(format!(
                        "zip member '{}' inflates to {} bytes, more than the {avail} bytes of memory available",
                        m.name, m.size
                    )));
                }
                let from = self.extra.len();
                zip::inflate_into(self.buf, m, &mut self.extra).map_err(|e| self.file_err(e))?;
                Ok(self.extra_range(from))
            }
        }
    }
    fn push(
        &mut self,
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        bytes: std::ops::Range<usize>,
    ) {
        let numel = shape.iter().product();
        self.entries.push(TensorEntry {
            name,
            shape,
            dtype,
            numel,
            bytes,
        });
    }
    /// What the model keeps: the entries and the copied bytes (the map is handed over
    /// separately, once this borrow of it has ended).
    fn finish(self) -> (Vec<TensorEntry>, Vec<u8>) {
        (self.entries, self.extra)
    }
}

fn model_over_map(
    source: ModelSource,
    format: ModelFormat,
    map: Primary,
    (entries, extra): (Vec<TensorEntry>, Vec<u8>),
) -> Model {
    Model::new(
        source,
        format,
        entries,
        BTreeMap::new(),
        Backing::Mapped { map, extra },
    )
}

// ---------------------------------------------------------------------------------------------
// PyTorch
// ---------------------------------------------------------------------------------------------

pub(super) fn open_pytorch(path: &Path) -> Result<Model, ModelError> {
    let map = super::map_regular_file(path)?;
    read_pytorch(ModelSource::File(path.to_path_buf()), Primary::Mmap(map))
}

pub(super) fn read_pytorch(source: ModelSource, map: Primary) -> Result<Model, ModelError> {
    let buf: &[u8] = &map;
    let mut asm = Assembly::new(&source, buf);
    if !zip::looks_like_zip(buf) {
        return Err(asm.file_err(if buf.first() == Some(&0x80) {
            "a legacy (pre-1.6, non-zip) torch.save file; load it in PyTorch and save it again with the default format"
        } else {
            "not a PyTorch checkpoint (no zip signature)"
        }));
    }
    let members = zip::members(buf).map_err(|e| asm.file_err(e))?;
    let by_name: HashMap<&str, &Member> = members.iter().map(|m| (m.name.as_str(), m)).collect();
    // The pickle sits at `<archive name>/data.pkl`; the archive name is whatever stem the file
    // was first saved under, so look for it rather than guess it.
    let Some(pkl) = members
        .iter()
        .filter(|m| m.name == "data.pkl" || m.name.ends_with("/data.pkl"))
        .min_by_key(|m| m.name.matches('/').count())
    else {
        return Err(asm.file_err(if members.iter().any(|m| m.name.ends_with("constants.pkl")) {
            "a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() with torch.save"
        } else {
            "no data.pkl in the archive: not a torch.save checkpoint"
        }));
    };
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let big_endian = match by_name.get(format!("{prefix}byteorder").as_str()) {
        Some(m) => buf.get(m.data.clone()) == Some(b"big".as_slice()),
        None => false,
    };
    let pkl_range = asm.member_range(pkl)?;
    let pk = pickle::read(asm.bytes(pkl_range))
        .map_err(|e| asm.file_err(format!("{}: {e}", pkl.name)))?;
    let tensors = state_dict(&pk).map_err(|e| asm.file_err(e))?;
    let mut storages: HashMap<String, std::ops::Range<usize>> = HashMap::new();
    for (name, rec) in tensors {
        let rec = rec.map_err(|e| asm.tensor_err(&name, e))?;
        let elsize = rec.dtype.size_bytes().unwrap_or(1);
        let storage = match storages.get(&rec.key) {
            Some(r) => r.clone(),
            None => {
                let Some(m) = by_name.get(format!("{prefix}data/{}", rec.key).as_str()) else {
                    return Err(asm.tensor_err(
                        &name,
                        format!(
                            "its storage '{prefix}data/{}' is missing from the archive",
                            rec.key
                        ),
                    ));
                };
                let r = asm.member_range(m)?;
                storages.insert(rec.key.clone(), r.clone());
                r
            }
        };
        let elems = storage.len() / elsize;
        let numel = checked_numel(&rec.size)
            .ok_or_else(|| asm.tensor_err(&name, format!("shape {:?} overflows", rec.size)))?;
        let bytes = if numel == 0 {
            storage.start..storage.start
        } else {
            // The last element the view touches must lie inside the storage's real bytes.
            let last = rec
                .size
                .iter()
                .zip(&rec.stride)
                .try_fold(rec.offset, |acc, (&n, &s)| {
                    acc.checked_add((n - 1).checked_mul(s)?)
                });
            match last {
                Some(last) if last < elems => {}
                _ => {
                    return Err(asm.tensor_err(
                        &name,
                        format!(
                            "shape {:?} with strides {:?} at offset {} reaches past its storage, which has {elems} elements ({} bytes) in the file",
                            rec.size,
                            rec.stride,
                            rec.offset,
                            storage.len()
                        ),
                    ));
                }
            }
            let start = storage.start + rec.offset * elsize;
            let nbytes = numel
                .checked_mul(elsize)
                .ok_or_else(|| asm.tensor_err(&name, format!("shape {:?} overflows", rec.size)))?;
            if is_contiguous(&rec.size, &rec.stride) && !(big_endian && elsize > 1) {
                start..start + nbytes
            } else {
                asm.reserve(&name, nbytes as u64)?;
                let from = asm.extra.len();
                let src_storage = storage.clone();
                gather(
                    &mut asm,
                    src_storage,
                    &rec,
                    elsize,
                    swap_unit(&rec.dtype, big_endian),
                );
                asm.extra_range(from)
            }
        };
        asm.push(name, rec.size, rec.dtype, bytes);
    }
    if asm.entries.is_empty() {
        return Err(asm.file_err(format!(
            "no tensors found (looked at the top level and under {})",
            NESTED_KEYS.join(", ")
        )));
    }
    let parts = asm.finish();
    Ok(model_over_map(source, ModelFormat::PyTorch, map, parts))
}

/// The size of the units whose bytes a big-endian file stores reversed: the element, or each
/// half of a complex element; `None` for little-endian data.
fn swap_unit(dtype: &DType, big_endian: bool) -> Option<usize> {
    let size = dtype.size_bytes().unwrap_or(1);
    match (big_endian, dtype) {
        (false, _) => None,
        (true, _) if size == 1 => None,
        (true, DType::Other { name, .. }) if name.starts_with('C') => Some(size / 2),
        (true, _) => Some(size),
    }
}

/// Copies a strided view element by element into `extra`, reversing the bytes of each
/// `swap` unit when the file is big-endian. Bounds and budget were checked by the caller.
fn gather(
    asm: &mut Assembly,
    storage: std::ops::Range<usize>,
    rec: &TensorRec,
    elsize: usize,
    swap: Option<usize>,
) {
    let nd = rec.size.len();
    let mut idx = vec![0usize; nd];
    let numel: usize = rec.size.iter().product();
    for _ in 0..numel {
        let off = rec.offset
            + idx
                .iter()
                .zip(&rec.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        let at = storage.start + off * elsize;
        let el_range = at..at + elsize;
        let start = asm.extra.len();
        if el_range.start >= asm.buf.len() {
            let b = el_range.start - asm.buf.len();
            asm.extra.extend_from_within(b..b + elsize);
        } else {
            asm.extra.extend_from_slice(&asm.buf[el_range]);
        }
        if let Some(unit) = swap {
            for u in asm.extra[start..].chunks_exact_mut(unit.max(1)) {
                u.reverse();
            }
        }
        for d in (0..nd).rev() {
            idx[d] += 1;
            if idx[d] < rec.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

fn is_contiguous(size: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(n);
    }
    true
}

/// A tensor as the pickle describes it: a view of a storage record.
struct TensorRec {
    key: String,
    dtype: DType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// The (name, tensor) pairs of the state dict: the top level's tensors, or those under the
/// first of [`NESTED_KEYS`] that holds any. A tensor record that cannot be read is an error for
/// that tensor, never a silent drop.
/// Named tensor records, each readable or not, in dict order.
type NamedRecords = Vec<(String, Result<TensorRec, String>)>;

fn state_dict(pk: &Pickle) -> Result<NamedRecords, String> {
    let Some(items) = pk.dict_items(pk.root) else {
        return Err(match pk.get(pk.root) {
            Obj::Call { func, .. } => match pk.as_global(*func) {
                Some((m, n)) => format!(
                    "the file holds a pickled {m}.{n} object, not a state dict; save model.state_dict() instead"
                ),
                None => "the file's top-level object is not a state dict".into(),
            },
            _ => "the file's top-level object is not a dict of tensors".into(),
        });
    };
    let top = tensors_in(pk, items)?;
    if !top.is_empty() {
        return Ok(top);
    }
    for key in NESTED_KEYS {
        let nested = items
            .iter()
            .rev()
            .find(|(k, _)| pk.as_str(*k) == Some(key))
            .and_then(|(_, v)| pk.dict_items(*v));
        if let Some(inner) = nested {
            let found = tensors_in(pk, inner)?;
            if !found.is_empty() {
                return Ok(found);
            }
        }
    }
    Ok(Vec::new())
}

fn tensors_in(pk: &Pickle, items: &[(Id, Id)]) -> Result<NamedRecords, String> {
    // Later keys replace earlier ones, as in a Python dict. A key object reused through the
    // memo is recognised by its id, so a huge key repeated costs nothing per repeat.
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut at_id: HashMap<Id, usize> = HashMap::new();
    let mut out: NamedRecords = Vec::new();
    for &(k, v) in items {
        let Some(rec) = tensor_record(pk, v, 0) else {
            continue;
        };
        if let Some(&i) = at_id.get(&k) {
            out[i].1 = rec;
            continue;
        }
        let name = match pk.get(k) {
            Obj::Str(s) => s.clone(),
            Obj::Int(i) => i.to_string(),
            _ => return Err("a tensor is stored under a key that is not a string".into()),
        };
        match at.get(&name) {
            Some(&i) => {
                at_id.insert(k, i);
                out[i].1 = rec;
            }
            None => {
                at.insert(name.clone(), out.len());
                at_id.insert(k, out.len());
                out.push((name, rec));
            }
        }
    }
    Ok(out)
}

/// `None` if `id` is not a tensor at all; `Some(Err)` if it is one we cannot read.
fn tensor_record(pk: &Pickle, id: Id, depth: usize) -> Option<Result<TensorRec, String>> {
    if !Pickle::depth_ok(depth) {
        return Some(Err("tensor record nested too deeply".into()));
    }
    let Obj::Call { func, args, .. } = pk.get(id) else {
        return None;
    };
    let (module, name) = pk.as_global(*func)?;
    if !module.starts_with("torch") {
        return None;
    }
    let args_v = pk.as_tuple(*args);
    match name {
        "_rebuild_tensor_v2" | "_rebuild_tensor" => Some(
            args_v
                .ok_or_else(|| "tensor arguments are not a tuple".to_string())
                .and_then(|a| rebuild_tensor(pk, a)),
        ),
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            let inner = args_v.and_then(|a| a.first().copied());
            match inner {
                Some(t) => {
                    Some(tensor_record(pk, t, depth + 1).unwrap_or_else(|| {
                        Err("a parameter whose data is not a tensor".to_string())
                    }))
                }
                None => Some(Err("a parameter without data".into())),
            }
        }
        "_rebuild_from_type_v2" => {
            // (func, type, args, state): a tensor subclass rebuilt by `func(*args)`.
            let a = args_v?;
            let (Some(&f), Some(&inner_args)) = (a.first(), a.get(2)) else {
                return Some(Err("malformed tensor subclass record".into()));
            };
            let (_, fname) = pk.as_global(f)?;
            if fname.starts_with("_rebuild_tensor") {
                Some(
                    pk.as_tuple(inner_args)
                        .ok_or_else(|| "tensor arguments are not a tuple".to_string())
                        .and_then(|a| rebuild_tensor(pk, a)),
                )
            } else {
                Some(Err(format!(
                    "tensor subclass rebuilt by {fname} is not supported"
                )))
            }
        }
        n if n.starts_with("_rebuild") => Some(Err(format!(
            "{module}.{n} tensors (quantized, sparse, meta or nested) are not supported"
        ))),
        _ => None,
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, …)`.
fn rebuild_tensor(pk: &Pickle, a: &[Id]) -> Result<TensorRec, String> {
    let [storage, offset, size, stride, ..] = a else {
        return Err("tensor record has too few arguments".into());
    };
    let Obj::PersId(pid) = pk.get(*storage) else {
        return Err("tensor record does not reference a storage".into());
    };
    // ('storage', torch.FloatStorage, key, location, numel)
    let rec = pk.as_tuple(*pid).unwrap_or(&[]);
    let (Some(&ty), Some(&key)) = (rec.get(1), rec.get(2)) else {
        return Err("malformed storage record".into());
    };
    let storage_type = pk
        .as_global(ty)
        .map(|(_, n)| n)
        .ok_or("storage record has no storage type")?;
    let key = match pk.get(key) {
        Obj::Str(s) => s.clone(),
        Obj::Int(i) => i.to_string(),
        _ => return Err("storage key is not a string".into()),
    };
    if key.len() > MAX_KEY_BYTES || key.contains('/') || key.contains("..") {
        return Err(format!("storage key {key:?} is not a plain name"));
    }
    let dtype = storage_dtype(storage_type)?;
    let nonneg = |id: Id, what: &str| -> Result<usize, String> {
        pk.as_int(id)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| format!("{what} is not a non-negative integer"))
    };
    let dims = |id: Id, what: &str| -> Result<Vec<usize>, String> {
        pk.as_tuple(id)
            .ok_or_else(|| format!("{what} is not a tuple"))?
            .iter()
            .map(|&d| nonneg(d, what))
            .collect()
    };
    let size = dims(*size, "size")?;
    let stride = dims(*stride, "stride")?;
    if size.len() > MAX_DIMS {
        return Err(format!("{} dimensions (more than {MAX_DIMS})", size.len()));
    }
    if size.len() != stride.len() {
        return Err(format!(
            "size {size:?} and stride {stride:?} have different lengths"
        ));
    }
    Ok(TensorRec {
        key,
        dtype,
        offset: nonneg(*offset, "storage offset")?,
        size,
        stride,
    })
}

fn storage_dtype(name: &str) -> Result<DType, String> {
    Ok(match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        "UInt16Storage" => DType::U16,
        "UInt32Storage" => DType::U32,
        "UInt64Storage" => DType::U64,
        "ComplexFloatStorage" => DType::from_safetensors("C64"),
        "Float8_e4m3fnStorage" => DType::from_safetensors("F8_E4M3"),
        "Float8_e5m2Storage" => DType::from_safetensors("F8_E5M2"),
        other => return Err(format!("storage type {other} is not supported")),
    })
}

// ---------------------------------------------------------------------------------------------
// NumPy
// ---------------------------------------------------------------------------------------------

pub(super) fn open_npz(path: &Path) -> Result<Model, ModelError> {
    let map = super::map_regular_file(path)?;
    read_npz(ModelSource::File(path.to_path_buf()), Primary::Mmap(map))
}

pub(super) fn read_npz(source: ModelSource, map: Primary) -> Result<Model, ModelError> {
    let buf: &[u8] = &map;
    let mut asm = Assembly::new(&source, buf);
    if !zip::looks_like_zip(buf) {
        return Err(asm.file_err("not a NumPy .npz archive (no zip signature)"));
    }
    let members = zip::members(buf).map_err(|e| asm.file_err(e))?;
    let arrays: Vec<&Member> = members
        .iter()
        .filter(|m| m.name.ends_with(".npy"))
        .collect();
    // Deflated members are inflated whole: refuse up front what memory cannot hold.
    let inflated: u64 = arrays
        .iter()
        .filter(|m| m.method == Method::Deflated)
        .map(|m| m.size)
        .fold(0u64, u64::saturating_add);
    if let Some(avail) = crate::util::available_memory_bytes()
        && inflated > avail
    {
        return Err(asm.file_err(format!(
            "its compressed arrays inflate to {inflated} bytes, more than the {avail} bytes of memory available"
        )));
    }
    for m in arrays {
        let name = m.name.strip_suffix(".npy").unwrap_or(&m.name).to_string();
        let range = asm.member_range(m)?;
        let header = npy_header(asm.bytes(range.clone())).map_err(|e| asm.tensor_err(&name, e))?;
        let data = range.start + header.data_offset..range.end;
        let numel = checked_numel(&header.shape).ok_or_else(|| {
            asm.tensor_err(
                &name,
                format!(
                    "shape {:?} has more elements than can be addressed",
                    header.shape
                ),
            )
        })?;
        let need = numel
            .checked_mul(header.itemsize)
            .ok_or_else(|| asm.tensor_err(&name, format!("shape {:?} overflows", header.shape)))?;
        if need != data.len() {
            return Err(asm.tensor_err(
                &name,
                format!(
                    "shape {:?} of {} needs {need} bytes but the array has {} (truncated or lying header)",
                    header.shape,
                    header.descr,
                    data.len()
                ),
            ));
        }
        let swap = swap_unit(&header.dtype, header.big_endian);
        let rewrite = (header.fortran && header.shape.len() > 1) || swap.is_some();
        let bytes = if rewrite && numel > 0 {
            asm.reserve(&name, need as u64)?;
            let from = asm.extra.len();
            // Fortran order: element (i0, i1, …) sits at i0 + n0·(i1 + n1·…). Read it back as
            // a view with column-major strides.
            let nd = header.shape.len();
            let mut stride = vec![1usize; nd];
            if header.fortran {
                for d in 1..nd {
                    stride[d] = stride[d - 1].saturating_mul(header.shape[d - 1]);
                }
            } else {
                for d in (0..nd.saturating_sub(1)).rev() {
                    stride[d] = stride[d + 1].saturating_mul(header.shape[d + 1]);
                }
            }
            let rec = TensorRec {
                key: String::new(),
                dtype: header.dtype.clone(),
                offset: 0,
                size: header.shape.clone(),
                stride,
            };
            gather(&mut asm, data, &rec, header.itemsize, swap);
            asm.extra_range(from)
        } else {
            data
        };
        asm.push(name, header.shape, header.dtype, bytes);
    }
    if asm.entries.is_empty() {
        return Err(asm.file_err("the archive holds no arrays (.npy members)"));
    }
    let parts = asm.finish();
    Ok(model_over_map(source, ModelFormat::Npz, map, parts))
}

struct NpyHeader {
    descr: String,
    dtype: DType,
    itemsize: usize,
    big_endian: bool,
    fortran: bool,
    shape: Vec<usize>,
    data_offset: usize,
}

/// Parses the `.npy` preamble: magic, version, and the header dict literal.
fn npy_header(b: &[u8]) -> Result<NpyHeader, String> {
    if !b.starts_with(b"\x93NUMPY") {
        return Err("not an .npy array (bad magic)".into());
    }
    let (len, at): (Option<usize>, usize) = match b.get(6) {
        Some(1) => (
            b.get(8..10)
                .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize),
            10,
        ),
        Some(2 | 3) => (
            b.get(8..12)
                .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize),
            12,
        ),
        Some(v) => return Err(format!(".npy format version {v} is not supported")),
        None => return Err("truncated .npy header".into()),
    };
    let len = len.ok_or("truncated .npy header")?;
    let text = b
        .get(at..at.saturating_add(len))
        .ok_or("the .npy header runs past the array's bytes")?;
    let text = std::str::from_utf8(text).map_err(|_| "the .npy header is not text")?;
    let dict = parse_py_dict(text).map_err(|e| format!("bad .npy header: {e}"))?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (k, v) in dict {
        match (k.as_str(), v) {
            ("descr", PyVal::Str(s)) => descr = Some(s),
            ("descr", _) => {
                return Err("structured arrays (record dtypes) are not numeric tensors".into());
            }
            ("fortran_order", PyVal::Bool(f)) => fortran = Some(f),
            ("shape", PyVal::Tuple(t)) => shape = Some(t),
            (k, _) => return Err(format!("unexpected .npy header field '{k}'")),
        }
    }
    let (Some(descr), Some(fortran), Some(shape)) = (descr, fortran, shape) else {
        return Err("the .npy header lacks descr, fortran_order or shape".into());
    };
    if shape.len() > MAX_DIMS {
        return Err(format!("{} dimensions (more than {MAX_DIMS})", shape.len()));
    }
    let shape = shape
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| format!("dimension {d} does not fit in memory")))
        .collect::<Result<Vec<_>, _>>()?;
    let (big_endian, dtype, itemsize) = npy_dtype(&descr)?;
    Ok(NpyHeader {
        descr,
        dtype,
        itemsize,
        big_endian,
        fortran,
        shape,
        data_offset: at + len,
    })
}

fn npy_dtype(descr: &str) -> Result<(bool, DType, usize), String> {
    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'>' | b'|' | b'=') => descr.split_at(1),
        _ => ("=", descr),
    };
    let big = order == ">";
    let (dtype, size) = match code {
        "b1" | "?" => (DType::Bool, 1),
        "i1" => (DType::I8, 1),
        "u1" => (DType::U8, 1),
        "i2" => (DType::I16, 2),
        "u2" => (DType::U16, 2),
        "i4" => (DType::I32, 4),
        "u4" => (DType::U32, 4),
        "i8" => (DType::I64, 8),
        "u8" => (DType::U64, 8),
        "f2" => (DType::F16, 2),
        "f4" => (DType::F32, 4),
        "f8" => (DType::F64, 8),
        "c8" => (DType::from_safetensors("C64"), 8),
        _ => {
            return Err(format!(
                "dtype '{descr}' is not a tensor dtype prunescope reads (bool, int, uint, float16/32/64)"
            ));
        }
    };
    Ok((big && size > 1, dtype, size))
}

enum PyVal {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
    Other,
}

/// Parses the flat dict literal of an `.npy` header: string keys; values are strings,
/// booleans, tuples of integers, or anything else (lists of fields) reported as `Other`.
fn parse_py_dict(s: &str) -> Result<Vec<(String, PyVal)>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let string = |i: &mut usize| -> Result<String, String> {
        let q = b[*i];
        let start = *i + 1;
        let end = b[start..]
            .iter()
            .position(|&c| c == q)
            .ok_or("unterminated string")?;
        *i = start + end + 1;
        Ok(s[start..start + end].to_string())
    };
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return Err("does not start with '{'".into());
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        ws(&mut i);
        match b.get(i) {
            Some(b'}') => return Ok(out),
            Some(b'\'' | b'"') => {}
            _ => return Err("expected a quoted key".into()),
        }
        let key = string(&mut i)?;
        ws(&mut i);
        if b.get(i) != Some(&b':') {
            return Err(format!("expected ':' after '{key}'"));
        }
        i += 1;
        ws(&mut i);
        let val = match b.get(i) {
            Some(b'\'' | b'"') => PyVal::Str(string(&mut i)?),
            Some(b'(') => {
                i += 1;
                let mut dims = Vec::new();
                loop {
                    ws(&mut i);
                    match b.get(i) {
                        Some(b')') => {
                            i += 1;
                            break;
                        }
                        Some(b',') => i += 1,
                        Some(c) if c.is_ascii_digit() => {
                            let start = i;
                            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'L') {
                                i += 1;
                            }
                            let lit = s[start..i].trim_end_matches('L');
                            dims.push(
                                lit.parse::<u64>()
                                    .map_err(|_| format!("dimension {lit} is larger than 2^64"))?,
                            );
                        }
                        _ => return Err("bad shape tuple".into()),
                    }
                }
                PyVal::Tuple(dims)
            }
            Some(b'T') if s[i..].starts_with("True") => {
                i += 4;
                PyVal::Bool(true)
            }
            Some(b'F') if s[i..].starts_with("False") => {
                i += 5;
                PyVal::Bool(false)
            }
            Some(b'[') => {
                let depth_end = b[i..]
                    .iter()
                    .rposition(|&c| c == b']')
                    .ok_or("unterminated list")?;
                i += depth_end + 1;
                PyVal::Other
            }
            _ => return Err(format!("unexpected value for '{key}'")),
        };
        out.push((key, val));
        ws(&mut i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => {}
            _ => return Err("expected ',' or '}'".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_headers_parse_and_lies_are_caught() {
        let h = |t: &str| {
            let mut v = b"\x93NUMPY\x01\x00".to_vec();
            v.extend_from_slice(&(t.len() as u16).to_le_bytes());
            v.extend_from_slice(t.as_bytes());
            v
        };
        let ok = npy_header(&h(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }",
        ))
        .unwrap();
        assert_eq!(ok.shape, vec![3, 4]);
        assert_eq!(ok.dtype, DType::F32);
        assert!(!ok.fortran && !ok.big_endian);
        let scalar =
            npy_header(&h("{'descr': '>i8', 'fortran_order': True, 'shape': ()}")).unwrap();
        assert!(scalar.shape.is_empty() && scalar.big_endian && scalar.fortran);
        let one = npy_header(&h(
            "{'descr': '|b1', 'fortran_order': False, 'shape': (7,), }",
        ))
        .unwrap();
        assert_eq!((one.shape, one.dtype), (vec![7], DType::Bool));
        for bad in [
            "{'descr': '<U5', 'fortran_order': False, 'shape': (3,), }",
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
            "{'descr': '<f4', 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,",
            "['descr']",
        ] {
            assert!(npy_header(&h(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn contiguity_ignores_unit_dims() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(!is_contiguous(&[2, 3], &[0, 1]));
        assert!(is_contiguous(&[], &[]));
    }
}
