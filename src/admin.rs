//! Operator actions that are not the batch loop: `status` (cursor, lag and
//! state per slot) and `reset` (clear a read model and its checkpoints).
//!
//! `status` costs the same at any log size: one statement reads every
//! checkpoint and, per slot, at most [`LAG_SAMPLE_EVENTS`] events after the
//! cursor through the `(transaction_id, global_position)` index, plus one
//! index probe on each side of the cursor. Lag beyond the sample is
//! extrapolated from global positions ([`SlotStatus::lag_exact`] says which).
//! An exact count ([`StatusOptions::exact`]) is bounded by a limit, and every
//! status query runs under a `statement_timeout` and is cancelled on the
//! server when its caller gives up.

use crate::checkpoint::Checkpoints;
use crate::error::{Error, Kind, Result};
use crate::event::Xid8;
use crate::page::{filter_conditions, ReadFilter};
use crate::projection::Partition;
use crate::registered::Registered;
use crate::store::EventStore;
use serde::Serialize;
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};

/// A statement's parameters with their types, for `query_typed`.
pub(crate) type TypedParams<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// Events after a slot's cursor that `status` reads to measure its lag:
/// fewer than this many remaining are counted exactly, more are estimated
/// (see [`SlotStatus::lag_exact`]).
pub const LAG_SAMPLE_EVENTS: i64 = 1000;

/// Default of [`StatusOptions::exact`]'s limit: an exact count stops after
/// this many events per slot (1,000,000).
pub const DEFAULT_EXACT_LAG_LIMIT: i64 = 1_000_000;

/// Most dead letters `status` counts per projection (10,000): the count
/// reads the dead-letter index and stops there, so that a huge dead-letter
/// table cannot make `status` or `/metrics` slow. A projection with more
/// shows this many, with [`StatusReport::dead_letters_capped`] set.
pub const DEAD_LETTER_COUNT_LIMIT: i64 = 10_000;

/// Default of [`StatusOptions::timeout`]: 30 s.
pub const DEFAULT_STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// How [`status_with`] and [`report_with`] measure and how long they may
/// take. The default estimates lag, allows 30 s, and treats workers
/// without a heartbeat for 30 s as gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusOptions {
    pub(crate) exact_limit: Option<i64>,
    pub(crate) timeout: Duration,
    pub(crate) heartbeat_timeout: Duration,
}

impl Default for StatusOptions {
    fn default() -> StatusOptions {
        StatusOptions {
            exact_limit: None,
            timeout: DEFAULT_STATUS_TIMEOUT,
            heartbeat_timeout: crate::worker::DEFAULT_HEARTBEAT_TIMEOUT,
        }
    }
}

impl StatusOptions {
    /// Counts each slot's lag exactly, up to `limit` events per slot
    /// ([`DEFAULT_EXACT_LAG_LIMIT`] is a good start): a slot further behind
    /// reports `limit` with [`SlotStatus::lag_capped`]. Costs a scan of up to
    /// `limit` events per slot; the default (no exact count) costs the same
    /// at any lag.
    pub fn exact(mut self, limit: i64) -> Result<StatusOptions> {
        if limit < 1 {
            return Err(Error::config(format!(
                "the exact lag limit must be at least 1 event, got {limit}: use e.g. {DEFAULT_EXACT_LAG_LIMIT}"
            )));
        }
        self.exact_limit = Some(limit);
        Ok(self)
    }

