//! The batch loop of one projection slot (projection, partition): read a
//! page gap-safely after the cursor, hand it to the projection, move the
//! checkpoint with a compare-and-set, commit — all in one transaction.
//!
//! Architecture invariant: this is the only module that opens batch
//! transactions; the handler's writes and the checkpoint advance always
//! commit together.

use crate::checkpoint::Checkpoints;
use crate::error::{Error, Result};
use crate::event::{Cursor, Xid8};
use crate::projection::Projection;
use crate::store::{gap_safe_query, read_page, ReadFilter, Statements};
use deadpool_postgres::Pool;
use std::sync::Arc;

/// A unit of work: one partition of one projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Slot {
    pub(crate) partition: i32,
    pub(crate) total: i32,
}

/// Worker-mode fencing: the batch commits only while the slot's assignment
/// row still names this worker with this generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fence {
    pub(crate) worker_id: String,
    pub(crate) generation: i64,
}

/// What one batch did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchOutcome {
    /// Events handed to the handler.
    pub(crate) handled: usize,
    /// The page was not full: nothing more is readable right now.
    pub(crate) caught_up: bool,
    /// The watermark the page was read below.
    pub(crate) watermark: u64,
    /// The cursor after the batch.
    pub(crate) cursor: Cursor,
}

/// Processes one slot.
pub(crate) struct Processor {
    projection: Arc<dyn Projection>,
    name: String,
    pool: Pool,
    read_sql: String,
    filter: ReadFilter,
    checkpoints: Checkpoints,
    slot: Slot,
    batch_size: i64,
    fence: Option<Fence>,
    /// The cursor stored in the checkpoint row.
    cursor: Cursor,
    /// The cursor reads resume from: ahead of `cursor` when empty pages
    /// advanced it without a write.
    read_cursor: Cursor,
    /// The log head at the last checkpoint write.
    persisted_head: i64,
}

impl Processor {
    /// Loads (or creates) the slot's checkpoint, refusing a partition count
    /// that differs from the stored one.
    pub(crate) async fn start(
        projection: Arc<dyn Projection>,
        pool: Pool,
        sql: &Statements,
        slot: Slot,
        batch_size: i64,
        fence: Option<Fence>,
    ) -> Result<Processor> {
        let name = projection.name().to_owned();
        let f = projection.filter();
        let filter = ReadFilter {
            aggregate_types: f.aggregate_types,
            event_types: f.event_types,
            partition: (slot.total > 1).then_some((slot.partition, slot.total)),
        };
        let read_sql = gap_safe_query(&sql.events, &sql.partition_fn, &filter);
        let checkpoints = Checkpoints::with_assignments(&sql.checkpoints, &sql.assignments);
        let client = pool.get().await?;
        let cursor = checkpoints
            .ensure(&**client, &name, slot.partition, slot.total)
            .await?;
        Ok(Processor {
            projection,
            name,
            pool,
            read_sql,
            filter,
            checkpoints,
            slot,
            batch_size,
            fence,
            cursor,
            read_cursor: cursor,
            persisted_head: 0,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn slot(&self) -> Slot {
        self.slot
    }

    pub(crate) fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Runs one batch. A rolled-back batch leaves the cursor where it was.
    pub(crate) async fn run_batch(&mut self) -> Result<BatchOutcome> {
        let mut client = self.pool.get().await?;
        let read = client.prepare_cached(&self.read_sql).await?;
        let advance = client
            .prepare_cached(self.checkpoints.advance_sql(self.fence.is_some()))
            .await?;
        let tx = client.transaction().await?;
        let page = read_page(&*tx, &read, self.read_cursor, self.batch_size, &self.filter).await?;
        let caught_up = (page.events.len() as i64) < self.batch_size;
        let next = page.next_cursor;
        if page.events.is_empty() && (next <= self.cursor || page.head <= self.persisted_head) {
            // Nothing handled and no new event was skipped since the last
            // write: move on in memory only (a write here would move the
            // watermark and wake every processor again).
            drop(tx);
            self.read_cursor = next;
            return Ok(BatchOutcome {
                handled: 0,
                caught_up,
                watermark: page.watermark,
                cursor: self.cursor,
            });
        }
        if !page.events.is_empty() {
            self.projection
                .handle_batch(&page.events, &tx)
                .await
                .map_err(|e| {
                    let first = page.events.first().map(|e| e.global_position).unwrap_or(0);
                    let last = page.events.last().map(|e| e.global_position).unwrap_or(0);
                    e.context(format!(
                        "projection {} partition {} failed on a batch of {} events (global positions {first}..{last})",
                        self.name,
                        self.slot.partition,
                        page.events.len()
                    ))
                })?;
        }
        let handled = page.events.len();
        let old_tx = Xid8(self.cursor.transaction_id);
        let new_tx = Xid8(next.transaction_id);
        let handled_i64 = handled as i64;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &self.name,
            &self.slot.partition,
            &old_tx,
            &self.cursor.global_position,
            &new_tx,
            &next.global_position,
            &handled_i64,
        ];
        if let Some(f) = &self.fence {
            params.push(&f.worker_id);
            params.push(&f.generation);
        }
        let moved = tx.execute(&advance, &params).await?;
        if moved != 1 {
            let why = match &self.fence {
                Some(f) => format!(
                    "the slot is no longer assigned to worker {} (generation {}), or its checkpoint moved \
                     from {}",
                    f.worker_id, f.generation, self.cursor
                ),
                None => format!(
                    "the checkpoint is no longer at {} (another runner moved or reset it)",
                    self.cursor
                ),
            };
            return Err(Error::fenced(format!(
                "projection {} partition {}: {why}; this runner stops processing the slot and its batch \
                 was rolled back",
                self.name, self.slot.partition
            )));
        }
        tx.commit().await?;
        self.cursor = next;
        self.read_cursor = next;
        self.persisted_head = page.head;
        Ok(BatchOutcome {
            handled,
            caught_up,
            watermark: page.watermark,
            cursor: next,
        })
    }

    /// Records `error` on the checkpoint row (best effort).
    pub(crate) async fn record_error(&self, error: &Error) {
        if let Ok(client) = self.pool.get().await {
            let _ = self
                .checkpoints
                .record_error(
                    &**client,
                    &self.name,
                    self.slot.partition,
                    &error.to_string(),
                )
                .await;
        }
    }
}
