//! The worker as the UI sees it: commands in, events out, in order; stale previews dropped;
//! failures, cancels and panics reported while the model stays usable.

mod common;

use std::path::Path;
use std::time::Duration;

use prunescope::prune::PruneSettings;
use prunescope::worker::{Command, Event, OpenSource, PreviewRequest, WorkerHandle};

fn next(w: &WorkerHandle) -> Event {
    w.events()
        .recv_timeout(Duration::from_secs(60))
        .expect("an event within a minute")
}

/// Waits for the event `pick` accepts, returning it; other events are skipped.
fn wait_for<T>(w: &WorkerHandle, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    loop {
        if let Some(t) = pick(next(w)) {
            return t;
        }
    }
}

fn open_sample(w: &mut WorkerHandle) -> u64 {
    open_source(w, OpenSource::Sample)
}

fn open_source(w: &mut WorkerHandle, source: OpenSource) -> u64 {
    common::isolate();
    let job = w.open(source).unwrap();
    match next(w) {
        Event::JobStarted { job: j, .. } => assert_eq!(j, job),
        e => panic!("expected JobStarted, got {e:?}"),
    }
    let snap = wait_for(w, |e| match e {
        Event::ModelOpened(s) => Some(s),
        Event::JobFailed { error, .. } => panic!("{error}"),
        _ => None,
    });
    wait_for(w, |e| {
        matches!(e, Event::JobFinished { job: j, .. } if j == job).then_some(())
    });
    snap.id
}

fn preview(model: u64, generation: u64, sparsity: f64) -> PreviewRequest {
    PreviewRequest {
        generation,
        model,
        settings: PruneSettings {
            sparsity,
            ..Default::default()
        },
        selected: Some(1),
        heatmap: None,
    }
}

#[test]
fn open_then_preview_gives_counts_detail_and_metrics_in_order() {
    let mut w = WorkerHandle::spawn(|| {});
    let model = open_sample(&mut w);
    w.preview(preview(model, 1, 0.5)).unwrap();
    let mut recorded = None;
    let kinds: Vec<&str> = (0..3)
        .map(|_| match next_skipping_records(&w, &mut recorded) {
            Event::Preview(p) => {
                assert_eq!(p.generation, 1);
                assert_eq!(
                    p.alloc.pruned,
                    (0.5 * p.alloc.prunable as f64).round() as u64
                );
                "preview"
            }
            Event::LayerDetail(d) => {
                assert_eq!(d.tensor, 1);
                "detail"
            }
            Event::Metrics(m) => {
                assert!(m.result.is_ok());
                "metrics"
            }
            e => panic!("unexpected {e:?}"),
        })
        .collect();
    assert_eq!(kinds, ["preview", "detail", "metrics"]);
    // The evaluated configuration went into the experiment history, with its figures.
    let r = recorded.expect("the evaluation was recorded");
    assert_eq!(r.settings.sparsity, 0.5);
    assert_eq!(r.nonzeros, 17_226 - (0.5f64 * 17_024.0).round() as u64);
}

/// The next event that is not a history record (kept in `recorded`).
fn next_skipping_records(
    w: &WorkerHandle,
    recorded: &mut Option<std::sync::Arc<prunescope::history::Record>>,
) -> Event {
    loop {
        match next(w) {
            Event::Recorded { record, .. } => *recorded = Some(record),
            e => return e,
        }
    }
}

#[test]
fn a_burst_of_previews_is_coalesced_and_the_newest_always_answered() {
    let mut w = WorkerHandle::spawn(|| {});
    let model = open_sample(&mut w);
    for g in 1..=40 {
        w.preview(preview(model, g, g as f64 / 50.0)).unwrap();
    }
    let mut answered = Vec::new();
    let last = wait_for(&w, |e| match e {
        Event::Preview(p) => {
            answered.push(p.generation);
            (p.generation == 40).then_some(p)
        }
        _ => None,
    });
    assert_eq!(
        last.alloc.pruned,
        (0.8 * last.alloc.prunable as f64).round() as u64
    );
    assert!(
        answered.windows(2).all(|w| w[0] < w[1]),
        "answers come in generation order: {answered:?}"
    );
    assert!(
        answered.len() < 40,
        "stale previews were skipped ({} answered)",
        answered.len()
    );
}

#[test]
fn a_failed_open_keeps_the_model_and_a_panic_is_contained() {
    let mut w = WorkerHandle::spawn(|| {});
    let model = open_sample(&mut w);
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/garbage.pt");
    let job = w.open(OpenSource::Path(bad)).unwrap();
    let error = wait_for(&w, |e| match e {
        Event::JobFailed { job: j, error } if j == job => Some(error),
        Event::ModelOpened(_) => panic!("a garbage file must not replace the model"),
        _ => None,
    });
    assert!(error.contains("garbage.pt"), "{error}");

    let job = w.next_id();
    w.send(Command::PanicForTest { job }).unwrap();
    let error = wait_for(&w, |e| match e {
        Event::JobFailed { job: j, error } if j == job => Some(error),
        _ => None,
    });
    assert!(error.contains("deliberate panic"), "{error}");

    // The old model still answers.
    w.preview(preview(model, 7, 0.3)).unwrap();
    let p = wait_for(&w, |e| match e {
        Event::Preview(p) => Some(p),
        _ => None,
    });
    assert_eq!((p.generation, p.model), (7, model));
}

