//! The desktop app: eframe panels over snapshots from the worker. Nothing here does heavy
//! work; everything long runs on the worker thread.

mod app;
mod controls;
mod dialogs;
mod gallery;
mod heatmap_view;
mod plots;
mod summary;
mod table;
pub mod theme;

pub use app::{App, AppState, JobView, ModelView, Prefs};
pub use summary::non_zeros;

use std::path::PathBuf;

/// Opens the main window; `model` is opened at start (the bundled sample when `None`).
pub fn run_gui(model: Option<PathBuf>) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("prunescope")
            .with_inner_size([1400.0, 900.0])
            .with_min_inner_size([900.0, 600.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "prunescope",
        options,
        Box::new(move |cc| Ok(Box::new(App::new(cc, model)))),
    )
    .map_err(|e| anyhow::anyhow!("could not start the window: {e}"))
}
