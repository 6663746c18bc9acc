//! The bank example as a real process: the command line, exit codes, and a
//! SIGTERM in the middle of a catch-up.

use crate::common::wait_until;
use projectionist::testing::TestDatabase;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The bank example binary that `cargo test` built beside this test binary.
pub fn bank() -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path: PathBuf = dir.join("examples").join("bank");
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples; run it with --all-targets or build `--example bank`",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.env_remove("PARTITION_KEY")
        .env_remove("TOTAL_PARTITIONS")
        .env_remove("DISPATCHER")
        .env_remove("BATCH_SIZE")
        .env("LOG_LEVEL", "warn")
        .env("ADMIN_ADDR", "off");
    cmd
}

pub fn run(db: &TestDatabase, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = bank();
    cmd.env("DATABASE_URL", db.url()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run bank")
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub async fn seed_accounts(db: &TestDatabase, events: i64, accounts: i64) {
    let c = db.connect().await.unwrap();
    c.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         SELECT 'Account', 'acct-' || (g % $2::int8), (g / $2::int8) + 1, \
                CASE WHEN g % 3 = 2 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
                jsonb_build_object('amount', g % 1000) \
         FROM generate_series(0::int8, $1::int8 - 1) g",
        &[&events, &accounts],
    )
    .await
    .unwrap();
}

/// `run-projections --once` until `status` shows no lag (transactions of
/// parallel tests on the same server may hold the watermark back).
pub async fn catch_up(db: &TestDatabase, args: &[&str], env: &[(&str, &str)]) {
    catch_up_all(db, args, &[env]).await
}

/// [`catch_up`] for several processes (e.g. one per partition).
async fn catch_up_all(db: &TestDatabase, args: &[&str], envs: &[&[(&str, &str)]]) {
    let mut full: Vec<&str> = vec!["run-projections", "--once"];
    full.extend_from_slice(args);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        for env in envs {
            let o = run(db, &full, env);
            assert!(o.status.success(), "{}", text(&o));
        }
        let s = run(db, &["status", "--json"], &[]);
        assert!(s.status.success(), "{}", text(&s));
        let status: serde_json::Value =
            serde_json::from_slice(&s.stdout).expect("status --json is JSON");
        let lagging = status["projections"]
            .as_array()
            .expect("projections array")
            .iter()
            .any(|r| r["lag_events"].as_i64() != Some(0));
        if !lagging {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never caught up: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn assert_read_model_exact(db: &TestDatabase) {
    let c = db.connect().await.unwrap();
    let want = c
        .query_one(
            "SELECT coalesce(sum(CASE event_type WHEN 'MoneyDeposited' THEN coalesce(payload->>'cents', payload->>'amount')::int8 \
                                     WHEN 'MoneyWithdrawn' THEN -coalesce(payload->>'cents', payload->>'amount')::int8 ELSE 0 END), 0)::int8, \
                    count(*) FROM events WHERE aggregate_type = 'Account'",
            &[],
        )
        .await
        .unwrap();
    let got = c
        .query_one(
            "SELECT coalesce(sum(balance), 0)::int8, coalesce(sum(event_count), 0)::int8 FROM account_balances",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (got.get::<_, i64>(0), got.get::<_, i64>(1)),
        (want.get::<_, i64>(0), want.get::<_, i64>(1)),
        "account_balances (sum of balance, sum of event_count) must equal the events"
    );
}

#[tokio::test]
async fn sigterm_in_the_middle_of_a_catch_up_exits_0_and_loses_nothing() {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    seed_accounts(&db, 60_000, 300).await;

    let child = bank()
        .env("DATABASE_URL", db.url())
        .env("BATCH_SIZE", "50")
        .args(["run-projections", "--projection", "account_balances"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c = db.connect().await.unwrap();
    wait_until(Duration::from_secs(60), "the catch-up to be under way", || async {
        c.query_one(
            "SELECT coalesce(max(events_handled), 0) FROM projection_checkpoints WHERE projection_name = 'account_balances'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) >= 2_000)
        .unwrap_or(false)
    })
    .await;
    let handled_before: i64 = c
        .query_one("SELECT events_handled FROM projection_checkpoints WHERE projection_name = 'account_balances'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(handled_before < 60_000, "SIGTERM must arrive mid catch-up");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // What was committed is consistent: handled events == read model.
    let committed = c
        .query_one(
            "SELECT (SELECT events_handled FROM projection_checkpoints WHERE projection_name = 'account_balances'), \
                    (SELECT coalesce(sum(event_count), 0)::int8 FROM account_balances)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(committed.get::<_, i64>(0), committed.get::<_, i64>(1));
    assert!(
        committed.get::<_, i64>(0) < 60_000,
        "stopped before the end"
    );

    // Restart and finish: exact.
    catch_up(&db, &["--projection", "account_balances"], &[]).await;
    assert_read_model_exact(&db).await;
    let o = run(&db, &["status", "--json"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let status: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("status --json is JSON");
    let rows = status["projections"].as_array().unwrap();
    let balances = rows
        .iter()
        .find(|r| r["projection"] == "account_balances")
        .unwrap();
    assert_eq!(balances["lag_events"], 0);
}

#[tokio::test]
async fn partition_options_are_checked_with_clear_errors() {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    seed_accounts(&db, 500, 10).await;
    // Out of range, and not a number: usage errors (exit 2), nothing written.
    for (key, total, needle) in [
        ("2", "2", "PARTITION_KEY 2 is out of range"),
        ("-1", "2", "PARTITION_KEY -1 is out of range"),
        ("x", "2", "invalid value 'x'"),
        ("0", "0", "TOTAL_PARTITIONS 0 is invalid"),
    ] {
        let o = run(
            &db,
            &["run-projections", "--once"],
            &[("PARTITION_KEY", key), ("TOTAL_PARTITIONS", total)],
        );
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{}",
            text(&o)
        );
    }
    let c = db.connect().await.unwrap();
    let rows: i64 = c
        .query_one("SELECT count(*) FROM projection_checkpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "refused runs write nothing");

    // Two partitions, then a third is refused with the fix named.
    for k in ["0", "1"] {
        let o = run(
            &db,
            &["run-projections", "--once"],
            &[("PARTITION_KEY", k), ("TOTAL_PARTITIONS", "2")],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = run(
        &db,
        &["run-projections", "--once"],
        &[("PARTITION_KEY", "0"), ("TOTAL_PARTITIONS", "3")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("TOTAL_PARTITIONS=2") && err.contains("reset"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The pod ordinal is used when PARTITION_KEY is unset.
    let o = run(
        &db,
        &[
            "run-projections",
            "--once",
            "--projection",
            "account_balances",
        ],
        &[
            ("TOTAL_PARTITIONS", "2"),
            ("HOSTNAME", "bank-projections-1"),
            ("LOG_LEVEL", "info"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ordinal"),
        "{}",
        text(&o)
    );
    catch_up_all(
        &db,
        &[],
        &[
            &[("PARTITION_KEY", "0"), ("TOTAL_PARTITIONS", "2")],
            &[("PARTITION_KEY", "1"), ("TOTAL_PARTITIONS", "2")],
        ],
    )
    .await;
    assert_read_model_exact(&db).await;
}

#[tokio::test]
async fn the_database_url_never_shows_in_help() {
    let o = bank()
        .env("DATABASE_URL", "postgres://u:s3cret-pw@localhost/x")
        .args(["run-projections", "--help"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("DATABASE_URL"), "{help}");
    assert!(!help.contains("s3cret-pw"), "{help}");
}

#[tokio::test]
async fn unknown_projection_and_reset_without_yes() {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &db,
        &["run-projections", "--once", "--projection", "nope"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown projection \"nope\""),
        "{}",
        text(&o)
    );
    let o = run(&db, &["reset", "nope", "--yes"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    seed_accounts(&db, 300, 5).await;
    catch_up(&db, &[], &[]).await;
    assert_read_model_exact(&db).await;
    // reset asks for --yes when not on a terminal, and changes nothing.
    let mut cmd = bank();
    cmd.env("DATABASE_URL", db.url())
        .args(["reset", "account_balances"])
        .stdin(Stdio::null());
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--yes"),
        "{}",
        text(&o)
    );
    assert_read_model_exact(&db).await;
    // With --yes: read model and checkpoints cleared, then rebuilt.
    let o = run(&db, &["reset", "account_balances", "--yes"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let c = db.connect().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM account_balances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    catch_up(&db, &[], &[]).await;
    assert_read_model_exact(&db).await;
}
