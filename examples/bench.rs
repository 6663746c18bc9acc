//! Benchmarks of projectionist against plain SQL doing the same work on the
//! same database.
//!
//! ```sh
//! cargo run --release --example bench -- [--events N] [--json PATH] [--reps R] [--only CASE,...]
//!     [--batch-size N] [--tls] [--io-aggregates N] [--io-max-in-flight N] [--db-setting NAME=VALUE]
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run --release --example bench
//! ```
//!
//! With `DATABASE_URL` unset a throwaway cluster is started (it runs with
//! `fsync`, `full_page_writes` and `synchronous_commit` off, so commits are
//! cheaper than on a stock server); with it set, fresh databases are created
//! on that server (the role needs CREATEDB) and dropped at the end. The server
//! settings are printed and written to the JSON, with the machine's cores,
//! memory, load average and the round-trip time of a `SELECT 1`.
//!
//! The library's connections use `sslmode=disable` unless `--tls` is given,
//! because the raw baselines never use TLS and both sides should pay the
//! same transport (the library's own default is `prefer`: encrypted when the
//! server has `ssl = on`, as Debian's stock server does).
//! `--batch-size` sets the batch size of the catch-up and partition cases
//! (library and raw page size alike), for the tuning figures in
//! docs/performance.md.
//!
//! Every figure is the median of `--reps` repetitions (default 3). Each
//! repetition starts from truncated tables or reset checkpoints; library and
//! baseline alternate which one runs first.
//!
//! # Cases
//!
//! * `append_batch_{1,10,100,1000}`: one writer appends batches of that many
//!   events with `EventStore::append` and `ExpectedVersion::Exact` (streams
//!   rotate, versions tracked), against a prepared raw
//!   `INSERT … SELECT … FROM unnest(…)` of exactly the same rows, one
//!   autocommit statement per batch. The event count is sized by a probe so
//!   that the library side runs about two seconds.
//! * `append_batch_1_8_writers`, `append_batch_100_8_writers`: the same with
//!   eight concurrent writers, each on its own streams and connection.
//! * `append_copy_bulk`: the library's 1000-event batches (the
//!   `append_batch_1000` figure) against a raw binary `COPY events FROM
//!   STDIN` of the same rows: the ceiling for bulk loading.
//! * `catchup_noop`: `Runner::run_once` of a projection whose `handle_batch`
//!   does nothing, over `--events` seeded events (default batch size),
//!   against a raw keyset-paged read (`WHERE global_position > $1 ORDER BY
//!   global_position LIMIT $2`, every column decoded) with a checkpoint
//!   `UPDATE` per page, one transaction per page. This isolates the engine's
//!   overhead: the gap-safe query, decoding and the compare-and-set.
//!   Every raw catch-up baseline commits its pages with `synchronous_commit
//!   = off`, as the library's batch transactions do by default, so neither
//!   side waits for a WAL flush per page.
//! * `catchup_read_model`: a balances read model kept by the per-event
//!   handler (one prepared upsert per event, `pipelined() = true`: the
//!   engine runs a batch's handlers together, so the upserts travel back to
//!   back instead of one round trip each), over a quarter of `--events`
//!   (the event count is in the JSON).
//! * `catchup_read_model_batch`: the same read model via `handle_batch`,
//!   aggregating the page in Rust and writing one `INSERT … SELECT FROM
//!   unnest(…) ON CONFLICT DO UPDATE` per batch.
//!   Both read-model cases are compared with the same work as one SQL
//!   statement per page (`INSERT … SELECT … GROUP BY aggregate_id ON
//!   CONFLICT …` over the keyset page, plus the checkpoint `UPDATE`), which
//!   never ships the rows to the client.
//!   The per-event case also reports `raw_per_event_events_per_s`: the same
//!   statements in raw SQL (keyset page, one prepared upsert per event,
//!   pipelined likewise, checkpoint `UPDATE`), and its ratio.
//! * `wakeup_notify_ms`, `wakeup_poll_ms`: time from an append returning
//!   (committed) to the handler starting on that event, under the notify
//!   dispatcher and the poll dispatcher (default interval, reported).
//!   Notify: `--wakeups` appends (default 1000) spaced 2–5 ms at random.
//!   Poll: 200 appends spaced 5–25 ms at random (each wake-up can take up
//!   to an interval, and the wider spacing samples more poll phases).
//!   The figures are the medians over the repetitions of p50, p99 and max.
//! * `wakeup_raw_listen_ms`: the floor: a plain LISTEN connection receiving
//!   the NOTIFY of a raw `INSERT … RETURNING` + `pg_notify` statement. The
//!   server sends the notification at commit, before the writer has read
//!   its reply, so many samples arrive "before" the call returns; those
//!   count as 0 ms (the count is printed).
//! * `partitions`: catch-up of the seeded events by 1, 4 and 16 static
//!   partitions (one `Runner` each, all in this process, concurrently),
//!   no-op projection; events/s is the whole log over the wall time.
//! * `parallel_io`: an I/O-bound handler (it sleeps 10 ms per event, no
//!   database work) in concurrency mode (`Concurrency::new(64)`,
//!   `handle_concurrent`) over 5,000 events of 1,000 aggregates, against the
//!   same handler in sequential mode (`handle` in the batch transaction) over
//!   200 events. Both are catch-ups by `Runner::run_once` until the progress
//!   counter covers every event. The "baseline" is the sequential mode here,
//!   not raw SQL. The case also checks the concurrency contract: the peak of
//!   handlers running at once, every event handled, and each aggregate's
//!   events handled in version order.
//! * `worker_failover_s`: three `bank run-projections --mode worker`
//!   processes (the bank example binary, built next to this one) with short
//!   intervals (heartbeat 200 ms, timeout 1 s, rebalance 250 ms) share seven
//!   slots (`account_balances=6` + the notifier). Once they are balanced
//!   and after a random 0.3–1.3 s (so that the kill falls at a random phase
//!   of the heartbeat and rebalance timers), a worker that is not the leader
//!   is SIGKILLed; the figure is the time until none of its slots is
//!   assigned to it any more and every slot belongs to a live worker
//!   (expected between timeout − heartbeat interval and timeout + rebalance
//!   interval). The same with the leader killed is reported in
//!   `worker_mode.failover_leader_s`. At least 5 kills of each kind.
//! * `worker_rebalance_s`: two workers balanced (4/3), a third is started;
//!   the time from spawning it until the slots are spread 3/2/2 (also
//!   reported from its registration, `worker_mode.rebalance_from_join_s`).
//!   Each repetition of both cases runs on a fresh database migrated with
//!   `bank migrate`; the workers are idle (no events).
//! * `worker_rss_mb`: peak RSS (VmHWM) of a child process (this binary,
//!   re-executed with a hidden `--child-rss`) running eight light
//!   projections through a catch-up of the seeded events.
//!
//! # Reading the ratios
//!
//! `ratio = projectionist events/s ÷ raw SQL events/s`, both medians. 1.0
//! means the library costs nothing over hand-written SQL doing the same
//! work; 0.5 means it takes twice as long. The raw baselines skip what the
//! library adds on purpose (expected-version checks, NOTIFY, gap safety,
//! compare-and-set checkpoints), so a ratio is the price of those
//! guarantees plus any avoidable overhead. Targets are checked against the
//! stock-server run; the throwaway cluster makes commits cheaper, which
//! tends to lower the append ratios (the fixed per-statement work weighs
//! more).

use clap::Parser;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use futures_util::StreamExt;
use projectionist::testing::{TestDatabase, TestServer};
use projectionist::{
    async_trait, Concurrency, DispatcherKind, EventStore, ExpectedVersion, Filter, NewEvent,
    Projection, Runner, RunnerConfig, StoreConfig, StoredEvent, Transaction, DEFAULT_BATCH_SIZE,
    DEFAULT_POLL_INTERVAL,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};
use uuid::Uuid;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Benchmarks projectionist against plain SQL on the same PostgreSQL database"
)]
struct Args {
    /// Events seeded for the catch-up cases.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Run only these cases (comma separated; a prefix such as `append`
    /// selects every case starting with it).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Appends measured by the notify and raw LISTEN wake-up cases
    /// (default 1000, 200 with --quick).
    #[arg(long)]
    wakeups: Option<usize>,
    /// Shorter runs: smaller append cases and fewer wake-ups.
    #[arg(long)]
    quick: bool,
    /// Accounts (streams) the seeded events are spread over.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    accounts: u32,
    /// Diagnostic: `name=value` set on every benchmark database with
    /// `ALTER DATABASE … SET` (repeatable), e.g. `plan_cache_mode=force_generic_plan`.
    #[arg(long = "db-setting", value_name = "NAME=VALUE")]
    db_settings: Vec<String>,
    /// Batch size of the catch-up and partition cases (library
    /// `RunnerConfig::batch_size` and the raw baselines' page size).
    /// Default: the library's, 1000.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=projectionist::MAX_BATCH_SIZE))]
    batch_size: Option<i64>,
    /// Diagnostic: aggregates the `parallel_io` concurrency-mode events are
    /// spread over (more aggregates, fewer same-key chains in the window).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    io_aggregates: u32,
    /// Diagnostic: `max_in_flight` of the `parallel_io` concurrency mode.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    io_max_in_flight: u32,
    /// Let the library's connections negotiate TLS as they do by default
    /// (`sslmode=prefer`: encrypted when the server has `ssl = on`). Without
    /// it the library connects with `sslmode=disable`, like the raw
    /// baselines (which never use TLS), so that both sides pay the same
    /// transport. The bank worker processes always use the default.
    #[arg(long)]
    tls: bool,
    /// Diagnostic: the append cases' store sends no NOTIFY
    /// (`StoreConfig::notify_channel(None)`), to measure what the
    /// notification costs an append.
    #[arg(long)]
    no_append_notify: bool,
    /// Internal: run the RSS child against this database and print VmHWM.
    #[arg(long, hide = true, value_name = "DATABASE_URL")]
    child_rss: Option<String>,
}

/// Every selectable case, in run order.
const CASES: &[&str] = &[
    "append_batch_1",
    "append_batch_10",
    "append_batch_100",
    "append_batch_1000",
    "append_batch_1_8_writers",
    "append_batch_100_8_writers",
    "append_copy_bulk",
    "catchup_noop",
    "catchup_read_model",
    "catchup_read_model_batch",
    "wakeup_notify_ms",
    "wakeup_poll_ms",
    "wakeup_raw_listen_ms",
    "parallel_io",
    "partitions",
    "worker_failover_s",
    "worker_rebalance_s",
    "worker_rss_mb",
];

/// The append cases: (name, events per batch, writers).
const APPEND_CASES: &[(&str, usize, usize)] = &[
    ("append_batch_1", 1, 1),
    ("append_batch_10", 10, 1),
    ("append_batch_100", 100, 1),
    ("append_batch_1000", 1000, 1),
    ("append_batch_1_8_writers", 1, 8),
    ("append_batch_100_8_writers", 100, 8),
];

