//! The bottom bar: what the current settings cut, what the result weighs, what it costs.

use egui::{RichText, Ui};

use super::app::AppState;
use super::theme;
use crate::prune::Pattern;
use crate::util::{group_digits, human_bytes};

/// Floating-point non-zeros after pruning, when they can be known from counts alone.
///
/// With magnitude scores and an unstructured pattern each layer prunes its lowest keys, and
/// NaN (key 0) then exact zeros (key 1) come first, so the zeros a layer still keeps are
/// `zeros − min(zeros, max(0, pruned − nan))`. Other criteria need the masks themselves.
pub fn non_zeros(state: &AppState) -> Option<u64> {
    let m = state.model.as_ref()?;
    let p = m.preview.as_ref()?;
    if !state.settings.criterion.orders_as_magnitude()
        || state.settings.pattern != Pattern::Unstructured
    {
        return None;
    }
    let mut nnz = 0u64;
    for (t, info) in m.snapshot.tensors.iter().enumerate() {
        let zeros = m
            .snapshot
            .histograms
            .get(t)
            .and_then(|h| h.as_ref())
            .map_or(0, |h| h.zeros);
        match p.alloc.for_tensor(t) {
            Some(l) => {
                let zeros_pruned = zeros.min((l.pruned as u64).saturating_sub(info.nan));
                nnz += l.kept() as u64 - (zeros - zeros_pruned);
            }
            None => nnz += info.numel as u64 - zeros,
        }
    }
    Some(nnz)
}

pub fn ui(ui: &mut Ui, state: &AppState) {
    let Some(m) = state.model.as_ref() else {
        ui.label("No model open.");
        return;
    };
    ui.horizontal_wrapped(|ui| {
        let total = m.snapshot.total_params;
        ui.label(format!("Parameters {}", group_digits(total)));
        ui.separator();
        let Some(p) = m.preview.as_ref() else {
            ui.spinner();
            ui.label("Computing…");
            return;
        };
        let a = &p.alloc;
        ui.label(format!("Pruned {} of {} prunable", group_digits(a.pruned), group_digits(a.prunable)))
            .on_hover_text("Prunable: floating tensors taking part in pruning (by default those with 2 or more dimensions).");
        ui.separator();
        let sparsity = RichText::new(format!("Sparsity {:.2}%", a.sparsity() * 100.0)).strong();
        let all = a.pruned as f64 * 100.0 / total.max(1) as f64;
        ui.label(sparsity).on_hover_text(format!("Pruned ÷ prunable weights ({all:.2}% of all parameters)."));
        if !a.reached() {
            ui.colored_label(theme::CAPPED, format!("target {} not reachable under the caps", group_digits(a.requested)))
                .on_hover_text("Locks, minimum kept and maximum sparsity leave too few weights to prune.");
        }
        ui.separator();
        match non_zeros(state) {
            Some(nnz) => ui.label(format!("Non-zeros {}", group_digits(nnz))).on_hover_text("Floating-point weights that are neither pruned nor already zero in the file."),
            None => ui
                .label(format!("Kept {}", group_digits(total - a.pruned)))
                .on_hover_text("Parameters not pruned; weights already zero in the file are counted too."),
        };
        if let Some(c) = a.structured {
            ui.separator();
            let heads = state.settings.pattern == crate::prune::Pattern::Head;
            if heads {
                ui.label(format!("Heads removed {} of {}", c.removed, c.channels)).on_hover_text(
                    "Whole attention heads removed over all attention blocks: each head's query, key and value features and the output projection's matching inputs.",
                );
            } else {
                ui.label(format!("Channels removed {} of {}", c.removed, c.channels)).on_hover_text(
                    "Whole channels (conv filters, Linear neurons) removed over all dependency groups; kept widths are rounded up to the multiple set under Pattern.",
                );
            }
            let cut = 100.0 * (1.0 - c.compacted_params as f64 / total.max(1) as f64);
            ui.label(format!("· compacted {} (−{cut:.1}%)", group_digits(c.compacted_params))).on_hover_text(if heads {
                "Parameters of the smaller model without the removed heads. prunescope compact MODEL --masks MASKS --out SMALL.onnx writes it where the graph's Reshapes leave the head count free (a -1 entry, as newer exports write); where a Reshape holds the count as a constant it refuses and says which."
            } else {
                "Parameters of the smaller model this structured cut makes: every removed channel's slices leave its whole dependency group, biases and norms included (prunescope compact MODEL --masks MASKS writes it)."
            });
            if let Some((before, after)) = c.macs {
                let cut = 100.0 * (1.0 - after as f64 / before.max(1) as f64);
                ui.label(format!("· {} of {} multiply-adds a sample (−{cut:.1}%)", group_digits(after), group_digits(before))).on_hover_text(
                    "Multiply-adds one sample costs in the Linear and Conv2d layers of the compacted model, against the dense one: the compute the structured cut really removes, which masked zeros alone do not.",
                );
            }
        }
        ui.separator();
        let s = &p.sizes;
        ui.label(format!("Size: dense {}", human_bytes(s.dense_bytes)))
            .on_hover_text("On-disk size of the tensors stored dense, zeros included.");
        ui.label(format!("· CSR {}", human_bytes(s.csr_bytes)))
            .on_hover_text("Compressed sparse rows: kept values + a 4-byte column index each + row pointers.");
        ui.label(format!("· bitmask {}", human_bytes(s.bitmask_bytes)))
            .on_hover_text("One bit per weight saying kept or not, plus the kept values.");
        match s.nm_bytes {
            Some(b) => ui.label(format!("· N:M {}", human_bytes(b))),
            None => ui.label(RichText::new("· N:M n/a").weak()),
        }
        .on_hover_text("N:M: the kept values plus ⌈log2 M⌉ index bits each; only for an N:M pattern.");
        ui.separator();
        accuracy_ui(ui, state);
        if !state.counts_current() {
            ui.spinner().on_hover_text("Updating for the newest settings…");
        }
    });
}

