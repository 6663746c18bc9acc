//! One slot's lifecycle, shared by static and worker mode: run the slot's
//! implementation (sequential batches in `processor.rs`, or key-ordered
//! concurrency in `parallel.rs`, chosen by the projection), and handle what
//! ends a run of it: retry errors with backoff (reset once the slot makes
//! progress again), wait for `resume` when the slot failed or was paused,
//! stop when fenced (worker mode) or asked to, give up after too many
//! failures in a row (worker mode's failure budget).
//!
//! Handler panics never reach this loop: the processor turns them into
//! handler errors, so the failure policy applies to them.

use crate::dispatcher::Watermarks;
use crate::error::Error;
use crate::processor::Processor;
use crate::progress::Progress;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// An idle slot re-reads its page at least this often, so that it notices
/// a reset, a pause or lost commits even when nothing wakes it.
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// The first retry delay after an error.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Limits of a slot's loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoopLimits {
    /// Ceiling of the retry backoff.
    pub(crate) max_backoff: Duration,
    /// Give the slot up after this many failed runs in a row (worker
    /// mode); `None` retries for ever.
    pub(crate) max_failures: Option<u32>,
    /// Return once caught up (`--once`); errors end the loop at once.
    pub(crate) once: bool,
}

/// Why a slot's loop ended.
#[derive(Debug)]
pub(crate) enum LoopExit {
    /// Asked to stop (the in-flight batch finished first), or caught up in
    /// `--once` mode.
    Stopped,
    /// The checkpoint or the assignment moved: this runner lost the slot.
    Fenced,
    /// Too many failed runs in a row (or any error in `--once` mode); the
    /// last error.
    GaveUp(Error),
}

/// What a slot's loop listens to and reports to.
#[derive(Clone)]
pub(crate) struct Signals {
    /// Watermarks the dispatcher's chaser compares announcements with.
    pub(crate) marks: Arc<Watermarks>,
    /// Wake-ups from the dispatcher.
    pub(crate) wake: watch::Receiver<u64>,
    /// Set to `true` to stop.
    pub(crate) stop: watch::Receiver<bool>,
    /// Counters of the runner.
    pub(crate) progress: Arc<Progress>,
}

/// A slot task that is aborted when its handle is dropped, so that a slot
/// never outlives the runner or worker that started it (dropping a plain
/// `JoinHandle` detaches the task).
pub(crate) struct SlotTask<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for SlotTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs slot `p` until it stops, is fenced or gives up.
pub(crate) async fn run(mut p: Processor, mut s: Signals, limits: LoopLimits) -> LoopExit {
    let mut backoff = INITIAL_BACKOFF;
    let mut failures: u32 = 0;
    let mut progress_mark = p.cursor();
    let mut released_cleared = false;
    loop {
        if *s.stop.borrow() {
            return LoopExit::Stopped;
        }
        let result = match p.projection().concurrency() {
            Some(c) => {
                crate::parallel::run(
                    &mut p,
                    c,
                    &s.marks,
                    s.wake.clone(),
                    s.stop.clone(),
                    &s.progress,
                    limits.once,
                )
                .await
            }
            None => sequential(&mut p, &mut s, limits.once).await,
        };
        let e = match result {
            Ok(()) => return LoopExit::Stopped,
            Err(e) => e,
        };
        if p.cursor() != progress_mark {
            // Progress since the last failure: start counting afresh.
            progress_mark = p.cursor();
            failures = 0;
            backoff = INITIAL_BACKOFF;
            if !released_cleared {
                released_cleared = true;
                p.clear_release_count().await;
            }
        }
        if limits.once {
            tracing::error!(projection = p.name(), partition = p.slot().partition, error = %e, "slot failed");
            if !e.is_failed() {
                p.record_error(&e).await;
            }
            return LoopExit::GaveUp(e);
        }
        if e.is_failed() {
            if !wait_for_resume(&p, &mut s.stop).await {
                return LoopExit::Stopped;
            }
            continue;
        }
        if e.is_fenced() {
            if p.is_fenced_slot() {
                tracing::warn!(projection = p.name(), partition = p.slot().partition, error = %e,
                    "slot fenced; stopping it");
                return LoopExit::Fenced;
            }
            // Static mode: the next page compares the stored checkpoint
            // with this process's and resynchronises (reset, pause, another
            // process on the same partition); the compare-and-set keeps
            // every commit exactly-once.
            tracing::warn!(projection = p.name(), partition = p.slot().partition, error = %e,
                "checkpoint changed under this process; re-reading it");
            continue;
        }
        failures += 1;
        tracing::warn!(projection = p.name(), partition = p.slot().partition, error = %e,
            cursor = %p.cursor(), failures, retry_in_ms = backoff.as_millis() as u64, "slot failed; retrying");
        p.record_error(&e).await;
        if limits.max_failures.is_some_and(|max| failures >= max) {
            return LoopExit::GaveUp(e);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = s.stop.changed() => {}
        }
        backoff = (backoff * 2).min(limits.max_backoff);
    }
}

/// The sequential implementation: batches back to back while pages are
/// full; otherwise wait for a wake-up (or the idle re-check).
async fn sequential(p: &mut Processor, s: &mut Signals, once: bool) -> crate::Result<()> {
    loop {
        if *s.stop.borrow() {
            return Ok(());
        }
        s.wake.borrow_and_update();
        let outcome = p.run_batch().await?;
        s.marks.saw(outcome.watermark);
        if outcome.handled > 0 {
            s.progress.add(outcome.handled as u64);
            tracing::debug!(
                projection = p.name(),
                partition = p.slot().partition,
                events = outcome.handled,
                position = outcome.cursor.global_position,
                "batch committed"
            );
        }
        if !outcome.caught_up {
            continue;
        }
        if once {
            return Ok(());
        }
        tokio::select! {
            changed = s.wake.changed() => {
                if changed.is_err() {
                    // No dispatcher (it ended): fall back to re-checking.
                    tokio::select! {
                        _ = tokio::time::sleep(IDLE_RECHECK) => {}
                        _ = s.stop.changed() => {}
                    }
                }
            }
            _ = s.stop.changed() => {}
            _ = tokio::time::sleep(IDLE_RECHECK) => {}
        }
    }
}

/// Stopped by the failure policy or paused: waits for `resume` (true) or a
/// stop request (false).
async fn wait_for_resume(p: &Processor, stop: &mut watch::Receiver<bool>) -> bool {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return false,
        }
        if *stop.borrow() {
            return false;
        }
        if p.resumed().await.unwrap_or(false) {
            tracing::info!(
                projection = p.name(),
                partition = p.slot().partition,
                "resumed"
            );
            return true;
        }
    }
}
