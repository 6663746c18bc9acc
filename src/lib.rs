//! # projectionist
//!
//! Event sourcing on PostgreSQL: an append-only `events` table, an
//! [`EventStore`] to append and read it, and a projection engine that reads
//! it gap-safely, in order, and checkpoints in the handler's transaction.
//!
//! The crate root is the public API; the machinery lives in private
//! modules. See `docs/architecture.md` for the code map.

mod admin;
mod assign;
mod checkpoint;
pub mod cli;
mod combine;
mod config;
mod console;
mod context;
mod db;
pub mod dead_letter;
mod dispatcher;
mod engine;
mod error;
mod event;
mod ident;
mod metrics;
mod migrate;
pub mod otel;
mod page;
mod parallel;
mod partition_index;
mod policy;
mod processor;
mod progress;
mod projection;
mod registered;
mod registry;
pub mod rewind;
mod runner;
mod server;
mod slot;
mod store;
mod tls;
mod typed;
pub mod versions;
mod wait;
mod worker;

#[cfg(feature = "testing")]
pub mod testing;

pub use admin::{
    explain_status, report, report_with, reset, status, status_with, watermark_holder, workers,
    SlotStatus, StatusOptions, StatusReport, WatermarkHolder, WorkerStatus,
    DEAD_LETTER_COUNT_LIMIT, DEFAULT_EXACT_LAG_LIMIT, DEFAULT_STATUS_TIMEOUT, LAG_SAMPLE_EVENTS,
};
pub use checkpoint::{Checkpoint, CHECKPOINTS_CHANNEL};
pub use cli::App;
pub use context::{Context, Scope};
pub use db::{describe as describe_database, parse_url, DEFAULT_POOL_SIZE};
pub use dispatcher::DispatcherKind;
pub use error::{Error, Result};
pub use event::{Cursor, Metadata, NewEvent, StoredEvent};
pub use migrate::{embedded_migrations, migrate, MigrationReport, HISTORY_TABLE};
pub use page::ReadBatch;
pub use policy::{FailurePolicy, OnFailure};
pub use projection::{
    Concurrency, ConcurrentProjection, Filter, Partition, Projection, ProjectionOptions,
    Transaction, UnknownEvents,
};
pub use registered::Registered;
pub use registry::{Registry, UpcastResult};
pub use runner::{
    Progress, Runner, RunnerConfig, DEFAULT_BATCH_SIZE, DEFAULT_MAX_BACKOFF, DEFAULT_POLL_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT, MAX_BATCH_SIZE,
};
pub use store::{
    AppendResult, EventStore, ExpectedVersion, StoreConfig, DEFAULT_APPEND_LANES,
    DEFAULT_NOTIFY_CHANNEL, DEFAULT_NOTIFY_INTERVAL, DEFAULT_NOTIFY_MAX_INTERVAL,
};
pub use typed::{Event, EventType};
pub use wait::{WaitTarget, Waiter};
pub use worker::{
    WorkerConfig, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_CONSECUTIVE_FAILURES, DEFAULT_REBALANCE_INTERVAL, WORKERS_CHANNEL,
};

/// Re-exported for implementing [`Projection`].
pub use async_trait::async_trait;
/// Re-exported so users need not depend on the pool crate directly.
pub use deadpool_postgres::Pool;
/// The PostgreSQL client the engine uses, re-exported so that an
/// application writes projections without adding `tokio-postgres` itself
/// (and without matching its version by hand): e.g.
/// `projectionist::tokio_postgres::types::Json`. The types handlers use
/// most are also at the crate root: [`Row`], [`ToSql`], [`GenericClient`].
pub use tokio_postgres;
/// `tokio_postgres::types::ToSql`: the type of query parameters
/// (`&[&(dyn ToSql + Sync)]`).
pub use tokio_postgres::types::ToSql;
/// `tokio_postgres::GenericClient`: code that runs on a client or a
/// transaction alike (e.g. a helper called from `handle` and from a test).
pub use tokio_postgres::GenericClient;
/// A result row (`tokio_postgres::Row`): what `ctx.query(…)` returns.
pub use tokio_postgres::Row;

/// Used by the [`events!`] macro; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use serde_json;
}
