//! Datasets. Today: the UCI handwritten digits that scikit-learn ships (1,797 8×8 images),
//! bundled in `assets/digits/` and compiled into the binary, with a fixed train/test split.

use std::io::Read;

use crate::util::SplitMix64;

/// The gzip'd CSV exactly as scikit-learn ships it: 64 pixel values (0..16), then the label.
static DIGITS_CSV_GZ: &[u8] = include_bytes!("../assets/digits/digits.csv.gz");

/// Images in the test split; the rest train.
pub const DIGITS_TEST_SIZE: usize = 360;
/// Seed of the permutation that fixes the split. Changing it changes every published figure.
pub const DIGITS_SPLIT_SEED: u64 = 20_240_601;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("bundled digits data: {0}")]
    Digits(String),
    #[error("unknown dataset '{0}' (known: uci-digits)")]
    Unknown(String),
    #[error("data file {path}: {msg}")]
    File { path: String, msg: String },
    #[error("data file {path}, array '{array}': {msg}")]
    Array {
        path: String,
        array: String,
        msg: String,
    },
}

/// Inputs as a row-major `n × dim` matrix of f32 and integer class labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub inputs: Vec<f32>,
    pub labels: Vec<u32>,
    pub dim: usize,
    pub classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// A seeded shuffle split: `test_fraction` of the samples (at least one) for testing.
    pub fn split_seeded(&self, test_fraction: f64, seed: u64) -> Split {
        let mut perm: Vec<usize> = (0..self.len()).collect();
        let mut rng = SplitMix64::new(seed);
        for i in (1..perm.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        let n_test = ((self.len() as f64 * test_fraction).round() as usize)
            .clamp(1.min(self.len()), self.len());
        let (test, train) = perm.split_at(n_test);
        Split {
            train: self.subset(&format!("{}/train", self.name), train),
            test: self.subset(&format!("{}/test", self.name), test),
        }
    }

    fn subset(&self, name: &str, idx: &[usize]) -> Dataset {
        let mut inputs = Vec::with_capacity(idx.len() * self.dim);
        for &i in idx {
            inputs.extend_from_slice(&self.inputs[i * self.dim..(i + 1) * self.dim]);
        }
        Dataset {
            name: name.to_string(),
            inputs,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            dim: self.dim,
            classes: self.classes,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Split {
    pub train: Dataset,
    pub test: Dataset,
}

/// All 1,797 digits, pixels scaled to [0, 1].
pub fn digits_all() -> Result<Dataset, DataError> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| DataError::Digits(e.to_string()))?;
    let mut inputs = Vec::with_capacity(1797 * 64);
    let mut labels = Vec::with_capacity(1797);
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|e| DataError::Digits(format!("line {}: {e}", line_no + 1)))?;
        if vals.len() != 65 {
            return Err(DataError::Digits(format!(
                "line {}: {} values, expected 65",
                line_no + 1,
                vals.len()
            )));
        }
        inputs.extend(vals[..64].iter().map(|v| v / 16.0));
        labels.push(vals[64] as u32);
    }
    Ok(Dataset {
        name: "uci-digits".into(),
        inputs,
        labels,
        dim: 64,
        classes: 10,
    })
}

