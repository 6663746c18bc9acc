//! The `projection_checkpoints` table: one row per (projection, partition)
//! holding the cursor, the partition count it was made with, and the state.
//!
//! Architecture invariant: the cursor only moves through
//! the compare-and-set of [`Checkpoints::advance_sql`], executed inside the
//! batch transaction, so two runners can never both commit the same batch.
//! In worker mode the same statement also share-locks the slot's
//! assignment row and requires it to still name this worker and generation
//! (fencing): a worker whose slot moved can never commit a batch for it.

use crate::error::{Error, Result};
use crate::event::{Cursor, Xid8};
use tokio_postgres::GenericClient;

/// The channel every checkpoint advance NOTIFYs, in the batch transaction
/// that moves the cursor, with the projection's name as the payload:
/// `projectionist_checkpoints`. [`crate::Waiter`] listens on it; the
/// notification carries no cursor, so listeners re-read the rows (of their
/// own schema: deployments in several schemas of one database share it).
pub const CHECKPOINTS_CHANNEL: &str = "projectionist_checkpoints";

/// A checkpoint row.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The projection's name.
    pub projection: String,
    /// The partition this row belongs to.
    pub partition: i32,
    /// The partition count the cursor was made with.
    pub total_partitions: i32,
    /// The last position handled or skipped.
    pub cursor: Cursor,
    /// Events handed to the handler so far.
    pub events_handled: i64,
    /// `running`, `stopped` or `failed`.
    pub status: String,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When the row last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// Concurrency mode: the in-flight window at the last checkpoint.
    pub parallel: Option<serde_json::Value>,
}

/// SQL over the checkpoint table of one schema.
#[derive(Clone, Debug)]
pub(crate) struct Checkpoints {
    table: String,
    assignments: String,
    advance: String,
    advance_fenced: String,
}

/// The worker-mode fence as a CTE over `assignments`: the slot's row, share
/// locked, naming worker `$w` with generation `$g`.
fn fence_cte(assignments: &str, w: usize, g: usize) -> String {
    format!(
        "WITH fence AS ( \
            SELECT 1 FROM {assignments} \
            WHERE projection_name = $1 AND partition_key = $2 AND worker_id = ${w} AND generation = ${g} \
            FOR SHARE \
         ) "
    )
}

impl Checkpoints {
    pub(crate) fn new(table: &str) -> Checkpoints {
        Checkpoints::for_slots(table, "consumer_assignments", "projectionist_epoch")
    }

    /// With the (schema-qualified) assignments table the worker-mode fence
    /// reads and the crash sentinel the compare-and-set checks.
    pub(crate) fn for_slots(table: &str, assignments: &str, epoch: &str) -> Checkpoints {
        // Events per second, a moving average over about the last 10 s of
        // batches, weighted by time: each batch's rate (its events over the
        // time since the previous update) counts with 1 - e^(-dt/10s), and
        // the weight is kept (`rate_weight`) so that the average is not
        // biased towards 0 while the slot is young. The wall clock at the
        // update, not the transaction's start: the updates of one slot are
        // serialised by its row, their transactions may overlap. The first
        // update only starts the clock (its interval would include the
        // process's start).
        let dt = "greatest(extract(epoch FROM clock_timestamp() - rate_at)::float8, 0.001)";
        let keep = format!("exp(-{dt} / 10.0)");
        let weight = "coalesce(rate_weight, 0)";
        let rate = format!(
            "CASE WHEN rate_at IS NULL THEN NULL \
                  ELSE ({keep} * {weight} * coalesce(handle_rate, 0) + (1 - {keep}) * ($7::float8 / {dt})) \
                       / ({keep} * {weight} + (1 - {keep})) END, \
             rate_weight = CASE WHEN rate_at IS NULL THEN 0 ELSE {keep} * {weight} + (1 - {keep}) END, \
             rate_at = clock_timestamp()"
        );
        let update = format!(
            "UPDATE {table} SET last_transaction_id = $5, last_global_position = $6, \
             events_handled = events_handled + $7, last_event_transaction_id = $8, \
             last_event_position = $9, epoch = coalesce($10, epoch), last_error = NULL, \
             handle_rate = {rate}, updated_at = now() \
             WHERE projection_name = $1 AND partition_key = $2 \
               AND last_transaction_id = $3 AND last_global_position = $4 AND status = 'running' \
               AND ($10::uuid IS NULL OR $10 = (SELECT epoch FROM {epoch} WHERE id = 1))"
        );
        // Every advance tells waiters (`Waiter`) in the same transaction,
        // so the notification arrives exactly when the cursor committed.
        let notify = format!(" RETURNING pg_notify('{CHECKPOINTS_CHANNEL}', $1)");
        Checkpoints {
            table: table.to_owned(),
            assignments: assignments.to_owned(),
            advance_fenced: format!(
                "{}{update} AND EXISTS (SELECT 1 FROM fence){notify}",
                fence_cte(assignments, 11, 12)
            ),
            advance: format!("{update}{notify}"),
        }
    }

