//! The event store: appends (one statement, one round trip per batch),
//! stream reads, and gap-safe reads of the whole log.
//!
//! Architecture invariant: appends are a single SQL statement, so an append
//! in "its own transaction" is an autocommit statement, and an append in a
//! caller's transaction adds exactly one statement to it. Concurrent
//! autocommit appends may share one statement (see [`crate::combine`] and
//! [`StoreConfig::append_lanes`]); when the server refuses a shared
//! statement, nothing was written and each append runs again alone.

use crate::combine::Combiner;
use crate::db;
use crate::error::{Error, Kind, Result};
use crate::event::{Cursor, NewEvent, StoredEvent, Xid8};
use crate::ident::Ident;
use crate::page::{PageReader, ReadBatch, ReadFilter};
use crate::registry::Registry;
use deadpool_postgres::Pool;
use std::borrow::Cow;
use std::sync::Arc;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// What the writer expects the stream's current version to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version (still subject to the
    /// per-stream order rule).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this.
    Exact(i64),
}

impl ExpectedVersion {
    fn as_param(self) -> Option<i64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        }
    }
}

/// What an append wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    /// Global position of the first appended event.
    pub first_position: i64,
    /// Global position of the last appended event.
    pub last_position: i64,
    /// The stream's version after the append (pass it as the next
    /// `ExpectedVersion::Exact`).
    pub stream_version: i64,
    /// The appending transaction's id.
    pub transaction_id: u64,
}

/// Options for an [`EventStore`], with documented defaults.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub(crate) schema: Ident,
    pub(crate) notify_channel: Option<Ident>,
    pub(crate) pool_size: usize,
    pub(crate) ca_file: Option<std::path::PathBuf>,
    pub(crate) registry: Option<Arc<Registry>>,
    pub(crate) notify_interval: std::time::Duration,
    pub(crate) notify_max_interval: std::time::Duration,
    pub(crate) append_lanes: usize,
}

/// The default of [`StoreConfig::append_lanes`]: 1.
pub const DEFAULT_APPEND_LANES: usize = 1;

/// The default of [`StoreConfig::notify_interval`]: 1 ms.
pub const DEFAULT_NOTIFY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

/// The default of [`StoreConfig::notify_max_interval`]: 8 ms.
pub const DEFAULT_NOTIFY_MAX_INTERVAL: std::time::Duration = std::time::Duration::from_millis(8);

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            schema: Ident::new("schema", "public").unwrap_or_else(|_| unreachable!()),
            notify_channel: Some(
                Ident::new("NOTIFY channel", DEFAULT_NOTIFY_CHANNEL)
                    .unwrap_or_else(|_| unreachable!()),
            ),
            pool_size: db::DEFAULT_POOL_SIZE,
            ca_file: None,
            registry: None,
            notify_interval: DEFAULT_NOTIFY_INTERVAL,
            notify_max_interval: DEFAULT_NOTIFY_MAX_INTERVAL,
            append_lanes: DEFAULT_APPEND_LANES,
        }
    }
}

impl StoreConfig {
    /// The PostgreSQL schema holding the tables. Default: `public`.
    pub fn schema(mut self, schema: &str) -> Result<StoreConfig> {
        self.schema = Ident::new("schema", schema)?;
        Ok(self)
    }

    /// NOTIFY this channel for every append, so `notify` dispatchers wake
    /// at once: appends in their own transaction notify right after the
    /// commit (coalesced, from a background task on a connection of its
    /// own, opened on the first append); appends in a caller's
    /// transaction notify inside it. `None` appends without NOTIFY.
    /// Default: [`DEFAULT_NOTIFY_CHANNEL`].
    pub fn notify_channel(mut self, channel: Option<&str>) -> Result<StoreConfig> {
        self.notify_channel = channel
            .map(|c| Ident::new("NOTIFY channel", c))
            .transpose()?;
        Ok(self)
    }

    /// After each after-commit notification, wait this long before the
    /// next one: appends committed meanwhile share it (the newest one's
    /// transaction id covers them all). An append after a quiet spell is
    /// announced at once; during a burst of appends a projection learns of
    /// them up to this much later (it is busy reading them anyway), and the
    /// server handles one NOTIFY per interval instead of one per append.
    /// Each NOTIFY is a transaction of its own on the server (it takes a
    /// transaction id); while a burst lasts the wait grows, see
    /// [`StoreConfig::notify_max_interval`]. Zero sends one notification
    /// per append (still coalescing what commits while one is sent).
    /// Appends in a caller's transaction notify inside it and are not
    /// affected. Default: [`DEFAULT_NOTIFY_INTERVAL`] (1 ms).
    pub fn notify_interval(mut self, interval: std::time::Duration) -> StoreConfig {
        self.notify_interval = interval;
        self
    }

    /// How long the wait after a notification may grow during a sustained
    /// burst. After a notification that announced a single event the wait
    /// is [`StoreConfig::notify_interval`]; after each one that announced
    /// several (several appends, or an append of several events) it is
    /// twice the previous wait, up to this. The wait only holds back
    /// appends that commit during it: single-event appends a few
    /// milliseconds apart are each announced at once, while a writer
    /// appending thousands of events a second sends one notification per
    /// this much time instead of one per `notify_interval` (on the
    /// benchmark machine a lone single-event writer sent one notification
    /// per ~8 appends with a fixed 1 ms, one per ~34 with the defaults;
    /// each costs a round trip, a server transaction and a transaction
    /// id). A dispatcher already busy with the burst reads on
    /// regardless; one that caught up learns of new appends up to this
    /// much later while the burst lasts. Values below `notify_interval`
    /// mean a fixed `notify_interval`. Default:
    /// [`DEFAULT_NOTIFY_MAX_INTERVAL`] (8 ms).
    pub fn notify_max_interval(mut self, max: std::time::Duration) -> StoreConfig {
        self.notify_max_interval = max;
        self
    }

