//! The criteria window: two criteria at the same settings, side by side. Per layer, how much
//! of what they prune is the same (IoU); for the selected layer, where they disagree; and what
//! each cut measures. This is the view that shows why Wanda or LAMP differ from magnitude.

use egui::{Color32, Context, RichText, Sense, Ui};
use egui_plot::{Bar, BarChart, Plot};

use super::app::AppState;
use super::theme;
use crate::prune::Criterion;
use crate::worker::CriteriaComparison;

pub const TIP_COMPARE: &str = "Prune with the current criterion and with the one chosen here, at the same settings, and compare the two cuts layer by layer.";
pub const TIP_IOU: &str = "Intersection over union of the weights each criterion prunes in a layer: 1 = the same weights, 0 = none in common.";
const ONLY_A: Color32 = Color32::from_rgb(0xD5, 0x5E, 0x00);
const ONLY_B: Color32 = Color32::from_rgb(0x56, 0xB4, 0xE9);
const BOTH: Color32 = Color32::from_rgb(0x30, 0x30, 0x30);
const NEITHER: Color32 = Color32::from_rgb(0xF0, 0xE4, 0x42);

pub enum CriteriaAction {
    Compare(Criterion),
}

pub struct CriteriaPanel {
    pub open: bool,
    other: Criterion,
}

impl Default for CriteriaPanel {
    fn default() -> Self {
        CriteriaPanel {
            open: false,
            other: Criterion::Lamp,
        }
    }
}

impl CriteriaPanel {
    pub fn ui(&mut self, ctx: &Context, state: &AppState) -> Option<CriteriaAction> {
        if !self.open {
            return None;
        }
        let mut open = self.open;
        let mut action = None;
        egui::Window::new("Compare criteria")
            .open(&mut open)
            .default_pos([380.0, 80.0])
            .default_width(760.0)
            .default_height(620.0)
            .show(ctx, |ui| action = self.contents(ui, state));
        self.open = open;
        action
    }

