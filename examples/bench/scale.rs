//! `--scale`: the engine on a large log (issue 12). Not part of the regular
//! cases (nor of CI): it seeds `--scale-events` events (default 10M) with
//! SQL and runs the bank example's binary against them.
//!
//! 1. `bank migrate` on a fresh database; `--scale-workers` worker-mode
//!    processes (default 4) share the 16 slots of
//!    `PROJECTION_PARTITIONS=account_balances=16` (`PROJECTIONS=
//!    account_balances`), each with an admin server. Once they are
//!    balanced, `bank pause account_balances` stops the 16 slots (state
//!    `stopped`), so that the workers read nothing and the whole log
//!    is lag. (Holding a transaction id open would do it too, but the
//!    watermark is cluster-wide: on a shared server that would stall
//!    every other database's projections for the whole seeding.)
//! 2. The events are seeded in chunks of `INSERT … SELECT … FROM
//!    generate_series` (`Account` streams over `--scale-accounts`
//!    accounts, `MoneyDeposited`, time-ordered UUIDs like the library's
//!    v7 ids), then `VACUUM (ANALYZE) events`.
//! 3. With the whole log as lag and 16 slots: `bank status --json` (the
//!    process's wall time: start, connect, queries, print), `bank status
//!    --exact --json` once when the build has it, `GET /metrics` (each
//!    request more than a second after the last, so the admin server's
//!    one-second cache is cold; the body must have a
//!    `projectionist_lag_events` series for every slot) and `GET /readyz`.
//! 4. `bank resume account_balances`; the workers catch up (the time
//!    includes picking the resume up, within a second). The sum of the 16
//!    checkpoints' `events_handled` is sampled every 250 ms; the figure per
//!    tenth of the log is events/s over that tenth. Peak RSS (VmHWM) of
//!    every worker is sampled alongside.
//! 5. A worker that is not the leader, holding k slots, is SIGKILLed; once
//!    the slots are balanced over the survivors (and three rebalance
//!    intervals later), the slots whose `consumer_assignments.generation`
//!    changed are the slots that changed owner (target: at most
//!    k + workers − 1).
//! 6. Static partitions on the same log, `account_balances` only (the
//!    read model truncated, checkpoints deleted, `VACUUM (ANALYZE) events`
//!    first): 1, 4 and 8 `bank run-projections --once` processes with
//!    `PARTITION_KEY`/`TOTAL_PARTITIONS`, all started together. The
//!    partition index of each count is built beforehand with the engine's
//!    statement (timed, reported) so that the wall time is the catch-up
//!    alone. Index rows fetched: the growth of `idx_tup_read` summed over
//!    the `events` table's indexes in `pg_stat_user_indexes`, read once
//!    every other session of the database has ended (backends flush their
//!    statistics on exit). Events/s per tenth of the log for the single
//!    process, and the peak RSS of each process.

use crate::setup::Bench;
use crate::stats::{ev_s, mark, median, round};
use crate::workers::{leader, poll_until, with_logs, BankWorker};
use projectionist::testing::TestDatabase;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The projection and its slot count.
const PROJECTION: &str = "account_balances";
const SLOTS: usize = 16;
/// Events per seeding statement.
const SEED_CHUNK: u64 = 500_000;
/// Timers of the scale workers: relaxed compared with the failover cases,
/// so that heartbeats survive a saturated database.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
const REBALANCE_INTERVAL: Duration = Duration::from_secs(1);
/// Static partition counts compared.
const STATIC_COUNTS: [i32; 3] = [1, 4, 8];
/// Samples of the status command and of each admin endpoint.
const LATENCY_SAMPLES: usize = 10;
/// Parts of the log the catch-up rate is reported for.
const SEGMENTS: usize = 10;
/// Target of status and /metrics latency.
const LATENCY_TARGET_MS: f64 = 100.0;

type Res<T> = Result<T, String>;

/// The bank's `account_balances` as `status` sees it (name and filter), so
/// that the bench can call the library's status in-process. Never run.
struct AccountBalancesShape;

#[projectionist::async_trait]
impl projectionist::Projection for AccountBalancesShape {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(PROJECTION)
            .filter(projectionist::Filter::all().aggregate_types(["Account"]))
    }

    async fn handle(
        &self,
        _: &projectionist::StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        Err(projectionist::Error::config(
            "the bench's account_balances stand-in only feeds status",
        ))
    }
}

fn err(what: &str) -> impl Fn(tokio_postgres::Error) -> String + '_ {
    // The server's message, not only "db error".
    move |e| match e.as_db_error() {
        Some(db) => format!("{what}: {} ({})", db.message(), db.code().code()),
        None => format!("{what}: {e}"),
    }
}

