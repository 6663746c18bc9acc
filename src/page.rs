//! The gap-safe read: a page of events after a cursor, below the
//! watermark, with the control values the engine checks before it handles
//! anything (watermark, head, server start, crash epoch, the slot's stored
//! checkpoint).
//!
//! A page is two statements in one `REPEATABLE READ, READ ONLY`
//! transaction, sent together (one round trip): the control row, then the
//! events. Both see one snapshot, so the watermark the control row reports
//! is exactly the one the events were read below, and the control values
//! are read once per page instead of being repeated on every event row
//! (they were a quarter of a page's cost). Only plain clients run it: the
//! read opens and ends its own transaction.

use crate::error::{Error, Kind, Result};
use crate::event::{Cursor, StoredEvent, Xid8};
use crate::registry::Registry;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio_postgres::types::ToSql;

/// A page of a gap-safe read of the whole log.
#[derive(Clone, Debug)]
pub struct ReadBatch {
    /// Events after the cursor, in `(transaction_id, global_position)` order.
    pub events: Vec<StoredEvent>,
    /// Where to resume. When the page is not full it lies past every
    /// transaction older than the snapshot's watermark, even if no event
    /// was returned, so a reader never rescans what it has seen.
    pub next_cursor: Cursor,
    /// The watermark: the oldest transaction still running when the page
    /// was read; nothing at or after it was returned.
    pub watermark: u64,
    /// The highest global position in the log at read time (0 when empty).
    pub head: i64,
    /// When the server last started. If it changes between two pages, the
    /// server restarted: transaction ids above the durable state may be
    /// handed out again, so a reader must resume from a cursor it stored
    /// durably (the engine reloads its checkpoint), not from one in memory.
    pub server_started: chrono::DateTime<chrono::Utc>,
}

/// Which events a gap-safe read returns (built into the SQL text, so the
/// database filters; parameters from `$4` on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadFilter {
    pub(crate) aggregate_types: Vec<String>,
    pub(crate) event_types: Vec<String>,
    /// `(partition, total_partitions)`.
    pub(crate) partition: Option<(i32, i32)>,
}

impl ReadFilter {
    /// Whether every event passes (no condition).
    pub(crate) fn is_everything(&self) -> bool {
        self.aggregate_types.is_empty() && self.event_types.is_empty() && self.partition.is_none()
    }

    /// The bind parameters `$4…` of the page statement, in the order
    /// [`gap_safe_query`] numbers them.
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut p: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if !self.aggregate_types.is_empty() {
            p.push(&self.aggregate_types);
        }
        if !self.event_types.is_empty() {
            p.push(&self.event_types);
        }
        if let Some((k, _)) = &self.partition {
            p.push(k);
        }
        p
    }
}

/// The tables a slot's control row reads.
#[derive(Clone, Debug)]
pub(crate) struct SlotTables {
    pub(crate) checkpoints: String,
    pub(crate) epoch: String,
}

/// A gap-safe read's two statements (see the module documentation).
#[derive(Clone, Debug)]
struct PageQuery {
    /// The control row: watermark, head, server start time, crash epoch,
    /// (for a slot) the stored checkpoint's cursor, status and epoch, and
    /// whether the range holds any event (see [`Control::passed`]).
    /// Parameters: for a filtered read `$1` cursor transaction id and `$2`
    /// cursor position; for a slot then its name and partition.
    header: String,
    /// The events: `$1` cursor transaction id, `$2` cursor position, `$3`
    /// limit, then the filter's parameters ([`ReadFilter::params`]).
    page: String,
}