    /// How long the status queries may take in all (default 30 s): enforced
    /// by the server (`statement_timeout`) and by the caller, which then
    /// cancels the query and fails with an error.
    pub fn timeout(mut self, timeout: Duration) -> Result<StatusOptions> {
        if timeout < Duration::from_millis(1) {
            return Err(Error::config(
                "the status timeout must be at least 1ms: use e.g. 3s or 30s",
            ));
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// Workers whose last heartbeat is older than this are gone (default
    /// 30 s, as `HEARTBEAT_TIMEOUT`): slots still assigned to them show the
    /// worker in [`SlotStatus::stale_worker_id`], not in
    /// [`SlotStatus::worker_id`].
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> StatusOptions {
        self.heartbeat_timeout = timeout;
        self
    }
}

/// The state of one (projection, partition) slot.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SlotStatus {
    /// The checkpoint key: the projection's name for version 1,
    /// `name@v<N>` above.
    pub projection: String,
    /// The projection's name (the same for every version).
    pub name: String,
    /// The projection version of this slot.
    pub version: i32,
    /// The version's state (`live`, `building`, `previous`, `retired`), or
    /// `None` when no version is recorded (a checkpoint from a binary
    /// before versions, not started since).
    pub version_state: Option<String>,
    /// Partition key.
    pub partition: i32,
    /// Partition count the checkpoint was made with.
    pub total_partitions: i32,
    /// Global position of the last event the cursor passed, or `None` when
    /// the cursor sits at the watermark (every event of transactions older
    /// than `cursor_transaction_id` + 1 passed, whatever their position).
    pub cursor_position: Option<i64>,
    /// Transaction id of the cursor.
    pub cursor_transaction_id: u64,
    /// Global position of the last event at or before the cursor in
    /// reading order (transaction id, then position), whether the cursor
    /// sits at an event or at the watermark; `None` before the first event.
    /// It moves exactly when the cursor moves past events.
    pub last_passed_position: Option<i64>,
    /// Events after the cursor that this slot will receive: exact when
    /// `lag_exact`, otherwise an estimate (see [`SlotStatus::lag_exact`]).
    pub lag_events: i64,
    /// Whether `lag_events` is an exact count. Without
    /// [`StatusOptions::exact`], the first [`LAG_SAMPLE_EVENTS`] events after
    /// the cursor are read: when fewer remain, the count is exact; otherwise
    /// the events from the first of them to the log head are estimated from
    /// global positions (`log_head - first position + 1`), scaled by the
    /// share of the sample that the slot receives (its filter and
    /// partition).
    pub lag_exact: bool,
    /// An exact count stopped at its limit: the lag is more than
    /// `lag_events`.
    pub lag_capped: bool,
    /// Age in seconds of the oldest event after the cursor that this slot
    /// receives, among the events read (0 when none remain). When the
    /// sample holds none of the slot's events but more events follow, the
    /// age of the oldest event read: the slot has not passed it yet.
    pub lag_seconds: f64,
    /// `running`, `stopped` or `failed`.
    pub state: String,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Events handled so far.
    pub events_handled: i64,
    /// When the checkpoint last changed (RFC 3339).
    pub updated_at: String,
    /// Whether this binary has a projection of that name registered. If
    /// not, nothing here runs it, and its lag is measured without its
    /// filter (overstated).
    pub registered: bool,
    /// Worker mode: the live worker the slot is assigned to, if any (its
    /// heartbeat is younger than the heartbeat timeout).
    pub worker_id: Option<String>,
    /// A worker the slot is still assigned to that has not heartbeated
    /// within the heartbeat timeout (it died, or the deployment went back
    /// to static mode): no worker of the pool runs the slot.
    pub stale_worker_id: Option<String>,
    /// Events this slot receives that sort between the last event it
    /// handled and its cursor: such events were written after the cursor
    /// passed them (transaction ids reused after lost commits the engine
    /// did not notice) and will never be handled unless the cursor moves
    /// back. Checked over the newest 1000 events of that range. Fix: with
    /// the processes running, `UPDATE projection_checkpoints SET epoch =
    /// NULL WHERE projection_name = '…'` makes the engine move the cursor
    /// back to the last handled event within seconds (or `reset` the
    /// projection).
    pub skipped_events: i64,
    /// Events this slot handles per second: a moving average over about
    /// the last 10 s of its batches (time-weighted; it falls towards 0
    /// while the slot is idle), as of its last checkpoint. `None` before
    /// the first batch.
    pub rate: Option<f64>,
    /// Seconds until the slot has caught up at `rate`: `lag_events / rate`
    /// (an estimate, as the lag may be); `None` when it has no lag or no
    /// rate yet.
    pub eta_seconds: Option<f64>,
    /// Concurrency mode: in_flight, running, gaps (complete but not yet
    /// committable), blocking_position (lowest incomplete event),
    /// blocked_seconds, fetch_paused — as of the last checkpoint.
    pub parallel: Option<serde_json::Value>,
}

impl SlotStatus {
    /// The value of the `projectionist_cursor_position` gauge: the cursor's
    /// position, or, at the watermark, the last event it passed.
    pub(crate) fn gauge_position(&self) -> i64 {
        self.cursor_position
            .or(self.last_passed_position)
            .unwrap_or(0)
    }
}

/// A worker of the worker pool.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WorkerStatus {
    /// The worker's id.
    pub worker_id: String,
    /// Its host name.
    pub hostname: String,
    /// Its process id.
    pub pid: i32,
    /// Its projectionist version.
    pub version: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_seconds: f64,
    /// Whether it holds the leader lock.
    pub is_leader: bool,
    /// How many slots are assigned to it.
    pub slots: i64,
}

/// A pooled connection running a read-only transaction under a
/// `statement_timeout`. Dropped before [`Session::finish`] (its caller gave
/// up, e.g. on a timeout), it cancels the running query on the server and
/// closes the connection instead of returning it to the pool, so neither
/// the query nor a late cancel request can reach anyone else.
pub(crate) struct Session {
    client: Option<deadpool_postgres::Object>,
    cancel: tokio_postgres::CancelToken,
    tls: crate::tls::MakeRustlsConnect,
    finished: bool,
}

impl Session {
    async fn open(store: &EventStore) -> Result<Session> {
        let client = store.pool().get().await?;
        Ok(Session {
            cancel: client.cancel_token(),
            client: Some(client),
            tls: store.tls().clone(),
            finished: false,
        })
    }

    fn client(&mut self) -> Result<&mut deadpool_postgres::Object> {
        self.client
            .as_mut()
            .ok_or_else(|| Error::new(Kind::Other, "status session used after it ended"))
    }

