//! Projection versions with real processes: version 2 of the bank's
//! `account_balances` is built beside version 1 while appends continue,
//! readers of `account_balances` never see an error, fewer rows or a
//! smaller total, promotion switches them to version 2's columns, and the
//! old version is retired.

use crate::cli::{assert_read_model_exact, bank, catch_up, run, seed_accounts, text};
use crate::common::{env, wait_until};
use projectionist::testing::TestDatabase;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Kills the processes however the test ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_projections(db: &TestDatabase, version: &str, extra: &[(&str, &str)]) -> Child {
    let mut cmd = bank();
    cmd.env("DATABASE_URL", db.url())
        .env("BANK_BALANCES_VERSION", version)
        .env("POLL_INTERVAL", "50ms")
        .args(["run-projections"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn bank run-projections")
}

/// What a reader saw, every 50 ms.
#[derive(Default)]
struct Seen {
    errors: Vec<String>,
    regressions: Vec<String>,
    reads: u64,
    with_deposit_count: u64,
}

/// Reads `account_balances` every 50 ms until `stop`: rows and the sum of
/// `event_count` must never go down, and no query may fail.
async fn reader(c: tokio_postgres::Client, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let (mut rows, mut total) = (0i64, 0i64);
    while !stop.load(Ordering::SeqCst) {
        match c
            .query_one(
                "SELECT count(*), coalesce(sum(event_count), 0)::int8 FROM account_balances",
                &[],
            )
            .await
        {
            Ok(r) => {
                let (n, s): (i64, i64) = (r.get(0), r.get(1));
                if n < rows || s < total {
                    seen.regressions.push(format!(
                        "rows {rows} -> {n}, sum(event_count) {total} -> {s}"
                    ));
                }
                rows = rows.max(n);
                total = total.max(s);
                seen.reads += 1;
            }
            Err(e) => seen.errors.push(e.to_string()),
        }
        if c.query_opt("SELECT deposit_count FROM account_balances LIMIT 1", &[])
            .await
            .is_ok()
        {
            seen.with_deposit_count += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// `bank simulate` rounds until `stop`.
fn appender(db: &TestDatabase, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    let url = db.url();
    std::thread::spawn(move || {
        let mut rounds = 0;
        while !stop.load(Ordering::SeqCst) {
            let o = bank()
                .env("DATABASE_URL", &url)
                .args([
                    "simulate",
                    "--events",
                    "500",
                    "--accounts",
                    "40",
                    "--writers",
                    "2",
                ])
                .args(["--seed", &rounds.to_string()])
                .output()
                .expect("run bank simulate");
            assert!(o.status.success(), "{}", text(&o));
            rounds += 1;
        }
        rounds
    })
}

async fn version_states(db: &TestDatabase) -> Vec<(i32, String)> {
    let c = db.connect().await.unwrap();
    c.query(
        "SELECT version, state FROM projection_versions WHERE projection_name = 'account_balances' ORDER BY version",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_2_is_built_beside_version_1_and_readers_switch_without_a_gap() {
    let env = env().await;
    let db = &env.db;
    let o = run(db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    // History for version 2 to rebuild.
    seed_accounts(db, 60_000, 40).await;
    catch_up(db, &[], &[]).await;
    assert_read_model_exact(db).await;
    assert_eq!(version_states(db).await, vec![(1, "live".to_owned())]);

    let stop_reading = Arc::new(AtomicBool::new(false));
    let reading = tokio::spawn(reader(db.connect().await.unwrap(), stop_reading.clone()));
    let stop_appending = Arc::new(AtomicBool::new(false));
    let appending = appender(db, stop_appending.clone());
    let mut procs = Procs(vec![spawn_projections(db, "1", &[])]);

    // Version 2 beside it, from a second binary configuration.
    procs.0.push(spawn_projections(db, "2", &[]));
    let v2 = [("BANK_BALANCES_VERSION", "2")];
    // Too early: refused with what is missing, nothing switched.
    let early = run(db, &["promote", "account_balances", "--max-lag", "0"], &v2);
    assert_eq!(early.status.code(), Some(2), "{}", text(&early));
    let said = text(&early);
    assert!(
        said.contains("has not started") || said.contains("has not caught up"),
        "{said}"
    );
    wait_until(
        Duration::from_secs(30),
        "version 2 registered as building",
        || async {
            version_states(db).await == vec![(1, "live".to_owned()), (2, "building".to_owned())]
        },
    )
    .await;
    // Still too early: far behind.
    let early = run(db, &["promote", "account_balances", "--max-lag", "0"], &v2);
    assert_eq!(early.status.code(), Some(2), "{}", text(&early));
    assert!(text(&early).contains("not"), "{}", text(&early));

    // Promote as soon as version 2 has caught up (appends continue).
    let mut refusals = 0;
    wait_until(Duration::from_secs(120), "version 2 promoted", || {
        let o = run(db, &["promote", "account_balances"], &v2);
        let ok = o.status.success();
        if !ok {
            assert_eq!(o.status.code(), Some(2), "{}", text(&o));
            refusals += 1;
        }
        async move { ok }
    })
    .await;
    assert_eq!(
        version_states(db).await,
        vec![(1, "previous".to_owned()), (2, "live".to_owned())]
    );
    // Let the readers run on version 2 for a while, then stop appending.
    let c = db.connect().await.unwrap();
    wait_until(Duration::from_secs(30), "readers on version 2", || async {
        c.query_opt("SELECT deposit_count FROM account_balances LIMIT 1", &[])
            .await
            .is_ok()
    })
    .await;
    stop_appending.store(true, Ordering::SeqCst);
    let rounds = appending.join().expect("appender thread");
    assert!(rounds >= 1);
    // The running processes catch up with everything appended.
    wait_until(Duration::from_secs(60), "every slot caught up", || async {
        let s = run(db, &["status", "--json", "--exact"], &v2);
        assert!(s.status.success(), "{}", text(&s));
        let status: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
        status["projections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["lag_events"].as_i64() == Some(0))
    })
    .await;
    stop_reading.store(true, Ordering::SeqCst);
    let seen = reading.await.unwrap();
    assert!(seen.errors.is_empty(), "reader errors: {:?}", seen.errors);
    assert!(
        seen.regressions.is_empty(),
        "reader saw less: {:?}",
        seen.regressions
    );
    assert!(seen.reads >= 20, "only {} reads", seen.reads);
    assert!(seen.with_deposit_count >= 1);

    // Version 2 is exact, deposit counts included.
    assert_read_model_exact(db).await;
    let deposits = c
        .query_one(
            "SELECT (SELECT count(*) FROM events WHERE event_type = 'MoneyDeposited'), \
                    (SELECT sum(deposit_count)::int8 FROM account_balances)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(deposits.get::<_, i64>(0), deposits.get::<_, i64>(1));

    // The live version cannot be retired; the old one can, once its
    // process is gone, and a binary still on it is refused.
    let live = run(
        db,
        &["retire", "account_balances", "--version", "2", "--yes"],
        &v2,
    );
    assert_eq!(live.status.code(), Some(2), "{}", text(&live));
    assert!(text(&live).contains("is live"), "{}", text(&live));
    let mut old = procs.0.remove(0);
    let _ = old.kill();
    let _ = old.wait();
    let dry = run(db, &["retire", "account_balances", "--version", "1"], &v2);
    assert_eq!(dry.status.code(), Some(2), "{}", text(&dry));
    assert!(text(&dry).contains("account_balances_v1"), "{}", text(&dry));
    let gone = run(
        db,
        &["retire", "account_balances", "--version", "1", "--yes"],
        &v2,
    );
    assert!(gone.status.success(), "{}", text(&gone));
    let left: Option<String> = c
        .query_one("SELECT to_regclass('account_balances_v1')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, None);
    let refused = run(db, &["run-projections", "--once"], &[]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("retired"), "{}", text(&refused));
    // Readers still see version 2.
    assert_read_model_exact(db).await;
}
