//! The sensitivity window: each layer pruned alone across a grid, drawn as it is measured, and
//! the allocation rules compared at one target.

use egui::{Color32, Context, RichText, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};

use super::app::AppState;
use super::theme;
use crate::prune::PruneSettings;
use crate::sensitivity::{DEFAULT_GRID, MetricKind, Sensitivity, parse_grid};

pub const TIP_RUN: &str = "Prune each layer alone at every sparsity of the grid, everything else dense, and measure the model: how much each layer can take.";
pub const TIP_GRID: &str = "The sparsities each layer is measured at, comma-separated fractions.";
pub const TIP_DROP: &str = "Plot the metric's drop from the dense model instead of the metric itself: flat lines at zero are layers that lose nothing.";
pub const TIP_COMPARE: &str = "Plan the current global target with every allocation rule, then measure each plan: the curves' prediction against the truth.";
pub const TIP_FRESH: &str =
    "Measure again even though a finished sweep of these settings is cached.";

/// What the window asks the app to do.
pub enum SensitivityAction {
    Run {
        grid: Vec<f64>,
        fresh: bool,
    },
    Cancel,
    Compare,
    /// Write the curves (or the chart) to this path.
    Save(SaveKind, std::path::PathBuf),
    /// Choose the path with the system's save dialog.
    Browse(SaveKind),
    Restore(Box<PruneSettings>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveKind {
    Csv,
    Json,
    Png,
}

impl SaveKind {
    pub fn extension(self) -> &'static str {
        match self {
            SaveKind::Csv => "csv",
            SaveKind::Json => "json",
            SaveKind::Png => "png",
        }
    }
}

pub struct SensitivityPanel {
    pub open: bool,
    grid_text: String,
    grid_error: Option<String>,
    show_drop: bool,
    /// Where the chart was drawn last frame, for the PNG export.
    pub plot_rect: Option<egui::Rect>,
    /// Where exports go, without extension (each kind adds its own).
    pub save_path: String,
}

impl Default for SensitivityPanel {
    fn default() -> Self {
        SensitivityPanel {
            open: false,
            grid_text: DEFAULT_GRID
                .iter()
                .map(|v| format!("{v}"))
                .collect::<Vec<_>>()
                .join(", "),
            grid_error: None,
            show_drop: false,
            plot_rect: None,
            save_path: String::new(),
        }
    }
}

/// A distinct colour per layer, the selected one drawn over the others.
fn layer_color(i: usize, n: usize) -> Color32 {
    let h = i as f32 / n.max(1) as f32;
    egui::ecolor::Hsva::new(h, 0.55, 0.85, 1.0).into()
}

impl SensitivityPanel {
    pub fn ui(&mut self, ctx: &Context, state: &AppState) -> Option<SensitivityAction> {
        if !self.open {
            return None;
        }
        let mut open = self.open;
        let mut action = None;
        egui::Window::new("Sensitivity")
            .open(&mut open)
            .default_pos([340.0, 80.0])
            .default_width(760.0)
            .default_height(620.0)
            .resizable(true)
            .show(ctx, |ui| action = self.contents(ui, state));
        self.open = open;
        action
    }