/// Peak RSS of a process in MB (VmHWM), while it runs.
fn vm_hwm_mb(pid: i32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// A port free on 127.0.0.1 a moment ago.
fn free_port() -> Res<u16> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// `GET path` on 127.0.0.1:port: (status code, body, time to the whole
/// response).
async fn http_get(port: u16, path: &str) -> Res<(u16, String, Duration)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("GET {path}: cannot connect to port {port}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("GET {path}: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .map_err(|e| format!("GET {path}: {e}"))?;
        let took = start.elapsed();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("GET {path}: no status line in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body, took))
    })
    .await
    .map_err(|e| format!("GET task failed: {e}"))?
}

/// The partitions with a `projectionist_lag_events` series for
/// [`PROJECTION`] in a /metrics body, and the sum of their values.
fn lag_series(body: &str) -> (Vec<i32>, f64) {
    let mut parts = Vec::new();
    let mut sum = 0.0;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("projectionist_lag_events{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        if !labels.contains(&format!("projection=\"{PROJECTION}\"")) {
            continue;
        }
        let partition = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("partition=\""))
            .and_then(|p| p.trim_end_matches('"').parse().ok());
        if let Some(p) = partition {
            parts.push(p);
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    parts.sort_unstable();
    parts.dedup();
    (parts, sum)
}

/// Events/s over each of `SEGMENTS` equal parts of `n` events, from
/// (seconds, events handled) samples (linear between samples).
fn segment_rates(samples: &[(f64, i64)], n: i64) -> Vec<f64> {
    let at = |target: i64| -> Option<f64> {
        let mut prev = (0.0, 0i64);
        for &(t, h) in samples {
            if h >= target {
                if h == prev.1 {
                    return Some(t);
                }
                let f = (target - prev.1) as f64 / (h - prev.1) as f64;
                return Some(prev.0 + f * (t - prev.0));
            }
            prev = (t, h);
        }
        None
    };
    let bounds: Vec<i64> = (0..=SEGMENTS)
        .map(|i| n * i as i64 / SEGMENTS as i64)
        .collect();
    let mut out = Vec::new();
    let mut t0 = 0.0;
    for w in bounds.windows(2) {
        match at(w[1]) {
            Some(t1) => {
                out.push((w[1] - w[0]) as f64 / (t1 - t0).max(1e-6));
                t0 = t1;
            }
            None => out.push(f64::NAN),
        }
    }
    out
}