    /// How many autocommit appends ([`EventStore::append`]) of this store
    /// run at once before further ones queue and share statements: while
    /// `lanes` appends are in flight, the appends that arrive meanwhile wait
    /// and then go together — one statement, one transaction, one commit
    /// (and one disk flush) for all of them. A lone writer never waits, so
    /// its appends are unchanged; many concurrent writers commit far more
    /// events per second (on the benchmark machine, single-event appends:
    /// 8 writers 15-30% more, 32 writers 2.2-2.8 times as many; see
    /// `docs/performance.md`).
    ///
    /// Each shared append keeps its own checks and outcome: a version
    /// conflict fails only that append; a duplicate event id, a value the
    /// server refuses or a deadlock makes the store run each append of the
    /// batch alone, so every caller gets the result it would have got
    /// alone. Appends to the same stream never share a statement; appends of
    /// more than 32 events run as they come. What appends that shared a
    /// statement have in common is visible: the same `transaction_id`, and
    /// readers see them at the same moment. A queued append that waited 20
    /// ms (a lane stuck on a lock, a slow disk) opens another lane, so one
    /// slow append does not hold the others back. An append whose caller
    /// gives up (drops the future, e.g. a timeout) while it is queued is not
    /// written; once its statement is sent it may be, as any append whose
    /// reply is lost. `0` turns sharing off:
    /// every append is its own statement on its own pooled connection.
    /// Appends in a caller's transaction ([`EventStore::append_in`]) are
    /// never shared. Default: [`DEFAULT_APPEND_LANES`] (1; on the benchmark
    /// machine 1 and 2 lanes were alike for 32 writers, 1 was faster for 8).
    pub fn append_lanes(mut self, lanes: usize) -> StoreConfig {
        self.append_lanes = lanes;
        self
    }

    /// A PEM file of CA certificates to verify the server's TLS certificate
    /// with (`sslmode=verify-ca`/`verify-full`, or `require`, in the URL),
    /// when the URL names no `sslrootcert`. Default: none (Mozilla roots for
    /// verify modes).
    pub fn ca_file(mut self, path: Option<&std::path::Path>) -> StoreConfig {
        self.ca_file = path.map(|p| p.to_path_buf());
        self
    }

    /// The application's event types and upcasters. Every read through the
    /// store (projections in every mode, stream reads, `read_all`, `dlq
    /// show`, `dlq retry`) brings events to their current shape; every
    /// append is checked (registered type, current version, a payload that
    /// decodes); projection filters also match old type names; events of a
    /// version newer than the registry's stop projections (see
    /// [`UnknownEvents`](crate::UnknownEvents)). Fails when the registry is
    /// inconsistent (see [`Registry::check`]). Default: none (events are
    /// read and appended as they are).
    pub fn registry(mut self, registry: Registry) -> Result<StoreConfig> {
        self.registry = Some(Arc::new(registry.sealed()?));
        Ok(self)
    }

    /// Maximum pooled connections when the store builds its own pool.
    /// Pools hand out the connection returned last (so a lone writer keeps
    /// one connection and one server process). With a NOTIFY channel the
    /// store opens one more connection, its own, for the after-commit
    /// notifications. Default: 16.
    pub fn pool_size(mut self, size: usize) -> StoreConfig {
        self.pool_size = size;
        self
    }
}

/// The NOTIFY channel used when none is configured: `projectionist_events`.
pub const DEFAULT_NOTIFY_CHANNEL: &str = "projectionist_events";

/// SQL text for one schema, built once.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) events: String,
    pub(crate) checkpoints: String,
    pub(crate) assignments: String,
    pub(crate) workers: String,
    pub(crate) dead_letters: String,
    /// The crash sentinel (an unlogged table, see migration V6).
    pub(crate) epoch: String,
    /// Projection versions (migration V7).
    pub(crate) versions: String,
    /// The migration lock key of the schema (DDL of read models runs under
    /// it).
    pub(crate) migration_lock: i64,
    /// The append, with the in-transaction NOTIFY when configured (for
    /// appends in a caller's transaction), by [`Report`].
    append: [String; 3],
    /// The append without NOTIFY (autocommit appends notify after commit,
    /// from the store's notifier), by [`Report`].
    append_quiet: [String; 3],
    /// Several autocommit appends to distinct streams as one statement
    /// (quiet; see [`crate::combine`]).
    append_combined: String,
    /// The channel the in-transaction append notifies.
    notify_channel: Option<String>,
    read_stream: String,
    read_all: PageReader,
    head: String,
    /// The store's event registry: every reader of these statements
    /// upcasts with it.
    pub(crate) registry: Option<Arc<Registry>>,
}