    fn contents(&mut self, ui: &mut Ui, state: &AppState) -> Option<CriteriaAction> {
        let Some(model) = state.model.as_ref() else {
            ui.label("Open a model first.");
            return None;
        };
        let has_data = model.eval.evaluator.is_some();
        let mut action = None;
        ui.horizontal(|ui| {
            ui.label(format!(
                "Current criterion: {} at these settings ({}), against",
                state.settings.criterion.label(),
                state.settings.pattern
            ));
            egui::ComboBox::from_id_salt("other criterion")
                .selected_text(self.other.label())
                .show_ui(ui, |ui| {
                    for c in Criterion::ALL {
                        let why = super::controls::unusable(c, has_data, state.settings.pattern);
                        ui.add_enabled_ui(why.is_none(), |ui| {
                            ui.selectable_value(&mut self.other, c, c.label())
                                .on_hover_text(c.tooltip())
                                .on_disabled_hover_text(why.unwrap_or_default());
                        });
                    }
                });
            let busy = state.jobs.iter().any(|j| j.label == "Comparing criteria");
            if ui
                .add_enabled(!busy, egui::Button::new("Compare"))
                .on_hover_text(TIP_COMPARE)
                .clicked()
            {
                action = Some(CriteriaAction::Compare(self.other));
            }
        });
        let Some(c) = state.criteria.as_ref() else {
            ui.label(RichText::new("Choose a second criterion and press Compare.").weak());
            return action;
        };
        ui.separator();
        let [a, b] = c.criteria;
        metrics_line(ui, c);
        if c.settings != state.settings && c.settings.criterion == state.settings.criterion {
            ui.label(RichText::new("Settings changed since: press Compare again.").weak());
        }
        ui.label(RichText::new("Mask overlap (IoU) per layer").strong())
            .on_hover_text(TIP_IOU);
        ui.label(
            RichText::new(format!(
                "How many of the weights {} prunes {} prunes too, layer by layer: 1 = the same cut.",
                a.label(),
                b.label()
            ))
            .weak(),
        );
        let names: Vec<String> = c
            .overlap
            .iter()
            .map(|o| model.snapshot.tensors[o.tensor].name.clone())
            .collect();
        let bars: Vec<Bar> = c
            .overlap
            .iter()
            .enumerate()
            .map(|(i, o)| Bar::new(i as f64, o.iou()).width(0.7).name(&names[i]))
            .collect();
        Plot::new("criteria iou")
            .height(200.0)
            .include_y(0.0)
            .include_y(1.0)
            .y_axis_label("IoU")
            .x_axis_formatter(move |m, _| {
                let i = m.value.round();
                if (m.value - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .allow_scroll(false)
            .show(ui, |p| {
                p.bar_chart(BarChart::new("IoU", bars).color(theme::KEPT));
            });
        let Some(t) = state.selected else {
            ui.label("Select a layer in the table to see where the two cuts disagree.");
            return action;
        };
        let name = &model.snapshot.tensors[t].name;
        ui.label(RichText::new(format!("Where they disagree in {name}")).strong());
        ui.horizontal(|ui| {
            swatch(ui, ONLY_A, &format!("only {} prunes", a.label()));
            swatch(ui, ONLY_B, &format!("only {} prunes", b.label()));
            swatch(ui, BOTH, "both prune");
            swatch(ui, NEITHER, "both keep");
        });
        if c.masks[0].get(name).is_none() && c.masks[1].get(name).is_none() {
            ui.label(RichText::new("Neither cut touches this tensor.").weak());
            return action;
        }
        let info = &model.snapshot.tensors[t];
        let d = crate::analysis::disagreement(
            crate::model::matrix_dims(&info.shape, info.numel),
            c.masks[0].get(name),
            c.masks[1].get(name),
            160,
            96,
        );
        draw_disagreement(ui, &d);
        action
    }
}

fn metrics_line(ui: &mut Ui, c: &CriteriaComparison) {
    ui.horizontal_wrapped(|ui| {
        for (k, crit) in c.criteria.iter().enumerate() {
            let text = match &c.metrics[k] {
                Some(Ok(m)) => match (m.accuracy, m.fidelity) {
                    (Some(acc), _) => format!("accuracy {:.2}%", acc * 100.0),
                    (None, Some(f)) => format!("top-1 agreement {:.2}%", f.top1_agreement * 100.0),
                    _ => "measured".into(),
                },
                Some(Err(e)) => format!("not measured: {e}"),
                None => "not measured (no evaluation data)".into(),
            };
            let colour = if k == 0 { ONLY_A } else { ONLY_B };
            ui.colored_label(colour, format!("{}: {text}", crit.label()));
            if k == 0 {
                ui.separator();
            }
        }
    });
}

fn swatch(ui: &mut Ui, colour: Color32, text: &str) {
    let (r, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), Sense::hover());
    ui.painter().rect_filled(r, 2.0, colour);
    ui.label(text);
}

fn draw_disagreement(ui: &mut Ui, d: &crate::analysis::Disagreement) {
    let width = ui.available_width().min(760.0);
    // The whole layer fits in view: as wide as the window allows, at most 320 points high.
    let cell = (width / d.grid_w as f32)
        .min(320.0 / d.grid_h as f32)
        .clamp(1.0, 24.0);
    let size = egui::vec2(cell * d.grid_w as f32, cell * d.grid_h as f32);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let p = ui.painter_at(rect);
    for gy in 0..d.grid_h {
        for gx in 0..d.grid_w {
            let i = gy * d.grid_w + gx;
            // Each cell mixes the four outcomes by the share of its weights in each.
            let neither = (1.0 - d.only_a[i] - d.only_b[i] - d.both[i]).max(0.0);
            let mix = |f: fn(Color32) -> u8| -> u8 {
                (f(ONLY_A) as f32 * d.only_a[i]
                    + f(ONLY_B) as f32 * d.only_b[i]
                    + f(BOTH) as f32 * d.both[i]
                    + f(NEITHER) as f32 * neither)
                    .round()
                    .clamp(0.0, 255.0) as u8
            };
            let colour = Color32::from_rgb(mix(|c| c.r()), mix(|c| c.g()), mix(|c| c.b()));
            let min = rect.min + egui::vec2(gx as f32 * cell, gy as f32 * cell);
            p.rect_filled(
                egui::Rect::from_min_size(min, egui::vec2(cell, cell)),
                0.0,
                colour,
            );
        }
    }
}
