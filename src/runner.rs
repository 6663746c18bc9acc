//! Runs many projections in one process: one processor task per slot, one
//! shared dispatcher, graceful shutdown (in-flight batches commit, then the
//! runner returns), and `once` mode (catch up, then return).

use crate::dispatcher::{self, DispatcherKind, Route, Watermarks, RECONCILE_INTERVAL};
use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::processor::{Processor, Slot};
use crate::projection::Projection;
use crate::store::{EventStore, DEFAULT_NOTIFY_CHANNEL};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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

/// Options of a [`Runner`], each with a documented default.
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

    /// How long in-flight batches may take to commit after a shutdown
    /// request before the runner gives up on them (they roll back).
    /// Default: 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> RunnerConfig {
        self.shutdown_timeout = d;
        self
    }
}

/// Progress of a running or finished runner.
#[derive(Debug, Default)]
pub struct Progress {
    handled: AtomicU64,
    batches: AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
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

/// Runs projections.
pub struct Runner {
    store: EventStore,
    /// Connections for batch transactions (see `RunnerConfig::synchronous_commit`).
    pool: deadpool_postgres::Pool,
    config: RunnerConfig,
    projections: Vec<Arc<dyn Projection>>,
    progress: Arc<Progress>,
}

impl Runner {
    /// A runner over `store` with `config`.
    pub fn new(store: EventStore, config: RunnerConfig) -> Runner {
        // Building a pool only fails on an invalid size, which the store's
        // own pool already passed.
        let pool = crate::db::pool(
            &crate::db::batch_config(store.pg_config(), config.synchronous_commit, None),
            store.tls(),
            store.config().pool_size,
        )
        .unwrap_or_else(|_| store.pool().clone());
        Runner {
            store,
            pool,
            config,
            projections: Vec::new(),
            progress: Arc::new(Progress::default()),
        }
    }

    /// Adds projections. Names must be unique.
    pub fn with_projections(mut self, projections: &[Arc<dyn Projection>]) -> Result<Runner> {
        for p in projections {
            self = self.with_projection(p.clone())?;
        }
        Ok(self)
    }

    /// Adds a projection. Its name must be unique among this runner's.
    pub fn with_projection(mut self, projection: Arc<dyn Projection>) -> Result<Runner> {
        check_unique(self.projections.iter().chain(std::iter::once(&projection)))?;
        self.projections.push(projection);
        Ok(self)
    }

    /// Shared progress counters.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    async fn start_processors(&self) -> Result<Vec<Processor>> {
        if self.projections.is_empty() {
            return Err(Error::config(
                "no projections to run: register at least one (or check --projection)",
            ));
        }
        {
            let client = self.store.pool().get().await?;
            crate::checkpoint::Checkpoints::new(&self.store.statements().checkpoints)
                .check_cluster(&**client)
                .await?;
        }
        let slot = Slot {
            partition: self.config.partition,
            total: self.config.total_partitions,
        };
        let mut processors = Vec::new();
        for p in &self.projections {
            processors.push(
                Processor::start(
                    p.clone(),
                    self.pool.clone(),
                    self.store.statements(),
                    slot,
                    self.config.batch_size,
                    None,
                )
                .await?,
            );
        }
        Ok(processors)
    }

