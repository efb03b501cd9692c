//! The latency window: what the current cut buys in time, per layer and storage format, on the
//! CPU or a GPU adapter, with the cost model and the flags that say when a format won't pay.

use egui::{Color32, Context, RichText, Ui};
use egui_plot::{Bar, BarChart, HLine, Legend, Line, LineStyle, Plot, PlotPoints, Points};

use super::app::AppState;
use super::theme;
use crate::latency::{DEFAULT_BATCHES, Device, Format, LatencyReport, LatencySpec};

pub const TIP_RUN: &str = "Run every prunable layer, with the current masks, in each storage format at each batch size, and time it: what the cut buys on this machine.";
pub const TIP_BATCH: &str = "Inputs per call. Batch 1 (decode-like) reads every weight for one input, so it is bound by memory bandwidth; large batches reuse each weight and become compute-bound.";
pub const TIP_DEVICE: &str = "Where the kernels run: this CPU, or the GPU adapter wgpu finds (compute shaders). Without a GPU, wgpu falls back to a software adapter whose timings are labelled and say nothing about hardware.";
pub const TIP_BLOCK: &str = "Side of the blocks of the block-sparse format: a block is stored, densely, when any weight in it is kept.";
pub const TIP_CURVES: &str = "Also time the largest layer across a range of sparsities in every format, each with the structure it prefers: the speedup-against-sparsity chart.";

const FORMAT_COLORS: [Color32; 6] = [
    Color32::from_rgb(0x99, 0x99, 0x99),
    Color32::from_rgb(0xCC, 0x79, 0xA7),
    Color32::from_rgb(0x00, 0x72, 0xB2),
    Color32::from_rgb(0x00, 0x9E, 0x73),
    Color32::from_rgb(0xE6, 0x9F, 0x00),
    Color32::from_rgb(0xD5, 0x5E, 0x00),
];

fn color(f: Format) -> Color32 {
    FORMAT_COLORS[Format::ALL.iter().position(|g| *g == f).unwrap_or(0)]
}