/// The fixed split: a Fisher–Yates permutation seeded with [`DIGITS_SPLIT_SEED`]; the first
/// [`DIGITS_TEST_SIZE`] images of it are the test set.
pub fn digits_split() -> Result<Split, DataError> {
    let all = digits_all()?;
    let mut perm: Vec<usize> = (0..all.len()).collect();
    let mut rng = SplitMix64::new(DIGITS_SPLIT_SEED);
    for i in (1..perm.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    let (test, train) = perm.split_at(DIGITS_TEST_SIZE);
    Ok(Split {
        train: all.subset("uci-digits/train", train),
        test: all.subset("uci-digits/test", test),
    })
}

/// The values of one input array, in the element type a model takes.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayValues {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl ArrayValues {
    pub fn len(&self) -> usize {
        match self {
            ArrayValues::F32(v) => v.len(),
            ArrayValues::I64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One named input array whose first dimension counts samples.
#[derive(Clone, Debug, PartialEq)]
pub struct DataArray {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: ArrayValues,
}

impl DataArray {
    /// Elements per sample.
    pub fn sample_len(&self) -> usize {
        self.shape[1..].iter().product()
    }
}

/// What an evaluation runs on: one or more input arrays with the same sample count, and
/// labels when the data has them (without, pruned models are compared with the dense one).
#[derive(Clone, Debug, PartialEq)]
pub struct EvalData {
    /// For people: "uci-digits/test" or the file's name.
    pub name: String,
    pub inputs: Vec<DataArray>,
    pub labels: Option<Vec<u32>>,
    pub samples: usize,
}

impl EvalData {
    /// A labelled f32 dataset as one input named `x` of shape `[n, dim]`.
    pub fn from_dataset(d: &Dataset) -> EvalData {
        EvalData {
            name: d.name.clone(),
            inputs: vec![DataArray {
                name: "x".into(),
                shape: vec![d.len(), d.dim],
                values: ArrayValues::F32(d.inputs.clone()),
            }],
            labels: Some(d.labels.clone()),
            samples: d.len(),
        }
    }

    /// The first `n` samples (all of them when there are fewer).
    pub fn head(&self, n: usize) -> EvalData {
        let n = n.min(self.samples);
        EvalData {
            name: self.name.clone(),
            inputs: self
                .inputs
                .iter()
                .map(|a| {
                    let end = n * a.sample_len();
                    let mut shape = a.shape.clone();
                    shape[0] = n;
                    DataArray {
                        name: a.name.clone(),
                        shape,
                        values: match &a.values {
                            ArrayValues::F32(v) => ArrayValues::F32(v[..end].to_vec()),
                            ArrayValues::I64(v) => ArrayValues::I64(v[..end].to_vec()),
                        },
                    }
                })
                .collect(),
            labels: self.labels.as_ref().map(|l| l[..n].to_vec()),
            samples: n,
        }
    }

    pub fn input(&self, name: &str) -> Option<&DataArray> {
        self.inputs.iter().find(|a| a.name == name)
    }

    /// SHA-256 over the arrays' names, shapes and values and the labels: equal data, equal
    /// fingerprint, whatever file it came from.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for a in &self.inputs {
            h.update(a.name.as_bytes());
            h.update([0]);
            for d in &a.shape {
                h.update((*d as u64).to_le_bytes());
            }
            match &a.values {
                ArrayValues::F32(v) => v.iter().for_each(|x| h.update(x.to_le_bytes())),
                ArrayValues::I64(v) => v.iter().for_each(|x| h.update(x.to_le_bytes())),
            }
        }
        if let Some(l) = &self.labels {
            h.update(b"labels");
            l.iter().for_each(|x| h.update(x.to_le_bytes()));
        }
        format!("{:x}", h.finalize())
    }
}

/// Which arrays of a data file to read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataSpec {
    /// The input array of a one-input model (default `x`).
    pub x: Option<String>,
    /// The label array (default `y`; without one, only fidelity is measured).
    pub y: Option<String>,
}

/// Most samples a data file may hold; more is almost surely a wrong array.
const MAX_SAMPLES: usize = 10_000_000;