    /// Catches every projection up with what is readable now, then returns.
    pub async fn run_once(&self) -> Result<()> {
        let processors = self.start_processors().await?;
        let mut tasks = tokio::task::JoinSet::new();
        for mut p in processors {
            let progress = self.progress.clone();
            tasks.spawn(async move {
                if let Some(c) = p.projection().concurrency() {
                    let (_stop_tx, stop) = watch::channel(false);
                    let (_wake_tx, wake) = watch::channel(0u64);
                    let marks = Arc::new(Watermarks::default());
                    return match crate::parallel::run(&mut p, c, marks, wake, stop, progress, true)
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(e) => {
                            p.record_error(&e).await;
                            Err(e)
                        }
                    };
                }
                loop {
                    let outcome = match p.run_batch().await {
                        Ok(o) => o,
                        Err(e) => {
                            tracing::error!(projection = p.name(), error = %e, "batch failed");
                            p.record_error(&e).await;
                            return Err(e);
                        }
                    };
                    if outcome.handled > 0 {
                        progress.add(outcome.handled as u64);
                    }
                    if outcome.caught_up {
                        return Ok::<_, Error>(());
                    }
                }
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let r = joined.map_err(|e| {
                Error::new(
                    crate::error::Kind::Other,
                    format!("processor task panicked: {e}"),
                )
            });
            if let Err(e) = r.and_then(|r| r) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Starts the process's dispatcher on `background`: poll, or LISTEN
    /// (with the watermark chaser and the reconciliation poll), listening
    /// also on `extra_routes` (worker mode's channel).
    pub(crate) fn spawn_dispatcher(
        &self,
        background: &mut tokio::task::JoinSet<()>,
        wake: &dispatcher::Wake,
        marks: &Arc<Watermarks>,
        mut extra_routes: Vec<(Ident, Route)>,
        stop: &watch::Receiver<bool>,
    ) {
        background.spawn(watch_watermark(self.store.clone(), stop.clone()));
        let head_sql = self.store.statements().head().to_owned();
        let poll_interval = match self.config.dispatcher {
            DispatcherKind::Poll => self.config.poll_interval,
            DispatcherKind::Notify => {
                extra_routes.push((
                    self.config.notify_channel.clone(),
                    Route::Events {
                        marks: marks.clone(),
                        wake: wake.clone(),
                    },
                ));
                background.spawn(dispatcher::chase_watermark(
                    self.store.pool().clone(),
                    marks.clone(),
                    wake.clone(),
                    stop.clone(),
                ));
                self.config.reconcile_interval
            }
        };
        background.spawn(dispatcher::poll_loop(
            self.store.pool().clone(),
            head_sql,
            poll_interval,
            wake.clone(),
            stop.clone(),
        ));
        if !extra_routes.is_empty() {
            let mut listen_config = self.store.pg_config().clone();
            listen_config.application_name("projectionist-listener");
            background.spawn(dispatcher::listen_loop(
                listen_config,
                self.store.tls().clone(),
                extra_routes,
                self.config.max_backoff,
                stop.clone(),
            ));
        }
    }

    pub(crate) fn store(&self) -> &EventStore {
        &self.store
    }

    pub(crate) fn config(&self) -> &RunnerConfig {
        &self.config
    }

    pub(crate) fn projections(&self) -> &[Arc<dyn Projection>] {
        &self.projections
    }

    pub(crate) fn progress_counters(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Runs until `shutdown` completes, then lets every in-flight batch
    /// commit (within the shutdown timeout) and returns.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let processors = self.start_processors().await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (wake, _) = watch::channel(0u64);
        let marks = Arc::new(Watermarks::default());
        let mut background = tokio::task::JoinSet::new();
        self.spawn_dispatcher(&mut background, &wake, &marks, Vec::new(), &stop_rx);
        let mut workers = tokio::task::JoinSet::new();
        for p in processors {
            workers.spawn(processor_loop(
                p,
                marks.clone(),
                wake.subscribe(),
                stop_rx.clone(),
                LoopLimits {
                    max_backoff: self.config.max_backoff,
                    max_failures: None,
                },
                self.progress.clone(),
            ));
        }
        tracing::info!(
            projections = self.projections.len(),
            partition = self.config.partition,
            total_partitions = self.config.total_partitions,
            dispatcher = ?self.config.dispatcher,
            "projections running"
        );
        shutdown.await;
        tracing::info!("shutting down: letting in-flight batches commit");
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.config.shutdown_timeout, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        background.abort_all();
        match drained {
            Ok(()) => Ok(()),
            Err(_) => {
                workers.abort_all();
                Err(self.shutdown_timeout_error())
            }
        }
    }

    /// Runs this process in worker mode (see [`crate::WorkerConfig`]) until
    /// `shutdown` completes: it joins the worker pool, runs the slots the
    /// leader assigns it, and on shutdown finishes its batches, leaves the
    /// pool and lets the others take over at once.
    pub async fn run_workers_until(
        &self,
        worker: crate::worker::WorkerConfig,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        if self.projections.is_empty() {
            return Err(Error::config(
                "no projections to run: register at least one (or check --projection)",
            ));
        }
        crate::worker::run(self, worker, shutdown).await
    }

    pub(crate) fn shutdown_timeout_error(&self) -> Error {
        Error::new(
            crate::error::Kind::Other,
            format!(
                "shutdown timeout ({:?}) exceeded: unfinished batches were rolled back and will be \
                 handled again on the next start; raise SHUTDOWN_TIMEOUT if batches take longer",
                self.config.shutdown_timeout
            ),
        )
    }
}

pub(crate) fn check_unique<'a>(
    projections: impl Iterator<Item = &'a Arc<dyn Projection>>,
) -> Result<()> {
    let mut seen = HashSet::new();
    for p in projections {
        let name = p.name();
        if name.is_empty() {
            return Err(Error::config(
                "a projection has an empty name: give every projection a stable, unique name",
            ));
        }
        if !seen.insert(name.to_owned()) {
            return Err(Error::config(format!(
                "two projections are registered with the name {name:?}: names key the checkpoints, make them unique"
            )));
        }
    }
    Ok(())
}

/// A writing transaction open this long is named in a warning.
const WATERMARK_WARN_AFTER: Duration = Duration::from_secs(30);

/// Every 10 s, warns (naming it) about a writing transaction that has held
/// the gap-safe watermark back for longer than 30 s: otherwise a quiet
/// projection looks stuck for no reason.
async fn watch_watermark(store: EventStore, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.changed() => return,
        }
        if let Ok(Some(h)) = crate::admin::watermark_holder(&store).await {
            if h.open_seconds >= WATERMARK_WARN_AFTER.as_secs_f64() {
                tracing::warn!(
                    pid = h.pid,
                    database = h.database.as_deref().unwrap_or("?"),
                    application_name = h.application_name.as_deref().unwrap_or(""),
                    open_seconds = h.open_seconds as u64,
                    query = %h.query,
                    "an open writing transaction holds back the watermark: projections wait for it to end \
                     (end it with SELECT pg_terminate_backend(pid) if it is stuck)"
                );
            }
        }
    }
}

