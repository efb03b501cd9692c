//! The layer table: every tensor, grouped by module path, sortable within groups.

use std::collections::{HashMap, HashSet};

use egui::{Checkbox, RichText, Role, Sense, Ui, WidgetInfo};
use egui_extras::{Column, TableBuilder};

use super::app::AppState;
use super::controls::layer_limit_slider;
use super::theme;
use crate::prune::Scope;
use crate::util::{group_digits, natural_cmp};
use crate::worker::ModelSnapshot;

pub const TIP_LINKED: &str = "in the selected layer's dependency group: removing one of its channels removes the matching slice here too.";
pub const TIP_PRUNABLE: &str = "Include this tensor in pruning. By default every floating tensor with 2 or more dimensions is; biases and norms are not.";
pub const TIP_LOCK: &str = "Lock: keep this layer dense whatever the other settings say (first and last layers are often locked because they are small and sensitive).";
pub const TIP_TARGET: &str = "This layer's own target sparsity (layer-wise scope).";
pub const TIP_MAX: &str = "Upper bound on this layer's sparsity in global scope; the weights it keeps are pruned from other layers instead.";
const TIP_THRESHOLD: &str =
    "The largest |w| that is pruned: every weight at or below it goes (ties broken by position).";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortBy {
    /// Order in the file (natural name order, which follows the layers).
    #[default]
    Order,
    Params,
    Sparsity,
    Kept,
}

#[derive(Default)]
pub struct LayerTable {
    sort: SortBy,
    descending: bool,
    collapsed: HashSet<String>,
    filter: String,
    /// The rows of the last frame and what they were derived from: grouping and sorting a
    /// model of a million tensors is work for a change of view, not for every frame.
    rows: Option<(RowsKey, Vec<Row>)>,
}

/// What the table's rows depend on.
#[derive(Clone, PartialEq)]
struct RowsKey {
    model: u64,
    filter: String,
    sort: SortBy,
    descending: bool,
    collapsed: Vec<String>,
    /// The preview the rows were sorted by, when sorting by a pruning result.
    preview: Option<u64>,
}

enum Row {
    Group {
        module: String,
        tensors: usize,
        params: u64,
    },
    Tensor(usize),
}

fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(m, _)| m)
}

