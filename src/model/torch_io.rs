//! PyTorch state dicts and NumPy archives, read through candle's readers.
//!
//! Both are read whole into memory (neither format can be mapped portably). candle's readers
//! are guarded with `catch_unwind` because hostile files must produce an error, not a crash.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType as CDType, Tensor};

use super::{Backing, DType, Model, ModelError, ModelFormat, ModelSource, TensorEntry};

pub(super) fn open_pytorch(path: &Path) -> Result<Model, ModelError> {
    let p = path.display().to_string();
    let read =
        |key: Option<&str>| guarded(&p, || candle_core::pickle::read_all_with_key(path, key));
    let mut tensors = read(None)?;
    // Training checkpoints nest the weights: try the usual keys before giving up.
    for key in ["state_dict", "model", "model_state_dict", "module"] {
        if !tensors.is_empty() {
            break;
        }
        if let Ok(t) = read(Some(key)) {
            tensors = t;
        }
    }
    if tensors.is_empty() {
        return Err(ModelError::Format {
            path: p,
            msg: "no tensors found (looked at the top level and under state_dict, model, model_state_dict, module)".into(),
        });
    }
    build(path, ModelFormat::PyTorch, tensors)
}

pub(super) fn open_npz(path: &Path) -> Result<Model, ModelError> {
    let p = path.display().to_string();
    let tensors = guarded(&p, || Tensor::read_npz(path))?;
    if tensors.is_empty() {
        return Err(ModelError::Format {
            path: p,
            msg: "the archive holds no arrays".into(),
        });
    }
    build(path, ModelFormat::Npz, tensors)
}

fn guarded<T>(path: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T, ModelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ModelError::Format {
            path: path.to_string(),
            msg: format!("cannot read: {}", first_line(&e.to_string())),
        }),
        Err(_) => Err(ModelError::Format {
            path: path.to_string(),
            msg: "cannot read: the file is corrupt (the reader crashed on it)".into(),
        }),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn build(
    path: &Path,
    format: ModelFormat,
    tensors: Vec<(String, Tensor)>,
) -> Result<Model, ModelError> {
    let p = path.display().to_string();
    let mut data = Vec::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let terr = |msg: String| ModelError::Tensor {
            path: p.clone(),
            tensor: name.clone(),
            msg,
        };
        let shape = t.dims().to_vec();
        let flat = t.flatten_all().map_err(|e| terr(e.to_string()))?;
        let start = data.len();
        let dtype = match t.dtype() {
            CDType::F32 => push(&mut data, flat.to_vec1::<f32>(), DType::F32, |v| {
                v.to_le_bytes()
            }),
            CDType::F64 => push(&mut data, flat.to_vec1::<f64>(), DType::F64, |v| {
                v.to_le_bytes()
            }),
            CDType::F16 => push(&mut data, flat.to_vec1::<half::f16>(), DType::F16, |v| {
                v.to_le_bytes()
            }),
            CDType::BF16 => push(&mut data, flat.to_vec1::<half::bf16>(), DType::BF16, |v| {
                v.to_le_bytes()
            }),
            CDType::U8 => push(&mut data, flat.to_vec1::<u8>(), DType::U8, |v| {
                v.to_le_bytes()
            }),
            CDType::U32 => push(&mut data, flat.to_vec1::<u32>(), DType::U32, |v| {
                v.to_le_bytes()
            }),
            CDType::I16 => push(&mut data, flat.to_vec1::<i16>(), DType::I16, |v| {
                v.to_le_bytes()
            }),
            CDType::I32 => push(&mut data, flat.to_vec1::<i32>(), DType::I32, |v| {
                v.to_le_bytes()
            }),
            CDType::I64 => push(&mut data, flat.to_vec1::<i64>(), DType::I64, |v| {
                v.to_le_bytes()
            }),
            other => Err(candle_core::Error::Msg(format!(
                "dtype {other:?} is not supported in this format"
            ))),
        }
        .map_err(|e| terr(e.to_string()))?;
        let numel = shape.iter().product();
        entries.push(TensorEntry {
            name,
            shape,
            dtype,
            numel,
            bytes: start..data.len(),
        });
    }
    Ok(Model::new(
        ModelSource::File(path.to_path_buf()),
        format,
        entries,
        BTreeMap::new(),
        Backing::Owned(data),
    ))
}

fn push<T, const N: usize>(
    data: &mut Vec<u8>,
    values: candle_core::Result<Vec<T>>,
    dtype: DType,
    to_bytes: impl Fn(T) -> [u8; N],
) -> candle_core::Result<DType> {
    let values = values?;
    data.reserve(values.len() * N);
    for v in values {
        data.extend_from_slice(&to_bytes(v));
    }
    Ok(dtype)
}
