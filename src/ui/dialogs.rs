//! Small windows: open a typed path, and export.

use std::path::{Path, PathBuf};

use egui::{Context, RichText, Window};

use super::app::AppState;
use crate::worker::ExportRequest;

#[derive(Default)]
pub struct OpenPathDialog {
    pub open: bool,
    path: String,
}

impl OpenPathDialog {
    /// Returns the path to open when the user confirms.
    pub fn ui(&mut self, ctx: &Context, recent: &[PathBuf]) -> Option<PathBuf> {
        if !self.open {
            return None;
        }
        let Self { open, path } = self;
        let mut chosen = None;
        let mut close = false;
        Window::new("Open path")
            .collapsible(false)
            .resizable(false)
            .open(open)
            .show(ctx, |ui| {
                let label = ui.label(
                    "Model file (.safetensors, .pt, .pth, .bin, .npz, .onnx), or a sharded checkpoint's folder or index",
                );
                let r = ui.add(
                    egui::TextEdit::singleline(path)
                        .desired_width(420.0)
                        .hint_text("/path/to/model.safetensors"),
                );
                let r = r.labelled_by(label.id);
                let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                if let Some(p) = recent.first().filter(|_| path.is_empty()) {
                    ui.label(RichText::new(format!("Last opened: {}", p.display())).weak());
                }
                ui.horizontal(|ui| {
                    let ok = !path.trim().is_empty();
                    if ui
                        .add_enabled(ok, egui::Button::new("Open"))
                        .on_hover_text("Open this file; the current model stays open if it fails.")
                        .clicked()
                        || (enter && ok)
                    {
                        chosen = Some(PathBuf::from(path.trim()));
                        close = true;
                    }
                    if ui.button("Cancel").clicked() {
                        close = true;
                    }
                });
            });
        if close {
            self.open = false;
        }
        chosen
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportTarget {
    Weights,
    Masks,
    Recipe,
    Compacted,
}

impl ExportTarget {
    pub fn title(self) -> &'static str {
        match self {
            ExportTarget::Weights => "Save pruned weights",
            ExportTarget::Masks => "Save masks",
            ExportTarget::Recipe => "Save recipe",
            ExportTarget::Compacted => "Save compacted model",
        }
    }
}

pub enum ExportAction {
    Run(ExportRequest),
    Browse(ExportTarget, PathBuf),
}

#[derive(Default)]
pub struct ExportDialog {
    pub open: bool,
    rows: Vec<(ExportTarget, bool, String)>,
}

impl ExportDialog {
    /// Opens the dialog with paths beside the model file (or in the working directory).
    pub fn show_for(&mut self, state: &AppState) {
        let Some(m) = state.model.as_ref() else {
            return;
        };
        let (dir, stem) = match &m.snapshot.path {
            Some(p) => (
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
                p.file_stem()
                    .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
            ),
            None => (PathBuf::from("."), "digits_mlp".to_string()),
        };
        let path = |suffix: &str| dir.join(format!("{stem}{suffix}")).display().to_string();
        if self.rows.is_empty() || !self.open {
            self.rows = vec![
                // An ONNX model exports as ONNX by default: the same graph, pruned values.
                (
                    ExportTarget::Weights,
                    true,
                    path(
                        if m.snapshot.format == crate::model::ModelFormat::Onnx.label() {
                            ".pruned.onnx"
                        } else {
                            ".pruned.safetensors"
                        },
                    ),
                ),
                (ExportTarget::Masks, true, path(".masks.safetensors")),
                (ExportTarget::Recipe, true, path(".recipe.json")),
                (
                    ExportTarget::Compacted,
                    false,
                    path(
                        if m.snapshot.format == crate::model::ModelFormat::Onnx.label() {
                            ".compact.onnx"
                        } else {
                            ".compact.safetensors"
                        },
                    ),
                ),
            ];
        }
        self.open = true;
    }

