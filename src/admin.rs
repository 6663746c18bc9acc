//! Operator actions that are not the batch loop: `status` (cursor, lag and
//! state per slot) and `reset` (clear a read model and its checkpoints).

use crate::checkpoint::Checkpoints;
use crate::error::{Error, Result};
use crate::event::Xid8;
use crate::projection::{Partition, Projection};
use crate::store::{filter_conditions, EventStore, ReadFilter};
use serde::Serialize;
use std::sync::Arc;

/// The state of one (projection, partition) slot.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SlotStatus {
    /// Projection name.
    pub projection: String,
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
    /// Events after the cursor that this slot will receive.
    pub lag_events: i64,
    /// Age of the oldest of those events, in seconds (0 when caught up).
    pub lag_seconds: f64,
    /// `running`, `stopped` or `failed`.
    pub state: String,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Events handled so far.
    pub events_handled: i64,
    /// When the checkpoint last changed (RFC 3339).
    pub updated_at: String,
    /// Whether this binary has a projection of that name registered.
    pub registered: bool,
    /// Worker mode: the worker the slot is assigned to, if any.
    pub worker_id: Option<String>,
    /// Concurrency mode: in_flight, running, gaps (complete but not yet
    /// committable), blocking_position (lowest incomplete event),
    /// blocked_seconds, fetch_paused — as of the last checkpoint.
    pub parallel: Option<serde_json::Value>,
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

/// The workers of the worker pool (empty in static mode).
pub async fn workers(store: &EventStore) -> Result<Vec<WorkerStatus>> {
    let sql = store.statements();
    let client = store.pool().get().await?;
    // The leader holds its advisory lock on a connection named
    // `projectionist-leader:<worker id>`.
    let rows = client
        .query(
            &format!(
                "SELECT w.worker_id, w.hostname, w.pid, w.version,                         extract(epoch FROM now() - w.heartbeat_at)::float8,                         (SELECT count(*) FROM {a} a WHERE a.worker_id = w.worker_id),                         EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid                                 WHERE l.locktype = 'advisory' AND l.granted                                   AND s.application_name = 'projectionist-leader:' || w.worker_id)                  FROM {w} w ORDER BY w.worker_id",
                a = sql.assignments,
                w = sql.workers
            ),
            &[],
        )
        .await?;
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

/// Reads every checkpoint and computes its lag, using the registered
/// projections' filters where known.
pub async fn status(
    store: &EventStore,
    projections: &[Arc<dyn Projection>],
) -> Result<Vec<SlotStatus>> {
    let sql = store.statements();
    let client = store.pool().get().await?;
    let checkpoints = Checkpoints::new(&sql.checkpoints).list(&**client).await?;
    let owners: std::collections::HashMap<(String, i32), String> = client
        .query(
            &format!(
                "SELECT projection_name, partition_key, worker_id FROM {} WHERE worker_id IS NOT NULL",
                sql.assignments
            ),
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(checkpoints.len());
    for c in checkpoints {
        let projection = projections.iter().find(|p| p.name() == c.projection);
        let f = projection.map(|p| p.filter()).unwrap_or_default();
        let filter = ReadFilter {
            aggregate_types: f.aggregate_types,
            event_types: f.event_types,
            partition: (c.total_partitions > 1).then_some((c.partition, c.total_partitions)),
        };
        let q = format!(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(e.created_at))::float8, 0) \
             FROM {} e WHERE (e.transaction_id, e.global_position) > ($1::xid8, $2::int8){}",
            sql.events,
            filter_conditions(&filter, 2)
        );
        let tx = Xid8(c.cursor.transaction_id);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&tx, &c.cursor.global_position];
        params.extend(filter.params());
        let row = client.query_one(&q, &params).await?;
        let worker_id = owners.get(&(c.projection.clone(), c.partition)).cloned();
        out.push(SlotStatus {
            worker_id,
            parallel: c.parallel,
            projection: c.projection,
            partition: c.partition,
            total_partitions: c.total_partitions,
            cursor_position: (c.cursor.global_position != i64::MAX)
                .then_some(c.cursor.global_position),
            cursor_transaction_id: c.cursor.transaction_id,
            lag_events: row.try_get(0)?,
            lag_seconds: row.try_get::<_, f64>(1)?.max(0.0),
            state: c.status,
            last_error: c.last_error,
            events_handled: c.events_handled,
            updated_at: c.updated_at.to_rfc3339(),
            registered: projection.is_some(),
        });
    }
    Ok(out)
}