    fn contents(&mut self, ui: &mut Ui, state: &AppState) -> Option<SensitivityAction> {
        let mut action = None;
        let Some(m) = state.model.as_ref() else {
            ui.label("No model open.");
            return None;
        };
        if m.eval.evaluator.is_none() {
            ui.label(
                "Sensitivity is measured on data: prune a layer, run the model, see what it \
                 costs. This model cannot be run here yet: it needs a graph prunescope can run \
                 (the samples, ONNX files, or weights with an architecture description) and \
                 data that fits it (File → Evaluation data…).",
            );
            if let Some(e) = &m.eval.error {
                ui.colored_label(theme::BAD, e);
            }
            return None;
        }
        let job = state.jobs.iter().find(|j| j.label == "Sensitivity");
        ui.label(
            RichText::new(format!(
                "Each layer pruned alone ({} criterion, {} pattern), everything else dense, \
                 measured on {}.",
                state.settings.criterion.cli_name(),
                state.settings.pattern,
                m.eval.evaluator.as_deref().unwrap_or("the data")
            ))
            .weak(),
        );
        ui.horizontal(|ui| {
            let l = ui.label("Grid");
            let r = ui
                .add(egui::TextEdit::singleline(&mut self.grid_text).desired_width(320.0))
                .labelled_by(l.id)
                .on_hover_text(TIP_GRID);
            if r.changed() {
                self.grid_error = parse_grid(&self.grid_text).err().map(|e| e.to_string());
            }
            let grid = parse_grid(&self.grid_text);
            let ok = grid.is_ok() && job.is_none();
            let run_label = if state.sensitivity.as_ref().is_some_and(|s| !s.complete) {
                "Resume"
            } else {
                "Run"
            };
            if ui
                .add_enabled(ok, egui::Button::new(run_label))
                .on_hover_text(TIP_RUN)
                .clicked()
                && let Ok(grid) = grid.as_ref().cloned()
            {
                action = Some(SensitivityAction::Run { grid, fresh: false });
            }
            if ui
                .add_enabled(ok, egui::Button::new("Measure again"))
                .on_hover_text(TIP_FRESH)
                .clicked()
                && let Ok(grid) = grid
            {
                action = Some(SensitivityAction::Run { grid, fresh: true });
            }
            if job.is_some()
                && ui
                    .button("Cancel")
                    .on_hover_text(
                        "Stop the sweep; finished points are kept and Resume continues from them.",
                    )
                    .clicked()
            {
                action = Some(SensitivityAction::Cancel);
            }
        });
        if let Some(e) = &self.grid_error {
            ui.colored_label(theme::BAD, e);
        }
        if let Some(j) = job {
            ui.add(
                egui::ProgressBar::new(j.fraction)
                    .text(format!("Sensitivity: {}", j.message))
                    .show_percentage(),
            );
        }
        let Some(sens) = state.sensitivity.clone() else {
            ui.label("No curves yet: press Run.");
            return action;
        };
        ui.horizontal(|ui| {
            ui.label(format!(
                "{} layers, {}/{} points{}{} — {} evaluations, {:.0} ms",
                sens.layers.len(),
                sens.points_done(),
                sens.points_total(),
                if sens.complete { "" } else { " (unfinished)" },
                if sens.cached { ", from the cache" } else { "" },
                sens.evaluations,
                sens.sweep_ms
            ));
            ui.checkbox(&mut self.show_drop, "Show drop")
                .on_hover_text(TIP_DROP);
        });
        self.chart(ui, state, &sens);
        if self.save_path.is_empty() {
            self.save_path = default_save_path(m, "sensitivity");
        }
        ui.horizontal(|ui| {
            let l = ui.label("Save to");
            ui.add(egui::TextEdit::singleline(&mut self.save_path).desired_width(260.0))
                .labelled_by(l.id)
                .on_hover_text("The file name without extension: each format adds its own.");
            if ui
                .button("Browse…")
                .on_hover_text("Choose the file with the system's dialog.")
                .clicked()
            {
                action = Some(SensitivityAction::Browse(SaveKind::Csv));
            }
            for (kind, label, tip) in [
                (
                    SaveKind::Csv,
                    "Save CSV",
                    "The table, one row per layer and sparsity.",
                ),
                (
                    SaveKind::Json,
                    "Save JSON",
                    "Everything measured, as `prunescope sensitivity --json` prints it.",
                ),
                (SaveKind::Png, "Save PNG", "The chart as it is drawn now."),
            ] {
                if ui.button(label).on_hover_text(tip).clicked() {
                    // Appended, not replaced: "bert.base-sensitivity" must not become "bert.csv".
                    let path = std::path::PathBuf::from(format!(
                        "{}.{}",
                        self.save_path.trim(),
                        kind.extension()
                    ));
                    action = Some(SensitivityAction::Save(kind, path));
                }
            }
        });
        ui.separator();
        if let Some(a) = self.comparison_ui(ui, state, &sens) {
            action = Some(a);
        }
        action
    }

