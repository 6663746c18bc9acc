//! The event store: appends (one statement, one round trip per batch),
//! stream reads, and gap-safe reads of the whole log.
//!
//! Architecture invariant: appends are a single SQL statement, so an append
//! in "its own transaction" is an autocommit statement, and an append in a
//! caller's transaction adds exactly one statement to it.

use crate::db;
use crate::error::{Error, Kind, Result};
use crate::event::{Cursor, NewEvent, StoredEvent, Xid8};
use crate::ident::Ident;
use crate::page::{PageReader, ReadBatch, ReadFilter};
use crate::registry::Registry;
use deadpool_postgres::Pool;
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
}

/// The default of [`StoreConfig::notify_interval`]: 1 ms.
pub const DEFAULT_NOTIFY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

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
    /// commit (coalesced, from a background task); appends in a caller's
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
    /// server handles one NOTIFY per interval instead of one per append —
    /// 10-15% of a single-event append on the benchmark machine. Zero sends
    /// one notification per append (still coalescing what commits while one
    /// is sent). Appends in a caller's transaction notify inside it and are
    /// not affected. Default: [`DEFAULT_NOTIFY_INTERVAL`] (1 ms).
    pub fn notify_interval(mut self, interval: std::time::Duration) -> StoreConfig {
        self.notify_interval = interval;
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
    /// Default: 16.
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
    append: [String; 2],
    /// The append without NOTIFY (autocommit appends notify after commit,
    /// from the store's notifier), by [`Report`].
    append_quiet: [String; 2],
    read_stream: String,
    read_all: PageReader,
    head: String,
    /// The store's event registry: every reader of these statements
    /// upcasts with it.
    pub(crate) registry: Option<Arc<Registry>>,
}

impl Statements {
    pub(crate) fn new(schema: &Ident, notify: bool) -> Statements {
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
        // when either check fails.
        let insert = format!(
            "INSERT INTO {events} (event_id, aggregate_type, aggregate_id, aggregate_version, \
                                   event_type, event_version, payload, metadata) \
             SELECT e.event_id, $1, $2, coalesce(h.v, 0) + e.n, e.event_type, e.event_version, \
                    e.payload::jsonb, e.metadata::jsonb \
             FROM (SELECT) AS one \
             LEFT JOIN LATERAL ( \
                SELECT aggregate_version AS v, transaction_id AS tx FROM {events} \
                WHERE aggregate_type = $1 AND aggregate_id = $2 \
                ORDER BY aggregate_version DESC LIMIT 1 \
             ) h ON true \
             CROSS JOIN unnest($4::uuid[], $5::text[], $6::int4[], $7::text[], $8::text[]) \
                  WITH ORDINALITY AS e(event_id, event_type, event_version, payload, metadata, n) \
             WHERE ($3::bigint IS NULL OR coalesce(h.v, 0) = $3::bigint) \
               AND (h.tx IS NULL OR h.tx <= pg_current_xact_id()) \
             ORDER BY e.n \
             RETURNING global_position, aggregate_version, transaction_id"
        );
        let append_sql = |report: Report, notify: bool| {
            match report {
            // Every row asks for the same notification; PostgreSQL sends
            // one per transaction (identical notifications are folded).
            Report::Rows if notify => format!("{insert}, pg_notify($9, transaction_id::text)"),
            Report::Rows => insert.clone(),
            Report::Summary => format!(
                "WITH ins AS ({insert}) \
                 SELECT count(*), coalesce(min(global_position), 0), coalesce(max(global_position), 0), \
                        coalesce(max(aggregate_version), 0), min(transaction_id){} \
                 FROM ins",
                if notify {
                    ", CASE WHEN count(*) > 0 THEN pg_notify($9, min(transaction_id)::text)::text END"
                } else {
                    ""
                }
            ),
        }
        };
        let append = [
            append_sql(Report::Rows, notify),
            append_sql(Report::Summary, notify),
        ];
        let append_quiet = [
            append_sql(Report::Rows, false),
            append_sql(Report::Summary, false),
        ];
        let cols = StoredEvent::COLUMNS;
        let read_stream = format!(
            "SELECT {cols} FROM {events} \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND aggregate_version >= $3 \
             ORDER BY aggregate_version LIMIT $4"
        );
        let read_all = PageReader::new(&events, ReadFilter::default(), None);
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
            read_stream,
            read_all,
            head,
            registry: None,
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
    /// used for the few dedicated connections, such as LISTEN).
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
        let mut sql = Statements::new(&config.schema, config.notify_channel.is_some());
        sql.registry = config.registry.clone();
        let sql = Arc::new(sql);
        let notifier = config.notify_channel.as_ref().map(|c| {
            Arc::new(Notifier {
                channel: c.as_str().to_owned(),
                pending: std::sync::atomic::AtomicU64::new(0),
                signal: tokio::sync::Notify::new(),
                started: std::sync::OnceLock::new(),
                interval: config.notify_interval,
            })
        });
        EventStore {
            pool,
            pg,
            tls,
            notifier,
            config,
            sql,
        }
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
        let mut sql = Statements::new(&self.config.schema, self.config.notify_channel.is_some());
        sql.registry = self.config.registry.clone();
        self.sql = Arc::new(sql);
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
    /// one autocommit statement. See [`EventStore::append_in`].
    pub async fn append(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        let client = self.pool.get().await?;
        let report = Report::for_batch(events.len());
        let stmt = client
            .prepare_cached(&self.sql.append_quiet[report as usize])
            .await?;
        let result = self
            .append_on(
                &**client,
                Some(&stmt),
                aggregate_type,
                aggregate_id,
                expected,
                events,
            )
            .await?;
        drop(client);
        if let Some(n) = &self.notifier {
            n.announce(&self.pool, result.transaction_id);
        }
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
        self.append_on(client, None, aggregate_type, aggregate_id, expected, events)
            .await
    }

    /// Runs the append statement: prepared when `stmt` is given, otherwise
    /// as a typed unnamed statement (still one round trip).
    async fn append_on<C: GenericClient>(
        &self,
        client: &C,
        stmt: Option<&tokio_postgres::Statement>,
        aggregate_type: &str,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
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
        let expected_param = expected.as_param();
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let versions: Vec<i32> = events.iter().map(|e| e.event_version).collect();
        let payloads: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
        // Inside a traced span (feature `otel`), events without a
        // `traceparent` get the span's, so the trace continues into the
        // projections.
        let stamped = crate::otel::stamp_metadata(events);
        let metadata: Vec<&str> = match &stamped {
            Some(m) => m.iter().map(String::as_str).collect(),
            None => events.iter().map(|e| e.metadata.as_str()).collect(),
        };
        let channel = self.config.notify_channel.as_ref().map(|c| c.as_str());
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &aggregate_type,
            &aggregate_id,
            &expected_param,
            &ids,
            &types,
            &versions,
            &payloads,
            &metadata,
        ];
        // The prepared statement is the quiet append (autocommit appends
        // notify after commit); the typed one notifies in the transaction.
        if let (Some(c), None) = (&channel, stmt) {
            params.push(c);
        }
        let result = match stmt {
            Some(stmt) => client.query(stmt, &params).await,
            None => {
                let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                    .iter()
                    .copied()
                    .zip(APPEND_PARAM_TYPES.iter().cloned())
                    .collect();
                let report = Report::for_batch(events.len());
                client
                    .query_typed(&self.sql.append[report as usize], &typed)
                    .await
            }
        };
        let rows = result.map_err(|e| map_append_error(e, aggregate_type, aggregate_id))?;
        let written = match Report::for_batch(events.len()) {
            Report::Rows => Report::rows(&rows)?,
            Report::Summary => Report::summary(&rows)?,
        };
        let Some(result) = written else {
            return Err(self
                .describe_conflict(client, aggregate_type, aggregate_id, expected)
                .await);
        };
        crate::metrics::with(|m| m.events_appended.inc_by(events.len() as u64));
        Ok(result)
    }

