//! The dataset gallery: the first test samples with their label and the dense and pruned
//! models' predictions, the ones pruning changed framed. It shows a student what a cut breaks.

use egui::{Color32, Context, RichText, Sense, Stroke, StrokeKind, Ui, vec2};

use super::app::AppState;
use super::theme;

/// Side of one drawn sample image, in points.
const CELL: f32 = 52.0;

#[derive(Default)]
pub struct GalleryPanel {
    pub open: bool,
    only_changed: bool,
}

impl GalleryPanel {
    pub fn ui(&mut self, ctx: &Context, state: &AppState) {
        if !self.open {
            return;
        }
        let mut open = self.open;
        egui::Window::new("Dataset samples")
            .open(&mut open)
            .default_pos([760.0, 90.0])
            .default_width(600.0)
            .default_height(520.0)
            .resizable(true)
            .show(ctx, |ui| {
                // Wrap to the window's width instead of growing the window to the content's.
                ui.set_max_width(ui.available_width().min(1200.0));
                self.contents(ui, state)
            });
        self.open = open;
    }

    fn contents(&mut self, ui: &mut Ui, state: &AppState) {
        let Some(m) = state.model.as_ref() else {
            ui.label("No model open.");
            return;
        };
        let Some(view) = m.eval.samples.as_ref() else {
            ui.label(
                "This model is not evaluated on data, so there are no predictions to show. \
                 Choose data with File → Evaluation data…",
            );
            return;
        };
        let preds = m
            .metrics
            .as_ref()
            .filter(|_| state.metrics_current())
            .and_then(|s| s.predictions.clone());
        ui.label(format!(
            "The first {} samples of the evaluation data: the label (if any), then what the \
             dense model predicts → what the pruned model predicts. A frame marks a sample \
             whose prediction the pruning changed.",
            view.count
        ));
        let Some(p) = preds else {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Waiting for predictions at the current settings…");
            });
            return;
        };
        let changed = |i: usize| p.dense[i] != p.pruned[i];
        let n = p.dense.len().min(view.count);
        let n_changed = (0..n).filter(|&i| changed(i)).count();
        ui.horizontal(|ui| {
            ui.label(format!("{n_changed} of {n} predictions changed."));
            if let Some(labels) = &view.labels {
                let wrong = |v: &[u32]| (0..n).filter(|&i| v[i] != labels[i]).count();
                ui.label(format!(
                    "Wrong: dense {}, pruned {}.",
                    wrong(&p.dense),
                    wrong(&p.pruned)
                ));
            }
            ui.checkbox(&mut self.only_changed, "Only changed")
                .on_hover_text("Show only the samples whose prediction the pruning changed.");
        });
        ui.separator();
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    for i in 0..n {
                        if self.only_changed && !changed(i) {
                            continue;
                        }
                        let label = view.labels.as_ref().map(|l| l[i]);
                        cell(ui, view, i, label, p.dense[i], p.pruned[i]);
                    }
                });
            });
    }
}

fn cell(
    ui: &mut Ui,
    view: &crate::eval::SampleView,
    i: usize,
    label: Option<u32>,
    dense: u32,
    pruned: u32,
) {
    let changed = dense != pruned;
    let wrong = label.is_some_and(|l| l != pruned);
    let text = format!(
        "sample {i}: {}dense {dense}, pruned {pruned}",
        label.map_or(String::new(), |l| format!("label {l}, "))
    );
    // A fixed-size slot, so that the wrapping row knows where to break.
    ui.allocate_ui(vec2(CELL + 8.0, CELL + 20.0), |ui| {
        ui.set_width(CELL + 8.0);
        let (rect, resp) = ui.allocate_exact_size(vec2(CELL + 6.0, CELL + 6.0), Sense::hover());
        let name = text.clone();
        resp.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Image, true, &name));
        let inner = rect.shrink(3.0);
        let painter = ui.painter_at(rect);
        if let Some((h, w)) = view.image {
            let px = &view.pixels[i * h * w..(i + 1) * h * w];
            let (cw, ch) = (inner.width() / w as f32, inner.height() / h as f32);
            for (k, &v) in px.iter().enumerate() {
                let g = (255.0 * (1.0 - v.clamp(0.0, 1.0))) as u8;
                let r = egui::Rect::from_min_size(
                    inner.min + vec2((k % w) as f32 * cw, (k / w) as f32 * ch),
                    vec2(cw + 0.5, ch + 0.5),
                );
                painter.rect_filled(r, 0.0, Color32::from_gray(g));
            }
        } else {
            painter.rect_filled(inner, 2.0, ui.visuals().faint_bg_color);
            painter.text(
                inner.center(),
                egui::Align2::CENTER_CENTER,
                format!("#{i}"),
                egui::FontId::proportional(12.0),
                ui.visuals().text_color(),
            );
        }
        if changed {
            let colour = if wrong { theme::BAD } else { theme::GOOD };
            painter.rect_stroke(
                rect.shrink(1.0),
                2.0,
                Stroke::new(2.5, colour),
                StrokeKind::Inside,
            );
        }
        resp.on_hover_text(format!(
            "{text}{}",
            if changed {
                if wrong {
                    " — pruning broke this one"
                } else {
                    " — pruning changed this one"
                }
            } else {
                ""
            }
        ));
        let line = match label {
            Some(l) => format!("{l}: {dense}→{pruned}"),
            None => format!("{dense}→{pruned}"),
        };
        let rich = RichText::new(line).small();
        let rich = if changed {
            rich.color(theme::BAD).strong()
        } else {
            rich
        };
        ui.label(rich).on_hover_text(text);
    });
}
