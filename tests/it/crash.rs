//! In-place crash recovery: one server process dies by SIGKILL (the OOM
//! killer, a segfault), PostgreSQL ends every session, replays its WAL and
//! accepts connections again, with `pg_postmaster_start_time()` unchanged.
//! Commits whose WAL was not yet written are gone and their transaction ids
//! are handed out again: a cursor that moved past them must not skip the new
//! events that reuse them.
//!
//! The projections run as a real `bank run-projections` process against a
//! private cluster. `PROJECTIONIST_SOAK=1` makes the chaos test run for a
//! minute.

use crate::cli::{bank, run, text};
use crate::common::wait_until;
use projectionist::testing::{TestDatabase, TestServer};
use projectionist::{EventStore, ExpectedVersion, NewEvent, StoreConfig};
use rand::Rng;
use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A long WAL writer delay widens the window in which asynchronous commits
/// are not yet written; autovacuum off keeps its commits from flushing the
/// WAL at a random moment.
pub const CRASH_SETTINGS: &str = "wal_writer_delay = '10s'\nautovacuum = off\n";

/// A `bank run-projections` process whose stderr is collected (for failure
/// messages) and which is killed on drop.
pub struct BankProcess {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
}

impl BankProcess {
    pub fn spawn(url: &str, env: &[(&str, &str)]) -> BankProcess {
        let mut cmd = bank();
        cmd.env("DATABASE_URL", url)
            .args(["run-projections"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn bank run-projections");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        // Drained all the time, so that a chatty process never blocks on a
        // full pipe.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr buffer")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        BankProcess {
            child: Some(child),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `sig` (`STOP`, `CONT`, `KILL`…) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of its stderr.
    pub fn stderr_tail(&self) -> String {
        let all = self.stderr.lock().expect("stderr buffer").clone();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for BankProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Server processes stopped with SIGSTOP; continued on drop (a failing
/// test must not leave stopped processes behind, which would keep the
/// server from shutting down).
pub struct Frozen<'a> {
    server: &'a TestServer,
    pids: Vec<i32>,
}

impl<'a> Frozen<'a> {
    /// Freezes the WAL writer and the background writer, so that nothing
    /// writes the WAL of asynchronous commits made after this before the
    /// crash (the WAL writer would within `wal_writer_delay`; the
    /// background writer flushes WAL before it writes out a dirty page).
    pub async fn wal_writers(server: &'a TestServer, c: &tokio_postgres::Client) -> Frozen<'a> {
        let pids: Vec<i32> = c
            .query(
                "SELECT pid FROM pg_stat_activity WHERE backend_type IN ('walwriter', 'background writer')",
                &[],
            )
            .await
            .expect("auxiliary processes")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(pids.len(), 2, "walwriter and background writer: {pids:?}");
        let frozen = Frozen { server, pids };
        for pid in &frozen.pids {
            server.signal_backend(*pid, "STOP").expect("SIGSTOP");
        }
        frozen
    }

    /// Asserts that the WAL up to `lsn` (the end of the asynchronous
    /// commits) is still only in shared memory: the crash will lose it.
    pub async fn assert_unwritten(c: &tokio_postgres::Client, lsn: &str) {
        let unwritten: bool = c
            .query_one("SELECT pg_current_wal_lsn() < $1::text::pg_lsn", &[&lsn])
            .await
            .expect("write lsn")
            .get(0);
        assert!(
            unwritten,
            "test precondition: the WAL of the asynchronous commits (up to {lsn}) was written \
             before the crash, so nothing would be lost; something wrote the WAL despite the frozen \
             WAL writer"
        );
    }

    /// The crash: SIGKILLs the oldest client backend of `c`'s database
    /// other than `c`'s, then the frozen processes (which could not answer
    /// the postmaster's SIGQUIT). PostgreSQL then reinitialises in place.
    pub async fn crash(mut self, c: &tokio_postgres::Client) {
        let victim: i32 = c
            .query_one(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                   AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
                 ORDER BY backend_start LIMIT 1",
                &[],
            )
            .await
            .expect("a victim")
            .get(0);
        self.server.kill_backend(victim).expect("SIGKILL a backend");
        for pid in std::mem::take(&mut self.pids) {
            self.server
                .kill_backend(pid)
                .expect("SIGKILL a frozen process");
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = self.server.signal_backend(*pid, "CONT");
        }
    }
}

/// `bank status --json` as JSON.
pub fn status_json(url: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = bank();
    cmd.env("DATABASE_URL", url).args(["status", "--json"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("run bank status");
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).expect("status --json is JSON")
}

/// Whether every slot in `status` is running with no lag.
pub fn all_caught_up(status: &serde_json::Value) -> bool {
    let rows = status["projections"].as_array().expect("projections array");
    !rows.is_empty()
        && rows
            .iter()
            .all(|r| r["lag_events"].as_i64() == Some(0) && r["state"] == "running")
}

/// An account's (balance, event_count).
pub type Account = (i64, i64);
/// Accounts by id.
pub type Accounts = BTreeMap<String, Account>;

/// Per account: (balance, event_count) as the events say and as
/// `account_balances` says, both unqualified (the connection's search_path).
pub async fn balances(c: &tokio_postgres::Client) -> (Accounts, Accounts) {
    let want = c
        .query(
            "SELECT aggregate_id, sum(CASE event_type WHEN 'MoneyDeposited' THEN coalesce(payload->>'cents', payload->>'amount')::int8 \
                                       WHEN 'MoneyWithdrawn' THEN -coalesce(payload->>'cents', payload->>'amount')::int8 ELSE 0 END)::int8, \
                    count(*) FROM events WHERE aggregate_type = 'Account' GROUP BY aggregate_id",
            &[],
        )
        .await
        .expect("expected balances")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let got = c
        .query(
            "SELECT account_id, balance, event_count FROM account_balances",
            &[],
        )
        .await
        .expect("account_balances")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    (want, got)
}

/// The accounts whose read-model row differs from the events: (account,
/// from the events, in account_balances).
pub fn mismatches(
    want: &Accounts,
    got: &Accounts,
) -> Vec<(String, Option<Account>, Option<Account>)> {
    want.keys()
        .chain(got.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .map(|k| ((*k).clone(), want.get(k).copied(), got.get(k).copied()))
        .collect()
}

/// Waits until the server answers queries again after a crash, on a new
/// connection, and returns it.
async fn reconnect(db: &TestDatabase) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(c) = db.connect().await {
            if c.simple_query("SELECT 1").await.is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the server did not accept connections within 60 s of the crash"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a SIGKILL: waits until `c` is cut off (crash recovery ends every
/// session; until then the server may still answer as if nothing happened),
/// then until the server answers again, and returns a new connection.
pub async fn await_recovery(
    db: &TestDatabase,
    c: tokio_postgres::Client,
) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.simple_query("SELECT 1").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "no crash recovery: a session survived the SIGKILL of a backend for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reconnect(db).await
}

/// acct-1's (balance, event_count) in the read model.
async fn balance(c: &tokio_postgres::Client) -> Option<(i64, i64)> {
    c.query_opt(
        "SELECT balance, event_count FROM account_balances WHERE account_id = 'acct-1'",
        &[],
    )
    .await
    .ok()
    .flatten()
    .map(|r| (r.get(0), r.get(1)))
}

/// The checkpoint rows, as text, for failure messages.
async fn checkpoints(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT projection_name || ' cursor ' || last_transaction_id::text || '/' || \
                last_global_position || ' ' || status || ' handled ' || events_handled \
         FROM projection_checkpoints ORDER BY 1",
        &[],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
    .unwrap_or_else(|e| vec![e.to_string()])
}

async fn xid(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}

/// The crash that loses asynchronous commits, with the projections' cursors
/// above the transaction ids that crash recovery hands out again; then one
/// deposit, which must be projected.
async fn deposit_after_a_crash_that_reuses_transaction_ids_is_projected(dispatcher: &str) {
    let server = TestServer::start_private_with(CRASH_SETTINGS)
        .await
        .expect("private server");
    let db = server.create_database().await.expect("database");
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let mut projections = BankProcess::spawn(
        &db.url(),
        &[
            ("DISPATCHER", dispatcher),
            ("POLL_INTERVAL", "100ms"),
            ("MAX_BACKOFF", "500ms"),
        ],
    );
    let c = db.connect().await.expect("connect");

    // 1. A deposit, projected.
    c.batch_execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         VALUES ('Account', 'acct-1', 1, 'MoneyDeposited', '{\"amount\": 100}')",
    )
    .await
    .expect("first deposit");
    wait_until(
        Duration::from_secs(30),
        "the first deposit to be projected",
        || async { balance(&c).await == Some((100, 1)) },
    )
    .await;
    // Both slots have written their checkpoints past it (the notifier skips
    // deposits, and writes its checkpoint because the head moved).
    wait_until(
        Duration::from_secs(30),
        "both checkpoints past the first deposit",
        || async {
            c.query_one(
                "SELECT count(*) FROM projection_checkpoints WHERE last_transaction_id >= \
                    (SELECT transaction_id FROM events WHERE global_position = 1)",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 2)
            .unwrap_or(false)
        },
    )
    .await;
    // A synchronous commit that writes WAL flushes everything before it:
    // the deposit, the projected row and the checkpoints are durable now.
    c.batch_execute("CREATE TABLE durable_marker ()")
        .await
        .expect("durable marker");
    let started: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await
        .expect("start time")
        .get(0);

    // 2. Freeze the WAL writer and the background writer.
    let frozen = Frozen::wal_writers(&server, &c).await;

    // 3. Asynchronous commits: 20 transactions that only take an id, and
    // an event no projection of the bank reads. Committed (visible), not
    // written to the WAL files.
    let writer = db.connect().await.expect("connect");
    writer
        .batch_execute("SET synchronous_commit = off")
        .await
        .expect("async commits");
    let mut lost = Vec::new();
    for _ in 0..20 {
        lost.push(xid(&writer, "SELECT pg_current_xact_id()::text::int8").await);
    }
    let filtered: i64 = writer
        .query_one(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             VALUES ('Audit', 'audit-1', 1, 'Noted', '{}') RETURNING transaction_id::text::int8",
            &[],
        )
        .await
        .expect("filtered event")
        .get(0);
    lost.push(filtered);
    let async_end: String = writer
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("insert lsn")
        .get(0);

    // 4. The projections read past them: the filtered event moves both
    // checkpoints (asynchronously committed too) above every lost id.
    let highest_lost = *lost.iter().max().expect("ids");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let moved: i64 = c
            .query_one(
                "SELECT count(*) FROM projection_checkpoints WHERE last_transaction_id::text::int8 >= $1",
                &[&highest_lost],
            )
            .await
            .expect("checkpoints")
            .get(0);
        if moved == 2 {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "the checkpoints did not move past the asynchronously committed ids {lost:?} \
                 within 30 s: {:?}\n{}",
                checkpoints(&c).await,
                projections.stderr_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let checkpoint_before: i64 = xid(
        &c,
        "SELECT last_transaction_id::text::int8 FROM projection_checkpoints \
         WHERE projection_name = 'account_balances'",
    )
    .await;
    // Precondition: their WAL is still only in shared memory.
    Frozen::assert_unwritten(&c, &async_end).await;

    // 5. The crash.
    frozen.crash(&c).await;
    drop(writer);
    let c = await_recovery(&db, c).await;
    let started_after: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await
        .expect("start time")
        .get(0);
    assert_eq!(
        started_after, started,
        "crash recovery in place keeps the postmaster's start time"
    );
    // Precondition: the lost ids are handed out again, below the cursor the
    // projection had before the crash.
    let fresh = xid(&c, "SELECT pg_current_xact_id()::text::int8").await;
    assert!(
        fresh < checkpoint_before,
        "test precondition: after the crash the next transaction id ({fresh}) must be below \
         the checkpoint seen before it ({checkpoint_before}), lost ids {lost:?}; otherwise \
         the asynchronous commits survived and this test proves nothing"
    );
    let filtered_left: i64 = xid(
        &c,
        "SELECT count(*) FROM events WHERE aggregate_type = 'Audit'",
    )
    .await;
    assert_eq!(
        filtered_left, 0,
        "the asynchronously appended event was lost"
    );

    // 6. A deposit after the crash, with a reused transaction id.
    let deposit_xid: i64 = c
        .query_one(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             VALUES ('Account', 'acct-1', 2, 'MoneyDeposited', '{\"amount\": 50}') \
             RETURNING transaction_id::text::int8",
            &[],
        )
        .await
        .expect("deposit after the crash")
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if balance(&c).await == Some((150, 2)) {
            break;
        }
        if Instant::now() > deadline {
            let rows = checkpoints(&c).await;
            panic!(
                "the deposit appended after the crash (transaction id {deposit_xid}, below the \
                 pre-crash checkpoint {checkpoint_before}) was never projected within 20 s: \
                 account_balances shows {:?}, want (150, 2); durable checkpoints now {rows:?}; \
                 run-projections alive: {}\n{}",
                balance(&c).await,
                projections.alive(),
                projections.stderr_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = db.url();
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        last = tokio::task::block_in_place(|| status_json(&url, &[]));
        if all_caught_up(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(all_caught_up(&last), "status after the crash: {last}");
    assert!(projections.alive(), "{}", projections.stderr_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_reusing_xids_loses_no_event_with_notify() {
    deposit_after_a_crash_that_reuses_transaction_ids_is_projected("notify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_reusing_xids_loses_no_event_with_poll() {
    deposit_after_a_crash_that_reuses_transaction_ids_is_projected("poll").await;
}

/// Appends `event` to `stream` at `version` + 1, retrying through crashes
/// until it is stored, by this attempt or by an earlier one whose answer the
/// crash swallowed (the event id is the idempotency key).
async fn append_retrying(store: &EventStore, stream: &str, version: i64, event: &NewEvent) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let e = match store
            .append(
                "Account",
                stream,
                ExpectedVersion::Exact(version),
                std::slice::from_ref(event),
            )
            .await
        {
            Ok(_) => return,
            Err(e) if e.is_duplicate_event() => return,
            Err(e) if e.is_conflict() => {
                // An earlier attempt committed: the stream is one ahead.
                match store.read_stream("Account", stream, version + 1, 1).await {
                    Ok(stored) if stored.first().map(|s| s.event_id) == Some(event.event_id()) => {
                        return
                    }
                    Ok(_) => panic!("append to {stream} conflicts with another writer: {e}"),
                    Err(read) => read,
                }
            }
            Err(e) if e.is_connection() || e.is_retryable() => e,
            Err(e) => panic!("append to {stream} failed: {e:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "appends to {stream} did not resume within 60 s: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shared switches of the writers: stop for good, or pause appending.
#[derive(Clone, Default)]
struct Flags {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
}

impl Flags {
    /// Whether appends are paused; waits a little when they are.
    async fn paused(&self) -> bool {
        let paused = self.pause.load(Ordering::SeqCst);
        if paused {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        paused
    }
}

/// Runs `sql` every `every` on its own connection (reconnecting through
/// crashes) until `stop`. With `synchronous_commit` off in `config` it burns
/// transaction ids that a crash hands out again; with it on, each run of a
/// writing statement flushes the WAL (and with it every asynchronous commit
/// before it), as any durable writer elsewhere in the cluster does.
async fn side_writer(
    config: tokio_postgres::Config,
    sql: &'static str,
    every: Duration,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(connection);
        while !stop.load(Ordering::SeqCst) {
            if client.batch_execute(sql).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// A writer whose commits are synchronous: every acknowledged append is
/// durable. Appends deposits to `stream` with exact expected versions until
/// `stop`; returns how many it appended.
async fn durable_writer(store: EventStore, stream: String, flags: Flags) -> i64 {
    let stop = flags.stop.clone();
    let mut version = 0i64;
    while !stop.load(Ordering::SeqCst) {
        if flags.paused().await {
            continue;
        }
        let event = NewEvent::new(
            "MoneyDeposited",
            &serde_json::json!({ "amount": version + 1 }),
        )
        .expect("event")
        .with_event_id(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{stream}/{version}").as_bytes(),
        ));
        append_retrying(&store, &stream, version, &event).await;
        version += 1;
        // Rarely: every synchronous commit also makes the asynchronous
        // commits before it durable, closing the window this test is about.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    version
}

/// A writer whose commits are asynchronous (`synchronous_commit = off`): a
/// crash loses its last acknowledged appends and hands their transaction ids
/// out again. Deposits and withdrawals over a few accounts, and now and then
/// an event the bank's projections filter out (which moves their
/// checkpoints past the ids without handling anything).
async fn async_writer(store: EventStore, prefix: String, flags: Flags) {
    let stop = flags.stop.clone();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if flags.paused().await {
            continue;
        }
        let (stream, event, aggregate_type) = {
            let mut rng = rand::thread_rng();
            let stream = format!("{prefix}-{}", rng.gen_range(0..4));
            if n % 8 == 7 {
                let e = NewEvent::new("Noted", &serde_json::json!({ "n": n })).expect("event");
                (format!("{prefix}-audit"), e, "Audit")
            } else {
                let kind = if rng.gen_bool(0.7) {
                    "MoneyDeposited"
                } else {
                    "MoneyWithdrawn"
                };
                let e = NewEvent::new(
                    kind,
                    &serde_json::json!({ "amount": rng.gen_range(1..500) }),
                )
                .expect("event");
                (stream, e, "Account")
            }
        };
        n += 1;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match store
                .append(
                    aggregate_type,
                    &stream,
                    ExpectedVersion::Any,
                    std::slice::from_ref(&event),
                )
                .await
            {
                Ok(_) => break,
                Err(e) if e.is_duplicate_event() => break,
                Err(e) if e.is_connection() || e.is_retryable() => {
                    assert!(
                        Instant::now() < deadline,
                        "async appends did not resume within 60 s: {e}"
                    );
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("async append failed: {e:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_random_backends_while_appending_keeps_the_read_model_exact() {
    let soak = std::env::var("PROJECTIONIST_SOAK").is_ok_and(|v| v == "1");
    let (min_kills, run_for) = if soak {
        (30, Duration::from_secs(60))
    } else {
        (7, Duration::ZERO)
    };
    let server = TestServer::start_private_with(CRASH_SETTINGS)
        .await
        .expect("private server");
    let db = server.create_database().await.expect("database");
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let mut projections = BankProcess::spawn(
        &db.url(),
        &[
            ("DISPATCHER", "poll"),
            ("POLL_INTERVAL", "50ms"),
            ("MAX_BACKOFF", "500ms"),
            ("BATCH_SIZE", "50"),
        ],
    );
    let flags = Flags::default();
    let stop = flags.stop.clone();
    let c = db.connect().await.expect("connect");
    c.batch_execute("CREATE TABLE side (n int8)")
        .await
        .expect("side table");
    // Now and then a durable commit elsewhere, and transactions that only
    // take an id, asynchronously (ids a crash hands out again, which the
    // projections read past without writing their checkpoints).
    let side = vec![
        tokio::spawn(side_writer(
            db.config(),
            "INSERT INTO side VALUES (1)",
            Duration::from_millis(250),
            stop.clone(),
        )),
        tokio::spawn(side_writer(
            {
                let mut config = db.config();
                config.options("-c synchronous_commit=off");
                config
            },
            "SELECT pg_current_xact_id()",
            Duration::from_millis(5),
            stop.clone(),
        )),
    ];
    let durable_store =
        EventStore::connect_config(db.config(), StoreConfig::default()).expect("store");
    let mut async_config = db.config();
    async_config.options("-c synchronous_commit=off");
    let async_store =
        EventStore::connect_config(async_config, StoreConfig::default()).expect("async store");
    let durable: Vec<_> = (0..2)
        .map(|w| {
            let stream = format!("durable-{w}");
            (
                stream.clone(),
                tokio::spawn(durable_writer(durable_store.clone(), stream, flags.clone())),
            )
        })
        .collect();
    let asynchronous: Vec<_> = (0..2)
        .map(|w| {
            tokio::spawn(async_writer(
                async_store.clone(),
                format!("async-{w}"),
                flags.clone(),
            ))
        })
        .collect();

    // SIGKILL a random client backend every 1–2 s, each time waiting until
    // the server is back. Half of the crashes come after a pause of the
    // appends (the projections caught up, their checkpoints made durable by
    // the side writer, ids burnt since), half in the middle of them.
    let started = Instant::now();
    let mut kills = 0;
    let mut c = c;
    while kills < min_kills || started.elapsed() < run_for {
        let (active, quiet) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_range(500..1200),
                rng.gen_bool(0.5).then(|| rng.gen_range(400..900)),
            )
        };
        tokio::time::sleep(Duration::from_millis(active)).await;
        if let Some(quiet) = quiet {
            flags.pause.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(quiet)).await;
        }
        let pids: Vec<i32> = c
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                   AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("backends")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!pids.is_empty(), "no backends to kill");
        let victim = pids[rand::thread_rng().gen_range(0..pids.len())];
        // The victim may have ended on its own meanwhile: try another round.
        if server.kill_backend(victim).is_ok() {
            kills += 1;
            c = await_recovery(&db, c).await;
        }
        flags.pause.store(false, Ordering::SeqCst);
        assert!(
            projections.alive(),
            "run-projections died in crash {kills}:\n{}",
            projections.stderr_tail()
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut appended = Vec::new();
    for (stream, w) in durable {
        appended.push((stream, w.await.expect("durable writer")));
    }
    for w in asynchronous.into_iter().chain(side) {
        w.await.expect("writer");
    }
    let crashes_took = started.elapsed();

    // Every acknowledged synchronous append survived.
    for (stream, n) in &appended {
        let stored: i64 = c
            .query_one(
                "SELECT count(*) FROM events WHERE aggregate_id = $1",
                &[stream],
            )
            .await
            .expect("count")
            .get(0);
        assert!(*n > 0, "{stream}: the durable writer made progress");
        assert_eq!(
            stored, *n,
            "{stream}: every acknowledged synchronous append is stored"
        );
    }
    let stored_events: i64 = c
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .expect("count")
        .get(0);

    // The read model converges on exactly the events that are stored, and
    // no slot stalls.
    let url = db.url();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (want, got) = balances(&c).await;
        let wrong = mismatches(&want, &got);
        let status = tokio::task::block_in_place(|| status_json(&url, &[]));
        if wrong.is_empty() && all_caught_up(&status) {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "after {kills} crashes ({crashes_took:?}, {stored_events} events stored) the read model \
                 did not converge within 60 s: {} of {} accounts differ (account, from events, \
                 in account_balances): {wrong:?}\nstatus: {status}\ncheckpoints: {:?}\n{}",
                wrong.len(),
                want.len(),
                checkpoints(&c).await,
                projections.stderr_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(projections.alive(), "{}", projections.stderr_tail());
}
