//! Progress reporting and cancellation for long core functions.
//!
//! Core functions take a `&Progress` rather than a channel so that the same code serves the
//! worker (which forwards to the UI), the CLI (which draws a bar) and tests (which ignore it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A cancel flag shared between whoever started a job and the job itself.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The job was cancelled by the user; long functions return this as their error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

type ReportFn<'a> = dyn Fn(f32, &str) + Send + Sync + 'a;

/// Progress sink plus cancel flag, handed to long core functions.
pub struct Progress<'a> {
    report: Option<Box<ReportFn<'a>>>,
    cancel: CancelFlag,
}

impl<'a> Progress<'a> {
    /// A sink that reports nowhere and can never be cancelled.
    pub fn none() -> Self {
        Self {
            report: None,
            cancel: CancelFlag::new(),
        }
    }

    pub fn new(cancel: CancelFlag, report: impl Fn(f32, &str) + Send + Sync + 'a) -> Self {
        Self {
            report: Some(Box::new(report)),
            cancel,
        }
    }

    /// Reports `fraction` (0..=1) done with a short message.
    pub fn report(&self, fraction: f32, message: &str) {
        if let Some(r) = &self.report {
            r(fraction.clamp(0.0, 1.0), message);
        }
    }

    pub fn check(&self) -> Result<(), Cancelled> {
        if self.cancel.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    pub fn cancel_flag(&self) -> &CancelFlag {
        &self.cancel
    }
}