impl Statements {
    /// The statements of `schema`; with `registry`, every reader upcasts
    /// (`read_all` as each row arrives).
    pub(crate) fn new(
        schema: &Ident,
        notify_channel: Option<&Ident>,
        registry: Option<Arc<Registry>>,
    ) -> Statements {
        let notify = notify_channel.is_some();
        let s = schema.quoted();
        let events = format!("{s}.events");
        let checkpoints = format!("{s}.projection_checkpoints");
        let assignments = format!("{s}.consumer_assignments");
        let workers = format!("{s}.worker_nodes");
        let dead_letters = format!("{s}.dead_letters");
        let epoch = format!("{s}.projectionist_epoch");
        let versions = format!("{s}.projection_versions");
        // One INSERT: the stream head (its version and its writer's
        // transaction id, for the expected version and the per-stream order
        // rule) joined in laterally; no row qualifies, and none is written,
        // when either check fails. The head read looks no lower than the
        // expected version: a head below it fails the check all the same,
        // and the backward index scan stops at the first entry under the
        // bound instead of reading every entry of the stream on the index
        // page (PostgreSQL 15 reads a page's matching entries at once: a
        // long stream's head read cost 13-20 us more).
        let into = format!(
            "INSERT INTO {events} (event_id, aggregate_type, aggregate_id, aggregate_version, \
                                   event_type, event_version, payload, metadata)"
        );
        let head = format!(
            "FROM (SELECT) AS one \
             LEFT JOIN LATERAL ( \
                SELECT aggregate_version AS v, transaction_id AS tx FROM {events} \
                WHERE aggregate_type = $1 AND aggregate_id = $2 \
                  AND aggregate_version >= coalesce($3::bigint, 0) \
                ORDER BY aggregate_version DESC LIMIT 1 \
             ) h ON true"
        );
        let checks = "WHERE ($3::bigint IS NULL OR coalesce(h.v, 0) = $3::bigint) \
               AND (h.tx IS NULL OR h.tx <= pg_current_xact_id())";
        let insert_returning = |returning: &str| {
            format!(
                "{into} \
             SELECT e.event_id, $1, $2, coalesce(h.v, 0) + e.n, e.event_type, e.event_version, \
                    e.payload::jsonb, e.metadata::jsonb \
             {head} \
             CROSS JOIN unnest($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                  WITH ORDINALITY AS e(event_id, event_type, event_version, payload, metadata, n) \
             {checks} \
             ORDER BY e.n \
             RETURNING {returning}"
            )
        };
        // The rows form reads each row's transaction id; the summary takes
        // it once, from the statement's transaction (the same id).
        let insert = insert_returning("global_position, aggregate_version, transaction_id");
        // One event: the same checks, its values as scalar parameters
        // (same positions, `$4`..`$8`) instead of arrays unnested with
        // their ordinality and sorted by it.
        let insert_one = format!(
            "{into} \
             SELECT $4::uuid, $1, $2, coalesce(h.v, 0) + 1, $5::text, $6::int4, \
                    $7::text::jsonb, $8::text::jsonb \
             {head} \
             {checks} \
             RETURNING global_position, aggregate_version, transaction_id"
        );
        let insert_summarised = insert_returning("global_position, aggregate_version");
        let append_sql = |report: Report, notify: bool| {
            match report {
            // Every row asks for the same notification; PostgreSQL sends
            // one per transaction (identical notifications are folded).
            Report::One if notify => format!("{insert_one}, pg_notify($9, transaction_id::text)"),
            Report::One => insert_one.clone(),
            Report::Rows if notify => format!("{insert}, pg_notify($9, transaction_id::text)"),
            Report::Rows => insert.clone(),
            Report::Summary => format!(
                "WITH ins AS ({insert_summarised}) \
                 SELECT count(*), min(global_position), max(global_position), \
                        max(aggregate_version), CASE WHEN count(*) > 0 THEN pg_current_xact_id() END{} \
                 FROM ins",
                if notify {
                    ", CASE WHEN count(*) > 0 THEN pg_notify($9, pg_current_xact_id()::text)::text END"
                } else {
                    ""
                }
            ),
        }
        };
        let append = [
            append_sql(Report::Rows, notify),
            append_sql(Report::Summary, notify),
            append_sql(Report::One, notify),
        ];
        let append_quiet = [
            append_sql(Report::Rows, false),
            append_sql(Report::Summary, false),
            append_sql(Report::One, false),
        ];
        // The same checks per stream (group), for several streams: each
        // group's rows qualify only when its own checks pass, so a failed
        // check writes nothing of that append and all of the others.
        let append_combined = format!(
            "INSERT INTO {events} (event_id, aggregate_type, aggregate_id, aggregate_version, \
                                   event_type, event_version, payload, metadata) \
             SELECT e.event_id, g.at, g.aid, coalesce(h.v, 0) + e.n, e.event_type, e.event_version, \
                    e.payload::jsonb, e.metadata::jsonb \
             FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS g(at, aid, expected, gi) \
             LEFT JOIN LATERAL ( \
                SELECT aggregate_version AS v, transaction_id AS tx FROM {events} \
                WHERE aggregate_type = g.at AND aggregate_id = g.aid \
                  AND aggregate_version >= coalesce(g.expected, 0) \
                ORDER BY aggregate_version DESC LIMIT 1 \
             ) h ON true \
             JOIN unnest($4::int4[], $5::uuid[], $6::text[], $7::int4[], $8::text[], $9::text[], $10::int8[]) \
                  AS e(gi, event_id, event_type, event_version, payload, metadata, n) ON e.gi = g.gi \
             WHERE (g.expected IS NULL OR coalesce(h.v, 0) = g.expected) \
               AND (h.tx IS NULL OR h.tx <= pg_current_xact_id()) \
             ORDER BY g.gi, e.n \
             RETURNING global_position, aggregate_version, transaction_id, aggregate_type, aggregate_id"
        );
        let cols = StoredEvent::COLUMNS;
        let read_stream = format!(
            "SELECT {cols} FROM {events} \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND aggregate_version >= $3 \
             ORDER BY aggregate_version LIMIT $4"
        );
        let mut read_all = PageReader::new(&events, ReadFilter::default(), None, true);
        if let Some(r) = &registry {
            read_all = read_all.upcasting(r.clone());
        }
        let head = format!(
            "SELECT coalesce((SELECT max(global_position) FROM {events}), 0), \
                    pg_snapshot_xmin(pg_current_snapshot())"
        );
        Statements {
            events,
            checkpoints,
            assignments,
            workers,
            dead_letters,
            epoch,
            versions,
            migration_lock: crate::migrate::lock_key(schema),
            append,
            append_quiet,
            append_combined,
            notify_channel: notify_channel.map(|c| c.as_str().to_owned()),
            read_stream,
            read_all,
            head,
            registry,
        }
    }

    pub(crate) fn head(&self) -> &str {
        &self.head
    }
}

/// The event store. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct EventStore {
    pool: Pool,
    pg: tokio_postgres::Config,
    tls: crate::tls::MakeRustlsConnect,
    notifier: Option<Arc<Notifier>>,
    config: StoreConfig,
    sql: Arc<Statements>,
    /// Shares autocommit appends (see [`StoreConfig::append_lanes`]).
    combiner: Option<Arc<Combiner<AppendFlush>>>,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore")
            .field("config", &self.config)
            .finish()
    }
}

impl EventStore {
    /// Connects to `database_url` with the default [`StoreConfig`].
    pub fn connect(database_url: &str) -> Result<EventStore> {
        EventStore::connect_with(database_url, StoreConfig::default())
    }

    /// Connects to `database_url` (connections open lazily, on first use).
    /// TLS follows the URL's `sslmode` (see the security docs).
    pub fn connect_with(database_url: &str, config: StoreConfig) -> Result<EventStore> {
        let (pg, tls) = db::parse_target(database_url, config.ca_file.as_deref())?;
        let pool = db::pool(&pg, &tls, config.pool_size)?;
        Ok(EventStore::from_parts_tls(pool, pg, tls, config))
    }

    /// Connects with an already parsed connection configuration (TLS as its
    /// `ssl_mode` says, without certificate verification).
    pub fn connect_config(pg: tokio_postgres::Config, config: StoreConfig) -> Result<EventStore> {
        let tls = db::default_connector(&pg)?;
        let pool = db::pool(&pg, &tls, config.pool_size)?;
        Ok(EventStore::from_parts_tls(pool, pg, tls, config))
    }

    /// Uses an existing pool; `pg` must point at the same database (it is
    /// used for the few dedicated connections, such as LISTEN, and for
    /// the after-commit notifier's one connection when a NOTIFY channel is
    /// configured).
    pub fn from_parts(
        pool: Pool,
        pg: tokio_postgres::Config,
        config: StoreConfig,
    ) -> Result<EventStore> {
        let tls = db::default_connector(&pg)?;
        Ok(EventStore::from_parts_tls(pool, pg, tls, config))
    }