    /// Runs `statements` in one read-only, repeatable-read transaction (one
    /// snapshot for all of them), in one round trip: `BEGIN`, the settings,
    /// the statements and, when `commit`, `COMMIT` are sent together
    /// (`query_typed` needs no prepare round trip; the futures are polled in
    /// order, so they reach the server in order). The settings are
    /// `statement_timeout` and `jit = off`, local to the transaction: the
    /// status statement's cost estimate (many bounded scans over a large
    /// table) crosses `jit_above_cost`, and compiling it took far longer
    /// than running it (about 100 ms at 10M events). Without `commit`, the
    /// transaction stays open for more statements and [`Session::commit`].
    pub(crate) async fn pipelined(
        &mut self,
        timeout: Duration,
        statements: &[(&str, &TypedParams<'_>)],
        commit: bool,
    ) -> Result<Vec<Vec<tokio_postgres::Row>>> {
        let ms = format!("{}ms", timeout.as_millis().max(1));
        let settings: [(&(dyn ToSql + Sync), Type); 1] = [(&ms, Type::TEXT)];
        let client: &tokio_postgres::Client = self.client()?;
        let mut futures = Vec::with_capacity(statements.len() + 3);
        futures.push(client.query_typed("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", &[]));
        futures.push(client.query_typed(
            "SELECT set_config('statement_timeout', $1, true), set_config('jit', 'off', true)",
            &settings,
        ));
        for (sql, params) in statements {
            futures.push(client.query_typed(sql, params));
        }
        if commit {
            futures.push(client.query_typed("COMMIT", &[]));
        }
        let mut rows = futures_util::future::try_join_all(futures).await?;
        if commit {
            rows.pop();
        }
        Ok(rows.split_off(2))
    }

    /// Ends the transaction a [`Session::pipelined`] call without `commit`
    /// left open.
    async fn commit(&mut self) -> Result<()> {
        self.client()?.batch_execute("COMMIT").await?;
        Ok(())
    }

    /// The work is done: the connection goes back to the pool.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(object) = self.client.take() else {
            return;
        };
        if self.finished {
            return;
        }
        let client = deadpool_postgres::Object::take(object);
        let cancel = self.cancel.clone();
        let tls = self.tls.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = cancel.cancel_query(tls).await {
                    tracing::debug!(error = %e, "cannot cancel an abandoned status query");
                }
                drop(client);
            });
        }
    }
}

/// Opens a [`Session`] and runs `work` on it for at most `timeout` in all.
/// A query the server cancelled (`statement_timeout`) or a timeout here
/// becomes an error that names the timeout. On a timeout here, the running
/// query is cancelled on the server before the error is returned (so a
/// process that exits on the error leaves nothing running), and the
/// connection is closed rather than returned to the pool.
pub(crate) async fn within<T, F, Fut>(
    store: &EventStore,
    timeout: Duration,
    what: &str,
    work: F,
) -> Result<T>
where
    F: FnOnce(Session) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let started = tokio::time::Instant::now();
    let session = match tokio::time::timeout(timeout, Session::open(store)).await {
        Ok(session) => session.map_err(|e| e.context(what))?,
        Err(_) => return Err(timed_out(what, timeout)),
    };
    let (cancel, tls) = (session.cancel.clone(), session.tls.clone());
    match tokio::time::timeout_at(started + timeout, work(session)).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) if e.db_code() == Some("57014") => Err(timed_out(what, timeout).with_source(e)),
        Ok(Err(e)) => Err(e.context(what)),
        Err(_) => {
            // Dropping `work` dropped the session, which also sends a cancel
            // from a background task; this one is awaited (briefly).
            if let Ok(Err(e)) =
                tokio::time::timeout(Duration::from_secs(2), cancel.cancel_query(tls)).await
            {
                tracing::debug!(error = %e, "cannot cancel a timed-out status query");
            }
            Err(timed_out(what, timeout))
        }
    }
}

fn timed_out(what: &str, timeout: Duration) -> Error {
    Error::new(
        Kind::Database,
        format!(
            "{what} did not finish within {timeout:?} and was cancelled on the server: the database is \
             overloaded, or a lock on the projectionist tables blocks it (see pg_stat_activity and \
             pg_locks); retry, or allow more time (STATUS_TIMEOUT / --timeout)"
        ),
    )
}

/// The workers of the worker pool (empty in static mode).
pub async fn workers(store: &EventStore) -> Result<Vec<WorkerStatus>> {
    let client = store.pool().get().await?;
    workers_in(&**client, store).await
}

async fn workers_in<C: tokio_postgres::GenericClient>(
    client: &C,
    store: &EventStore,
) -> Result<Vec<WorkerStatus>> {
    workers_from(&client.query(&workers_sql(store), &[]).await?)
}

/// The statement behind [`workers`] (no parameters).
fn workers_sql(store: &EventStore) -> String {
    let sql = store.statements();
    // The leader holds its advisory lock on a connection named
    // `projectionist-leader:<worker id>`.
    format!(
        "SELECT w.worker_id, w.hostname, w.pid, w.version, \
                extract(epoch FROM now() - w.heartbeat_at)::float8, \
                (SELECT count(*) FROM {a} a WHERE a.worker_id = w.worker_id), \
                EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
                        WHERE l.locktype = 'advisory' AND l.granted \
                          AND s.application_name = 'projectionist-leader:' || w.worker_id) \
         FROM {w} w ORDER BY w.worker_id",
        a = sql.assignments,
        w = sql.workers
    )
}

fn workers_from(rows: &[tokio_postgres::Row]) -> Result<Vec<WorkerStatus>> {
    rows.iter()
        .map(|r| {
            Ok(WorkerStatus {
                worker_id: r.try_get(0)?,
                hostname: r.try_get(1)?,
                pid: r.try_get(2)?,
                version: r.try_get(3)?,
                heartbeat_age_seconds: r.try_get::<_, f64>(4)?.max(0.0),
                slots: r.try_get(5)?,
                is_leader: r.try_get(6)?,
            })
        })
        .collect()
}