/// Builds the gap-safe read of `events` for `filter`; with `slot`, the
/// control row also reads the slot's checkpoint and the crash sentinel.
/// Without `metadata`, the page reads a NULL in place of the `metadata`
/// column (see [`StoredEvent::from_row_at`]).
fn gap_safe_query(
    events: &str,
    filter: &ReadFilter,
    slot: Option<&SlotTables>,
    metadata: bool,
) -> PageQuery {
    let mut n = 0;
    let mut param = || {
        n += 1;
        n
    };
    // Whether the read range holds any event at all, matching or not: a
    // filtered slot whose page is empty moves its stored cursor only when
    // it passed over events (so a waiter for one of them sees the cursor
    // pass), never merely because the watermark moved. Uncorrelated, so
    // PostgreSQL evaluates it once per page (an InitPlan), one index probe.
    // A scalar subquery in index order, not EXISTS: PostgreSQL drops the
    // ORDER BY of an EXISTS, and under a generic plan it then chose a
    // sequential scan from the start of the table, stopping at the first
    // row after the cursor — a page cost that grew with the cursor's
    // position (8 ms at 60,000 events, the whole table at the head).
    let passed = if filter.is_everything() {
        "false".to_owned()
    } else {
        let (tx, pos) = (param(), param());
        format!(
            "coalesce((SELECT true FROM {events} x \
             WHERE (x.transaction_id, x.global_position) > (${tx}::xid8, ${pos}::int8) \
               AND x.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY x.transaction_id, x.global_position LIMIT 1), false)"
        )
    };
    let (epoch, checkpoint, join) = match slot {
        Some(t) => {
            let (name, partition) = (param(), param());
            (
                format!("(SELECT epoch FROM {} WHERE id = 1)", t.epoch),
                "c.last_transaction_id, c.last_global_position, c.status, c.epoch".to_owned(),
                format!(
                    " LEFT JOIN {} c ON c.projection_name = ${name}::text AND c.partition_key = ${partition}::int4",
                    t.checkpoints
                ),
            )
        }
        None => (
            "NULL::uuid".to_owned(),
            "NULL::xid8, NULL::int8, NULL::text, NULL::uuid".to_owned(),
            String::new(),
        ),
    };
    let header = format!(
        "SELECT pg_snapshot_xmin(pg_current_snapshot()), \
                coalesce((SELECT max(global_position) FROM {events}), 0), \
                pg_postmaster_start_time(), {epoch}, {checkpoint}, {passed} \
         FROM (SELECT) AS one{join}"
    );
    let conds = filter_conditions(filter, 3);
    let cols = StoredEvent::COLUMNS
        .split(", ")
        .map(|c| match c {
            // A constant: the server neither reads nor converts the column.
            "metadata" if !metadata => "NULL::jsonb".to_owned(),
            c => format!("e.{c}"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    // The watermark is computed once per statement (a stable function in
    // the index condition), from the transaction's one snapshot.
    let page = format!(
        "SELECT {cols} FROM {events} e \
         WHERE (e.transaction_id, e.global_position) > ($1::xid8, $2::int8) \
           AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()){conds} \
         ORDER BY e.transaction_id, e.global_position \
         LIMIT $3"
    );
    PageQuery { header, page }
}

/// A gap-safe read bound to what it reads: its statements, its filter and,
/// for a slot, the (projection, partition) whose checkpoint row the control
/// row shows. Every page of the store (`read_all`) and of the processors
/// (sequential, read ahead, concurrency mode) is read through one.
#[derive(Debug)]
pub(crate) struct PageReader {
    query: PageQuery,
    filter: ReadFilter,
    slot: Option<(String, i32)>,
    /// Upcasts each event as it arrives ([`PageReader::upcasting`]).
    upcast: Option<Arc<Registry>>,
}

impl PageReader {
    /// Reads `events` for `filter`; with `slot`, the control row also
    /// reads that slot's checkpoint (projection key, partition) in `tables`
    /// and the crash sentinel. Without `metadata` the events come without
    /// their metadata (`ProjectionOptions::reads_metadata`).
    pub(crate) fn new(
        events: &str,
        filter: ReadFilter,
        slot: Option<(&SlotTables, &str, i32)>,
        metadata: bool,
    ) -> PageReader {
        PageReader {
            query: gap_safe_query(events, &filter, slot.map(|(t, _, _)| t), metadata),
            filter,
            slot: slot.map(|(_, name, partition)| (name.to_owned(), partition)),
            upcast: None,
        }
    }

    /// Upcasts every event read with `registry` as its row arrives, while
    /// the server still sends the rest of the page. A failed upcast leaves
    /// the event as stored and is reported in [`Control::upcast_failed`].
    pub(crate) fn upcasting(mut self, registry: Arc<Registry>) -> PageReader {
        self.upcast = Some(registry);
        self
    }

    /// Reads up to `limit` events after `after` on `client`, a pooled
    /// connection outside any transaction (the read opens and ends its own).
    pub(crate) async fn read(
        &self,
        client: &deadpool_postgres::Object,
        after: Cursor,
        limit: i64,
    ) -> Result<(ReadBatch, Control)> {
        let header = client.prepare_cached(&self.query.header).await?;
        let page = client.prepare_cached(&self.query.page).await?;
        let tx = Xid8(after.transaction_id);
        let mut header_params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if !self.filter.is_everything() {
            header_params.push(&tx);
            header_params.push(&after.global_position);
        }
        if let Some((name, partition)) = &self.slot {
            header_params.push(name);
            header_params.push(partition);
        }
        let mut page_params: Vec<&(dyn ToSql + Sync)> = vec![&tx, &after.global_position, &limit];
        page_params.extend(self.filter.params());
        // The events are decoded as their rows arrive, while the server
        // is still producing the rest of the page, instead of after the
        // last one.
        let events = async {
            let rows = client.query_raw(&page, page_params).await?;
            let mut rows = std::pin::pin!(rows);
            let mut events = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(10_000));
            let mut failed = Vec::new();
            while let Some(row) = rows.next().await {
                let mut event = StoredEvent::from_row_at(&row?, 0)?;
                if let Some(registry) = &self.upcast {
                    if let Err(e) = registry.upcast(&mut event) {
                        failed.push((events.len(), e));
                    }
                }
                events.push(event);
            }
            Ok::<_, Error>((events, failed))
        };
        // Polled together, the four are sent back to back (each sends its
        // request on its first poll, in this order): one round trip. A
        // failed statement makes the COMMIT a rollback; the connection is
        // outside a transaction either way.
        let (begun, header, events, committed) = tokio::join!(
            client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
            client.query(&header, &header_params),
            events,
            client.batch_execute("COMMIT"),
        );
        begun?;
        let header = header?;
        let (events, failed) = events?;
        committed?;
        let header = header
            .first()
            .ok_or_else(|| Error::new(Kind::Other, "the gap-safe read returned no control row"))?;
        let (page, mut control) = decode_page(header, events, after, limit)?;
        control.upcast_failed = failed;
        Ok((page, control))
    }
}

/// What a page read says besides the events: the crash epoch and the
/// slot's stored checkpoint as of the page's snapshot.
#[derive(Debug)]
pub(crate) struct Control {
    /// The crash sentinel's epoch; `None` when crash recovery emptied it.
    pub(crate) epoch: Option<uuid::Uuid>,
    /// The slot's checkpoint row; `None` when it does not exist (reset).
    pub(crate) checkpoint: Option<StoredCheckpoint>,
    /// The read range (after the cursor, below the watermark) holds an
    /// event, whether the slot's filter matches it or not. Always `false`
    /// for unfiltered reads (their page holds every such event).
    pub(crate) passed: bool,
    /// With [`PageReader::upcasting`], the page's events whose upcast
    /// failed (by index, ascending) and why; they are left as stored, as
    /// every event is by a reader that does not upcast.
    pub(crate) upcast_failed: Vec<(usize, Error)>,
}

/// A checkpoint row's cursor, state and epoch, as a page read saw it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredCheckpoint {
    pub(crate) cursor: Cursor,
    pub(crate) status: String,
    pub(crate) epoch: Option<uuid::Uuid>,
}

/// The SQL conditions (each starting with ` AND `, on table alias `e`) of
/// `filter`, numbering its parameters after `$last_fixed`.
pub(crate) fn filter_conditions(filter: &ReadFilter, last_fixed: usize) -> String {
    let mut conds = String::new();
    let mut n = last_fixed;
    if !filter.aggregate_types.is_empty() {
        n += 1;
        conds.push_str(&format!(" AND e.aggregate_type = ANY(${n}::text[])"));
    }
    if !filter.event_types.is_empty() {
        n += 1;
        conds.push_str(&format!(" AND e.event_type = ANY(${n}::text[])"));
    }
    if let Some((_, total)) = filter.partition {
        // aggregate_hash % n is projectionist_partition(aggregate_id, n),
        // precomputed at insert (migration V4). The count is written into
        // the text (an integer, not user text) so that the expression
        // matches the partition index for that count (partition_index.rs).
        conds.push_str(&format!(
            " AND e.aggregate_hash % {total} = ${}::int4",
            n + 1
        ));
    }
    conds
}

/// Decodes a page read's control row and puts the page together.
fn decode_page(
    header: &tokio_postgres::Row,
    events: Vec<StoredEvent>,
    after: Cursor,
    limit: i64,
) -> Result<(ReadBatch, Control)> {
    let watermark = header.try_get::<_, Xid8>(0)?.0;
    let head: i64 = header.try_get(1)?;
    let server_started = header.try_get(2)?;
    let epoch: Option<uuid::Uuid> = header.try_get(3)?;
    let checkpoint = match header.try_get::<_, Option<Xid8>>(4)? {
        Some(tx) => Some(StoredCheckpoint {
            cursor: Cursor::new(tx.0, header.try_get(5)?),
            status: header.try_get(6)?,
            epoch: header.try_get(7)?,
        }),
        None => None,
    };
    let passed: bool = header.try_get(8)?;
    let last = events.last().map(StoredEvent::cursor).unwrap_or(after);
    let next_cursor = if (events.len() as i64) < limit {
        last.max(Cursor::below_watermark(watermark)).max(after)
    } else {
        last
    };
    Ok((
        ReadBatch {
            events,
            next_cursor,
            watermark,
            head,
            server_started,
        },
        Control {
            epoch,
            checkpoint,
            passed,
            upcast_failed: Vec::new(),
        },
    ))
}