    fn from_parts_tls(
        pool: Pool,
        pg: tokio_postgres::Config,
        tls: crate::tls::MakeRustlsConnect,
        config: StoreConfig,
    ) -> EventStore {
        let sql = Arc::new(Statements::new(
            &config.schema,
            config.notify_channel.as_ref(),
            config.registry.clone(),
        ));
        let notifier = config.notify_channel.as_ref().map(|c| {
            let quiet = Quiet::new(config.notify_interval, config.notify_max_interval);
            Arc::new(Notifier::new(c, quiet, &pg, &tls, &pool))
        });
        let mut store = EventStore {
            pool,
            pg,
            tls,
            notifier,
            config,
            sql,
            combiner: None,
        };
        store.combiner = store.combiner();
        store
    }

    /// A combiner for the store's current statements, unless sharing is off.
    fn combiner(&self) -> Option<Arc<Combiner<AppendFlush>>> {
        (self.config.append_lanes > 0).then(|| {
            Combiner::new(
                AppendFlush {
                    pool: self.pool.clone(),
                    sql: self.sql.clone(),
                    notifier: self.notifier.clone(),
                },
                self.config.append_lanes,
                COMBINED_EVENTS,
                COMBINE_STALL,
            )
        })
    }

    /// The TLS connector for dedicated connections to the same database.
    pub(crate) fn tls(&self) -> &crate::tls::MakeRustlsConnect {
        &self.tls
    }

    /// The connection configuration (for dedicated connections).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The connection pool (shared with projections run on this store).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub(crate) fn statements(&self) -> &Arc<Statements> {
        &self.sql
    }

    /// This store with `registry` (see [`StoreConfig::registry`]); clones
    /// of the store made before keep theirs. Fails when the registry is
    /// inconsistent.
    pub fn with_registry(mut self, registry: Registry) -> Result<EventStore> {
        self.config = self.config.registry(registry)?;
        self.sql = Arc::new(Statements::new(
            &self.config.schema,
            self.config.notify_channel.as_ref(),
            self.config.registry.clone(),
        ));
        self.combiner = self.combiner();
        Ok(self)
    }

    /// The store's event registry, if it has one.
    pub fn registry(&self) -> Option<&Registry> {
        self.sql.registry.as_deref()
    }

    /// Brings `event` to its current shape with the store's registry (a
    /// no-op without one). See [`Registry::upcast`].
    pub(crate) fn upcast(&self, event: &mut StoredEvent) -> Result<()> {
        match &self.sql.registry {
            Some(r) => r.upcast(event),
            None => Ok(()),
        }
    }

    /// Appends `events` to the stream `(aggregate_type, aggregate_id)` in
    /// its own transaction, and returns once it committed. See
    /// [`EventStore::append_in`] for the checks and errors.
    ///
    /// Concurrent appends of this store may share a transaction (see
    /// [`StoreConfig::append_lanes`]): each is still all or nothing, checked
    /// on its own, and fails or succeeds as if it had run alone.
    pub async fn append(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        // While a lane is free and nothing queues, the append runs right
        // here, holding that lane (appends arriving meanwhile queue behind
        // it, as behind any lane): no copy of its events, no hand-over.
        let mut lane = None;
        if let Some(combiner) = self
            .combiner
            .as_ref()
            .filter(|_| events.len() <= COMBINE_UP_TO)
        {
            lane = combiner.try_lane();
            if lane.is_none() {
                let request = self.request(aggregate_type, aggregate_id, expected, events)?;
                return combiner.submit(request).await.unwrap_or_else(|_| {
                    Err(Error::new(
                        Kind::Other,
                        format!(
                            "the append to stream {aggregate_type}/{aggregate_id} was abandoned \
                             (its batch's task ended early; the runtime may be shutting down): \
                             read the stream to see whether it was written"
                        ),
                    ))
                });
            }
        }
        // Not queued: the statement's parameters borrow the caller's
        // events instead of copying every string.
        let params = self.borrowed(aggregate_type, aggregate_id, expected, events)?;
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&self.sql.append_quiet[Report::for_batch(events.len()) as usize])
            .await?;
        let result = append_one(&**client, &self.sql, Some(&stmt), &params).await?;
        drop(client);
        if let Some(n) = &self.notifier {
            n.announce(result.transaction_id, events.len() as u64);
        }
        // Hands what queued meanwhile to a lane of its own.
        drop(lane);
        Ok(result)
    }

    /// Appends `events` in the caller's transaction (or on any client), as
    /// one multi-row statement: one round trip for the whole batch.
    ///
    /// Fails with [`Error::is_conflict`] when the stream is not at the
    /// expected version, or when its head was written by a transaction newer
    /// than this one (which would break per-stream order for readers; retry
    /// in a new transaction), and with [`Error::is_duplicate_event`] when
    /// an `event_id` is already stored.
    pub async fn append_in<C: GenericClient>(
        &self,
        client: &C,
        aggregate_type: &str,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        let params = self.borrowed(aggregate_type, aggregate_id, expected, events)?;
        append_one(client, &self.sql, None, &params).await
    }

    /// Checks an append's events and returns its statement's parameters,
    /// borrowing the events' strings (all but metadata that tracing
    /// stamped, see [`EventStore::check`]).
    fn borrowed<'a>(
        &self,
        aggregate_type: &'a str,
        aggregate_id: &'a str,
        expected: ExpectedVersion,
        events: &'a [NewEvent],
    ) -> Result<AppendParams<'a>> {
        let stamped = self.check(aggregate_type, aggregate_id, events)?;
        Ok(AppendParams {
            aggregate_type,
            aggregate_id,
            expected,
            ids: events.iter().map(|e| e.event_id).collect(),
            types: events.iter().map(|e| e.event_type.as_str()).collect(),
            versions: events.iter().map(|e| e.event_version).collect(),
            payloads: events.iter().map(|e| e.payload.as_str()).collect(),
            metadata: match stamped {
                Some(m) => m.into_iter().map(Cow::Owned).collect(),
                None => events
                    .iter()
                    .map(|e| Cow::Borrowed(e.metadata.as_str()))
                    .collect(),
            },
        })
    }

    /// Checks an append's events (at least one; known to the registry, if
    /// any) and returns their metadata when tracing stamped it (feature
    /// `otel`: events without a `traceparent` get the current span's, so
    /// the trace continues into the projections).
    fn check(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        events: &[NewEvent],
    ) -> Result<Option<Vec<String>>> {
        if events.is_empty() {
            return Err(Error::config(
                "append called with no events: pass at least one",
            ));
        }
        if let Some(registry) = &self.sql.registry {
            for e in events {
                registry.check_append(e).map_err(|e| {
                    e.context(format_args!(
                        "append to stream {aggregate_type}/{aggregate_id}"
                    ))
                })?;
            }
        }
        Ok(crate::otel::stamp_metadata(events))
    }

    /// Checks an append's events and copies them in the statement's shape,
    /// for the queue of shared statements.
    fn request(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendRequest> {
        let metadata = match self.check(aggregate_type, aggregate_id, events)? {
            Some(m) => m,
            None => events.iter().map(|e| e.metadata.clone()).collect(),
        };
        Ok(AppendRequest {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            key: format!("{}/{aggregate_type}/{aggregate_id}", aggregate_type.len()),
            expected,
            ids: events.iter().map(|e| e.event_id).collect(),
            types: events.iter().map(|e| e.event_type.clone()).collect(),
            versions: events.iter().map(|e| e.event_version).collect(),
            payloads: events.iter().map(|e| e.payload.clone()).collect(),
            metadata,
        })
    }

    /// Reads the stream `(aggregate_type, aggregate_id)` from `from_version`
    /// (inclusive), at most `limit` events, in version order, upcast by the
    /// store's registry (an upcaster failure fails the read, naming the
    /// event; an event the registry does not know is returned as stored).
    pub async fn read_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        from_version: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(&self.sql.read_stream).await?;
        let rows = client
            .query(
                &stmt,
                &[&aggregate_type, &aggregate_id, &from_version, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let mut e = StoredEvent::from_row_at(r, 0)?;
                self.upcast(&mut e)?;
                Ok(e)
            })
            .collect()
    }

    /// Reads up to `limit` events after `after`, gap-safely: only events of
    /// transactions older than every transaction still running, so an event
    /// that commits late is never stepped over. Resume from
    /// [`ReadBatch::next_cursor`]. Events are upcast as by
    /// [`EventStore::read_stream`].
    pub async fn read_all(&self, after: Cursor, limit: i64) -> Result<ReadBatch> {
        if limit <= 0 {
            return Err(Error::config("read_all limit must be at least 1"));
        }
        let client = self.pool.get().await?;
        // The reader upcasts (when the store has a registry) as the rows
        // arrive; the first failure fails the read, as a stream read's does.
        let (page, control) = self.sql.read_all.read(&client, after, limit).await?;
        if let Some((_, e)) = control.upcast_failed.into_iter().next() {
            return Err(e);
        }
        Ok(page)
    }

    /// The highest global position and the current watermark.
    pub async fn head(&self) -> Result<(i64, u64)> {
        let client = self.pool.get().await?;
        let row = client.query_one(&self.sql.head, &[]).await?;
        Ok((row.try_get(0)?, row.try_get::<_, Xid8>(1)?.0))
    }
}

