//! The dead-letter table: events a projection gave up on under the
//! `DeadLetter` failure policy. Listed, shown, retried (the handler runs
//! again in a transaction; on success the entry goes away) and purged.
//! Also the slot states operators set: `pause` and `resume`.

use crate::error::{Error, Kind, Result};
use crate::event::StoredEvent;
use crate::projection::UnknownEvents;
use crate::registered::Registered;
use crate::store::EventStore;
use serde::Serialize;

/// One dead letter.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DeadLetter {
    /// The entry's id (for `dlq show` / `dlq retry`).
    pub id: i64,
    /// The projection that gave up.
    pub projection: String,
    /// Its partition.
    pub partition: i32,
    /// The event's global position.
    pub global_position: i64,
    /// The event's id.
    pub event_id: uuid::Uuid,
    /// The event's stream type.
    pub aggregate_type: String,
    /// The event's stream id.
    pub aggregate_id: String,
    /// The event's type.
    pub event_type: String,
    /// The last error.
    pub error: String,
    /// Attempts so far.
    pub attempts: i32,
    /// When it was dead-lettered (RFC 3339).
    pub created_at: String,
    /// When it was last tried (RFC 3339).
    pub last_attempt_at: String,
}

const COLUMNS: &str =
    "id, projection_name, partition_key, global_position, event_id, aggregate_type, \
     aggregate_id, event_type, error, attempts, created_at, last_attempt_at";

fn from_row(r: &tokio_postgres::Row) -> Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.try_get(0)?,
        projection: r.try_get(1)?,
        partition: r.try_get(2)?,
        global_position: r.try_get(3)?,
        event_id: r.try_get(4)?,
        aggregate_type: r.try_get(5)?,
        aggregate_id: r.try_get(6)?,
        event_type: r.try_get(7)?,
        error: r.try_get(8)?,
        attempts: r.try_get(9)?,
        created_at: r
            .try_get::<_, chrono::DateTime<chrono::Utc>>(10)?
            .to_rfc3339(),
        last_attempt_at: r
            .try_get::<_, chrono::DateTime<chrono::Utc>>(11)?
            .to_rfc3339(),
    })
}

/// Dead letters, optionally of one projection, by position.
pub async fn list(store: &EventStore, projection: Option<&str>) -> Result<Vec<DeadLetter>> {
    let client = store.pool().get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {} WHERE ($1::text IS NULL OR projection_name = $1) \
                 ORDER BY projection_name, global_position",
                store.statements().dead_letters
            ),
            &[&projection],
        )
        .await?;
    rows.iter().map(from_row).collect()
}

/// One dead letter and its event, upcast by the store's registry (as
/// stored when an upcaster fails on it).
pub async fn show(store: &EventStore, id: i64) -> Result<(DeadLetter, Option<StoredEvent>)> {
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM {} WHERE id = $1",
                store.statements().dead_letters
            ),
            &[&id],
        )
        .await?
        .ok_or_else(|| not_found(id))?;
    let dl = from_row(&row)?;
    let event = client
        .query_opt(
            &format!(
                "SELECT {} FROM {} WHERE global_position = $1",
                StoredEvent::COLUMNS,
                store.statements().events
            ),
            &[&dl.global_position],
        )
        .await?
        .map(|r| StoredEvent::from_row_at(&r, 0))
        .transpose()?
        .map(|mut e| {
            // Shown as handlers see it; when an upcaster fails on it (the
            // dead letter's error then says so), as it is stored.
            if let Err(err) = store.upcast(&mut e) {
                tracing::warn!(id, error = %err, "showing the dead letter's event as stored");
            }
            e
        });
    Ok((dl, event))
}

fn not_found(id: i64) -> Error {
    Error::config(format!(
        "no dead letter with id {id}: run `dlq list` to see the ids"
    ))
}

/// The outcome of retrying one dead letter.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RetryOutcome {
    /// The entry's id.
    pub id: i64,
    /// Whether the handler succeeded (the entry is gone).
    pub succeeded: bool,
    /// The error when it failed again (its attempt count was raised).
    pub error: Option<String>,
}

