//! One projection slot's durable state and its sequential batch: read a
//! page gap-safely after the cursor, hand it to the projection, move the
//! checkpoint with a compare-and-set, commit — the handler's writes and the
//! checkpoint in one transaction. While a batch is handled and commits, the
//! next page is read ahead on another connection ([`Prefetch`]).
//!
//! Every page also reads the crash sentinel and the slot's own checkpoint
//! row, so the processor notices, before it handles anything, that the
//! server lost recent commits (crash recovery, immediate restart, failover,
//! restore: the sentinel is an unlogged table), that its checkpoint was
//! deleted (`reset`), moved by someone else, or paused/failed. After a lost
//! commit it drops every in-memory cursor and moves the stored cursor back
//! to the last event it handled: every event after that one in cursor
//! order was written after the cursor passed, so it can only be new.
//!
//! Architecture invariant: this module and `parallel.rs` (its checkpoint
//! commits) are the only ones that open batch transactions; the handler's
//! writes and the checkpoint advance always commit together.

use crate::checkpoint::Checkpoints;
use crate::error::{Error, Kind, Result};
use crate::event::{Cursor, StoredEvent, Xid8};
use crate::otel;
use crate::page::{Control, PageReader, ReadBatch, ReadFilter, SlotTables};
use crate::policy::OnFailure;
use crate::projection::UnknownEvents;
use crate::registered::Registered;
use crate::registry::Registry;
use crate::store::Statements;
use deadpool_postgres::Pool;
use futures_util::FutureExt;
use std::future::Future;
use std::sync::Arc;
use tracing::{Instrument, Span};
use uuid::Uuid;

/// Runs a handler future, turning a panic into a handler error so that the
/// failure policy applies to it like to any other handler failure.
pub(crate) async fn guarded<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    match std::panic::AssertUnwindSafe(f).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_owned());
            Err(Error::handler_msg(format!("the handler panicked: {what}")))
        }
    }
}

/// Writes dead letters of one slot.
#[derive(Clone, Debug)]
pub(crate) struct DeadLetterSink {
    table: String,
    name: String,
    partition: i32,
    /// Worker mode: the assignments table and this runner's fence.
    fence: Option<(String, Fence)>,
}

