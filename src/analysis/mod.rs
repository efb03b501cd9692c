//! Derived views of a model and its masks: histograms, heatmaps and size estimates.

mod compare;
mod heatmap;
mod histogram;
mod sizes;

pub use compare::{Disagreement, LayerOverlap, disagreement, mask_overlap};
pub use heatmap::{HeatmapView, heatmap};
pub use histogram::{
    Histogram, HistogramSplit, all_histograms, all_histograms_with, histogram, split_histogram,
};
pub use sizes::{SizeReport, StorageSize, ZSTD_LEVEL, size_report, storage_sizes};