    /// The compare-and-set: `$1` name, `$2` partition, `$3`/`$4` expected
    /// cursor, `$5`/`$6` new cursor, `$7` events handled, `$8`/`$9` the last
    /// event handled, `$10` the crash epoch (the move is refused when the
    /// crash sentinel no longer holds it: the page may have been read
    /// before PostgreSQL lost commits, in another transaction — a
    /// prefetched page, or concurrency mode's fetch); with `fenced`, also `$11`
    /// worker id and `$12` assignment generation. Only a `running` slot
    /// advances: a paused or failed one waits for `resume`.
    pub(crate) fn advance_sql(&self, fenced: bool) -> &str {
        if fenced {
            &self.advance_fenced
        } else {
            &self.advance
        }
    }

    fn fenced(&self, fenced: bool, w: usize, update: String) -> String {
        if fenced {
            format!(
                "{}{update} AND EXISTS (SELECT 1 FROM fence)",
                fence_cte(&self.assignments, w, w + 1)
            )
        } else {
            update
        }
    }

    /// After lost commits: moves the cursor back to the last handled event
    /// and records epoch `$3`, unless the row is already of that epoch.
    /// `$1` name, `$2` partition; fenced: `$4` worker, `$5` generation.
    pub(crate) fn rewind_sql(&self, fenced: bool) -> String {
        self.fenced(
            fenced,
            4,
            format!(
                "UPDATE {} SET last_transaction_id = last_event_transaction_id, \
                 last_global_position = last_event_position, epoch = $3, updated_at = now() \
                 WHERE projection_name = $1 AND partition_key = $2 AND epoch IS DISTINCT FROM $3",
                self.table
            ),
        )
    }

    /// Failure policy Stop: `$3` message, `$4` position; fenced: `$5`
    /// worker, `$6` generation.
    pub(crate) fn mark_failed_sql(&self, fenced: bool) -> String {
        self.fenced(
            fenced,
            5,
            format!(
                "UPDATE {} SET status = 'failed', last_error = $3, failed_position = $4, updated_at = now() \
                 WHERE projection_name = $1 AND partition_key = $2",
                self.table
            ),
        )
    }

    /// Records error `$3` without moving the cursor; fenced: `$4` worker,
    /// `$5` generation.
    pub(crate) fn record_error_sql(&self, fenced: bool) -> String {
        self.fenced(
            fenced,
            4,
            format!(
                "UPDATE {} SET last_error = $3, updated_at = now() \
                 WHERE projection_name = $1 AND partition_key = $2",
                self.table
            ),
        )
    }

    /// Refuses a partition count that differs from the stored checkpoints.
    pub(crate) async fn check_total<C: GenericClient>(
        &self,
        client: &C,
        name: &str,
        total: i32,
    ) -> Result<()> {
        let totals = client
            .query(
                &format!(
                    "SELECT DISTINCT total_partitions FROM {} WHERE projection_name = $1",
                    self.table
                ),
                &[&name],
            )
            .await?;
        for row in &totals {
            let stored: i32 = row.try_get(0)?;
            if stored != total {
                return Err(Error::config(format!(
                    "projection {name} has checkpoints made with {stored} partition(s), but this process \
                     runs it with {total}; its events would be split differently and some skipped or handled \
                     twice. Either run it with {stored} partition(s) (TOTAL_PARTITIONS={stored}, or \
                     PROJECTION_PARTITIONS={name}={stored} in worker mode), or rebuild it: stop every \
                     process running it, run `reset {name} --yes`, and start it with the new count; \
                     worker mode (run-projections --mode worker) lets you add processes without \
                     changing the partition count"
                )));
            }
        }
        Ok(())
    }

