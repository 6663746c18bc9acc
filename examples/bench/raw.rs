//! The raw-SQL baselines: the hand-written statements the library is
//! compared with, the column codecs they decode with (the library has its
//! own, private ones), and the raw append and catch-up loops.

use crate::events::{Batch, Part};
use crate::projections::{Amount, UPSERT_ONE};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

/// The raw append: the same columns the library writes, one statement.
pub const RAW_INSERT: &str = "INSERT INTO events (event_id, aggregate_type, aggregate_id, \
     aggregate_version, event_type, payload, metadata) \
     SELECT u.id, u.at, u.aid, u.v, u.et, u.p::jsonb, u.m::jsonb \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[]) \
          AS u(id, at, aid, v, et, p, m)";
const RAW_COPY: &str = "COPY events (event_id, aggregate_type, aggregate_id, aggregate_version, \
     event_type, payload, metadata) FROM STDIN (FORMAT binary)";
/// The raw keyset page: every event column.
const RAW_PAGE: &str = "SELECT global_position, transaction_id, event_id, aggregate_type, \
     aggregate_id, aggregate_version, event_type, event_version, payload, metadata, created_at \
     FROM events WHERE global_position > $1 ORDER BY global_position LIMIT $2";
const RAW_CHECKPOINT: &str = "UPDATE projection_checkpoints SET last_global_position = $2, \
     events_handled = events_handled + $3, updated_at = now() \
     WHERE projection_name = $1 AND partition_key = 0";
/// The raw read-model page: the whole batch's work in one statement.
const RAW_READ_MODEL_PAGE: &str = "WITH page AS ( \
        SELECT global_position, aggregate_id, payload FROM events \
        WHERE global_position > $1 ORDER BY global_position LIMIT $2 \
     ), up AS ( \
        INSERT INTO bench_balances (account_id, balance, event_count) \
        SELECT aggregate_id, sum((payload->>'amount')::bigint), count(*) FROM page \
        GROUP BY aggregate_id \
        ON CONFLICT (account_id) DO UPDATE SET balance = bench_balances.balance + excluded.balance, \
           event_count = bench_balances.event_count + excluded.event_count \
     ) \
     SELECT count(*), coalesce(max(global_position), 0) FROM page";

/// The checkpoint row the raw catch-up baselines advance.
pub const RAW_CHECKPOINT_NAME: &str = "bench_raw_baseline";
/// How the raw catch-up baselines open a page's transaction: commits that do
/// not wait for the WAL flush, like the library's batch transactions
/// (`RunnerConfig::synchronous_commit(false)`, the default). Same round trip
/// as a bare `BEGIN`.
const RAW_BEGIN: &str = "BEGIN; SET LOCAL synchronous_commit = off";

// ---------------------------------------------------------------------------
// Column codecs for the raw side (the library has its own, private ones).

/// A PostgreSQL `xid8` decoded from its binary form.
struct Xid8(#[allow(dead_code)] u64);

impl<'a> FromSql<'a> for Xid8 {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "xid8 is not 8 bytes")?;
        Ok(Xid8(u64::from_be_bytes(bytes)))
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::XID8
    }
}

/// jsonb read as its JSON text, the way the library keeps payloads.
struct JsonText(String);

impl<'a> FromSql<'a> for JsonText {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let body = if *ty == Type::JSONB {
            raw.split_first().map(|(_, rest)| rest).unwrap_or_default()
        } else {
            raw
        };
        Ok(JsonText(std::str::from_utf8(body)?.to_owned()))
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

/// JSON text written as binary jsonb (for COPY).
#[derive(Debug)]
struct JsonbOut<'a>(&'a str);

impl ToSql for JsonbOut<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
    tokio_postgres::types::to_sql_checked!();
}

