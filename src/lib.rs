//! prunescope: open a neural network, shape its sparsity, see what each cut costs.
//!
//! The crate has three floors and the arrows point down:
//! - [`ui`] (egui panels and the eframe app) sends commands and draws snapshots;
//! - [`worker`] owns the model on a background thread and runs jobs;
//! - the core ([`model`], [`prune`], [`analysis`], [`eval`], [`data`], [`train`], [`export`],
//!   [`bench`]) is plain functions and types that know nothing of egui or threads.
//!
//! The CLI ([`cli`]) is a second face on the same core.

pub mod analysis;
pub mod bench;
pub mod cli;
pub mod data;
pub mod eval;
pub mod export;
pub mod fuzzing;
pub mod graph;
pub mod history;
pub mod kernels;
pub mod latency;
pub mod model;
pub mod progress;
pub mod prune;
pub mod sample;
pub mod sensitivity;
pub mod train;
#[cfg(feature = "gui")]
pub mod ui;
pub mod util;
pub mod worker;
