//! `rewind`: moves a rewindable projection's cursors back to a global
//! position or a time, so the events from there are handled again. Only for
//! projections that declare
//! [`ProjectionOptions::rewindable`](crate::ProjectionOptions::rewindable)
//! (at-least-once consumers that resend to a sink and tolerate repeats).
//!
//! The new cursor sits just before the earliest event, in cursor order
//! (transaction id, then global position), among those at or after the
//! target: every such event is handled again, and so is any event that
//! sorts after it (a later position can commit in an earlier transaction).
//! Each checkpoint moves with a compare-and-set on its cursor, so a batch
//! committing at the same moment is never overwritten silently: a running
//! static process sees the moved cursor on its next page and continues from
//! it; in worker mode the slot's owner finds its compare-and-set refused,
//! stops the slot as fenced, and the next reconcile restarts it from the
//! moved cursor (`worker::rewind_in_worker_mode_…` in the tests).

use crate::error::{Error, Kind, Result};
use crate::event::Xid8;
use crate::registered::Registered;
use crate::store::EventStore;

/// Where [`rewind`] moves the cursors to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RewindTo {
    /// Handle again every event from this global position on.
    Position(i64),
    /// Handle again every event appended at or after this time (any
    /// PostgreSQL `timestamptz` input, e.g. RFC 3339).
    Time(String),
}

/// What [`rewind`] did (or would do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewound {
    /// Events the projection will handle again (its filter and partitions
    /// applied).
    pub events: i64,
    /// Checkpoints moved back (or that would be).
    pub moved: usize,
}

/// Moves `projection`'s cursors back to `to` (see the module
/// documentation); with `apply` false, only counts.
pub async fn rewind(
    store: &EventStore,
    projection: &Registered,
    to: &RewindTo,
    apply: bool,
) -> Result<Rewound> {
    if !projection.rewindable() {
        return Err(Error::config(format!(
            "projection {} is not rewindable: handling events again is only safe for consumers that \
             tolerate repeats; declare .rewindable(true) in its ProjectionOptions, or use `reset` to \
             rebuild it",
            projection.name()
        )));
    }
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let (condition, param): (&str, Box<dyn tokio_postgres::types::ToSql + Sync + Send>) = match to {
        RewindTo::Position(p) => ("global_position >= $1", Box::new(*p)),
        RewindTo::Time(t) => {
            let parsed = client
                .query_one("SELECT $1::text::timestamptz", &[t])
                .await
                .map_err(|e| {
                    Error::config(format!(
                        "--to-time {t:?} is not a time PostgreSQL reads ({}): use e.g. 2026-12-03T10:00:00Z",
                        e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned())
                    ))
                })?;
            let at: std::time::SystemTime = parsed.try_get(0)?;
            ("created_at >= $1", Box::new(at))
        }
    };
    let first = client
        .query_opt(
            &format!(
                "SELECT transaction_id, global_position FROM {} WHERE {condition} \
                 ORDER BY transaction_id, global_position LIMIT 1",
                sql.events
            ),
            &[&*param],
        )
        .await?;
    let Some(first) = first else {
        return Ok(Rewound {
            events: 0,
            moved: 0,
        });
    };
    let to_tx: Xid8 = first.try_get(0)?;
    let to_pos: i64 = first.try_get::<_, i64>(1)? - 1;
    let filter = projection.filter();
    let event_types = match &sql.registry {
        Some(r) => r.stored_names(&filter.event_types),
        None => filter.event_types.clone(),
    };
    let tx = client.transaction().await?;
    let slots = tx
        .query(
            &format!(
                "SELECT partition_key, total_partitions, last_transaction_id, last_global_position \
                 FROM {} WHERE projection_name = $1 ORDER BY partition_key FOR UPDATE",
                sql.checkpoints
            ),
            &[&projection.key()],
        )
        .await?;
    if slots.is_empty() {
        return Err(Error::config(format!(
            "projection {} has no checkpoints yet: there is nothing to rewind",
            projection.key()
        )));
    }
    let mut result = Rewound {
        events: 0,
        moved: 0,
    };
    for slot in &slots {
        let partition: i32 = slot.try_get(0)?;
        let total: i32 = slot.try_get(1)?;
        let cur_tx: Xid8 = slot.try_get(2)?;
        let cur_pos: i64 = slot.try_get(3)?;
        if (cur_tx.0, cur_pos) <= (to_tx.0, to_pos) {
            continue;
        }
        let n: i64 = tx
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} e \
                     WHERE (e.transaction_id, e.global_position) > ($1, $2) \
                       AND (e.transaction_id, e.global_position) <= ($3, $4) \
                       AND (cardinality($5::text[]) = 0 OR e.aggregate_type = ANY($5)) \
                       AND (cardinality($6::text[]) = 0 OR e.event_type = ANY($6)) \
                       AND ($7::int8 = 1 OR e.aggregate_hash % $7::int8 = $8::int8)",
                    sql.events
                ),
                &[
                    &to_tx,
                    &to_pos,
                    &cur_tx,
                    &cur_pos,
                    &filter.aggregate_types,
                    &event_types,
                    &i64::from(total),
                    &i64::from(partition),
                ],
            )
            .await?
            .try_get(0)?;
        result.events += n;
        result.moved += 1;
        if apply {
            let updated = tx
                .execute(
                    &format!(
                        "UPDATE {} SET last_transaction_id = $3, last_global_position = $4, \
                                last_event_transaction_id = $3, last_event_position = $4, updated_at = now() \
                         WHERE projection_name = $1 AND partition_key = $2 \
                           AND last_transaction_id = $5 AND last_global_position = $6",
                        sql.checkpoints
                    ),
                    &[
                        &projection.key(),
                        &partition,
                        &to_tx,
                        &to_pos,
                        &cur_tx,
                        &cur_pos,
                    ],
                )
                .await?;
            if updated != 1 {
                return Err(Error::new(
                    Kind::Conflict,
                    format!(
                        "the cursor of {} partition {partition} moved while rewinding: run rewind again",
                        projection.key()
                    ),
                ));
            }
        }
    }
    if apply {
        tx.commit().await?;
        tracing::info!(
            projection = projection.key(),
            events = result.events,
            moved = result.moved,
            to_transaction = to_tx.0,
            to_position = to_pos,
            "projection rewound"
        );
    }
    Ok(result)
}
