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
