//! The left panel: how to prune (scope, targets, pattern, criterion) and the selected layer.

use egui::{ComboBox, DragValue, RichText, Slider, Ui};

use super::app::AppState;
use crate::prune::{Criterion, Pattern, PruneSettings, Scope};
use crate::util::group_digits;

/// Patterns offered in the combo box; any other N:M is typed in.
const PRESETS: [(usize, usize); 3] = [(2, 4), (4, 8), (1, 4)];

pub const TIP_GLOBAL: &str = "Global: one score threshold across all prunable layers, so layers full of small weights lose more than layers of large ones.";
pub const TIP_LAYER: &str =
    "Layer-wise: each layer gets its own target sparsity and is cut by its own threshold.";
pub const TIP_SPARSITY_STRUCTURED: &str = "Fraction of the channels every dependency group loses, its lowest-scoring ones; the kept width is rounded up to the multiple set under Pattern, so small steps may remove nothing.";
pub const TIP_SPARSITY_HEADS: &str = "Fraction of the heads every attention block loses, its lowest-scoring ones, rounded down (12 heads at 30 % lose 3), and at least one head stays in each block.";
pub const TIP_SPARSITY: &str = "Fraction of all prunable weights to remove. Exactly round(S·N) of the N prunable weights go, lowest scores first.";
pub const TIP_MIN_KEEP: &str = "Minimum-threshold refinement: every layer keeps at least this fraction of its weights, so no layer collapses; the others prune more to hold the global target.";
pub const TIP_PATTERN: &str = "Unstructured removes any weights; N:M keeps the N highest-scoring of every M consecutive weights along the input dimension, a layout sparse tensor cores run fast (2:4 on NVIDIA Ampere and later).";
pub const TIP_BLOCKS: &str = "Blocks: each layer is cut into b × b blocks and whole blocks go, those with the lowest mean score first, until the layer reaches the target; block-sparse kernels skip every removed block.";
pub const TIP_NEURON: &str = "Neuron: whole output neurons of Linear layers go, each with its dependency group (its bias and the next layer's matching input), so the layer becomes narrower.";
pub const TIP_HEAD: &str = "Head: whole attention heads go — a head's query, key and value features (weights and biases) and the output projection's matching inputs — ranked by the criterion summed over them. Found in ONNX transformers, where a Reshape splits the projections into heads; head counts are not rounded.";
pub const TIP_CHANNEL: &str = "Channel: whole convolution filters go, each with its dependency group (bias, BatchNorm, the next layers' matching inputs, residual partners), ranked by the group's norm.";
pub const TIP_GROUP: &str = "A dependency group is every tensor slice tied to one channel: removing a conv's output channel removes its bias and BatchNorm entries and the matching input of every layer that reads it; channels joined by a residual Add go together. Tied tensors are underlined in the table.";
pub const TIP_ROUND_WIDTH: &str = "Structured cuts keep a number of channels that is a multiple of this: hardware runs widths like 8, 16, 24 faster than odd ones.";
pub const TIP_CALIBRATION: &str = "How many calibration samples the criterion runs through the model to collect gradients or layer inputs: the first ones of the bundled dataset's training split (so test figures stay honest), or of the data file you chose. More give steadier scores and take longer.";
pub const TIP_OWL: &str = "OWL (outlier-weighted layer-wise sparsity): layers whose Wanda scores hold more outliers (above 5 × the layer's mean) keep more weights, within ±8 points of the target; the weights removed in all stay the target's share. Sets layer-wise targets; needs evaluation data.";
pub const TIP_SPARSEGPT: &str = "SparseGPT prunes each Linear layer to the current target and moves the weights it keeps to make up for the ones it removes (Optimal Brain Surgeon with the calibration inputs' Hessian). It changes the weights, so it runs once and gives a new model; Undo brings the original back.";
pub const TIP_SPARSEGPT_MENU: &str = "It changes the kept weights too, so it is not a slider criterion: use the Run SparseGPT button below.";
pub const TIP_NEEDS_STRUCTURE: &str =
    "It ranks whole neurons and channels: choose the neuron or channel pattern first.";
