//! The traits users implement — [`Projection`] (transactional) and
//! [`ConcurrentProjection`] (key-ordered concurrency, at-least-once) — and
//! their declarations: [`ProjectionOptions`], [`Filter`], [`Concurrency`],
//! [`UnknownEvents`].
//!
//! A projection is a stable name and version, an optional filter (applied
//! in SQL), and handlers that receive events together with the open
//! transaction in which the projection's checkpoint advances. Writes made through that
//! transaction commit atomically with the checkpoint: exactly once. Anything
//! else a handler does (HTTP calls, e-mail) may be repeated after a crash and
//! must be idempotent, keyed by [`StoredEvent::event_id`].

use crate::error::{Error, Result};
use crate::event::StoredEvent;
use crate::policy::FailurePolicy;
use async_trait::async_trait;

pub use crate::context::{Context, Scope};

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
/// Returned by [`ConcurrentProjection::concurrency`].
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

/// A projection's declarations, in one value: its name and version, which
/// events it reads, how worker mode splits it, what it does on failure and
/// with unknown events, and the read-model tables it owns.
///
/// ```
/// use projectionist::{Filter, FailurePolicy, ProjectionOptions};
/// let options = ProjectionOptions::new("account_balances")
///     .version(2)
///     .filter(Filter::all().aggregate_types(["Account"]))
///     .tables(["account_balances"])
///     .failure_policy(FailurePolicy::dead_letter());
/// assert_eq!(options.name(), "account_balances");
/// ```
#[derive(Clone, Debug)]
pub struct ProjectionOptions {
    pub(crate) name: String,
    pub(crate) version: i32,
    pub(crate) filter: Filter,
    pub(crate) partitions: i32,
    pub(crate) failure_policy: FailurePolicy,
    pub(crate) unknown_events: UnknownEvents,
    pub(crate) pipelined: bool,
    pub(crate) tables: Vec<String>,
    pub(crate) rewindable: bool,
    pub(crate) reads_metadata: bool,
}

impl ProjectionOptions {
    /// Options for the projection `name`: a stable, unique name, the key of
    /// its checkpoints (changing it starts the projection from the
    /// beginning). Plain identifier characters are safest; `@` is refused.
    /// Every other option has its default (see each setter).
    pub fn new(name: impl Into<String>) -> ProjectionOptions {
        ProjectionOptions {
            name: name.into(),
            version: 1,
            filter: Filter::all(),
            partitions: 1,
            failure_policy: FailurePolicy::default(),
            unknown_events: UnknownEvents::default(),
            pipelined: false,
            tables: Vec::new(),
            rewindable: false,
            reads_metadata: true,
        }
    }

    /// The projection's version (default 1). Raising it deploys a new
    /// version **beside** the running one: it starts from the first event,
    /// with checkpoints, dead letters and tables of its own, while the
    /// previous version keeps serving readers until `promote` switches them
    /// (see docs/changing-a-projection.md).
    pub fn version(mut self, version: i32) -> ProjectionOptions {
        self.version = version;
        self
    }

    /// Which events to receive (default: all of them).
    pub fn filter(mut self, filter: Filter) -> ProjectionOptions {
        self.filter = filter;
        self
    }

    /// Into how many partitions worker mode splits this projection, each a
    /// slot one worker runs at a time (default 1). Overridable per
    /// deployment with `PROJECTION_PARTITIONS`; changing it for a version
    /// with checkpoints requires `reset` (or a new version).
    pub fn partitions(mut self, partitions: i32) -> ProjectionOptions {
        self.partitions = partitions;
        self
    }