impl LayerTable {
    pub fn ui(&mut self, ui: &mut Ui, state: &mut AppState, snapshot: &ModelSnapshot) {
        let Self {
            sort,
            descending,
            collapsed,
            filter,
            rows: rows_cache,
        } = self;
        ui.horizontal(|ui| {
            ui.heading(&snapshot.name);
            ui.label(
                RichText::new(format!(
                    "{} · {} tensors · {} parameters",
                    snapshot.format,
                    snapshot.tensors.len(),
                    group_digits(snapshot.total_params)
                ))
                .weak(),
            );
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if !filter.is_empty()
                    && ui
                        .small_button("×")
                        .on_hover_text("Clear the filter")
                        .clicked()
                {
                    filter.clear();
                }
                let r = ui.add(
                    egui::TextEdit::singleline(filter)
                        .hint_text("filter by name")
                        .desired_width(160.0),
                );
                r.on_hover_text("Show only tensors whose name contains this text.");
            });
        });

        let alloc = state.model.as_ref().and_then(|m| m.preview.clone());
        let layer_of = |t: usize| alloc.as_ref().and_then(|p| p.alloc.for_tensor(t));
        let key = RowsKey {
            model: snapshot.id,
            filter: filter.clone(),
            sort: *sort,
            descending: *descending,
            collapsed: {
                let mut c: Vec<String> = collapsed.iter().cloned().collect();
                c.sort_unstable();
                c
            },
            preview: match sort {
                SortBy::Sparsity | SortBy::Kept => alloc.as_ref().map(|p| p.generation),
                SortBy::Order | SortBy::Params => None,
            },
        };
        if rows_cache.as_ref().is_none_or(|(k, _)| *k != key) {
            let rows = build_rows(snapshot, &key, collapsed, &layer_of);
            *rows_cache = Some((key, rows));
        }
        let rows: &[Row] = rows_cache.as_ref().map_or(&[], |(_, r)| r.as_slice());

        let scope = state.settings.scope;
        let magnitude = state.settings.criterion.orders_as_magnitude();
        // Tensors that move with the selected layer: they share a dependency group.
        let linked: std::collections::HashSet<String> = match (&snapshot.groups, state.selected) {
            (Ok(g), Some(sel)) => snapshot
                .tensors
                .get(sel)
                .map_or_else(Default::default, |i| {
                    g.containing(&i.name)
                        .flat_map(|g| g.members.iter().map(|m| m.tensor.clone()))
                        .filter(|n| *n != i.name)
                        .collect()
                }),
            _ => Default::default(),
        };
        let mut clicked = None;
        let mut toggle_group = None;
        let mut header_click = None;
        // Selectable labels would swallow the clicks that select a row.
        ui.style_mut().interaction.selectable_labels = false;
        TableBuilder::new(ui)
            .striped(true)
            .sense(Sense::click())
            .cell_layout(egui::Layout::left_to_right(egui::Align::Center))
            .column(Column::exact(22.0))
            .column(Column::initial(250.0).at_least(120.0).resizable(true).clip(true))
            .column(Column::initial(110.0).resizable(true).clip(true))
            .column(Column::initial(90.0))
            .column(Column::initial(110.0))
            .column(Column::initial(90.0))
            .column(Column::initial(90.0))
            .column(Column::initial(150.0))
            .column(Column::remainder().at_least(30.0))
            .header(theme::ROW_HEIGHT, |mut h| {
                h.col(|ui| {
                    ui.strong("On").on_hover_text(TIP_PRUNABLE);
                });
                let mut sortable = |h: &mut egui_extras::TableRow<'_, '_>, label: &str, by: SortBy, tip: &str| {
                    h.col(|ui| {
                        let arrow = match (*sort == by, *descending) {
                            (true, false) => " ▲",
                            (true, true) => " ▼",
                            _ => "",
                        };
                        let r = ui.add(egui::Button::new(RichText::new(format!("{label}{arrow}")).strong()).frame(false));
                        if r.on_hover_text(tip).clicked() {
                            header_click = Some(by);
                        }
                    });
                };
                sortable(&mut h, "Name", SortBy::Order, "Tensor name; click to sort in file order.");
                h.col(|ui| {
                    ui.strong("Shape");
                });
                sortable(&mut h, "Params", SortBy::Params, "Number of weights; click to sort.");
                sortable(&mut h, "Sparsity", SortBy::Sparsity, "Fraction of this tensor's weights pruned; click to sort.");
                h.col(|ui| {
                    ui.strong("Threshold").on_hover_text(TIP_THRESHOLD);
                });
                sortable(&mut h, "Kept", SortBy::Kept, "Weights that survive; click to sort.");
                h.col(|ui| {
                    let (t, tip) = match scope {
                        Scope::Layer | Scope::Sensitivity => ("Target", TIP_TARGET),
                        Scope::Global => ("Max sparsity", TIP_MAX),
                    };
                    ui.strong(t).on_hover_text(tip);
                });
                h.col(|ui| {
                    ui.strong("Lock").on_hover_text(TIP_LOCK);
                });
            })
            .body(|body| {
                body.rows(theme::ROW_HEIGHT, rows.len(), |mut row| {
                    match &rows[row.index()] {
                        Row::Group { module, tensors, params } => {
                            let folded = collapsed.contains(module);
                            row.col(|ui| {
                                ui.label(if folded { "▸" } else { "▾" });
                            });
                            row.col(|ui| {
                                let name = if module.is_empty() { "(top level)" } else { module };
                                ui.label(RichText::new(name).strong());
                            });
                            row.col(|ui| {
                                let noun = if *tensors == 1 { "tensor" } else { "tensors" };
                                ui.label(RichText::new(format!("{tensors} {noun}")).weak());
                            });
                            row.col(|ui| {
                                ui.label(RichText::new(group_digits(*params)).weak());
                            });
                            for _ in 0..5 {
                                row.col(|_| {});
                            }
                            if row.response().clicked() {
                                toggle_group = Some(module.clone());
                            }
                        }
                        Row::Tensor(t) => {
                            let t = *t;
                            let info = &snapshot.tensors[t];
                            row.set_selected(state.selected == Some(t));
                            let s = &mut state.settings;
                            let prunable_default = info.default_prunable;
                            let mut prunable = s.prunable(&info.name, info.analysable, prunable_default);
                            row.col(|ui| {
                                let r = ui.add_enabled(info.analysable, Checkbox::without_text(&mut prunable));
                                r.widget_info(|| {
                                    WidgetInfo::selected(Role::CheckBox, info.analysable, prunable, format!("prunable {}", info.name))
                                });
                                if r.on_hover_text(TIP_PRUNABLE).changed() {
                                    s.set_prunable(&info.name, prunable, prunable_default);
                                }
                            });
                            row.col(|ui| {
                                let indent = if module_of(&info.name).is_empty() { "" } else { "  " };
                                let leaf = info.name.rsplit_once('.').map_or(info.name.as_str(), |(_, l)| l);
                                let text = RichText::new(format!("{indent}{leaf}")).monospace();
                                if linked.contains(&info.name) {
                                    ui.label(text.color(theme::THRESHOLD).underline())
                                        .on_hover_text(format!("{}: {TIP_LINKED}", info.name));
                                } else {
                                    ui.label(text).on_hover_text(&info.name);
                                }
                            });
                            row.col(|ui| {
                                let shape = format!("{:?}", info.shape);
                                if info.dtype == "F32" {
                                    ui.label(shape);
                                } else {
                                    ui.label(format!("{shape} {}", info.dtype));
                                }
                            });
                            row.col(|ui| {
                                ui.label(group_digits(info.numel as u64));
                            });
                            let l = layer_of(t).filter(|_| prunable);
                            row.col(|ui| {
                                if let Some(l) = l {
                                    let colour = if l.capped { theme::CAPPED } else { theme::PRUNED };
                                    let r = fraction_bar(ui, l.sparsity() as f32, colour, &format!("{:.1}%", l.sparsity() * 100.0));
                                    if l.capped {
                                        r.on_hover_text("Held at its cap: locked, minimum kept or maximum sparsity.");
                                    }
                                } else if info.nan + info.inf > 0 {
                                    ui.colored_label(theme::BAD, format!("{} non-finite", info.nan + info.inf));
                                } else {
                                    ui.label(RichText::new("—").weak());
                                }
                            });
                            row.col(|ui| match l.and_then(|l| l.threshold) {
                                Some(th) if magnitude => {
                                    ui.label(format_threshold(th));
                                }
                                _ => {
                                    ui.label(RichText::new("—").weak());
                                }
                            });
                            row.col(|ui| {
                                if let Some(l) = l {
                                    ui.label(group_digits(l.kept() as u64));
                                }
                            });
                            let mut locked = s.layer(&info.name).locked;
                            row.col(|ui| {
                                if !prunable {
                                    return;
                                }
                                ui.spacing_mut().slider_width = 80.0;
                                let what = match scope {
                                    Scope::Layer | Scope::Sensitivity => "target",
                                    Scope::Global => "max sparsity",
                                };
                                let (r, pct) = layer_limit_slider(ui, s, &info.name, locked);
                                r.widget_info(|| WidgetInfo::slider(true, pct, format!("{what} {}", info.name)));
                            });
                            row.col(|ui| {
                                if !prunable {
                                    return;
                                }
                                let r = ui.add(Checkbox::without_text(&mut locked));
                                r.widget_info(|| {
                                    WidgetInfo::selected(Role::CheckBox, true, locked, format!("lock {}", info.name))
                                });
                                if r.on_hover_text(TIP_LOCK).changed() {
                                    s.layer_mut(&info.name).locked = locked;
                                }
                            });
                            if row.response().clicked() {
                                clicked = Some(t);
                            }
                        }
                    }
                });
            });
        if let Some(by) = header_click {
            if *sort == by {
                *descending = !*descending;
            } else {
                *sort = by;
                *descending = by != SortBy::Order;
            }
        }
        if let Some(m) = toggle_group
            && !collapsed.remove(&m)
        {
            collapsed.insert(m);
        }
        if let Some(t) = clicked {
            state.selected = Some(t);
        }
    }
}