impl DeadLetterSink {
    /// Records `event` as dead in a transaction of its own, fenced in
    /// worker mode (concurrency mode, whose dead letters are not part of a
    /// batch transaction).
    pub(crate) async fn insert_fenced(
        &self,
        pool: &Pool,
        event: &StoredEvent,
        error: &Error,
        attempts: u32,
    ) -> Result<()> {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        if let Some((assignments, f)) = &self.fence {
            let owned = tx
                .query_opt(
                    &format!(
                        "SELECT 1 FROM {assignments} WHERE projection_name = $1 AND partition_key = $2 \
                         AND worker_id = $3 AND generation = $4 FOR SHARE"
                    ),
                    &[&self.name, &self.partition, &f.worker_id, &f.generation],
                )
                .await?;
            if owned.is_none() {
                return Err(Error::fenced(format!(
                    "projection {} partition {}: the slot is no longer assigned to worker {} (generation {}); \
                     the dead letter was not written",
                    self.name, self.partition, f.worker_id, f.generation
                )));
            }
        }
        self.insert(&*tx, event, error, attempts).await?;
        tx.commit().await?;
        Ok(())
    }

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

/// Why a page was not handled: the processor's view of its slot was stale.
#[derive(Debug)]
enum Interrupt {
    /// Recent commits may have been lost (the reason is logged).
    LostCommits(&'static str),
    /// The row has no epoch yet (new, or older than migration V6): record
    /// the current one (after the same rewind, which is always safe).
    Adopt,
    /// The checkpoint row is gone (`reset`, `forget`).
    Missing,
    /// Someone else moved the stored cursor.
    Moved(Cursor),
    /// The slot is paused (`stopped`) or `failed`.
    Held(String),
}

/// Refuses to (re)build a retired version: `retire` dropped its state on
/// purpose, and a binary still running it must not bring it back.
async fn refuse_retired<C: tokio_postgres::GenericClient>(
    client: &C,
    versions_table: &str,
    projection: &Registered,
) -> Result<()> {
    if crate::versions::is_retired(
        client,
        versions_table,
        projection.name(),
        projection.version(),
    )
    .await?
    {
        return Err(Error::new(
            Kind::Failed,
            format!(
                "version {} of projection {} was retired: its checkpoints and tables are gone on purpose. \
                 Stop this binary or deploy one with the live version",
                projection.version(),
                projection.name()
            ),
        ));
    }
    Ok(())
}

/// The crash epoch for which the "lost commits" warning was logged, so
/// that it is logged once per restart, not once per slot.
static ANNOUNCED_EPOCH: std::sync::Mutex<Option<Uuid>> = std::sync::Mutex::new(None);

/// What the slot's row says.
struct Row {
    cursor: Cursor,
    last_event: Cursor,
    epoch: Option<Uuid>,
}

/// A page's events made ready for the handler by [`Processor::prepare`].
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The events to hand over, upcast, in order.
    pub(crate) events: Vec<StoredEvent>,
    /// Events of `events` whose upcast failed (by index, ascending), left
    /// as stored: the failure policy applies to them as to a handler error.
    pub(crate) broken: Vec<(usize, Error)>,
    /// The cursor of the last event before `unknown` (handed over or
    /// passed over), if any.
    pub(crate) through: Option<Cursor>,
    /// Events passed over (`UnknownEvents::Ignore`): complete at once.
    pub(crate) passed_over: Vec<Cursor>,
    /// The first event the registry does not know, when the projection
    /// stops on it, and the operator's message: nothing from it on is in
    /// `events`.
    pub(crate) unknown: Option<(StoredEvent, String)>,
}

/// A page read ahead, on a connection of its own, while the batch before it
/// is handled and commits: the engine's reads overlap its commits, which a
/// read-handle-commit loop cannot do. Used only when that batch committed
/// (the read cursor is then `after`); dropped, and its read cancelled,
/// otherwise. Safe because nothing about the page is trusted without the
/// batch's compare-and-set: it moves the checkpoint only from the cursor
/// the processor holds, only while the slot runs, and only while the crash
/// sentinel holds the epoch the page was read in.
struct Prefetch {
    /// The cursor the page is read after.
    after: Cursor,
    /// The stored cursor when the read started: the page's control columns
    /// may show it, from before the processor's own commit moved it.
    from: Cursor,
    task: tokio::task::JoinHandle<Result<(ReadBatch, Control)>>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Processes one slot.
pub(crate) struct Processor {
    projection: Registered,
    /// The store's event registry (upcasting, unknown events).
    registry: Option<Arc<Registry>>,
    /// What the projection does with unknown events.
    unknown_events: UnknownEvents,
    name: String,
    pool: Pool,
    /// Reads this slot's pages (shared with its read-ahead task).
    reader: Arc<PageReader>,
    checkpoints: Checkpoints,
    checkpoints_table: String,
    assignments_table: String,
    epoch_table: String,
    versions_table: String,
    dead_letters: String,
    slot: Slot,
    batch_size: i64,
    fence: Option<Fence>,
    /// The cursor stored in the checkpoint row.
    cursor: Cursor,
    /// The cursor reads resume from: ahead of `cursor` when empty pages
    /// advanced it without a write.
    read_cursor: Cursor,
    /// The cursor of the last event handled (stored with the checkpoint):
    /// where the cursor goes back to after lost commits.
    last_event: Cursor,
    /// The crash epoch the cursors belong to (`None`: not known yet).
    epoch: Option<Uuid>,
    /// The server's start time when this processor last read.
    server_started: Option<chrono::DateTime<chrono::Utc>>,
    /// The highest watermark read below; one lower than this means the
    /// server is not the one the cursors were read from.
    last_watermark: u64,
    /// The next page, read ahead while the current batch commits.
    prefetch: Option<Prefetch>,
}

impl Processor {
    /// Loads (or creates) the slot's checkpoint, refusing a partition count
    /// that differs from the stored one.
    pub(crate) async fn start(
        projection: Registered,
        pool: Pool,
        sql: &Statements,
        slot: Slot,
        batch_size: i64,
        fence: Option<Fence>,
    ) -> Result<Processor> {
        let name = projection.key().to_owned();
        let f = projection.filter();
        let registry = sql.registry.clone();
        // A filter written with current type names also reads the events
        // stored under their old names.
        let event_types = match &registry {
            Some(r) => r.stored_names(&f.event_types),
            None => f.event_types,
        };
        let filter = ReadFilter {
            aggregate_types: f.aggregate_types,
            event_types,
            partition: (slot.total > 1).then_some((slot.partition, slot.total)),
        };
        let tables = SlotTables {
            checkpoints: sql.checkpoints.clone(),
            epoch: sql.epoch.clone(),
        };
        let mut reader = PageReader::new(
            &sql.events,
            filter,
            Some((&tables, &name, slot.partition)),
            projection.reads_metadata(),
        );
        if let Some(registry) = &registry {
            reader = reader.upcasting(registry.clone());
        }
        let reader = Arc::new(reader);
        let checkpoints = Checkpoints::for_slots(&sql.checkpoints, &sql.assignments, &sql.epoch);
        let client = pool.get().await?;
        refuse_retired(&**client, &sql.versions, &projection).await?;
        let cursor = checkpoints
            .ensure(&**client, &name, slot.partition, slot.total)
            .await?;
        let unknown_events = projection.unknown_events();
        let mut p = Processor {
            projection,
            registry,
            unknown_events,
            name,
            pool: pool.clone(),
            reader,
            checkpoints,
            checkpoints_table: sql.checkpoints.clone(),
            assignments_table: sql.assignments.clone(),
            epoch_table: sql.epoch.clone(),
            versions_table: sql.versions.clone(),
            dead_letters: sql.dead_letters.clone(),
            slot,
            batch_size,
            fence,
            cursor,
            read_cursor: cursor,
            last_event: cursor,
            epoch: None,
            server_started: None,
            last_watermark: 0,
            prefetch: None,
        };
        p.reload(&client).await?;
        Ok(p)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Sets aside a page's events whose upcast failed and applies the
    /// projection's [`UnknownEvents`] choice: passes over unknown events
    /// (`Ignore`), or cuts the page before the first one (the slot stops
    /// there once everything before it is committed). The page's reader
    /// upcast the events as it read them (the processor's reader upcasts
    /// whenever the store has a registry); `upcast_failed` is its
    /// [`Control::upcast_failed`].
    pub(crate) fn prepare(
        &self,
        events: Vec<StoredEvent>,
        upcast_failed: Vec<(usize, Error)>,
    ) -> Prepared {
        let mut prepared = Prepared {
            events: Vec::with_capacity(events.len()),
            broken: Vec::new(),
            through: None,
            passed_over: Vec::new(),
            unknown: None,
        };
        let Some(registry) = &self.registry else {
            prepared.through = events.last().map(StoredEvent::cursor);
            prepared.events = events;
            return prepared;
        };
        let strict = self.unknown_events != UnknownEvents::StopOnUnknownVersion;
        let mut failed = upcast_failed.into_iter().peekable();
        for (index, event) in events.into_iter().enumerate() {
            if let Some((_, e)) = failed.next_if(|(i, _)| *i == index) {
                prepared.broken.push((prepared.events.len(), e));
            } else if let Some(unknown) = registry.unknown(&event, strict) {
                if self.unknown_events == UnknownEvents::Ignore {
                    prepared.through = Some(event.cursor());
                    prepared.passed_over.push(event.cursor());
                    continue;
                }
                let message = unknown.describe(&event, &self.name);
                prepared.unknown = Some((event, message));
                return prepared;
            }
            prepared.through = Some(event.cursor());
            prepared.events.push(event);
        }
        prepared
    }

    pub(crate) fn slot(&self) -> Slot {
        self.slot
    }

    pub(crate) fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The cursor of the last event handled.
    pub(crate) fn last_event(&self) -> Cursor {
        self.last_event
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

    /// Whether this processor's view of the slot is stale, judged from a
    /// page's control columns.
    fn check(&self, page: &ReadBatch, control: &Control) -> Option<Interrupt> {
        let Some(epoch) = control.epoch else {
            return Some(Interrupt::LostCommits(
                "the crash sentinel is empty: PostgreSQL ran crash recovery (a backend was killed, an immediate \
                 shutdown, a promoted standby or a restored base backup)",
            ));
        };
        if self
            .server_started
            .is_some_and(|s| s != page.server_started)
        {
            return Some(Interrupt::LostCommits("the database server restarted"));
        }
        if page.watermark < self.last_watermark {
            return Some(Interrupt::LostCommits(
                "the watermark went backwards: transaction ids are being handed out again",
            ));
        }
        if self.epoch.is_some_and(|e| e != epoch) {
            return Some(Interrupt::LostCommits(
                "the crash epoch changed: PostgreSQL ran crash recovery",
            ));
        }
        let Some(stored) = &control.checkpoint else {
            return Some(Interrupt::Missing);
        };
        if stored.epoch.is_none() {
            return Some(Interrupt::Adopt);
        }
        if stored.epoch != Some(epoch) {
            return Some(Interrupt::LostCommits(
                "the checkpoint was written before PostgreSQL's last crash recovery",
            ));
        }
        if stored.status != "running" {
            return Some(Interrupt::Held(stored.status.clone()));
        }
        if stored.cursor != self.cursor {
            return Some(Interrupt::Moved(stored.cursor));
        }
        None
    }

    /// Brings the processor back in line with its slot after `why`.
    async fn resync(&mut self, client: &deadpool_postgres::Object, why: Interrupt) -> Result<()> {
        match why {
            Interrupt::Adopt => {
                let epoch = self.current_epoch(client).await?;
                self.rewind(client, epoch).await?;
                self.reload(client).await?;
                if self.epoch != Some(epoch) && self.fence.is_some() {
                    return Err(Error::fenced(format!(
                        "projection {} partition {}: the slot is no longer assigned to this worker",
                        self.name, self.slot.partition
                    )));
                }
                Ok(())
            }
            Interrupt::LostCommits(reason) => {
                let epoch = self.current_epoch(client).await?;
                let rewound = self.rewind(client, epoch).await?;
                let first = {
                    let mut announced = ANNOUNCED_EPOCH
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let first = *announced != Some(epoch);
                    *announced = Some(epoch);
                    first
                };
                if first {
                    tracing::warn!(epoch = %epoch, "{reason}; commits that were not yet on disk may be lost and their \
                        transaction ids handed out again, so every projection drops its in-memory cursors and moves \
                        its stored cursor back to the last event it handled (nothing is skipped or applied twice)");
                    crate::metrics::with(|m| m.lost_commits.inc());
                }
                self.reload(client).await?;
                if self.epoch != Some(epoch) {
                    if let Some(f) = &self.fence {
                        // The row is not this worker's to rewind any more.
                        return Err(Error::fenced(format!(
                            "projection {} partition {}: the slot is no longer assigned to worker {} \
                             (generation {}); its new owner moves the cursor back",
                            self.name, self.slot.partition, f.worker_id, f.generation
                        )));
                    }
                }
                tracing::info!(projection = %self.name, partition = self.slot.partition, cursor = %self.cursor,
                    rewound, "resuming after lost commits");
                Ok(())
            }
            Interrupt::Missing => {
                if self.fence.is_some() {
                    return Err(Error::fenced(format!(
                        "projection {} partition {}: the checkpoint was deleted (reset); this worker stops the slot",
                        self.name, self.slot.partition
                    )));
                }
                refuse_retired(&***client, &self.versions_table, &self.projection).await?;
                tracing::warn!(projection = %self.name, partition = self.slot.partition,
                    "the checkpoint was deleted (reset): rebuilding the projection from the start");
                self.checkpoints
                    .ensure(&***client, &self.name, self.slot.partition, self.slot.total)
                    .await?;
                self.reload(client).await
            }
            Interrupt::Moved(to) => {
                if let Some(f) = &self.fence {
                    return Err(Error::fenced(format!(
                        "projection {} partition {}: the checkpoint moved from {} to {} under worker {} \
                         (generation {}); this worker stops the slot",
                        self.name, self.slot.partition, self.cursor, to, f.worker_id, f.generation
                    )));
                }
                tracing::warn!(projection = %self.name, partition = self.slot.partition, from = %self.cursor, to = %to,
                    "the checkpoint moved under this process (a rewind, or another process running the same \
                     partition); continuing from the stored one");
                self.reload(client).await
            }
            Interrupt::Held(status) => {
                let what = if status == "stopped" {
                    "is paused"
                } else {
                    "has failed"
                };
                Err(Error::new(
                    Kind::Failed,
                    format!(
                        "projection {} partition {} {what} (state {status}); run `resume {}` to continue",
                        self.name, self.slot.partition, self.name
                    ),
                ))
            }
        }
    }

    /// The crash sentinel's epoch, writing a new one when crash recovery
    /// emptied it.
    async fn current_epoch(&self, client: &deadpool_postgres::Object) -> Result<Uuid> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (id, epoch) VALUES (1, gen_random_uuid()) ON CONFLICT (id) DO NOTHING",
                    self.epoch_table
                ),
                &[],
            )
            .await?;
        let row = client
            .query_one(
                &format!("SELECT epoch FROM {} WHERE id = 1", self.epoch_table),
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Moves the stored cursor back to the last handled event unless the
    /// row was already written in `epoch` (fenced in worker mode). Returns
    /// whether this call moved it.
    async fn rewind(&self, client: &deadpool_postgres::Object, epoch: Uuid) -> Result<bool> {
        let sql = self.checkpoints.rewind_sql(self.fence.is_some());
        let params = self.fenced_params(vec![&self.name, &self.slot.partition, &epoch]);
        let n = client.execute(sql.as_str(), &params).await?;
        Ok(n == 1)
    }

    async fn batch(&mut self) -> Result<BatchOutcome> {
        // The read ahead first, holding no connection: it may be waiting
        // for one itself.
        let ahead = self.take_read_ahead().await;
        let mut client = self.pool.get().await?;
        let (mut page, control) = match ahead {
            Some(page) => page,
            None => self.read_now(&client).await?,
        };
        if let Some(why) = self.check(&page, &control) {
            self.server_started = Some(page.server_started);
            self.resync(&client, why).await?;
            return Ok(BatchOutcome {
                handled: 0,
                caught_up: false,
                watermark: 0,
                cursor: self.cursor,
            });
        }
        self.server_started = Some(page.server_started);
        self.last_watermark = page.watermark;
        // The row is of the current epoch and at this processor's cursor:
        // its epoch is this processor's too (never write a NULL epoch).
        if self.epoch.is_none() {
            self.epoch = control.epoch;
        }
        let mut caught_up = (page.events.len() as i64) < self.batch_size;
        let mut next = page.next_cursor;
        let prepared = self.prepare(std::mem::take(&mut page.events), control.upcast_failed);
        page.events = prepared.events;
        // The last event handled or passed over (`UnknownEvents::Ignore`):
        // stored as the last event dealt with, so that status never takes
        // passed-over events for skipped ones.
        let mut dealt_with = prepared.through;
        if let Some((index, error)) = prepared.broken.into_iter().next() {
            // An upcaster failed: handle what comes before the event, then
            // the failure policy decides about it (on the next batch).
            if index == 0 {
                drop(client);
                self.count("error", 1);
                let event = page.events.swap_remove(0);
                return self.give_up(&event, error, 1, 0, page.watermark).await;
            }
            page.events.truncate(index);
            next = page.events[index - 1].cursor();
            dealt_with = Some(next);
            caught_up = false;
        } else if let Some((event, message)) = prepared.unknown {
            // Handle what comes before the unknown event; stop at it when
            // it heads the page.
            match prepared.through {
                Some(through) if !page.events.is_empty() => {
                    next = through;
                    caught_up = false;
                }
                _ => {
                    drop(client);
                    return Err(self.stop_unknown(&event, &message).await);
                }
            }
        }
        if dealt_with.is_none() && (next <= self.cursor || !control.passed) {
            // Nothing handled or passed over by the registry, and no event
            // passed over by the filter or the partition: move on in memory
            // only (a write here would move the watermark and wake every
            // processor again). Earlier pages skipped this way passed over
            // nothing either, so the stored cursor is behind no event; once
            // a page passes over one, the cursor is written past it, so that
            // waiters for it (`Waiter`) see the slot pass it.
            self.read_cursor = next;
            return Ok(BatchOutcome {
                handled: 0,
                caught_up,
                watermark: page.watermark,
                cursor: self.cursor,
            });
        }
        let last_event = dealt_with.unwrap_or(self.last_event);
        if !caught_up {
            // More follows: read the next page on another connection while
            // this batch is handled and commits.
            self.start_prefetch(next);
        }
        let tx = client.transaction().await?;
        // Feature `otel`: a batch span and one span per event (none when
        // traces are off, or for a page with no event to handle).
        let span = otel::batch_span(&otel::BatchStart {
            projection: self.projection.name(),
            partition: self.slot.partition,
            version: self.projection.version(),
            mode: "sequential",
            cursor_before: self.cursor,
            watermark: page.watermark,
            events: &page.events,
        });
        if !page.events.is_empty() {
            let handler_started = std::time::Instant::now();
            let event_spans = otel::event_spans(&span, self.projection.name(), &page.events);
            let handled = guarded(self.projection.handle_batch(&page.events, &tx))
                .instrument(span.clone())
                .await;
            drop(event_spans);
            crate::metrics::with(|m| {
                m.handler_duration
                    .with_label_values(&[self.name.as_str()])
                    .observe(handler_started.elapsed().as_secs_f64())
            });
            if let Err(e) = handled {
                otel::fail(&span, &e);
                if !is_handler_failure(&e) {
                    return Err(e);
                }
                drop(tx);
                drop(client);
                tracing::warn!(projection = %self.name, partition = self.slot.partition, error = %e,
                    events = page.events.len(), "batch failed; re-running its events one by one");
                let outcome = self
                    .isolate(page.events, page.watermark)
                    .instrument(span.clone())
                    .await;
                if let Ok(o) = &outcome {
                    otel::finish_batch(&span, o.cursor, o.handled);
                }
                return outcome;
            }
        }
        let handled = page.events.len();
        let committed = async {
            self.advance(&tx, next, handled, last_event).await?;
            tx.commit().await?;
            Ok::<(), Error>(())
        }
        .instrument(span.clone())
        .await;
        if let Err(e) = &committed {
            otel::fail(&span, e);
        }
        committed?;
        otel::finish_batch(&span, next, handled);
        self.moved_to(next, last_event);
        Ok(BatchOutcome {
            handled,
            caught_up,
            watermark: page.watermark,
            cursor: next,
        })
    }

    /// Starts reading the page after `after` on a connection of its own
    /// (see [`Prefetch`]).
    fn start_prefetch(&mut self, after: Cursor) {
        let (pool, reader, limit) = (self.pool.clone(), self.reader.clone(), self.batch_size);
        let task = tokio::spawn(async move { reader.read(&pool.get().await?, after, limit).await });
        self.prefetch = Some(Prefetch {
            after,
            from: self.cursor,
            task,
        });
    }

    /// The page read ahead, if it was read from the read cursor (its batch
    /// committed) and the read succeeded; a failed read ahead is read again
    /// by [`Processor::read_now`], where a lasting error is reported.
    async fn take_read_ahead(&mut self) -> Option<(ReadBatch, Control)> {
        let mut ahead = self.prefetch.take()?;
        if ahead.after != self.read_cursor {
            return None;
        }
        let Ok(Ok((page, mut control))) = (&mut ahead.task).await else {
            return None;
        };
        // Read before this processor's own commit moved the stored cursor
        // from `from` to where it is now.
        if let Some(stored) = control.checkpoint.as_mut() {
            if stored.cursor == ahead.from {
                stored.cursor = self.cursor;
            }
        }
        Some((page, control))
    }

    /// Reads the page after the read cursor on `client`.
    async fn read_now(&self, client: &deadpool_postgres::Object) -> Result<(ReadBatch, Control)> {
        self.reader
            .read(client, self.read_cursor, self.batch_size)
            .await
    }

    /// Records a committed move of the checkpoint.
    fn moved_to(&mut self, next: Cursor, last_event: Cursor) {
        self.cursor = next;
        self.read_cursor = next;
        self.last_event = last_event;
    }

    /// Moves the checkpoint from `self.cursor` to `next` inside `tx` (the
    /// compare-and-set, fenced in worker mode); `last_event` is the last
    /// event handled at or before `next`.
    async fn advance(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        next: Cursor,
        handled: usize,
        last_event: Cursor,
    ) -> Result<()> {
        let advance = tx
            .prepare_cached(self.checkpoints.advance_sql(self.fence.is_some()))
            .await?;
        let old_tx = Xid8(self.cursor.transaction_id);
        let new_tx = Xid8(next.transaction_id);
        let event_tx = Xid8(last_event.transaction_id);
        let handled_i64 = handled as i64;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &self.name,
            &self.slot.partition,
            &old_tx,
            &self.cursor.global_position,
            &new_tx,
            &next.global_position,
            &handled_i64,
            &event_tx,
            &last_event.global_position,
            &self.epoch,
        ];
        params = self.fenced_params(params);
        let moved = tx.execute(&advance, &params).await?;
        if moved != 1 {
            let why = match &self.fence {
                Some(f) => format!(
                    "the slot is no longer assigned to worker {} (generation {}), or its checkpoint moved \
                     from {} or was paused, or PostgreSQL lost recent commits since the page was read",
                    f.worker_id, f.generation, self.cursor
                ),
                None => format!(
                    "the checkpoint is no longer at {} or no longer running (another runner moved it, a reset, \
                     a pause), or PostgreSQL lost recent commits since the page was read",
                    self.cursor
                ),
            };
            return Err(Error::fenced(format!(
                "projection {} partition {}: {why}; the batch was rolled back",
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
            let span = otel::event_span(&Span::current(), self.projection.name(), event);
            match guarded(
                self.projection
                    .handle_batch(std::slice::from_ref(event), &tx),
            )
            .instrument(span.clone())
            .await
            {
                Ok(()) => {
                    tx.batch_execute("RELEASE SAVEPOINT projectionist_event")
                        .await?;
                    done += 1;
                }
                Err(e) if is_handler_failure(&e) => {
                    otel::fail(&span, &e);
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
            self.advance(&tx, next, done, next).await?;
            tx.commit().await?;
            self.moved_to(next, next);
            return Ok(BatchOutcome {
                handled: done,
                caught_up: false,
                watermark,
                cursor: next,
            });
        };
        if done > 0 {
            let next = events[done - 1].cursor();
            self.advance(&tx, next, done, next).await?;
            tx.commit().await?;
            self.moved_to(next, next);
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
            let span = otel::event_span(&Span::current(), self.projection.name(), event);
            match guarded(
                self.projection
                    .handle_batch(std::slice::from_ref(event), &tx),
            )
            .instrument(span.clone())
            .await
            {
                Ok(()) => {
                    self.advance(&tx, event.cursor(), 1, event.cursor()).await?;
                    tx.commit().await?;
                    self.moved_to(event.cursor(), event.cursor());
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
                    otel::fail(&span, &e);
                    self.count("error", 1);
                    error = e
                }
                Err(e) => return Err(e),
            }
        }
        self.give_up(event, error, attempts, done, watermark).await
    }

    /// Applies the failure policy to `event`, which failed `attempts` times
    /// with `error` (the `done` events before it are committed):
    /// dead-letter it and go on, or stop the slot.
    async fn give_up(
        &mut self,
        event: &StoredEvent,
        error: Error,
        attempts: u32,
        done: usize,
        watermark: u64,
    ) -> Result<BatchOutcome> {
        match self.projection.failure_policy().on_failure {
            OnFailure::DeadLetter => {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                self.sink().insert(&*tx, event, &error, attempts).await?;
                self.advance(&tx, event.cursor(), 0, event.cursor()).await?;
                tx.commit().await?;
                self.moved_to(event.cursor(), event.cursor());
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

    pub(crate) fn projection(&self) -> &Registered {
        &self.projection
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Reads up to `limit` events after `after` (no transaction), checking
    /// the slot first: `Ok(None)` means the processor resynchronised with
    /// its slot (lost commits, a reset, a moved checkpoint) and every
    /// in-memory position after [`Processor::cursor`] is void. The control
    /// says whether the range read holds any event, matching or not
    /// (`Control::passed`), and which upcasts failed (for
    /// [`Processor::prepare`]).
    pub(crate) async fn fetch(
        &mut self,
        after: Cursor,
        limit: i64,
    ) -> Result<Option<(ReadBatch, Control)>> {
        let client = self.pool.get().await?;
        let (page, control) = self.reader.read(&client, after, limit).await?;
        self.server_started = Some(page.server_started);
        if let Some(why) = self.check(&page, &control) {
            self.resync(&client, why).await?;
            return Ok(None);
        }
        self.last_watermark = page.watermark;
        if self.epoch.is_none() {
            self.epoch = control.epoch;
        }
        Ok(Some((page, control)))
    }

    /// Moves the checkpoint to `next` in a transaction of its own (the
    /// compare-and-set, fenced in worker mode), with `stats` for `status`;
    /// `last_event` is the last event complete at or before `next`.
    pub(crate) async fn commit_to(
        &mut self,
        next: Cursor,
        handled: usize,
        last_event: Cursor,
        stats: &serde_json::Value,
    ) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        self.advance(&tx, next, handled, last_event).await?;
        let save = tx
            .prepare_cached(&format!(
                "UPDATE {} SET parallel_stats = $3 WHERE projection_name = $1 AND partition_key = $2",
                self.checkpoints_table
            ))
            .await?;
        tx.execute(&save, &[&self.name, &self.slot.partition, stats])
            .await?;
        tx.commit().await?;
        self.moved_to(next, last_event);
        Ok(())
    }

    /// A handle for dead-lettering this slot's events.
    pub(crate) fn sink(&self) -> DeadLetterSink {
        DeadLetterSink {
            table: self.dead_letters.clone(),
            name: self.name.clone(),
            partition: self.slot.partition,
            fence: self
                .fence
                .clone()
                .map(|f| (self.assignments_table.clone(), f)),
        }
    }

    /// Puts the slot in the `failed` state at `event` (failure policy
    /// Stop; fenced in worker mode) and returns the error that stops its
    /// loop.
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
        self.mark_stopped(event, message).await
    }

    /// Puts the slot in the `failed` state at `event`, an event the
    /// registry does not know (`message` says which and what to do),
    /// whatever the failure policy: nothing after it is handled.
    pub(crate) async fn stop_unknown(&self, event: &StoredEvent, message: &str) -> Error {
        self.count("unknown", 1);
        let message = format!(
            "projection {} partition {} stopped: {message}",
            self.name, self.slot.partition
        );
        self.mark_stopped(event, message).await
    }

    /// Marks the slot failed at `event` with `message` (fenced in worker
    /// mode) and returns the error that stops its loop.
    async fn mark_stopped(&self, event: &StoredEvent, message: String) -> Error {
        let marked = async {
            let client = self.pool.get().await?;
            let sql = self.checkpoints.mark_failed_sql(self.fence.is_some());
            let params = self.fenced_params(vec![
                &self.name,
                &self.slot.partition,
                &message,
                &event.global_position,
            ]);
            let n = client.execute(sql.as_str(), &params).await?;
            if n == 0 && self.fence.is_some() {
                return Err(Error::fenced(format!(
                    "projection {} partition {}: the slot moved to another worker before it could be marked \
                     failed; the new owner will meet the same event",
                    self.name, self.slot.partition
                )));
            }
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

    /// Reloads every in-memory position from the checkpoint row (after
    /// lost commits, a reset, or when another runner moved it).
    async fn reload(&mut self, client: &deadpool_postgres::Object) -> Result<()> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT last_transaction_id, last_global_position, last_event_transaction_id, \
                     last_event_position, epoch FROM {} WHERE projection_name = $1 AND partition_key = $2",
                    self.checkpoints_table
                ),
                &[&self.name, &self.slot.partition],
            )
            .await?;
        let row = match row {
            Some(r) => Row {
                cursor: Cursor::new(r.try_get::<_, Xid8>(0)?.0, r.try_get(1)?),
                last_event: Cursor::new(r.try_get::<_, Xid8>(2)?.0, r.try_get(3)?),
                epoch: r.try_get(4)?,
            },
            // Deleted meanwhile: the next page says so and resyncs.
            None => Row {
                cursor: Cursor::START,
                last_event: Cursor::START,
                epoch: None,
            },
        };
        self.cursor = row.cursor;
        self.read_cursor = row.cursor;
        self.last_event = row.last_event;
        self.epoch = row.epoch;
        self.last_watermark = 0;
        Ok(())
    }

    /// `params` followed, in worker mode, by the fence's worker id and
    /// generation (the last two parameters of every fenced statement).
    fn fenced_params<'a>(
        &'a self,
        mut params: Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>,
    ) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
        if let Some(f) = &self.fence {
            params.push(&f.worker_id);
            params.push(&f.generation);
        }
        params
    }

    /// Whether this processor runs under worker-mode fencing.
    pub(crate) fn is_fenced_slot(&self) -> bool {
        self.fence.is_some()
    }

    /// Worker mode: clears the slot's failure-budget record once it makes
    /// progress again (best effort).
    pub(crate) async fn clear_release_count(&self) {
        let Some(f) = &self.fence else { return };
        if let Ok(client) = self.pool.get().await {
            let _ = client
                .execute(
                    &format!(
                        "UPDATE {} SET release_count = 0, released_by = NULL, released_until = NULL \
                         WHERE projection_name = $1 AND partition_key = $2 AND worker_id = $3 \
                           AND generation = $4 AND release_count > 0",
                        self.assignments_table
                    ),
                    &[&self.name, &self.slot.partition, &f.worker_id, &f.generation],
                )
                .await;
        }
    }

    /// Whether the slot's checkpoint is back in the `running` state (after
    /// `resume`), or gone (a reset: the next page rebuilds it).
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

    /// Records `error` on the checkpoint row (best effort; fenced in
    /// worker mode).
    pub(crate) async fn record_error(&self, error: &Error) {
        if let Ok(client) = self.pool.get().await {
            let sql = self.checkpoints.record_error_sql(self.fence.is_some());
            let message = error.to_string();
            let params = self.fenced_params(vec![&self.name, &self.slot.partition, &message]);
            let _ = client.execute(sql.as_str(), &params).await;
        }
    }
}