/// Streams each append writer rotates over.
const STREAMS_PER_WRITER: usize = 64;
/// Rows per raw INSERT statement when seeding.
const SEED_CHUNK: usize = 5_000;
/// Projections run by the RSS child.
const RSS_PROJECTIONS: usize = 8;
/// Partition counts of the `partitions` case.
const PARTITION_COUNTS: [i32; 3] = [1, 4, 16];
/// Aggregate and event types of every benchmark event.
const AGGREGATE_TYPE: &str = "Account";
const EVENT_TYPE: &str = "MoneyDeposited";

/// The raw append: the same columns the library writes, one statement.
const RAW_INSERT: &str = "INSERT INTO events (event_id, aggregate_type, aggregate_id, \
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
const UPSERT_ONE: &str = "INSERT INTO bench_balances (account_id, balance, event_count) \
     VALUES ($1, $2, 1) ON CONFLICT (account_id) DO UPDATE SET \
     balance = bench_balances.balance + excluded.balance, \
     event_count = bench_balances.event_count + 1";
const UPSERT_BATCH: &str = "INSERT INTO bench_balances (account_id, balance, event_count) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[]) \
     ON CONFLICT (account_id) DO UPDATE SET \
     balance = bench_balances.balance + excluded.balance, \
     event_count = bench_balances.event_count + excluded.event_count";
const RAW_CHECKPOINT_NAME: &str = "bench_raw_baseline";
/// How the raw catch-up baselines open a page's transaction: commits that do
/// not wait for the WAL flush, like the library's batch transactions
/// (`RunnerConfig::synchronous_commit(false)`, the default). Same round trip
/// as a bare `BEGIN`.
const RAW_BEGIN: &str = "BEGIN; SET LOCAL synchronous_commit = off";

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the Tokio runtime");
    if let Some(url) = args.child_rss.clone() {
        return runtime.block_on(child_rss(&url));
    }
    for entry in &args.only {
        if matching(entry).is_empty() {
            eprintln!(
                "error: --only {entry:?} names no case; cases: {}",
                CASES.join(", ")
            );
            return ExitCode::FAILURE;
        }
    }
    runtime.block_on(Bench::new(args).run());
    ExitCode::SUCCESS
}

/// The cases an `--only` entry selects: itself, or every case it prefixes.
fn matching(entry: &str) -> Vec<&'static str> {
    let entry = entry.trim();
    if let Some(c) = CASES.iter().find(|c| **c == entry) {
        return vec![c];
    }
    CASES
        .iter()
        .copied()
        .filter(|c| !entry.is_empty() && c.starts_with(entry))
        .collect()
}

/// The cases `only` selects (all when empty), in run order.
fn select(only: &[String]) -> Vec<&'static str> {
    if only.is_empty() {
        return CASES.to_vec();
    }
    let picked: Vec<&str> = only.iter().flat_map(|e| matching(e)).collect();
    CASES
        .iter()
        .copied()
        .filter(|c| picked.contains(c))
        .collect()
}

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

// ---------------------------------------------------------------------------
// Projections.

#[derive(serde::Deserialize)]
struct Amount {
    amount: i64,
}

/// Does nothing, batch-wise (the engine's own cost).
struct Noop {
    name: String,
}

#[async_trait]
impl Projection for Noop {
    fn name(&self) -> &str {
        &self.name
    }
    async fn handle(&self, _: &StoredEvent, _: &Transaction<'_>) -> projectionist::Result<()> {
        Ok(())
    }
    async fn handle_batch(
        &self,
        _: &[StoredEvent],
        _: &Transaction<'_>,
    ) -> projectionist::Result<()> {
        Ok(())
    }
}

/// Decodes every payload and sums the amounts in memory (the RSS child).
struct Light {
    name: String,
    sum: AtomicI64,
}

#[async_trait]
impl Projection for Light {
    fn name(&self) -> &str {
        &self.name
    }
    async fn handle(&self, event: &StoredEvent, _: &Transaction<'_>) -> projectionist::Result<()> {
        let a: Amount = event.decode()?;
        self.sum.fetch_add(a.amount, Ordering::Relaxed);
        Ok(())
    }
}

/// `bench_balances` via one upsert per event.
struct BalancesPerEvent;

#[async_trait]
impl Projection for BalancesPerEvent {
    fn name(&self) -> &str {
        "bench_balances_per_event"
    }
    /// One upsert per event: the statements commute per account, so the
    /// engine may pipeline them.
    fn pipelined(&self) -> bool {
        true
    }
    async fn handle(&self, event: &StoredEvent, tx: &Transaction<'_>) -> projectionist::Result<()> {
        let a: Amount = event.decode()?;
        let stmt = tx.prepare_cached(UPSERT_ONE).await?;
        tx.execute(&stmt, &[&event.aggregate_id, &a.amount]).await?;
        Ok(())
    }
}

/// `bench_balances` via one set-based upsert per batch.
struct BalancesBatch;

#[async_trait]
impl Projection for BalancesBatch {
    fn name(&self) -> &str {
        "bench_balances_batch"
    }
    async fn handle(&self, event: &StoredEvent, tx: &Transaction<'_>) -> projectionist::Result<()> {
        self.handle_batch(std::slice::from_ref(event), tx).await
    }
    async fn handle_batch(
        &self,
        events: &[StoredEvent],
        tx: &Transaction<'_>,
    ) -> projectionist::Result<()> {
        let mut acc: HashMap<&str, (i64, i64)> = HashMap::with_capacity(events.len());
        for e in events {
            let a: Amount = e.decode()?;
            let slot = acc.entry(e.aggregate_id.as_str()).or_default();
            slot.0 += a.amount;
            slot.1 += 1;
        }
        let mut ids = Vec::with_capacity(acc.len());
        let mut balances = Vec::with_capacity(acc.len());
        let mut counts = Vec::with_capacity(acc.len());
        for (id, (b, c)) in acc {
            ids.push(id);
            balances.push(b);
            counts.push(c);
        }
        let stmt = tx.prepare_cached(UPSERT_BATCH).await?;
        tx.execute(&stmt, &[&ids, &balances, &counts]).await?;
        Ok(())
    }
}

/// Records when the handler starts on each event.
struct Stamp {
    name: String,
    seen: mpsc::UnboundedSender<(i64, Instant)>,
}

#[async_trait]
impl Projection for Stamp {
    fn name(&self) -> &str {
        &self.name
    }
    async fn handle(&self, event: &StoredEvent, _: &Transaction<'_>) -> projectionist::Result<()> {
        let _ = self.seen.send((event.global_position, Instant::now()));
        Ok(())
    }
}

/// Aggregate types of the `parallel_io` case's two event sets.
const IO_SEQ_TYPE: &str = "IoSeq";
const IO_PAR_TYPE: &str = "IoPar";
/// The simulated I/O wait per event.
const IO_SLEEP: Duration = Duration::from_millis(10);

/// Waits `IO_SLEEP` per event inside the batch transaction (sequential mode).
struct SleepSequential;

#[async_trait]
impl Projection for SleepSequential {
    fn name(&self) -> &str {
        "bench_io_sequential"
    }
    fn filter(&self) -> Filter {
        Filter::all().aggregate_types([IO_SEQ_TYPE])
    }
    async fn handle(&self, _: &StoredEvent, _: &Transaction<'_>) -> projectionist::Result<()> {
        tokio::time::sleep(IO_SLEEP).await;
        Ok(())
    }
}

/// Waits `IO_SLEEP` per event in concurrency mode, and checks the mode's
/// contract as it goes: how many handlers run at once, that every event
/// arrives, and that each aggregate's events arrive in version order.
#[derive(Default)]
struct SleepConcurrent {
    max_in_flight: usize,
    running: AtomicUsize,
    peak: AtomicUsize,
    /// Per aggregate: the last version handled.
    versions: Mutex<HashMap<String, i64>>,
    /// Handlers that started on an aggregate's event before the previous
    /// one of the same aggregate (or twice on one event).
    out_of_order: AtomicUsize,
    /// Two handlers of one aggregate running at the same time.
    overlapping: AtomicUsize,
    busy: Mutex<HashSet<String>>,
    calls: AtomicUsize,
}