/// How an append statement reports what it wrote: the inserted rows, or
/// one summary row over them (a CTE and an aggregate). Rows cost the server
/// and the client per event, the summary a fixed amount: measured on the
/// benchmark machine, rows are faster up to a few dozen events (1 event:
/// 0.74-0.81 of a raw INSERT against 0.70-0.72; 10: 0.84-0.86 against
/// 0.80), the summary at 100 (0.91 against 0.86-0.87). A single event
/// has a statement of its own ([`Report::One`]): no arrays to unnest and
/// sort, about 30 µs less server time per append (pgbench on the benchmark
/// machine: 0.325 ms against 0.357 ms per autocommit append, the raw
/// `INSERT … VALUES` 0.276 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    /// Each inserted row's position, version and transaction id.
    Rows = 0,
    /// One row: count, first and last position, version, transaction id.
    Summary = 1,
    /// One event, its values as scalar parameters; reports its row like
    /// [`Report::Rows`].
    One = 2,
}

/// Appends of at most this many events report rows (see [`Report`]).
const REPORT_ROWS_UP_TO: usize = 32;

impl Report {
    fn for_batch(events: usize) -> Report {
        if events == 1 {
            Report::One
        } else if events <= REPORT_ROWS_UP_TO {
            Report::Rows
        } else {
            Report::Summary
        }
    }

    /// What the rows form wrote; `None` when no row was written (a check
    /// failed).
    fn rows(rows: &[tokio_postgres::Row]) -> Result<Option<AppendResult>> {
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let (mut first_position, mut last_position, mut stream_version) = (i64::MAX, 0, 0);
        for row in rows {
            let position: i64 = row.try_get(0)?;
            first_position = first_position.min(position);
            last_position = last_position.max(position);
            stream_version = stream_version.max(row.try_get::<_, i64>(1)?);
        }
        Ok(Some(AppendResult {
            first_position,
            last_position,
            stream_version,
            transaction_id: first.try_get::<_, Xid8>(2)?.0,
        }))
    }

    /// What the summary form wrote; `None` when no row was written.
    fn summary(rows: &[tokio_postgres::Row]) -> Result<Option<AppendResult>> {
        let row = rows
            .first()
            .ok_or_else(|| Error::new(Kind::Other, "the append statement returned no row"))?;
        if row.try_get::<_, i64>(0)? == 0 {
            return Ok(None);
        }
        Ok(Some(AppendResult {
            first_position: row.try_get(1)?,
            last_position: row.try_get(2)?,
            stream_version: row.try_get(3)?,
            transaction_id: row.try_get::<_, Xid8>(4)?.0,
        }))
    }
}

/// Appends of at most this many events go through the combiner (when it
/// is on); larger ones are batches already and run as they come.
const COMBINE_UP_TO: usize = REPORT_ROWS_UP_TO;

/// A combined statement carries at most this many events.
const COMBINED_EVENTS: usize = 256;

/// A queued append that waited this long opens a lane of its own (see
/// [`crate::combine`]).
const COMBINE_STALL: std::time::Duration = std::time::Duration::from_millis(20);

/// One append, checked, in the statements' parameter shape.
pub(crate) struct AppendRequest {
    aggregate_type: String,
    aggregate_id: String,
    /// The stream, unambiguously (appends to one stream never share a
    /// statement).
    key: String,
    expected: ExpectedVersion,
    ids: Vec<Uuid>,
    types: Vec<String>,
    versions: Vec<i32>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl AppendRequest {
    /// The statement's parameters, borrowed from this request.
    fn params(&self) -> AppendParams<'_> {
        AppendParams {
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            expected: self.expected,
            ids: self.ids.clone(),
            types: self.types.iter().map(String::as_str).collect(),
            versions: self.versions.clone(),
            payloads: self.payloads.iter().map(String::as_str).collect(),
            metadata: self
                .metadata
                .iter()
                .map(|m| Cow::Borrowed(m.as_str()))
                .collect(),
        }
    }
}

