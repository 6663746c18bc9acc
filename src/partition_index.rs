//! Indexes that let a static partition (or a worker-mode partition slot)
//! read only its own events: for each partition count `n` in use,
//! `events_partitions_<n>_idx ON events ((aggregate_hash % n),
//! transaction_id, global_position)`. A partition's page is then an index
//! range scan of its own rows in cursor order, so `n` partitions together
//! read the log about once instead of `n` times.
//!
//! The engine builds the index when a process first runs a partition count
//! (`CREATE INDEX CONCURRENTLY`: appends and other readers go on), under a
//! session advisory lock on a dedicated connection so that the partitions'
//! processes starting together build it once; an index left invalid by an
//! interrupted build is dropped and built again.
//!
//! The lock is one per events table, not one per partition count: two
//! concurrent builds on one table wait for each other's transactions (an
//! expression index is never exempt from that wait) and PostgreSQL aborts
//! one of them with "deadlock detected". A build that still meets a
//! deadlock (an operator's own concurrent index build) is retried.

use crate::error::Result;
use crate::store::EventStore;

/// The index's name for `total` partitions.
pub(crate) fn index_name(total: i32) -> String {
    format!("events_partitions_{total}_idx")
}

/// How many times a build aborted by a deadlock is tried again.
const DEADLOCK_RETRIES: u32 = 3;

/// Advisory-lock key for building partition indexes on the events table of
/// `schema` (its own key space: FNV-1a of a prefixed name). One key for
/// every partition count: builds on one table must take turns.
fn lock_key(schema: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("projectionist:partition-index:{schema}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Makes sure the index for `total` partitions exists and is valid,
/// building it when missing. Does nothing for one partition.
pub(crate) async fn ensure(store: &EventStore, total: i32) -> Result<()> {
    if total <= 1 {
        return Ok(());
    }
    let schema = store.config().schema.clone();
    let qualified = format!("{}.{}", schema.quoted(), index_name(total));
    let client = crate::db::connect_dedicated(store.pg_config(), store.tls()).await?;
    if index_state(&client, &qualified).await? == Some(true) {
        return Ok(());
    }
    let key = lock_key(schema.as_str());
    // Try, never wait inside a statement: CREATE INDEX CONCURRENTLY waits
    // for every transaction with an older snapshot, so a process blocked
    // in pg_advisory_lock behind the builder would deadlock with it.
    let mut waited = false;
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await?
            .try_get(0)?;
        if got {
            break;
        }
        if !waited {
            waited = true;
            tracing::info!(
                partitions = total,
                "waiting for another process to build the partition index"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut attempt = 0;
    let built = loop {
        match build(&client, store, total, &qualified).await {
            Err(e) if attempt < DEADLOCK_RETRIES && is_deadlock(&e) => {
                attempt += 1;
                tracing::warn!(
                    partitions = total,
                    attempt,
                    "building the partition index met a deadlock with another index build \
                     on the events table; trying again"
                );
                tokio::time::sleep(std::time::Duration::from_millis(500 * u64::from(attempt)))
                    .await;
            }
            other => break other,
        }
    };
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await;
    built
}

fn is_deadlock(e: &crate::error::Error) -> bool {
    e.db_code() == Some("40P01")
}

/// `Some(valid)` when the index exists.
async fn index_state(client: &tokio_postgres::Client, qualified: &str) -> Result<Option<bool>> {
    let row = client
        .query_opt(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
            &[&qualified],
        )
        .await?;
    Ok(match row {
        Some(r) => Some(r.try_get(0)?),
        None => None,
    })
}

async fn build(
    client: &tokio_postgres::Client,
    store: &EventStore,
    total: i32,
    qualified: &str,
) -> Result<()> {
    match index_state(client, qualified).await? {
        Some(true) => return Ok(()),
        Some(false) => {
            tracing::warn!(
                index = qualified,
                "dropping an invalid partition index left by an interrupted build"
            );
            client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"))
                .await?;
        }
        None => {}
    }
    let events = &store.statements().events;
    tracing::info!(
        partitions = total,
        index = qualified,
        "building the index that lets each of {total} partitions read only its own events \
         (CREATE INDEX CONCURRENTLY: reads the log once; appends and projections go on meanwhile)"
    );
    let started = std::time::Instant::now();
    client
        .batch_execute(&format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {events} \
             ((aggregate_hash % {total}), transaction_id, global_position)",
            name = index_name(total)
        ))
        .await?;
    tracing::info!(
        partitions = total,
        index = qualified,
        seconds = started.elapsed().as_secs_f64(),
        "partition index built"
    );
    Ok(())
}
