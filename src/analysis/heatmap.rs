//! Mask heatmaps: a region of a tensor's 2-D view, downsampled to at most a given grid, each
//! cell holding the fraction of its weights that are kept.

use std::ops::Range;

use crate::model::Model;
use crate::prune::Mask;

#[derive(Clone, Debug, PartialEq)]
pub struct HeatmapView {
    pub tensor: usize,
    /// Rows and columns of the 2-D view that this grid covers.
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    pub grid_w: usize,
    pub grid_h: usize,
    /// `grid_h × grid_w`, row-major; 1.0 = all kept.
    pub kept_fraction: Vec<f32>,
    /// The weights themselves when each cell is exactly one weight.
    pub values: Option<Vec<f32>>,
    /// Kernel block width for conv weights (columns per input channel).
    pub block_cols: Option<usize>,
    pub total_rows: usize,
    pub total_cols: usize,
}

impl HeatmapView {
    /// The range of view rows covered by grid row `gy` (likewise columns).
    pub fn cell_rows(&self, gy: usize) -> Range<usize> {
        span(&self.rows, self.grid_h, gy)
    }
    pub fn cell_cols(&self, gx: usize) -> Range<usize> {
        span(&self.cols, self.grid_w, gx)
    }
    pub fn one_to_one(&self) -> bool {
        self.values.is_some()
    }
}

fn span(r: &Range<usize>, cells: usize, c: usize) -> Range<usize> {
    let len = r.len();
    let a = r.start + c * len / cells;
    let b = r.start + (c + 1) * len / cells;
    a..b.max(a + 1).min(r.end.max(a + 1))
}

/// Builds the heatmap of `rows × cols` of tensor `t`'s view, at most `max_w × max_h` cells.
pub fn heatmap(
    model: &Model,
    t: usize,
    mask: Option<&Mask>,
    rows: Range<usize>,
    cols: Range<usize>,
    max_w: usize,
    max_h: usize,
) -> HeatmapView {
    let e = &model.tensors[t];
    let (total_rows, total_cols) = e.matrix_dims();
    let rows = rows.start.min(total_rows)..rows.end.min(total_rows);
    let cols = cols.start.min(total_cols)..cols.end.min(total_cols);
    let grid_h = rows.len().min(max_h.max(1));
    let grid_w = cols.len().min(max_w.max(1));
    let mut kept = vec![0u32; grid_w * grid_h];
    let mut count = vec![0u32; grid_w * grid_h];
    let one_to_one = grid_h == rows.len() && grid_w == cols.len();
    let mut values = one_to_one.then(|| vec![0f32; grid_w * grid_h]);
    // Column → grid column, computed once per request.
    let col_cell: Vec<usize> = (0..cols.len())
        .map(|c| c * grid_w / cols.len().max(1))
        .collect();
    let mut row_vals = vec![0f32; cols.len()];
    for r in rows.clone() {
        let gy = (r - rows.start) * grid_h / rows.len().max(1);
        let base = r * total_cols + cols.start;
        if let Some(v) = values.as_mut() {
            model.read_f32(t, base, &mut row_vals);
            v[gy * grid_w..(gy + 1) * grid_w].copy_from_slice(&row_vals);
        }
        for (c, &gx) in col_cell.iter().enumerate() {
            let i = gy * grid_w + gx;
            count[i] += 1;
            kept[i] += mask.is_none_or(|m| m.kept(base + c)) as u32;
        }
    }
    HeatmapView {
        tensor: t,
        rows,
        cols,
        grid_w,
        grid_h,
        kept_fraction: kept
            .iter()
            .zip(&count)
            .map(|(&k, &n)| if n == 0 { 1.0 } else { k as f32 / n as f32 })
            .collect(),
        values,
        block_cols: e.block_cols(),
        total_rows,
        total_cols,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampled_cells_hold_fraction_kept() {
        // A 4×4 matrix with the left half pruned, shown as 2×2 cells.
        let m = Model::from_f32_tensors(
            "t",
            vec![("w".into(), vec![4, 4], (0..16).map(|i| i as f32).collect())],
        );
        let kept: Vec<bool> = (0..16).map(|i| i % 4 >= 2).collect();
        let mask = Mask::from_kept(&kept);
        let h = heatmap(&m, 0, Some(&mask), 0..4, 0..4, 2, 2);
        assert_eq!((h.grid_w, h.grid_h), (2, 2));
        assert_eq!(h.kept_fraction, vec![0.0, 1.0, 0.0, 1.0]);
        assert!(h.values.is_none());
        // Zoomed into rows 1..3, cols 1..3 at full resolution: values come along.
        let z = heatmap(&m, 0, Some(&mask), 1..3, 1..3, 8, 8);
        assert_eq!(z.values.as_deref(), Some(&[5.0, 6.0, 9.0, 10.0][..]));
        assert_eq!(z.kept_fraction, vec![0.0, 1.0, 0.0, 1.0]);
        assert_eq!(z.cell_rows(1), 2..3);
    }

    #[test]
    fn conv_weights_are_laid_out_with_kernel_blocks() {
        let m = Model::from_f32_tensors("t", vec![("c".into(), vec![2, 3, 2, 2], vec![0.0; 24])]);
        let h = heatmap(&m, 0, None, 0..2, 0..12, 64, 64);
        assert_eq!((h.total_rows, h.total_cols, h.block_cols), (2, 12, Some(4)));
    }
}