#[test]
fn cancelling_an_export_reports_cancelled_and_writes_nothing() {
    let mut w = WorkerHandle::spawn(|| {});
    open_sample(&mut w);
    let out = std::env::temp_dir().join(format!(
        "prunescope-cancel-{}.safetensors",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&out);
    // Queue a panic job first so the export is still waiting when the cancel lands.
    let blocker = w.next_id();
    w.send(Command::PanicForTest { job: blocker }).unwrap();
    let job = w
        .export(prunescope::worker::ExportRequest {
            settings: PruneSettings {
                sparsity: 0.5,
                ..Default::default()
            },
            weights: Some(out.clone()),
            masks: None,
            recipe: None,
            compacted: None,
        })
        .unwrap();
    w.cancel(job);
    wait_for(&w, |e| match e {
        Event::JobCancelled { job: j } if j == job => Some(()),
        Event::JobFinished { job: j, .. } if j == job => {
            panic!("the export ran despite the cancel")
        }
        _ => None,
    });
    assert!(!out.exists());
}

#[test]
fn a_cnn_fine_tunes_in_the_worker_and_undo_brings_the_pruned_one_back() {
    common::isolate();
    let mut w = WorkerHandle::spawn(|| {});
    let job = w.open(OpenSource::NamedSample("cnn")).unwrap();
    wait_for(&w, |e| {
        matches!(e, Event::JobFinished { job: j, .. } if j == job).then_some(())
    });
    let settings = PruneSettings {
        sparsity: 0.8,
        ..Default::default()
    };
    let config = prunescope::train::FinetuneConfig {
        epochs: 2,
        ..Default::default()
    };
    let job = w
        .train(prunescope::worker::TrainRequest::Finetune {
            settings: settings.clone(),
            config,
            device: prunescope::train::TrainDevice::Native,
        })
        .unwrap();
    let mut epochs = 0;
    let snap = wait_for(&w, |e| match e {
        Event::Training {
            update: prunescope::worker::TrainUpdate::Epoch(_),
            ..
        } => {
            epochs += 1;
            None
        }
        Event::ModelOpened(s) => Some(s),
        Event::JobFailed { error, .. } => panic!("{error}"),
        _ => None,
    });
    assert_eq!(epochs, 2);
    assert_eq!(snap.derived.as_deref(), Some("fine-tuned"));
    assert!(snap.can_undo);
    wait_for(&w, |e| {
        matches!(e, Event::JobFinished { job: j, .. } if j == job).then_some(())
    });
    // The fine-tuned CNN at the same settings: accuracy recovered well above the pruned one.
    w.preview(PreviewRequest {
        generation: 1,
        model: snap.id,
        settings: settings.clone(),
        selected: None,
        heatmap: None,
    })
    .unwrap();
    let tuned = wait_for(&w, |e| match e {
        Event::Metrics(m) => Some(m.result.unwrap().accuracy.unwrap()),
        _ => None,
    });
    w.send(Command::Undo { model: snap.id }).unwrap();
    let back = wait_for(&w, |e| match e {
        Event::ModelOpened(s) => Some(s),
        _ => None,
    });
    assert_eq!(back.derived.as_deref(), Some("restored"));
    w.preview(PreviewRequest {
        generation: 2,
        model: back.id,
        settings,
        selected: None,
        heatmap: None,
    })
    .unwrap();
    let pruned = wait_for(&w, |e| match e {
        Event::Metrics(m) => Some(m.result.unwrap().accuracy.unwrap()),
        _ => None,
    });
    assert!(
        tuned > pruned + 0.1,
        "fine-tuned {tuned} vs pruned {pruned}"
    );
}

#[test]
fn scoring_that_the_worker_starts_itself_can_be_cancelled_and_the_model_stays() {
    let mut w = WorkerHandle::spawn(|| {});
    // OBD takes one backward pass per calibration sample: on the residual CNN's 1,437
    // training samples, seconds of work, so the cancel lands while it runs.
    let model = open_source(&mut w, OpenSource::NamedSample("rescnn"));
    let mut p = preview(model, 1, 0.5);
    p.settings.criterion = prunescope::prune::Criterion::Obd;
    p.settings.calibration = 100_000;
    w.preview(p).unwrap();
    let job = wait_for(&w, |e| match e {
        Event::JobStarted { job, label } if label.starts_with("Scoring with") => Some(job),
        _ => None,
    });
    w.cancel(job);
    wait_for(&w, |e| match e {
        Event::JobCancelled { job: j } if j == job => Some(()),
        Event::JobFinished { job: j, .. } if j == job => panic!("scoring finished, not cancelled"),
        _ => None,
    });
    let error = wait_for(&w, |e| match e {
        Event::PreviewError { error, .. } => Some(error),
        _ => None,
    });
    assert!(error.contains("cancelled"), "{error}");
    // The model still answers with the criterion it had.
    w.preview(preview(model, 2, 0.3)).unwrap();
    wait_for(&w, |e| match e {
        Event::Preview(p) if p.generation == 2 => Some(()),
        _ => None,
    });
}

#[test]
fn sparsegpt_is_not_a_slider_criterion() {
    let mut w = WorkerHandle::spawn(|| {});
    let model = open_sample(&mut w);
    let mut p = preview(model, 1, 0.5);
    p.settings.criterion = prunescope::prune::Criterion::SparseGpt;
    w.preview(p).unwrap();
    let error = wait_for(&w, |e| match e {
        Event::PreviewError { error, .. } => Some(error),
        Event::Preview(_) => panic!("a SparseGPT preview would show magnitude's masks"),
        _ => None,
    });
    assert!(error.contains("Run SparseGPT"), "{error}");
}
