//! What a model's outputs score: against labels, and against the dense model's outputs.
//!
//! Plain loops in f64 over row-major outputs, with no engine in between, so that candle and
//! tract models are scored by the same code.

use serde::{Deserialize, Serialize};

use super::EvalError;

/// Model outputs as `rows × cols`: the last dimension is `cols`, every other dimension
/// (samples, tokens) makes rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
    /// The shape of one sample's output, for messages.
    pub sample_shape: Vec<usize>,
}

impl Outputs {
    /// All samples' outputs, row-major, each sample of shape `sample_shape`.
    pub fn new(values: Vec<f32>, sample_shape: Vec<usize>) -> Outputs {
        let cols = sample_shape.last().copied().unwrap_or(1).max(1);
        Outputs {
            rows: values.len() / cols,
            cols,
            values,
            sample_shape,
        }
    }

    /// Runs `run(start, len)` over `samples` in chunks of at most `chunk` samples and gathers
    /// what each returns: the per-sample output shape and the chunk's values.
    pub fn gather(
        samples: usize,
        chunk: usize,
        mut run: impl FnMut(usize, usize) -> Result<(Vec<usize>, Vec<f32>), EvalError>,
    ) -> Result<Outputs, EvalError> {
        let mut values = Vec::new();
        let mut sample_shape = Vec::new();
        let mut start = 0;
        while start < samples {
            let len = chunk.max(1).min(samples - start);
            let (shape, v) = run(start, len)?;
            sample_shape = shape;
            values.extend(v);
            start += len;
        }
        Ok(Outputs::new(values, sample_shape))
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.values[r * self.cols..(r + 1) * self.cols]
    }
}

/// How close the pruned model's outputs stay to the dense model's on the same inputs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Mean over output rows of the cosine similarity between pruned and dense rows.
    pub cosine: f64,
    /// ‖pruned − dense‖ / ‖dense‖ over all outputs (Frobenius norms).
    pub rel_l2: f64,
    /// Fraction of output rows whose largest entry sits at the same index.
    pub top1_agreement: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub samples: usize,
    /// Top-1 accuracy, 0..=1, when the data has labels.
    pub accuracy: Option<f64>,
    /// Top-5 accuracy when there are more than 5 classes.
    pub top5: Option<f64>,
    /// Mean cross-entropy of the softmax of the outputs, when the data has labels.
    pub loss: Option<f64>,
    /// Against the dense model, when one was given.
    pub fidelity: Option<Fidelity>,
}

/// Scores outputs. With `labels`, each sample must give one row of class scores.
pub fn score(
    out: &Outputs,
    samples: usize,
    labels: Option<&[u32]>,
    dense: Option<&Outputs>,
) -> Result<Metrics, EvalError> {
    let mut m = Metrics {
        samples,
        accuracy: None,
        top5: None,
        loss: None,
        fidelity: None,
    };
    if let Some(labels) = labels {
        if out.rows != labels.len() {
            return Err(EvalError::Labels(format!(
                "{} labels, but the model gives {} output rows (one sample's output has shape \
                 {:?}; labels need one row of class scores per sample)",
                labels.len(),
                out.rows,
                out.sample_shape
            )));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l as usize >= out.cols)
        {
            return Err(EvalError::Labels(format!(
                "label {i} is {l}, but the model scores {} classes (0..{})",
                out.cols,
                out.cols.saturating_sub(1)
            )));
        }
        let (mut top1, mut top5, mut loss) = (0usize, 0usize, 0f64);
        for (r, &l) in labels.iter().enumerate() {
            let row = out.row(r);
            let target = row[l as usize];
            // Rank of the label: how many classes score strictly higher (ties favour the label,
            // except that argmax picks the first maximum, as torch's does).
            let higher = row.iter().filter(|&&v| v > target).count();
            if argmax(row) == l as usize {
                top1 += 1;
            }
            if higher < 5 {
                top5 += 1;
            }
            let max = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            loss += lse - target as f64;
        }
        let n = labels.len().max(1) as f64;
        m.accuracy = Some(top1 as f64 / n);
        m.top5 = (out.cols > 5).then(|| top5 as f64 / n);
        m.loss = Some(loss / n);
    }
    if let Some(d) = dense {
        if d.rows != out.rows || d.cols != out.cols {
            return Err(EvalError::Compute(format!(
                "pruned outputs are {}×{} but dense ones {}×{}",
                out.rows, out.cols, d.rows, d.cols
            )));
        }
        let (mut cos, mut agree, mut diff2, mut dense2) = (0f64, 0usize, 0f64, 0f64);
        for r in 0..out.rows {
            let (a, b) = (out.row(r), d.row(r));
            let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
            for (&x, &y) in a.iter().zip(b) {
                let (x, y) = (x as f64, y as f64);
                ab += x * y;
                aa += x * x;
                bb += y * y;
                diff2 += (x - y) * (x - y);
            }
            dense2 += bb;
            cos += match (aa > 0.0, bb > 0.0) {
                (true, true) => ab / (aa.sqrt() * bb.sqrt()),
                (false, false) => 1.0,
                _ => 0.0,
            };
            if argmax(a) == argmax(b) {
                agree += 1;
            }
        }
        let rows = out.rows.max(1) as f64;
        m.fidelity = Some(Fidelity {
            cosine: cos / rows,
            rel_l2: if dense2 > 0.0 {
                (diff2 / dense2).sqrt()
            } else if diff2 == 0.0 {
                0.0
            } else {
                f64::INFINITY
            },
            top1_agreement: agree as f64 / rows,
        });
    }
    Ok(m)
}

