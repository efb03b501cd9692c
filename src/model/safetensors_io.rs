//! Reading safetensors: a header parser of our own, so that unknown dtypes are listed rather
//! than fatal and every error names the tensor and says what is wrong.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Backing, DType, Model, ModelError, ModelFormat, ModelSource, TensorEntry};

/// Headers larger than this are refused before any allocation (the reference reader's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

pub(super) fn open_safetensors(path: &Path) -> Result<Model, ModelError> {
    let mmap = super::map_regular_file(path)?;
    from_backing(ModelSource::File(path.to_path_buf()), Backing::Mmap(mmap))
}

pub(super) fn from_backing(source: ModelSource, backing: Backing) -> Result<Model, ModelError> {
    let path = source.display_name();
    let (entries, metadata) = parse_safetensors(backing.bytes()).map_err(|e| match e {
        ParseError::File(msg) => ModelError::Format {
            path: path.clone(),
            msg,
        },
        ParseError::Tensor(tensor, msg) => ModelError::Tensor {
            path: path.clone(),
            tensor,
            msg,
        },
    })?;
    Ok(Model::new(
        source,
        ModelFormat::Safetensors,
        entries,
        metadata,
        backing,
    ))
}

#[derive(Debug)]
pub enum ParseError {
    File(String),
    Tensor(String, String),
}

/// Parses and validates a whole safetensors buffer; byte ranges in the result are absolute.
pub fn parse_safetensors(
    buf: &[u8],
) -> Result<(Vec<TensorEntry>, BTreeMap<String, String>), ParseError> {
    let file_err = |m: String| ParseError::File(m);
    let Some(len_bytes) = buf.get(..8) else {
        return Err(file_err(format!(
            "not a safetensors file: {} bytes is too short for the 8-byte header length",
            buf.len()
        )));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().unwrap_or([0; 8]));
    if header_len > MAX_HEADER_BYTES || header_len > (buf.len() as u64).saturating_sub(8) {
        return Err(file_err(format!(
            "not a safetensors file (or truncated): header length {header_len} exceeds the file size of {} bytes",
            buf.len()
        )));
    }
    let header_end = 8 + header_len as usize;
    let header = std::str::from_utf8(&buf[8..header_end])
        .map_err(|_| file_err("safetensors header is not valid UTF-8".into()))?;
    let (raw, meta) = parse_header(header.trim_end())?;
    let data_len = buf.len() - header_end;
    let mut metadata = BTreeMap::new();
    if let Some(value) = meta {
        let serde_json::Value::Object(m) = value else {
            return Err(file_err("__metadata__ is not an object".into()));
        };
        for (k, v) in m {
            let s = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            metadata.insert(k, s);
        }
    }
    let mut entries = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let terr = |m: String| ParseError::Tensor(name.clone(), m);
        let dtype = value
            .dtype
            .as_ref()
            .and_then(|d| d.as_str())
            .ok_or_else(|| terr("missing \"dtype\"".into()))?;
        let dtype = DType::from_safetensors(dtype);
        let shape: Vec<usize> = value
            .shape
            .as_ref()
            .and_then(|s| s.as_array())
            .ok_or_else(|| terr("missing \"shape\"".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| terr("shape has a non-integer or negative dimension".into()))?;
        let offsets = value
            .data_offsets
            .as_ref()
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| terr("missing or malformed \"data_offsets\"".into()))?;
        let (start, end) = offsets;
        if start > end || end > data_len as u64 {
            return Err(terr(format!(
                "data_offsets [{start}, {end}] lie outside the {data_len} data bytes (file truncated or header lies)"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        let nbytes = (end - start) as usize;
        if let Some(bits) = dtype.bits() {
            let expect = numel
                .checked_mul(bits)
                .map(|b| b.div_ceil(8))
                .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
            if expect != nbytes {
                return Err(terr(format!(
                    "shape {shape:?} of {dtype} needs {expect} bytes but data_offsets give {nbytes}"
                )));
            }
        }
        entries.push(TensorEntry {
            name,
            shape,
            dtype,
            numel,
            bytes: header_end + start as usize..header_end + end as usize,
        });
    }
    // Overlapping tensors would make exported files alias each other's bytes.
    let mut ranges: Vec<(usize, usize, &str)> = entries
        .iter()
        .filter(|e| !e.bytes.is_empty())
        .map(|e| (e.bytes.start, e.bytes.end, e.name.as_str()))
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(ParseError::Tensor(
                w[1].2.to_string(),
                format!("its bytes overlap those of '{}'", w[0].2),
            ));
        }
    }
    Ok((entries, metadata))
}

/// One header entry, each field kept as JSON so that what is wrong with it can be said in
/// words; unknown fields are ignored, as the reference reader does.
#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: Option<serde_json::Value>,
    shape: Option<serde_json::Value>,
    data_offsets: Option<serde_json::Value>,
}

type RawHeader = (Vec<(String, RawEntry)>, Option<serde_json::Value>);

/// Reads the header object in one pass, entry by entry (a million-tensor header would cost
/// gigabytes as a `serde_json::Value`), refusing duplicate names and naming the tensor whose
/// entry is not an object.
fn parse_header(text: &str) -> Result<RawHeader, ParseError> {
    use serde::de::{Deserializer, Error, MapAccess, Visitor};
    use std::cell::RefCell;

    struct HeaderVisitor<'a>(&'a RefCell<Option<(String, String)>>);
    impl<'de> Visitor<'de> for HeaderVisitor<'_> {
        type Value = RawHeader;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object of tensors")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1 << 20));
            let mut names = std::collections::HashSet::new();
            let mut meta = None;
            while let Some(key) = map.next_key::<String>()? {
                if key == "__metadata__" {
                    meta = Some(map.next_value::<serde_json::Value>()?);
                    continue;
                }
                let entry = match map.next_value::<RawEntry>() {
                    Ok(e) => e,
                    Err(e) => {
                        *self.0.borrow_mut() = Some((key, format!("entry is malformed: {e}")));
                        return Err(e);
                    }
                };
                if !names.insert(key.clone()) {
                    *self.0.borrow_mut() = Some((key, "appears twice in the header".into()));
                    return Err(A::Error::custom("duplicate tensor"));
                }
                entries.push((key, entry));
            }
            Ok((entries, meta))
        }
    }

    let bad = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de
        .deserialize_map(HeaderVisitor(&bad))
        .and_then(|h| de.end().map(|()| h));
    parsed.map_err(|e| match bad.into_inner() {
        Some((name, msg)) => ParseError::Tensor(name, msg),
        None if e.is_data() => ParseError::File("safetensors header is not a JSON object".into()),
        None => ParseError::File(format!("safetensors header is not valid JSON: {e}")),
    })
}