    /// What to do when the handler keeps failing on an event (default
    /// [`FailurePolicy::stop`]: 3 attempts, then the slot stops).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> ProjectionOptions {
        self.failure_policy = policy;
        self
    }

    /// What to do with events the store's registry does not know (default
    /// [`UnknownEvents::StopOnUnknownVersion`]).
    pub fn unknown_events(mut self, unknown: UnknownEvents) -> ProjectionOptions {
        self.unknown_events = unknown;
        self
    }

    /// Whether the default [`Projection::handle_batch`] may pipeline
    /// [`Projection::handle`] across streams, all in the batch transaction,
    /// so that statements travel to the server back to back instead of one
    /// round trip at a time (default `false`). The batch runs in rounds:
    /// the first event of every stream (`aggregate_type`, `aggregate_id`)
    /// in the batch, all started together; once they are all done, every
    /// stream's second event; and so on.
    ///
    /// Per-stream order always holds. Events of *different* streams may
    /// reach the server in any order, so opt in when the work of different
    /// streams commutes: each event writes only rows of its own stream (an
    /// upsert keyed by the aggregate id, an insert), or adds to shared
    /// counters.
    pub fn pipelined(mut self, pipelined: bool) -> ProjectionOptions {
        self.pipelined = pipelined;
        self
    }

    /// The read-model tables this projection owns, by the names readers
    /// query (default: none). Each version writes tables of its own —
    /// [`Context::table`] turns `account_balances` into this version's
    /// physical table — and readers query a view under the stable name that
    /// `promote` switches to the new version in one transaction. Create the
    /// tables in [`Projection::migrate`]. Names are plain identifiers of at
    /// most 59 characters (the version suffix `_v<N>` must fit in 63).
    pub fn tables<I, S>(mut self, tables: I) -> ProjectionOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tables = tables.into_iter().map(Into::into).collect();
        self
    }

    /// Whether `rewind` may move this projection's cursors back so that it
    /// handles events again (default `false`). Declare it for at-least-once
    /// consumers that resend to a sink and can take events twice.
    pub fn rewindable(mut self, rewindable: bool) -> ProjectionOptions {
        self.rewindable = rewindable;
        self
    }

    /// Whether the handler reads the events' metadata (default `true`).
    /// Declare `false` when it never calls [`StoredEvent::metadata`] or
    /// [`StoredEvent::metadata_json`]: the engine then reads pages without
    /// the `metadata` column, so the server does not convert each event's
    /// metadata to text and the client does not copy it (a no-op catch-up
    /// reads about 7% faster, a set-based read model about 2%; see
    /// docs/performance.md). The events this projection receives then
    /// carry no metadata: `metadata()` returns an error naming this option
    /// and `metadata_json()` is empty. With the `otel` feature, its handler
    /// spans are then not linked to a `traceparent` in the metadata.
    pub fn reads_metadata(mut self, reads: bool) -> ProjectionOptions {
        self.reads_metadata = reads;
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version.
    pub fn get_version(&self) -> i32 {
        self.version
    }

    /// The declared tables (stable names).
    pub fn get_tables(&self) -> &[String] {
        &self.tables
    }

    /// Refuses options the engine cannot run, naming the fix.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::config(
                "a projection has an empty name: give every projection a stable, unique name",
            ));
        }
        if self.name.contains('@') {
            return Err(Error::config(format!(
                "projection name {:?} contains '@', which the engine uses to name versions \
                 (name@v2): choose a name without it",
                self.name
            )));
        }
        if self.version < 1 {
            return Err(Error::config(format!(
                "projection {} declares version {}: versions start at 1",
                self.name, self.version
            )));
        }
        if self.partitions < 1 {
            return Err(Error::config(format!(
                "projection {} declares {} partitions: use 1 or more",
                self.name, self.partitions
            )));
        }
        for t in &self.tables {
            crate::ident::Ident::new("read-model table", t)?;
            if t.len() > 59 {
                return Err(Error::config(format!(
                    "projection {}: table name {t:?} is longer than 59 characters; the version \
                     suffix (_v<N>) must fit PostgreSQL's 63",
                    self.name
                )));
            }
        }
        Ok(())
    }
}

/// A transactional projection: reads events in order and maintains a read
/// model in the batch transaction, exactly once.
///
/// Implement [`Projection::options`] and [`Projection::handle`] (one event
/// at a time) or override [`Projection::handle_batch`] for set-based SQL
/// over a whole batch. For handlers that wait on I/O outside the database,
/// implement [`ConcurrentProjection`] instead.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The projection's declarations (name, version, filter, …). Called
    /// once, when the projection is registered.
    fn options(&self) -> ProjectionOptions;

    /// Handles one event inside the batch transaction (`ctx` derefs to
    /// it).
    async fn handle(&self, event: &StoredEvent, ctx: &Context<'_>) -> Result<()>;

    /// Handles a whole batch (in `(transaction_id, global_position)` order)
    /// inside the batch transaction. Default: [`Projection::handle`] for
    /// each event, in order (pipelined across streams when
    /// [`ProjectionOptions::pipelined`] says so).
    ///
    /// An override must keep each stream's events in order: per-stream
    /// order is part of the engine's contract.
    async fn handle_batch(&self, events: &[StoredEvent], ctx: &Context<'_>) -> Result<()> {
        if ctx.scope().pipelined && events.len() > 1 {
            for round in stream_rounds(events) {
                if let [event] = round.as_slice() {
                    self.handle(event, ctx).await?;
                    continue;
                }
                let handlers = round.iter().map(|event| self.handle(event, ctx));
                first_cause(futures_util::future::join_all(handlers).await)?;
            }
            return Ok(());
        }
        for event in events {
            self.handle(event, ctx).await?;
        }
        Ok(())
    }

    /// Creates this version's read-model tables and indexes (use
    /// [`Context::table`] for their names, and `IF NOT EXISTS`: it runs at
    /// every start). The engine runs it in a transaction under the
    /// migration lock, before the version's first batch. Default: nothing.
    async fn migrate(&self, ctx: &Context<'_>) -> Result<()> {
        let _ = ctx;
        Ok(())
    }

    /// Clears the read model (called by `reset`, in the transaction that
    /// also deletes the checkpoints). `partition` is `None` for the whole
    /// projection, or the one static partition being reset (clear only the
    /// rows of aggregates in it: see [`Partition::sql_condition`]).
    /// Default: nothing to clear.
    async fn reset(&self, ctx: &Context<'_>, partition: Option<Partition>) -> Result<()> {
        let _ = (ctx, partition);
        Ok(())
    }
}