/// Index of the first largest value (NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outs(rows: usize, cols: usize, values: Vec<f32>) -> Outputs {
        Outputs {
            rows,
            cols,
            values,
            sample_shape: vec![cols],
        }
    }

    #[test]
    fn labelled_metrics_by_hand() {
        // Row 0: label 0 scores highest. Row 1: label 2 is third of six. Row 2: label 5 is last.
        let o = outs(
            3,
            6,
            vec![
                3.0, 1.0, 0.0, 0.0, 0.0, 0.0, //
                5.0, 4.0, 3.0, 2.0, 1.0, 0.0, //
                5.0, 4.0, 3.0, 2.0, 1.0, 0.0,
            ],
        );
        let m = score(&o, 3, Some(&[0, 2, 5]), None).unwrap();
        assert_eq!(m.accuracy, Some(1.0 / 3.0));
        assert_eq!(m.top5, Some(2.0 / 3.0));
        // Cross-entropy by hand: log Σ exp(row) − row[label].
        let ce = |row: &[f64], l: usize| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[l];
        let r0 = [3.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let r1 = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        let want = (ce(&r0, 0) + ce(&r1, 2) + ce(&r1, 5)) / 3.0;
        assert!((m.loss.unwrap() - want).abs() < 1e-12);
        assert!(m.fidelity.is_none());
    }

    #[test]
    fn top5_only_beyond_five_classes() {
        let o = outs(1, 5, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        let m = score(&o, 1, Some(&[4]), None).unwrap();
        assert_eq!(m.top5, None);
        assert_eq!(m.accuracy, Some(1.0));
    }

    #[test]
    fn labels_out_of_range_and_wrong_count_are_errors() {
        let o = outs(2, 3, vec![0.0; 6]);
        let e = score(&o, 2, Some(&[0, 3]), None).unwrap_err().to_string();
        assert!(e.contains("label 1 is 3") && e.contains("3 classes"), "{e}");
        let e = score(&o, 2, Some(&[0]), None).unwrap_err().to_string();
        assert!(e.contains("1 labels") && e.contains("2 output rows"), "{e}");
    }

    #[test]
    fn fidelity_by_hand() {
        let dense = outs(2, 2, vec![1.0, 0.0, 0.0, 2.0]);
        // Row 0 turned 90° (cosine 0, argmax moves), row 1 scaled (cosine 1, argmax stays).
        let pruned = outs(2, 2, vec![0.0, 1.0, 0.0, 1.0]);
        let f = score(&pruned, 2, None, Some(&dense))
            .unwrap()
            .fidelity
            .unwrap();
        assert!((f.cosine - 0.5).abs() < 1e-12);
        assert_eq!(f.top1_agreement, 0.5);
        // ‖(−1, 1, 0, −1)‖ / ‖(1, 0, 0, 2)‖ = √3 / √5.
        assert!((f.rel_l2 - (3.0f64 / 5.0).sqrt()).abs() < 1e-12);
        let same = score(&dense, 2, None, Some(&dense))
            .unwrap()
            .fidelity
            .unwrap();
        assert_eq!(
            (same.cosine, same.rel_l2, same.top1_agreement),
            (1.0, 0.0, 1.0)
        );
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }
}