pub const TIP_NEEDS_DATA: &str = "This criterion scores weights from gradients or activations on data: load evaluation data (Data menu) for a model prunescope can run.";
pub const TIP_SEED: &str = "The random criterion's seed: the same seed gives the same masks, a different one a fresh draw.";
pub const TIP_ALL_LAYERS: &str = "Set every unlocked prunable layer to this sparsity (you can then adjust single layers in the table).";
pub const TIP_RESET: &str = "Back to the dense model: sparsity 0 and no per-layer overrides.";
pub const TIP_SENSITIVITY_SCOPE: &str = "Sensitivity-guided: the global target is split across layers by their measured sensitivity curves, so layers that lose little take more of the cut.";
pub const TIP_RULE: &str =
    "How the curves split the budget; compare the rules in the Sensitivity window.";

#[derive(Default)]
pub struct ControlsPanel {
    /// Layer-wise: the value of the "all layers" slider.
    all_layers: f64,
    /// Custom N:M being typed.
    custom: Option<(usize, usize)>,
    /// The user asked to run SparseGPT at the current settings, or to undo it.
    pub run_sparsegpt: bool,
    /// The user asked OWL to split the global target across layers.
    pub plan_owl: bool,
    pub undo: bool,
    /// The user asked for the sensitivity window.
    pub open_sensitivity: bool,
}

