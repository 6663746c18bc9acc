//! [`Progress`]: counters a runner's slots add to, for callers and the
//! `--once` progress bar.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Progress of a running or finished runner.
#[derive(Debug, Default)]
pub struct Progress {
    handled: AtomicU64,
    batches: AtomicU64,
    in_flight: AtomicUsize,
}

impl Progress {
    /// Concurrency mode: events fetched and not yet committed (the last
    /// value any slot of this runner reported).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, events: u64) {
        self.handled.fetch_add(events, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Events handed to handlers so far.
    pub fn events_handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Batches committed so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}