    async fn describe_conflict<C: GenericClient>(
        &self,
        client: &C,
        aggregate_type: &str,
        aggregate_id: &str,
        expected: ExpectedVersion,
    ) -> Error {
        let q = format!(
            "SELECT aggregate_version, transaction_id >= pg_snapshot_xmax(pg_current_snapshot()) \
             FROM {} WHERE aggregate_type = $1 AND aggregate_id = $2 \
             ORDER BY aggregate_version DESC LIMIT 1",
            self.sql.events
        );
        let (actual, from_the_future) = match client
            .query_opt(&q, &[&aggregate_type, &aggregate_id])
            .await
        {
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
        let message = match expected {
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
        let (mut page, _) = self.sql.read_all.read(&client, after, limit).await?;
        for e in &mut page.events {
            self.upcast(e)?;
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
/// 0.80), the summary at 100 (0.91 against 0.86-0.87).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    Rows = 0,
    Summary = 1,
}

/// Appends of at most this many events report rows (see [`Report`]).
const REPORT_ROWS_UP_TO: usize = 32;

impl Report {
    fn for_batch(events: usize) -> Report {
        if events <= REPORT_ROWS_UP_TO {
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

/// Sends the NOTIFY of autocommit appends after they committed, from a
/// background task, coalescing bursts into one notification.
///
/// A transaction that NOTIFYs holds a database-wide lock from its commit
/// until the commit is flushed, so notifying inside the append would make
/// concurrent writers commit one at a time (no group commit). A bare
/// `SELECT pg_notify(...)` has no transaction id and waits for no flush.
struct Notifier {
    channel: String,
    /// The newest committed appending transaction not yet announced.
    pending: std::sync::atomic::AtomicU64,
    signal: tokio::sync::Notify,
    started: std::sync::OnceLock<()>,
    /// The quiet time after each notification (see
    /// [`StoreConfig::notify_interval`]).
    interval: std::time::Duration,
}

impl Notifier {
    fn announce(self: &Arc<Self>, pool: &Pool, transaction_id: u64) {
        self.pending
            .fetch_max(transaction_id, std::sync::atomic::Ordering::SeqCst);
        self.started.get_or_init(|| {
            let me = Arc::downgrade(self);
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    let Some(n) = me.upgrade() else { return };
                    let tx = n.pending.swap(0, std::sync::atomic::Ordering::SeqCst);
                    if tx == 0 {
                        // Wake on the next append; look again now and then
                        // so the task ends once the store is dropped.
                        tokio::select! {
                            _ = n.signal.notified() => {}
                            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                        }
                        continue;
                    }
                    let sent = async {
                        let client = pool.get().await?;
                        // Prepared once per connection: one round trip.
                        let notify = client.prepare_cached("SELECT pg_notify($1, $2)").await?;
                        client
                            .execute(&notify, &[&n.channel, &tx.to_string()])
                            .await?;
                        Ok::<_, Error>(())
                    }
                    .await;
                    // Appends committed while this one was sent, or within
                    // the interval after it, share the next notification.
                    if !n.interval.is_zero() {
                        tokio::time::sleep(n.interval).await;
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

/// Parameter types of the append statement, in order.
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