/// The registered projections' filters as the JSON that the status
/// statement's `$1` takes (first projection of a name wins).
fn filters_json(store: &EventStore, projections: &[Registered]) -> serde_json::Value {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in projections {
        if !seen.insert(p.key().to_owned()) {
            continue;
        }
        let f = p.filter();
        let list = |v: Vec<String>| {
            if v.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::json!(v)
            }
        };
        out.push(serde_json::json!({
            "projection": p.key(),
            "aggregate_types": list(f.aggregate_types),
            // With the old names the registry knows, as the processor reads.
            "event_types": list(match store.registry() {
                Some(r) => r.stored_names(&f.event_types),
                None => f.event_types,
            }),
        }));
    }
    serde_json::Value::Array(out)
}

/// The one statement behind `status`: `$1` the filters (JSON), `$2` the
/// sample size ([`LAG_SAMPLE_EVENTS`]), `$3` the heartbeat timeout in
/// seconds. Per slot, one bounded index range scan after the cursor (at
/// most `$2` rows), one index probe before it, and one bounded range scan
/// (at most `$2` rows, newest first) between the last handled event and
/// the cursor, for skipped events; the head is one probe of the primary
/// key. Nothing in it grows with the log or the lag.
fn status_sql(store: &EventStore) -> String {
    let sql = store.statements();
    // Whether event e is one the slot receives: the registered filter (none
    // known: every event) and the partition, as `filter_conditions`.
    let hit = "(f.aggregate_types IS NULL OR e.aggregate_type = ANY(f.aggregate_types)) \
               AND (f.event_types IS NULL OR e.event_type = ANY(f.event_types)) \
               AND (c.total_partitions = 1 OR e.aggregate_hash % c.total_partitions = c.partition_key)";
    format!(
        "WITH f AS (SELECT * FROM jsonb_to_recordset($1::jsonb) \
                    AS f(projection text, aggregate_types text[], event_types text[])), \
              h AS (SELECT coalesce(max(global_position), 0) AS head FROM {ev}) \
         SELECT c.projection_name, c.partition_key, c.total_partitions, c.last_transaction_id, \
                c.last_global_position, c.events_handled, c.status, c.last_error, c.updated_at, \
                c.parallel_stats, f.projection IS NOT NULL, \
                s.n, s.m, s.min_pos, \
                coalesce(extract(epoch FROM now() - s.oldest)::float8, 0), \
                p.global_position, h.head, w.worker_id, a.worker_id, \
                CASE WHEN f.projection IS NULL THEN 0 ELSE k.skipped END, \
                v.state, extract(epoch FROM c.updated_at - c.created_at)::float8, c.handle_rate \
         FROM {cp} c \
         CROSS JOIN h \
         LEFT JOIN {ver} v ON c.projection_name = \
             v.projection_name || CASE WHEN v.version = 1 THEN '' ELSE '@v' || v.version END \
         LEFT JOIN f ON f.projection = c.projection_name \
         LEFT JOIN {asg} a ON a.projection_name = c.projection_name AND a.partition_key = c.partition_key \
         LEFT JOIN {wk} w ON w.worker_id = a.worker_id \
                         AND w.heartbeat_at > now() - make_interval(secs => $3::float8) \
         CROSS JOIN LATERAL ( \
             SELECT count(*) AS n, count(*) FILTER (WHERE x.hit) AS m, min(x.global_position) AS min_pos, \
                    coalesce(min(x.created_at) FILTER (WHERE x.hit), \
                             CASE WHEN count(*) >= $2 THEN min(x.created_at) END) AS oldest \
             FROM (SELECT e.global_position, e.created_at, {hit} AS hit FROM {ev} e \
                   WHERE (e.transaction_id, e.global_position) > (c.last_transaction_id, c.last_global_position) \
                   ORDER BY e.transaction_id, e.global_position LIMIT $2) x) s \
         LEFT JOIN LATERAL (SELECT e.global_position FROM {ev} e \
                            WHERE (e.transaction_id, e.global_position) <= (c.last_transaction_id, c.last_global_position) \
                            ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT 1) p ON true \
         CROSS JOIN LATERAL ( \
             SELECT count(*) FILTER (WHERE y.hit) AS skipped \
             FROM (SELECT {hit} AS hit FROM {ev} e \
                   WHERE (e.transaction_id, e.global_position) \
                         > (c.last_event_transaction_id, c.last_event_position) \
                     AND (e.transaction_id, e.global_position) <= (c.last_transaction_id, c.last_global_position) \
                   ORDER BY e.transaction_id DESC, e.global_position DESC LIMIT $2) y) k \
         ORDER BY c.projection_name, c.partition_key",
        ev = sql.events,
        cp = sql.checkpoints,
        asg = sql.assignments,
        wk = sql.workers,
        ver = sql.versions,
    )
}

