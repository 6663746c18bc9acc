//! [`RunnerConfig`]: the options of a process running projections, each
//! with its documented default, shared by static and worker mode.

use crate::dispatcher::{DispatcherKind, RECONCILE_INTERVAL};
use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::store::DEFAULT_NOTIFY_CHANNEL;
use std::time::Duration;

/// Default events per batch (see docs/performance.md for the measurements
/// behind it).
pub const DEFAULT_BATCH_SIZE: i64 = 1000;
/// Largest accepted batch size.
pub const MAX_BATCH_SIZE: i64 = 100_000;
/// Default poll interval of the poll dispatcher.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Default ceiling of the retry backoff after errors.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default time allowed for in-flight batches to finish on shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of a [`Runner`](crate::Runner), each with a documented default.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    pub(crate) batch_size: i64,
    pub(crate) poll_interval: Duration,
    pub(crate) reconcile_interval: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) dispatcher: DispatcherKind,
    pub(crate) notify_channel: Ident,
    pub(crate) partition: i32,
    pub(crate) total_partitions: i32,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) synchronous_commit: bool,
    pub(crate) promote_when_caught_up: bool,
}

impl Default for RunnerConfig {
    fn default() -> RunnerConfig {
        RunnerConfig {
            batch_size: DEFAULT_BATCH_SIZE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            reconcile_interval: RECONCILE_INTERVAL,
            max_backoff: DEFAULT_MAX_BACKOFF,
            dispatcher: DispatcherKind::Poll,
            notify_channel: Ident::new("NOTIFY channel", DEFAULT_NOTIFY_CHANNEL)
                .unwrap_or_else(|_| unreachable!()),
            partition: 0,
            total_partitions: 1,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            synchronous_commit: false,
            promote_when_caught_up: false,
        }
    }
}

impl RunnerConfig {
    /// Events per batch transaction. Default: 1000. Must be 1..=100000.
    pub fn batch_size(mut self, n: i64) -> Result<RunnerConfig> {
        if !(1..=MAX_BATCH_SIZE).contains(&n) {
            return Err(Error::config(format!(
                "BATCH_SIZE {n} is out of range: use a value from 1 to {MAX_BATCH_SIZE} (default {DEFAULT_BATCH_SIZE})"
            )));
        }
        self.batch_size = n;
        Ok(self)
    }

    /// How often the poll dispatcher checks the head. Default: 200 ms.
    pub fn poll_interval(mut self, d: Duration) -> Result<RunnerConfig> {
        if d.is_zero() {
            return Err(Error::config(
                "POLL_INTERVAL must be greater than zero (default 200ms)",
            ));
        }
        self.poll_interval = d;
        Ok(self)
    }

    /// How often the notify dispatcher also polls, to catch raw-SQL
    /// appends without NOTIFY and lost notifications. Default: 1 s.
    pub fn reconcile_interval(mut self, d: Duration) -> RunnerConfig {
        self.reconcile_interval = d.max(Duration::from_millis(1));
        self
    }

    /// Ceiling of the exponential backoff between retries after an error
    /// (starting at 100 ms). Default: 30 s.
    pub fn max_backoff(mut self, d: Duration) -> RunnerConfig {
        self.max_backoff = d.max(Duration::from_millis(100));
        self
    }

    /// Poll or LISTEN/NOTIFY wake-ups. Default: poll.
    pub fn dispatcher(mut self, kind: DispatcherKind) -> RunnerConfig {
        self.dispatcher = kind;
        self
    }

    /// The channel the notify dispatcher listens on (appends must NOTIFY the
    /// same one, see [`crate::StoreConfig::notify_channel`]). Default:
    /// `projectionist_events`.
    pub fn notify_channel(mut self, channel: &str) -> Result<RunnerConfig> {
        self.notify_channel = Ident::new("NOTIFY channel", channel)?;
        Ok(self)
    }

    /// Static partitioning: this process runs partition `key` of `total`.
    /// Default: partition 0 of 1 (everything).
    pub fn partition(mut self, key: i32, total: i32) -> Result<RunnerConfig> {
        if total < 1 {
            return Err(Error::config(format!(
                "TOTAL_PARTITIONS {total} is invalid: use 1 or more (default 1)"
            )));
        }
        if key < 0 || key >= total {
            return Err(Error::config(format!(
                "PARTITION_KEY {key} is out of range for TOTAL_PARTITIONS={total}: use a value from 0 to {}",
                total - 1
            )));
        }
        self.partition = key;
        self.total_partitions = total;
        Ok(self)
    }

    /// Whether batch transactions wait for their commit to reach disk.
    /// Default: `false` — batches commit with `synchronous_commit = off`, so
    /// projections do not compete with writers for WAL flushes. A server
    /// crash may then lose the last moments of committed batches; the read
    /// model and the checkpoint are lost together and the events are handled
    /// again, so transactional read models stay exact (side effects are
    /// at-least-once either way). Appends are not affected.
    pub fn synchronous_commit(mut self, on: bool) -> RunnerConfig {
        self.synchronous_commit = on;
        self
    }

    /// Promote each projection version this process builds beside a live
    /// one as soon as it has caught up (within
    /// [`DEFAULT_PROMOTE_MAX_LAG`](crate::versions::DEFAULT_PROMOTE_MAX_LAG)
    /// events, none failed): readers switch to it without an operator.
    /// Checked every second. Default: off (promote with `promote NAME`).
    pub fn promote_when_caught_up(mut self, on: bool) -> RunnerConfig {
        self.promote_when_caught_up = on;
        self
    }

    /// How long in-flight batches may take to commit after a shutdown
    /// request before the runner gives up on them (they roll back).
    /// Default: 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> RunnerConfig {
        self.shutdown_timeout = d;
        self
    }
}
