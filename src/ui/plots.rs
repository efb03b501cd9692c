//! The selected layer's weight histogram and the per-layer sparsity overview.

use egui::{RichText, Ui};
use egui_plot::{Bar, BarChart, Legend, Plot, VLine};

use super::app::ModelView;
use super::table::format_threshold;
use super::theme;
use crate::prune::{Criterion, Pattern, PruneSettings};
use crate::util::group_digits;

/// Most bars the per-layer overview draws; more layers share bars.
const MAX_BARS: usize = 512;

#[derive(Default)]
pub struct HistogramPanel {
    /// Tensor shown last frame, to reset the plot's zoom when the selection changes.
    shown: Option<usize>,
}

impl HistogramPanel {
    pub fn ui(
        &mut self,
        ui: &mut Ui,
        model: &ModelView,
        settings: &PruneSettings,
        selected: Option<usize>,
        log_y: bool,
    ) {
        let Self { shown } = self;
        let Some(t) = selected else {
            ui.label("Select a layer to see its weights.");
            return;
        };
        let info = &model.snapshot.tensors[t];
        let Some(hist) = model.snapshot.histograms.get(t).and_then(|h| h.clone()) else {
            ui.label(format!(
                "{}: {} tensors have no weight histogram.",
                info.name, info.dtype
            ));
            return;
        };
        let split = model
            .detail
            .as_ref()
            .filter(|d| d.tensor == t)
            .map(|d| &d.split);
        let alloc = model.preview.as_ref().and_then(|p| p.alloc.for_tensor(t));
        ui.horizontal(|ui| {
            ui.label(RichText::new(&info.name).strong().monospace());
            ui.label(
                RichText::new(format!("{} bins over [{:.4}, {:.4}]", hist.bins(), hist.lo, hist.hi)).weak(),
            );
            if hist.non_finite() > 0 {
                ui.colored_label(theme::BAD, format!("{} NaN/±Inf not drawn", group_digits(hist.non_finite())))
                    .on_hover_text("NaN scores rank below every number (pruned first); ±Inf above every number (kept last).");
            }
        });
        let note = match (settings.pattern, settings.criterion) {
            (Pattern::NM { n, m }, _) => Some(format!(
                "{n}:{m} has no single threshold: each group of {m} keeps its {n} largest."
            )),
            (_, Criterion::Random) => {
                Some("Random scores: pruned weights are spread over every magnitude.".to_string())
            }
            (_, c) if !c.orders_as_magnitude() => Some(format!(
                "{} scores are not |w|: no single threshold on this histogram; the mask shows where the cut falls.",
                c.label()
            )),
            _ => None,
        };
        if let Some(n) = note {
            ui.label(RichText::new(n).weak());
        }

        let width = hist.bin_width();
        let f = |c: u64| {
            if log_y {
                (1.0 + c as f64).log10()
            } else {
                c as f64
            }
        };
        let mut kept = Vec::with_capacity(hist.bins());
        let mut pruned = Vec::with_capacity(hist.bins());
        for i in 0..hist.bins() {
            let x = hist.lo as f64 + (i as f64 + 0.5) * width;
            let range = format!("[{:.4}, {:.4})", x - width / 2.0, x + width / 2.0);
            let (k, p) = match split {
                Some(s) => (s.kept[i], s.pruned[i]),
                None => (hist.counts[i], 0),
            };
            let hk = f(k);
            let ht = f(k + p);
            kept.push(
                Bar::new(x, hk)
                    .width(width)
                    .name(format!("{range}\n{} kept", group_digits(k))),
            );
            if p > 0 {
                pruned.push(
                    Bar::new(x, ht - hk)
                        .base_offset(hk)
                        .width(width)
                        .name(format!(
                            "{range}\n{} pruned, {} kept",
                            group_digits(p),
                            group_digits(k)
                        )),
                );
            }
        }
        let formatter = || {
            Box::new(|b: &Bar, _: &BarChart| b.name.clone())
                as Box<dyn Fn(&Bar, &BarChart) -> String>
        };
        let mut plot = Plot::new("histogram")
            .legend(Legend::default())
            .allow_scroll(false)
            .y_axis_label(if log_y { "count (log)" } else { "count" })
            .x_axis_label("weight value");
        if log_y {
            plot = plot.y_axis_formatter(|m, _| {
                let v = 10f64.powf(m.value) - 1.0;
                if v < 0.5 {
                    String::new()
                } else {
                    group_digits(v.round() as u64)
                }
            });
        }
        if *shown != Some(t) {
            plot = plot.reset();
            *shown = Some(t);
        }
        let threshold = alloc.and_then(|l| l.threshold).filter(|_| {
            settings.pattern == Pattern::Unstructured && settings.criterion.orders_as_magnitude()
        });
        plot.show(ui, |p| {
            p.bar_chart(
                BarChart::new("kept", kept)
                    .color(theme::KEPT)
                    .element_formatter(formatter()),
            );
            p.bar_chart(
                BarChart::new("pruned", pruned)
                    .color(theme::PRUNED)
                    .element_formatter(formatter()),
            );
            if let Some(th) = threshold {
                let name = format!("threshold ±{}", format_threshold(th));
                p.vline(
                    VLine::new(name.clone(), th as f64)
                        .color(theme::THRESHOLD)
                        .width(1.5),
                );
                p.vline(
                    VLine::new(name, -th as f64)
                        .color(theme::THRESHOLD)
                        .width(1.5),
                );
            }
        });
    }
}