/// Re-runs the projection's handler on dead letter `id` (upcast by the
/// store's registry) in a transaction:
/// on success the read model change and the entry's removal commit
/// together; on failure the entry's attempt count and error are updated.
/// A [`ConcurrentProjection`](crate::ConcurrentProjection) gets its own
/// `handle`, as in the engine: at-least-once (if
/// the removal fails to commit, a later retry handles the event again).
pub async fn retry(
    store: &EventStore,
    projections: &[Registered],
    id: i64,
) -> Result<RetryOutcome> {
    let sql = store.statements();
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM {} WHERE id = $1 FOR UPDATE",
                sql.dead_letters
            ),
            &[&id],
        )
        .await?
        .ok_or_else(|| not_found(id))?;
    let dl = from_row(&row)?;
    let projection = projections
        .iter()
        .find(|p| p.key() == dl.projection)
        .ok_or_else(|| {
            Error::config(format!(
                "dead letter {id} belongs to projection {:?}, which this binary does not register",
                dl.projection
            ))
        })?;
    let mut event = tx
        .query_opt(
            &format!(
                "SELECT {} FROM {} WHERE global_position = $1",
                StoredEvent::COLUMNS,
                sql.events
            ),
            &[&dl.global_position],
        )
        .await?
        .map(|r| StoredEvent::from_row_at(&r, 0))
        .transpose()?
        .ok_or_else(|| {
            Error::config(format!(
                "the event of dead letter {id} (global position {}) is no longer in the events table: \
                 purge the entry with `dlq purge`",
                dl.global_position
            ))
        })?;
    tx.batch_execute("SAVEPOINT projectionist_retry").await?;
    // The handler sees the event in its current shape; an event the
    // registry does not know is not handed over (unless the projection
    // ignores such events: then the entry simply goes). The handler is the
    // one the engine runs for this projection: a concurrency-mode
    // projection's handle_concurrent (no transaction, at-least-once: it
    // runs before the entry's removal commits), else handle_batch in the
    // transaction that also removes the entry.
    let prepared = match store.upcast(&mut event) {
        Err(e) => Err(e),
        Ok(()) => match store.registry().and_then(|r| {
            let policy = projection.unknown_events();
            r.unknown(&event, policy != UnknownEvents::StopOnUnknownVersion)
                .map(|u| (u, policy))
        }) {
            None => Ok(true),
            Some((_, UnknownEvents::Ignore)) => Ok(false),
            Some((u, _)) => Err(Error::new(
                Kind::Failed,
                u.describe(&event, projection.key()),
            )),
        },
    };
    // The handler the engine runs for this projection: a concurrency-mode
    // projection's handle_concurrent (no transaction, at-least-once: it
    // runs before the entry's removal commits), else handle_batch in the
    // transaction that also removes the entry.
    let handled = match prepared {
        Ok(true) if projection.concurrency().is_some() => {
            projection.handle_concurrent(&event).await
        }
        Ok(true) => {
            projection
                .handle_batch(std::slice::from_ref(&event), &tx)
                .await
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    let outcome = match handled {
        Ok(()) => {
            tx.execute(
                &format!("DELETE FROM {} WHERE id = $1", sql.dead_letters),
                &[&id],
            )
            .await?;
            RetryOutcome {
                id,
                succeeded: true,
                error: None,
            }
        }
        Err(e) if e.is_connection() => return Err(e),
        Err(e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT projectionist_retry")
                .await?;
            tx.execute(
                &format!(
                    "UPDATE {} SET attempts = attempts + 1, error = $2, last_attempt_at = now() WHERE id = $1",
                    sql.dead_letters
                ),
                &[&id, &e.to_string()],
            )
            .await?;
            RetryOutcome {
                id,
                succeeded: false,
                error: Some(e.to_string()),
            }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Deletes dead letters (all, or one projection's). Returns how many.
pub async fn purge(store: &EventStore, projection: Option<&str>) -> Result<u64> {
    let client = store.pool().get().await?;
    Ok(client
        .execute(
            &format!(
                "DELETE FROM {} WHERE ($1::text IS NULL OR projection_name = $1)",
                store.statements().dead_letters
            ),
            &[&projection],
        )
        .await?)
}

/// Puts a failed or paused projection (all partitions, or one) back to
/// `running`: running processes pick it up within a second; returns the
/// rows changed.
pub async fn resume(store: &EventStore, projection: &str, partition: Option<i32>) -> Result<u64> {
    let client = store.pool().get().await?;
    crate::checkpoint::Checkpoints::new(&store.statements().checkpoints)
        .resume(&**client, projection, partition)
        .await
}

/// Pauses a projection (all partitions, or one): its checkpoint rows get
/// status `stopped`, and processes stop running those slots until
/// [`resume`]. Returns how many partitions were paused now (0 when all of
/// them already were).
///
/// Fails with a configuration error naming the fix when the projection
/// (or that partition) has no checkpoint yet.
pub async fn pause(store: &EventStore, projection: &str, partition: Option<i32>) -> Result<u64> {
    let client = store.pool().get().await?;
    let (rows, paused) = crate::checkpoint::Checkpoints::new(&store.statements().checkpoints)
        .pause(&**client, projection, partition)
        .await?;
    if rows == 0 {
        return Err(Error::config(match partition {
            Some(p) => format!(
                "projection {projection} has no checkpoint for partition {p}: run `status` to see its partitions"
            ),
            None => format!(
                "projection {projection} has no checkpoints yet (it has never run here), so there is nothing to \
                 pause: start it once with `run-projections`, or run only the projections you want with \
                 --projection"
            ),
        }));
    }
    Ok(paused)
}