    fn chart(&mut self, ui: &mut Ui, state: &AppState, sens: &Sensitivity) {
        let dense = sens.dense_value();
        let what = match (sens.metric, self.show_drop) {
            (MetricKind::Accuracy, false) => "accuracy",
            (MetricKind::Accuracy, true) => "accuracy drop",
            (MetricKind::Fidelity, false) => "cosine fidelity to the dense model",
            (MetricKind::Fidelity, true) => "fidelity drop (1 − cosine)",
        };
        ui.label(format!(
            "The chart: one line per layer; x = the sparsity that layer alone is pruned to, \
             y = the model's {what}. The selected layer is drawn thick."
        ));
        let n = sens.layers.len();
        let selected = state.selected;
        let show_drop = self.show_drop;
        let h = (ui.available_height() - 200.0).max(220.0);
        // The PNG export takes the whole chart, axes and their labels included.
        let scope = ui.scope(|ui| {
            Plot::new("sensitivity_plot")
                .height(h)
                .legend(Legend::default())
                .x_axis_label("sparsity of the layer")
                .y_axis_label(what)
                .show(ui, |p| {
                    for (i, c) in sens.layers.iter().enumerate() {
                        let pts: Vec<[f64; 2]> = c
                            .points
                            .iter()
                            .map(|pt| {
                                let v = sens.metric.value(&pt.metrics);
                                [pt.sparsity, if show_drop { dense - v } else { v }]
                            })
                            .collect();
                        let is_sel = selected.is_some_and(|t| c.tensors.contains(&t));
                        let mut name = c.name.join(" + ");
                        if c.name.len() > 1 {
                            name.push_str(" (tied)");
                        }
                        let color = layer_color(i, n);
                        p.points(
                            Points::new(name.clone(), PlotPoints::from(pts.clone()))
                                .color(color)
                                .radius(if is_sel { 3.5 } else { 2.0 }),
                        );
                        p.line(
                            Line::new(name, PlotPoints::from(pts))
                                .color(color)
                                .width(if is_sel { 3.5 } else { 1.3 }),
                        );
                    }
                });
        });
        self.plot_rect = Some(scope.response.rect);
    }

    fn comparison_ui(
        &mut self,
        ui: &mut Ui,
        state: &AppState,
        sens: &Sensitivity,
    ) -> Option<SensitivityAction> {
        let mut action = None;
        ui.horizontal(|ui| {
            let busy = state.jobs.iter().any(|j| j.label == "Comparing rules");
            if ui
                .add_enabled(
                    sens.complete && !busy && state.settings.sparsity > 0.0,
                    egui::Button::new(format!(
                        "Compare rules at {:.0}%",
                        state.settings.sparsity * 100.0
                    )),
                )
                .on_hover_text(TIP_COMPARE)
                .on_disabled_hover_text("Needs a finished sweep and a global sparsity above 0 %.")
                .clicked()
            {
                action = Some(SensitivityAction::Compare);
            }
            ui.label(
                RichText::new("Predicted: dense minus the summed drops the curves give. Measured: the plan applied and evaluated.")
                    .weak(),
            );
        });
        let Some(rows) = state.comparison.as_ref() else {
            return action;
        };
        egui::Grid::new("compare_rules")
            .striped(true)
            .show(ui, |ui| {
                ui.strong("Rule");
                ui.strong("Target");
                ui.strong("Predicted");
                ui.strong("Measured");
                ui.strong("Non-zeros");
                ui.strong("Per-layer sparsity");
                ui.label("");
                ui.end_row();
                for row in rows.iter() {
                    match &row.plan {
                        Err(e) => {
                            ui.label("—");
                            ui.colored_label(theme::BAD, e);
                            ui.end_row();
                        }
                        Ok(p) => {
                            ui.label(p.rule.label()).on_hover_text(p.rule.tooltip());
                            ui.label(format!("{:.1}%", p.target * 100.0));
                            ui.label(format!("{:.4}", p.predicted));
                            match &row.measured {
                                Some(Ok(m)) => {
                                    ui.label(format!("{:.4}", p.metric.value(m)));
                                }
                                Some(Err(e)) => {
                                    ui.colored_label(theme::BAD, e);
                                }
                                None => {
                                    ui.label("n/a");
                                }
                            }
                            ui.label(crate::util::group_digits(row.nonzeros));
                            let layers: Vec<String> = p
                                .layers
                                .iter()
                                .map(|l| format!("{:.0}", l.sparsity() * 100.0))
                                .collect();
                            ui.label(format!("{}%", layers.join(" / ")));
                            if let Some(st) = &row.settings
                                && ui
                                    .small_button("Use")
                                    .on_hover_text("Apply this rule's plan to the model.")
                                    .clicked()
                            {
                                action = Some(SensitivityAction::Restore(Box::new(st.clone())));
                            }
                            ui.end_row();
                        }
                    }
                }
            });
        action
    }
}

/// `<model dir>/<model stem>-<what>`, or `<what>` in the working directory for a model without
/// a file.
pub fn default_save_path(m: &super::app::ModelView, what: &str) -> String {
    match &m.snapshot.path {
        Some(p) => {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            p.with_file_name(format!("{stem}-{what}"))
                .display()
                .to_string()
        }
        None => what.to_string(),
    }
}