#[async_trait]
impl Projection for SleepConcurrent {
    fn name(&self) -> &str {
        "bench_io_concurrent"
    }
    fn filter(&self) -> Filter {
        Filter::all().aggregate_types([IO_PAR_TYPE])
    }
    fn concurrency(&self) -> Option<Concurrency> {
        Some(Concurrency::new(self.max_in_flight))
    }
    async fn handle(&self, _: &StoredEvent, _: &Transaction<'_>) -> projectionist::Result<()> {
        Err(projectionist::Error::handler_msg(
            "bench_io_concurrent: the engine called handle() in concurrency mode",
        ))
    }
    async fn handle_concurrent(&self, event: &StoredEvent) -> projectionist::Result<()> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::Relaxed);
        {
            let mut v = self.versions.lock().expect("poisoned");
            let last = v.entry(event.aggregate_id.clone()).or_insert(0);
            if event.aggregate_version != *last + 1 {
                self.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            *last = (*last).max(event.aggregate_version);
        }
        if !self
            .busy
            .lock()
            .expect("poisoned")
            .insert(event.aggregate_id.clone())
        {
            self.overlapping.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(IO_SLEEP).await;
        self.busy
            .lock()
            .expect("poisoned")
            .remove(&event.aggregate_id);
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Append plans: the same rows for the library and the raw baseline.

/// One append: a stream, its expected version and the events, in both the
/// library's and the raw statement's shape.
struct Batch {
    stream: String,
    expected: i64,
    events: Vec<NewEvent>,
    ids: Vec<Uuid>,
    aggregate_types: Vec<&'static str>,
    aggregate_ids: Vec<String>,
    versions: Vec<i64>,
    event_types: Vec<&'static str>,
    payloads: Vec<String>,
    metadata: Vec<&'static str>,
}

/// Per writer, its batches: `total` events split evenly, batches of `batch`
/// events rotating over the writer's own streams.
fn append_plan(rng: &mut StdRng, writers: usize, batch: usize, total: usize) -> Vec<Vec<Batch>> {
    let batches_per_writer = (total / writers / batch).max(1);
    (0..writers)
        .map(|w| {
            let mut versions = [0i64; STREAMS_PER_WRITER];
            (0..batches_per_writer)
                .map(|k| {
                    let s = k % STREAMS_PER_WRITER;
                    let stream = format!("w{w}-s{s}");
                    let expected = versions[s];
                    versions[s] += batch as i64;
                    let payloads: Vec<String> = (0..batch)
                        .map(|_| format!(r#"{{"amount": {}}}"#, rng.gen_range(1..=10_000)))
                        .collect();
                    let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::now_v7()).collect();
                    let events = ids
                        .iter()
                        .zip(&payloads)
                        .map(|(id, p)| {
                            NewEvent::from_json(EVENT_TYPE, p.clone()).with_event_id(*id)
                        })
                        .collect();
                    Batch {
                        aggregate_ids: vec![stream.clone(); batch],
                        stream,
                        expected,
                        events,
                        ids,
                        aggregate_types: vec![AGGREGATE_TYPE; batch],
                        versions: (1..=batch as i64).map(|v| expected + v).collect(),
                        event_types: vec![EVENT_TYPE; batch],
                        payloads,
                        metadata: vec!["{}"; batch],
                    }
                })
                .collect()
        })
        .collect()
}

fn plan_events(plan: &[Vec<Batch>]) -> usize {
    plan.iter().flatten().map(|b| b.events.len()).sum()
}

/// Runs a plan through `EventStore::append`, one task per writer.
async fn library_appends(store: &EventStore, plan: &Arc<Vec<Vec<Batch>>>) -> Duration {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..plan.len() {
        let (store, plan) = (store.clone(), plan.clone());
        tasks.spawn(async move {
            for b in &plan[w] {
                store
                    .append(
                        AGGREGATE_TYPE,
                        &b.stream,
                        ExpectedVersion::Exact(b.expected),
                        &b.events,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("library append failed: {e}"));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a library append writer panicked");
    }
    start.elapsed()
}

/// Runs a plan through the raw INSERT, one client per writer.
async fn raw_appends(
    clients: &[(Arc<Client>, Statement)],
    plan: &Arc<Vec<Vec<Batch>>>,
) -> Duration {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, (client, stmt)) in clients.iter().enumerate().take(plan.len()) {
        let (client, stmt, plan) = (client.clone(), stmt.clone(), plan.clone());
        tasks.spawn(async move {
            for b in &plan[w] {
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
async fn raw_copy(client: &Client, plan: &[Vec<Batch>]) -> Duration {
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

// ---------------------------------------------------------------------------
// Statistics and formatting.

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// (p50, p99, max) of latencies in ms.
fn latency_stats(mut ms: Vec<f64>) -> [f64; 3] {
    ms.sort_by(f64::total_cmp);
    [
        percentile(&ms, 0.50),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN),
    ]
}

fn rate(events: u64, d: Duration) -> f64 {
    events as f64 / d.as_secs_f64().max(1e-9)
}

fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

fn ev_s(x: f64) -> String {
    format!("{} ev/s", thousands(x))
}

fn round(x: f64, decimals: i32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let f = 10f64.powi(decimals);
    json!((x * f).round() / f)
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

fn fmt_latency(l: &[f64; 3]) -> String {
    format!("p50 {:.2} / p99 {:.2} / max {:.1} ms", l[0], l[1], l[2])
}

/// Peak resident set size of this process, in kB.
fn vm_hwm_kb() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------------
// The RSS child.

async fn child_rss(url: &str) -> ExitCode {
    let config = projectionist::parse_url(url).expect("child: invalid database URL");
    let store = EventStore::connect_config(config, StoreConfig::default())
        .expect("child: cannot build the store");
    let projections: Vec<Arc<dyn Projection>> = (0..RSS_PROJECTIONS)
        .map(|i| {
            Arc::new(Light {
                name: format!("bench_rss_{i}"),
                sum: AtomicI64::new(0),
            }) as Arc<dyn Projection>
        })
        .collect();
    let runner = Runner::new(store, RunnerConfig::default())
        .with_projections(&projections)
        .expect("child: cannot register the projections");
    runner.run_once().await.expect("child: catch-up failed");
    let handled = runner.progress().events_handled();
    match vm_hwm_kb() {
        Some(kb) => {
            println!("VmHWM_KB={kb} handled={handled}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("child: cannot read VmHWM from /proc/self/status");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Worker mode: real `bank run-projections --mode worker` processes.

const WORKER_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
const WORKER_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
const WORKER_REBALANCE_INTERVAL: Duration = Duration::from_millis(250);
/// account_balances in 6 partitions + large_withdrawal_notifier: 7 slots.
const WORKER_PARTITIONS: &str = "account_balances=6";
const WORKER_SLOTS: usize = 7;

/// A bank worker process; SIGKILLed on drop. Its stderr is kept (bounded)
/// for error messages.
struct BankWorker {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
}

impl BankWorker {
    fn spawn(bank: &Path, url: &str) -> Result<BankWorker, String> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut child = std::process::Command::new(bank)
            .env_remove("PARTITION_KEY")
            .env_remove("TOTAL_PARTITIONS")
            .env_remove("DISPATCHER")
            .env_remove("BATCH_SIZE")
            .env_remove("PROJECTIONS")
            .env_remove("RUST_LOG")
            .env("DATABASE_URL", url)
            .env("RUN_MODE", "worker")
            .env("HEARTBEAT_INTERVAL", ms(WORKER_HEARTBEAT_INTERVAL))
            .env("HEARTBEAT_TIMEOUT", ms(WORKER_HEARTBEAT_TIMEOUT))
            .env("REBALANCE_INTERVAL", ms(WORKER_REBALANCE_INTERVAL))
            .env("PROJECTION_PARTITIONS", WORKER_PARTITIONS)
            .env("ADMIN_ADDR", "off")
            .env("POOL_SIZE", "8")
            .env("LOG_LEVEL", "warn")
            .arg("run-projections")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bank.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(|l| l.ok())
                {
                    let mut g = log.lock().expect("poisoned");
                    if g.len() < 16_000 {
                        g.push_str(&line);
                        g.push('\n');
                    }
                }
            });
        }
        Ok(BankWorker { child, log })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
    }

    fn describe(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("exited ({s})"),
            Ok(None) => "running".to_owned(),
            Err(e) => format!("? ({e})"),
        };
        let log = self.log.lock().expect("poisoned").clone();
        format!("worker pid {}: {status}; stderr:\n{log}", self.pid())
    }
}

impl Drop for BankWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (live workers, assigned slots per live worker sorted, slots not held by
/// a live worker, assignment rows).
async fn distribution(c: &Client) -> Result<(usize, Vec<i64>, i64, i64), tokio_postgres::Error> {
    let live: i64 = c
        .query_one("SELECT count(*) FROM worker_nodes", &[])
        .await?
        .get(0);
    let counts: Vec<i64> = c
        .query(
            "SELECT count(*) FROM consumer_assignments a JOIN worker_nodes w USING (worker_id) \
             GROUP BY worker_id ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let r = c
        .query_one(
            "SELECT count(*) FILTER (WHERE NOT EXISTS \
                 (SELECT 1 FROM worker_nodes w WHERE w.worker_id = a.worker_id)), count(*) \
             FROM consumer_assignments a",
            &[],
        )
        .await?;
    Ok((live as usize, counts, r.get(0), r.get(1)))
}

/// Whether exactly `workers` workers are live and the slots are spread
/// ⌊N/M⌋/⌈N/M⌉ over them.
async fn balanced(c: &Client, workers: usize) -> bool {
    let Ok((live, counts, orphans, rows)) = distribution(c).await else {
        return false;
    };
    let (lo, hi) = (
        (WORKER_SLOTS / workers) as i64,
        WORKER_SLOTS.div_ceil(workers) as i64,
    );
    live == workers
        && orphans == 0
        && rows == WORKER_SLOTS as i64
        && counts.len() == workers.min(WORKER_SLOTS)
        && counts.iter().all(|&n| n == lo || n == hi)
}

/// The leader's (worker id, pid): the worker whose leader connection holds
/// the advisory lock.
async fn leader(c: &Client) -> Option<(String, i32)> {
    c.query_opt(
        "SELECT w.worker_id, w.pid FROM worker_nodes w WHERE EXISTS ( \
            SELECT 1 FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
            WHERE l.locktype = 'advisory' AND l.granted \
              AND s.application_name = 'projectionist-leader:' || w.worker_id)",
        &[],
    )
    .await
    .ok()
    .flatten()
    .map(|r| (r.get(0), r.get(1)))
}

/// Polls `check` every 5 ms until it holds; the time it took.
async fn poll_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<Duration, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Appends the workers' state and logs to an error.
fn with_logs(e: String, workers: &mut [BankWorker]) -> String {
    let logs: Vec<String> = workers.iter_mut().map(|w| w.describe()).collect();
    format!("{e}\n{}", logs.join("\n"))
}

/// Three workers balanced, one SIGKILLed (the leader or not): seconds
/// until every slot is held by a live worker again.
async fn failover_rep(
    bank: &Path,
    db: Result<TestDatabase, String>,
    kill_leader: bool,
    settle: Duration,
) -> Result<f64, String> {
    let db = db?;
    let c = db.connect().await.map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    let result = async {
        for _ in 0..3 {
            workers.push(BankWorker::spawn(bank, &db.url())?);
        }
        let r = async {
            poll_until(Duration::from_secs(30), "7 slots balanced over 3 workers", || {
                balanced(&c, 3)
            })
            .await?;
            poll_until(Duration::from_secs(10), "a leader", || async {
                leader(&c).await.is_some()
            })
            .await?;
            let (_, leader_pid) = leader(&c).await.ok_or("the leader vanished")?;
            let holders = c
                .query(
                    "SELECT w.worker_id, w.pid FROM worker_nodes w \
                     WHERE EXISTS (SELECT 1 FROM consumer_assignments a WHERE a.worker_id = w.worker_id) \
                     ORDER BY w.worker_id",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            let (victim_id, victim_pid): (String, i32) = holders
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .find(|(_, pid)| (*pid == leader_pid) == kill_leader)
                .ok_or("no worker to kill holds slots")?;
            Ok::<_, String>((victim_id, victim_pid))
        }
        .await;
        let (victim_id, victim_pid) = r.map_err(|e| with_logs(e, &mut workers))?;
        let victim = workers
            .iter_mut()
            .find(|w| w.pid() == victim_pid)
            .ok_or("the victim is not one of the spawned workers")?;
        // A random pause first, so that the kill falls at a random phase
        // of the heartbeat and rebalance timers (right after the balancing
        // it would always fall at the same one).
        tokio::time::sleep(settle).await;
        victim.kill();
        let killed = Instant::now();
        let moved = poll_until(
            Duration::from_secs(30),
            "the killed worker's slots to move to live workers",
            || async {
                c.query_one(
                    "SELECT count(*) FILTER (WHERE a.worker_id IS NULL OR a.worker_id = $1 OR NOT EXISTS \
                         (SELECT 1 FROM worker_nodes w WHERE w.worker_id = a.worker_id)), count(*) \
                     FROM consumer_assignments a",
                    &[&victim_id],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 0 && r.get::<_, i64>(1) == WORKER_SLOTS as i64)
            },
        )
        .await;
        let took = killed.elapsed();
        moved.map_err(|e| with_logs(e, &mut workers))?;
        // Sanity: the survivors end up balanced (2 workers: 4/3).
        poll_until(Duration::from_secs(10), "7 slots balanced over 2 workers", || {
            balanced(&c, 2)
        })
        .await
        .map_err(|e| with_logs(e, &mut workers))?;
        Ok(took.as_secs_f64())
    }
    .await;
    drop(workers);
    drop(c);
    if let Err(e) = db.drop_database().await {
        eprintln!("warning: {e}");
    }
    result
}

/// Two workers balanced, a third spawned: seconds from the spawn, and from
/// its registration, until the slots are balanced over three.
async fn rebalance_rep(
    bank: &Path,
    db: Result<TestDatabase, String>,
) -> Result<(f64, f64), String> {
    let db = db?;
    let c = db.connect().await.map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    let result = async {
        for _ in 0..2 {
            workers.push(BankWorker::spawn(bank, &db.url())?);
        }
        poll_until(
            Duration::from_secs(30),
            "7 slots balanced over 2 workers",
            || balanced(&c, 2),
        )
        .await
        .map_err(|e| with_logs(e, &mut workers))?;
        let spawned = Instant::now();
        workers.push(BankWorker::spawn(bank, &db.url())?);
        let joined = poll_until(
            Duration::from_secs(30),
            "the third worker to register",
            || async { distribution(&c).await.is_ok_and(|d| d.0 == 3) },
        )
        .await
        .map_err(|e| with_logs(e, &mut workers))?;
        poll_until(
            Duration::from_secs(30),
            "7 slots balanced over 3 workers",
            || balanced(&c, 3),
        )
        .await
        .map_err(|e| with_logs(e, &mut workers))?;
        let total = spawned.elapsed();
        Ok((total.as_secs_f64(), (total - joined).as_secs_f64()))
    }
    .await;
    drop(workers);
    drop(c);
    if let Err(e) = db.drop_database().await {
        eprintln!("warning: {e}");
    }
    result
}

// ---------------------------------------------------------------------------
// The benchmark.

/// A database seeded with events for the catch-up cases.
struct Seeded {
    db: TestDatabase,
    store: EventStore,
    client: Client,
    events: u64,
    amount: i64,
}

struct Bench {
    args: Args,
    cases: Vec<&'static str>,
    started: Instant,
    rng: StdRng,
    json: Map<String, Value>,
    rows: Vec<[String; 5]>,
    reps: u32,
    /// Batch size (page size) of the catch-up cases.
    batch: i64,
    /// Where the server's settings came from.
    server_kind: &'static str,
    dbs: Vec<TestDatabase>,
}

impl Bench {
    fn new(args: Args) -> Bench {
        let cases = select(&args.only);
        let reps = args.reps;
        let batch = args.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        Bench {
            args,
            cases,
            started: Instant::now(),
            rng: StdRng::seed_from_u64(42),
            json: Map::new(),
            rows: Vec::new(),
            reps,
            batch,
            server_kind: if std::env::var("DATABASE_URL").is_ok_and(|u| !u.trim().is_empty()) {
                "DATABASE_URL server"
            } else {
                "throwaway cluster (projectionist::testing)"
            },
            dbs: Vec::new(),
        }
    }

    /// The connection settings of the library's stores (`--tls`).
    fn lib_config(&self, db: &TestDatabase) -> tokio_postgres::Config {
        let mut config = db.config();
        if !self.args.tls {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        config
    }

    /// The runner configuration of the catch-up cases (`--batch-size`).
    fn catchup_config(&self) -> RunnerConfig {
        RunnerConfig::default()
            .batch_size(self.batch)
            .expect("--batch-size is range-checked")
    }

    fn wants(&self, case: &str) -> bool {
        self.cases.contains(&case)
    }

    fn progress(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:>6.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }

    fn row(&mut self, case: &str, lib: String, raw: String, ratio: String, target: String) {
        self.rows.push([case.to_owned(), lib, raw, ratio, target]);
    }

    /// The table rows in case order (a label sorts by the case it starts with).
    fn sorted_rows(&self) -> Vec<[String; 5]> {
        let key = |label: &str| {
            CASES
                .iter()
                .enumerate()
                .filter(|(_, c)| label.starts_with(*c))
                .max_by_key(|(_, c)| c.len())
                .map_or(CASES.len(), |(i, _)| i)
        };
        let mut rows = self.rows.clone();
        rows.sort_by_key(|r| key(&r[0]));
        rows
    }

    /// A fresh, migrated database.
    async fn fresh_db(&mut self) -> (TestDatabase, EventStore, Client) {
        let server = TestServer::shared().unwrap_or_else(|e| panic!("no PostgreSQL server: {e}"));
        let db = server
            .create_database()
            .await
            .unwrap_or_else(|e| panic!("cannot create a database: {e}"));
        projectionist::migrate(&db.config(), "public")
            .await
            .unwrap_or_else(|e| panic!("migration failed: {e}"));
        if !self.args.db_settings.is_empty() {
            let c = db
                .connect()
                .await
                .unwrap_or_else(|e| panic!("cannot connect: {e}"));
            for setting in &self.args.db_settings {
                let (name, value) = setting
                    .split_once('=')
                    .unwrap_or_else(|| panic!("--db-setting {setting:?}: expected NAME=VALUE"));
                let sql = format!(
                    "ALTER DATABASE \"{}\" SET {} = '{}'",
                    db.name(),
                    name.trim(),
                    value.trim().replace('\'', "''")
                );
                c.batch_execute(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql} failed: {e}"));
            }
        }
        let store_config = if self.args.no_append_notify {
            StoreConfig::default()
                .notify_channel(None)
                .expect("no channel is valid")
        } else {
            StoreConfig::default()
        };
        let store = EventStore::connect_config(self.lib_config(&db), store_config)
            .unwrap_or_else(|e| panic!("cannot build the store: {e}"));
        let client = db
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e}"));
        (db, store, client)
    }

    async fn run(mut self) {
        let (db, store, client) = self.fresh_db().await;
        self.server_info(&client).await;
        if APPEND_CASES.iter().any(|c| self.wants(c.0)) || self.wants("append_copy_bulk") {
            self.append_cases(&db, &store, &client).await;
        }
        if ["wakeup_notify_ms", "wakeup_poll_ms", "wakeup_raw_listen_ms"]
            .iter()
            .any(|c| self.wants(c))
        {
            client
                .batch_execute("TRUNCATE events RESTART IDENTITY")
                .await
                .expect("TRUNCATE events failed");
            self.wakeup_cases(&db).await;
        }
        drop((store, client));
        self.dbs.push(db);

        let needs_seed = [
            "catchup_noop",
            "catchup_read_model_batch",
            "partitions",
            "worker_rss_mb",
        ];
        if needs_seed.iter().any(|c| self.wants(c)) {
            let n = self.args.events;
            let seeded = self.seeded(n).await;
            if self.wants("catchup_noop") {
                self.catchup_noop(&seeded).await;
            }
            if self.wants("catchup_read_model_batch") {
                self.catchup_read_model(&seeded, true).await;
            }
            if self.wants("partitions") {
                self.partitions(&seeded).await;
            }
            if self.wants("worker_rss_mb") {
                self.worker_rss(&seeded).await;
            }
            self.dbs.push(seeded.db);
        }
        if self.wants("catchup_read_model") {
            let n = (self.args.events / 4).max(1);
            let seeded = self.seeded(n).await;
            self.catchup_read_model(&seeded, false).await;
            self.dbs.push(seeded.db);
        }
        if self.wants("parallel_io") {
            self.parallel_io().await;
        }
        if self.wants("worker_failover_s") || self.wants("worker_rebalance_s") {
            self.worker_cases().await;
        }
        self.finish().await;
    }

    async fn server_info(&mut self, client: &Client) {
        let show = |name: &'static str| async move {
            client
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .and_then(|r| r.try_get::<_, String>(0))
                .unwrap_or_else(|e| format!("? ({e})"))
        };
        let version = show("server_version").await;
        let fsync = show("fsync").await;
        let sync_commit = show("synchronous_commit").await;
        let fpw = show("full_page_writes").await;
        let shared_buffers = show("shared_buffers").await;
        let ssl = show("ssl").await;
        let max_connections = show("max_connections").await;
        let max_wal_size = show("max_wal_size").await;
        let work_mem = show("work_mem").await;
        // Round-trip latency of a prepared `SELECT 1` (median of 500): what
        // bounds every per-statement case (per-event handlers, batch-1
        // appends) on this machine at this moment.
        let ping = client.prepare("SELECT 1").await.expect("prepare SELECT 1");
        let mut rtts = Vec::with_capacity(500);
        for _ in 0..500 {
            let t = Instant::now();
            client.query_one(&ping, &[]).await.expect("SELECT 1 failed");
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let rtt_us = median(&rtts);
        let memory_gb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0 / 1024.0);
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        self.progress(format!(
            "server: {} — PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync_commit}, \
             full_page_writes={fpw}, shared_buffers={shared_buffers}, ssl={ssl}; {cores} cores; SELECT 1 round trip {rtt_us:.0} µs; {} reps; \
             library connections {}",
            self.server_kind,
            self.reps,
            if self.args.tls && ssl == "on" { "over TLS (--tls)" } else { "plain (sslmode=disable), like the raw baselines" }
        ));
        self.json.insert(
            "machine".into(),
            json!({"cores": cores, "memory_gb": memory_gb.map(|g| round(g, 1)),
                   "postgres_version": version, "round_trip_us": round(rtt_us, 1),
                   "load_average": std::fs::read_to_string("/proc/loadavg").ok()
                       .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))}),
        );
        self.json.insert(
            "server".into(),
            json!({
                "kind": self.server_kind,
                "fsync": fsync,
                "synchronous_commit": sync_commit,
                "full_page_writes": fpw,
                "shared_buffers": shared_buffers,
                "ssl": ssl,
                "max_connections": max_connections,
                "max_wal_size": max_wal_size,
                "work_mem": work_mem,
            }),
        );
        self.json.insert("events".into(), json!(self.args.events));
        if !self.args.db_settings.is_empty() {
            self.json
                .insert("db_settings".into(), json!(self.args.db_settings));
            self.progress(format!(
                "database settings: {}",
                self.args.db_settings.join(", ")
            ));
        }
        self.json.insert("reps".into(), json!(self.reps));
        self.json
            .insert("library_tls".into(), json!(self.args.tls && ssl == "on"));
    }

    // -- appends ------------------------------------------------------------

    async fn append_cases(&mut self, db: &TestDatabase, store: &EventStore, admin: &Client) {
        let truncate = || async {
            admin
                .batch_execute("TRUNCATE events RESTART IDENTITY")
                .await
                .expect("TRUNCATE events failed");
        };
        let mut raw_clients = Vec::new();
        for _ in 0..8 {
            let c = db
                .connect()
                .await
                .unwrap_or_else(|e| panic!("cannot connect: {e}"));
            let stmt = c
                .prepare(RAW_INSERT)
                .await
                .expect("cannot prepare RAW_INSERT");
            raw_clients.push((Arc::new(c), stmt));
        }
        let target_secs = if self.args.quick { 0.6 } else { 1.8 };
        let mut lib_1000: Option<(f64, usize)> = None;
        for &(name, batch, writers) in APPEND_CASES {
            let wanted =
                self.wants(name) || (name == "append_batch_1000" && self.wants("append_copy_bulk"));
            if !wanted {
                continue;
            }
            // Probe (also warms the pool and the raw connections): size the
            // case so the library side runs about `target_secs`.
            let unit = batch * writers;
            let probe_events = (unit * 4).max(if batch == 1 { 1_500 } else { 4_000 });
            let probe = Arc::new(append_plan(&mut self.rng, writers, batch, probe_events));
            truncate().await;
            let d = library_appends(store, &probe).await;
            truncate().await;
            raw_appends(&raw_clients, &probe).await;
            let probe_rate = rate(plan_events(&probe) as u64, d);
            // Floors keep an unlucky probe (a slow fsync) from making a case
            // too short to measure.
            let floor = match batch {
                1 => 3_000,
                10 => 10_000,
                100 => 20_000,
                _ => 50_000,
            };
            let floor = if self.args.quick { floor / 4 } else { floor };
            let total = ((probe_rate * target_secs) as usize).clamp(floor.max(unit * 5), 400_000)
                / unit
                * unit;
            let plan = Arc::new(append_plan(&mut self.rng, writers, batch, total));
            let events = plan_events(&plan) as u64;
            let (mut lib, mut raw) = (Vec::new(), Vec::new());
            for rep in 0..self.reps {
                for run_lib in [rep % 2 == 0, rep % 2 == 1] {
                    truncate().await;
                    if run_lib {
                        lib.push(rate(events, library_appends(store, &plan).await));
                    } else {
                        raw.push(rate(events, raw_appends(&raw_clients, &plan).await));
                    }
                }
                self.progress(format!(
                    "{name} rep {}/{}: projectionist {}, raw INSERT {} ({events} events, {batch}/batch, {writers} writer(s))",
                    rep + 1,
                    self.reps,
                    ev_s(*lib.last().unwrap_or(&f64::NAN)),
                    ev_s(*raw.last().unwrap_or(&f64::NAN)),
                ));
            }
            let (l, r) = (median(&lib), median(&raw));
            if name == "append_batch_1000" {
                lib_1000 = Some((l, total));
            }
            if !self.wants(name) {
                continue;
            }
            let ratio = l / r;
            let target = if name == "append_batch_100" {
                format!("ratio ≥ 0.8 {}", mark(ratio >= 0.8))
            } else {
                "—".into()
            };
            self.json.insert(
                name.into(),
                json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                       "ratio": round(ratio, 3), "events": events, "batch": batch, "writers": writers}),
            );
            self.row(name, ev_s(l), ev_s(r), format!("{ratio:.2}"), target);
        }
        if self.wants("append_copy_bulk") {
            let (l, total) = lib_1000.expect("append_batch_1000 ran");
            let plan = append_plan(&mut self.rng, 1, 1000, total.max(100_000));
            let events = plan_events(&plan) as u64;
            let copier = &raw_clients[0].0;
            let mut raw = Vec::new();
            for rep in 0..self.reps {
                truncate().await;
                raw.push(rate(events, raw_copy(copier, &plan).await));
                self.progress(format!(
                    "append_copy_bulk rep {}/{}: raw COPY {} ({events} rows)",
                    rep + 1,
                    self.reps,
                    ev_s(raw[raw.len() - 1])
                ));
            }
            let r = median(&raw);
            let ratio = l / r;
            self.json.insert(
                "append_copy_bulk".into(),
                json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                       "ratio": round(ratio, 3), "events": events,
                       "note": "events_per_s is the library's append_batch_1000 figure; raw is one binary COPY"}),
            );
            self.row(
                "append_copy_bulk (lib = batch 1000)",
                ev_s(l),
                format!("{} (COPY)", ev_s(r)),
                format!("{ratio:.2}"),
                "—".into(),
            );
        }
        truncate().await;
    }

    // -- seeding --------------------------------------------------------------

    async fn seeded(&mut self, n: u64) -> Seeded {
        let (db, store, client) = self.fresh_db().await;
        let started = Instant::now();
        let stmt = client
            .prepare(RAW_INSERT)
            .await
            .expect("prepare RAW_INSERT");
        let accounts = self.args.accounts as usize;
        let mut versions = vec![0i64; accounts];
        let names: Vec<String> = (0..accounts).map(|a| format!("acct-{a:05}")).collect();
        let mut amount = 0i64;
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(SEED_CHUNK);
            left -= k;
            let (mut ids, mut aids, mut vers, mut payloads) = (
                Vec::with_capacity(k),
                Vec::with_capacity(k),
                Vec::with_capacity(k),
                Vec::with_capacity(k),
            );
            for _ in 0..k {
                let a = self.rng.gen_range(0..accounts);
                versions[a] += 1;
                let x: i64 = self.rng.gen_range(1..=10_000);
                amount += x;
                ids.push(Uuid::now_v7());
                aids.push(names[a].as_str());
                vers.push(versions[a]);
                payloads.push(format!(r#"{{"amount": {x}}}"#));
            }
            client
                .execute(
                    &stmt,
                    &[
                        &ids,
                        &vec![AGGREGATE_TYPE; k],
                        &aids,
                        &vers,
                        &vec![EVENT_TYPE; k],
                        &payloads,
                        &vec!["{}"; k],
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("seeding INSERT failed: {e}"));
        }
        client
            .batch_execute("VACUUM (ANALYZE) events")
            .await
            .expect("VACUUM events failed");
        client
            .batch_execute(
                "CREATE TABLE bench_balances (account_id text PRIMARY KEY, \
                    balance bigint NOT NULL, event_count bigint NOT NULL)",
            )
            .await
            .expect("CREATE TABLE bench_balances failed");
        client
            .execute(
                "INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions) \
                 VALUES ($1, 0, 1)",
                &[&RAW_CHECKPOINT_NAME],
            )
            .await
            .expect("cannot insert the raw baseline's checkpoint row");
        self.progress(format!(
            "seeded {n} events over {accounts} accounts in {:.1}s ({} rows per INSERT, then VACUUM ANALYZE)",
            started.elapsed().as_secs_f64(),
            SEED_CHUNK
        ));
        Seeded {
            db,
            store,
            client,
            events: n,
            amount,
        }
    }

    // -- catch-up ------------------------------------------------------------

    /// `run_once` of `projection` from the start; loops if an open
    /// transaction elsewhere held the watermark back.
    async fn library_catchup(
        &self,
        s: &Seeded,
        projection: Arc<dyn Projection>,
        config: RunnerConfig,
    ) -> Duration {
        self.catchup_count(&s.store, &s.client, s.events, projection, config)
            .await
    }

    /// `run_once` of `projection` from a deleted checkpoint until its
    /// progress counter reaches `expected` (looping if an open transaction
    /// elsewhere held the watermark back); the wall time.
    async fn catchup_count(
        &self,
        store: &EventStore,
        client: &Client,
        expected: u64,
        projection: Arc<dyn Projection>,
        config: RunnerConfig,
    ) -> Duration {
        client
            .execute(
                "DELETE FROM projection_checkpoints WHERE projection_name = $1",
                &[&projection.name()],
            )
            .await
            .expect("cannot reset the checkpoint");
        let name = projection.name().to_owned();
        let runner = Runner::new(store.clone(), config)
            .with_projection(projection)
            .expect("cannot register the projection");
        let start = Instant::now();
        loop {
            runner
                .run_once()
                .await
                .unwrap_or_else(|e| panic!("{name}: run_once failed: {e}"));
            if runner.progress().events_handled() >= expected {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "{name}: handled {} of {expected} events after 60s: is a transaction held open on the server?",
                    runner.progress().events_handled(),
                );
            }
            self.progress(format!(
                "{name}: only {} of {expected} events handled after run_once (open transaction elsewhere?); retrying",
                runner.progress().events_handled(),
            ));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    /// The raw keyset reader with a checkpoint UPDATE per page.
    async fn raw_catchup_noop(&self, s: &Seeded, page: i64) -> Duration {
        let client = &s.client;
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
        assert_eq!(total, s.events, "raw reader read a different event count");
        start.elapsed()
    }

    /// The per-event handler's work in raw SQL: per page, the keyset read,
    /// one prepared upsert per event (payload decoded in Rust, the upserts
    /// pipelined), the checkpoint UPDATE, in one transaction. The same
    /// statements as `BalancesPerEvent`, without the engine.
    async fn raw_catchup_per_event(&self, s: &Seeded, page: i64) -> Duration {
        let client = &s.client;
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
            total, s.events,
            "raw per-event read a different event count"
        );
        start.elapsed()
    }

    /// The raw read-model page statement plus checkpoint, per page.
    async fn raw_catchup_read_model(&self, s: &Seeded, page: i64) -> Duration {
        let client = &s.client;
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
            total, s.events,
            "raw read model read a different event count"
        );
        start.elapsed()
    }

    async fn check_balances(&self, s: &Seeded, who: &str) {
        let row = s
            .client
            .query_one(
                "SELECT coalesce(sum(event_count), 0)::int8, coalesce(sum(balance), 0)::int8 FROM bench_balances",
                &[],
            )
            .await
            .expect("cannot read bench_balances");
        let (count, sum): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            (count, sum),
            (s.events as i64, s.amount),
            "{who}: bench_balances totals are wrong"
        );
    }

    async fn reset_raw_checkpoint(&self, s: &Seeded) {
        s.client
            .execute(
                "UPDATE projection_checkpoints SET last_global_position = 0, events_handled = 0 \
                 WHERE projection_name = $1",
                &[&RAW_CHECKPOINT_NAME],
            )
            .await
            .expect("cannot reset the raw checkpoint");
    }

    async fn catchup_noop(&mut self, s: &Seeded) {
        // Untimed warm-up of both sides (caches, connections, plans).
        let warm = Arc::new(Noop {
            name: "bench_noop".into(),
        });
        self.library_catchup(s, warm, self.catchup_config()).await;
        self.reset_raw_checkpoint(s).await;
        self.raw_catchup_noop(s, self.batch).await;
        let (mut lib, mut raw) = (Vec::new(), Vec::new());
        for rep in 0..self.reps {
            for side in 0..2 {
                if (side == 0) == (rep % 2 == 0) {
                    let p = Arc::new(Noop {
                        name: "bench_noop".into(),
                    });
                    let d = self.library_catchup(s, p, self.catchup_config()).await;
                    lib.push(rate(s.events, d));
                } else {
                    self.reset_raw_checkpoint(s).await;
                    let d = self.raw_catchup_noop(s, self.batch).await;
                    raw.push(rate(s.events, d));
                }
            }
            self.progress(format!(
                "catchup_noop rep {}/{}: projectionist {}, raw keyset {} ({} events, page {})",
                rep + 1,
                self.reps,
                ev_s(lib[lib.len() - 1]),
                ev_s(raw[raw.len() - 1]),
                s.events,
                self.batch
            ));
        }
        let (l, r) = (median(&lib), median(&raw));
        let ratio = l / r;
        self.json.insert(
            "catchup_noop".into(),
            json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                   "ratio": round(ratio, 3), "events": s.events, "batch_size": self.batch}),
        );
        self.row(
            "catchup_noop",
            ev_s(l),
            ev_s(r),
            format!("{ratio:.2}"),
            format!("ratio ≥ 0.9 {}", mark(ratio >= 0.9)),
        );
    }

    async fn catchup_read_model(&mut self, s: &Seeded, batch: bool) {
        let name = if batch {
            "catchup_read_model_batch"
        } else {
            "catchup_read_model"
        };
        let (mut lib, mut raw, mut raw_per_event) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..self.reps {
            if !batch {
                s.client
                    .batch_execute("TRUNCATE bench_balances")
                    .await
                    .expect("TRUNCATE bench_balances failed");
                self.reset_raw_checkpoint(s).await;
                let d = self.raw_catchup_per_event(s, self.batch).await;
                self.check_balances(s, "raw per-event").await;
                raw_per_event.push(rate(s.events, d));
            }
            for side in 0..2 {
                s.client
                    .batch_execute("TRUNCATE bench_balances")
                    .await
                    .expect("TRUNCATE bench_balances failed");
                if (side == 0) == (rep % 2 == 0) {
                    let p: Arc<dyn Projection> = if batch {
                        Arc::new(BalancesBatch)
                    } else {
                        Arc::new(BalancesPerEvent)
                    };
                    let d = self.library_catchup(s, p, self.catchup_config()).await;
                    self.check_balances(s, name).await;
                    lib.push(rate(s.events, d));
                } else {
                    self.reset_raw_checkpoint(s).await;
                    let d = self.raw_catchup_read_model(s, self.batch).await;
                    self.check_balances(s, "raw read model").await;
                    raw.push(rate(s.events, d));
                }
            }
            self.progress(format!(
                "{name} rep {}/{}: projectionist {}, raw SQL {}{} ({} events)",
                rep + 1,
                self.reps,
                ev_s(lib[lib.len() - 1]),
                ev_s(raw[raw.len() - 1]),
                raw_per_event
                    .last()
                    .map(|r| format!(", raw per-event upserts {}", ev_s(*r)))
                    .unwrap_or_default(),
                s.events
            ));
        }
        let (l, r) = (median(&lib), median(&raw));
        let ratio = l / r;
        let mut entry = json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                               "ratio": round(ratio, 3), "events": s.events,
                               "accounts": self.args.accounts, "batch_size": self.batch});
        let target = if batch {
            format!("ratio ≥ 0.8 {}", mark(ratio >= 0.8))
        } else {
            entry["note"] = json!("per-event handler (pipelined) run over events/4");
            let rpe = median(&raw_per_event);
            entry["raw_per_event_events_per_s"] = round(rpe, 0);
            entry["ratio_to_raw_per_event"] = round(l / rpe, 3);
            format!(
                "≥ 25,000 ev/s {} (raw per-event upserts: {}, ratio {:.2})",
                mark(l >= 25_000.0),
                ev_s(rpe),
                l / rpe
            )
        };
        self.json.insert(name.into(), entry);
        let label = if batch {
            name.to_owned()
        } else {
            format!("{name} ({} events)", s.events)
        };
        self.row(&label, ev_s(l), ev_s(r), format!("{ratio:.2}"), target);
    }

    // -- concurrency mode -------------------------------------------------------

    /// Appends `n` events of `aggregate_type`, each to one of `aggregates`
    /// streams picked at random by `rng` (versions kept), with the raw INSERT.
    async fn insert_events(
        rng: &mut StdRng,
        client: &Client,
        aggregate_type: &str,
        n: usize,
        aggregates: usize,
    ) {
        let stmt = client
            .prepare(RAW_INSERT)
            .await
            .expect("prepare RAW_INSERT");
        let names: Vec<String> = (0..aggregates)
            .map(|a| format!("{}-{a:05}", aggregate_type.to_lowercase()))
            .collect();
        let mut versions = vec![0i64; aggregates];
        let mut left = n;
        while left > 0 {
            let k = left.min(SEED_CHUNK);
            left -= k;
            let (mut ids, mut aids, mut vers, mut payloads) = (
                Vec::with_capacity(k),
                Vec::with_capacity(k),
                Vec::with_capacity(k),
                Vec::with_capacity(k),
            );
            for _ in 0..k {
                let a = rng.gen_range(0..aggregates);
                versions[a] += 1;
                ids.push(Uuid::now_v7());
                aids.push(names[a].as_str());
                vers.push(versions[a]);
                payloads.push(format!(r#"{{"amount": {}}}"#, rng.gen_range(1..=10_000)));
            }
            client
                .execute(
                    &stmt,
                    &[
                        &ids,
                        &vec![aggregate_type; k],
                        &aids,
                        &vers,
                        &vec![EVENT_TYPE; k],
                        &payloads,
                        &vec!["{}"; k],
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("INSERT of {aggregate_type} events failed: {e}"));
        }
    }

    async fn parallel_io(&mut self) {
        const SEQ_EVENTS: usize = 200;
        const PAR_EVENTS: usize = 5_000;
        let par_aggregates = self.args.io_aggregates as usize;
        let max_in_flight = self.args.io_max_in_flight as usize;
        let (db, store, client) = self.fresh_db().await;
        let (mut seq, mut par) = (Vec::new(), Vec::new());
        let (mut peak, mut out_of_order, mut overlapping, mut extra_calls) =
            (0usize, 0usize, 0usize, 0usize);
        for rep in 0..self.reps {
            // A fresh arrangement per repetition, from a seed of its own:
            // where same-aggregate events fall decides how often the window
            // waits on a chain (see docs/performance.md), so the median
            // covers several arrangements and does not depend on which
            // cases ran before.
            let mut rng = StdRng::seed_from_u64(4242 + u64::from(rep));
            client
                .batch_execute("TRUNCATE events RESTART IDENTITY")
                .await
                .expect("TRUNCATE events failed");
            Self::insert_events(&mut rng, &client, IO_SEQ_TYPE, SEQ_EVENTS, SEQ_EVENTS).await;
            Self::insert_events(&mut rng, &client, IO_PAR_TYPE, PAR_EVENTS, par_aggregates).await;
            client
                .batch_execute("ANALYZE events")
                .await
                .expect("ANALYZE events failed");
            for side in 0..2 {
                if (side == 0) == (rep % 2 == 0) {
                    let d = self
                        .catchup_count(
                            &store,
                            &client,
                            SEQ_EVENTS as u64,
                            Arc::new(SleepSequential),
                            RunnerConfig::default(),
                        )
                        .await;
                    seq.push(rate(SEQ_EVENTS as u64, d));
                } else {
                    let p = Arc::new(SleepConcurrent {
                        max_in_flight,
                        ..SleepConcurrent::default()
                    });
                    let d = self
                        .catchup_count(
                            &store,
                            &client,
                            PAR_EVENTS as u64,
                            p.clone(),
                            RunnerConfig::default(),
                        )
                        .await;
                    par.push(rate(PAR_EVENTS as u64, d));
                    let last_versions: i64 = p.versions.lock().expect("poisoned").values().sum();
                    assert_eq!(
                        last_versions, PAR_EVENTS as i64,
                        "parallel_io: not every aggregate's events were all handled"
                    );
                    peak = peak.max(p.peak.load(Ordering::SeqCst));
                    out_of_order += p.out_of_order.load(Ordering::Relaxed);
                    overlapping += p.overlapping.load(Ordering::Relaxed);
                    extra_calls += p.calls.load(Ordering::Relaxed).saturating_sub(PAR_EVENTS);
                }
            }
            self.progress(format!(
                "parallel_io rep {}/{}: concurrency mode {} ({PAR_EVENTS} events, {par_aggregates} aggregates, \
                 max_in_flight {max_in_flight}, peak running {peak}), sequential {} ({SEQ_EVENTS} events); \
                 {} ms per event",
                rep + 1,
                self.reps,
                ev_s(par[par.len() - 1]),
                ev_s(seq[seq.len() - 1]),
                IO_SLEEP.as_millis()
            ));
        }
        if out_of_order + overlapping + extra_calls > 0 {
            eprintln!(
                "           parallel_io: LIBRARY PROBLEM: {out_of_order} events out of aggregate order, \
                 {overlapping} overlapping handlers of one aggregate, {extra_calls} extra handler calls"
            );
        }
        let (l, r) = (median(&par), median(&seq));
        let ratio = l / r;
        let ideal = max_in_flight as f64 / IO_SLEEP.as_secs_f64();
        self.json.insert(
            "parallel_io".into(),
            json!({"events_per_s": round(l, 0), "sequential_events_per_s": round(r, 1),
                   "ratio": round(ratio, 1), "max_in_flight": max_in_flight,
                   "peak_running": peak, "ideal_events_per_s": round(ideal, 0),
                   "events": PAR_EVENTS, "aggregates": par_aggregates,
                   "sequential_events": SEQ_EVENTS, "handler_sleep_ms": IO_SLEEP.as_millis() as u64,
                   "out_of_order": out_of_order, "overlapping": overlapping,
                   "extra_handler_calls": extra_calls}),
        );
        self.row(
            &format!("parallel_io (10 ms handler, {max_in_flight} in flight)"),
            format!("{} (peak {peak} running)", ev_s(l)),
            format!("{} (sequential mode)", ev_s(r)),
            format!("{ratio:.1}"),
            format!("ratio ≥ 40 {}", mark(ratio >= 40.0)),
        );
        drop((store, client));
        self.dbs.push(db);
    }

    // -- worker mode ----------------------------------------------------------

    /// The bank example binary next to this one; (re)built with cargo when
    /// run under `cargo run`, so that it matches the library.
    async fn bank_exe(&self) -> Result<PathBuf, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?;
        let dir = exe
            .parent()
            .ok_or("this binary has no parent directory")?
            .to_path_buf();
        let bank = dir.join("bank");
        if let Ok(cargo) = std::env::var("CARGO") {
            let release = dir
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|n| n == "release");
            self.progress("building the bank example (cargo build --example bank)");
            let mut cmd = tokio::process::Command::new(cargo);
            cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
                "build",
                "--quiet",
                "--example",
                "bank",
            ]);
            if release {
                cmd.arg("--release");
            }
            match cmd.status().await {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!(
                    "warning: building the bank example failed ({s}); using the existing binary"
                ),
                Err(e) => eprintln!("warning: cannot run cargo ({e}); using the existing binary"),
            }
        }
        if bank.exists() {
            Ok(bank)
        } else {
            Err(format!(
                "{} is missing: build it with `cargo build --release --example bank`",
                bank.display()
            ))
        }
    }

    /// A fresh database migrated by `bank migrate`.
    async fn bank_db(&self, bank: &Path) -> Result<TestDatabase, String> {
        let server = TestServer::shared().map_err(|e| format!("no PostgreSQL server: {e}"))?;
        let db = server
            .create_database()
            .await
            .map_err(|e| format!("cannot create a database: {e}"))?;
        let out = tokio::process::Command::new(bank)
            .env("DATABASE_URL", db.url())
            .env("LOG_LEVEL", "warn")
            .env_remove("RUST_LOG")
            .arg("migrate")
            .output()
            .await
            .map_err(|e| format!("cannot run {} migrate: {e}", bank.display()))?;
        if !out.status.success() {
            let msg = format!(
                "bank migrate failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = db.drop_database().await;
            return Err(msg);
        }
        Ok(db)
    }

    async fn worker_cases(&mut self) {
        let bank = match self.bank_exe().await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: worker cases skipped: {e}");
                self.json.insert("worker_failover_s".into(), Value::Null);
                self.json.insert("worker_rebalance_s".into(), Value::Null);
                self.json.insert("worker_mode".into(), json!({"error": e}));
                self.row(
                    "worker_failover_s",
                    "skipped".into(),
                    "—".into(),
                    "—".into(),
                    e,
                );
                return;
            }
        };
        let bound = WORKER_HEARTBEAT_TIMEOUT + WORKER_REBALANCE_INTERVAL;
        let mut details = json!({
            "workers": 3,
            "slots": WORKER_SLOTS,
            "projection_partitions": WORKER_PARTITIONS,
            "heartbeat_interval_ms": WORKER_HEARTBEAT_INTERVAL.as_millis() as u64,
            "heartbeat_timeout_ms": WORKER_HEARTBEAT_TIMEOUT.as_millis() as u64,
            "rebalance_interval_ms": WORKER_REBALANCE_INTERVAL.as_millis() as u64,
            "failover_bound_s": bound.as_secs_f64(),
            "failover_expected_range_s": [
                (WORKER_HEARTBEAT_TIMEOUT - WORKER_HEARTBEAT_INTERVAL).as_secs_f64(),
                bound.as_secs_f64()
            ],
            "load": "idle (no events)",
        });
        if self.wants("worker_failover_s") {
            let (mut plain, mut leader, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            // At least 5 kills of each kind: the figure depends on the
            // phase the kill falls at, and a repetition takes 2-3 s.
            let reps = self.reps.max(5);
            for rep in 0..reps {
                for kill_leader in [false, true] {
                    let settle = Duration::from_millis(self.rng.gen_range(300..=1300));
                    match failover_rep(&bank, self.bank_db(&bank).await, kill_leader, settle).await
                    {
                        Ok(s) => {
                            self.progress(format!(
                                "worker_failover_s rep {}/{}: {} SIGKILLed, its slots reassigned after {s:.3}s \
                                 (heartbeat timeout {:?} + rebalance interval {:?} = {:.2}s)",
                                rep + 1,
                                reps,
                                if kill_leader { "the leader" } else { "a non-leader worker" },
                                WORKER_HEARTBEAT_TIMEOUT,
                                WORKER_REBALANCE_INTERVAL,
                                bound.as_secs_f64()
                            ));
                            if kill_leader {
                                leader.push(s)
                            } else {
                                plain.push(s)
                            }
                        }
                        Err(e) => {
                            eprintln!("error: worker_failover_s rep {}: {e}", rep + 1);
                            errors.push(e);
                        }
                    }
                }
            }
            let (m, ml) = (median(&plain), median(&leader));
            self.json.insert("worker_failover_s".into(), round(m, 3));
            details["failover_reps_s"] =
                json!(plain.iter().map(|s| round(*s, 3)).collect::<Vec<_>>());
            details["failover_leader_s"] = round(ml, 3);
            details["failover_leader_reps_s"] =
                json!(leader.iter().map(|s| round(*s, 3)).collect::<Vec<_>>());
            if !errors.is_empty() {
                details["failover_errors"] = json!(errors);
            }
            let b = bound.as_secs_f64();
            self.row(
                "worker_failover_s (non-leader SIGKILLed)",
                format!("{m:.2} s"),
                "—".into(),
                "—".into(),
                format!("≤ timeout + rebalance interval = {b:.2} s {}", mark(m <= b)),
            );
            self.row(
                "worker_failover_s (leader SIGKILLed)",
                format!("{ml:.2} s"),
                "—".into(),
                "—".into(),
                format!("≤ {b:.2} s {}", mark(ml <= b)),
            );
        }
        if self.wants("worker_rebalance_s") {
            let (mut total, mut from_join, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..self.reps {
                match rebalance_rep(&bank, self.bank_db(&bank).await).await {
                    Ok((t, j)) => {
                        self.progress(format!(
                            "worker_rebalance_s rep {}/{}: 2 → 3 workers balanced {t:.3}s after the spawn, \
                             {j:.3}s after the new worker registered",
                            rep + 1,
                            self.reps
                        ));
                        total.push(t);
                        from_join.push(j);
                    }
                    Err(e) => {
                        eprintln!("error: worker_rebalance_s rep {}: {e}", rep + 1);
                        errors.push(e);
                    }
                }
            }
            let (m, mj) = (median(&total), median(&from_join));
            self.json.insert("worker_rebalance_s".into(), round(m, 3));
            details["rebalance_reps_s"] =
                json!(total.iter().map(|s| round(*s, 3)).collect::<Vec<_>>());
            details["rebalance_from_join_s"] = round(mj, 3);
            if !errors.is_empty() {
                details["rebalance_errors"] = json!(errors);
            }
            let ri = WORKER_REBALANCE_INTERVAL.as_secs_f64();
            self.row(
                "worker_rebalance_s (2 → 3 workers)",
                format!("{m:.2} s ({mj:.2} s after it joined)"),
                "—".into(),
                "—".into(),
                format!(
                    "≤ rebalance interval ({ri:.2} s) after joining {}",
                    mark(mj <= ri)
                ),
            );
        }
        self.json.insert("worker_mode".into(), details);
    }

    async fn partitions(&mut self, s: &Seeded) {
        let mut out = Map::new();
        for total in PARTITION_COUNTS {
            let name = format!("bench_partitions_{total}");
            let mut rates = Vec::new();
            for rep in 0..self.reps {
                s.client
                    .execute(
                        "DELETE FROM projection_checkpoints WHERE projection_name = $1",
                        &[&name],
                    )
                    .await
                    .expect("cannot reset the partition checkpoints");
                let runners: Vec<Runner> = (0..total)
                    .map(|k| {
                        let config = self
                            .catchup_config()
                            .partition(k, total)
                            .expect("valid partition");
                        Runner::new(s.store.clone(), config)
                            .with_projection(Arc::new(Noop { name: name.clone() }))
                            .expect("cannot register the projection")
                    })
                    .collect();
                let start = Instant::now();
                let results =
                    futures_util::future::join_all(runners.iter().map(|r| r.run_once())).await;
                let d = start.elapsed();
                for r in results {
                    r.unwrap_or_else(|e| panic!("{name}: run_once failed: {e}"));
                }
                let handled: u64 = runners.iter().map(|r| r.progress().events_handled()).sum();
                if handled != s.events {
                    self.progress(format!(
                        "{name}: handled {handled} of {} events (open transaction elsewhere?)",
                        s.events
                    ));
                }
                rates.push(rate(s.events, d));
                self.progress(format!(
                    "partitions_{total} rep {}/{}: {} ({total} runners concurrently)",
                    rep + 1,
                    self.reps,
                    ev_s(rates[rates.len() - 1])
                ));
            }
            let m = median(&rates);
            out.insert(
                format!("partitions_{total}"),
                json!({"events_per_s": round(m, 0)}),
            );
            self.row(
                &format!("partitions_{total}"),
                ev_s(m),
                "—".into(),
                "—".into(),
                "—".into(),
            );
        }
        self.json.insert("partitions".into(), Value::Object(out));
    }

    async fn worker_rss(&mut self, s: &Seeded) {
        // /proc/self/exe still runs this binary when a concurrent `cargo build`
        // has replaced (unlinked) the file on disk.
        let exe = Some(PathBuf::from("/proc/self/exe"))
            .filter(|p| p.exists())
            .or_else(|| std::env::current_exe().ok())
            .expect("cannot locate the bench binary");
        let mut mbs = Vec::new();
        for rep in 0..self.reps {
            s.client
                .execute(
                    "DELETE FROM projection_checkpoints WHERE projection_name LIKE 'bench\\_rss\\_%'",
                    &[],
                )
                .await
                .expect("cannot reset the RSS checkpoints");
            let out = tokio::process::Command::new(&exe)
                .arg("--child-rss")
                .arg(if self.args.tls {
                    s.db.url()
                } else {
                    format!("{} sslmode=disable", s.db.url())
                })
                .stderr(std::process::Stdio::inherit())
                .output()
                .await
                .expect("cannot run the RSS child");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "RSS child failed: {stdout}");
            let field = |key: &str| -> u64 {
                stdout
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("RSS child printed no {key}: {stdout}"))
            };
            let (kb, handled) = (field("VmHWM_KB="), field("handled="));
            let mb = kb as f64 / 1024.0;
            mbs.push(mb);
            self.progress(format!(
                "worker_rss_mb rep {}/{}: {mb:.1} MB peak RSS ({RSS_PROJECTIONS} projections, {handled} events handled)",
                rep + 1,
                self.reps
            ));
        }
        let m = median(&mbs);
        self.json.insert("worker_rss_mb".into(), round(m, 1));
        self.row(
            "worker_rss_mb",
            format!("{m:.1} MB"),
            "—".into(),
            "—".into(),
            format!("≤ 30 MB {}", mark(m <= 30.0)),
        );
    }

    // -- wake-ups -------------------------------------------------------------

    async fn wakeup_cases(&mut self, db: &TestDatabase) {
        let notify_n = self
            .args
            .wakeups
            .unwrap_or(if self.args.quick { 200 } else { 1_000 });
        let poll_n = notify_n.min(if self.args.quick { 100 } else { 200 });
        let mut raw_listen = None;
        if self.wants("wakeup_raw_listen_ms") {
            let mut stats = Vec::new();
            for rep in 0..self.reps {
                let l = self.wakeup_raw(db, notify_n).await;
                self.progress(format!(
                    "wakeup_raw_listen_ms rep {}/{}: {} ({notify_n} INSERT + pg_notify)",
                    rep + 1,
                    self.reps,
                    fmt_latency(&l)
                ));
                stats.push(l);
            }
            let m = median_stats(&stats);
            self.json.insert(
                "wakeup_raw_listen_ms".into(),
                json!({"p50": round(m[0], 3), "p99": round(m[1], 3), "max": round(m[2], 3),
                       "appends": notify_n, "spacing_ms": "2-5"}),
            );
            self.row(
                "wakeup_raw_listen_ms",
                "—".into(),
                fmt_latency(&m),
                "—".into(),
                "—".into(),
            );
            raw_listen = Some(m);
        }
        if self.wants("wakeup_notify_ms") {
            let mut stats = Vec::new();
            for rep in 0..self.reps {
                let l = self
                    .wakeup_library(db, DispatcherKind::Notify, notify_n, (2, 5), rep)
                    .await;
                self.progress(format!(
                    "wakeup_notify_ms rep {}/{}: {} ({notify_n} appends)",
                    rep + 1,
                    self.reps,
                    fmt_latency(&l)
                ));
                stats.push(l);
            }
            let m = median_stats(&stats);
            self.json.insert(
                "wakeup_notify_ms".into(),
                json!({"p50": round(m[0], 3), "p99": round(m[1], 3), "max": round(m[2], 3),
                       "appends": notify_n, "spacing_ms": "2-5"}),
            );
            let ok = m[0] <= 1.0 && m[1] <= 2.0;
            self.row(
                "wakeup_notify_ms",
                fmt_latency(&m),
                raw_listen.map_or("—".into(), |r| {
                    format!("{} (raw LISTEN)", fmt_latency(&r))
                }),
                "—".into(),
                format!("p50 ≤ 1, p99 ≤ 2 ms {}", mark(ok)),
            );
        }
        if self.wants("wakeup_poll_ms") {
            let mut stats = Vec::new();
            for rep in 0..self.reps {
                let l = self
                    .wakeup_library(db, DispatcherKind::Poll, poll_n, (5, 25), rep)
                    .await;
                self.progress(format!(
                    "wakeup_poll_ms rep {}/{}: {} ({poll_n} appends, interval {} ms)",
                    rep + 1,
                    self.reps,
                    fmt_latency(&l),
                    DEFAULT_POLL_INTERVAL.as_millis()
                ));
                stats.push(l);
            }
            let m = median_stats(&stats);
            let interval = DEFAULT_POLL_INTERVAL.as_secs_f64() * 1000.0;
            self.json.insert(
                "wakeup_poll_ms".into(),
                json!({"p50": round(m[0], 3), "p99": round(m[1], 3), "max": round(m[2], 3),
                       "interval_ms": interval, "appends": poll_n, "spacing_ms": "5-25"}),
            );
            self.row(
                &format!("wakeup_poll_ms (interval {interval:.0} ms)"),
                fmt_latency(&m),
                "—".into(),
                "—".into(),
                format!(
                    "p99 ≤ {:.0} ms {}",
                    interval + 10.0,
                    mark(m[1] <= interval + 10.0)
                ),
            );
        }
    }

    /// Appends `n` single events, spaced at random within `spacing` ms, to
    /// a database a runner with `kind` is following; returns the latency
    /// statistics from append return to handler start.
    async fn wakeup_library(
        &mut self,
        db: &TestDatabase,
        kind: DispatcherKind,
        n: usize,
        spacing: (u64, u64),
        rep: u32,
    ) -> [f64; 3] {
        let label = format!("{kind:?}").to_lowercase();
        let runner_store = EventStore::connect_config(self.lib_config(db), StoreConfig::default())
            .expect("cannot build the runner's store");
        let writer = EventStore::connect_config(self.lib_config(db), StoreConfig::default())
            .expect("cannot build the writer's store");
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let runner = Runner::new(runner_store, RunnerConfig::default().dispatcher(kind))
            .with_projection(Arc::new(Stamp {
                name: format!("bench_wakeup_{label}"),
                seen: seen_tx,
            }))
            .expect("cannot register the projection");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            runner
                .run_until(async {
                    let _ = stop_rx.await;
                })
                .await
        });
        let stream = format!("wake-{label}-{rep}");
        let mut version = 0i64;
        let append = |v: i64| {
            let writer = writer.clone();
            let stream = stream.clone();
            async move {
                let e = NewEvent::from_json(EVENT_TYPE, r#"{"amount": 1}"#);
                writer
                    .append(AGGREGATE_TYPE, &stream, ExpectedVersion::Exact(v), &[e])
                    .await
                    .unwrap_or_else(|e| panic!("wake-up append failed: {e}"))
            }
        };
        // Warm up: wait until the runner handles an event, then a few more.
        let mut got: HashMap<i64, Instant> = HashMap::new();
        for i in 0..5 {
            let r = append(version).await;
            version = r.stream_version;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !got.contains_key(&r.last_position) {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, seen.recv()).await {
                    Ok(Some((pos, at))) => {
                        got.entry(pos).or_insert(at);
                    }
                    _ => panic!("the {label} runner did not handle warm-up event {i} within 10s"),
                }
            }
        }
        let mut sent = Vec::with_capacity(n);
        let gaps: Vec<u64> = (0..n)
            .map(|_| self.rng.gen_range(spacing.0..=spacing.1))
            .collect();
        for gap in gaps {
            tokio::time::sleep(Duration::from_millis(gap)).await;
            let r = append(version).await;
            sent.push((r.last_position, Instant::now()));
            version = r.stream_version;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.iter().any(|(p, _)| !got.contains_key(p)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, seen.recv()).await {
                Ok(Some((pos, at))) => {
                    got.entry(pos).or_insert(at);
                }
                _ => panic!("the {label} runner did not handle every event within 10s"),
            }
        }
        let _ = stop_tx.send(());
        running
            .await
            .expect("the runner task panicked")
            .unwrap_or_else(|e| panic!("the {label} runner failed: {e}"));
        latencies(&sent, &got, &label)
    }

    /// The raw floor: LISTEN on a plain connection, INSERT + pg_notify on
    /// another.
    async fn wakeup_raw(&mut self, db: &TestDatabase, n: usize) -> [f64; 3] {
        let (listener, mut connection) = db
            .config()
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot open the LISTEN connection: {e}"));
        let (tx, mut rx) = mpsc::unbounded_channel::<(i64, Instant)>();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(m)) = messages.next().await {
                if let AsyncMessage::Notification(n) = m {
                    if let Ok(pos) = n.payload().parse::<i64>() {
                        let _ = tx.send((pos, Instant::now()));
                    }
                }
            }
        });
        listener
            .batch_execute("LISTEN bench_raw")
            .await
            .expect("LISTEN failed");
        let writer = db
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e}"));
        let stmt = writer
            .prepare(
                "WITH ins AS (INSERT INTO events (event_id, aggregate_type, aggregate_id, \
                    aggregate_version, event_type, payload, metadata) \
                    VALUES ($1, 'Raw', $2, $3, 'MoneyDeposited', $4::text::jsonb, '{}') \
                    RETURNING global_position) \
                 SELECT pg_notify('bench_raw', global_position::text) FROM ins",
            )
            .await
            .expect("cannot prepare the raw notify INSERT");
        let stream = format!("raw-{}", Uuid::new_v4().simple());
        let mut sent = Vec::with_capacity(n);
        let gaps: Vec<u64> = (0..n).map(|_| self.rng.gen_range(2..=5)).collect();
        for (i, gap) in gaps.into_iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(gap)).await;
            writer
                .execute(
                    &stmt,
                    &[
                        &Uuid::now_v7(),
                        &stream,
                        &(i as i64 + 1),
                        &r#"{"amount": 1}"#,
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("raw notify INSERT failed: {e}"));
            sent.push(Instant::now());
        }
        // Map the i-th INSERT to its global position.
        let rows = writer
            .query(
                "SELECT global_position FROM events WHERE aggregate_type = 'Raw' AND aggregate_id = $1 \
                 ORDER BY aggregate_version",
                &[&stream],
            )
            .await
            .expect("cannot read back the raw events");
        let sent: Vec<(i64, Instant)> = rows.iter().map(|r| r.get::<_, i64>(0)).zip(sent).collect();
        let mut got = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.iter().any(|(p, _)| !got.contains_key(p)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((pos, at))) => {
                    got.entry(pos).or_insert(at);
                }
                _ => panic!("raw LISTEN did not receive every notification within 10s"),
            }
        }
        drop(listener);
        driver.abort();
        latencies(&sent, &got, "raw listen")
    }

    // -- output ---------------------------------------------------------------

    async fn finish(mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.json.insert("elapsed_s".into(), round(elapsed, 1));
        if let Some(load) = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        {
            // With the start's load average (machine.load_average): a
            // figure from a run the machine's other work disturbed is
            // worth repeating.
            self.json["machine"]["load_average_end"] = json!(load);
        }
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(vec![
                "case",
                "projectionist",
                "raw SQL baseline",
                "ratio",
                "target",
            ]);
        for r in self.sorted_rows() {
            table.add_row(r.to_vec());
        }
        let server = &self.json["server"];
        println!(
            "server: {} (PostgreSQL {}, fsync={}, synchronous_commit={}, full_page_writes={}); {} cores; \
             SELECT 1 round trip {} µs; batch size {}; median of {} reps",
            server["kind"].as_str().unwrap_or("?"),
            self.json["machine"]["postgres_version"].as_str().unwrap_or("?"),
            server["fsync"].as_str().unwrap_or("?"),
            server["synchronous_commit"].as_str().unwrap_or("?"),
            server["full_page_writes"].as_str().unwrap_or("?"),
            self.json["machine"]["cores"],
            self.json["machine"]["round_trip_us"],
            self.batch,
            self.reps
        );
        println!("{table}");
        println!(
            "ratio = projectionist ÷ raw SQL (medians). Targets refer to a stock server \
             (fsync and synchronous_commit on)."
        );
        if let Some(path) = &self.args.json {
            let text = serde_json::to_string_pretty(&Value::Object(self.json.clone()))
                .expect("JSON serialisation cannot fail");
            std::fs::write(path, text + "\n")
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            println!("wrote {}", path.display());
        }
        for db in self.dbs.drain(..) {
            let name = db.name().to_owned();
            if let Err(e) = db.drop_database().await {
                eprintln!("warning: could not drop database {name}: {e}");
            }
        }
        println!("total elapsed: {elapsed:.1}s");
    }
}

/// Median of each of p50, p99 and max over repetitions.
fn median_stats(stats: &[[f64; 3]]) -> [f64; 3] {
    [0, 1, 2].map(|i| median(&stats.iter().map(|s| s[i]).collect::<Vec<_>>()))
}

/// Latencies in ms from each append's return to its receipt (clamped at 0:
/// a handler can start before the writer's task sees the reply).
fn latencies(sent: &[(i64, Instant)], got: &HashMap<i64, Instant>, label: &str) -> [f64; 3] {
    let mut early = 0;
    let ms: Vec<f64> = sent
        .iter()
        .map(|(p, at)| {
            let t = got[p];
            if t < *at {
                early += 1;
                0.0
            } else {
                (t - *at).as_secs_f64() * 1000.0
            }
        })
        .collect();
    if early > 0 {
        eprintln!(
            "           ({label}: {early} of {} handled before the append call returned; counted as 0 ms)",
            sent.len()
        );
    }
    latency_stats(ms)
}