/// One append's statement parameters, borrowing their strings (from the
/// caller's events or from a queued [`AppendRequest`]).
struct AppendParams<'a> {
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    expected: ExpectedVersion,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    versions: Vec<i32>,
    payloads: Vec<&'a str>,
    /// Owned where tracing stamped it.
    metadata: Vec<Cow<'a, str>>,
}

/// Runs one append as one statement: prepared when `stmt` is given (the
/// quiet append), otherwise as a typed unnamed statement that notifies in
/// the caller's transaction (still one round trip).
async fn append_one<C: GenericClient>(
    client: &C,
    sql: &Statements,
    stmt: Option<&tokio_postgres::Statement>,
    r: &AppendParams<'_>,
) -> Result<AppendResult> {
    let expected_param = r.expected.as_param();
    let report = Report::for_batch(r.ids.len());
    // `$4`..`$8`: the events' columns, as scalars for one event, as arrays
    // otherwise.
    let (columns, types): ([&(dyn ToSql + Sync); 5], _) = match report {
        Report::One => (
            [
                &r.ids[0],
                &r.types[0],
                &r.versions[0],
                &r.payloads[0],
                &r.metadata[0],
            ],
            &APPEND_ONE_PARAM_TYPES,
        ),
        Report::Rows | Report::Summary => (
            [&r.ids, &r.types, &r.versions, &r.payloads, &r.metadata],
            &APPEND_PARAM_TYPES,
        ),
    };
    let mut params: Vec<&(dyn ToSql + Sync)> =
        vec![&r.aggregate_type, &r.aggregate_id, &expected_param];
    params.extend(columns);
    let result = match stmt {
        Some(stmt) => client.query(stmt, &params).await,
        None => {
            let channel = sql.notify_channel.as_deref();
            if let Some(c) = &channel {
                params.push(c);
            }
            let typed: Vec<(&(dyn ToSql + Sync), Type)> =
                params.iter().copied().zip(types.iter().cloned()).collect();
            client
                .query_typed(&sql.append[report as usize], &typed)
                .await
        }
    };
    let rows = result.map_err(|e| map_append_error(e, r.aggregate_type, r.aggregate_id))?;
    let written = match report {
        Report::Rows | Report::One => Report::rows(&rows)?,
        Report::Summary => Report::summary(&rows)?,
    };
    let Some(result) = written else {
        return Err(describe_conflict(client, sql, r).await);
    };
    crate::metrics::with(|m| m.events_appended.inc_by(r.ids.len() as u64));
    Ok(result)
}

/// Why an append wrote nothing: the stream's version, or its head's
/// transaction.
async fn describe_conflict<C: GenericClient>(
    client: &C,
    sql: &Statements,
    r: &AppendParams<'_>,
) -> Error {
    let (aggregate_type, aggregate_id) = (&r.aggregate_type, &r.aggregate_id);
    // A head written by a transaction id at or above the snapshot's xmax
    // comes from another cluster, unless this very transaction wrote it
    // (an `append_in` after another one to the same stream): its own id
    // is at or above xmax whenever no later transaction has completed.
    let q = format!(
        "SELECT aggregate_version, \
                transaction_id >= pg_snapshot_xmax(pg_current_snapshot()) \
                AND transaction_id IS DISTINCT FROM pg_current_xact_id_if_assigned() \
         FROM {} WHERE aggregate_type = $1 AND aggregate_id = $2 \
         ORDER BY aggregate_version DESC LIMIT 1",
        sql.events
    );
    let (actual, from_the_future) =
        match client.query_opt(&q, &[aggregate_type, aggregate_id]).await {
            Ok(row) => row
                .and_then(|r| Some((r.try_get::<_, i64>(0).ok()?, r.try_get::<_, bool>(1).ok()?)))
                .unwrap_or((0, false)),
            Err(e) => return Error::from(e),
        };
    if from_the_future {
        // A committed transaction id above every id this cluster has
        // handed out: the events come from another cluster (a restore).
        return Error::new(Kind::Database, format!(
            "stream {aggregate_type}/{aggregate_id} was written with transaction ids of another PostgreSQL \
             cluster (the database was restored or copied): appends to it would be delivered out of \
             order. Stop the projection processes and run `rebase-cursors --yes` once"
        ));
    }
    let stream = format!("{aggregate_type}/{aggregate_id}");
    let message = match r.expected {
        ExpectedVersion::Exact(v) if v != actual => format!(
            "version conflict on stream {stream}: expected version {v}, but the stream is at version {actual}; \
             reload the stream and retry"
        ),
        ExpectedVersion::NoStream if actual != 0 => format!(
            "version conflict on stream {stream}: expected no stream, but it exists at version {actual}; \
             reload the stream and retry"
        ),
        _ => format!(
            "ordering conflict on stream {stream}: its head (version {actual}) was written by a transaction \
             newer than this one, so readers would see this append before it; retry in a new transaction"
        ),
    };
    Error::new(Kind::Conflict, message)
}

/// Runs the store's autocommit appends for the combiner: a lone append as
/// the prepared single-stream statement, several as one combined statement
/// (one transaction, one commit for all of them).
struct AppendFlush {
    pool: Pool,
    sql: Arc<Statements>,
    notifier: Option<Arc<Notifier>>,
}

impl crate::combine::Flush for AppendFlush {
    type Item = AppendRequest;
    type Output = Result<AppendResult>;

    fn key(item: &AppendRequest) -> &str {
        &item.key
    }

    fn size(item: &AppendRequest) -> usize {
        item.ids.len()
    }

