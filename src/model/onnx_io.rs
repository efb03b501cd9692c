//! ONNX models: the float initializers of the graph, read straight from the protobuf bytes.
//!
//! We walk the wire format ourselves (a few fields of `ModelProto`, `GraphProto` and
//! `TensorProto`) instead of decoding the whole model: initializers stored as `raw_data`,
//! `float_data` or `double_data` stay byte ranges into the mapped file, and because we know
//! where each one's bytes are, a pruned export is the input file with only those bytes changed;
//! every other initializer, node and attribute is byte-identical by construction.
//!
//! Every length and count is checked against the bytes that back it; a malformed file is an
//! error that names the file (and the tensor), never a panic.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{Backing, DType, Model, ModelError, ModelFormat, ModelSource, Primary, TensorEntry};

/// More dimensions than any real tensor has; a file claiming more is refused.
const MAX_DIMS: usize = 64;

/// A protobuf field: its number and value.
#[derive(Clone, Debug)]
enum Value {
    Varint(u64),
    /// A 32- or 64-bit fixed field (no field we read has one).
    Fixed,
    /// A length-delimited value: its absolute byte range in the buffer.
    Bytes(Range<usize>),
}

/// Iterates the fields of the message in `buf[range]`, with absolute ranges.
struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
    end: usize,
}

fn varint(buf: &[u8], at: &mut usize, end: usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = buf.get(*at).filter(|_| *at < end) else {
            return Err(format!("truncated varint at byte {}", *at));
        };
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(format!("varint longer than 10 bytes at byte {}", *at))
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], range: Range<usize>) -> Self {
        Fields {
            buf,
            at: range.start,
            end: range.end.min(buf.len()),
        }
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<(u32, Value), String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let r = (|| {
            let key = varint(self.buf, &mut self.at, self.end)?;
            let field = u32::try_from(key >> 3).map_err(|_| "field number too large")?;
            let take = |at: &mut usize, n: usize, end: usize| -> Result<Range<usize>, String> {
                let r = *at..at.checked_add(n).filter(|&e| e <= end).ok_or_else(|| {
                    format!("a field of {n} bytes at byte {} runs past its message", *at)
                })?;
                *at = r.end;
                Ok(r)
            };
            let v = match key & 7 {
                0 => Value::Varint(varint(self.buf, &mut self.at, self.end)?),
                1 => {
                    take(&mut self.at, 8, self.end)?;
                    Value::Fixed
                }
                5 => {
                    take(&mut self.at, 4, self.end)?;
                    Value::Fixed
                }
                2 => {
                    let n = varint(self.buf, &mut self.at, self.end)?;
                    let n = usize::try_from(n).map_err(|_| "length too large".to_string())?;
                    Value::Bytes(take(&mut self.at, n, self.end)?)
                }
                w => {
                    return Err(format!(
                        "unsupported protobuf wire type {w} at byte {}",
                        self.at
                    ));
                }
            };
            Ok((field, v))
        })();
        if r.is_err() {
            self.at = self.end; // stop after an error
        }
        Some(r)
    }
}

/// How an initializer's values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `raw_data`, or packed `float_data`/`double_data`: little-endian fixed-width values that
    /// can be zeroed in place.
    InPlace,
    /// Varint-packed fields (`int32_data`, `int64_data`, `uint64_data`): decoded into a copy;
    /// zeroing them would change the file's lengths.
    Decoded,
    /// In an external data file.
    External,
}

/// One initializer as the file stores it.
#[derive(Clone, Debug)]
pub struct Initializer {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub storage: Storage,
    /// For `InPlace`: the values' bytes in the .onnx file.
    pub data: Range<usize>,
}

/// Reads every top-level graph initializer (tensor descriptions only, data located).
pub fn initializers(buf: &[u8]) -> Result<Vec<(Initializer, TensorFields)>, String> {
    let mut graph = None;
    for f in Fields::new(buf, 0..buf.len()) {
        if let (7, Value::Bytes(r)) = f? {
            graph = Some(r);
        }
    }
    let graph = graph.ok_or("not an ONNX model (no graph)")?;
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for f in Fields::new(buf, graph) {
        if let (5, Value::Bytes(r)) = f? {
            let t = tensor(buf, r)?;
            if !names.insert(t.0.name.clone()) {
                return Err(format!("initializer '{}' appears twice", t.0.name));
            }
            out.push(t);
        }
    }
    Ok(out)
}