    pub fn set_path(&mut self, target: ExportTarget, p: PathBuf) {
        for (t, on, path) in &mut self.rows {
            if *t == target {
                *on = true;
                *path = p.display().to_string();
            }
        }
    }

    pub fn ui(&mut self, ctx: &Context, state: &AppState) -> Option<ExportAction> {
        if !self.open {
            return None;
        }
        let mut action = None;
        let mut open = self.open;
        let mut close = false;
        // Wide enough for the path fields: an auto-sized window would squeeze them to a stub.
        Window::new("Export").collapsible(false).resizable(false).min_width(640.0).open(&mut open).show(ctx, |ui| {
            ui.label("Writes are atomic: each file appears complete or not at all.");
            let input_path = state.model.as_ref().and_then(|m| m.snapshot.path.clone());
            egui::Grid::new("export_grid").num_columns(3).show(ui, |ui| {
                for (target, on, path) in &mut self.rows {
                    let (label, tip) = match target {
                        ExportTarget::Weights => ("Pruned weights", "Same names, shapes and dtypes as the input, zeros where pruned. A path ending in .onnx (for ONNX models) writes the whole graph with only the pruned values changed; any other path writes safetensors."),
                        ExportTarget::Masks => ("Masks", "One u8 tensor per pruned tensor, 1 = kept (safetensors)."),
                        ExportTarget::Recipe => ("Recipe", "The settings and the input file's hash, as JSON; `prunescope prune MODEL --recipe R.json` replays it."),
                        ExportTarget::Compacted => ("Compacted model", "A neuron or channel cut made physically smaller: every removed channel leaves its dependency group, so the layers are narrower and compute exactly what the masked model does. safetensors with the graph, or .onnx for an ONNX model."),
                    };
                    ui.checkbox(on, label).on_hover_text(tip);
                    // min_size, not desired_width: a grid column would otherwise keep it a stub.
                    let r = ui.add_enabled(*on, egui::TextEdit::singleline(path).min_size(egui::vec2(380.0, 0.0)));
                    r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::TextInput, *on, format!("{label} path")));
                    if ui.add_enabled(*on, egui::Button::new("Browse…")).clicked() {
                        action = Some(ExportAction::Browse(*target, PathBuf::from(path.as_str())));
                    }
                    ui.end_row();
                    // An existing input is reported below as a conflict, not as "replaced".
                    let is_input = input_path.as_deref().is_some_and(|i| {
                        crate::export::check_outputs(&[("", i)], &[("", Path::new(path.as_str()))]).is_err()
                    });
                    if *on && !is_input && Path::new(path.as_str()).exists() {
                        ui.label("");
                        ui.label(RichText::new("exists: will be replaced").weak());
                        ui.end_row();
                    }
                }
            });
            let pick = |t: ExportTarget| {
                self.rows
                    .iter()
                    .find(|(x, on, p)| *x == t && *on && !p.trim().is_empty())
                    .map(|(_, _, p)| PathBuf::from(p.trim()))
            };
            let request = ExportRequest {
                settings: state.settings.clone(),
                weights: pick(ExportTarget::Weights),
                masks: pick(ExportTarget::Masks),
                recipe: pick(ExportTarget::Recipe),
                compacted: pick(ExportTarget::Compacted),
            };
            let any = !request.outputs().is_empty();
            let mut error = state.model.as_ref().and_then(|m| m.preview_error.as_ref()).map(|(_, e)| e.clone());
            if let Some(e) = &error {
                ui.colored_label(super::theme::BAD, format!("The settings are invalid: {e}"));
            }
            // The same check the worker makes, shown before the click: an output that is the
            // open model (or another output) would destroy it.
            let inputs: Vec<(&str, &Path)> = input_path.as_deref().map(|p| ("open model", p)).into_iter().collect();
            if let Err(e) = crate::export::check_outputs(&inputs, &request.outputs()) {
                ui.colored_label(super::theme::BAD, e.to_string());
                error = Some(e.to_string());
            }
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(any && error.is_none(), egui::Button::new("Export"))
                    .on_hover_text("Runs in the background; progress shows in the menu bar.")
                    .clicked()
                {
                    action = Some(ExportAction::Run(request));
                    close = true;
                }
                if ui.button("Cancel").clicked() {
                    close = true;
                }
            });
        });
        self.open = open && !close;
        action
    }
}

