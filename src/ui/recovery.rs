//! The recovery window: fine-tune the pruned model with its masks held, prune on a schedule,
//! or run the lottery-ticket experiment, with live curves.

use egui::{ComboBox, Context, DragValue, RichText, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};

use super::app::AppState;
use super::theme;
use crate::train::{
    Distill, EpochStats, FinetuneConfig, LotteryLevel, LrSchedule, Optim, Rewind, Schedule,
    TimelinePoint,
};
use crate::worker::TrainRequest;

pub const TIP_FINETUNE: &str = "Fine-tune: train the pruned model on the training data with its masks held — pruned weights stay exactly zero — to win back what the cut cost.";
pub const TIP_SCHEDULE: &str = "Schedule: reach the target sparsity gradually (AGP's cubic ramp) or in rounds of prune-then-fine-tune, instead of all at once; gradual pruning keeps more accuracy at high sparsity.";
pub const TIP_LOTTERY: &str = "Lottery tickets: train, prune the smallest weights, rewind the survivors to their initial values and retrain, level after level; controls re-initialise the same masks or draw random masks.";
pub const TIP_OPTIMIZER: &str = "SGD with momentum follows the averaged gradient; AdamW scales each weight's step by its gradient history and decays weights separately.";
pub const TIP_LR: &str = "Learning rate: the step size of each update.";
pub const TIP_EPOCHS: &str = "Passes over the training data.";
pub const TIP_BATCH: &str = "Samples per optimiser step.";
pub const TIP_MOVEMENT: &str = "Movement pruning (Sanh et al.): every training step adds −w·∂L/∂w to a weight's score, and each mask update removes the lowest scores: weights that fine-tuning pulls towards zero go, even large ones. Off: the smallest magnitudes go.";
pub const TIP_LR_SCHEDULE: &str = "How the learning rate moves: constant, cosine (warm-up, then half a cosine to zero) or step (×0.1 every few epochs).";
pub const TIP_DISTILL: &str = "Knowledge distillation: the dense model is the teacher; the pruned student also learns to match its softened outputs (temperature T), weighted by α.";
pub const TIP_UNDO: &str = "Go back to the model as it was before training.";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Finetune,
    Schedule,
    Lottery,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ScheduleKind {
    OneShot,
    Iterative,
    Agp,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LrKind {
    Constant,
    Cosine,
    Step,
}

/// What the window asks the app to do.
pub enum RecoveryAction {
    Start(TrainRequest),
    Cancel,
    Undo,
    /// Write the lottery runs as CSV here.
    SaveLottery(std::path::PathBuf),
}

pub struct RecoveryPanel {
    pub open: bool,
    tab: Tab,
    epochs: usize,
    lr: f64,
    optimizer: Optim,
    batch: usize,
    lr_kind: LrKind,
    distill: bool,
    temperature: f64,
    alpha: f64,
    target: f64,
    kind: ScheduleKind,
    rounds: usize,
    skip_below: f64,
    movement: bool,
    levels: usize,
    rate: f64,
    device: crate::train::TrainDevice,
    lottery_path: String,
}

impl Default for RecoveryPanel {
    fn default() -> Self {
        RecoveryPanel {
            open: false,
            tab: Tab::Finetune,
            epochs: 5,
            lr: 0.05,
            optimizer: Optim::Sgd,
            batch: 64,
            lr_kind: LrKind::Constant,
            distill: false,
            temperature: 4.0,
            alpha: 0.5,
            target: 0.9,
            kind: ScheduleKind::Agp,
            rounds: 5,
            skip_below: 0.0,
            movement: false,
            levels: 6,
            rate: 0.4,
            device: crate::train::TrainDevice::Native,
            lottery_path: String::new(),
        }
    }
}

/// A run's curves as they arrive.
#[derive(Clone, Debug, Default)]
pub struct TrainView {
    pub kind: &'static str,
    pub start: f64,
    pub epochs: Vec<EpochStats>,
    pub timeline: Vec<TimelinePoint>,
    pub levels: Vec<LotteryLevel>,
    pub lottery_dense: Option<f64>,
    pub done: Option<String>,
}

impl RecoveryPanel {
    pub fn ui(&mut self, ctx: &Context, state: &AppState) -> Option<RecoveryAction> {
        if !self.open {
            return None;
        }
        let mut open = self.open;
        let mut action = None;
        egui::Window::new("Recover")
            .open(&mut open)
            .default_pos([360.0, 100.0])
            .default_width(620.0)
            .resizable(true)
            .show(ctx, |ui| action = self.contents(ui, state));
        self.open = open;
        action
    }

    fn config(&self) -> FinetuneConfig {
        FinetuneConfig {
            epochs: self.epochs.max(1),
            batch_size: self.batch.max(1),
            lr: self.lr,
            optimizer: self.optimizer,
            momentum: 0.9,
            weight_decay: if self.optimizer == Optim::AdamW {
                1e-4
            } else {
                0.0
            },
            schedule: match self.lr_kind {
                LrKind::Constant => LrSchedule::Constant,
                LrKind::Cosine => LrSchedule::Cosine { warmup: 20 },
                LrKind::Step => LrSchedule::Step {
                    every: (self.epochs / 3).max(1),
                    gamma: 0.1,
                },
            },
            seed: 0,
            // Distillation is a fine-tune option (schedules and lottery train without a teacher).
            distill: (self.distill && self.tab == Tab::Finetune).then_some(Distill {
                temperature: self.temperature,
                alpha: self.alpha,
            }),
        }
    }

    fn contents(&mut self, ui: &mut Ui, state: &AppState) -> Option<RecoveryAction> {
        let mut action = None;
        let Some(m) = state.model.as_ref() else {
            ui.label("No model open.");
            return None;
        };
        let trainable =
            m.eval.engine.as_ref().is_some_and(|e| e.trainable) && m.snapshot.format != "onnx";
        if !trainable {
            ui.label(
                "Training needs an architecture prunescope can train: the samples, a \
                 safetensors model with its graph described in the metadata, or an ONNX graph \
                 whose operators all import (the bar says \"evaluate + train\"). This model can \
                 be pruned and evaluated.",
            );
            return None;
        }
        let running = state.jobs.iter().find(|j| {
            matches!(
                j.label.as_str(),
                "Fine-tuning" | "Pruning on a schedule" | "Lottery tickets"
            )
        });
        ui.horizontal(|ui| {
            ui.selectable_value(&mut self.tab, Tab::Finetune, "Fine-tune")
                .on_hover_text(TIP_FINETUNE);
            ui.selectable_value(&mut self.tab, Tab::Schedule, "Schedule")
                .on_hover_text(TIP_SCHEDULE);
            ui.selectable_value(&mut self.tab, Tab::Lottery, "Lottery tickets")
                .on_hover_text(TIP_LOTTERY);
            if m.snapshot.can_undo
                && ui
                    .add_enabled(running.is_none(), egui::Button::new("Undo training"))
                    .on_hover_text(TIP_UNDO)
                    .clicked()
            {
                action = Some(RecoveryAction::Undo);
            }
        });
        ui.separator();
        if let Some(a) = self.training_ui(ui, state) {
            action = Some(a);
        }
        ui.separator();
        let start = match self.tab {
            Tab::Finetune => {
                ui.label(RichText::new(TIP_FINETUNE).weak());
                ui.horizontal(|ui| {
                    let l = ui.label("Distillation");
                    ui.checkbox(&mut self.distill, "")
                        .labelled_by(l.id)
                        .on_hover_text(TIP_DISTILL);
                    ui.add_enabled_ui(self.distill, |ui| {
                        let l = ui.label("T");
                        ui.add(DragValue::new(&mut self.temperature).range(0.5..=20.0).speed(0.1))
                            .labelled_by(l.id)
                            .on_hover_text("Temperature: higher softens the teacher's outputs, showing how it ranks the wrong classes too.");
                        let l = ui.label("α");
                        ui.add(DragValue::new(&mut self.alpha).range(0.0..=1.0).speed(0.01))
                            .labelled_by(l.id)
                            .on_hover_text("Weight of the teacher's soft targets against the true labels.");
                    });
                });
                ui.horizontal(|ui| {
                    let l = ui.label("Device");
                    let devices = crate::train::TrainDevice::available();
                    let current = devices
                        .iter()
                        .find(|(d, _)| *d == self.device)
                        .map_or("CPU".to_string(), |(_, n)| n.clone());
                    ComboBox::from_id_salt("train_device")
                        .selected_text(current)
                        .show_ui(ui, |ui| {
                            for (d, name) in devices {
                                ui.selectable_value(&mut self.device, d, name);
                            }
                        })
                        .response
                        .labelled_by(l.id)
                        .on_hover_text("Where the fine-tune runs. GPUs appear in builds with the cuda or metal feature on machines that have one; on the CPU prunescope's own loops are the fastest for small models.");
                });
                TrainRequest::Finetune {
                    settings: state.settings.clone(),
                    config: self.config(),
                    device: self.device.clone(),
                }
            }
            Tab::Schedule => {
                ui.label(RichText::new(TIP_SCHEDULE).weak());
                ui.horizontal(|ui| {
                    let l = ui.label("Target");
                    super::controls::percent_slider(ui, &mut self.target, 0.0..=0.995)
                        .labelled_by(l.id)
                        .on_hover_text("The sparsity to reach, in every layer.");
                    let l = ui.label("How");
                    ComboBox::from_id_salt("schedule_kind")
                        .selected_text(match self.kind {
                            ScheduleKind::OneShot => "one-shot",
                            ScheduleKind::Iterative => "iterative",
                            ScheduleKind::Agp => "gradual (AGP)",
                        })
                        .show_ui(ui, |ui| {
                            ui.selectable_value(&mut self.kind, ScheduleKind::OneShot, "one-shot")
                                .on_hover_text("Prune to the target at once, then fine-tune.");
                            ui.selectable_value(&mut self.kind, ScheduleKind::Iterative, "iterative")
                                .on_hover_text("Rounds of pruning a fraction of what remains, each followed by fine-tuning.");
                            ui.selectable_value(&mut self.kind, ScheduleKind::Agp, "gradual (AGP)")
                                .on_hover_text("Zhu & Gupta: sparsity follows a cubic ramp over training, masks updated every few steps.");
                        })
                        .response
                        .labelled_by(l.id);
                });
                if self.kind == ScheduleKind::Iterative {
                    ui.horizontal(|ui| {
                        let l = ui.label("Rounds");
                        ui.add(DragValue::new(&mut self.rounds).range(1..=20))
                            .labelled_by(l.id)
                            .on_hover_text("How many prune-then-fine-tune rounds.");
                        let l = ui.label("Skip fine-tuning below a drop of");
                        super::controls::percent_slider(ui, &mut self.skip_below, 0.0..=0.1)
                            .labelled_by(l.id)
                            .on_hover_text("ICE-Pruning's idea: a round that cost less accuracy than this needs no recovery, so its fine-tuning is skipped.");
                    });
                }
                if self.kind == ScheduleKind::Agp {
                    ui.checkbox(&mut self.movement, "Prune by movement")
                        .on_hover_text(TIP_MOVEMENT);
                }
                TrainRequest::Schedule {
                    target: self.target,
                    schedule: match self.kind {
                        ScheduleKind::OneShot => Schedule::OneShot,
                        ScheduleKind::Iterative => Schedule::Iterative {
                            rounds: self.rounds,
                            skip_below: self.skip_below,
                        },
                        ScheduleKind::Agp => Schedule::Agp {
                            ramp: 0.75,
                            every: 10,
                            movement: self.movement,
                        },
                    },
                    config: self.config(),
                }
            }
            Tab::Lottery => {
                ui.label(RichText::new(TIP_LOTTERY).weak());
                ui.horizontal(|ui| {
                    let l = ui.label("Levels");
                    ui.add(DragValue::new(&mut self.levels).range(1..=15))
                        .labelled_by(l.id)
                        .on_hover_text("Rounds of prune, rewind, retrain.");
                    let l = ui.label("Rate");
                    super::controls::percent_slider(ui, &mut self.rate, 0.05..=0.9)
                        .labelled_by(l.id)
                        .on_hover_text("Fraction of the remaining weights each level prunes.");
                });
                TrainRequest::Lottery {
                    levels: self.levels,
                    rate: self.rate,
                    rewind: Rewind::Init,
                    config: self.config(),
                }
            }
        };
        ui.horizontal(|ui| {
            let l = ui.label("Optimizer");
            ComboBox::from_id_salt("optimizer")
                .selected_text(match self.optimizer {
                    Optim::Sgd => "SGD + momentum",
                    Optim::AdamW => "AdamW",
                })
                .show_ui(ui, |ui| {
                    if ui
                        .selectable_value(&mut self.optimizer, Optim::Sgd, "SGD + momentum")
                        .clicked()
                    {
                        self.lr = 0.05;
                    }
                    if ui
                        .selectable_value(&mut self.optimizer, Optim::AdamW, "AdamW")
                        .clicked()
                    {
                        self.lr = 2e-3;
                    }
                })
                .response
                .labelled_by(l.id)
                .on_hover_text(TIP_OPTIMIZER);
            let l = ui.label("lr");
            ui.add(DragValue::new(&mut self.lr).range(1e-5..=1.0).speed(0.001))
                .labelled_by(l.id)
                .on_hover_text(TIP_LR);
            let l = ui.label("Epochs");
            ui.add(DragValue::new(&mut self.epochs).range(1..=200))
                .labelled_by(l.id)
                .on_hover_text(TIP_EPOCHS);
            let l = ui.label("Batch");
            ui.add(DragValue::new(&mut self.batch).range(1..=1024))
                .labelled_by(l.id)
                .on_hover_text(TIP_BATCH);
            let l = ui.label("LR schedule");
            ComboBox::from_id_salt("lr_schedule")
                .selected_text(match self.lr_kind {
                    LrKind::Constant => "constant",
                    LrKind::Cosine => "cosine",
                    LrKind::Step => "step",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.lr_kind, LrKind::Constant, "constant");
                    ui.selectable_value(&mut self.lr_kind, LrKind::Cosine, "cosine");
                    ui.selectable_value(&mut self.lr_kind, LrKind::Step, "step");
                })
                .response
                .labelled_by(l.id)
                .on_hover_text(TIP_LR_SCHEDULE);
        });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(running.is_none(), egui::Button::new("Start"))
                .on_hover_text(match self.tab {
                    Tab::Finetune => TIP_FINETUNE,
                    Tab::Schedule => TIP_SCHEDULE,
                    Tab::Lottery => TIP_LOTTERY,
                })
                .clicked()
            {
                action = Some(RecoveryAction::Start(start));
            }
            if let Some(j) = running {
                if ui
                    .button("Stop")
                    .on_hover_text("Stop training: a fine-tune keeps its best epoch so far.")
                    .clicked()
                {
                    action = Some(RecoveryAction::Cancel);
                }
                ui.add(
                    egui::ProgressBar::new(j.fraction)
                        .text(j.message.clone())
                        .desired_width(260.0),
                );
            }
        });
        action
    }

    fn training_ui(&mut self, ui: &mut Ui, state: &AppState) -> Option<RecoveryAction> {
        let mut action = None;
        let Some(v) = state.training.as_ref() else {
            ui.label("No training yet: choose a tab and press Start.");
            return None;
        };
        if let Some(d) = &v.done {
            ui.colored_label(theme::GOOD, d);
        }
        match v.kind {
            "finetune" => {
                ui.label("The chart: test accuracy after each epoch, from where fine-tuning started (epoch 0), and the training loss scaled to its first epoch.");
                let first = v.epochs.first().map_or(1.0, |e| e.train_loss.max(1e-12));
                Plot::new("finetune_plot")
                    .height(190.0)
                    .legend(Legend::default())
                    .x_axis_label("epoch")
                    .show(ui, |p| {
                        let acc: Vec<[f64; 2]> = std::iter::once([0.0, v.start])
                            .chain(v.epochs.iter().map(|e| [e.epoch as f64, e.test_accuracy]))
                            .collect();
                        p.line(
                            Line::new("test accuracy", PlotPoints::from(acc))
                                .color(theme::KEPT)
                                .width(2.0),
                        );
                        let loss: Vec<[f64; 2]> = v
                            .epochs
                            .iter()
                            .map(|e| [e.epoch as f64, e.train_loss / first])
                            .collect();
                        p.line(
                            Line::new("training loss (÷ first)", PlotPoints::from(loss))
                                .color(theme::PRUNED),
                        );
                    });
            }
            "schedule" => {
                ui.label("The chart: sparsity and test accuracy over the optimiser steps of the schedule.");
                Plot::new("schedule_plot")
                    .height(190.0)
                    .legend(Legend::default())
                    .x_axis_label("step")
                    .show(ui, |p| {
                        let s: Vec<[f64; 2]> = v
                            .timeline
                            .iter()
                            .map(|t| [t.step as f64, t.sparsity])
                            .collect();
                        let a: Vec<[f64; 2]> = v
                            .timeline
                            .iter()
                            .map(|t| [t.step as f64, t.test_accuracy])
                            .collect();
                        p.line(Line::new("sparsity", PlotPoints::from(s)).color(theme::PRUNED));
                        p.line(
                            Line::new("test accuracy", PlotPoints::from(a.clone()))
                                .color(theme::KEPT)
                                .width(2.0),
                        );
                        p.points(
                            Points::new("test accuracy", PlotPoints::from(a))
                                .color(theme::KEPT)
                                .radius(2.5),
                        );
                    });
            }
            _ => {
                ui.label("The chart: test accuracy after training against the weights that remain, for the winning ticket and its two controls, level by level.");
                Plot::new("lottery_plot")
                    .height(190.0)
                    .legend(Legend::default().position(egui_plot::Corner::RightBottom))
                    .x_axis_label("weights remaining (%)")
                    .show(ui, |p| {
                        let series = |f: fn(&LotteryLevel) -> f64| -> Vec<[f64; 2]> {
                            v.levels
                                .iter()
                                .map(|l| [l.remaining * 100.0, f(l)])
                                .collect()
                        };
                        for (name, f, c) in [
                            (
                                "ticket (rewound)",
                                (|l: &LotteryLevel| l.ticket) as fn(&LotteryLevel) -> f64,
                                theme::KEPT,
                            ),
                            (
                                "same masks, new init",
                                |l: &LotteryLevel| l.reinit,
                                theme::PRUNED,
                            ),
                            (
                                "random masks",
                                |l: &LotteryLevel| l.random_mask,
                                theme::CAPPED,
                            ),
                        ] {
                            p.line(Line::new(name, PlotPoints::from(series(f))).color(c));
                            p.points(
                                Points::new(name, PlotPoints::from(series(f)))
                                    .color(c)
                                    .radius(3.0),
                            );
                        }
                    });
                if let Some(d) = v.lottery_dense {
                    ui.label(format!(
                        "Dense, trained from the same initial weights: {:.2}%.",
                        d * 100.0
                    ));
                }
                for l in &v.levels {
                    ui.label(format!(
                        "level {}: {:.2}% remain — ticket {:.2}%, new init {:.2}%, random masks {:.2}%",
                        l.level,
                        l.remaining * 100.0,
                        l.ticket * 100.0,
                        l.reinit * 100.0,
                        l.random_mask * 100.0
                    ));
                }
                if !v.levels.is_empty() {
                    if self.lottery_path.is_empty()
                        && let Some(m) = state.model.as_ref()
                    {
                        self.lottery_path = super::sensitivity::default_save_path(m, "lottery.csv");
                    }
                    ui.horizontal(|ui| {
                        let l = ui.label("Save to");
                        ui.add(egui::TextEdit::singleline(&mut self.lottery_path).desired_width(260.0))
                            .labelled_by(l.id)
                            .on_hover_text("Where Save CSV writes the levels.");
                        if ui
                            .button("Save CSV")
                            .on_hover_text("Each level: weights remaining, and the test accuracy of the ticket and of both controls.")
                            .clicked()
                        {
                            action = Some(RecoveryAction::SaveLottery(self.lottery_path.trim().into()));
                        }
                    });
                }
            }
        }
        action
    }
}
