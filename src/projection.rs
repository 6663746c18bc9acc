//! The [`Projection`] trait users implement, and its [`Filter`].
//!
//! A projection is a stable name, an optional filter (applied in SQL), and
//! handlers that receive events together with the open transaction in which
//! the projection's checkpoint advances. Writes made through that
//! transaction commit atomically with the checkpoint: exactly once. Anything
//! else a handler does (HTTP calls, e-mail) may be repeated after a crash and
//! must be idempotent, keyed by [`StoredEvent::event_id`].

use crate::error::Result;
use crate::event::StoredEvent;
use crate::policy::FailurePolicy;
use async_trait::async_trait;

/// The open batch transaction handed to handlers. It is a
/// `deadpool_postgres::Transaction`: it derefs to
/// `tokio_postgres::Transaction` and adds `prepare_cached`, so prepared
/// statements are reused across batches on the same connection.
pub type Transaction<'a> = deadpool_postgres::Transaction<'a>;

/// Which events a projection receives. Evaluated by the database, so a
/// projection never reads rows it does not want; its cursor still advances
/// past the events it skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub(crate) aggregate_types: Vec<String>,
    pub(crate) event_types: Vec<String>,
}

impl Filter {
    /// Every event (the default).
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Only events of these aggregate types (in addition to any other
    /// condition of this filter).
    pub fn aggregate_types<I, S>(mut self, types: I) -> Filter
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.aggregate_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Only events of these event types (in addition to any other condition
    /// of this filter).
    pub fn event_types<I, S>(mut self, types: I) -> Filter
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.event_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Whether this filter passes `event` (the SQL filter's twin, for tests
    /// and for dead-letter retries).
    pub fn matches(&self, event: &StoredEvent) -> bool {
        (self.aggregate_types.is_empty() || self.aggregate_types.contains(&event.aggregate_type))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
    }
}

/// Opt-in key-ordered concurrency for projections whose handlers wait on
/// I/O (HTTP calls, e-mail, other services): events of one aggregate are
/// handled strictly in order, events of different aggregates concurrently,
/// up to `max_in_flight` at a time. The checkpoint advances to the highest
/// position below which every event is complete.
///
/// This mode is **at-least-once**: handlers get no transaction, and after a
/// crash up to `max_in_flight` events are handled again. Key side effects by
/// [`StoredEvent::event_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    pub(crate) max_in_flight: usize,
}

impl Concurrency {
    /// The default window: 64 events in flight.
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

    /// At most `max_in_flight` events fetched and not yet committed (at
    /// least 1). Fetching pauses at the limit (backpressure).
    pub fn new(max_in_flight: usize) -> Concurrency {
        Concurrency {
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The window size.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
}

impl Default for Concurrency {
    fn default() -> Concurrency {
        Concurrency::new(Concurrency::DEFAULT_MAX_IN_FLIGHT)
    }
}

/// What a projection does with an event the store's [`Registry`] does not
/// know: one written by a newer release (a version above the registry's
/// current version of its type, or a type it does not register), or an old
/// version no upcaster brings up to date. Without a registry on the store
/// every event is handed over as it is.
///
/// "Stop" means: the slot stops at the event (state `failed`, whatever the
/// failure policy), its checkpoint stays before it, nothing after it is
/// handled, and the error names the type, version and position and tells
/// the operator to deploy the newer binary and run `resume`.
///
/// [`Registry`]: crate::Registry
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownEvents {
    /// Stop at a registered type's unknown version; hand types the
    /// registry does not register to the handler as they are stored (a
    /// registry need not list every type). The default.
    #[default]
    StopOnUnknownVersion,
    /// Stop at an unknown version and at any type the registry does not
    /// register: for projections that handle only registered types.
    StopOnUnknownType,
    /// Pass over unknown versions and unregistered types without handing
    /// them to the handler (the cursor moves past them: this projection
    /// never handles them, even after an upgrade, unless it is rebuilt).
    /// For projections that ignore what they do not handle explicitly.
    Ignore,
}

/// One static partition: `key` of `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Partition {
    /// The partition, in `0..total`.
    pub key: i32,
    /// The partition count.
    pub total: i32,
}

impl Partition {
    /// SQL condition selecting the rows of this partition, given the SQL
    /// expression holding the aggregate id, e.g.
    /// `Partition { key: 1, total: 4 }.sql_condition("account_id")` gives
    /// `projectionist_partition(account_id, 4) = 1` (a function in the
    /// projectionist schema, which must be on the search path).
    pub fn sql_condition(&self, aggregate_id_expr: &str) -> String {
        format!(
            "projectionist_partition({aggregate_id_expr}, {}) = {}",
            self.total, self.key
        )
    }
}

/// A projection: reads events in order and maintains a read model.
///
/// Implement [`Projection::handle`] (one event at a time) or override
/// [`Projection::handle_batch`] for set-based SQL over a whole batch.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// A stable, unique name: the key of the projection's checkpoints.
    /// Changing it starts the projection from the beginning.
    fn name(&self) -> &str;

    /// Which events to receive. Default: all of them.
    fn filter(&self) -> Filter {
        Filter::all()
    }

    /// Into how many partitions worker mode splits this projection (each
    /// partition is a slot that one worker runs at a time). Default: 1.
    /// Overridable per deployment with `PROJECTION_PARTITIONS`. Changing it
    /// for a projection with checkpoints requires `reset`.
    fn partitions(&self) -> i32 {
        1
    }

    /// What to do when the handler keeps failing on an event. Default:
    /// [`FailurePolicy::stop`] (3 attempts, then the slot stops).
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::default()
    }

    /// What to do with events the store's registry does not know (see
    /// [`UnknownEvents`]). Default: [`UnknownEvents::StopOnUnknownVersion`].
    fn unknown_events(&self) -> UnknownEvents {
        UnknownEvents::default()
    }

    /// Opt into key-ordered concurrency (see [`Concurrency`]): the engine
    /// then calls [`Projection::handle_concurrent`] instead of the
    /// transactional handlers. Default: `None` (sequential, transactional).
    fn concurrency(&self) -> Option<Concurrency> {
        None
    }

    /// Handles one event in concurrency mode, without a transaction
    /// (at-least-once). Required when [`Projection::concurrency`] is set.
    async fn handle_concurrent(&self, event: &StoredEvent) -> Result<()> {
        let _ = event;
        Err(crate::Error::config(format!(
            "projection {} sets concurrency() but does not implement handle_concurrent()",
            self.name()
        )))
    }

    /// Handles one event inside the batch transaction `tx`.
    async fn handle(&self, event: &StoredEvent, tx: &Transaction<'_>) -> Result<()>;

    /// Whether the default [`Projection::handle_batch`] may pipeline
    /// [`Projection::handle`]: start every event's handler without waiting
    /// for the previous one's round trip, all in the same transaction, so
    /// their statements travel to the server back to back. Statements reach
    /// the server in event order only up to each handler's first `await`
    /// on the database: opt in when each event's work is one statement (an
    /// upsert, an insert), or when the statements of different events
    /// commute. Default: `false` (one event after the other).
    fn pipelined(&self) -> bool {
        false
    }

    /// Handles a whole batch (in `(transaction_id, global_position)` order)
    /// inside `tx`. Default: [`Projection::handle`] for each event, in order
    /// (pipelined when [`Projection::pipelined`] says so).
    async fn handle_batch(&self, events: &[StoredEvent], tx: &Transaction<'_>) -> Result<()> {
        if self.pipelined() {
            let handlers = events.iter().map(|event| self.handle(event, tx));
            for outcome in futures_util::future::join_all(handlers).await {
                outcome?;
            }
            return Ok(());
        }
        for event in events {
            self.handle(event, tx).await?;
        }
        Ok(())
    }

    /// Clears the read model (called by `reset`, in the transaction that
    /// also deletes the checkpoints). `partition` is `None` for the whole
    /// projection, or the one static partition being reset (clear only the
    /// rows of aggregates in it: see [`Partition::sql_condition`]).
    /// Default: nothing to clear.
    async fn reset(&self, tx: &Transaction<'_>, partition: Option<Partition>) -> Result<()> {
        let _ = (tx, partition);
        Ok(())
    }
}