pub enum LatencyAction {
    Run(LatencySpec),
    Cancel,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chart {
    Curves,
    Layers,
    Rho,
    Fit,
    Sizes,
}

pub struct LatencyPanel {
    pub open: bool,
    batches: [bool; 4],
    device: Device,
    block: usize,
    curves: bool,
    chart: Chart,
    /// The batch size the charts show.
    view_batch: usize,
}

impl Default for LatencyPanel {
    fn default() -> Self {
        LatencyPanel {
            open: false,
            batches: [true; 4],
            device: Device::Cpu,
            block: 4,
            curves: true,
            chart: Chart::Curves,
            view_batch: 1,
        }
    }
}

impl LatencyPanel {
    pub fn ui(&mut self, ctx: &Context, state: &AppState) -> Option<LatencyAction> {
        if !self.open {
            return None;
        }
        let mut open = self.open;
        let mut action = None;
        egui::Window::new("Latency")
            .open(&mut open)
            .default_pos([360.0, 60.0])
            .default_width(820.0)
            .default_height(680.0)
            .resizable(true)
            .show(ctx, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| action = self.contents(ui, state));
            });
        self.open = open;
        action
    }

    fn contents(&mut self, ui: &mut Ui, state: &AppState) -> Option<LatencyAction> {
        let mut action = None;
        if state.model.is_none() {
            ui.label("No model open.");
            return None;
        }
        let job = state.jobs.iter().find(|j| j.label == "Latency");
        ui.label(
            RichText::new(
                "Every prunable layer with the current masks, run as its 2-D matrix (a conv \
                 as out × in·kh·kw) in each storage format, timed as a median after warm-up.",
            )
            .weak(),
        );
        ui.horizontal(|ui| {
            ui.label("Batch").on_hover_text(TIP_BATCH);
            for (i, b) in DEFAULT_BATCHES.iter().enumerate() {
                ui.checkbox(&mut self.batches[i], b.to_string())
                    .on_hover_text(TIP_BATCH);
            }
            ui.separator();
            ui.label("Device").on_hover_text(TIP_DEVICE);
            ui.radio_value(&mut self.device, Device::Cpu, "CPU")
                .on_hover_text(TIP_DEVICE);
            ui.radio_value(&mut self.device, Device::Gpu, "GPU (wgpu)")
                .on_hover_text(TIP_DEVICE);
            ui.separator();
            let l = ui.label("Block").on_hover_text(TIP_BLOCK);
            ui.add(egui::DragValue::new(&mut self.block).range(1..=64))
                .labelled_by(l.id)
                .on_hover_text(TIP_BLOCK);
            ui.checkbox(&mut self.curves, "Speedup curves")
                .on_hover_text(TIP_CURVES);
        });
        let batches: Vec<usize> = DEFAULT_BATCHES
            .iter()
            .zip(self.batches)
            .filter(|(_, on)| *on)
            .map(|(b, _)| *b)
            .collect();
        ui.horizontal(|ui| {
            let ok = job.is_none() && !batches.is_empty();
            if ui
                .add_enabled(ok, egui::Button::new("Measure latency"))
                .on_hover_text(TIP_RUN)
                .on_disabled_hover_text(if batches.is_empty() {
                    "Choose at least one batch size."
                } else {
                    "A latency run is going."
                })
                .clicked()
            {
                action = Some(LatencyAction::Run(LatencySpec {
                    batches: batches.clone(),
                    device: self.device,
                    block: self.block,
                    curves: self.curves,
                    ..Default::default()
                }));
            }
            if job.is_some()
                && ui
                    .button("Cancel")
                    .on_hover_text("Stop timing; the layers measured so far stay on the charts.")
                    .clicked()
            {
                action = Some(LatencyAction::Cancel);
            }
        });
        if let Some(j) = job {
            ui.add(
                egui::ProgressBar::new(j.fraction)
                    .text(format!("Latency: {}", j.message))
                    .show_percentage(),
            );
        }
        let Some(r) = state.latency.clone() else {
            ui.label("Nothing measured yet: press Measure latency.");
            return action;
        };
        let device = r.device.label();
        if r.device.software {
            ui.colored_label(theme::CAPPED, device);
        } else {
            ui.label(device);
        }
        ui.label(format!(
            "{} layers{} — {} measurements, {} from the cache, {:.1} s",
            r.layers.len(),
            match (r.complete, job.is_some()) {
                (true, _) => "",
                (false, true) => " so far",
                (false, false) => " (unfinished)",
            },
            r.measured,
            r.cached,
            r.elapsed_ms / 1e3
        ));
        if !r.batches.contains(&self.view_batch) {
            self.view_batch = r.batches.first().copied().unwrap_or(1);
        }
        ui.horizontal(|ui| {
            ui.label("Show batch");
            for &b in &r.batches {
                ui.radio_value(&mut self.view_batch, b, b.to_string())
                    .on_hover_text(TIP_BATCH);
            }
        });
        self.totals(ui, &r);
        ui.horizontal(|ui| {
            for (c, label, tip) in [
                (
                    Chart::Curves,
                    "Speedup vs sparsity",
                    "Speedup over dense of the largest layer at each sparsity, per format, against the theoretical 1/(1−s).",
                ),
                (
                    Chart::Layers,
                    "Per-layer speedup",
                    "Each layer's speedup over its own dense time with the current masks, per format.",
                ),
                (
                    Chart::Rho,
                    "Realized efficiency ρ",
                    "ρ = measured speedup / theoretical speedup 1/(1−s): 1 means the format skips every pruned weight for free.",
                ),
                (
                    Chart::Fit,
                    "Cost model",
                    "T = β·s + γ·B + τ fitted to the measurements: s stored values, B rows, N:M groups or blocks, τ per call.",
                ),
                (
                    Chart::Sizes,
                    "Sizes",
                    "Bytes of the model in each storage format for the current masks, raw and compressed by zstd.",
                ),
            ] {
                ui.selectable_value(&mut self.chart, c, label).on_hover_text(tip);
            }
        });
        match self.chart {
            Chart::Curves => self.curves_chart(ui, &r),
            Chart::Layers => self.layer_bars(ui, &r, false),
            Chart::Rho => self.layer_bars(ui, &r, true),
            Chart::Fit => self.fit_chart(ui, &r),
            Chart::Sizes => sizes_chart(ui, state),
        }
        let flags: Vec<_> = r
            .flags
            .iter()
            .filter(|f| f.kind != "memory-bound" || self.view_batch == 1)
            .collect();
        if !flags.is_empty() {
            ui.separator();
            ui.label(RichText::new("What to watch").strong());
            let shown = 8;
            for f in flags.iter().take(shown) {
                ui.colored_label(theme::CAPPED, format!("• {}", f.text));
            }
            if flags.len() > shown {
                egui::CollapsingHeader::new(format!("{} more", flags.len() - shown))
                    .id_salt("latency-more-flags")
                    .show(ui, |ui| {
                        for f in flags.iter().skip(shown) {
                            ui.colored_label(theme::CAPPED, format!("• {}", f.text));
                        }
                    });
            }
        }
        for s in &r.skipped {
            ui.colored_label(theme::BAD, format!("skipped: {s}"));
        }
        ui.label(RichText::new(&r.energy_assumption).weak().small());
        action
    }

    fn totals(&self, ui: &mut Ui, r: &LatencyReport) {
        let rows: Vec<_> = r
            .model
            .iter()
            .filter(|t| t.batch == self.view_batch)
            .collect();
        if rows.is_empty() {
            return;
        }
        egui::Grid::new("latency-totals")
            .striped(true)
            .show(ui, |ui| {
                ui.label(RichText::new("whole model (sum of layers)").strong());
                ui.label("median ms");
                ui.label("speedup");
                ui.label("energy (estimate)")
                    .on_hover_text(r.energy_assumption.clone());
                ui.end_row();
                for t in rows {
                    ui.label(t.format.label()).on_hover_text(t.format.explain());
                    ui.label(format!("{:.4}", t.ms));
                    let text = format!("{:.2}×", t.speedup);
                    if t.format != Format::Dense && t.speedup < 1.0 {
                        ui.colored_label(theme::BAD, text);
                    } else {
                        ui.label(text);
                    }
                    ui.label(format!("{:.3} mJ", t.energy_mj_estimate));
                    ui.end_row();
                }
            });
    }

    fn curves_chart(&self, ui: &mut Ui, r: &LatencyReport) {
        let curves: Vec<_> = r
            .curves
            .iter()
            .filter(|c| c.batch == self.view_batch)
            .collect();
        let Some(first) = curves.first() else {
            ui.label(if r.complete {
                "No curves: tick Speedup curves and measure again."
            } else {
                "The curves are measured after the layers."
            });
            return;
        };
        ui.label(
            RichText::new(format!(
                "Speedup over dense of {} ({:.3} ms dense) at batch {}, each format with its own structure; dashed: the theoretical 1/(1−s); grey: break-even.",
                first.layer, first.dense_ms, self.view_batch
            ))
            .weak(),
        );
        let top = curves
            .iter()
            .flat_map(|c| &c.points)
            .map(|p| p.speedup)
            .fold(2.0, f64::max)
            .min(60.0);
        Plot::new("latency-curves")
            .height(300.0)
            .legend(Legend::default())
            .x_axis_label("sparsity")
            .y_axis_label("speedup over dense (×)")
            .include_x(0.45)
            .include_x(1.0)
            .include_y(0.0)
            .include_y(top)
            .allow_scroll(false)
            .show(ui, |p| {
                let theory: Vec<[f64; 2]> = (0..=49)
                    .map(|i| 0.45 + i as f64 * 0.011)
                    .map(|s| [s, (1.0 / (1.0 - s)).min(top * 1.2)])
                    .collect();
                p.line(
                    Line::new("theoretical 1/(1−s)", PlotPoints::from(theory))
                        .style(LineStyle::dashed_loose())
                        .color(Color32::GRAY),
                );
                p.hline(HLine::new("break-even", 1.0).color(Color32::DARK_GRAY));
                for c in &curves {
                    let pts: Vec<[f64; 2]> =
                        c.points.iter().map(|q| [q.sparsity, q.speedup]).collect();
                    p.line(
                        Line::new(c.format.label(), PlotPoints::from(pts.clone()))
                            .color(color(c.format)),
                    );
                    p.points(
                        Points::new(c.format.label(), PlotPoints::from(pts))
                            .radius(3.0)
                            .color(color(c.format)),
                    );
                }
            });
    }

    fn layer_bars(&self, ui: &mut Ui, r: &LatencyReport, rho: bool) {
        ui.label(
            RichText::new(if rho {
                "Realized efficiency per layer at this batch: measured speedup over the theoretical 1/(1−s) of the layer's sparsity (1 = every pruned weight skipped for free)."
            } else {
                "Speedup over dense per layer with the current masks at this batch; below the grey line a format is slower than dense."
            })
            .weak(),
        );
        let formats: Vec<Format> = r
            .formats
            .iter()
            .copied()
            .filter(|f| *f != Format::Dense)
            .collect();
        let width = 0.8 / formats.len().max(1) as f64;
        let names: Vec<String> = r.layers.iter().map(|l| l.name.clone()).collect();
        Plot::new(if rho { "latency-rho" } else { "latency-layers" })
            .height(300.0)
            .legend(Legend::default())
            .y_axis_label(if rho { "ρ" } else { "speedup over dense (×)" })
            .x_axis_formatter(name_ticks(names))
            .include_y(0.0)
            .allow_scroll(false)
            .show(ui, |p| {
                if !rho {
                    p.hline(HLine::new("break-even", 1.0).color(Color32::DARK_GRAY));
                }
                for (fi, &f) in formats.iter().enumerate() {
                    let bars: Vec<Bar> = r
                        .layers
                        .iter()
                        .enumerate()
                        .filter_map(|(li, l)| {
                            let m = l.get(f, self.view_batch)?;
                            let x = li as f64 - 0.4 + width * (fi as f64 + 0.5);
                            let v = if rho { m.rho } else { m.speedup };
                            Some(Bar::new(x, v).width(width).name(format!(
                                "{} · {}: {:.2}{} ({:.4} ms)",
                                l.name,
                                f.label(),
                                v,
                                if rho { "" } else { "×" },
                                m.timing.median_ms
                            )))
                        })
                        .collect();
                    p.bar_chart(
                        BarChart::new(f.label(), bars)
                            .color(color(f))
                            .element_formatter(Box::new(|b: &Bar, _: &BarChart| b.name.clone())),
                    );
                }
            });
    }

    fn fit_chart(&self, ui: &mut Ui, r: &LatencyReport) {
        ui.label(
            RichText::new(
                "The cost model T = β·s + γ·B + τ fitted per format to every layer and curve point: \
                 measured time against the model's prediction; on the diagonal, the model explains the time.",
            )
            .weak(),
        );
        let fits: Vec<_> = r
            .fits
            .iter()
            .filter(|f| f.batch == self.view_batch)
            .collect();
        if fits.is_empty() {
            ui.label("Too few measurements to fit yet.");
            return;
        }
        egui::Grid::new("latency-fits").striped(true).show(ui, |ui| {
            for h in ["format", "β (ns / value)", "γ (ns / unit)", "τ (µs / call)", "r²", "points"] {
                ui.label(RichText::new(h).strong());
            }
            ui.end_row();
            for f in &fits {
                ui.label(f.format.label());
                ui.label(format!("{:.4}", f.params.beta_ns));
                ui.label(
                    f.params
                        .gamma_ns
                        .map_or("–".into(), |g| format!("{g:.2}")),
                )
                .on_hover_text("– : the points cannot separate γ from β and τ (or it came out negative).");
                ui.label(format!("{:.1}", f.params.tau_us));
                ui.label(format!("{:.3}", f.params.r2));
                ui.label(f.params.points.to_string());
                ui.end_row();
            }
        });
        let mut max = 0f64;
        let series: Vec<(Format, Vec<[f64; 2]>)> = fits
            .iter()
            .map(|f| {
                let pts: Vec<[f64; 2]> = r
                    .layers
                    .iter()
                    .filter_map(|l| l.get(f.format, f.batch))
                    .map(|m| (m.stored, m.structural, m.timing.median_ms))
                    .chain(
                        r.curves
                            .iter()
                            .filter(|c| c.format == f.format && c.batch == f.batch)
                            .flat_map(|c| &c.points)
                            .map(|q| (q.stored, q.structural, q.ms)),
                    )
                    .map(|(s, b, t)| [t, f.params.predict_ms(s as f64, b as f64)])
                    .collect();
                for p in &pts {
                    max = max.max(p[0]).max(p[1]);
                }
                (f.format, pts)
            })
            .collect();
        Plot::new("latency-fit")
            .height(260.0)
            .legend(Legend::default())
            .x_axis_label("measured ms")
            .y_axis_label("predicted ms")
            .allow_scroll(false)
            .show(ui, |p| {
                p.line(
                    Line::new(
                        "measured = predicted",
                        PlotPoints::from(vec![[0.0, 0.0], [max, max]]),
                    )
                    .style(LineStyle::dashed_loose())
                    .color(Color32::GRAY),
                );
                for (f, pts) in series {
                    p.points(
                        Points::new(f.label(), PlotPoints::from(pts))
                            .radius(3.0)
                            .color(color(f)),
                    );
                }
            });
    }
}

