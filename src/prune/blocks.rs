//! Block pruning: a tensor's 2-D view cut into b × b blocks (smaller at the right and bottom
//! edges), each scored by the mean of its weights' scores (magnitude: mean |w|; `l2`: the
//! root mean square), and whole blocks removed, lowest first, until each layer reaches its
//! target. Block-sparse kernels then skip every removed block.
//!
//! The blocks of each tensor are sorted once per (index, block size); a target is then a
//! binary search over the running count of weights the sorted blocks hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{
    Allocation, Criterion, LayerAlloc, Mask, Pattern, PruneSettings, ScoreIndex, score_of_key,
};
use crate::model::{DECODE_CHUNK, Model};

/// One tensor's blocks, lowest score first.
#[derive(Debug)]
pub struct TensorBlocks {
    b: usize,
    cols: usize,
    /// Blocks along the columns of the view.
    per_row: usize,
    /// Block ids (row-major over the block grid) in ascending (score, id) order.
    order: Vec<u32>,
    /// `prefix[j]`: weights in the first j blocks of `order` (`prefix[0] = 0`).
    prefix: Vec<u64>,
    rows: usize,
}

impl TensorBlocks {
    fn block_size(&self, id: usize) -> u64 {
        let (br, bc) = (id / self.per_row, id % self.per_row);
        let h = self.b.min(self.rows - br * self.b);
        let w = self.b.min(self.cols - bc * self.b);
        (h * w) as u64
    }

    /// How many of the lowest blocks to remove for about `target` weights: the prefix closest
    /// to it (the smaller one on a tie).
    pub fn blocks_for(&self, target: u64) -> usize {
        let j = self.prefix.partition_point(|&p| p < target);
        if j == 0 {
            return 0;
        }
        if j >= self.prefix.len() {
            return self.prefix.len() - 1;
        }
        if self.prefix[j] - target < target - self.prefix[j - 1] {
            j
        } else {
            j - 1
        }
    }

    pub fn pruned(&self, blocks: usize) -> u64 {
        self.prefix[blocks]
    }

    /// The mask with the first `blocks` blocks of the order removed.
    pub fn mask(&self, blocks: usize) -> Mask {
        let mut kept = vec![true; self.rows * self.cols];
        for &id in &self.order[..blocks] {
            let (br, bc) = (id as usize / self.per_row, id as usize % self.per_row);
            for r in br * self.b..((br + 1) * self.b).min(self.rows) {
                let row = &mut kept[r * self.cols..(r + 1) * self.cols];
                for k in &mut row[bc * self.b..((bc + 1) * self.b).min(self.cols)] {
                    *k = false;
                }
            }
        }
        Mask::from_kept(&kept)
    }
}

/// Sorted blocks of every analysable tensor, per block size, made on first use.
#[derive(Debug, Default)]
pub struct BlockCache(Mutex<HashMap<usize, Arc<Vec<Option<TensorBlocks>>>>>);

/// The blocks of side `b` of every analysable tensor of `index`'s model.
pub fn blocks_for(model: &Model, index: &ScoreIndex, b: usize) -> Arc<Vec<Option<TensorBlocks>>> {
    let cache = index.blocks();
    if let Some(v) = cache.0.lock().unwrap_or_else(|e| e.into_inner()).get(&b) {
        return v.clone();
    }
    let v: Arc<Vec<Option<TensorBlocks>>> = Arc::new(
        (0..model.tensors.len())
            .map(|t| (index.len(t) > 0).then(|| tensor_blocks(model, index, t, b)))
            .collect(),
    );
    cache
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(b, v.clone());
    v
}

fn tensor_blocks(model: &Model, index: &ScoreIndex, t: usize, b: usize) -> TensorBlocks {
    let e = &model.tensors[t];
    let (rows, cols) = e.matrix_dims();
    let b = b.max(1);
    let per_row = cols.div_ceil(b);
    let n_blocks = rows.div_ceil(b) * per_row;
    let mut sum = vec![0f64; n_blocks];
    let mut keys = vec![0u32; e.numel];
    let mut vals = vec![0f32; DECODE_CHUNK];
    for (c, chunk) in keys.chunks_mut(DECODE_CHUNK).enumerate() {
        index.fill_keys(model, t, c * DECODE_CHUNK, &mut vals, chunk);
    }
    let l2 = index.criterion == Criterion::L2;
    for (i, &k) in keys.iter().enumerate() {
        let (r, c) = (i / cols.max(1), i % cols.max(1));
        let s = score_of_key(k) as f64;
        // A NaN weight (key 0) counts as the lowest score there is: zero.
        let s = if s.is_nan() { 0.0 } else { s };
        sum[(r / b) * per_row + c / b] += if l2 { s * s } else { s };
    }
    let mut tb = TensorBlocks {
        b,
        cols,
        per_row,
        order: Vec::new(),
        prefix: Vec::new(),
        rows,
    };
    let score: Vec<f64> = (0..n_blocks)
        .map(|id| {
            let m = sum[id] / tb.block_size(id).max(1) as f64;
            if l2 { m.sqrt() } else { m }
        })
        .collect();
    let mut order: Vec<u32> = (0..n_blocks as u32).collect();
    order.sort_by(|&a, &c| {
        score[a as usize]
            .total_cmp(&score[c as usize])
            .then(a.cmp(&c))
    });
    let mut prefix = Vec::with_capacity(n_blocks + 1);
    prefix.push(0u64);
    for &id in &order {
        prefix.push(prefix.last().unwrap() + tb.block_size(id as usize));
    }
    tb.order = order;
    tb.prefix = prefix;
    tb
}

/// The weights tensor `t` should lose under `settings`.
fn target(model: &Model, settings: &PruneSettings, t: usize) -> u64 {
    let e = &model.tensors[t];
    (settings.layer_target(&e.name) * e.numel as f64).round() as u64
}

/// Every prunable tensor loses the whole blocks closest to its target: the global target in
/// every layer (block pruning is per layer), or the layer's own in layer-wise scope.
pub fn allocate(model: &Model, index: &ScoreIndex, settings: &PruneSettings) -> Allocation {
    let Pattern::Block { b } = settings.pattern else {
        unreachable!("block allocation for a block pattern")
    };
    let blocks = blocks_for(model, index, b);
    let mut a = Allocation::default();
    for t in 0..model.tensors.len() {
        if !settings.is_prunable(model, t) {
            continue;
        }
        let numel = model.tensors[t].numel;
        let pruned = blocks[t]
            .as_ref()
            .map_or(0, |tb| tb.pruned(tb.blocks_for(target(model, settings, t))));
        a.prunable += numel as u64;
        a.pruned += pruned;
        a.requested += target(model, settings, t);
        a.layers.push(LayerAlloc {
            tensor: t,
            numel,
            pruned: pruned as usize,
            threshold: None,
            capped: false,
        });
    }
    // Whole blocks round each layer; that is the cut asked for, not a cap.
    a.requested = a.pruned;
    a
}

/// The mask of tensor `t` under a block pattern.
pub fn tensor_mask(model: &Model, index: &ScoreIndex, settings: &PruneSettings, t: usize) -> Mask {
    let Pattern::Block { b } = settings.pattern else {
        unreachable!("block masks for a block pattern")
    };
    match &blocks_for(model, index, b)[t] {
        Some(tb) => tb.mask(tb.blocks_for(target(model, settings, t))),
        None => Mask::all_kept(model.tensors[t].numel),
    }
}