/// One event as the raw keyset reader decodes it (every column).
#[allow(dead_code)]
struct RawEvent {
    global_position: i64,
    transaction_id: Xid8,
    event_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    aggregate_version: i64,
    event_type: String,
    event_version: i32,
    payload: JsonText,
    metadata: JsonText,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl RawEvent {
    fn from_row(r: &tokio_postgres::Row) -> RawEvent {
        let get = || -> Result<RawEvent, tokio_postgres::Error> {
            Ok(RawEvent {
                global_position: r.try_get(0)?,
                transaction_id: r.try_get(1)?,
                event_id: r.try_get(2)?,
                aggregate_type: r.try_get(3)?,
                aggregate_id: r.try_get(4)?,
                aggregate_version: r.try_get(5)?,
                event_type: r.try_get(6)?,
                event_version: r.try_get(7)?,
                payload: r.try_get(8)?,
                metadata: r.try_get(9)?,
                created_at: r.try_get(10)?,
            })
        };
        get().unwrap_or_else(|e| panic!("raw reader: cannot decode an event row: {e}"))
    }
}

/// Runs part `part` (see [`crate::events::Part`]) of a plan through the
/// raw INSERT, one client per writer.
pub async fn raw_appends(
    clients: &[(Arc<Client>, Statement)],
    plan: &Arc<Vec<Vec<Batch>>>,
    part: Part,
) -> Duration {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, (client, stmt)) in clients.iter().enumerate().take(plan.len()) {
        let (client, stmt, plan) = (client.clone(), stmt.clone(), plan.clone());
        tasks.spawn(async move {
            for b in part.of(&plan[w]) {
                client
                    .execute(
                        &stmt,
                        &[
                            &b.ids,
                            &b.aggregate_types,
                            &b.aggregate_ids,
                            &b.versions,
                            &b.event_types,
                            &b.payloads,
                            &b.metadata,
                        ],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("raw INSERT failed: {e}"));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a raw append writer panicked");
    }
    start.elapsed()
}

/// Writes every row of a plan with one binary COPY.
pub async fn raw_copy(client: &Client, plan: &[Vec<Batch>]) -> Duration {
    let start = Instant::now();
    let sink = client
        .copy_in(RAW_COPY)
        .await
        .unwrap_or_else(|e| panic!("COPY failed to start: {e}"));
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::INT8,
            Type::TEXT,
            Type::JSONB,
            Type::JSONB,
        ],
    );
    let mut writer = std::pin::pin!(writer);
    for b in plan.iter().flatten() {
        for i in 0..b.ids.len() {
            writer
                .as_mut()
                .write(&[
                    &b.ids[i],
                    &b.aggregate_types[i],
                    &b.aggregate_ids[i],
                    &b.versions[i],
                    &b.event_types[i],
                    &JsonbOut(&b.payloads[i]),
                    &JsonbOut(b.metadata[i]),
                ])
                .await
                .unwrap_or_else(|e| panic!("COPY row failed: {e}"));
        }
    }
    writer
        .as_mut()
        .finish()
        .await
        .unwrap_or_else(|e| panic!("COPY failed: {e}"));
    start.elapsed()
}

/// The raw keyset reader with a checkpoint UPDATE per page.
pub async fn catchup_noop(client: &Client, expected: u64, page: i64) -> Duration {
    let sel = client.prepare(RAW_PAGE).await.expect("prepare RAW_PAGE");
    let upd = client
        .prepare(RAW_CHECKPOINT)
        .await
        .expect("prepare RAW_CHECKPOINT");
    let start = Instant::now();
    let (mut after, mut total) = (0i64, 0u64);
    loop {
        client.batch_execute(RAW_BEGIN).await.expect("BEGIN");
        let rows = client
            .query(&sel, &[&after, &page])
            .await
            .unwrap_or_else(|e| panic!("raw page read failed: {e}"));
        let events: Vec<RawEvent> = rows.iter().map(RawEvent::from_row).collect();
        let n = events.len() as i64;
        if let Some(last) = events.last() {
            after = last.global_position;
            client
                .execute(&upd, &[&RAW_CHECKPOINT_NAME, &after, &n])
                .await
                .expect("raw checkpoint UPDATE failed");
        }
        client.batch_execute("COMMIT").await.expect("COMMIT");
        total += n as u64;
        if n < page {
            break;
        }
    }
    assert_eq!(total, expected, "raw reader read a different event count");
    start.elapsed()
}

/// The per-event handler's work in raw SQL: per page, the keyset read,
/// one prepared upsert per event (payload decoded in Rust, the upserts
/// pipelined), the checkpoint UPDATE, in one transaction. The same
/// statements as `BalancesPerEvent`, without the engine.
pub async fn catchup_per_event(client: &Client, expected: u64, page: i64) -> Duration {
    let sel = client.prepare(RAW_PAGE).await.expect("prepare RAW_PAGE");
    let upsert = client
        .prepare(UPSERT_ONE)
        .await
        .expect("prepare UPSERT_ONE");
    let upd = client
        .prepare(RAW_CHECKPOINT)
        .await
        .expect("prepare RAW_CHECKPOINT");
    let start = Instant::now();
    let (mut after, mut total) = (0i64, 0u64);
    loop {
        client.batch_execute(RAW_BEGIN).await.expect("BEGIN");
        let rows = client
            .query(&sel, &[&after, &page])
            .await
            .unwrap_or_else(|e| panic!("raw page read failed: {e}"));
        let events: Vec<RawEvent> = rows.iter().map(RawEvent::from_row).collect();
        let amounts: Vec<i64> = events
            .iter()
            .map(|e| {
                serde_json::from_str::<Amount>(&e.payload.0)
                    .unwrap_or_else(|err| panic!("raw per-event: bad payload: {err}"))
                    .amount
            })
            .collect();
        // Pipelined, like the library's handler (`pipelined() = true`):
        // every upsert is sent before the first reply is awaited.
        let upsert = &upsert;
        let upserts = events.iter().zip(&amounts).map(|(e, a)| async move {
            let params: [&(dyn ToSql + Sync); 2] = [&e.aggregate_id, a];
            client.execute(upsert, &params).await
        });
        for r in futures_util::future::join_all(upserts).await {
            r.unwrap_or_else(|err| panic!("raw per-event upsert failed: {err}"));
        }
        let n = events.len() as i64;
        if let Some(last) = events.last() {
            after = last.global_position;
            client
                .execute(&upd, &[&RAW_CHECKPOINT_NAME, &after, &n])
                .await
                .expect("raw checkpoint UPDATE failed");
        }
        client.batch_execute("COMMIT").await.expect("COMMIT");
        total += n as u64;
        if n < page {
            break;
        }
    }
    assert_eq!(
        total, expected,
        "raw per-event read a different event count"
    );
    start.elapsed()
}

/// The raw read-model page statement plus checkpoint, per page.
pub async fn catchup_read_model(client: &Client, expected: u64, page: i64) -> Duration {
    let work = client
        .prepare(RAW_READ_MODEL_PAGE)
        .await
        .expect("prepare RAW_READ_MODEL_PAGE");
    let upd = client
        .prepare(RAW_CHECKPOINT)
        .await
        .expect("prepare RAW_CHECKPOINT");
    let start = Instant::now();
    let (mut after, mut total) = (0i64, 0u64);
    loop {
        client.batch_execute(RAW_BEGIN).await.expect("BEGIN");
        let row = client
            .query_one(&work, &[&after, &page])
            .await
            .unwrap_or_else(|e| panic!("raw read-model page failed: {e}"));
        let n: i64 = row.get(0);
        if n > 0 {
            after = row.get(1);
            client
                .execute(&upd, &[&RAW_CHECKPOINT_NAME, &after, &n])
                .await
                .expect("raw checkpoint UPDATE failed");
        }
        client.batch_execute("COMMIT").await.expect("COMMIT");
        total += n as u64;
        if n < page {
            break;
        }
    }
    assert_eq!(
        total, expected,
        "raw read model read a different event count"
    );
    start.elapsed()
}