/// The slots from the rows of [`status_sql`].
fn slots_from(rows: &[tokio_postgres::Row]) -> Result<Vec<SlotStatus>> {
    rows.iter()
        .map(|r| {
            let transaction_id = r.try_get::<_, Xid8>(3)?.0;
            let position: i64 = r.try_get(4)?;
            let n: i64 = r.try_get(11)?;
            let m: i64 = r.try_get(12)?;
            let min_pos: Option<i64> = r.try_get(13)?;
            let head: i64 = r.try_get(16)?;
            let (lag_events, lag_exact) = if n < LAG_SAMPLE_EVENTS {
                (m, true)
            } else {
                // Events from the first one after the cursor to the head,
                // at the sample's share of the slot's events.
                let span = head
                    .saturating_sub(min_pos.unwrap_or(head))
                    .saturating_add(1)
                    .max(n);
                let estimate =
                    (i128::from(span) * i128::from(m) + i128::from(n) / 2) / i128::from(n.max(1));
                (i64::try_from(estimate).unwrap_or(i64::MAX), false)
            };
            let live: Option<String> = r.try_get(17)?;
            let assigned: Option<String> = r.try_get(18)?;
            let updated_at: chrono::DateTime<chrono::Utc> = r.try_get(8)?;
            let key: String = r.try_get(0)?;
            let (name, version) = crate::registered::split_key(&key);
            let (name, version) = (name.to_owned(), version);
            let events_handled: i64 = r.try_get(5)?;
            let elapsed: f64 = r.try_get::<_, Option<f64>>(21)?.unwrap_or(0.0);
            // The moving average over the last seconds of batches; before
            // the second batch, the average since the slot started.
            let rate = r
                .try_get::<_, Option<f64>>(22)?
                .or_else(|| (elapsed >= 1.0).then(|| events_handled as f64 / elapsed));
            Ok(SlotStatus {
                projection: key,
                name,
                version,
                version_state: r.try_get(20)?,
                rate,
                eta_seconds: rate
                    .filter(|r| *r > 0.0 && lag_events > 0)
                    .map(|r| lag_events as f64 / r),
                partition: r.try_get(1)?,
                total_partitions: r.try_get(2)?,
                cursor_position: (position != i64::MAX).then_some(position),
                cursor_transaction_id: transaction_id,
                last_passed_position: r.try_get(15)?,
                lag_events,
                lag_exact,
                lag_capped: false,
                lag_seconds: r.try_get::<_, f64>(14)?.max(0.0),
                events_handled,
                state: r.try_get(6)?,
                last_error: r
                    .try_get::<_, Option<String>>(7)?
                    .map(|e| crate::db::redact(&e)),
                updated_at: updated_at.to_rfc3339(),
                parallel: r.try_get(9)?,
                registered: r.try_get(10)?,
                stale_worker_id: if live.is_none() { assigned } else { None },
                worker_id: live,
                skipped_events: r.try_get(19)?,
            })
        })
        .collect::<Result<Vec<SlotStatus>>>()
}

/// [`StatusOptions::exact`]: counts the lag of every estimated slot, in the
/// open transaction, by `deadline`.
async fn count_all_exactly<C: tokio_postgres::GenericClient>(
    client: &C,
    store: &EventStore,
    projections: &[Registered],
    options: &StatusOptions,
    slots: &mut [SlotStatus],
    deadline: tokio::time::Instant,
) -> Result<()> {
    if let Some(limit) = options.exact_limit {
        for slot in slots.iter_mut().filter(|s| !s.lag_exact) {
            // The server-side bound is the time left, not a fresh timeout
            // per count, so the counts stop by the deadline even if this
            // process is gone.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ms = format!("{}ms", left.as_millis().max(1));
            client
                .execute("SELECT set_config('statement_timeout', $1, true)", &[&ms])
                .await?;
            count_exactly(client, store, projections, slot, limit).await?;
        }
    }
    Ok(())
}

/// Replaces a slot's estimated lag by a count of up to `limit` events. One
/// statement per slot, so that the planner sees the cursor and scans the
/// log sequentially when most of it is lag.
async fn count_exactly<C: tokio_postgres::GenericClient>(
    client: &C,
    store: &EventStore,
    projections: &[Registered],
    slot: &mut SlotStatus,
    limit: i64,
) -> Result<()> {
    let f = projections
        .iter()
        .find(|p| p.key() == slot.projection)
        .map(|p| p.filter())
        .unwrap_or_default();
    let filter = ReadFilter {
        aggregate_types: f.aggregate_types,
        event_types: f.event_types,
        partition: (slot.total_partitions > 1).then_some((slot.partition, slot.total_partitions)),
    };
    let q = format!(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(x.created_at))::float8, 0) \
         FROM (SELECT e.created_at FROM {} e \
               WHERE (e.transaction_id, e.global_position) > ($1::xid8, $2::int8){} LIMIT $3) x",
        store.statements().events,
        filter_conditions(&filter, 3)
    );
    let tx = Xid8(slot.cursor_transaction_id);
    let position = slot.cursor_position.unwrap_or(i64::MAX);
    let bound = limit.saturating_add(1);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&tx, &position, &bound];
    params.extend(filter.params());
    let row = client.query_one(&q, &params).await?;
    let counted: i64 = row.try_get(0)?;
    slot.lag_capped = counted > limit;
    slot.lag_exact = !slot.lag_capped;
    slot.lag_events = counted.min(limit);
    slot.eta_seconds = slot
        .rate
        .filter(|r| *r > 0.0 && slot.lag_events > 0)
        .map(|r| slot.lag_events as f64 / r);
    // Capped: the oldest of the events counted, not necessarily of all.
    slot.lag_seconds = row.try_get::<_, f64>(1)?.max(0.0);
    Ok(())
}

/// Every checkpoint with its estimated lag (see [`status_with`]), using the
/// registered projections' filters where known.
pub async fn status(store: &EventStore, projections: &[Registered]) -> Result<Vec<SlotStatus>> {
    status_with(store, projections, &StatusOptions::default()).await
}