/// Groups the (filtered) tensors by module, in file order, and sorts each group.
fn build_rows<'a>(
    snapshot: &ModelSnapshot,
    key: &RowsKey,
    collapsed: &HashSet<String>,
    layer_of: &dyn Fn(usize) -> Option<&'a crate::prune::LayerAlloc>,
) -> Vec<Row> {
    let filter = key.filter.to_lowercase();
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut group_at: HashMap<&str, usize> = HashMap::new();
    for (t, info) in snapshot.tensors.iter().enumerate() {
        if !filter.is_empty() && !info.name.to_lowercase().contains(&filter) {
            continue;
        }
        let m = module_of(&info.name);
        match group_at.get(m) {
            Some(&g) => groups[g].1.push(t),
            None => {
                group_at.insert(m, groups.len());
                groups.push((m.to_string(), vec![t]));
            }
        }
    }
    let sort_key = |t: usize| -> f64 {
        match key.sort {
            SortBy::Order => t as f64,
            SortBy::Params => snapshot.tensors[t].numel as f64,
            SortBy::Sparsity => layer_of(t).map_or(-1.0, |l| l.sparsity()),
            SortBy::Kept => {
                layer_of(t).map_or(snapshot.tensors[t].numel as f64, |l| l.kept() as f64)
            }
        }
    };
    let mut rows = Vec::new();
    for (module, mut ts) in groups {
        if key.sort == SortBy::Order {
            ts.sort_by(|&a, &b| natural_cmp(&snapshot.tensors[a].name, &snapshot.tensors[b].name));
        } else {
            ts.sort_by(|&a, &b| sort_key(a).total_cmp(&sort_key(b)));
        }
        if key.descending {
            ts.reverse();
        }
        let params = ts.iter().map(|&t| snapshot.tensors[t].numel as u64).sum();
        let folded = collapsed.contains(&module);
        rows.push(Row::Group {
            module,
            tensors: ts.len(),
            params,
        });
        if !folded {
            rows.extend(ts.into_iter().map(Row::Tensor));
        }
    }
    rows
}

/// Thresholds span many decades across layers; keep 3 significant digits.
pub fn format_threshold(t: f32) -> String {
    let a = t.abs();
    if a == 0.0 || (1e-3..1e4).contains(&a) {
        format!("{:.4}", t)
    } else {
        format!("{:.3e}", t)
    }
}

/// A thin horizontal bar filled to `f`, with a label beside it.
fn fraction_bar(ui: &mut Ui, f: f32, colour: egui::Color32, text: &str) -> egui::Response {
    let (rect, r) = ui.allocate_exact_size(egui::vec2(50.0, 8.0), Sense::hover());
    let p = ui.painter();
    p.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
    let mut fill = rect;
    fill.set_width(rect.width() * f.clamp(0.0, 1.0));
    p.rect_filled(fill, 2.0, colour);
    ui.label(text);
    r
}