/// A projection whose handler waits on I/O (HTTP calls, e-mail, other
/// services), run with key-ordered concurrency (see [`Concurrency`]):
/// events of one aggregate strictly in order, of different aggregates
/// concurrently.
///
/// This mode is **at-least-once**: handlers get no transaction, and after a
/// crash up to `max_in_flight` events are handled again. Key side effects
/// by [`StoredEvent::event_id`].
#[async_trait]
pub trait ConcurrentProjection: Send + Sync + 'static {
    /// The projection's declarations (name, version, filter, …). Called
    /// once, when the projection is registered. `pipelined` does not apply.
    fn options(&self) -> ProjectionOptions;

    /// The concurrency window. Default: [`Concurrency::default`] (64
    /// events in flight).
    fn concurrency(&self) -> Concurrency {
        Concurrency::default()
    }

    /// Handles one event, without a transaction (at-least-once).
    async fn handle(&self, event: &StoredEvent, scope: &Scope) -> Result<()>;

    /// Creates this version's tables, if it keeps any (see
    /// [`Projection::migrate`]). Default: nothing.
    async fn migrate(&self, ctx: &Context<'_>) -> Result<()> {
        let _ = ctx;
        Ok(())
    }

    /// Clears what the projection keeps (see [`Projection::reset`]).
    /// Default: nothing.
    async fn reset(&self, ctx: &Context<'_>, partition: Option<Partition>) -> Result<()> {
        let _ = (ctx, partition);
        Ok(())
    }
}

/// The events of a batch in rounds: round `n` holds the `n`-th event of
/// every stream (`aggregate_type`, `aggregate_id`) that has one, in batch
/// order. Running the rounds one after the other keeps every stream's
/// order while each round's events, of distinct streams, run together.
fn stream_rounds(events: &[StoredEvent]) -> Vec<Vec<&StoredEvent>> {
    let mut seen: std::collections::HashMap<(&str, &str), usize> =
        std::collections::HashMap::with_capacity(events.len());
    let mut rounds: Vec<Vec<&StoredEvent>> = Vec::new();
    for event in events {
        let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
        let n = seen.entry(key).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(event);
        *n += 1;
    }
    rounds
}

/// The outcome of events handled together: the first error that is not
/// merely "the transaction is already aborted" (SQLSTATE 25P02, the echo
/// of another event's failure), else the first error, else `Ok`.
fn first_cause(outcomes: Vec<Result<()>>) -> Result<()> {
    let mut first: Option<Error> = None;
    for outcome in outcomes {
        if let Err(e) = outcome {
            if e.db_code() != Some("25P02") {
                return Err(e);
            }
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: i64, aggregate_type: &str, aggregate_id: &str) -> StoredEvent {
        StoredEvent {
            global_position: position,
            transaction_id: 1,
            event_id: uuid::Uuid::nil(),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            aggregate_version: position,
            event_type: "Happened".to_owned(),
            event_version: 1,
            created_at: chrono::Utc::now(),
            payload: "{}".to_owned(),
            metadata: "{}".to_owned(),
        }
    }

    #[test]
    fn batches_run_in_rounds_that_keep_each_streams_order() {
        let events = [
            event(1, "Order", "a"),
            event(2, "Order", "b"),
            event(3, "Order", "a"),
            event(4, "Invoice", "a"),
            event(5, "Order", "b"),
            event(6, "Order", "a"),
        ];
        let positions: Vec<Vec<i64>> = stream_rounds(&events)
            .iter()
            .map(|s| s.iter().map(|e| e.global_position).collect())
            .collect();
        assert_eq!(positions, vec![vec![1, 2, 4], vec![3, 5], vec![6]]);
    }
}
