//! The experiment history: every evaluated configuration as a point of metric against size,
//! the Pareto front drawn through the best ones; clicking a point restores its settings.

use egui::{Context, RichText, Ui};
use egui_plot::{HoverPosition, Legend, Line, Plot, PlotPoint, PlotPoints, Points};

use super::app::AppState;
use super::theme;
use crate::history::{Record, pareto_front};
use crate::prune::PruneSettings;

pub const TIP_AXIS: &str = "Size as the weights left non-zero, or as estimated FLOPs per sample (2 per multiply-add of the Linear and Conv2d layers that survive pruning).";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Axis {
    #[default]
    NonZeros,
    Flops,
}

#[derive(Default)]
pub struct HistoryPanel {
    pub open: bool,
    axis: Axis,
    /// Where Save CSV writes.
    pub save_path: String,
}

pub enum HistoryAction {
    Restore(Box<PruneSettings>),
    SaveCsv(std::path::PathBuf),
    Browse,
    Clear,
}

/// The point of a record on the chosen axis (`None` where that size is unknown).
pub fn point(r: &Record, axis: Axis) -> Option<[f64; 2]> {
    let x = match axis {
        Axis::NonZeros => r.nonzeros as f64,
        Axis::Flops => r.flops?,
    };
    Some([x, r.value])
}

/// Settings summarised for a hover.
pub fn describe(s: &PruneSettings) -> String {
    let scope = match s.scope {
        crate::prune::Scope::Global => "global".to_string(),
        crate::prune::Scope::Layer => "layer-wise".to_string(),
        crate::prune::Scope::Sensitivity => format!("sensitivity ({})", s.rule.label()),
    };
    format!(
        "{scope}, target {:.1}%, {}, {}{}",
        s.sparsity * 100.0,
        s.criterion.cli_name(),
        s.pattern,
        if s.min_keep > 0.0 {
            format!(", min keep {:.0}%", s.min_keep * 100.0)
        } else {
            String::new()
        }
    )
}

impl HistoryPanel {
    pub fn ui(&mut self, ctx: &Context, state: &AppState) -> Option<HistoryAction> {
        if !self.open {
            return None;
        }
        let mut open = self.open;
        let mut action = None;
        egui::Window::new("Experiment history")
            .open(&mut open)
            .default_pos([380.0, 120.0])
            .default_width(640.0)
            .default_height(460.0)
            .resizable(true)
            .show(ctx, |ui| action = self.contents(ui, state));
        self.open = open;
        action
    }