/// Stopped by the failure policy: waits for `resume` (true) or a stop
/// request (false).
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

/// Limits of a processor loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoopLimits {
    pub(crate) max_backoff: Duration,
    /// Give the slot up after this many failed batches in a row (worker
    /// mode); `None` retries for ever.
    pub(crate) max_failures: Option<u32>,
}

/// Why a processor loop ended.
#[derive(Debug)]
pub(crate) enum LoopExit {
    /// Asked to stop; the in-flight batch finished first.
    Stopped,
    /// The checkpoint or the assignment moved: this runner lost the slot.
    Fenced,
    /// Too many failed batches in a row; the last error.
    GaveUp(Error),
}

/// One slot's loop: batches back to back while pages are full; otherwise
/// wait for a wake-up. Errors are logged and retried with backoff; a fenced
/// slot stops.
pub(crate) async fn processor_loop(
    mut p: Processor,
    marks: Arc<Watermarks>,
    mut wake: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    limits: LoopLimits,
    progress: Arc<Progress>,
) -> LoopExit {
    let initial = Duration::from_millis(100);
    let mut backoff = initial;
    let mut failures: u32 = 0;
    loop {
        if *stop.borrow() {
            return LoopExit::Stopped;
        }
        if let Some(c) = p.projection().concurrency() {
            let outcome = crate::parallel::run(
                &mut p,
                c,
                marks.clone(),
                wake.clone(),
                stop.clone(),
                progress.clone(),
                false,
            )
            .await;
            match outcome {
                Ok(exit) => return exit,
                Err(e) if e.is_failed() => {
                    if !wait_for_resume(&p, &mut stop).await {
                        return LoopExit::Stopped;
                    }
                }
                Err(e) if e.is_fenced() && p.is_fenced_slot() => return LoopExit::Fenced,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(projection = p.name(), error = %e, failures, "concurrent slot failed; retrying");
                    let _ = p.reload_checkpoint().await;
                    if limits.max_failures.is_some_and(|max| failures >= max) {
                        return LoopExit::GaveUp(e);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(limits.max_backoff);
                }
            }
            continue;
        }
        wake.borrow_and_update();
        match p.run_batch().await {
            Ok(outcome) => {
                backoff = initial;
                failures = 0;
                marks.saw(outcome.watermark);
                if outcome.handled > 0 {
                    progress
                        .handled
                        .fetch_add(outcome.handled as u64, Ordering::Relaxed);
                    progress.batches.fetch_add(1, Ordering::Relaxed);
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
                tokio::select! {
                    _ = wake.changed() => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) if e.is_failed() => {
                if !wait_for_resume(&p, &mut stop).await {
                    return LoopExit::Stopped;
                }
            }
            Err(e) if e.is_fenced() && !p.is_fenced_slot() => {
                // Static mode: the stored checkpoint is not where this
                // process left it (a commit lost in a server crash, a reset,
                // or another process running the same partition). Resume
                // from the stored one; the compare-and-set keeps every
                // commit exactly-once.
                tracing::warn!(projection = p.name(), partition = p.slot().partition, error = %e,
                    "checkpoint moved under this process; reloading it");
                if let Err(e) = p.reload_checkpoint().await {
                    tracing::warn!(projection = p.name(), error = %e, "cannot reload the checkpoint");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(limits.max_backoff);
                }
            }
            Err(e) if e.is_fenced() => {
                tracing::warn!(projection = p.name(), partition = p.slot().partition, error = %e, "slot fenced; stopping it");
                return LoopExit::Fenced;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(projection = p.name(), partition = p.slot().partition, error = %e,
                    cursor = %p.cursor(), failures, retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying");
                p.record_error(&e).await;
                if limits.max_failures.is_some_and(|max| failures >= max) {
                    return LoopExit::GaveUp(e);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(limits.max_backoff);
            }
        }
    }
}