/// Reads a `.npz` or `.safetensors` file of named arrays. `inputs` names the arrays the model
/// takes: with one input, `spec.x` (default `x`) or an array named after that input serves;
/// with several, each must be present under the input's name.
pub fn load_eval_data(
    path: &std::path::Path,
    inputs: &[String],
    spec: &DataSpec,
) -> Result<EvalData, DataError> {
    let p = path.display().to_string();
    let ferr = |msg: String| DataError::File {
        path: p.clone(),
        msg,
    };
    let file = crate::model::Model::open(path).map_err(|e| ferr(e.to_string()))?;
    if file.format == crate::model::ModelFormat::Onnx
        || file.format == crate::model::ModelFormat::PyTorch
    {
        return Err(ferr(
            "data must be a .npz or .safetensors file of named arrays".into(),
        ));
    }
    let names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
    let listing = names.join(", ");
    let mut wanted: Vec<(String, String)> = Vec::new(); // (model input, array)
    if inputs.len() <= 1 {
        let input = inputs.first().cloned().unwrap_or_else(|| "x".into());
        let array = match &spec.x {
            Some(x) => x.clone(),
            None if file.find("x").is_some() => "x".into(),
            None if file.find(&input).is_some() => input.clone(),
            None => {
                return Err(ferr(format!(
                    "no input array: expected 'x' or '{input}' (choose another with --x); \
                     the file holds: {listing}"
                )));
            }
        };
        wanted.push((input, array));
    } else {
        for i in inputs {
            wanted.push((i.clone(), i.clone()));
        }
    }
    let mut arrays = Vec::new();
    let mut samples: Option<(usize, String)> = None;
    for (input, array) in wanted {
        let aerr = |msg: String| DataError::Array {
            path: p.clone(),
            array: array.clone(),
            msg,
        };
        let t = file.find(&array).ok_or_else(|| {
            aerr(format!(
                "missing (the model's input '{input}' needs it); the file holds: {listing}"
            ))
        })?;
        let e = &file.tensors[t];
        if e.shape.is_empty() || e.shape[0] == 0 {
            return Err(aerr(format!(
                "shape {:?} has no samples (the first dimension counts them)",
                e.shape
            )));
        }
        if e.shape[0] > MAX_SAMPLES {
            return Err(aerr(format!(
                "{} samples is more than the {MAX_SAMPLES} an evaluation takes",
                e.shape[0]
            )));
        }
        match &samples {
            Some((n, first)) if *n != e.shape[0] => {
                return Err(aerr(format!(
                    "{} samples, but '{first}' has {n}",
                    e.shape[0]
                )));
            }
            None => samples = Some((e.shape[0], array.clone())),
            _ => {}
        }
        let values = if e.dtype.is_float() {
            let v = file.to_f32_vec(t);
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(aerr(format!(
                    "element {i} is {} (inputs must be finite)",
                    v[i]
                )));
            }
            ArrayValues::F32(v)
        } else {
            ArrayValues::I64(
                read_ints(&e.dtype, file.tensor_bytes(t))
                    .ok_or_else(|| aerr(format!("dtype {} is not a number type", e.dtype)))?,
            )
        };
        arrays.push(DataArray {
            name: input,
            shape: e.shape.clone(),
            values,
        });
    }
    let samples = samples.map(|s| s.0).unwrap_or(0);
    let label_name = spec.y.clone().unwrap_or_else(|| "y".into());
    let labels = match file.find(&label_name) {
        None if spec.y.is_some() => {
            return Err(DataError::Array {
                path: p.clone(),
                array: label_name,
                msg: format!("missing; the file holds: {listing}"),
            });
        }
        None => None,
        Some(t) => {
            let aerr = |msg: String| DataError::Array {
                path: p.clone(),
                array: label_name.clone(),
                msg,
            };
            let e = &file.tensors[t];
            if e.shape != [samples] {
                return Err(aerr(format!(
                    "labels have shape {:?}; expected [{samples}], one class index per sample",
                    e.shape
                )));
            }
            let ints = if e.dtype.is_float() {
                let v = file.to_f32_vec(t);
                if let Some(i) = v.iter().position(|x| x.fract() != 0.0 || !x.is_finite()) {
                    return Err(aerr(format!(
                        "label {i} is {} (labels are class indices)",
                        v[i]
                    )));
                }
                v.iter().map(|&x| x as i64).collect()
            } else {
                read_ints(&e.dtype, file.tensor_bytes(t))
                    .ok_or_else(|| aerr(format!("dtype {} is not a number type", e.dtype)))?
            };
            let mut labels = Vec::with_capacity(ints.len());
            for (i, &v) in ints.iter().enumerate() {
                if !(0..=u32::MAX as i64).contains(&v) {
                    return Err(aerr(format!(
                        "label {i} is {v} (labels are class indices from 0)"
                    )));
                }
                labels.push(v as u32);
            }
            Some(labels)
        }
    };
    Ok(EvalData {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or(p),
        inputs: arrays,
        labels,
        samples,
    })
}

/// Integer (and bool) little-endian elements as i64; `None` for other dtypes.
fn read_ints(dtype: &crate::model::DType, bytes: &[u8]) -> Option<Vec<i64>> {
    use crate::model::DType as D;
    macro_rules! conv {
        ($t:ty) => {
            bytes
                .chunks_exact(std::mem::size_of::<$t>())
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect()
        };
    }
    Some(match dtype {
        D::Bool | D::U8 => bytes.iter().map(|&b| b as i64).collect(),
        D::I8 => bytes.iter().map(|&b| b as i8 as i64).collect(),
        D::I16 => conv!(i16),
        D::U16 => conv!(u16),
        D::I32 => conv!(i32),
        D::U32 => conv!(u32),
        D::I64 => conv!(i64),
        D::U64 => bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()).min(i64::MAX as u64) as i64)
            .collect(),
        _ => return None,
    })
}

/// Looks a dataset split up by the name a model's metadata gives.
pub fn by_name(name: &str) -> Result<Split, DataError> {
    match name {
        "uci-digits" => digits_split(),
        other => Err(DataError::Unknown(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_load_with_known_counts_and_first_row() {
        let d = digits_all().unwrap();
        assert_eq!(d.len(), 1797);
        assert_eq!(d.inputs.len(), 1797 * 64);
        // First row of scikit-learn's digits.csv: a zero whose third pixel is 5.
        assert_eq!(d.labels[0], 0);
        assert_eq!(d.inputs[2], 5.0 / 16.0);
        let mut per_class = [0usize; 10];
        for &l in &d.labels {
            per_class[l as usize] += 1;
        }
        // Class counts published in scikit-learn's DESCR / load_digits.
        assert_eq!(
            per_class,
            [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
        );
    }

    #[test]
    fn split_is_fixed_and_disjoint() {
        let a = digits_split().unwrap();
        let b = digits_split().unwrap();
        assert_eq!(a.test, b.test);
        assert_eq!(a.test.len(), 360);
        assert_eq!(a.train.len(), 1437);
        assert!(a.test.labels.contains(&9));
    }
}
