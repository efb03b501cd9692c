//! The selected layer's mask as a zoomable texture.
//!
//! The panel decides which region of the tensor's 2-D view it shows and at how many cells;
//! the worker downsamples (each cell = fraction kept) and the panel paints the answer. While
//! a new answer is on its way the old one stays drawn at its own coordinates.

use std::sync::Arc;

use egui::{
    Color32, ColorImage, Pos2, Rect, RichText, Sense, Stroke, TextureHandle, TextureOptions, Ui,
    Vec2, pos2, vec2,
};

use super::app::ModelView;
use super::theme;
use crate::worker::{HeatmapRequest, HeatmapSnapshot};

/// The fewest rows or columns a zoomed view shows.
const MIN_SPAN: f64 = 4.0;
/// The most cells requested per side, whatever the window size.
const MAX_CELLS: usize = 1024;

#[derive(Default)]
pub struct HeatmapPanel {
    tensor: Option<usize>,
    /// Visible region in view coordinates: rows `r0..r1`, columns `c0..c1`.
    view: Option<[f64; 4]>,
    texture: Option<(TextureHandle, Arc<HeatmapSnapshot>)>,
    hover: Option<String>,
}

impl HeatmapPanel {
    pub fn reset_view(&mut self) {
        self.view = None;
    }

    /// Draws the panel and returns the region it wants computed.
    pub fn ui(
        &mut self,
        ui: &mut Ui,
        model: &ModelView,
        selected: Option<usize>,
    ) -> Option<HeatmapRequest> {
        let t = selected?;
        let info = model.snapshot.tensors.get(t)?;
        if !info.analysable || info.numel == 0 {
            ui.label(format!(
                "{}: nothing to draw for a {} tensor of {} values.",
                info.name, info.dtype, info.numel
            ));
            return None;
        }
        let (rows, cols) = view_dims(&info.shape);
        if self.tensor != Some(t) {
            self.tensor = Some(t);
            self.view = None;
            self.hover = None;
        }
        let full = [0.0, rows as f64, 0.0, cols as f64];
        let mut view = self.view.unwrap_or(full);

        ui.horizontal(|ui| {
            ui.label(RichText::new("Mask").strong()).on_hover_text(
                "Where the cut falls: each cell is the fraction of its weights that are kept (dark = all pruned, yellow = all kept).",
            );
            let layout = match info.shape.len() {
                4 => format!(
                    "[out {}, in·kh·kw {}] — each block of {} columns is one input channel's kernel",
                    rows,
                    cols,
                    info.shape[2] * info.shape[3]
                ),
                n if n > 2 => format!("[{rows} × {cols}] (leading dims flattened)"),
                _ => format!("[out {rows} × in {cols}]"),
            };
            ui.label(RichText::new(layout).weak());
            if self.view.is_some() && ui.small_button("Fit").on_hover_text("Show the whole tensor again (or double-click the map).").clicked() {
                view = full;
                self.view = None;
            }
        });
        legend_ui(ui);

        let size =
            ui.available_size() - vec2(0.0, ui.text_style_height(&egui::TextStyle::Body) + 6.0);
        let (area, response) =
            ui.allocate_exact_size(size.max(vec2(32.0, 32.0)), Sense::click_and_drag());
        let region = region_of(view);
        let max_w = (area.width().max(1.0) as usize).min(MAX_CELLS);
        let max_h = (area.height().max(1.0) as usize).min(MAX_CELLS);
        let disp = display_rect(area, region.1.len(), region.0.len());

        // Interaction: drag pans, scroll zooms around the pointer, double-click fits.
        if response.double_clicked() {
            self.view = None;
            view = full;
        } else {
            if response.dragged() {
                let d = response.drag_delta();
                let dr = -(d.y as f64) / disp.height() as f64 * (view[1] - view[0]);
                let dc = -(d.x as f64) / disp.width() as f64 * (view[3] - view[2]);
                view = pan(view, dr, dc, rows as f64, cols as f64);
                self.view = Some(view);
            }
            if let Some(p) = response.hover_pos() {
                let (scroll, zoom) = ui.input(|i| (i.smooth_scroll_delta.y, i.zoom_delta()));
                let factor = (-(scroll as f64) * 0.003).exp() / zoom as f64;
                if (factor - 1.0).abs() > 1e-6 {
                    let (pr, pc) = to_view(disp, view, p);
                    view = zoom_view(view, factor, pr, pc, rows as f64, cols as f64);
                    self.view = Some(view);
                }
            }
        }

        let painter = ui.painter_at(area);
        painter.rect_filled(area, 0.0, ui.visuals().extreme_bg_color);
        let snap = model.heatmap.as_ref().filter(|h| h.request.tensor == t);
        if let Some(s) = snap
            && self
                .texture
                .as_ref()
                .is_none_or(|(_, old)| !Arc::ptr_eq(old, s))
        {
            let image = ColorImage::new(
                [s.view.grid_w.max(1), s.view.grid_h.max(1)],
                s.view
                    .kept_fraction
                    .iter()
                    .map(|&f| theme::kept_colour(f))
                    .collect(),
            );
            match &mut self.texture {
                Some((tex, old)) => {
                    tex.set(image, TextureOptions::NEAREST);
                    *old = s.clone();
                }
                None => {
                    let tex = ui
                        .ctx()
                        .load_texture("mask-heatmap", image, TextureOptions::NEAREST);
                    self.texture = Some((tex, s.clone()));
                }
            }
        }
        if let Some((tex, s)) = self.texture.as_ref().filter(|(_, s)| s.request.tensor == t) {
            let v = &s.view;
            let rect = Rect::from_min_max(
                to_screen(disp, view, v.rows.start as f64, v.cols.start as f64),
                to_screen(disp, view, v.rows.end as f64, v.cols.end as f64),
            );
            painter.image(
                tex.id(),
                rect,
                Rect::from_min_max(Pos2::ZERO, pos2(1.0, 1.0)),
                Color32::WHITE,
            );
            // Kernel blocks of conv weights, when they are wide enough to see.
            if let Some(k) = v.block_cols {
                let px_per_col = disp.width() as f64 / (view[3] - view[2]);
                if px_per_col * k as f64 >= 6.0 {
                    let first = (view[2] / k as f64).ceil() as usize * k;
                    let stroke = Stroke::new(1.0, Color32::from_black_alpha(140));
                    for c in (first..view[3].ceil() as usize).step_by(k) {
                        let x = to_screen(disp, view, 0.0, c as f64).x;
                        painter.line_segment([pos2(x, disp.top()), pos2(x, disp.bottom())], stroke);
                    }
                }
            }
            self.hover = response.hover_pos().filter(|p| rect.contains(*p)).map(|p| {
                let (r, c) = to_view(disp, view, p);
                describe_cell(s, r.max(0.0) as usize, c.max(0.0) as usize, &info.shape)
            });
        } else {
            painter.text(
                area.center(),
                egui::Align2::CENTER_CENTER,
                "Computing the mask…",
                egui::FontId::proportional(14.0),
                ui.visuals().weak_text_color(),
            );
        }
        ui.label(self.hover.clone().unwrap_or_else(|| {
            "Hover a cell to inspect it · scroll to zoom · drag to pan · double-click to fit".into()
        }));

        let region = region_of(view);
        Some(HeatmapRequest {
            tensor: t,
            rows: region.0,
            cols: region.1,
            max_w,
            max_h,
        })
    }
}

