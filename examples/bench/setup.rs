//! The benchmark's state (`Bench`) and its databases: fresh migrated
//! databases on the shared server, the seeded databases of the catch-up
//! cases, and the server and machine facts recorded at the start.

use crate::cli::{select, Args};
use crate::events::{AGGREGATE_TYPE, EVENT_TYPE};
use crate::raw::{RAW_CHECKPOINT_NAME, RAW_INSERT};
use crate::stats::{median, round};
use projectionist::testing::{TestDatabase, TestServer};
use projectionist::{EventStore, RunnerConfig, StoreConfig, DEFAULT_BATCH_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

/// Rows per raw INSERT statement when seeding.
pub const SEED_CHUNK: usize = 5_000;

/// A database seeded with events for the catch-up cases.
pub struct Seeded {
    /// The database (dropped at the end).
    pub db: TestDatabase,
    /// The library's store on it.
    pub store: EventStore,
    /// A plain connection for the raw side and resets.
    pub client: Client,
    /// Events seeded.
    pub events: u64,
    /// The sum of their amounts (the read models' expected total).
    pub amount: i64,
}

/// The benchmark's state: options, results so far, databases to drop.
pub struct Bench {
    /// The command line.
    pub args: Args,
    /// The selected cases, in run order.
    pub cases: Vec<&'static str>,
    /// When the run started (progress lines, `elapsed_s`).
    pub started: Instant,
    /// The seeded random source of plans, spacings and pauses.
    pub rng: StdRng,
    /// The JSON report so far.
    pub json: Map<String, Value>,
    /// The table rows so far: case, library, baseline, ratio, target.
    pub rows: Vec<[String; 5]>,
    /// Repetitions per figure.
    pub reps: u32,
    /// Batch size (page size) of the catch-up cases.
    pub batch: i64,
    /// Where the server's settings came from.
    pub server_kind: &'static str,
    /// Databases to drop at the end.
    pub dbs: Vec<TestDatabase>,
}

impl Bench {
    /// The state for `args`, before any database exists.
    pub fn new(args: Args) -> Bench {
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
            } else if std::env::var(projectionist::testing::TEST_DATABASE_URL)
                .is_ok_and(|u| !u.trim().is_empty())
            {
                "PROJECTIONIST_TEST_DATABASE_URL server"
            } else {
                "throwaway cluster (projectionist::testing)"
            },
            dbs: Vec::new(),
        }
    }

    /// The connection settings of the library's stores (`--tls`).
    pub fn lib_config(&self, db: &TestDatabase) -> tokio_postgres::Config {
        let mut config = db.config();
        if !self.args.tls {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        config
    }

    /// A writer's store configuration: the library's defaults, with
    /// `--notify-interval-ms` and `--notify-max-interval-ms` when given.
    pub fn writer_store_config(&self) -> StoreConfig {
        let mut config = StoreConfig::default();
        if let Some(ms) = self.args.notify_interval_ms {
            config = config.notify_interval(Duration::from_secs_f64(ms / 1000.0));
        }
        if let Some(ms) = self.args.notify_max_interval_ms {
            config = config.notify_max_interval(Duration::from_secs_f64(ms / 1000.0));
        }
        config
    }

    /// The runner configuration of the catch-up cases (`--batch-size`).
    pub fn catchup_config(&self) -> RunnerConfig {
        RunnerConfig::default()
            .batch_size(self.batch)
            .expect("--batch-size is range-checked")
    }

    /// Whether `case` was selected.
    pub fn wants(&self, case: &str) -> bool {
        self.cases.contains(&case)
    }

    /// Prints a progress line with the elapsed time to stderr.
    pub fn progress(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:>6.1}s] {}",
            self.started.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }

    /// A fresh, migrated database.
    pub async fn fresh_db(&mut self) -> (TestDatabase, EventStore, Client) {
        let server = bench_server().unwrap_or_else(|e| panic!("no PostgreSQL server: {e}"));
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
        let mut store_config = if self.args.no_append_notify {
            self.writer_store_config()
                .notify_channel(None)
                .expect("no channel is valid")
        } else {
            self.writer_store_config()
        };
        if let Some(lanes) = self.args.append_lanes {
            store_config = store_config.append_lanes(lanes);
        }
        let store = EventStore::connect_config(self.lib_config(&db), store_config)
            .unwrap_or_else(|e| panic!("cannot build the store: {e}"));
        let client = db
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e}"));
        (db, store, client)
    }

    /// Records the server's settings, the machine and the `SELECT 1`
    /// round trip in the JSON, and prints them.
    pub async fn server_info(&mut self, client: &Client) {
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

    /// A fresh database with `n` events over `--accounts` accounts, the
    /// `bench_balances` table and the raw baseline's checkpoint row.
    pub async fn seeded(&mut self, n: u64) -> Seeded {
        self.seeded_with(n, 0).await
    }

    /// Like [`Bench::seeded`]; with `payload_bytes` > 0 each payload is
    /// padded to about that many bytes of JSON text with a `note` field of
    /// random letters and digits (which pglz does not compress, so rows
    /// this large are stored out of line, as real large payloads are).
    pub async fn seeded_with(&mut self, n: u64, payload_bytes: usize) -> Seeded {
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
                payloads.push(if payload_bytes == 0 {
                    format!(r#"{{"amount": {x}}}"#)
                } else {
                    let head = format!(r#"{{"amount": {x}, "note": ""#);
                    let pad = payload_bytes.saturating_sub(head.len() + 2);
                    let mut p = String::with_capacity(payload_bytes);
                    p.push_str(&head);
                    p.extend(
                        (&mut self.rng)
                            .sample_iter(rand::distributions::Alphanumeric)
                            .take(pad)
                            .map(char::from),
                    );
                    p.push_str("\"}");
                    p
                });
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
            "seeded {n} events over {accounts} accounts in {:.1}s ({} rows per INSERT, then VACUUM ANALYZE){}",
            started.elapsed().as_secs_f64(),
            SEED_CHUNK,
            if payload_bytes > 0 {
                format!(", payloads of {payload_bytes} bytes")
            } else {
                String::new()
            }
        ));
        Seeded {
            db,
            store,
            client,
            events: n,
            amount,
        }
    }
}

/// The server the benchmark creates its databases on: the one in
/// `DATABASE_URL` when set (the benchmark's documented switch; the role
/// needs CREATEDB), otherwise the testing module's shared server (a
/// throwaway cluster, or `PROJECTIONIST_TEST_DATABASE_URL`).
pub fn bench_server() -> Result<&'static TestServer, projectionist::testing::TestingError> {
    static SERVER: std::sync::OnceLock<Result<TestServer, projectionist::testing::TestingError>> =
        std::sync::OnceLock::new();
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => SERVER
            .get_or_init(|| TestServer::at_url(&url))
            .as_ref()
            .map_err(Clone::clone),
        _ => TestServer::shared(),
    }
}