/// Chooses the data the open model is evaluated on.
#[derive(Default)]
pub struct DataDialog {
    pub open: bool,
    pub path: String,
    x: String,
    y: String,
}

impl DataDialog {
    /// Returns the data source to use when the user confirms; `browse` is set when the user
    /// asks for the system file dialog (whose answer comes back through [`Self::path`]).
    pub fn ui(&mut self, ctx: &Context, browse: &mut bool) -> Option<crate::eval::DataSource> {
        if !self.open {
            return None;
        }
        let mut chosen = None;
        let mut close = false;
        let mut open = self.open;
        Window::new("Evaluation data")
            .collapsible(false)
            .resizable(false)
            .open(&mut open)
            .show(ctx, |ui| {
                ui.label(
                    "Accuracy is measured on labelled data; without labels, the pruned model is \
                     compared with the dense one on the same inputs (fidelity).",
                );
                ui.add_space(4.0);
                egui::Grid::new("data-grid").num_columns(2).show(ui, |ui| {
                    let l = ui.label("Data file");
                    ui.horizontal(|ui| {
                        ui.add(
                            egui::TextEdit::singleline(&mut self.path)
                                .min_size(egui::vec2(320.0, 0.0))
                                .hint_text("/path/to/data.npz"),
                        )
                        .labelled_by(l.id)
                        .on_hover_text(
                            "A .npz or .safetensors file of named arrays; the first dimension \
                             of each counts samples.",
                        );
                        if ui
                            .button("Browse…")
                            .on_hover_text("Choose the file with the system dialog.")
                            .clicked()
                        {
                            *browse = true;
                        }
                    });
                    ui.end_row();
                    let l = ui.label("Input array");
                    ui.add(egui::TextEdit::singleline(&mut self.x).hint_text("x"))
                        .labelled_by(l.id)
                        .on_hover_text(
                            "The array fed to a one-input model (default x). Models with several \
                             inputs take arrays named after their inputs (input_ids, …).",
                        );
                    ui.end_row();
                    let l = ui.label("Label array");
                    ui.add(egui::TextEdit::singleline(&mut self.y).hint_text("y"))
                        .labelled_by(l.id)
                        .on_hover_text(
                            "Class indices, one per sample (default y). Without labels only \
                             fidelity to the dense model is measured.",
                        );
                    ui.end_row();
                });
                ui.horizontal(|ui| {
                    let ok = !self.path.trim().is_empty();
                    if ui
                        .add_enabled(ok, egui::Button::new("Use this file"))
                        .on_hover_text(
                            "Evaluate on this file from now on; if it does not fit the model, \
                             the current data stays.",
                        )
                        .clicked()
                    {
                        let name = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
                        chosen = Some(crate::eval::DataSource::File {
                            path: PathBuf::from(self.path.trim()),
                            spec: crate::data::DataSpec {
                                x: name(&self.x),
                                y: name(&self.y),
                            },
                        });
                        close = true;
                    }
                    if ui
                        .button("Use bundled digits")
                        .on_hover_text(
                            "The 360 test images of the UCI digits bundled with prunescope; \
                             they fit models that take 64 values (or 1×8×8) per sample.",
                        )
                        .clicked()
                    {
                        chosen = Some(crate::eval::DataSource::Digits);
                        close = true;
                    }
                    if ui.button("Cancel").clicked() {
                        close = true;
                    }
                });
            });
        self.open = open && !close;
        chosen
    }
}