/// The 2-D view of a tensor: [out, in·kh·kw] for conv weights, [d0, rest] in general.
pub fn view_dims(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    }
}

fn region_of(v: [f64; 4]) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let r0 = v[0].floor().max(0.0) as usize;
    let c0 = v[2].floor().max(0.0) as usize;
    let r1 = (v[1].ceil() as usize).max(r0 + 1);
    let c1 = (v[3].ceil() as usize).max(c0 + 1);
    (r0..r1, c0..c1)
}

/// Square cells when the whole region fits at one pixel or more per weight; otherwise fill.
fn display_rect(area: Rect, cols: usize, rows: usize) -> Rect {
    let cw = area.width() / cols.max(1) as f32;
    let ch = area.height() / rows.max(1) as f32;
    if cw >= 1.0 && ch >= 1.0 {
        let cell = cw.min(ch);
        Rect::from_min_size(area.min, vec2(cell * cols as f32, cell * rows as f32))
    } else {
        area
    }
}

fn to_screen(disp: Rect, view: [f64; 4], r: f64, c: f64) -> Pos2 {
    let x = disp.left() as f64 + (c - view[2]) / (view[3] - view[2]) * disp.width() as f64;
    let y = disp.top() as f64 + (r - view[0]) / (view[1] - view[0]) * disp.height() as f64;
    pos2(x as f32, y as f32)
}

fn to_view(disp: Rect, view: [f64; 4], p: Pos2) -> (f64, f64) {
    let Vec2 { x, y } = p - disp.min;
    let r = view[0] + y as f64 / disp.height() as f64 * (view[1] - view[0]);
    let c = view[2] + x as f64 / disp.width() as f64 * (view[3] - view[2]);
    (r, c)
}

fn pan(v: [f64; 4], dr: f64, dc: f64, rows: f64, cols: f64) -> [f64; 4] {
    let shift = |a: f64, b: f64, d: f64, max: f64| {
        let d = d.clamp(-a, max - b);
        (a + d, b + d)
    };
    let (r0, r1) = shift(v[0], v[1], dr, rows);
    let (c0, c1) = shift(v[2], v[3], dc, cols);
    [r0, r1, c0, c1]
}