impl ControlsPanel {
    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState) {
        let Self {
            all_layers,
            custom,
            open_sensitivity,
            run_sparsegpt,
            plan_owl,
            undo,
        } = self;
        ui.heading("Prune");
        let Some(model) = state.model.as_ref() else {
            ui.label("Open a model to start.");
            return;
        };
        let tensors = &model.snapshot.tensors;
        let measured_now = model
            .metrics
            .as_ref()
            .filter(|_| state.metrics_current())
            .and_then(|m| m.result.as_ref().ok())
            .copied();
        let planning = state.planning();
        let has_data = model.eval.evaluator.is_some();
        let can_undo = model.snapshot.can_undo;
        let s = &mut state.settings;

        ui.add_space(4.0);
        ui.label(RichText::new("Scope").strong());
        let has_curves = state.sensitivity.as_ref().is_some_and(|c| c.complete)
            && s.pattern.fixed_sparsity().is_none();
        ui.horizontal(|ui| {
            ui.radio_value(&mut s.scope, Scope::Global, "Global")
                .on_hover_text(TIP_GLOBAL);
            ui.radio_value(&mut s.scope, Scope::Layer, "Layer-wise")
                .on_hover_text(TIP_LAYER);
        });
        ui.horizontal(|ui| {
            ui.add_enabled_ui(has_curves || s.scope == Scope::Sensitivity, |ui| {
                ui.radio_value(&mut s.scope, Scope::Sensitivity, "Sensitivity-guided")
                    .on_hover_text(TIP_SENSITIVITY_SCOPE)
                    .on_disabled_hover_text(
                        "Needs finished sensitivity curves (and an unstructured pattern): run them in View → Sensitivity.",
                    );
            });
            if ui
                .button("Sensitivity…")
                .on_hover_text("Measure how much each layer can take: each pruned alone across a grid of sparsities.")
                .clicked()
            {
                *open_sensitivity = true;
            }
        });

        let nm = s.pattern.fixed_sparsity();
        ui.add_space(6.0);
        match s.scope {
            Scope::Global => {
                let label = ui.label(RichText::new("Global sparsity").strong());
                let tip = if s.pattern == Pattern::Head {
                    TIP_SPARSITY_HEADS
                } else if s.pattern.structured() {
                    TIP_SPARSITY_STRUCTURED
                } else {
                    TIP_SPARSITY
                };
                ui.add_enabled_ui(nm.is_none(), |ui| {
                    percent_slider(ui, &mut s.sparsity, 0.0..=1.0)
                        .labelled_by(label.id)
                        .on_hover_text(tip)
                        .on_disabled_hover_text(
                            "An N:M pattern fixes the sparsity at 1 − N/M in every layer.",
                        );
                });
                let label = ui.label("Minimum kept per layer");
                percent_slider(ui, &mut s.min_keep, 0.0..=1.0)
                    .labelled_by(label.id)
                    .on_hover_text(TIP_MIN_KEEP);
                let owl_ok =
                    has_data && matches!(s.pattern, Pattern::Unstructured | Pattern::Block { .. });
                if ui
                    .add_enabled(owl_ok, egui::Button::new("Split by OWL"))
                    .on_hover_text(TIP_OWL)
                    .on_disabled_hover_text(format!(
                        "{TIP_OWL} It needs evaluation data and an unstructured or block pattern."
                    ))
                    .clicked()
                {
                    *plan_owl = true;
                }
            }
            Scope::Layer => {
                let label = ui.label(RichText::new("All layers").strong());
                ui.add_enabled_ui(nm.is_none(), |ui| {
                    let r = percent_slider(ui, all_layers, 0.0..=1.0)
                        .labelled_by(label.id)
                        .on_hover_text(TIP_ALL_LAYERS);
                    if r.changed() {
                        for info in tensors {
                            if s.prunable(&info.name, info.analysable, info.default_prunable) {
                                let l = s.layer_mut(&info.name);
                                if !l.locked {
                                    l.sparsity = *all_layers;
                                }
                            }
                        }
                    }
                });
                ui.label(RichText::new("Set single layers with the sliders in the table.").weak());
            }
            Scope::Sensitivity => {
                let label = ui.label(RichText::new("Global sparsity").strong());
                percent_slider(ui, &mut s.sparsity, 0.0..=1.0)
                    .labelled_by(label.id)
                    .on_hover_text(TIP_SPARSITY);
                let label = ui.label("Minimum kept per layer");
                percent_slider(ui, &mut s.min_keep, 0.0..=1.0)
                    .labelled_by(label.id)
                    .on_hover_text(TIP_MIN_KEEP);
                let label = ui.label("Rule");
                ComboBox::from_id_salt("rule")
                    .selected_text(s.rule.label())
                    .show_ui(ui, |ui| {
                        for r in crate::prune::Rule::ALL {
                            ui.selectable_value(&mut s.rule, r, r.label())
                                .on_hover_text(r.tooltip());
                        }
                    })
                    .response
                    .labelled_by(label.id)
                    .on_hover_text(TIP_RULE);
                match &state.plan {
                    Some(Ok(p)) => {
                        let measured = measured_now.as_ref().map(|m| p.metric.value(m));
                        ui.label(format!(
                            "Predicted {}: {:.4}{}",
                            p.metric.label(),
                            p.predicted,
                            measured.map_or(String::new(), |v| format!(", measured {v:.4}"))
                        ))
                        .on_hover_text("Predicted: the dense value minus the drops the curves give at each layer's planned sparsity (as if they added up). Measured: the plan evaluated.");
                        if !p.reached() {
                            ui.colored_label(
                                super::theme::CAPPED,
                                "The caps keep the target out of reach.",
                            );
                        }
                    }
                    Some(Err(e)) => {
                        ui.colored_label(super::theme::BAD, e);
                    }
                    None if planning => {
                        ui.label(RichText::new("Planning…").weak());
                    }
                    None => {
                        ui.label(
                            RichText::new("Restored targets (no prediction for them).").weak(),
                        );
                    }
                }
                ui.label(
                    RichText::new(
                        "The table's sliders show the plan; moving one makes it layer-wise.",
                    )
                    .weak(),
                );
            }
        }

        ui.add_space(6.0);
        let label = ui.label(RichText::new("Pattern").strong());
        pattern_ui(ui, &mut s.pattern, custom, label.id);
        if let Pattern::Block { b } = &mut s.pattern {
            ui.horizontal(|ui| {
                let label = ui.label("Block side");
                ui.add(DragValue::new(b).range(1..=64))
                    .labelled_by(label.id)
                    .on_hover_text(TIP_BLOCKS);
            });
        }
        if s.pattern == Pattern::Head {
            ui.label(
                RichText::new(
                    "The sparsity is the fraction of heads each attention block loses (rounded \
                     down, one kept); the weights lost include the output projection's inputs.",
                )
                .weak(),
            );
        } else if s.pattern.structured() {
            ui.horizontal(|ui| {
                let label = ui.label("Round widths to");
                ui.add(DragValue::new(&mut s.round_width).range(1..=256))
                    .labelled_by(label.id)
                    .on_hover_text(TIP_ROUND_WIDTH);
            });
            ui.label(
                RichText::new(
                    "The sparsity is the fraction of channels each group loses; the weights \
                     lost include the next layers' inputs.",
                )
                .weak(),
            );
        }

        ui.add_space(6.0);
        let label = ui.label(RichText::new("Criterion").strong());
        ComboBox::from_id_salt("criterion")
            .selected_text(s.criterion.label())
            .show_ui(ui, |ui| {
                for c in Criterion::ALL {
                    let why = unusable(c, has_data, s.pattern);
                    ui.add_enabled_ui(why.is_none(), |ui| {
                        ui.selectable_value(&mut s.criterion, c, c.label())
                            .on_hover_text(c.tooltip())
                            .on_disabled_hover_text(format!(
                                "{} {}",
                                c.tooltip(),
                                why.unwrap_or_default()
                            ));
                    });
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text(s.criterion.tooltip());
        if s.criterion.needs_data() {
            if has_data {
                ui.horizontal(|ui| {
                    let label = ui.label("Calibration samples");
                    ui.add(DragValue::new(&mut s.calibration).range(1..=100_000))
                        .labelled_by(label.id)
                        .on_hover_text(TIP_CALIBRATION);
                });
            } else {
                ui.colored_label(super::theme::CAPPED, TIP_NEEDS_DATA);
            }
        }
        ui.horizontal(|ui| {
            let ok = has_data && s.pattern == Pattern::Unstructured;
            if ui
                .add_enabled(ok, egui::Button::new("Run SparseGPT"))
                .on_hover_text(TIP_SPARSEGPT)
                .on_disabled_hover_text(format!(
                    "{TIP_SPARSEGPT} It needs evaluation data and the unstructured pattern."
                ))
                .clicked()
            {
                *run_sparsegpt = true;
            }
            if can_undo
                && ui
                    .button("Undo")
                    .on_hover_text("Back to the model before SparseGPT or training.")
                    .clicked()
            {
                *undo = true;
            }
        });
        if s.criterion.seeded() {
            ui.horizontal(|ui| {
                let label = ui.label("Seed");
                ui.add(DragValue::new(&mut s.seed))
                    .labelled_by(label.id)
                    .on_hover_text(TIP_SEED);
            });
        }

        ui.add_space(6.0);
        if ui
            .button("Reset to dense")
            .on_hover_text(TIP_RESET)
            .clicked()
        {
            *s = PruneSettings {
                criterion: s.criterion,
                seed: s.seed,
                calibration: s.calibration,
                scope: s.scope,
                ..Default::default()
            };
            *all_layers = 0.0;
        }

        ui.separator();
        selected_layer_ui(ui, state);
    }
}

/// A 0..=1 fraction edited as a percentage.
pub fn percent_slider(
    ui: &mut Ui,
    value: &mut f64,
    range: std::ops::RangeInclusive<f64>,
) -> egui::Response {
    let before = *value * 100.0;
    let mut pct = before;
    let mut r = ui.add(
        Slider::new(&mut pct, (range.start() * 100.0)..=(range.end() * 100.0))
            .suffix("%")
            .max_decimals(2),
    );
    // The slider rounds a value it only shows to its two decimals; that is not an edit (a
    // planned target of 78.5888…% must stay exact, or the plan's budget is off).
    let rounding_only = (pct - before).abs() <= 0.005 + 1e-9 && !r.dragged() && !r.has_focus();
    if r.changed() && !rounding_only {
        *value = (pct / 100.0).clamp(*range.start(), *range.end());
    } else if rounding_only {
        r.flags.remove(egui::response::Flags::CHANGED);
    }
    r
}

/// The current scope's per-layer limit of `name` as a slider: its own target in layer-wise
/// scope, its maximum sparsity in global scope (100% = no cap). Disabled while the layer is
/// locked. Returns the slider and the value it shows, in percent, for accessible names.
pub fn layer_limit_slider(
    ui: &mut Ui,
    s: &mut PruneSettings,
    name: &str,
    locked: bool,
) -> (egui::Response, f64) {
    let (mut v, tip) = match s.scope {
        Scope::Layer | Scope::Sensitivity => (s.layer(name).sparsity, super::table::TIP_TARGET),
        Scope::Global => (
            s.layer(name).max_sparsity.unwrap_or(1.0),
            super::table::TIP_MAX,
        ),
    };
    let r = ui
        .add_enabled_ui(!locked, |ui| percent_slider(ui, &mut v, 0.0..=1.0))
        .inner
        .on_hover_text(tip);
    if r.changed() {
        let scope = s.scope;
        let l = s.layer_mut(name);
        match scope {
            Scope::Layer => l.sparsity = v,
            // A hand edit of a planned layer makes the plan the user's own: layer-wise.
            Scope::Sensitivity => {
                l.sparsity = v;
                s.scope = Scope::Layer;
            }
            Scope::Global => l.max_sparsity = (v < 1.0).then_some(v),
        }
    }
    (r, v * 100.0)
}

fn pattern_ui(
    ui: &mut Ui,
    pattern: &mut Pattern,
    custom: &mut Option<(usize, usize)>,
    label: egui::Id,
) {
    let text = match (*pattern, custom.is_some()) {
        (_, true) => "custom N:M".to_string(),
        (p, false) => p.to_string(),
    };
    ComboBox::from_id_salt("pattern")
        .selected_text(text)
        .show_ui(ui, |ui| {
            if ui
                .selectable_label(
                    *pattern == Pattern::Unstructured && custom.is_none(),
                    "unstructured",
                )
                .clicked()
            {
                *pattern = Pattern::Unstructured;
                *custom = None;
            }
            for (n, m) in PRESETS {
                let p = Pattern::NM { n, m };
                if ui
                    .selectable_label(*pattern == p && custom.is_none(), p.to_string())
                    .clicked()
                {
                    *pattern = p;
                    *custom = None;
                }
            }
            if ui
                .selectable_label(matches!(*pattern, Pattern::Block { .. }), "blocks")
                .on_hover_text(TIP_BLOCKS)
                .clicked()
                && !matches!(*pattern, Pattern::Block { .. })
            {
                *pattern = Pattern::Block { b: 4 };
                *custom = None;
            }
            for (p, tip) in [
                (Pattern::Neuron, TIP_NEURON),
                (Pattern::Channel, TIP_CHANNEL),
                (Pattern::Head, TIP_HEAD),
            ] {
                if ui
                    .selectable_label(*pattern == p && custom.is_none(), p.to_string())
                    .on_hover_text(tip)
                    .clicked()
                {
                    *pattern = p;
                    *custom = None;
                }
            }
            if ui
                .selectable_label(custom.is_some(), "custom N:M")
                .clicked()
            {
                let (n, m) = match *pattern {
                    Pattern::NM { n, m } => (n, m),
                    _ => (2, 8),
                };
                *custom = Some((n, m));
                *pattern = Pattern::NM { n, m };
            }
        })
        .response
        .labelled_by(label)
        .on_hover_text(TIP_PATTERN);
    if let Some((n, m)) = custom {
        ui.horizontal(|ui| {
            let ln = ui.label("keep N");
            ui.add(DragValue::new(n).range(1..=255))
                .labelled_by(ln.id)
                .on_hover_text("Weights kept in every group.");
            let lm = ui.label("of M");
            ui.add(DragValue::new(m).range(2..=256))
                .labelled_by(lm.id)
                .on_hover_text("Size of each group of consecutive input weights.");
        });
        if *n >= *m {
            ui.colored_label(super::theme::BAD, "N must be smaller than M.");
        } else {
            *pattern = Pattern::NM { n: *n, m: *m };
        }
    }
    if let Some(s) = pattern.fixed_sparsity() {
        ui.label(RichText::new(format!("Every layer: {:.1}% sparse.", s * 100.0)).weak());
    }
}

/// Why criterion `c` cannot be chosen now, if it cannot: it needs data the model lacks, or a
/// granularity other than `pattern`.
pub fn unusable(c: Criterion, has_data: bool, pattern: Pattern) -> Option<&'static str> {
    if c.updates_weights() {
        Some(TIP_SPARSEGPT_MENU)
    } else if c.needs_data() && !has_data {
        Some(TIP_NEEDS_DATA)
    } else if c.channels_only() && !pattern.structured() {
        Some(TIP_NEEDS_STRUCTURE)
    } else {
        None
    }
}

/// The dependency groups that slice `name`: what goes with each of its channels.
fn group_ui(
    ui: &mut Ui,
    groups: &Result<std::sync::Arc<crate::graph::Groups>, String>,
    name: &str,
) {
    let Ok(groups) = groups else {
        return;
    };
    for g in groups.containing(name) {
        let role = match g.members.iter().find(|m| m.tensor == name) {
            Some(m) if m.axis == 0 => "its output channels",
            _ => "its input channels",
        };
        let others: Vec<String> = g
            .members
            .iter()
            .filter(|m| m.tensor != name)
            .map(|m| format!("{} (axis {})", m.tensor, m.axis))
            .collect();
        let what = match g.head_dim {
            Some(d) => format!(
                "Attention heads: {} of {d} features, with {} other tensor(s)",
                g.channels,
                others.len()
            ),
            None => format!(
                "Dependency group of {role}: {} channels, with {} other tensor(s)",
                g.channels,
                others.len()
            ),
        };
        ui.label(what).on_hover_text(format!(
            "{TIP_GROUP}\n\nMoves together with:\n{}",
            others.join("\n")
        ));
    }
    if let Some(b) = groups
        .blocked
        .iter()
        .find(|b| b.tensors.iter().any(|t| t == name))
    {
        ui.label(
            RichText::new(format!(
                "Its {} channels cannot be removed: {}.",
                b.channels, b.why
            ))
            .weak(),
        );
    }
}

fn selected_layer_ui(ui: &mut Ui, state: &mut AppState) {
    let (Some(model), Some(t)) = (state.model.as_ref(), state.selected) else {
        ui.label("Select a layer in the table.");
        return;
    };
    let Some(info) = model.snapshot.tensors.get(t) else {
        return;
    };
    ui.label(RichText::new("Selected layer").strong());
    ui.label(RichText::new(&info.name).monospace());
    ui.label(format!(
        "{:?} {}, {} parameters",
        info.shape,
        info.dtype,
        group_digits(info.numel as u64)
    ));
    if let Some(l) = model.preview.as_ref().and_then(|p| p.alloc.for_tensor(t)) {
        ui.label(format!(
            "{} kept, {} pruned ({:.2}%)",
            group_digits(l.kept() as u64),
            group_digits(l.pruned as u64),
            l.sparsity() * 100.0
        ));
        if l.capped {
            ui.colored_label(
                super::theme::CAPPED,
                "Held at its cap (lock, minimum kept or maximum sparsity).",
            );
        }
    }
    group_ui(ui, &model.snapshot.groups, &info.name);
    if info.nan > 0 || info.inf > 0 {
        ui.colored_label(
            super::theme::BAD,
            format!("{} NaN, {} ±Inf weights", group_digits(info.nan), group_digits(info.inf)),
        )
        .on_hover_text("NaN scores rank below every number (pruned first); ±Inf rank above every number (kept last).");
    }
    if !info.analysable {
        ui.label(format!(
            "{} tensors are listed but cannot be pruned.",
            info.dtype
        ));
        return;
    }
    let name = info.name.clone();
    let default_prunable = info.default_prunable;
    let s = &mut state.settings;
    let mut prunable = s.prunable(&name, true, default_prunable);
    if ui
        .checkbox(&mut prunable, "Prunable")
        .on_hover_text(super::table::TIP_PRUNABLE)
        .changed()
    {
        s.set_prunable(&name, prunable, default_prunable);
    }
    if !prunable {
        return;
    }
    let mut locked = s.layer(&name).locked;
    if ui
        .checkbox(&mut locked, "Lock dense")
        .on_hover_text(super::table::TIP_LOCK)
        .changed()
    {
        s.layer_mut(&name).locked = locked;
    }
    let label = ui.label(match s.scope {
        Scope::Layer | Scope::Sensitivity => "Layer sparsity",
        Scope::Global => "Maximum sparsity",
    });
    let (r, _) = layer_limit_slider(ui, s, &name, locked);
    r.labelled_by(label.id);
}