/// The parts of a `TensorProto` that are not fixed-width data, kept for decoding and for
/// external data.
#[derive(Clone, Debug, Default)]
pub struct TensorFields {
    varints: Vec<Range<usize>>,
    location: Option<String>,
    offset: u64,
    length: Option<u64>,
}

fn dtype_of(code: u64) -> Result<(DType, usize), String> {
    Ok(match code {
        1 => (DType::F32, 4),
        2 => (DType::U8, 1),
        3 => (DType::I8, 1),
        4 => (DType::U16, 2),
        5 => (DType::I16, 2),
        6 => (DType::I32, 4),
        7 => (DType::I64, 8),
        9 => (DType::Bool, 1),
        10 => (DType::F16, 2),
        11 => (DType::F64, 8),
        12 => (DType::U32, 4),
        13 => (DType::U64, 8),
        14 => (DType::from_safetensors("C64"), 8),
        16 => (DType::BF16, 2),
        17 => (DType::from_safetensors("F8_E4M3"), 1),
        19 => (DType::from_safetensors("F8_E5M2"), 1),
        8 => return Err("string tensors are not numeric".into()),
        c => return Err(format!("ONNX data type {c} is not supported")),
    })
}

fn tensor(buf: &[u8], range: Range<usize>) -> Result<(Initializer, TensorFields), String> {
    let mut name = None;
    let mut dims: Vec<u64> = Vec::new();
    let mut code = 1u64;
    let mut raw = None;
    let mut fixed = None;
    let mut fixed_field = 0u32;
    let mut fields = TensorFields::default();
    let mut external = false;
    for f in Fields::new(buf, range) {
        match f? {
            (8, Value::Bytes(r)) => name = Some(String::from_utf8_lossy(&buf[r]).into_owned()),
            (1, Value::Varint(d)) => dims.push(d),
            (1, Value::Bytes(r)) => {
                let mut at = r.start;
                while at < r.end {
                    dims.push(varint(buf, &mut at, r.end)?);
                }
            }
            (2, Value::Varint(c)) => code = c,
            (9, Value::Bytes(r)) => raw = Some(r),
            (f @ (4 | 10), Value::Bytes(r)) => {
                fixed = Some(r);
                fixed_field = f;
            }
            (5 | 7 | 11, Value::Bytes(r)) => fields.varints.push(r),
            (4 | 5 | 7 | 10 | 11, _) => {
                return Err("unpacked repeated data fields are not supported".into());
            }
            (14, Value::Varint(l)) => external = l == 1,
            (13, Value::Bytes(r)) => {
                let (mut k, mut v) = (String::new(), String::new());
                for e in Fields::new(buf, r) {
                    match e? {
                        (1, Value::Bytes(r)) => k = String::from_utf8_lossy(&buf[r]).into_owned(),
                        (2, Value::Bytes(r)) => v = String::from_utf8_lossy(&buf[r]).into_owned(),
                        _ => {}
                    }
                }
                match k.as_str() {
                    "location" => fields.location = Some(v),
                    "offset" => {
                        fields.offset = v.parse().map_err(|_| format!("bad offset {v:?}"))?
                    }
                    "length" => {
                        fields.length = Some(v.parse().map_err(|_| format!("bad length {v:?}"))?)
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let name = name.unwrap_or_default();
    let err = |m: String| format!("initializer '{name}': {m}");
    if dims.len() > MAX_DIMS {
        return Err(err(format!("{} dimensions", dims.len())));
    }
    let dims: Vec<usize> = dims
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| err(format!("dimension {d} is too large"))))
        .collect::<Result<_, _>>()?;
    let (dtype, size) = dtype_of(code).map_err(err)?;
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(format!("shape {dims:?} overflows")))?;
    let need = numel
        .checked_mul(size)
        .ok_or_else(|| err(format!("shape {dims:?} overflows")))?;
    let (storage, data) = if external {
        (Storage::External, 0..0)
    } else if let Some(r) = raw.clone().or(fixed.clone()) {
        // float_data holds float and complex64 values, double_data double ones.
        let fits = matches!((fixed_field, code), (4, 1 | 14) | (10, 11));
        if raw.is_none() && !fits {
            return Err(err(format!(
                "{} on a tensor of data type {code}",
                if fixed_field == 4 {
                    "float_data"
                } else {
                    "double_data"
                }
            )));
        }
        if r.len() != need {
            return Err(err(format!(
                "shape {dims:?} of {dtype} needs {need} bytes but the data has {}",
                r.len()
            )));
        }
        (Storage::InPlace, r)
    } else if !fields.varints.is_empty() || numel == 0 {
        (Storage::Decoded, 0..0)
    } else {
        return Err(err("has no data".into()));
    };
    Ok((
        Initializer {
            name,
            dims,
            dtype,
            storage,
            data,
        },
        fields,
    ))
}

pub(super) fn open_onnx(path: &Path) -> Result<Model, ModelError> {
    let map = super::map_regular_file(path)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    read_onnx(
        ModelSource::File(path.to_path_buf()),
        Primary::Mmap(map),
        Some(dir),
    )
}

/// Reads an ONNX model; `dir` is where external data files are looked for (none when the
/// model comes from memory, which then must not use external data).
pub(super) fn read_onnx(
    source: ModelSource,
    map: Primary,
    dir: Option<PathBuf>,
) -> Result<Model, ModelError> {
    let p = match &source {
        ModelSource::File(p) => p.display().to_string(),
        ModelSource::Builtin(n) => (*n).to_string(),
    };
    let file_err = |msg: String| ModelError::Format {
        path: p.clone(),
        msg,
    };
    let buf: &[u8] = &map;
    let inits = initializers(buf).map_err(file_err)?;
    if inits.is_empty() {
        return Err(file_err(
            "the graph has no initializers (no weights to prune)".into(),
        ));
    }
    let mut extra: Vec<u8> = Vec::new();
    let mut entries = Vec::with_capacity(inits.len());
    let mut externals: BTreeMap<String, memmap2::Mmap> = BTreeMap::new();
    let mut external_files = Vec::new();
    let mut copied = 0u64;
    for (init, fields) in inits {
        let terr = |msg: String| ModelError::Tensor {
            path: p.clone(),
            tensor: init.name.clone(),
            msg,
        };
        let size = init.dtype.size_bytes().unwrap_or(1);
        let numel: usize = init.dims.iter().product();
        let bytes = match init.storage {
            Storage::InPlace => init.data.clone(),
            Storage::Decoded => {
                // Varints: int32_data carries int8/16/32, uint8/16, bool, f16 and bf16 bits.
                let start = buf.len() + extra.len();
                let mut n = 0usize;
                for r in &fields.varints {
                    let mut at = r.start;
                    while at < r.end {
                        let v = varint(buf, &mut at, r.end).map_err(&terr)?;
                        n += 1;
                        if n > numel {
                            return Err(terr(format!(
                                "holds more than the {numel} values its shape has"
                            )));
                        }
                        extra.extend_from_slice(&v.to_le_bytes()[..size]);
                    }
                }
                if n != numel {
                    return Err(terr(format!("holds {n} values but its shape has {numel}")));
                }
                start..buf.len() + extra.len()
            }
            Storage::External => {
                let Some(dir) = &dir else {
                    return Err(terr(
                        "uses external data, which needs a file on disk".into(),
                    ));
                };
                let Some(loc) = &fields.location else {
                    return Err(terr("external data without a location".into()));
                };
                let rel = Path::new(loc);
                let plain = rel.components().all(|c| {
                    matches!(
                        c,
                        std::path::Component::Normal(_) | std::path::Component::CurDir
                    )
                });
                if !plain {
                    return Err(terr(format!(
                        "external data location {loc:?} leaves the model's folder"
                    )));
                }
                let data_path = dir.join(rel);
                if !externals.contains_key(loc) {
                    let m = super::map_regular_file(&data_path).map_err(|e| match e {
                        ModelError::Io { error, .. } => terr(format!(
                            "its external data file {} cannot be opened: {}",
                            data_path.display(),
                            crate::util::io_message(&error)
                        )),
                        other => terr(format!("its external data file: {other}")),
                    })?;
                    externals.insert(loc.clone(), m);
                    external_files.push(data_path.clone());
                }
                let m = &externals[loc];
                let need = (numel * size) as u64;
                let length = fields.length.unwrap_or(need);
                if length != need {
                    return Err(terr(format!(
                        "external length {length} but its shape needs {need} bytes"
                    )));
                }
                let end = fields
                    .offset
                    .checked_add(length)
                    .filter(|&e| e <= m.len() as u64);
                let Some(end) = end else {
                    return Err(terr(format!(
                        "external data [{}, +{length}) lies past the end of {} ({} bytes)",
                        fields.offset,
                        data_path.display(),
                        m.len()
                    )));
                };
                // Copies are bounded by the data files' real sizes (twice over, for initializers
                // that share bytes): many initializers naming one large range cannot multiply it.
                copied += length;
                if copied > 2 * externals.values().map(|m| m.len() as u64).sum::<u64>() + (64 << 20)
                {
                    return Err(terr(
                        "external data ranges overlap far beyond the data files' size".into(),
                    ));
                }
                let start = buf.len() + extra.len();
                extra.extend_from_slice(&m[fields.offset as usize..end as usize]);
                start..buf.len() + extra.len()
            }
        };
        entries.push(TensorEntry {
            name: init.name,
            shape: init.dims,
            dtype: init.dtype,
            numel,
            bytes,
        });
    }
    let mut model = Model::new(
        source,
        ModelFormat::Onnx,
        entries,
        BTreeMap::new(),
        Backing::Mapped { map, extra },
    );
    model.data_files = external_files;
    Ok(model)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, ((field as u64) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The fields of the message in `buf[range]` with the byte span of each whole field (key
/// included), for copying fields through unchanged.
fn spans(buf: &[u8], range: Range<usize>) -> Result<Vec<(u32, Value, Range<usize>)>, String> {
    let mut f = Fields::new(buf, range);
    let mut out = Vec::new();
    loop {
        let start = f.at;
        match f.next() {
            None => return Ok(out),
            Some(r) => {
                let (n, v) = r?;
                out.push((n, v, start..f.at));
            }
        }
    }
}

/// The model in `buf` with the named initializers replaced by F32 tensors of new shapes and
/// values (a compacted model). Every other field of the model, the graph and its nodes is
/// copied byte for byte; the graph's `value_info` (intermediate shapes, now stale) and the
/// graph inputs that list a replaced initializer are left out, so runtimes infer them again.
pub fn replace_initializers(
    buf: &[u8],
    replace: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<Vec<u8>, String> {
    let name_of = |r: &Range<usize>| -> Result<Option<String>, String> {
        for f in Fields::new(buf, r.clone()) {
            // TensorProto.name and ValueInfoProto.name are fields 8 and 1.
            if let (n, Value::Bytes(s)) = f?
                && n == 8
            {
                return Ok(Some(String::from_utf8_lossy(&buf[s]).into_owned()));
            }
        }
        Ok(None)
    };
    let value_info_name = |r: &Range<usize>| -> Result<Option<String>, String> {
        for f in Fields::new(buf, r.clone()) {
            if let (1, Value::Bytes(s)) = f? {
                return Ok(Some(String::from_utf8_lossy(&buf[s]).into_owned()));
            }
        }
        Ok(None)
    };
    let mut found = 0;
    let mut out = Vec::with_capacity(buf.len());
    for (n, v, span) in spans(buf, 0..buf.len())? {
        let (7, Value::Bytes(graph)) = (n, &v) else {
            out.extend_from_slice(&buf[span]);
            continue;
        };
        let mut g = Vec::with_capacity(graph.len());
        for (gn, gv, gspan) in spans(buf, graph.clone())? {
            match (gn, &gv) {
                (5, Value::Bytes(r)) => match name_of(r)? {
                    Some(name) if replace.contains_key(&name) => {
                        let (dims, values) = &replace[&name];
                        let mut t = Vec::with_capacity(values.len() * 4 + 64);
                        for &d in dims {
                            put_varint(&mut t, 1 << 3);
                            put_varint(&mut t, d as u64);
                        }
                        put_varint(&mut t, 2 << 3);
                        put_varint(&mut t, 1); // FLOAT
                        put_bytes(&mut t, 8, name.as_bytes());
                        let raw: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                        put_bytes(&mut t, 9, &raw);
                        put_bytes(&mut g, 5, &t);
                        found += 1;
                    }
                    _ => g.extend_from_slice(&buf[gspan]),
                },
                (13, _) => {}
                (11, Value::Bytes(r))
                    if value_info_name(r)?.is_some_and(|n| replace.contains_key(&n)) => {}
                _ => g.extend_from_slice(&buf[gspan]),
            }
        }
        put_bytes(&mut out, 7, &g);
    }
    if found != replace.len() {
        return Err(format!(
            "{} of the {} tensors to replace are not initializers of the graph",
            replace.len() - found,
            replace.len()
        ));
    }
    Ok(out)
}