/// Scales the view by `factor` (< 1 zooms in) keeping the point (pr, pc) where it is.
fn zoom_view(v: [f64; 4], factor: f64, pr: f64, pc: f64, rows: f64, cols: f64) -> [f64; 4] {
    let axis = |a: f64, b: f64, p: f64, max: f64| {
        let span = ((b - a) * factor).clamp(MIN_SPAN.min(max), max);
        let t = if b > a {
            ((p - a) / (b - a)).clamp(0.0, 1.0)
        } else {
            0.5
        };
        let mut a2 = p - t * span;
        a2 = a2.clamp(0.0, max - span);
        (a2, a2 + span)
    };
    let (r0, r1) = axis(v[0], v[1], pr, rows);
    let (c0, c1) = axis(v[2], v[3], pc, cols);
    [r0, r1, c0, c1]
}

/// The grid cell of `s` that holds view position (r, c).
fn cell_of(s: &HeatmapSnapshot, r: usize, c: usize) -> Option<(usize, usize)> {
    let v = &s.view;
    if !v.rows.contains(&r) || !v.cols.contains(&c) {
        return None;
    }
    let find = |start: usize,
                len: usize,
                cells: usize,
                x: usize,
                span: &dyn Fn(usize) -> std::ops::Range<usize>| {
        let mut g = ((x - start) * cells / len.max(1)).min(cells.saturating_sub(1));
        while g + 1 < cells && span(g).end <= x {
            g += 1;
        }
        while g > 0 && span(g).start > x {
            g -= 1;
        }
        g
    };
    let gy = find(v.rows.start, v.rows.len(), v.grid_h, r, &|g| v.cell_rows(g));
    let gx = find(v.cols.start, v.cols.len(), v.grid_w, c, &|g| v.cell_cols(g));
    Some((gy, gx))
}

fn describe_cell(s: &HeatmapSnapshot, r: usize, c: usize, shape: &[usize]) -> String {
    let Some((gy, gx)) = cell_of(s, r, c) else {
        return String::new();
    };
    let v = &s.view;
    let i = gy * v.grid_w + gx;
    let kept = v.kept_fraction.get(i).copied().unwrap_or(0.0);
    match &v.values {
        Some(values) => {
            let w = values.get(i).copied().unwrap_or(f32::NAN);
            let place = if shape.len() == 4 {
                let k = shape[2] * shape[3];
                format!(
                    "out {r}, in {} at ({}, {})",
                    c / k,
                    (c % k) / shape[3],
                    c % shape[3]
                )
            } else {
                format!("row {r}, col {c}")
            };
            let state = if kept >= 1.0 { "kept" } else { "pruned" };
            format!("{place}: weight {w:.6} — {state}")
        }
        None => {
            let rr = v.cell_rows(gy);
            let cc = v.cell_cols(gx);
            format!(
                "rows {}–{}, cols {}–{}: {:.1}% kept ({} weights per cell)",
                rr.start,
                rr.end - 1,
                cc.start,
                cc.end - 1,
                kept * 100.0,
                rr.len() * cc.len()
            )
        }
    }
}

fn legend_ui(ui: &mut Ui) {
    ui.horizontal(|ui| {
        ui.label(RichText::new("all pruned").small());
        let (rect, _) = ui.allocate_exact_size(vec2(120.0, 10.0), Sense::hover());
        let n = 24;
        for i in 0..n {
            let x0 = rect.left() + rect.width() * i as f32 / n as f32;
            let x1 = rect.left() + rect.width() * (i + 1) as f32 / n as f32;
            let r = Rect::from_min_max(pos2(x0, rect.top()), pos2(x1, rect.bottom()));
            ui.painter()
                .rect_filled(r, 0.0, theme::kept_colour(i as f32 / (n - 1) as f32));
        }
        ui.label(RichText::new("all kept").small());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_weights_are_laid_out_out_by_in_kernel() {
        assert_eq!(view_dims(&[16, 3, 3, 3]), (16, 27));
        assert_eq!(view_dims(&[10, 64]), (10, 64));
        assert_eq!(view_dims(&[7]), (1, 7));
    }

    #[test]
    fn zoom_keeps_the_point_under_the_pointer_and_stays_inside() {
        let v = [0.0, 100.0, 0.0, 200.0];
        let z = zoom_view(v, 0.5, 25.0, 50.0, 100.0, 200.0);
        assert_eq!(z, [12.5, 62.5, 25.0, 125.0]);
        let out = zoom_view(z, 10.0, 25.0, 50.0, 100.0, 200.0);
        assert_eq!(out, v);
        let tiny = zoom_view(v, 1e-6, 99.0, 199.0, 100.0, 200.0);
        // Clamped to the minimum span, with (99, 199) still at 99% of the way across.
        let want = [95.04, 99.04, 195.02, 199.02];
        assert!(
            tiny.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-9),
            "{tiny:?}"
        );
    }

    #[test]
    fn pan_stops_at_the_edges() {
        let v = [10.0, 20.0, 10.0, 20.0];
        assert_eq!(pan(v, -50.0, 500.0, 100.0, 100.0), [0.0, 10.0, 90.0, 100.0]);
    }
}
