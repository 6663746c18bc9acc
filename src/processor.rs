//! The batch loop of one projection slot (projection, partition): read a
//! page gap-safely after the cursor, hand it to the projection, move the
//! checkpoint with a compare-and-set, commit — all in one transaction.
//!
//! Architecture invariant: this is the only module that opens batch
//! transactions; the handler's writes and the checkpoint advance always
//! commit together.

use crate::checkpoint::Checkpoints;
use crate::error::{Error, Kind, Result};
use crate::event::{Cursor, StoredEvent, Xid8};
use crate::policy::OnFailure;
use crate::projection::Projection;
use crate::store::{gap_safe_query, read_page, ReadFilter, Statements};
use deadpool_postgres::Pool;
use std::sync::Arc;

/// Writes dead letters of one slot.
#[derive(Clone, Debug)]
pub(crate) struct DeadLetterSink {
    table: String,
    name: String,
    partition: i32,
}

impl DeadLetterSink {
    /// Records `event` as dead (or raises its attempt count when it already is).
    pub(crate) async fn insert<C: tokio_postgres::GenericClient>(
        &self,
        client: &C,
        event: &StoredEvent,
        error: &Error,
        attempts: u32,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (projection_name, partition_key, global_position, transaction_id, \
                     event_id, aggregate_type, aggregate_id, event_type, error, attempts) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (projection_name, event_id) DO UPDATE SET error = excluded.error, \
                     attempts = dead_letters.attempts + excluded.attempts, last_attempt_at = now()",
                    self.table
                ),
                &[
                    &self.name,
                    &self.partition,
                    &event.global_position,
                    &Xid8(event.transaction_id),
                    &event.event_id,
                    &event.aggregate_type,
                    &event.aggregate_id,
                    &event.event_type,
                    &error.to_string(),
                    &(attempts as i32),
                ],
            )
            .await?;
        Ok(())
    }
}

