//! Worker mode with real processes: `bank run-projections` workers (the
//! bank example's binary) started with short timers, the slot distribution
//! read from `consumer_assignments`, and the `worker_failover_s` and
//! `worker_rebalance_s` cases.

use crate::setup::Bench;
use crate::stats::{mark, median, round};
use projectionist::testing::TestDatabase;
use rand::Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const WORKER_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
const WORKER_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
const WORKER_REBALANCE_INTERVAL: Duration = Duration::from_millis(250);
/// account_balances in 6 partitions + large_withdrawal_notifier: 7 slots.
const WORKER_PARTITIONS: &str = "account_balances=6";
const WORKER_SLOTS: usize = 7;

/// A bank example process (a worker, or a static `run-projections`);
/// SIGKILLed on drop. Its stderr is kept (bounded) for error messages.
pub struct BankWorker {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
}

impl BankWorker {
    /// A worker-mode process with this module's short timers and slots.
    fn spawn(bank: &Path, url: &str) -> Result<BankWorker, String> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        BankWorker::spawn_with(
            bank,
            url,
            &["run-projections"],
            &[
                ("RUN_MODE", "worker".into()),
                ("HEARTBEAT_INTERVAL", ms(WORKER_HEARTBEAT_INTERVAL)),
                ("HEARTBEAT_TIMEOUT", ms(WORKER_HEARTBEAT_TIMEOUT)),
                ("REBALANCE_INTERVAL", ms(WORKER_REBALANCE_INTERVAL)),
                ("PROJECTION_PARTITIONS", WORKER_PARTITIONS.into()),
                ("ADMIN_ADDR", "off".into()),
                ("POOL_SIZE", "8".into()),
            ],
        )
    }

    /// `bank ARGS…` on `url` with `env` (over a clean slate of the engine's
    /// variables, at log level warn unless `env` says otherwise).
    pub fn spawn_with(
        bank: &Path,
        url: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Result<BankWorker, String> {
        let mut cmd = std::process::Command::new(bank);
        for var in [
            "PARTITION_KEY",
            "TOTAL_PARTITIONS",
            "DISPATCHER",
            "BATCH_SIZE",
            "PROJECTIONS",
            "PROJECTION_PARTITIONS",
            "RUN_MODE",
            "ADMIN_ADDR",
            "RUST_LOG",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DATABASE_URL", url).env("LOG_LEVEL", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .args(args)
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

    /// The exit status, once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    pub fn describe(&mut self) -> String {
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
pub async fn leader(c: &Client) -> Option<(String, i32)> {
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
pub async fn poll_until<F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<Duration, String>
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
pub fn with_logs(e: String, workers: &mut [BankWorker]) -> String {
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

impl Bench {
    /// The bank example binary next to this one; (re)built with cargo when
    /// run under `cargo run`, so that it matches the library.
    pub async fn bank_exe(&self) -> Result<PathBuf, String> {
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
            self.progress("building the bank example (cargo build --features otel --example bank)");
            let mut cmd = tokio::process::Command::new(cargo);
            cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
                "build",
                "--quiet",
                "--features",
                "otel",
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
                "{} is missing: build it with `cargo build --release --features otel --example bank`",
                bank.display()
            ))
        }
    }

    /// A fresh database migrated by `bank migrate`.
    pub async fn bank_db(&self, bank: &Path) -> Result<TestDatabase, String> {
        // The benchmark's server: DATABASE_URL's when set (not the test
        // harness's, which only reads PROJECTIONIST_TEST_DATABASE_URL).
        let server =
            crate::setup::bench_server().map_err(|e| format!("no PostgreSQL server: {e}"))?;
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

    /// `worker_failover_s` and `worker_rebalance_s`, each repetition on a
    /// fresh database.
    pub async fn worker_cases(&mut self) {
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
}