    /// Creates the row for `(name, partition)` if missing and returns its
    /// cursor, after checking that every existing row of the projection was
    /// made with `total` partitions.
    ///
    /// The check and the insert are atomic: they run in one transaction
    /// that first takes a transaction-scoped advisory lock keyed by this
    /// checkpoint table (so by schema) and the projection's name, so two
    /// processes starting the projection with different partition counts
    /// cannot both pass (each sees the other's committed row, or waits for
    /// it). `client` must be a plain client, not inside a transaction (nor
    /// a `Transaction`): this opens and ends its own with `BEGIN`/`COMMIT`
    /// (rolled back if the future is dropped half-way).
    pub(crate) async fn ensure<C: GenericClient>(
        &self,
        client: &C,
        name: &str,
        partition: i32,
        total: i32,
    ) -> Result<Cursor> {
        client.batch_execute("BEGIN").await?;
        let open = RollbackOnDrop(client);
        let ensured = self.ensure_locked(client, name, partition, total).await;
        let end = if ensured.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let ended = client.batch_execute(end).await;
        std::mem::forget(open);
        let cursor = ensured?;
        ended?;
        Ok(cursor)
    }

    /// [`Checkpoints::ensure`]'s body, inside its transaction.
    async fn ensure_locked<C: GenericClient>(
        &self,
        client: &C,
        name: &str,
        partition: i32,
        total: i32,
    ) -> Result<Cursor> {
        client
            .execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&self.partitions_lock_key(name)],
            )
            .await?;
        self.check_total(client, name, total).await?;
        client
            .execute(
                &format!(
                    "INSERT INTO {} (projection_name, partition_key, total_partitions, system_identifier) \
                     SELECT $1, $2, $3, system_identifier::text FROM pg_control_system() \
                     ON CONFLICT (projection_name, partition_key) DO NOTHING",
                    self.table
                ),
                &[&name, &partition, &total],
            )
            .await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT last_transaction_id, last_global_position FROM {} \
                     WHERE projection_name = $1 AND partition_key = $2",
                    self.table
                ),
                &[&name, &partition],
            )
            .await?;
        Ok(Cursor::new(row.try_get::<_, Xid8>(0)?.0, row.try_get(1)?))
    }

    /// The advisory lock key that serialises the partition-count check of
    /// projection `name` in this schema (FNV-1a, stable across builds).
    fn partitions_lock_key(&self, name: &str) -> i64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = b"projectionist:partitions:"
            .iter()
            .chain(self.table.as_bytes())
            .chain(b"\0")
            .chain(name.as_bytes());
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h as i64
    }

    /// Refuses to run on checkpoints made on another PostgreSQL cluster (a
    /// dump restored elsewhere): their transaction ids mean nothing here.
    /// Rows without a recorded cluster get this one.
    pub(crate) async fn check_cluster<C: GenericClient>(&self, client: &C) -> Result<()> {
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT c.system_identifier, s.system_identifier::text \
                     FROM {} c, pg_control_system() s \
                     WHERE c.system_identifier IS NOT NULL AND c.system_identifier <> s.system_identifier::text",
                    self.table
                ),
                &[],
            )
            .await?;
        if let Some(r) = rows.first() {
            let (theirs, ours): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            return Err(Error::config(format!(
                "the projection checkpoints were made on another PostgreSQL cluster (system identifier {theirs}; \
                 this server is {ours}): the database was restored from a dump or copied, and transaction ids \
                 belong to one cluster, so the cursors are not valid here. Stop every projection process and \
                 run `rebase-cursors --yes` once: it re-derives the cursors from global positions"
            )));
        }
        client
            .execute(
                &format!(
                    "UPDATE {} SET system_identifier = (SELECT system_identifier::text FROM pg_control_system()) \
                     WHERE system_identifier IS NULL",
                    self.table
                ),
                &[],
            )
            .await?;
        Ok(())
    }

    /// Every checkpoint row, ordered by projection and partition.
    pub(crate) async fn list<C: GenericClient>(&self, client: &C) -> Result<Vec<Checkpoint>> {
        let rows = client
            .query(
                &format!(
                    "SELECT projection_name, partition_key, total_partitions, last_transaction_id, \
                     last_global_position, events_handled, status, last_error, updated_at, parallel_stats \
                     FROM {} ORDER BY projection_name, partition_key",
                    self.table
                ),
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Checkpoint {
                    projection: r.try_get(0)?,
                    partition: r.try_get(1)?,
                    total_partitions: r.try_get(2)?,
                    cursor: Cursor::new(r.try_get::<_, Xid8>(3)?.0, r.try_get(4)?),
                    events_handled: r.try_get(5)?,
                    status: r.try_get(6)?,
                    last_error: r.try_get(7)?,
                    updated_at: r.try_get(8)?,
                    parallel: r.try_get(9)?,
                })
            })
            .collect()
    }

    /// Deletes the rows of `name` (one partition, or all). Returns how many.
    pub(crate) async fn delete<C: GenericClient>(
        &self,
        client: &C,
        name: &str,
        partition: Option<i32>,
    ) -> Result<u64> {
        Ok(client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE projection_name = $1 AND ($2::int4 IS NULL OR partition_key = $2)",
                    self.table
                ),
                &[&name, &partition],
            )
            .await?)
    }

    /// Pauses `name` (one partition, or all): sets `status = 'stopped'` on
    /// its rows that are not stopped yet (a failed row keeps its error, so
    /// `status` still shows why it had failed). Returns how many rows
    /// exist for the selection and how many were paused now.
    pub(crate) async fn pause<C: GenericClient>(
        &self,
        client: &C,
        name: &str,
        partition: Option<i32>,
    ) -> Result<(u64, u64)> {
        let paused = client
            .execute(
                &format!(
                    "UPDATE {} SET status = 'stopped', updated_at = now() \
                     WHERE projection_name = $1 AND ($2::int4 IS NULL OR partition_key = $2) \
                       AND status <> 'stopped'",
                    self.table
                ),
                &[&name, &partition],
            )
            .await?;
        let rows: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE projection_name = $1 AND ($2::int4 IS NULL OR partition_key = $2)",
                    self.table
                ),
                &[&name, &partition],
            )
            .await?
            .try_get(0)?;
        Ok((rows.max(0) as u64, paused))
    }

    /// Puts the failed or paused rows of `name` (one partition, or all) back
    /// to `running`, clearing the failure. Returns the rows changed.
    pub(crate) async fn resume<C: GenericClient>(
        &self,
        client: &C,
        name: &str,
        partition: Option<i32>,
    ) -> Result<u64> {
        Ok(client
            .execute(
                &format!(
                    "UPDATE {} SET status = 'running', last_error = NULL, failed_position = NULL, \
                     updated_at = now() \
                     WHERE projection_name = $1 AND ($2::int4 IS NULL OR partition_key = $2) \
                       AND status IN ('failed', 'stopped')",
                    self.table
                ),
                &[&name, &partition],
            )
            .await?)
    }
}

/// Rolls back the transaction a plain client opened with `BEGIN` when the
/// future using it is dropped before it ended the transaction (as
/// `tokio_postgres::Transaction` does on drop): the `ROLLBACK` is queued on
/// the connection at once, so the pooled connection never goes back to the
/// pool inside a transaction that holds locks.
struct RollbackOnDrop<'a, C: GenericClient>(&'a C);

impl<C: GenericClient> Drop for RollbackOnDrop<'_, C> {
    fn drop(&mut self) {
        // The request is sent on the first poll; the reply is not awaited.
        let _ = futures_util::FutureExt::now_or_never(self.0.batch_execute("ROLLBACK"));
    }
}