    fn flush(
        self: Arc<Self>,
        batch: Vec<AppendRequest>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Result<AppendResult>>> + Send>>
    {
        Box::pin(async move {
            let results = self.run(&batch).await;
            if let Some(n) = &self.notifier {
                if let Some(tx) = results
                    .iter()
                    .filter_map(|r| r.as_ref().ok())
                    .map(|r| r.transaction_id)
                    .max()
                {
                    let events = batch.iter().map(|r| r.ids.len() as u64).sum();
                    n.announce(tx, events);
                }
            }
            results
        })
    }
}

impl AppendFlush {
    async fn run(&self, batch: &[AppendRequest]) -> Vec<Result<AppendResult>> {
        let all_fail = |e: Error| -> Vec<Result<AppendResult>> {
            let mut out: Vec<Result<AppendResult>> = batch
                .iter()
                .skip(1)
                .map(|_| Err(Error::new(e.kind(), e.to_string())))
                .collect();
            out.insert(0, Err(e));
            out
        };
        let client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => return all_fail(Error::from(e)),
        };
        if batch.len() == 1 {
            return vec![self.one(&client, &batch[0]).await];
        }
        match self.combined(&client, batch).await {
            Ok(written) => {
                let mut out = Vec::with_capacity(batch.len());
                for (r, w) in batch.iter().zip(written) {
                    out.push(match w {
                        Some(result) => {
                            crate::metrics::with(|m| m.events_appended.inc_by(r.ids.len() as u64));
                            Ok(result)
                        }
                        None => Err(describe_conflict(&**client, &self.sql, &r.params()).await),
                    });
                }
                out
            }
            // The server refused the statement (one append's duplicate
            // event id, a value it cannot take, a concurrent writer's
            // version, a deadlock with another process's combined append):
            // nothing was written, so each append runs alone and gets its
            // own outcome.
            Err(e) if rolled_back(&e) => {
                let mut out = Vec::with_capacity(batch.len());
                for r in batch {
                    out.push(self.one(&client, r).await);
                }
                out
            }
            Err(e) => all_fail(Error::from(e).context(format_args!(
                "append of {} concurrent batches (streams {})",
                batch.len(),
                batch
                    .iter()
                    .map(|r| format!("{}/{}", r.aggregate_type, r.aggregate_id))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// One append alone: the prepared single-stream statement.
    async fn one(
        &self,
        client: &deadpool_postgres::Client,
        r: &AppendRequest,
    ) -> Result<AppendResult> {
        let stmt = client
            .prepare_cached(&self.sql.append_quiet[Report::for_batch(r.ids.len()) as usize])
            .await?;
        append_one(&***client, &self.sql, Some(&stmt), &r.params()).await
    }

    /// The combined statement; per request, what it wrote (`None`: a check
    /// failed and nothing of it was written).
    async fn combined(
        &self,
        client: &deadpool_postgres::Client,
        batch: &[AppendRequest],
    ) -> std::result::Result<Vec<Option<AppendResult>>, tokio_postgres::Error> {
        // Streams in one order (by stream) in every process's statements,
        // so two shared statements never wait for each other's stream
        // versions in a cycle (a deadlock costs `deadlock_timeout`, 1 s by
        // default, before the server breaks it).
        let mut sorted: Vec<&AppendRequest> = batch.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.aggregate_type, &a.aggregate_id).cmp(&(&b.aggregate_type, &b.aggregate_id))
        });
        let types: Vec<&str> = sorted.iter().map(|r| r.aggregate_type.as_str()).collect();
        let ids: Vec<&str> = sorted.iter().map(|r| r.aggregate_id.as_str()).collect();
        let expected: Vec<Option<i64>> = sorted.iter().map(|r| r.expected.as_param()).collect();
        let n: usize = batch.iter().map(|r| r.ids.len()).sum();
        let (
            mut group,
            mut event_ids,
            mut event_types,
            mut versions,
            mut payloads,
            mut metadata,
            mut ordinal,
        ) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (g, r) in sorted.iter().enumerate() {
            for i in 0..r.ids.len() {
                group.push(g as i32 + 1);
                event_ids.push(r.ids[i]);
                event_types.push(r.types[i].as_str());
                versions.push(r.versions[i]);
                payloads.push(r.payloads[i].as_str());
                metadata.push(r.metadata[i].as_str());
                ordinal.push(i as i64 + 1);
            }
        }
        let stmt = client.prepare_cached(&self.sql.append_combined).await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &types,
                    &ids,
                    &expected,
                    &group,
                    &event_ids,
                    &event_types,
                    &versions,
                    &payloads,
                    &metadata,
                    &ordinal,
                ],
            )
            .await?;
        // A batch never holds one stream twice (the combiner's key), so a
        // row's stream names its append.
        let group: std::collections::HashMap<(&str, &str), usize> = batch
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.aggregate_type.as_str(), r.aggregate_id.as_str()), i))
            .collect();
        let mut written: Vec<Option<AppendResult>> = vec![None; batch.len()];
        for row in &rows {
            let position: i64 = row.try_get(0)?;
            let version: i64 = row.try_get(1)?;
            let tx = row.try_get::<_, Xid8>(2)?.0;
            let stream = (row.try_get::<_, &str>(3)?, row.try_get::<_, &str>(4)?);
            let Some(slot) = group.get(&stream).and_then(|&i| written.get_mut(i)) else {
                continue;
            };
            let w = slot.get_or_insert(AppendResult {
                first_position: position,
                last_position: position,
                stream_version: version,
                transaction_id: tx,
            });
            w.first_position = w.first_position.min(position);
            w.last_position = w.last_position.max(position);
            w.stream_version = w.stream_version.max(version);
        }
        Ok(written)
    }
}

/// Whether a failed statement was refused by the server for its data (so
/// its transaction rolled back and running its appends one by one is
/// safe): data exceptions, integrity violations, serialization failures and
/// deadlocks. A lost connection or a cancelled statement is not: the
/// appends fail with it.
fn rolled_back(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c.starts_with("22") || c.starts_with("23") || c.starts_with("40")
    })
}

/// Sends the NOTIFY of autocommit appends after they committed, from a
/// background task, coalescing bursts into one notification.
///
/// A transaction that NOTIFYs holds a database-wide lock from its commit
/// until the commit is flushed, so notifying inside the append would make
/// concurrent writers commit one at a time (no group commit). A bare
/// `SELECT pg_notify(...)` writes no data, so its commit waits for no WAL
/// flush (pgbench on the benchmark machine: 0.11 ms a call, 0.07 ms for
/// `SELECT 1`).
struct Notifier {
    channel: String,
    /// The newest committed appending transaction not yet announced.
    pending: std::sync::atomic::AtomicU64,
    /// How many events were appended since the last notification was
    /// sent (whether a burst is on, see [`Quiet`]).
    events: std::sync::atomic::AtomicU64,
    /// Wakes the task: an append to announce, or the notifier is gone.
    signal: Arc<tokio::sync::Notify>,
    started: std::sync::OnceLock<()>,
    /// The quiet time after each notification (see
    /// [`StoreConfig::notify_interval`] and
    /// [`StoreConfig::notify_max_interval`]).
    quiet: Quiet,
    /// A pool of one connection of its own. On the store's pool, each
    /// notification took the connection the writer had just returned, and
    /// the writer's next append ran on another one (another server
    /// process): writers and notifier swapped connections after every
    /// notification. Dropped with the notifier (the task holds it weakly),
    /// so the connection closes when the last store clone goes.
    pool: Pool,
}

