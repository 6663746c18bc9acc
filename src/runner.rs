//! [`Runner`]: runs many projections in one process — one task per slot,
//! one shared dispatcher, graceful shutdown (in-flight batches commit, then
//! the runner returns), `once` mode (catch up, then return), and worker
//! mode (handing its [`Engine`] to `worker.rs`).

use crate::dispatcher::Watermarks;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::processor::{Processor, Slot};
use crate::projection::{ConcurrentProjection, Projection};
use crate::registered::Registered;
use crate::slot::{LoopExit, LoopLimits, Signals};
use crate::store::EventStore;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub use crate::config::{
    RunnerConfig, DEFAULT_BATCH_SIZE, DEFAULT_MAX_BACKOFF, DEFAULT_POLL_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT, MAX_BATCH_SIZE,
};
pub(crate) use crate::engine::check_unique;
pub use crate::progress::Progress;

/// What a static slot needs to start again after its task died.
struct Restart {
    projection: Registered,
    pool: deadpool_postgres::Pool,
    statements: Arc<crate::store::Statements>,
    slot: Slot,
    batch_size: i64,
}

/// Runs a static slot; if its task dies (a panic in engine code — handler
/// panics are handler errors and never get here), logs it and starts the
/// slot again from its stored checkpoint, so one slot's bug never silently
/// takes it out of service.
async fn supervise(first: Processor, again: Restart, s: Signals, limits: LoopLimits) -> LoopExit {
    let mut p = first;
    loop {
        let mut run = crate::slot::SlotTask(tokio::spawn(crate::slot::run(p, s.clone(), limits)));
        match (&mut run.0).await {
            Ok(exit) => return exit,
            Err(e) => tracing::error!(projection = again.projection.key(), error = %e,
                "the slot's task died; starting the slot again from its checkpoint"),
        }
        let mut stop = s.stop.clone();
        p = loop {
            if *stop.borrow() {
                return LoopExit::Stopped;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
            match Processor::start(
                again.projection.clone(),
                again.pool.clone(),
                &again.statements,
                again.slot,
                again.batch_size,
                None,
            )
            .await
            {
                Ok(p) => break p,
                Err(e) => tracing::error!(projection = again.projection.key(), error = %e,
                    "cannot start the slot again; retrying"),
            }
        };
    }
}

/// Runs projections.
pub struct Runner {
    engine: Engine,
    /// Connections for batch transactions (see `RunnerConfig::synchronous_commit`).
    pool: deadpool_postgres::Pool,
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
            engine: Engine {
                store,
                config,
                projections: Vec::new(),
                progress: Arc::new(Progress::default()),
            },
            pool,
        }
    }

    /// Adds registered projections (e.g. [`App::projections`](crate::App::projections)).
    /// Names must be unique.
    pub fn with_projections(mut self, projections: &[Registered]) -> Result<Runner> {
        for p in projections {
            self = self.with_registered(p.clone())?;
        }
        Ok(self)
    }

    /// Adds a transactional projection, refusing invalid options and a
    /// name this runner already has.
    pub fn with_projection(self, projection: Arc<dyn Projection>) -> Result<Runner> {
        self.with_registered(Registered::new(projection)?)
    }

    /// Adds a concurrent projection (see [`ConcurrentProjection`]),
    /// refusing invalid options and a name this runner already has.
    pub fn with_concurrent_projection(
        self,
        projection: Arc<dyn ConcurrentProjection>,
    ) -> Result<Runner> {
        self.with_registered(Registered::concurrent(projection)?)
    }

    /// Adds a registered projection. Its name must be unique among this
    /// runner's.
    pub fn with_registered(mut self, projection: Registered) -> Result<Runner> {
        check_unique(
            self.engine
                .projections
                .iter()
                .chain(std::iter::once(&projection)),
        )?;
        self.engine.projections.push(projection);
        Ok(self)
    }

    /// The projections this runner runs.
    pub fn projections(&self) -> &[Registered] {
        &self.engine.projections
    }

    /// Shared progress counters.
    pub fn progress(&self) -> Arc<Progress> {
        self.engine.progress.clone()
    }

    fn static_slot(&self) -> Slot {
        Slot {
            partition: self.engine.config.partition,
            total: self.engine.config.total_partitions,
        }
    }

    async fn start_processor(&self, projection: &Registered) -> Result<Processor> {
        Processor::start(
            projection.clone(),
            self.pool.clone(),
            self.engine.store.statements(),
            self.static_slot(),
            self.engine.config.batch_size,
            None,
        )
        .await
    }

    async fn start_processors(&self) -> Result<Vec<Processor>> {
        if self.engine.projections.is_empty() {
            return Err(Error::config(
                "no projections to run: register at least one (or check --projection)",
            ));
        }
        {
            let client = self.engine.store.pool().get().await?;
            crate::checkpoint::Checkpoints::new(&self.engine.store.statements().checkpoints)
                .check_cluster(&**client)
                .await?;
        }
        crate::versions::prepare(&self.engine.store, &self.engine.projections).await?;
        let mut processors = Vec::new();
        for p in &self.engine.projections {
            processors.push(self.start_processor(p).await?);
        }
        // After the checkpoints accepted the partition count: never build
        // an index for a count that is refused.
        crate::partition_index::ensure(&self.engine.store, self.engine.config.total_partitions)
            .await?;
        Ok(processors)
    }

    fn limits(&self, once: bool) -> LoopLimits {
        LoopLimits {
            max_backoff: self.engine.config.max_backoff,
            max_failures: None,
            once,
        }
    }

    /// Catches every projection up with what is readable now, then returns.
    pub async fn run_once(&self) -> Result<()> {
        let processors = self.start_processors().await?;
        let mut tasks = tokio::task::JoinSet::new();
        // No dispatcher: each slot reads until a page is not full.
        let (_wake_tx, wake) = watch::channel(0u64);
        let (_stop_tx, stop) = watch::channel(false);
        let marks = Arc::new(Watermarks::default());
        for p in processors {
            let signals = Signals {
                marks: marks.clone(),
                wake: wake.clone(),
                stop: stop.clone(),
                progress: self.engine.progress.clone(),
            };
            tasks.spawn(crate::slot::run(p, signals, self.limits(true)));
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            let e = match joined {
                Ok(LoopExit::Stopped) => continue,
                Ok(LoopExit::GaveUp(e)) => e,
                Ok(LoopExit::Fenced) => Error::fenced("a slot was fenced"),
                Err(e) => Error::new(
                    crate::error::Kind::Other,
                    format!("a slot task panicked: {e}"),
                ),
            };
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs until `shutdown` completes, then lets every in-flight batch
    /// commit (within the shutdown timeout) and returns. A slot task that
    /// dies (an engine panic) is logged and started again.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let processors = self.start_processors().await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (wake, _) = watch::channel(0u64);
        let marks = Arc::new(Watermarks::default());
        let mut background = tokio::task::JoinSet::new();
        self.engine
            .spawn_background(&mut background, &wake, &marks, Vec::new(), &stop_rx);
        let mut slots = tokio::task::JoinSet::new();
        for p in processors {
            let signals = Signals {
                marks: marks.clone(),
                wake: wake.subscribe(),
                stop: stop_rx.clone(),
                progress: self.engine.progress.clone(),
            };
            let restart = Restart {
                projection: p.projection().clone(),
                pool: self.pool.clone(),
                statements: self.engine.store.statements().clone(),
                slot: self.static_slot(),
                batch_size: self.engine.config.batch_size,
            };
            slots.spawn(supervise(p, restart, signals, self.limits(false)));
        }
        tracing::info!(
            projections = self.engine.projections.len(),
            partition = self.engine.config.partition,
            total_partitions = self.engine.config.total_partitions,
            dispatcher = ?self.engine.config.dispatcher,
            "projections running"
        );
        shutdown.await;
        tracing::info!("shutting down: letting in-flight batches commit");
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(self.engine.config.shutdown_timeout, async {
            while slots.join_next().await.is_some() {}
        })
        .await;
        background.abort_all();
        match drained {
            Ok(()) => Ok(()),
            Err(_) => {
                slots.abort_all();
                Err(self.engine.shutdown_timeout_error())
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
        if self.engine.projections.is_empty() {
            return Err(Error::config(
                "no projections to run: register at least one (or check --projection)",
            ));
        }
        crate::worker::run(&self.engine, worker, shutdown).await
    }
}
