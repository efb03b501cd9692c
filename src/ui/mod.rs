//! The desktop app: eframe panels over snapshots from the worker. Nothing here does heavy
//! work; everything long runs on the worker thread.

mod app;
mod controls;
mod criteria;
mod dialogs;
mod gallery;
mod heatmap_view;
mod history;
mod latency;
mod plots;
mod recovery;
mod sensitivity;
mod summary;
mod table;
pub mod theme;

pub use app::{App, AppState, JobView, ModelView, Prefs};
pub use summary::non_zeros;

use std::path::PathBuf;

/// Writes an image as an 8-bit RGBA PNG, atomically.
pub fn write_png(path: &std::path::Path, image: &egui::ColorImage) -> Result<(), String> {
    let [w, h] = image.size;
    let mut bytes = Vec::with_capacity(w * h * 4);
    for c in &image.pixels {
        bytes.extend_from_slice(&c.to_srgba_unmultiplied());
    }
    crate::util::atomic_write(path, |out| {
        let mut enc = png::Encoder::new(out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(std::io::Error::other)?;
        writer
            .write_image_data(&bytes)
            .map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
    .map_err(|e| crate::util::io_message(&e))
}

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
