//! The worker: one named thread that owns the model and runs every job.
//!
//! The UI talks to it only through [`Command`]s and [`Event`]s ([`protocol`]). Previews are
//! coalesced: when several are queued only the newest runs, and a running preview stops
//! between steps as soon as a newer one arrives. A panic inside any job is caught, reported
//! as a failed job, and leaves the open model as it was.

pub mod protocol;
mod session;

pub use protocol::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::progress::CancelFlag;

/// Queue depths: small, because previews are coalesced and the UI drains events every frame.
const COMMAND_QUEUE: usize = 64;
const EVENT_QUEUE: usize = 1024;

/// The UI's end of the worker. Dropping it cancels running jobs and joins the thread.
pub struct WorkerHandle {
    tx: Sender<Command>,
    rx: Receiver<Event>,
    ids: Arc<AtomicU64>,
    /// Cancel flags of running jobs: those the UI started, and those the worker starts itself
    /// (scoring with a new criterion), so every job's Cancel button works.
    active: Jobs,
    thread: Option<JoinHandle<()>>,
}

/// Running jobs' cancel flags, shared by the UI's handle and the worker.
pub(crate) type Jobs = Arc<std::sync::Mutex<Vec<(JobId, CancelFlag)>>>;

/// Registers `flag` as job `id`'s, dropping the flags of jobs already cancelled.
pub(crate) fn register(jobs: &Jobs, id: JobId, flag: CancelFlag) {
    let mut a = jobs.lock().unwrap_or_else(|e| e.into_inner());
    a.retain(|(_, f)| !f.is_cancelled());
    a.push((id, flag));
}

impl WorkerHandle {
    /// Starts the worker thread; `wake` is called after each event so the UI can repaint.
    pub fn spawn(wake: impl Fn() + Send + Sync + 'static) -> WorkerHandle {
        let (tx, cmd_rx) = bounded(COMMAND_QUEUE);
        let (ev_tx, rx) = bounded(EVENT_QUEUE);
        let ids = Arc::new(AtomicU64::new(1));
        let active: Jobs = Arc::default();
        let (worker_ids, worker_jobs) = (ids.clone(), active.clone());
        let thread = std::thread::Builder::new()
            .name("prunescope-worker".into())
            .spawn(move || session::run(cmd_rx, ev_tx, Arc::new(wake), worker_ids, worker_jobs))
            .expect("spawning the worker thread");
        WorkerHandle {
            tx,
            rx,
            ids,
            active,
            thread: Some(thread),
        }
    }

    fn next_job(&mut self) -> (JobId, CancelFlag) {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let flag = CancelFlag::new();
        register(&self.active, id, flag.clone());
        (id, flag)
    }

    /// Opens a model in the background; the current one stays until the new one is ready.
    pub fn open(&mut self, source: OpenSource) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::Open {
            job,
            cancel,
            source,
        })?;
        Ok(job)
    }

    /// Exports weights, masks and/or a recipe for the given settings.
    pub fn export(&mut self, request: ExportRequest) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::Export {
            job,
            cancel,
            request,
        })?;
        Ok(job)
    }

    /// Evaluates the open model on other data from now on.
    pub fn set_data(&mut self, source: crate::eval::DataSource) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::SetData {
            job,
            cancel,
            source,
        })?;
        Ok(job)
    }

    /// Starts a sensitivity sweep of the open model.
    pub fn sensitivity(
        &mut self,
        spec: crate::sensitivity::SweepSpec,
        settings: crate::prune::PruneSettings,
        fresh: bool,
    ) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::Sensitivity {
            job,
            cancel,
            spec,
            settings,
            fresh,
        })?;
        Ok(job)
    }

    /// Measures the layers pruned by `settings` in every storage format.
    pub fn latency(
        &mut self,
        settings: crate::prune::PruneSettings,
        spec: crate::latency::LatencySpec,
    ) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::Latency {
            job,
            cancel,
            settings,
            spec,
        })?;
        Ok(job)
    }

    /// Plans layer-wise targets for `settings`' global target by OWL.
    pub fn owl_plan(&mut self, settings: crate::prune::PruneSettings) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::OwlPlan {
            job,
            cancel,
            settings,
        })?;
        Ok(job)
    }

    /// Runs SparseGPT at `settings`' targets; its model replaces the open one.
    pub fn sparsegpt(
        &mut self,
        settings: crate::prune::PruneSettings,
    ) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::SparseGpt {
            job,
            cancel,
            settings,
        })?;
        Ok(job)
    }

    /// Compares the cut of `settings` with the same cut by criterion `other`.
    pub fn compare_criteria(
        &mut self,
        settings: crate::prune::PruneSettings,
        other: crate::prune::Criterion,
    ) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::CompareCriteria {
            job,
            cancel,
            settings,
            other,
        })?;
        Ok(job)
    }

    /// Starts a training job (fine-tune, schedule or lottery) on the open model.
    pub fn train(&mut self, request: TrainRequest) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::Train {
            job,
            cancel,
            request,
        })?;
        Ok(job)
    }

    /// Plans the settings' target with every rule and measures each plan.
    pub fn compare(&mut self, settings: crate::prune::PruneSettings) -> Result<JobId, WorkerBusy> {
        let (job, cancel) = self.next_job();
        self.send(Command::Compare {
            job,
            cancel,
            settings,
        })?;
        Ok(job)
    }

    /// Asks for a new preview; returns `Err` if the queue is full (try again next frame).
    pub fn preview(&self, request: PreviewRequest) -> Result<(), WorkerBusy> {
        self.send(Command::Preview(Box::new(request)))
    }

    /// Sends a raw command (tests use this to inject a panicking job).
    pub fn send(&self, cmd: Command) -> Result<(), WorkerBusy> {
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(WorkerBusy::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(WorkerBusy::Gone),
        }
    }

    /// Asks job `job` to stop; it reports `JobCancelled` when it has.
    pub fn cancel(&self, job: JobId) {
        for (id, f) in self.active.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if *id == job {
                f.cancel();
            }
        }
    }

    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// The event receiver, for callers that want to block (CLI-style use, tests).
    pub fn events(&self) -> &Receiver<Event> {
        &self.rx
    }

    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        for (_, f) in self.active.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            f.cancel();
        }
        let _ = self.tx.try_send(Command::Shutdown);
        // Unblock a worker waiting to send events, then wait for it.
        while self.rx.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let (done_tx, done_rx) = bounded::<()>(1);
            let rx = self.rx.clone();
            std::thread::spawn(move || {
                // Keep draining so the worker never blocks on a full event queue while exiting.
                while done_rx.try_recv().is_err() {
                    let _ = rx.recv_timeout(std::time::Duration::from_millis(20));
                }
            });
            let _ = t.join();
            let _ = done_tx.send(());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkerBusy {
    #[error("the worker's queue is full; try again")]
    QueueFull,
    #[error("the worker has stopped")]
    Gone,
}