/// Per-layer sparsity as bars; clicking a bar selects that layer.
pub struct OverviewPanel;

impl OverviewPanel {
    pub fn ui(
        &mut self,
        ui: &mut Ui,
        model: &ModelView,
        settings: &PruneSettings,
    ) -> Option<usize> {
        let Some(preview) = model.preview.as_ref() else {
            ui.label("Computing…");
            return None;
        };
        ui.label(RichText::new("Sparsity per layer").strong())
            .on_hover_text(
                "How the cut is spread over the layers; click a bar to select its layer.",
            );
        let layers = &preview.alloc.layers;
        // One bar per layer up to MAX_BARS; past that (models of thousands of tensors) each bar
        // is a run of consecutive layers, at their weight-weighted sparsity, so the chart stays
        // readable and costs the same per frame whatever the model.
        let per_bar = layers.len().div_ceil(MAX_BARS).max(1);
        let bars: Vec<Bar> = layers
            .chunks(per_bar)
            .enumerate()
            .map(|(i, run)| {
                let numel: usize = run.iter().map(|l| l.numel).sum();
                let pruned: usize = run.iter().map(|l| l.pruned).sum();
                let sparsity = if numel == 0 {
                    0.0
                } else {
                    pruned as f64 / numel as f64
                };
                let capped = run.iter().any(|l| {
                    l.capped
                        || settings
                            .layer(&model.snapshot.tensors[l.tensor].name)
                            .locked
                });
                let colour = if capped { theme::CAPPED } else { theme::PRUNED };
                let first = &model.snapshot.tensors[run[0].tensor].name;
                let label = match run {
                    [l] => format!(
                        "{first}\n{:.2}% pruned{}",
                        sparsity * 100.0,
                        if l.capped { " (at cap)" } else { "" }
                    ),
                    _ => format!(
                        "{} layers from {first}\n{:.2}% pruned together",
                        run.len(),
                        sparsity * 100.0
                    ),
                };
                Bar::new(i as f64, sparsity * 100.0)
                    .width(0.8)
                    .fill(colour)
                    .name(label)
            })
            .collect();
        let r = Plot::new("overview")
            .allow_drag(false)
            .allow_zoom(false)
            .allow_scroll(false)
            .allow_boxed_zoom(false)
            .include_y(0.0)
            .include_y(100.0)
            .y_axis_label("% pruned")
            .x_axis_formatter(|_, _| String::new())
            .show(ui, |p| {
                p.bar_chart(
                    BarChart::new("sparsity", bars)
                        .element_formatter(Box::new(|b: &Bar, _: &BarChart| b.name.clone())),
                );
                p.pointer_coordinate()
            });
        if r.response.clicked() {
            let x = r.inner?.x.round();
            if x >= 0.0 {
                return layers.get(x as usize * per_bar).map(|l| l.tensor);
            }
        }
        None
    }
}
