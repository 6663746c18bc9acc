//! # projectionist
//!
//! Event sourcing on PostgreSQL: an append-only `events` table, an
//! [`EventStore`] to append and read it, and a projection engine that reads
//! it gap-safely, in order, and checkpoints in the handler's transaction.
//!
//! The crate root is the public API; the machinery lives in private
//! modules. See `docs/architecture.md` for the code map.

mod db;
mod error;
mod event;
mod ident;
mod migrate;
mod store;

#[cfg(feature = "testing")]
pub mod testing;

pub use db::{describe as describe_database, parse_url, DEFAULT_POOL_SIZE};
pub use error::{Error, Result};
pub use event::{Cursor, Metadata, NewEvent, StoredEvent};
pub use migrate::{embedded_migrations, migrate, MigrationReport, HISTORY_TABLE};
pub use store::{
    AppendResult, EventStore, ExpectedVersion, ReadBatch, StoreConfig, DEFAULT_NOTIFY_CHANNEL,
};

/// Re-exported so users need not depend on the pool crate directly.
pub use deadpool_postgres::Pool;