/// Every checkpoint and its lag, in one statement whose cost does not grow
/// with the log or the lag (unless `options` asks for an exact count):
/// see [`SlotStatus::lag_exact`].
pub async fn status_with(
    store: &EventStore,
    projections: &[Registered],
    options: &StatusOptions,
) -> Result<Vec<SlotStatus>> {
    let filters = filters_json(store, projections);
    let heartbeat = options.heartbeat_timeout.as_secs_f64();
    let status = status_sql(store);
    let params = status_params(&filters, &heartbeat);
    within(store, options.timeout, "status", |mut session| async move {
        let deadline = tokio::time::Instant::now() + options.timeout;
        let exact = options.exact_limit.is_some();
        let rows = session
            .pipelined(options.timeout, &[(&status, &params)], !exact)
            .await?;
        let mut slots = slots_from(&rows[0])?;
        if exact {
            let client: &tokio_postgres::Client = session.client()?;
            count_all_exactly(client, store, projections, options, &mut slots, deadline).await?;
            session.commit().await?;
        }
        session.finish();
        Ok(slots)
    })
    .await
}

/// The parameters of [`status_sql`], typed for `query_typed`.
fn status_params<'a>(
    filters: &'a serde_json::Value,
    heartbeat: &'a f64,
) -> [(&'a (dyn ToSql + Sync), Type); 3] {
    [
        (filters, Type::JSONB),
        (&LAG_SAMPLE_EVENTS, Type::INT8),
        (heartbeat, Type::FLOAT8),
    ]
}

/// The plan (`EXPLAIN (FORMAT JSON)`, without running it) of the one
/// statement that [`status`] runs for every slot, planned with the
/// settings [`status`] uses (`jit` off), to check that it reads the events
/// table only through index conditions whatever the log's size, and is
/// not JIT compiled. (`StatusOptions::exact` adds a bounded count per slot
/// on top.)
pub async fn explain_status(
    store: &EventStore,
    projections: &[Registered],
) -> Result<serde_json::Value> {
    let filters = filters_json(store, projections);
    let options = StatusOptions::default();
    let heartbeat = options.heartbeat_timeout.as_secs_f64();
    let explain = format!("EXPLAIN (FORMAT JSON) {}", status_sql(store));
    let params = status_params(&filters, &heartbeat);
    within(
        store,
        options.timeout,
        "explain status",
        |mut session| async move {
            let rows = session
                .pipelined(options.timeout, &[(&explain, &params)], true)
                .await?;
            session.finish();
            let row = rows[0]
                .first()
                .ok_or_else(|| Error::new(Kind::Other, "EXPLAIN returned no row"))?;
            Ok(row.try_get(0)?)
        },
    )
    .await
}

/// The slots whose state is `failed`, as `projection/partition`: what
/// `/readyz` checks. Reads only the checkpoint table (one row per slot).
pub(crate) async fn failed_slots(store: &EventStore, timeout: Duration) -> Result<Vec<String>> {
    let table = store.statements().checkpoints.clone();
    within(
        store,
        timeout,
        "the readiness check",
        |mut session| async move {
            let sql = format!(
                "SELECT projection_name || '/' || partition_key FROM {table} \
                 WHERE status = 'failed' ORDER BY projection_name, partition_key"
            );
            let rows = session.pipelined(timeout, &[(&sql, &[])], true).await?;
            session.finish();
            let rows = &rows[0];
            rows.iter()
                .map(|r| Ok(r.try_get(0)?))
                .collect::<Result<Vec<String>>>()
        },
    )
    .await
}

/// Runs the projection's reset hook and deletes its checkpoints and dead
/// letters (all, or one partition's) and, for a whole projection, its
/// worker-mode assignments, in one transaction, so the next run rebuilds it.
/// Returns the number of checkpoint rows deleted.
pub async fn reset(
    store: &EventStore,
    projection: &Registered,
    partition: Option<i32>,
) -> Result<u64> {
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let scope = match partition {
        None => None,
        Some(key) => {
            let row = tx
                .query_opt(
                    &format!(
                        "SELECT total_partitions FROM {} WHERE projection_name = $1 AND partition_key = $2",
                        sql.checkpoints
                    ),
                    &[&projection.key(), &key],
                )
                .await?;
            let total: i32 = match row {
                Some(r) => r.try_get(0)?,
                None => {
                    return Err(Error::config(format!(
                        "projection {} has no checkpoint for partition {key}: run `status` to see its partitions",
                        projection.key()
                    )))
                }
            };
            Some(Partition { key, total })
        }
    };
    // The reset hook can call projectionist_partition() unqualified and
    // still find its own (unqualified) tables on the usual search path.
    tx.execute(
        "SELECT set_config('search_path', $1 || ', ' || current_setting('search_path'), true)",
        &[&store.config().schema.quoted()],
    )
    .await?;
    projection
        .reset(&tx, scope)
        .await
        .map_err(|e| e.context(format!("reset hook of projection {}", projection.key())))?;
    let deleted = Checkpoints::new(&sql.checkpoints)
        .delete(&*tx, projection.key(), partition)
        .await?;
    // Dead letters of a rebuilt read model would be applied twice by
    // `dlq retry`; assignments of a removed partition count would linger.
    tx.execute(
        &format!(
            "DELETE FROM {} WHERE projection_name = $1 AND ($2::int4 IS NULL OR partition_key = $2)",
            sql.dead_letters
        ),
        &[&projection.key(), &partition],
    )
    .await?;
    if partition.is_none() {
        tx.execute(
            &format!("DELETE FROM {} WHERE projection_name = $1", sql.assignments),
            &[&projection.key()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(deleted)
}

/// The oldest open writing transaction on the server: it holds back the
/// gap-safe watermark of every projection (in every database of the
/// server), so events committed after it started are not read until it
/// ends.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WatermarkHolder {
    /// Its backend process id (`SELECT pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// Its database.
    pub database: Option<String>,
    /// Its role.
    pub user: Option<String>,
    /// Its `application_name`.
    pub application_name: Option<String>,
    /// Its state (`active`, `idle in transaction`, …).
    pub state: Option<String>,
    /// Seconds since its transaction started.
    pub open_seconds: f64,
    /// The start of its current or last query (first 200 characters; empty
    /// when the role may not see it), passwords masked (`PASSWORD '***'`).
    pub query: String,
}

/// The oldest open writing transaction, if any (see [`WatermarkHolder`]).
pub async fn watermark_holder(store: &EventStore) -> Result<Option<WatermarkHolder>> {
    let client = store.pool().get().await?;
    watermark_holder_in(&**client).await
}

async fn watermark_holder_in<C: tokio_postgres::GenericClient>(
    client: &C,
) -> Result<Option<WatermarkHolder>> {
    holder_from(&client.query(WATERMARK_HOLDER_SQL, &[]).await?)
}

/// The statement behind [`watermark_holder`] (no parameters).
const WATERMARK_HOLDER_SQL: &str =
    "SELECT pid, datname::text, usename::text, application_name, state, \
        coalesce(extract(epoch FROM now() - xact_start), 0)::float8, \
        coalesce(left(query, 200), '') \
    FROM pg_stat_activity \
    WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
    ORDER BY age(backend_xid) DESC LIMIT 1";

fn holder_from(rows: &[tokio_postgres::Row]) -> Result<Option<WatermarkHolder>> {
    rows.first()
        .map(|r| {
            Ok(WatermarkHolder {
                pid: r.try_get(0)?,
                database: r.try_get(1)?,
                user: r.try_get(2)?,
                application_name: r.try_get(3)?,
                state: r.try_get(4)?,
                open_seconds: r.try_get::<_, f64>(5)?.max(0.0),
                query: crate::db::redact(&r.try_get::<_, String>(6)?),
            })
        })
        .transpose()
}

/// Dead letters per projection, each counted up to `$1` rows through the
/// `(projection_name, global_position)` index: the projection names are
/// found by skipping through the index (one probe per name), never by a
/// scan of the table.
fn dead_letters_sql(store: &EventStore) -> String {
    format!(
        "WITH RECURSIVE p(name) AS ( \
             (SELECT projection_name FROM {dl} ORDER BY projection_name LIMIT 1) \
             UNION ALL \
             SELECT (SELECT d.projection_name FROM {dl} d WHERE d.projection_name > p.name \
                     ORDER BY d.projection_name LIMIT 1) \
             FROM p WHERE p.name IS NOT NULL) \
         SELECT p.name, (SELECT count(*) FROM (SELECT 1 FROM {dl} d WHERE d.projection_name = p.name \
                                               LIMIT $1) x) \
         FROM p WHERE p.name IS NOT NULL",
        dl = store.statements().dead_letters
    )
}

/// Everything `status --json` and `/status` show.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StatusReport {
    /// One entry per (projection, partition).
    pub projections: Vec<SlotStatus>,
    /// The worker pool (empty in static mode).
    pub workers: Vec<WorkerStatus>,
    /// The oldest open writing transaction, when one is open.
    pub watermark_held_by: Option<WatermarkHolder>,
    /// Dead letters per projection (projections without any are left
    /// out), counted up to [`DEAD_LETTER_COUNT_LIMIT`].
    pub dead_letters: std::collections::BTreeMap<String, i64>,
    /// Per projection in `dead_letters`: whether it has more dead letters
    /// than [`DEAD_LETTER_COUNT_LIMIT`], the count shown.
    pub dead_letters_capped: std::collections::BTreeMap<String, bool>,
    /// The highest global position in the log.
    pub log_head: i64,
}

/// Collects a [`StatusReport`] with the default [`StatusOptions`]
/// (estimated lag, 30 s).
pub async fn report(store: &EventStore, projections: &[Registered]) -> Result<StatusReport> {
    report_with(store, projections, &StatusOptions::default()).await
}

/// Collects a [`StatusReport`] on one connection, in one read-only
/// transaction (one snapshot) and one round trip (more with
/// [`StatusOptions::exact`]), within `options`' timeout.
pub async fn report_with(
    store: &EventStore,
    projections: &[Registered],
    options: &StatusOptions,
) -> Result<StatusReport> {
    let filters = filters_json(store, projections);
    let heartbeat = options.heartbeat_timeout.as_secs_f64();
    let status = status_sql(store);
    let status_params = status_params(&filters, &heartbeat);
    let workers = workers_sql(store);
    let dead_letters = dead_letters_sql(store);
    let dead_letter_bound = DEAD_LETTER_COUNT_LIMIT + 1;
    let dead_letter_params: [(&(dyn ToSql + Sync), Type); 1] = [(&dead_letter_bound, Type::INT8)];
    let head = format!(
        "SELECT coalesce(max(global_position), 0) FROM {}",
        store.statements().events
    );
    within(store, options.timeout, "status", |mut session| async move {
        let deadline = tokio::time::Instant::now() + options.timeout;
        let exact = options.exact_limit.is_some();
        let rows = session
            .pipelined(
                options.timeout,
                &[
                    (&status, &status_params),
                    (&workers, &[]),
                    (WATERMARK_HOLDER_SQL, &[]),
                    (&dead_letters, &dead_letter_params),
                    (&head, &[]),
                ],
                !exact,
            )
            .await?;
        let mut slots = slots_from(&rows[0])?;
        if exact {
            let client: &tokio_postgres::Client = session.client()?;
            count_all_exactly(client, store, projections, options, &mut slots, deadline).await?;
            session.commit().await?;
        }
        session.finish();
        let mut dead_letters = std::collections::BTreeMap::new();
        let mut dead_letters_capped = std::collections::BTreeMap::new();
        for r in &rows[3] {
            let name: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            dead_letters_capped.insert(name.clone(), n > DEAD_LETTER_COUNT_LIMIT);
            dead_letters.insert(name, n.min(DEAD_LETTER_COUNT_LIMIT));
        }
        let log_head: i64 = rows[4]
            .first()
            .ok_or_else(|| Error::new(Kind::Other, "the log head query returned no row"))?
            .try_get(0)?;
        Ok(StatusReport {
            projections: slots,
            workers: workers_from(&rows[1])?,
            watermark_held_by: holder_from(&rows[2])?,
            dead_letters,
            dead_letters_capped,
            log_head,
        })
    })
    .await
}

/// What `rebase-cursors` did to one checkpoint.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rebased {
    /// Projection name.
    pub projection: String,
    /// Partition key.
    pub partition: i32,
    /// Every event of this slot at or below this global position had been
    /// handled; the slot resumes after it.
    pub resume_after_position: i64,
    /// Events above that position that had already been handled and will be
    /// handled again (the boundary: events that committed out of position
    /// order before the restore).
    pub handled_again: i64,
}

/// Rebases every cursor after a restore into another cluster, in one
/// transaction: each cursor becomes "after global position P", where P is
/// the highest position below which the slot had handled everything; all
/// existing events get transaction id 1 (so they order by position, before
/// any new transaction of this cluster); the checkpoints record this
/// cluster. Returns, per slot, how many events will be handled again.
pub async fn rebase_cursors(
    store: &EventStore,
    projections: &[Registered],
) -> Result<Vec<Rebased>> {
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        &format!("LOCK TABLE {} IN EXCLUSIVE MODE", sql.checkpoints),
        &[],
    )
    .await?;
    let checkpoints = Checkpoints::new(&sql.checkpoints).list(&*tx).await?;
    let mut out = Vec::new();
    for c in &checkpoints {
        let f = projections
            .iter()
            .find(|p| p.key() == c.projection)
            .map(|p| p.filter())
            .unwrap_or_default();
        let filter = ReadFilter {
            aggregate_types: f.aggregate_types,
            event_types: f.event_types,
            partition: (c.total_partitions > 1).then_some((c.partition, c.total_partitions)),
        };
        // An event is unhandled when it lies after the cursor (in the old
        // cluster's transaction ids), or when it was written after the
        // checkpoint last moved (a new cluster's transaction ids compare
        // arbitrarily with the old ones).
        let cursor_tx = Xid8(c.cursor.transaction_id);
        let updated_at = c.updated_at;
        let conds = filter_conditions(&filter, 3);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&cursor_tx, &c.cursor.global_position, &updated_at];
        params.extend(filter.params());
        let resume: i64 = tx
            .query_one(
                &format!(
                    "SELECT coalesce((SELECT min(e.global_position) - 1 FROM {ev} e \
                       WHERE ((e.transaction_id, e.global_position) > ($1::xid8, $2::int8) \
                              OR e.created_at > $3::timestamptz){conds}), \
                       (SELECT coalesce(max(global_position), 0) FROM {ev}))",
                    ev = sql.events
                ),
                &params,
            )
            .await?
            .try_get(0)?;
        let conds_after = filter_conditions(&filter, 4);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&cursor_tx, &c.cursor.global_position, &updated_at, &resume];
        params.extend(filter.params());
        let again: i64 = tx
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} e WHERE (e.transaction_id, e.global_position) <= ($1::xid8, $2::int8) \
                     AND e.created_at <= $3::timestamptz AND e.global_position > $4::int8{conds_after}",
                    sql.events
                ),
                &params,
            )
            .await?
            .try_get(0)?;
        out.push(Rebased {
            projection: c.projection.clone(),
            partition: c.partition,
            resume_after_position: resume,
            handled_again: again,
        });
    }
    tx.execute(
        &format!(
            "UPDATE {} SET transaction_id = '1' WHERE transaction_id <> '1'",
            sql.events
        ),
        &[],
    )
    .await?;
    tx.execute(
        &format!(
            "UPDATE {} SET transaction_id = '1' WHERE transaction_id <> '1'",
            sql.dead_letters
        ),
        &[],
    )
    .await?;
    for r in &out {
        tx.execute(
            &format!(
                "UPDATE {} SET last_transaction_id = '1', last_global_position = $3, \
                 last_event_transaction_id = '1', last_event_position = $3, epoch = NULL, \
                 system_identifier = (SELECT system_identifier::text FROM pg_control_system()), updated_at = now() \
                 WHERE projection_name = $1 AND partition_key = $2",
                sql.checkpoints
            ),
            &[&r.projection, &r.partition, &r.resume_after_position],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(out)
}
