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
//! * `append_batch_1_8_writers`, `append_batch_100_8_writers`,
//!   `append_batch_1_32_writers`: the same with eight (32) concurrent
//!   writers, each on its own streams; the raw side gives each writer its
//!   own connection, the library shares its store (and its pool of 16), so
//!   concurrent appends share statements (`StoreConfig::append_lanes`).
//!   Each repetition writes the library's and the raw plan alternately in
//!   8 parts into one table; the ratio is the median of the repetitions'
//!   ratios (slow and fast spells of the disk weigh on both sides alike).
//!   Event ids (UUIDv7) are drawn part by part in the order the sides will
//!   write them, and the two sides' stream names interleave, so both sides'
//!   inserts land at the right end of the `event_id` index, as an
//!   application's would (`events::stamp_ids`).
//! * `append_copy_bulk`: the library's 1000-event batches (the
//!   `append_batch_1000` figure) against a raw binary `COPY events FROM
//!   STDIN` of the same rows: the ceiling for bulk loading.
//! * `append_breakdown` (diagnostic, only when `--only` names it): a lone
//!   writer's single-event append through seven paths, from
//!   `EventStore::append` with the defaults down to a raw `INSERT …
//!   VALUES`, in blocks shuffled per round; the mean per append of each
//!   path and the step to the next one say what the notification, the
//!   shared-append queue, the store's code, the pool and the library's
//!   statement each cost (`breakdown.rs`).
//! * `catchup_noop`: `Runner::run_once` of a projection whose `handle_batch`
//!   does nothing, over `--events` seeded events (default batch size),
//!   against a raw keyset-paged read (`WHERE global_position > $1 ORDER BY
//!   global_position LIMIT $2`, every column decoded) with a checkpoint
//!   `UPDATE` per page, one transaction per page. This isolates the engine's
//!   overhead: the gap-safe query, decoding and the compare-and-set.
//!   Every raw catch-up baseline commits its pages with `synchronous_commit
//!   = off`, as the library's batch transactions do by default, so neither
//!   side waits for a WAL flush per page.
//!   Each repetition runs four catch-ups of each side, alternately; its
//!   ratio is that of the two sides' totals, and the reported ratio the
//!   median of the repetitions' (also for `catchup_large_payload` and
//!   `catchup_read_model_batch`): one catch-up takes under a second here,
//!   too short for one run per side to average out the machine.
//!   The library side keeps one `Runner` per case (`catchup::LibRunner`),
//!   as the raw side keeps one client: its connections are opened and its
//!   statements prepared in the untimed warm-up, and every timed catch-up
//!   starts from a deleted checkpoint, so it still pays `run_once`'s
//!   start-up (checks, the checkpoint row, the epoch adoption). Before,
//!   each catch-up built a new runner, whose pool connected inside the
//!   timed catch-up (about 10 ms, 3% of a 200,000-event catch-up; the
//!   raw side never paid it).
//! * `catchup_large_payload`: `catchup_noop` (the same projection, the same
//!   raw keyset reader) over 200,000 events whose payloads are 2 KB of JSON
//!   (a random 2 KB `note` beside the amount, which pglz cannot compress,
//!   so every payload is stored out of line in TOAST and detoasted by both
//!   sides), in a database of its own; `--events` does not change it.
//!   Also reports the payload MB/s of both sides.
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
//! * `catchup_upcast`: what upcasting costs a catch-up: `--events`
//!   deposits stored in an old shape (version 1) read through a one-step
//!   upcaster, against the same events stored in the current shape, both
//!   decoded into a typed enum by a projection that only sums in memory.
//!   The baseline is the current shape, not raw SQL; target ratio ≥ 0.85.
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
//! * `--scale` (a mode of its own, not a case; not run in CI): the engine
//!   on a large log, `--scale-events` (default 10,000,000) seeded with SQL.
//!   Status, `/metrics` and `/readyz` latency with the whole log as lag
//!   over 16 slots, catch-up events/s per tenth of the log, peak RSS,
//!   index rows fetched by 1, 4 and 8 static partitions and their wall
//!   times, and the slots a rebalance moves after a SIGKILL. The method is
//!   described at the top of `scale.rs`; the figures are in
//!   docs/performance.md ("Scale").
//! * `worker_rss_mb`: peak RSS (VmHWM) of a child process (this binary,
//!   re-executed with a hidden `--child-rss`) running eight light
//!   projections through a catch-up of the seeded events.
//! * `catchup_traced` (cargo feature `otel`; skipped without it): the
//!   `catchup_noop` projection over the seeded events, each given a
//!   `traceparent`, with the engine's spans exported over OTLP/HTTP (batch
//!   span processor) to a dummy receiver in this process, against the same
//!   catch-up with spans off (what a binary without
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` does). The "baseline" column is spans
//!   off. Also reported: spans received and dropped by the processor's
//!   queue, and the flush after the catch-up. See `traced.rs`.
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
//!
//! # Layout
//!
//! This file parses the command line and drives the cases in order; each
//! concept has a module of its own, and none of them imports this file:
//! `cli` (flags and case names), `setup` (the `Bench` state, databases,
//! seeding, server facts), `events` (benchmark event shapes and append
//! plans), `projections` (the projections under test), `raw` (the raw-SQL
//! baselines), `stats` (medians, percentiles, formatting), `report` (the
//! table and the JSON), and one module per case group: `append`, `catchup`,
//! `upcast`, `wakeup`, `parallel`, `partitions`, `workers` (worker-mode
//! failover and rebalance with real processes), `rss` (peak memory of a
//! child), `traced` (traces on and off) and `scale` (`--scale`).

mod append;
mod breakdown;
mod catchup;
mod cli;
mod events;
mod parallel;
mod partitions;
mod projections;
mod raw;
mod report;
mod rss;
mod scale;
mod setup;
mod stats;
mod traced;
mod upcast;
mod wakeup;
mod workers;

use append::APPEND_CASES;
use clap::Parser;
use cli::{matching, Args, CASES};
use setup::Bench;
use std::process::ExitCode;

/// Log lines to stderr (`RUST_LOG`, default `warn`); with `traced` (the
/// `catchup_traced` case, feature `otel`), also the layer exporting spans
/// to that case's dummy receiver.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
fn init_logging(traced: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    #[cfg(feature = "otel")]
    if traced {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .with(traced::install().with_filter(tracing_subscriber::filter::LevelFilter::INFO))
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(!args.scale && cli::select(&args.only).contains(&"catchup_traced"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the Tokio runtime");
    if let Some(url) = args.child_rss.clone() {
        return runtime.block_on(rss::child_rss(&url));
    }
    if args.scale {
        runtime.block_on(Bench::new(args).run_scale());
        return ExitCode::SUCCESS;
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

impl Bench {
    /// Runs the selected cases in order, then prints and writes the report.
    async fn run(mut self) {
        let (db, store, client) = self.fresh_db().await;
        self.server_info(&client).await;
        if APPEND_CASES.iter().any(|c| self.wants(c.0)) || self.wants("append_copy_bulk") {
            self.append_cases(&db, &store, &client).await;
        }
        if self.wants("append_breakdown") {
            self.append_breakdown().await;
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
            "catchup_traced",
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
            // Last on these events: it adds a traceparent to each.
            if self.wants("catchup_traced") {
                self.catchup_traced(&seeded).await;
            }
            self.dbs.push(seeded.db);
        }
        if self.wants("catchup_large_payload") {
            self.catchup_large_payload().await;
        }
        if self.wants("catchup_read_model") {
            let n = (self.args.events / 4).max(1);
            let seeded = self.seeded(n).await;
            self.catchup_read_model(&seeded, false).await;
            self.dbs.push(seeded.db);
        }
        if self.wants("catchup_upcast") {
            self.catchup_upcast().await;
        }
        if self.wants("parallel_io") {
            self.parallel_io().await;
        }
        if self.wants("worker_failover_s") || self.wants("worker_rebalance_s") {
            self.worker_cases().await;
        }
        self.finish().await;
    }
}