/// Errors that the failure policy handles (the handler failed); the rest
/// (connection lost, fenced) are retried or end the slot as they are.
fn is_handler_failure(e: &Error) -> bool {
    !e.is_connection() && !e.is_fenced() && !e.is_failed()
}

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
    checkpoints_table: String,
    dead_letters: String,
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
    /// The server's start time when this processor last read; a change
    /// means a restart, after which only the durable checkpoint is trusted.
    server_started: Option<chrono::DateTime<chrono::Utc>>,
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
        let read_sql = gap_safe_query(&sql.events, &filter);
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
            checkpoints_table: sql.checkpoints.clone(),
            dead_letters: sql.dead_letters.clone(),
            slot,
            batch_size,
            fence,
            cursor,
            read_cursor: cursor,
            persisted_head: 0,
            server_started: None,
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
    /// When the handler fails, the batch is re-run event by event to find
    /// the failing event, the good events before it are committed, and the
    /// projection's [`FailurePolicy`](crate::FailurePolicy) decides the
    /// rest (see [`Processor::isolate`]).
    pub(crate) async fn run_batch(&mut self) -> Result<BatchOutcome> {
        let started = std::time::Instant::now();
        let outcome = self.batch().await;
        if let Ok(o) = &outcome {
            if o.handled > 0 {
                let partition = self.slot.partition.to_string();
                crate::metrics::with(|m| {
                    m.batch_duration
                        .with_label_values(&[self.name.as_str()])
                        .observe(started.elapsed().as_secs_f64());
                    m.events_handled
                        .with_label_values(&[self.name.as_str(), partition.as_str(), "ok"])
                        .inc_by(o.handled as u64);
                });
            }
        }
        outcome
    }

    fn count(&self, result: &str, n: u64) {
        let partition = self.slot.partition.to_string();
        crate::metrics::with(|m| {
            m.events_handled
                .with_label_values(&[self.name.as_str(), partition.as_str(), result])
                .inc_by(n)
        });
    }

    async fn batch(&mut self) -> Result<BatchOutcome> {
        let mut client = self.pool.get().await?;
        let read = client.prepare_cached(&self.read_sql).await?;
        let tx = client.transaction().await?;
        let page = read_page(&*tx, &read, self.read_cursor, self.batch_size, &self.filter).await?;
        if self
            .server_started
            .is_some_and(|s| s != page.server_started)
        {
            // The server restarted: commits not yet durable were lost and
            // their transaction ids may be handed out again, so the cursor in
            // memory (and any watermark it came from) is void. Resume from
            // the durable checkpoint.
            drop(tx);
            self.server_started = Some(page.server_started);
            self.reload(&client).await?;
            tracing::warn!(projection = %self.name, partition = self.slot.partition, cursor = %self.cursor,
                "the database restarted; resuming from the stored checkpoint");
            return Ok(BatchOutcome {
                handled: 0,
                caught_up: false,
                watermark: 0,
                cursor: self.cursor,
            });
        }
        self.server_started = Some(page.server_started);
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
            let handler_started = std::time::Instant::now();
            let handled = self.projection.handle_batch(&page.events, &tx).await;
            crate::metrics::with(|m| {
                m.handler_duration
                    .with_label_values(&[self.name.as_str()])
                    .observe(handler_started.elapsed().as_secs_f64())
            });
            if let Err(e) = handled {
                if !is_handler_failure(&e) {
                    return Err(e);
                }
                drop(tx);
                drop(client);
                tracing::warn!(projection = %self.name, partition = self.slot.partition, error = %e,
                    events = page.events.len(), "batch failed; re-running its events one by one");
                return self.isolate(page.events, page.watermark).await;
            }
        }
        let handled = page.events.len();
        self.advance(&tx, next, handled).await?;
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

    /// Moves the checkpoint from `self.cursor` to `next` inside `tx` (the
    /// compare-and-set, fenced in worker mode).
    async fn advance(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        next: Cursor,
        handled: usize,
    ) -> Result<()> {
        let advance = tx
            .prepare_cached(self.checkpoints.advance_sql(self.fence.is_some()))
            .await?;
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
        Ok(())
    }

    /// Commits `events` (handled one by one in savepoints) up to the first
    /// failing one, then retries that event alone with backoff, then applies
    /// the failure policy: dead-letter it and go on, or stop the slot.
    async fn isolate(&mut self, events: Vec<StoredEvent>, watermark: u64) -> Result<BatchOutcome> {
        let policy = self.projection.failure_policy();
        // Pass 1: the good prefix.
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut done = 0usize;
        let mut poison: Option<(usize, Error)> = None;
        for (i, event) in events.iter().enumerate() {
            tx.batch_execute("SAVEPOINT projectionist_event").await?;
            match self
                .projection
                .handle_batch(std::slice::from_ref(event), &tx)
                .await
            {
                Ok(()) => {
                    tx.batch_execute("RELEASE SAVEPOINT projectionist_event")
                        .await?;
                    done += 1;
                }
                Err(e) if is_handler_failure(&e) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT projectionist_event")
                        .await?;
                    poison = Some((i, e));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let Some((index, mut error)) = poison else {
            // Every event succeeded on its own: commit them all.
            let next = events
                .last()
                .map(StoredEvent::cursor)
                .unwrap_or(self.cursor);
            self.advance(&tx, next, done).await?;
            tx.commit().await?;
            self.cursor = next;
            self.read_cursor = next;
            return Ok(BatchOutcome {
                handled: done,
                caught_up: false,
                watermark,
                cursor: next,
            });
        };
        if done > 0 {
            let next = events[done - 1].cursor();
            self.advance(&tx, next, done).await?;
            tx.commit().await?;
            self.cursor = next;
            self.read_cursor = next;
        } else {
            drop(tx);
        }
        drop(client);
        // Pass 2: the failing event alone, with backoff between attempts
        // (no transaction is held open while waiting).
        let event = &events[index];
        let mut attempts = 1u32;
        while attempts < policy.attempts {
            attempts += 1;
            tokio::time::sleep(policy.delay_before(attempts)).await;
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            match self
                .projection
                .handle_batch(std::slice::from_ref(event), &tx)
                .await
            {
                Ok(()) => {
                    self.advance(&tx, event.cursor(), 1).await?;
                    tx.commit().await?;
                    self.cursor = event.cursor();
                    self.read_cursor = event.cursor();
                    tracing::info!(projection = %self.name, position = event.global_position, attempts,
                        "event succeeded on retry");
                    return Ok(BatchOutcome {
                        handled: done + 1,
                        caught_up: false,
                        watermark,
                        cursor: event.cursor(),
                    });
                }
                Err(e) if is_handler_failure(&e) => {
                    self.count("error", 1);
                    error = e
                }
                Err(e) => return Err(e),
            }
        }
        match policy.on_failure {
            OnFailure::DeadLetter => {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                self.sink().insert(&*tx, event, &error, attempts).await?;
                self.advance(&tx, event.cursor(), 0).await?;
                tx.commit().await?;
                self.cursor = event.cursor();
                self.read_cursor = event.cursor();
                self.count("dead_letter", 1);
                tracing::error!(projection = %self.name, partition = self.slot.partition,
                    position = event.global_position, event_type = %event.event_type, attempts, error = %error,
                    "event dead-lettered; processing continues");
                Ok(BatchOutcome {
                    handled: done,
                    caught_up: false,
                    watermark,
                    cursor: event.cursor(),
                })
            }
            OnFailure::Stop => Err(self.stop_at(event, &error, attempts).await),
        }
    }

    pub(crate) fn projection(&self) -> &Arc<dyn Projection> {
        &self.projection
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Reads up to `limit` events after `after` (no transaction), checking
    /// for a server restart: `Ok(None)` means the server restarted and the
    /// cursor was reloaded from the checkpoint.
    pub(crate) async fn fetch(
        &mut self,
        after: Cursor,
        limit: i64,
    ) -> Result<Option<crate::store::ReadBatch>> {
        let client = self.pool.get().await?;
        let read = client.prepare_cached(&self.read_sql).await?;
        let page = read_page(&**client, &read, after, limit, &self.filter).await?;
        if self
            .server_started
            .is_some_and(|s| s != page.server_started)
        {
            self.server_started = Some(page.server_started);
            self.reload(&client).await?;
            return Ok(None);
        }
        self.server_started = Some(page.server_started);
        Ok(Some(page))
    }

    /// Moves the checkpoint to `next` in a transaction of its own (the
    /// compare-and-set, fenced in worker mode), with `stats` for `status`.
    pub(crate) async fn commit_to(
        &mut self,
        next: Cursor,
        handled: usize,
        stats: &serde_json::Value,
    ) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        self.advance(&tx, next, handled).await?;
        let save = tx
            .prepare_cached(&format!(
                "UPDATE {} SET parallel_stats = $3 WHERE projection_name = $1 AND partition_key = $2",
                self.checkpoints_table
            ))
            .await?;
        tx.execute(&save, &[&self.name, &self.slot.partition, stats])
            .await?;
        tx.commit().await?;
        self.cursor = next;
        self.read_cursor = next;
        Ok(())
    }

    /// A handle for dead-lettering this slot's events.
    pub(crate) fn sink(&self) -> DeadLetterSink {
        DeadLetterSink {
            table: self.dead_letters.clone(),
            name: self.name.clone(),
            partition: self.slot.partition,
        }
    }

    /// Puts the slot in the `failed` state at `event` (failure policy
    /// Stop) and returns the error that stops its loop.
    pub(crate) async fn stop_at(&self, event: &StoredEvent, error: &Error, attempts: u32) -> Error {
        let message = format!(
            "projection {} partition {} stopped at global position {} ({} {} v{}, {}) after {attempts} \
             attempt(s): {error}. Fix the handler or the data, then run `resume {}` (or restart)",
            self.name,
            self.slot.partition,
            event.global_position,
            event.aggregate_type,
            event.aggregate_id,
            event.aggregate_version,
            event.event_type,
            self.name
        );
        let marked = async {
            let client = self.pool.get().await?;
            client
                .execute(
                    &format!(
                        "UPDATE {} SET status = 'failed', last_error = $3, failed_position = $4, \
                         updated_at = now() WHERE projection_name = $1 AND partition_key = $2",
                        self.checkpoints_table
                    ),
                    &[
                        &self.name,
                        &self.slot.partition,
                        &message,
                        &event.global_position,
                    ],
                )
                .await?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = marked {
            return e;
        }
        tracing::error!(projection = %self.name, partition = self.slot.partition,
            position = event.global_position, "projection failed and stopped: {message}");
        Error::new(Kind::Failed, message)
    }

    /// Reloads the cursor from the checkpoint row (after a server restart,
    /// or when another runner moved it).
    pub(crate) async fn reload(&mut self, client: &deadpool_postgres::Object) -> Result<()> {
        let row = client
            .query_one(
                &format!(
                    "SELECT last_transaction_id, last_global_position FROM {} \
                     WHERE projection_name = $1 AND partition_key = $2",
                    self.checkpoints_table
                ),
                &[&self.name, &self.slot.partition],
            )
            .await?;
        self.cursor = Cursor::new(row.try_get::<_, Xid8>(0)?.0, row.try_get(1)?);
        self.read_cursor = self.cursor;
        self.persisted_head = 0;
        Ok(())
    }

    /// [`Processor::reload`] on a pooled connection.
    pub(crate) async fn reload_checkpoint(&mut self) -> Result<()> {
        let client = self.pool.get().await?;
        self.reload(&client).await
    }

    /// Whether this processor runs under worker-mode fencing.
    pub(crate) fn is_fenced_slot(&self) -> bool {
        self.fence.is_some()
    }

    /// Whether the slot's checkpoint is back in the `running` state (after
    /// `resume`).
    pub(crate) async fn resumed(&self) -> Result<bool> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT status FROM {} WHERE projection_name = $1 AND partition_key = $2",
                    self.checkpoints_table
                ),
                &[&self.name, &self.slot.partition],
            )
            .await?;
        Ok(row.is_none_or(|r| r.get::<_, String>(0) == "running"))
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