fn fmt_segments(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{:.0}k", r / 1000.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Events handled so far by [`PROJECTION`]'s checkpoints.
async fn handled(c: &Client) -> Res<i64> {
    c.query_one(
        "SELECT coalesce(sum(events_handled), 0)::int8 FROM projection_checkpoints \
         WHERE projection_name = $1",
        &[&PROJECTION],
    )
    .await
    .map(|r| r.get(0))
    .map_err(err("reading progress"))
}

/// (live workers, slots per live worker, slots not on a live worker).
async fn spread(c: &Client) -> Res<(usize, Vec<i64>, i64)> {
    let live: i64 = c
        .query_one("SELECT count(*) FROM worker_nodes", &[])
        .await
        .map_err(err("worker_nodes"))?
        .get(0);
    let counts: Vec<i64> = c
        .query(
            "SELECT count(*) FROM consumer_assignments a JOIN worker_nodes w USING (worker_id) \
             WHERE a.projection_name = $1 GROUP BY worker_id ORDER BY 1",
            &[&PROJECTION],
        )
        .await
        .map_err(err("consumer_assignments"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let assigned: i64 = counts.iter().sum();
    Ok((live as usize, counts, SLOTS as i64 - assigned))
}

/// Whether `workers` live workers hold the 16 slots ⌊16/W⌋/⌈16/W⌉.
async fn balanced(c: &Client, workers: usize) -> bool {
    let Ok((live, counts, orphans)) = spread(c).await else {
        return false;
    };
    let (lo, hi) = ((SLOTS / workers) as i64, SLOTS.div_ceil(workers) as i64);
    live == workers
        && orphans == 0
        && counts.len() == workers
        && counts.iter().all(|&n| n == lo || n == hi)
}

/// (projection, partition) → (owner, generation).
async fn assignments(c: &Client) -> Res<BTreeMap<(String, i32), (Option<String>, i64)>> {
    Ok(c.query(
        "SELECT projection_name, partition_key, worker_id, generation FROM consumer_assignments",
        &[],
    )
    .await
    .map_err(err("consumer_assignments"))?
    .iter()
    .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
    .collect())
}

/// Waits until this database has no session but `c`'s, then reads the
/// index tuples read from the `events` table's indexes so far.
async fn index_rows_read(c: &Client) -> Res<i64> {
    poll_until(
        Duration::from_secs(60),
        "every other session of the database to end (they flush their statistics on exit)",
        || async {
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 0)
        },
    )
    .await?;
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .map_err(err("pg_stat_clear_snapshot"))?;
    c.query_one(
        "SELECT coalesce(sum(idx_tup_read), 0)::int8 FROM pg_stat_user_indexes WHERE relname = 'events'",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .map_err(err("pg_stat_user_indexes"))
}

/// The `events` table's index names.
async fn event_indexes(c: &Client) -> Res<Vec<String>> {
    Ok(c
        .query(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'events'::regclass ORDER BY 1",
            &[],
        )
        .await
        .map_err(err("pg_index"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// (median, max) of millisecond samples.
fn med_max(ms: &[f64]) -> (f64, f64) {
    (median(ms), ms.iter().copied().fold(f64::NAN, f64::max))
}

impl Bench {
    /// The URL the bank processes get (`sslmode=disable` unless `--tls`).
    fn bank_url(&self, db: &TestDatabase) -> String {
        if self.args.tls {
            db.url()
        } else {
            format!("{} sslmode=disable", db.url())
        }
    }

    /// Runs `bank ARGS…` to completion.
    async fn bank_command(&self, bank: &Path, url: &str, args: &[&str]) -> Res<()> {
        let o = tokio::process::Command::new(bank)
            .env("DATABASE_URL", url)
            .env("LOG_LEVEL", "warn")
            .env_remove("RUST_LOG")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run bank {args:?}: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "bank {args:?} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        self.progress(format!("bank {}", args.join(" ")));
        Ok(())
    }

    /// `--scale`: the whole scale benchmark, then the report.
    pub async fn run_scale(mut self) {
        let n = self.args.scale_events;
        self.progress(format!(
            "scale benchmark: {n} events, {SLOTS} slots over {} workers, static partitions {STATIC_COUNTS:?}",
            self.args.scale_workers
        ));
        let bank = match self.bank_exe().await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
        let db = self
            .bank_db(&bank)
            .await
            .unwrap_or_else(|e| panic!("cannot create the database: {e}"));
        let client = db
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e}"));
        self.server_info(&client).await;
        self.json.insert("events".into(), json!(n));
        let mut out = Map::new();
        let result = self.scale(&bank, &db, &client, &mut out).await;
        if let Err(e) = &result {
            eprintln!("error: scale benchmark: {e}");
            out.insert("error".into(), json!(e));
            self.row("scale", "failed".into(), "—".into(), "—".into(), e.clone());
        }
        self.json.insert("scale".into(), Value::Object(out));
        drop(client);
        self.dbs.push(db);
        self.finish().await;
        if result.is_err() {
            std::process::exit(1);
        }
    }

    async fn scale(
        &mut self,
        bank: &Path,
        db: &TestDatabase,
        c: &Client,
        out: &mut Map<String, Value>,
    ) -> Res<()> {
        let n = self.args.scale_events as i64;
        let w = self.args.scale_workers as usize;
        let url = self.bank_url(db);
        out.insert("events".into(), json!(n));
        out.insert("accounts".into(), json!(self.args.scale_accounts));
        out.insert("workers".into(), json!(w));
        out.insert("slots".into(), json!(SLOTS));

        // 1. Workers, balanced on the empty log.
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut ports = Vec::new();
        let mut workers = Vec::new();
        for _ in 0..w {
            let port = free_port()?;
            ports.push(port);
            workers.push(BankWorker::spawn_with(
                bank,
                &url,
                &["run-projections"],
                &[
                    ("RUN_MODE", "worker".into()),
                    ("PROJECTIONS", PROJECTION.into()),
                    ("PROJECTION_PARTITIONS", format!("{PROJECTION}={SLOTS}")),
                    ("HEARTBEAT_INTERVAL", ms(HEARTBEAT_INTERVAL)),
                    ("HEARTBEAT_TIMEOUT", ms(HEARTBEAT_TIMEOUT)),
                    ("REBALANCE_INTERVAL", ms(REBALANCE_INTERVAL)),
                    ("ADMIN_ADDR", format!("127.0.0.1:{port}")),
                    ("POOL_SIZE", "8".into()),
                ],
            )?);
        }
        let r = poll_until(
            Duration::from_secs(60),
            "16 slots balanced with a checkpoint each",
            || async {
                balanced(c, w).await
                    && c.query_one(
                        "SELECT count(*) FROM projection_checkpoints WHERE projection_name = $1",
                        &[&PROJECTION],
                    )
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) == SLOTS as i64)
            },
        )
        .await;
        r.map_err(|e| with_logs(e, &mut workers))?;
        self.progress(format!("{w} workers balanced over {SLOTS} slots"));

        // 2. Pause the projection, then seed. (Not by holding a transaction
        // id open: the watermark is cluster-wide, so that would stall every
        // other database's projections on a shared server.)
        self.bank_command(bank, &url, &["pause", PROJECTION])
            .await?;
        poll_until(Duration::from_secs(30), "every slot paused", || async {
            c.query_one(
                "SELECT count(*) FROM projection_checkpoints WHERE projection_name = $1 AND status = 'stopped'",
                &[&PROJECTION],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == SLOTS as i64)
        })
        .await?;
        let seed_s = self.seed(c, n as u64).await?;
        out.insert("seed_s".into(), round(seed_s, 1));
        self.row(
            "scale: seed (SQL)",
            format!(
                "{} events in {seed_s:.0} s ({})",
                n,
                ev_s(n as f64 / seed_s)
            ),
            "—".into(),
            "—".into(),
            "—".into(),
        );
        let size: String = c
            .query_one(
                "SELECT pg_size_pretty(pg_total_relation_size('events'))",
                &[],
            )
            .await
            .map_err(err("events size"))?
            .get(0);
        out.insert("events_table_size".into(), json!(size));
        self.progress(format!("events table with its indexes: {size}"));

        // 3. Status, /metrics and /readyz with the whole log as lag.
        let r = self.lagging_figures(bank, db, &url, &ports, n, out).await;
        r.map_err(|e| with_logs(e, &mut workers))?;

        // 4. Catch-up by the workers.
        self.bank_command(bank, &url, &["resume", PROJECTION])
            .await?;
        let pids: Vec<i32> = workers.iter().map(|w| w.pid()).collect();
        let r = self
            .follow_catchup(c, n, &pids, Duration::from_secs(3600))
            .await;
        let (took, samples, rss) = r.map_err(|e| with_logs(e, &mut workers))?;
        self.check_read_model(c, n).await?;
        let rates = segment_rates(&samples, n);
        let overall = n as f64 / took;
        let peak_rss = rss.iter().copied().fold(0.0, f64::max);
        self.progress(format!(
            "workers caught up in {took:.1}s ({}); per tenth of the log: {}; peak RSS per worker {}",
            ev_s(overall),
            fmt_segments(&rates),
            rss.iter()
                .map(|m| format!("{m:.1} MB"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out.insert(
            "worker_catchup".into(),
            json!({"seconds": round(took, 1), "events_per_s": round(overall, 0),
                   "segment_events_per_s": rates.iter().map(|r| round(*r, 0)).collect::<Vec<_>>(),
                   "peak_rss_mb": rss.iter().map(|r| round(*r, 1)).collect::<Vec<_>>()}),
        );
        self.row(
            &format!("scale: catch-up, {SLOTS} slots on {w} workers"),
            format!(
                "{} ({took:.0} s); per tenth: {}",
                ev_s(overall),
                fmt_segments(&rates)
            ),
            "—".into(),
            "—".into(),
            "—".into(),
        );
        self.row(
            "scale: worker peak RSS",
            format!("{peak_rss:.1} MB (max of {w})"),
            "—".into(),
            "—".into(),
            "—".into(),
        );

        // 5. SIGKILL a worker: slots that change owner.
        let r = self.kill_one(c, &mut workers, out).await;
        r.map_err(|e| with_logs(e, &mut workers))?;
        drop(workers);

        // 6. Static partitions.
        self.static_partitions(bank, &url, c, n, out).await
    }

    /// Seeds `n` events in chunks; the seconds it took (with ANALYZE).
    async fn seed(&mut self, c: &Client, n: u64) -> Res<f64> {
        let accounts = self.args.scale_accounts;
        let base_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let started = Instant::now();
        let mut done = 0u64;
        while done < n {
            let hi = (done + SEED_CHUNK).min(n);
            // Time-ordered ids like the library's UUIDv7: the unique index
            // grows at its right edge, as it does under the library.
            c.batch_execute(&format!(
                "INSERT INTO events (event_id, aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
                 SELECT (lpad(to_hex({base_ms} + g / 1000), 12, '0') || '7' || lpad(to_hex(g), 19, '0'))::uuid, \
                        'Account', 'acct-' || (g % {accounts}), g / {accounts} + 1, 'MoneyDeposited', \
                        jsonb_build_object('amount', 1 + (g * 7919) % 10000) \
                 FROM generate_series({done}::int8, {last}::int8) g",
                last = hi - 1
            ))
            .await
            .map_err(err("seeding"))?;
            done = hi;
            let s = started.elapsed().as_secs_f64();
            let eta = s / done as f64 * (n - done) as f64;
            self.progress(format!(
                "seeded {done}/{n} ({:.0}%, {}, about {eta:.0}s left)",
                100.0 * done as f64 / n as f64,
                ev_s(done as f64 / s)
            ));
        }
        c.batch_execute("VACUUM (ANALYZE) events")
            .await
            .map_err(err("VACUUM (ANALYZE) events"))?;
        let s = started.elapsed().as_secs_f64();
        self.progress(format!("seeded and vacuumed in {s:.1}s"));
        Ok(s)
    }

    /// Step 3: status, /metrics and /readyz while every event is lag.
    async fn lagging_figures(
        &mut self,
        bank: &Path,
        db: &TestDatabase,
        url: &str,
        ports: &[u16],
        n: i64,
        out: &mut Map<String, Value>,
    ) -> Res<()> {
        let status = |args: &'static [&'static str]| {
            let cmd = tokio::process::Command::new(bank)
                .env("DATABASE_URL", url)
                .env("LOG_LEVEL", "warn")
                .env_remove("RUST_LOG")
                .env_remove("PROJECTIONS")
                .args(args)
                .stdin(std::process::Stdio::null())
                .output();
            async move {
                let start = Instant::now();
                let o = cmd
                    .await
                    .map_err(|e| format!("cannot run bank status: {e}"))?;
                Ok::<_, String>((start.elapsed(), o))
            }
        };
        // The library's status report in-process (what `status` and
        // /metrics compute), and the lag statement alone.
        let store = projectionist::EventStore::connect_config(
            self.lib_config(db),
            projectionist::StoreConfig::default(),
        )
        .map_err(|e| format!("store: {e}"))?;
        let projections =
            vec![
                projectionist::Registered::new(std::sync::Arc::new(AccountBalancesShape))
                    .map_err(|e| format!("register: {e}"))?,
            ];
        projectionist::status(&store, &projections)
            .await
            .map_err(|e| format!("status: {e}"))?;
        let (mut report_ms, mut lag_ms) = (Vec::new(), Vec::new());
        let mut lib_slots = 0;
        for _ in 0..LATENCY_SAMPLES {
            let t = Instant::now();
            let r = projectionist::report(&store, &projections)
                .await
                .map_err(|e| format!("report: {e}"))?;
            report_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            lib_slots = r.projections.len();
            let t = Instant::now();
            projectionist::status(&store, &projections)
                .await
                .map_err(|e| format!("status: {e}"))?;
            lag_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        drop(store);
        let (rp50, rmax) = med_max(&report_ms);
        let (lp50, lmax) = med_max(&lag_ms);
        self.progress(format!(
            "library status report in-process: median {rp50:.1} ms, max {rmax:.1} ms ({lib_slots} slots); \
             the slots' lag alone (projectionist::status): median {lp50:.1} ms, max {lmax:.1} ms"
        ));
        out.insert(
            "status_report_ms".into(),
            json!({"median": round(rp50, 1), "max": round(rmax, 1),
                   "samples": report_ms.iter().map(|m| round(*m, 1)).collect::<Vec<_>>(),
                   "slots_lag_only_median": round(lp50, 1), "slots_lag_only_max": round(lmax, 1)}),
        );
        self.row(
            &format!("scale: status report in-process ({SLOTS} slots, whole log as lag)"),
            format!(
                "median {rp50:.0} ms / max {rmax:.0} ms (lag statement alone: median {lp50:.0} ms)"
            ),
            "—".into(),
            "—".into(),
            format!(
                "< {LATENCY_TARGET_MS:.0} ms {}",
                mark(rp50 < LATENCY_TARGET_MS && lib_slots == SLOTS)
            ),
        );
        // The floor of a process on this machine: `bank --help`.
        let mut floor = Vec::new();
        for _ in 0..LATENCY_SAMPLES {
            let (took, _) = status(&["--help"]).await?;
            floor.push(took.as_secs_f64() * 1000.0);
        }
        let floor_ms = median(&floor);
        out.insert("process_floor_ms".into(), round(floor_ms, 1));
        // status --json
        let mut ms = Vec::new();
        let mut last = Value::Null;
        for _ in 0..LATENCY_SAMPLES {
            let (took, o) = status(&["status", "--json"]).await?;
            if !o.status.success() {
                return Err(format!(
                    "bank status --json failed ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            ms.push(took.as_secs_f64() * 1000.0);
            last = serde_json::from_slice(&o.stdout)
                .map_err(|e| format!("bank status --json printed no JSON: {e}"))?;
        }
        let slots: Vec<&Value> = last["projections"]
            .as_array()
            .map(|a| a.iter().filter(|s| s["projection"] == PROJECTION).collect())
            .unwrap_or_default();
        let lag: i64 = slots.iter().filter_map(|s| s["lag_events"].as_i64()).sum();
        let estimated = slots
            .iter()
            .filter(|s| s["lag_exact"] == Value::Bool(false))
            .count();
        let (p50, max) = med_max(&ms);
        self.progress(format!(
            "status --json: median {p50:.1} ms, max {max:.1} ms over {LATENCY_SAMPLES} runs; \
             {} slots, lag {lag} of {n} events ({estimated} slots estimated); \
             `bank --help` takes {floor_ms:.1} ms (median)",
            slots.len()
        ));
        out.insert(
            "status_json_ms".into(),
            json!({"median": round(p50, 1), "max": round(max, 1),
                   "samples": ms.iter().map(|m| round(*m, 1)).collect::<Vec<_>>(),
                   "slots": slots.len(), "lag_events_total": lag, "slots_estimated": estimated}),
        );
        self.row(
            &format!("scale: status --json ({SLOTS} slots, whole log as lag)"),
            format!(
                "median {p50:.0} ms / max {max:.0} ms (process; `bank --help` {floor_ms:.0} ms); {} slots, lag {lag}",
                slots.len()
            ),
            "—".into(),
            "—".into(),
            format!(
                "< {LATENCY_TARGET_MS:.0} ms {}",
                mark(p50 < LATENCY_TARGET_MS && slots.len() == SLOTS)
            ),
        );
        // status --exact --json, once (when this build has it).
        let (took, o) = status(&["status", "--exact", "--json", "--timeout", "900s"]).await?;
        if o.status.code() == Some(2) {
            self.progress("status --exact: not in this build (skipped)");
            out.insert("status_exact_s".into(), Value::Null);
        } else if !o.status.success() {
            let e = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            self.progress(format!(
                "status --exact --json failed after {:.1}s: {e}",
                took.as_secs_f64()
            ));
            out.insert("status_exact_error".into(), json!(e));
            self.row(
                "scale: status --exact --json",
                format!("failed after {:.1} s", took.as_secs_f64()),
                "—".into(),
                "—".into(),
                e,
            );
        } else {
            let s = took.as_secs_f64();
            self.progress(format!("status --exact --json: {s:.2}s"));
            out.insert("status_exact_s".into(), round(s, 2));
            self.row(
                "scale: status --exact --json",
                format!("{s:.2} s"),
                "—".into(),
                "—".into(),
                "— (counts on demand)".into(),
            );
        }

        // /metrics, each request with the admin cache cold.
        let mut ms = Vec::new();
        let mut series = Vec::new();
        let mut series_sum = 0.0;
        for i in 0..LATENCY_SAMPLES {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let (code, body, took) = http_get(ports[i % ports.len()], "/metrics").await?;
            if code != 200 {
                return Err(format!("/metrics answered {code}: {body}"));
            }
            ms.push(took.as_secs_f64() * 1000.0);
            (series, series_sum) = lag_series(&body);
        }
        let (p50, max) = med_max(&ms);
        let all = series.len() == SLOTS;
        self.progress(format!(
            "/metrics: median {p50:.1} ms, max {max:.1} ms; {} of {SLOTS} slots have a lag series (sum {series_sum:.0})",
            series.len()
        ));
        out.insert(
            "metrics_ms".into(),
            json!({"median": round(p50, 1), "max": round(max, 1),
                   "samples": ms.iter().map(|m| round(*m, 1)).collect::<Vec<_>>(),
                   "lag_series": series.len(), "lag_series_sum": round(series_sum, 0)}),
        );
        self.row(
            "scale: /metrics (cache cold)",
            format!(
                "median {p50:.0} ms / max {max:.0} ms; {}/{SLOTS} lag series",
                series.len()
            ),
            "—".into(),
            "—".into(),
            format!(
                "< {LATENCY_TARGET_MS:.0} ms, every slot {}",
                mark(p50 < LATENCY_TARGET_MS && all)
            ),
        );
        // /readyz
        let mut ms = Vec::new();
        let mut codes = Vec::new();
        for i in 0..LATENCY_SAMPLES {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let (code, _, took) = http_get(ports[i % ports.len()], "/readyz").await?;
            codes.push(code);
            ms.push(took.as_secs_f64() * 1000.0);
        }
        let (p50, max) = med_max(&ms);
        let ok = codes.iter().all(|&c| c == 200);
        self.progress(format!(
            "/readyz: {codes:?}, median {p50:.1} ms, max {max:.1} ms"
        ));
        out.insert(
            "readyz".into(),
            json!({"codes": codes, "median_ms": round(p50, 1), "max_ms": round(max, 1)}),
        );
        self.row(
            "scale: /readyz",
            format!(
                "{} in median {p50:.0} ms / max {max:.0} ms",
                if ok {
                    "200".to_owned()
                } else {
                    format!("{codes:?}")
                }
            ),
            "—".into(),
            "—".into(),
            format!("200 {}", mark(ok)),
        );
        Ok(())
    }

    /// Samples progress and the processes' peak RSS until `n` events are
    /// handled: (seconds, samples, peak RSS per pid).
    async fn follow_catchup(
        &mut self,
        c: &Client,
        n: i64,
        pids: &[i32],
        timeout: Duration,
    ) -> Res<(f64, Vec<(f64, i64)>, Vec<f64>)> {
        let start = Instant::now();
        let mut samples = Vec::new();
        let mut rss = vec![0.0f64; pids.len()];
        let mut last_print = Instant::now();
        loop {
            let h = handled(c).await?;
            let t = start.elapsed().as_secs_f64();
            samples.push((t, h));
            for (r, pid) in rss.iter_mut().zip(pids) {
                if let Some(m) = vm_hwm_mb(*pid) {
                    *r = r.max(m);
                }
            }
            if h >= n {
                return Ok((t, samples, rss));
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                self.progress(format!(
                    "  {h}/{n} ({:.0}%) after {t:.0}s",
                    100.0 * h as f64 / n as f64
                ));
                last_print = Instant::now();
            }
            if start.elapsed() > timeout {
                return Err(format!("catch-up stalled at {h} of {n} events"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The read model counted every event once.
    async fn check_read_model(&self, c: &Client, n: i64) -> Res<()> {
        let counted: i64 = c
            .query_one(
                "SELECT coalesce(sum(event_count), 0)::int8 FROM account_balances",
                &[],
            )
            .await
            .map_err(err("account_balances"))?
            .get(0);
        if counted != n {
            return Err(format!(
                "account_balances counted {counted} events, {n} expected"
            ));
        }
        Ok(())
    }

    /// Step 5: SIGKILL a non-leader worker, count the slots that moved.
    async fn kill_one(
        &mut self,
        c: &Client,
        workers: &mut [BankWorker],
        out: &mut Map<String, Value>,
    ) -> Res<()> {
        let w = workers.len();
        poll_until(Duration::from_secs(60), "the slots balanced", || {
            balanced(c, w)
        })
        .await?;
        let (_, leader_pid) = leader(c).await.ok_or("no leader")?;
        let holders = c
            .query(
                "SELECT w.worker_id, w.pid, count(*) FROM worker_nodes w \
                 JOIN consumer_assignments a USING (worker_id) GROUP BY 1, 2 ORDER BY 1",
                &[],
            )
            .await
            .map_err(err("holders"))?;
        let (victim_id, victim_pid, k): (String, i32, i64) = holders
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .find(|(_, pid, _)| *pid != leader_pid)
            .ok_or("no worker but the leader holds slots")?;
        let before = assignments(c).await?;
        let victim = workers
            .iter_mut()
            .find(|x| x.pid() == victim_pid)
            .ok_or("the victim is not one of the spawned workers")?;
        victim.kill();
        let killed = Instant::now();
        poll_until(
            Duration::from_secs(60),
            "the slots balanced over the survivors",
            || async {
                balanced(c, w - 1).await
                    && c.query_one(
                        "SELECT count(*) FROM consumer_assignments WHERE worker_id = $1",
                        &[&victim_id],
                    )
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) == 0)
            },
        )
        .await?;
        let failover = killed.elapsed().as_secs_f64();
        // Let a few more rebalances run: moves after the balance count too.
        tokio::time::sleep(REBALANCE_INTERVAL * 3).await;
        let after = assignments(c).await?;
        let moved = before
            .iter()
            .filter(|(key, (_, g))| after.get(*key).is_none_or(|(_, g2)| g2 != g))
            .count();
        let moves: i64 = before
            .iter()
            .map(|(key, (_, g))| after.get(key).map_or(1, |(_, g2)| g2 - g))
            .sum();
        let bound = k as usize + w - 1;
        self.progress(format!(
            "SIGKILLed a worker holding {k} slots: balanced over {} after {failover:.1}s; \
             {moved} slots changed owner ({moves} generation steps); bound k + workers − 1 = {bound}",
            w - 1
        ));
        out.insert(
            "sigkill".into(),
            json!({"victim_slots": k, "workers": w, "slots_moved": moved, "generation_steps": moves,
                   "bound": bound, "balanced_after_s": round(failover, 2),
                   "heartbeat_timeout_s": HEARTBEAT_TIMEOUT.as_secs_f64(),
                   "rebalance_interval_s": REBALANCE_INTERVAL.as_secs_f64()}),
        );
        self.row(
            &format!("scale: slots moved after SIGKILL ({w} workers, victim held {k})"),
            format!("{moved} (balanced after {failover:.1} s)"),
            "—".into(),
            "—".into(),
            format!("≤ k + workers − 1 = {bound} {}", mark(moved <= bound)),
        );
        Ok(())
    }

    /// Step 6: 1, 4 and 8 static partition processes.
    async fn static_partitions(
        &mut self,
        bank: &Path,
        url: &str,
        c: &Client,
        n: i64,
        out: &mut Map<String, Value>,
    ) -> Res<()> {
        poll_until(
            Duration::from_secs(60),
            "the workers' sessions to end",
            || async {
                c.query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 0)
            },
        )
        .await?;
        c.batch_execute(
            "DELETE FROM consumer_assignments; DELETE FROM worker_nodes; \
             DELETE FROM projection_checkpoints; DELETE FROM account_balances",
        )
        .await
        .map_err(err("clearing the worker-mode state"))?;
        let t = Instant::now();
        c.batch_execute("VACUUM (ANALYZE) events")
            .await
            .map_err(err("VACUUM events"))?;
        self.progress(format!(
            "VACUUM (ANALYZE) events: {:.1}s",
            t.elapsed().as_secs_f64()
        ));
        let mut walls = BTreeMap::new();
        let mut results = Map::new();
        for total in STATIC_COUNTS {
            let mut fig = Map::new();
            c.batch_execute("DELETE FROM projection_checkpoints; DELETE FROM account_balances")
                .await
                .map_err(err("resetting the read model"))?;
            if total > 1 {
                let name = format!("events_partitions_{total}_idx");
                let t = Instant::now();
                // The engine's statement (src/partition_index.rs), run here
                // so that the processes below find it built.
                c.batch_execute(&format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON events \
                     ((aggregate_hash % {total}), transaction_id, global_position)"
                ))
                .await
                .map_err(err("building the partition index"))?;
                let s = t.elapsed().as_secs_f64();
                self.progress(format!("{name} built in {s:.1}s"));
                fig.insert("index_build_s".into(), round(s, 1));
            }
            let indexes = event_indexes(c).await?;
            let before = index_rows_read(c).await?;
            let spawned = Instant::now();
            let mut procs = Vec::new();
            for k in 0..total {
                procs.push(BankWorker::spawn_with(
                    bank,
                    url,
                    &["run-projections", "--once"],
                    &[
                        ("RUN_MODE", "static".into()),
                        ("PROJECTIONS", PROJECTION.into()),
                        ("PARTITION_KEY", k.to_string()),
                        ("TOTAL_PARTITIONS", total.to_string()),
                        ("ADMIN_ADDR", "off".into()),
                    ],
                )?);
            }
            let pids: Vec<i32> = procs.iter().map(|p| p.pid()).collect();
            let r = self
                .follow_catchup(c, n, &pids, Duration::from_secs(3600))
                .await;
            let (_, samples, rss) = r.map_err(|e| with_logs(e, &mut procs))?;
            // Wall time: until every process has exited.
            let r = poll_until(Duration::from_secs(120), "the processes to exit", || {
                let done = procs.iter_mut().all(|p| p.exited().is_some());
                async move { done }
            })
            .await;
            r.map_err(|e| with_logs(e, &mut procs))?;
            let wall = spawned.elapsed().as_secs_f64();
            let failed: Vec<String> = procs
                .iter_mut()
                .filter_map(|p| {
                    let failed = p.exited().is_some_and(|s| !s.success());
                    failed.then(|| p.describe())
                })
                .collect();
            if !failed.is_empty() {
                return Err(format!(
                    "{total} partitions: a process failed:\n{}",
                    failed.join("\n")
                ));
            }
            drop(procs);
            let rows = index_rows_read(c).await? - before;
            self.check_read_model(c, n).await?;
            let new: Vec<String> = event_indexes(c)
                .await?
                .into_iter()
                .filter(|i| !indexes.contains(i))
                .collect();
            if !new.is_empty() {
                eprintln!("warning: the processes built indexes of their own: {new:?}");
                fig.insert("indexes_built_by_processes".into(), json!(new));
            }
            let ratio = rows as f64 / n as f64;
            let rates = segment_rates(&samples, n);
            let peak = rss.iter().copied().fold(0.0, f64::max);
            self.progress(format!(
                "{total} partition process(es): {wall:.1}s ({}), {rows} index rows ({ratio:.3}x the log), \
                 peak RSS {peak:.1} MB; per tenth: {}",
                ev_s(n as f64 / wall),
                fmt_segments(&rates)
            ));
            fig.insert("wall_s".into(), round(wall, 1));
            fig.insert("events_per_s".into(), round(n as f64 / wall, 0));
            fig.insert("index_rows".into(), json!(rows));
            fig.insert("index_rows_per_event".into(), round(ratio, 3));
            fig.insert(
                "segment_events_per_s".into(),
                json!(rates.iter().map(|r| round(*r, 0)).collect::<Vec<_>>()),
            );
            fig.insert(
                "peak_rss_mb".into(),
                json!(rss.iter().map(|r| round(*r, 1)).collect::<Vec<_>>()),
            );
            results.insert(total.to_string(), Value::Object(fig));
            walls.insert(total, wall);
            self.row(
                &format!("scale: {total} static partition(s), index rows"),
                format!("{rows} ({ratio:.3}x the log)"),
                "—".into(),
                "—".into(),
                format!("≤ 1.2x {}", mark(ratio <= 1.2)),
            );
            self.row(
                &format!("scale: {total} static partition(s), catch-up"),
                if total == 1 {
                    format!(
                        "{wall:.0} s ({}); per tenth: {}; peak RSS {peak:.1} MB",
                        ev_s(n as f64 / wall),
                        fmt_segments(&rates)
                    )
                } else {
                    format!(
                        "{wall:.0} s ({}); peak RSS {peak:.1} MB per process",
                        ev_s(n as f64 / wall)
                    )
                },
                "—".into(),
                "—".into(),
                match (total, walls.get(&1)) {
                    (8, Some(one)) => format!("≤ 1 process ({one:.0} s) {}", mark(wall <= *one)),
                    _ => "—".into(),
                },
            );
        }
        out.insert("static_partitions".into(), Value::Object(results));
        Ok(())
    }
}
