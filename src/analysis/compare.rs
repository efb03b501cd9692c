//! Two criteria's masks side by side: per layer, how much the weights they prune overlap, and
//! where in the layer they disagree.

use crate::model::Model;
use crate::prune::{Mask, MaskSet};

/// One layer's overlap between mask sets A and B.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerOverlap {
    pub tensor: usize,
    pub pruned_a: u64,
    pub pruned_b: u64,
    /// Weights both prune.
    pub both: u64,
}

impl LayerOverlap {
    /// Intersection over union of the pruned sets (1 when neither prunes anything).
    pub fn iou(&self) -> f64 {
        let union = self.pruned_a + self.pruned_b - self.both;
        if union == 0 {
            1.0
        } else {
            self.both as f64 / union as f64
        }
    }
}

fn pruned_words(m: Option<&Mask>, n: usize) -> Vec<u64> {
    match m {
        Some(m) => m.words().iter().map(|w| !w).collect(),
        None => vec![0; n.div_ceil(64)],
    }
}

/// The overlap of every tensor either set masks, in model order.
pub fn mask_overlap(model: &Model, a: &MaskSet, b: &MaskSet) -> Vec<LayerOverlap> {
    let mut out = Vec::new();
    for (t, e) in model.tensors.iter().enumerate() {
        let (ma, mb) = (a.get(&e.name), b.get(&e.name));
        if ma.is_none() && mb.is_none() {
            continue;
        }
        let (pa, pb) = (pruned_words(ma, e.numel), pruned_words(mb, e.numel));
        // Bits past the tensor's end in the last word are not weights.
        let tail = if e.numel % 64 == 0 {
            u64::MAX
        } else {
            (1u64 << (e.numel % 64)) - 1
        };
        let last = pa.len().saturating_sub(1);
        let count = |f: &dyn Fn(u64, u64) -> u64| -> u64 {
            pa.iter()
                .zip(&pb)
                .enumerate()
                .map(|(i, (&x, &y))| {
                    let m = if i == last { tail } else { u64::MAX };
                    (f(x, y) & m).count_ones() as u64
                })
                .sum()
        };
        out.push(LayerOverlap {
            tensor: t,
            pruned_a: count(&|x, _| x),
            pruned_b: count(&|_, y| y),
            both: count(&|x, y| x & y),
        });
    }
    out
}

/// Where two masks of one tensor disagree, on its 2-D view downsampled to at most
/// `max_w × max_h` cells: per cell the fraction of weights only A prunes and only B prunes.
#[derive(Clone, Debug, PartialEq)]
pub struct Disagreement {
    pub grid_w: usize,
    pub grid_h: usize,
    pub only_a: Vec<f32>,
    pub only_b: Vec<f32>,
    pub both: Vec<f32>,
}

/// `dims` are the tensor's 2-D view (see [`crate::model::matrix_dims`]).
pub fn disagreement(
    dims: (usize, usize),
    a: Option<&Mask>,
    b: Option<&Mask>,
    max_w: usize,
    max_h: usize,
) -> Disagreement {
    let (rows, cols) = dims;
    let (gw, gh) = (cols.min(max_w.max(1)), rows.min(max_h.max(1)));
    let mut only_a = vec![0f32; gw * gh];
    let mut only_b = vec![0f32; gw * gh];
    let mut both = vec![0f32; gw * gh];
    let mut count = vec![0f32; gw * gh];
    let pruned = |m: Option<&Mask>, i: usize| m.is_some_and(|m| !m.kept(i));
    for r in 0..rows {
        let gy = r * gh / rows.max(1);
        for c in 0..cols {
            let i = r * cols + c;
            let g = gy * gw + c * gw / cols.max(1);
            let (x, y) = (pruned(a, i), pruned(b, i));
            count[g] += 1.0;
            only_a[g] += (x && !y) as u8 as f32;
            only_b[g] += (y && !x) as u8 as f32;
            both[g] += (x && y) as u8 as f32;
        }
    }
    for g in 0..gw * gh {
        let n = count[g].max(1.0);
        only_a[g] /= n;
        only_b[g] /= n;
        both[g] /= n;
    }
    Disagreement {
        grid_w: gw,
        grid_h: gh,
        only_a,
        only_b,
        both,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_counts_match_a_plain_loop() {
        let mut rng = crate::util::SplitMix64::new(5);
        for n in [1usize, 63, 64, 65, 200] {
            let m = Model::from_f32_tensors(
                "t",
                vec![
                    ("w".into(), vec![n], vec![1.0; n]),
                    ("v".into(), vec![n], vec![1.0; n]),
                ],
            );
            let ka: Vec<bool> = (0..n).map(|_| rng.next_f64() < 0.5).collect();
            let kb: Vec<bool> = (0..n).map(|_| rng.next_f64() < 0.3).collect();
            let (mut a, mut b) = (MaskSet::new(), MaskSet::new());
            a.insert(&m, "w", Mask::from_kept(&ka)).unwrap();
            b.insert(&m, "w", Mask::from_kept(&kb)).unwrap();
            // Only B masks "v": A keeps all of it.
            b.insert(&m, "v", Mask::from_kept(&kb)).unwrap();
            let o = mask_overlap(&m, &a, &b);
            let count = |f: &dyn Fn(usize) -> bool| (0..n).filter(|&i| f(i)).count() as u64;
            let w = o.iter().find(|l| m.tensors[l.tensor].name == "w").unwrap();
            assert_eq!(w.pruned_a, count(&|i| !ka[i]));
            assert_eq!(w.pruned_b, count(&|i| !kb[i]));
            assert_eq!(w.both, count(&|i| !ka[i] && !kb[i]));
            let v = o.iter().find(|l| m.tensors[l.tensor].name == "v").unwrap();
            assert_eq!((v.pruned_a, v.both), (0, 0));
            assert_eq!(v.iou(), if v.pruned_b == 0 { 1.0 } else { 0.0 });
        }
    }

    #[test]
    fn disagreement_cells_split_each_weight_once() {
        let m = Model::from_f32_tensors("t", vec![("w".into(), vec![2, 4], vec![1.0; 8])]);
        let a = Mask::from_kept(&[false, false, true, true, true, true, false, true]);
        let b = Mask::from_kept(&[false, true, false, true, true, true, true, true]);
        let dims = m.tensors[0].matrix_dims();
        let d = disagreement(dims, Some(&a), Some(&b), 4, 2);
        assert_eq!(d.both, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(d.only_a, vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(d.only_b, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // Downsampled to one cell per row: fractions of its four weights.
        let d = disagreement(dims, Some(&a), Some(&b), 1, 2);
        assert_eq!(d.only_a, vec![0.25, 0.25]);
        assert_eq!(d.only_b, vec![0.25, 0.0]);
    }
}