fn sizes_chart(ui: &mut Ui, state: &AppState) {
    let Some(sizes) = state.latency_sizes.clone() else {
        ui.label("The sizes are measured when a latency run finishes.");
        return;
    };
    ui.label(
        RichText::new(format!(
            "The whole model's bytes in each storage format for the current masks (values in \
             the tensors' own dtype), raw and compressed by zstd level {}.",
            crate::analysis::ZSTD_LEVEL
        ))
        .weak(),
    );
    let mb = |b: u64| b as f64 / 1e6;
    let names: Vec<String> = sizes.iter().map(|s| s.label.clone()).collect();
    let bars = |zstd: bool| -> Vec<Bar> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = if zstd { s.zstd_bytes } else { s.bytes };
                Bar::new(i as f64 + if zstd { 0.2 } else { -0.2 }, mb(v))
                    .width(0.38)
                    .name(format!(
                        "{}{}: {} bytes",
                        s.label,
                        if zstd { " + zstd" } else { "" },
                        crate::util::group_digits(v)
                    ))
            })
            .collect()
    };
    Plot::new("latency-sizes")
        .height(260.0)
        .legend(Legend::default())
        .y_axis_label("MB")
        .x_axis_formatter(name_ticks(names))
        .include_y(0.0)
        .allow_scroll(false)
        .show(ui, |p| {
            p.bar_chart(
                BarChart::new("raw", bars(false))
                    .color(theme::KEPT)
                    .element_formatter(Box::new(|b: &Bar, _: &BarChart| b.name.clone())),
            );
            p.bar_chart(
                BarChart::new("zstd", bars(true))
                    .color(theme::GOOD)
                    .element_formatter(Box::new(|b: &Bar, _: &BarChart| b.name.clone())),
            );
        });
}

/// An x axis that names its integer ticks: bar `i` is `names[i]`.
fn name_ticks(
    names: Vec<String>,
) -> impl Fn(egui_plot::GridMark, &std::ops::RangeInclusive<f64>) -> String {
    move |m, _| {
        let i = m.value.round();
        if (m.value - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    }
}