impl Drop for Notifier {
    fn drop(&mut self) {
        // The task ends at once instead of at its next look.
        self.signal.notify_one();
    }
}

impl Notifier {
    fn new(
        channel: &Ident,
        quiet: Quiet,
        pg: &tokio_postgres::Config,
        tls: &crate::tls::MakeRustlsConnect,
        store_pool: &Pool,
    ) -> Notifier {
        Notifier {
            channel: channel.as_str().to_owned(),
            pending: std::sync::atomic::AtomicU64::new(0),
            events: std::sync::atomic::AtomicU64::new(0),
            signal: Arc::new(tokio::sync::Notify::new()),
            started: std::sync::OnceLock::new(),
            quiet,
            // Building a pool only fails on an invalid size; 1 is valid.
            // Should it fail, sharing the store's pool still works.
            pool: db::pool(pg, tls, 1).unwrap_or_else(|_| store_pool.clone()),
        }
    }

    /// Announces the commit of `transaction_id`, which appended `events`
    /// events.
    fn announce(self: &Arc<Self>, transaction_id: u64, events: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.pending.fetch_max(transaction_id, SeqCst);
        self.events.fetch_add(events, SeqCst);
        self.started.get_or_init(|| {
            // Weak: the notifier (and its connection) goes with the last
            // store clone, not when this task next looks.
            let me = Arc::downgrade(self);
            let pool = self.pool.weak();
            let signal = self.signal.clone();
            let channel = self.channel.clone();
            let mut quiet = self.quiet;
            tokio::spawn(async move {
                loop {
                    let (tx, events) = match me.upgrade() {
                        Some(n) => (n.pending.swap(0, SeqCst), n.events.swap(0, SeqCst)),
                        None => return,
                    };
                    if tx == 0 {
                        // A quiet spell: the next append is announced at
                        // once, and the wait starts short again.
                        quiet.reset();
                        // Wake on the next append or when the notifier is
                        // dropped; look again now and then regardless.
                        tokio::select! {
                            _ = signal.notified() => {}
                            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                        }
                        continue;
                    }
                    let Some(pool) = pool.upgrade() else { return };
                    let sent = async {
                        let client = pool.get().await?;
                        // Prepared once per connection: one round trip.
                        let notify = client.prepare_cached("SELECT pg_notify($1, $2)").await?;
                        client
                            .execute(&notify, &[&channel, &tx.to_string()])
                            .await?;
                        Ok::<_, Error>(())
                    }
                    .await;
                    drop(pool);
                    // Appends committed while this one was sent, or within
                    // the quiet time after it, share the next notification.
                    let wait = quiet.after(events);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    if let Err(e) = sent {
                        // Readers also poll: a lost notification only delays them.
                        tracing::debug!(error = %e, "could not send the append notification");
                    }
                }
            });
        });
        self.signal.notify_one();
    }
}

/// The notifier's quiet time after each notification: after one that
/// announced a single event (or a quiet spell), the start,
/// [`StoreConfig::notify_interval`]; after each one that announced several
/// (a burst is on: several appends, or an append of several events), twice
/// the previous wait, up to [`StoreConfig::notify_max_interval`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quiet {
    base: std::time::Duration,
    max: std::time::Duration,
    current: std::time::Duration,
}

impl Quiet {
    fn new(base: std::time::Duration, max: std::time::Duration) -> Quiet {
        Quiet {
            base,
            max: max.max(base),
            current: base,
        }
    }

    /// The wait after a notification that announced `events` events.
    fn after(&mut self, events: u64) -> std::time::Duration {
        self.current = if events > 1 {
            (self.current * 2).min(self.max)
        } else {
            self.base
        };
        self.current
    }

    /// A quiet spell: the next wait is the shortest again.
    fn reset(&mut self) {
        self.current = self.base;
    }
}

/// The parameter types of [`Report::One`]'s statement, in order.
const APPEND_ONE_PARAM_TYPES: [Type; 9] = [
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::UUID,
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

/// The parameter types of the array forms ([`Report::Rows`], [`Report::Summary`]), in order.
const APPEND_PARAM_TYPES: [Type; 9] = [
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT4_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT,
];

fn map_append_error(e: tokio_postgres::Error, aggregate_type: &str, aggregate_id: &str) -> Error {
    if let Some(db) = e.as_db_error() {
        if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
            let stream = format!("{aggregate_type}/{aggregate_id}");
            match db.constraint() {
                Some("events_event_id_key") => {
                    let msg = format!(
                        "duplicate event id on stream {stream}: {}; this event was already appended \
                         (event_id is the idempotency key), so do not append it again",
                        db.detail().unwrap_or("an event_id is already stored")
                    );
                    return Error::new(Kind::DuplicateEvent, msg).with_source(e);
                }
                Some("events_stream_version_key") => {
                    let msg = format!(
                        "version conflict on stream {stream}: another writer appended the same version \
                         concurrently; reload the stream and retry"
                    );
                    return Error::new(Kind::Conflict, msg).with_source(e);
                }
                _ => {}
            }
        }
    }
    Error::from(e)
}

#[cfg(test)]
mod tests {
    use super::Quiet;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    /// A burst (notifications of several events) doubles the wait up to
    /// the maximum; a notification of a single event, or a quiet spell,
    /// sets it back to the start.
    #[test]
    fn the_quiet_time_grows_during_a_burst_and_resets_after_it() {
        let mut q = Quiet::new(MS, 8 * MS);
        assert_eq!(q.after(1), MS, "a lone event: the shortest wait");
        let burst: Vec<Duration> = (0..5).map(|_| q.after(6)).collect();
        assert_eq!(burst, [2 * MS, 4 * MS, 8 * MS, 8 * MS, 8 * MS]);
        assert_eq!(q.after(1), MS, "the burst is over");
        q.after(3);
        q.reset();
        assert_eq!(
            q.after(2),
            2 * MS,
            "after a quiet spell a burst starts over"
        );
    }

    /// A maximum below the start, or a zero start, keeps the wait fixed.
    #[test]
    fn the_quiet_time_stays_fixed_when_it_cannot_grow() {
        let mut q = Quiet::new(50 * MS, 8 * MS);
        assert!((0..4).all(|_| q.after(10) == 50 * MS));
        let mut zero = Quiet::new(Duration::ZERO, 8 * MS);
        assert!((0..4).all(|_| zero.after(10).is_zero()));
    }
}