    fn contents(&mut self, ui: &mut Ui, state: &AppState) -> Option<HistoryAction> {
        let mut action = None;
        let Some(m) = state.model.as_ref() else {
            ui.label("No model open.");
            return None;
        };
        if m.snapshot.hash.is_none() {
            ui.label(
                "Only models that are evaluated on data have a history: every configuration \
                 measured is recorded here.",
            );
            return None;
        }
        let records: Vec<&Record> = m
            .history
            .iter()
            .filter(|r| m.eval.evaluator.as_deref() == Some(r.data.as_str()))
            .map(|r| r.as_ref())
            .collect();
        let metric = records.first().map_or("metric", |r| r.metric.label());
        ui.label(format!(
            "Every configuration evaluated on this model and data (GUI and CLI): {metric} \
             against size. The line is the Pareto front, where nothing smaller scores better. \
             Click a point to restore its settings."
        ));
        ui.horizontal(|ui| {
            ui.radio_value(&mut self.axis, Axis::NonZeros, "Non-zeros")
                .on_hover_text(TIP_AXIS);
            ui.add_enabled_ui(m.snapshot.dense_flops.is_some(), |ui| {
                ui.radio_value(&mut self.axis, Axis::Flops, "FLOPs")
                    .on_hover_text(TIP_AXIS)
                    .on_disabled_hover_text("FLOPs are counted from the graph's shapes, which this model's engine does not expose.");
            });
            ui.label(RichText::new(format!("{} configurations", records.len())).weak());
            if self.save_path.is_empty() {
                self.save_path = super::sensitivity::default_save_path(m, "history.csv");
            }
            let l = ui.label("Save to");
            ui.add(egui::TextEdit::singleline(&mut self.save_path).desired_width(200.0))
                .labelled_by(l.id)
                .on_hover_text("Where Save CSV writes.");
            if ui.button("Browse…").on_hover_text("Choose the file with the system's dialog.").clicked() {
                action = Some(HistoryAction::Browse);
            }
            if ui
                .button("Save CSV")
                .on_hover_text("Every record with its settings, one row each.")
                .clicked()
            {
                action = Some(HistoryAction::SaveCsv(self.save_path.trim().into()));
            }
            if ui
                .button("Clear")
                .on_hover_text("Forget this model's history (GUI and CLI records).")
                .clicked()
            {
                action = Some(HistoryAction::Clear);
            }
        });
        let axis = self.axis;
        let pts: Vec<(usize, [f64; 2])> = records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| point(r, axis).map(|p| (i, p)))
            .collect();
        let front = pareto_front(&pts.iter().map(|(_, p)| (p[0], p[1])).collect::<Vec<_>>());
        let front_pts: Vec<[f64; 2]> = front.iter().map(|&k| pts[k].1).collect();
        let hover_records = records.clone();
        let r = Plot::new("history_plot")
            .legend(Legend::default().position(egui_plot::Corner::RightBottom))
            .x_axis_label(match axis {
                Axis::NonZeros => "non-zero weights",
                Axis::Flops => "FLOPs per sample",
            })
            .y_axis_label(metric)
            .label_formatter(move |h: &HoverPosition<'_>| {
                let p = match h {
                    HoverPosition::NearDataPoint { position, .. } => *position,
                    HoverPosition::Elsewhere { position } => *position,
                };
                // The nearest record's settings.
                pts_nearest(&hover_records, axis, &p).map(|r| {
                    let how = match r.source.as_str() {
                        "gui" | "cli" => String::new(),
                        other => format!("\nafter {other}"),
                    };
                    format!(
                        "{:.4} at {} non-zeros\n{}{how}",
                        r.value,
                        crate::util::group_digits(r.nonzeros),
                        describe(&r.settings)
                    )
                })
            })
            .show(ui, |p| {
                let trained = |i: usize| !matches!(records[i].source.as_str(), "gui" | "cli");
                let of = |t: bool| -> Vec<[f64; 2]> {
                    pts.iter()
                        .filter(|(i, _)| trained(*i) == t)
                        .map(|(_, p)| *p)
                        .collect()
                };
                p.points(
                    Points::new("pruned", PlotPoints::from(of(false)))
                        .radius(3.0)
                        .color(theme::KEPT),
                );
                p.points(
                    Points::new(
                        "after training (fine-tune, schedule)",
                        PlotPoints::from(of(true)),
                    )
                    .radius(4.0)
                    .color(theme::GOOD),
                );
                p.line(
                    Line::new("Pareto front", PlotPoints::from(front_pts))
                        .color(theme::PRUNED)
                        .width(2.0),
                );
                p.pointer_coordinate()
            });
        if r.response.clicked()
            && let Some(c) = r.inner
            && let Some(rec) = pts_nearest(&records, axis, &c)
        {
            action = Some(HistoryAction::Restore(Box::new(rec.settings.clone())));
        }
        action
    }
}

/// The record nearest to a plot position, in axis-normalised distance.
fn pts_nearest<'a>(records: &[&'a Record], axis: Axis, p: &PlotPoint) -> Option<&'a Record> {
    let pts: Vec<(&Record, [f64; 2])> = records
        .iter()
        .filter_map(|r| point(r, axis).map(|q| (*r, q)))
        .collect();
    let span = |k: usize| {
        let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, q)| {
            (a.min(q[k]), b.max(q[k]))
        });
        (hi - lo).max(1e-12)
    };
    let (sx, sy) = (span(0), span(1));
    pts.iter()
        .min_by(|a, b| {
            let d = |q: &[f64; 2]| ((q[0] - p.x) / sx).powi(2) + ((q[1] - p.y) / sy).powi(2);
            d(&a.1).total_cmp(&d(&b.1))
        })
        .map(|(r, _)| *r)
}