fn accuracy_ui(ui: &mut Ui, state: &AppState) {
    let Some(m) = state.model.as_ref() else {
        return;
    };
    let snap = &m.eval;
    let Some(dense) = snap.dense else {
        let why = snap.error.clone().unwrap_or_else(|| {
            "This file holds weights without a graph prunescope can run, so accuracy is not \
             measured. Export the model to ONNX to evaluate it."
                .into()
        });
        let onnx = m.snapshot.format == crate::model::ModelFormat::Onnx.label();
        let text = if onnx {
            "Accuracy: n/a — File → Evaluation data…"
        } else {
            "Accuracy: n/a"
        };
        ui.label(RichText::new(text).weak()).on_hover_text(why);
        return;
    };
    let tip = snap.evaluator.clone().unwrap_or_default();
    if let Some(engine) = &snap.engine {
        ui.label(RichText::new(format!("[{}]", engine.label())).weak())
            .on_hover_text(format!("Engine: {}. {}", engine.name, engine.why));
    }
    let now = m.metrics.as_ref().map(|x| &x.result);
    match dense.accuracy {
        Some(acc) => {
            ui.label(format!("Accuracy: dense {:.2}%", acc * 100.0))
                .on_hover_text(format!("Top-1 accuracy of the unpruned model on {tip}."));
        }
        None => {
            ui.label("Fidelity to the dense model:")
                .on_hover_text(format!(
                    "The data has no labels, so the pruned model is compared with the dense one on \
                 the same inputs: {tip}."
                ));
        }
    }
    // Sensitivity-guided: what the curves promised, before what was measured.
    if state.settings.scope == crate::prune::Scope::Sensitivity
        && let Some(Ok(p)) = &state.plan
    {
        let v = match p.metric {
            crate::sensitivity::MetricKind::Accuracy => format!("{:.2}%", p.predicted * 100.0),
            crate::sensitivity::MetricKind::Fidelity => format!("cosine {:.4}", p.predicted),
        };
        ui.label(RichText::new(format!("predicted {v}")).weak())
            .on_hover_text(
                "The sensitivity plan's prediction: the dense value minus each layer's drop at its \
             planned sparsity, as if the drops added up. The measured figure follows.",
            );
    }
    match now {
        Some(Ok(now)) => {
            let (text, bad) = match (now.accuracy, dense.accuracy) {
                (Some(a), Some(d)) => {
                    let delta = (a - d) * 100.0;
                    let mut t = format!("→ now {:.2}% ({delta:+.2})", a * 100.0);
                    if let Some(loss) = now.loss {
                        t.push_str(&format!(", loss {loss:.3}"));
                    }
                    (t, delta < -1.0)
                }
                _ => match now.fidelity {
                    Some(f) => (
                        format!(
                            "top-1 agreement {:.1}%, cosine {:.4}, rel. L2 {:.3}",
                            f.top1_agreement * 100.0,
                            f.cosine,
                            f.rel_l2
                        ),
                        f.top1_agreement < 0.99,
                    ),
                    None => ("n/a".into(), false),
                },
            };
            let colour = if bad { theme::BAD } else { theme::GOOD };
            let mut hover = tip;
            if dense.accuracy.is_some()
                && let Some(f) = now.fidelity
            {
                hover.push_str(&format!(
                    "\n\nTop-1 agreement with the dense model: {:.1}% of samples get the same \
                     prediction (cosine of outputs {:.4}, relative L2 error {:.3}). \
                     View → Dataset samples shows which ones changed.",
                    f.top1_agreement * 100.0,
                    f.cosine,
                    f.rel_l2
                ));
            }
            let r = ui.colored_label(colour, text).on_hover_text(hover);
            if !state.metrics_current() {
                r.on_hover_text("Updating…");
            }
        }
        Some(Err(e)) => {
            ui.colored_label(theme::BAD, format!("evaluation failed: {e}"));
        }
        None => {
            ui.spinner();
        }
    }
}