/// Runs the projection's reset hook and deletes its checkpoints and dead
/// letters (all, or one partition's) and, for a whole projection, its
/// worker-mode assignments, in one transaction, so the next run rebuilds it.
/// Returns the number of checkpoint rows deleted.
pub async fn reset(
    store: &EventStore,
    projection: &dyn Projection,
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
                    &[&projection.name(), &key],
                )
                .await?;
            let total: i32 = match row {
                Some(r) => r.try_get(0)?,
                None => {
                    return Err(Error::config(format!(
                        "projection {} has no checkpoint for partition {key}: run `status` to see its partitions",
                        projection.name()
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
        .map_err(|e| e.context(format!("reset hook of projection {}", projection.name())))?;
    let deleted = Checkpoints::new(&sql.checkpoints)
        .delete(&*tx, projection.name(), partition)
        .await?;
    // Dead letters of a rebuilt read model would be applied twice by
    // `dlq retry`; assignments of a removed partition count would linger.
    tx.execute(
        &format!(
            "DELETE FROM {} WHERE projection_name = $1 AND ($2::int4 IS NULL OR partition_key = $2)",
            sql.dead_letters
        ),
        &[&projection.name(), &partition],
    )
    .await?;
    if partition.is_none() {
        tx.execute(
            &format!("DELETE FROM {} WHERE projection_name = $1", sql.assignments),
            &[&projection.name()],
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
    /// when the role may not see it).
    pub query: String,
}

/// The oldest open writing transaction, if any (see [`WatermarkHolder`]).
pub async fn watermark_holder(store: &EventStore) -> Result<Option<WatermarkHolder>> {
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            "SELECT pid, datname::text, usename::text, application_name, state, \
                    coalesce(extract(epoch FROM now() - xact_start), 0)::float8, \
                    coalesce(left(query, 200), '') \
             FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
             ORDER BY age(backend_xid) DESC LIMIT 1",
            &[],
        )
        .await?;
    row.map(|r| {
        Ok(WatermarkHolder {
            pid: r.try_get(0)?,
            database: r.try_get(1)?,
            user: r.try_get(2)?,
            application_name: r.try_get(3)?,
            state: r.try_get(4)?,
            open_seconds: r.try_get::<_, f64>(5)?.max(0.0),
            query: r.try_get(6)?,
        })
    })
    .transpose()
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
    /// Dead letters per projection.
    pub dead_letters: std::collections::BTreeMap<String, i64>,
    /// The highest global position in the log.
    pub log_head: i64,
}

/// Collects a [`StatusReport`].
pub async fn report(
    store: &EventStore,
    projections: &[Arc<dyn Projection>],
) -> Result<StatusReport> {
    let client = store.pool().get().await?;
    let dead_letters = client
        .query(
            &format!(
                "SELECT projection_name, count(*) FROM {} GROUP BY projection_name",
                store.statements().dead_letters
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_>>()?;
    let log_head: i64 = client
        .query_one(
            &format!(
                "SELECT coalesce(max(global_position), 0) FROM {}",
                store.statements().events
            ),
            &[],
        )
        .await?
        .try_get(0)?;
    drop(client);
    Ok(StatusReport {
        projections: status(store, projections).await?,
        workers: workers(store).await?,
        watermark_held_by: watermark_holder(store).await?,
        dead_letters,
        log_head,
    })
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
    projections: &[Arc<dyn Projection>],
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
            .find(|p| p.name() == c.projection)
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
