//! Operator commands as real processes: output into a closed pipe, and
//! `pause`.

use crate::cli::{bank, run, text};
use projectionist::testing::TestDatabase;
use std::process::{Output, Stdio};

/// Runs the bank binary with `args` and a stdout pipe whose reading end is
/// already closed (as after `| head -1` exited): every write fails with
/// `EPIPE`. The pipe is the stdin of a `true` process that has exited, so
/// its only reader is gone before the bank starts.
fn run_into_closed_pipe(db: &TestDatabase, args: &[&str]) -> Output {
    let mut reader = std::process::Command::new("true")
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn true");
    let writer = reader.stdin.take().expect("the pipe's writing end");
    assert!(reader.wait().expect("wait for true").success());
    let mut cmd = bank();
    cmd.env("DATABASE_URL", db.url())
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped());
    cmd.output().expect("run bank")
}

/// A database with checkpoints, one dead letter (a raw-SQL deposit whose
/// amount is not a number) and the dead letter's id.
async fn with_a_dead_letter() -> (TestDatabase, String) {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    db.connect()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) VALUES \
               ('Account', 'a', 1, 'MoneyDeposited', '{\"amount\": 500}'), \
               ('Account', 'a', 2, 'MoneyDeposited', '{\"amount\": \"lots\"}'), \
               ('Account', 'b', 1, 'MoneyDeposited', '{\"amount\": 7}')",
        )
        .await
        .unwrap();
    let env = [("LOG_LEVEL", "error")];
    crate::common::wait_until(
        std::time::Duration::from_secs(30),
        "the poison dead-lettered",
        || async {
            let o = run(&db, &["run-projections", "--once"], &env);
            assert!(o.status.success(), "{}", text(&o));
            let o = run(&db, &["dlq", "list", "--json"], &[]);
            assert!(o.status.success(), "{}", text(&o));
            serde_json::from_slice::<serde_json::Value>(&o.stdout)
                .unwrap()
                .as_array()
                .is_some_and(|a| !a.is_empty())
        },
    )
    .await;
    let o = run(&db, &["dlq", "list", "--json"], &[]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = list[0]["id"].as_i64().unwrap().to_string();
    (db, id)
}

/// Every printing command exits with its own exit code, without a panic,
/// when its stdout is closed early (`status --json | head -1`).
#[tokio::test]
async fn printing_commands_exit_cleanly_into_a_closed_pipe() {
    let (db, id) = with_a_dead_letter().await;
    let cases: &[(&[&str], i32)] = &[
        (&["status"], 0),
        (&["status", "--json"], 0),
        (&["dlq", "list"], 0),
        (&["dlq", "list", "--json"], 0),
        (&["dlq", "show", &id], 0),
        // The poison is still poison: the retry fails (exit 1), quietly.
        (&["dlq", "retry", &id], 1),
        (&["pause", "account_balances"], 0),
        (&["resume", "account_balances"], 0),
        (&["run-projections", "--once"], 0),
        (&["rebase-cursors", "--yes"], 0),
        (&["reset", "account_balances", "--yes"], 0),
        (&["dlq", "purge", "--yes"], 0),
    ];
    let mut wrong = Vec::new();
    for (args, code) in cases {
        let o = run_into_closed_pipe(&db, args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        if o.status.code() != Some(*code)
            || stderr.contains("panicked")
            || stderr.contains("Broken pipe")
        {
            wrong.push(format!("{args:?} (want exit {code}): {}", text(&o)));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// The status of every checkpoint row, as `projection/partition=status`.
async fn states(db: &TestDatabase) -> Vec<String> {
    db.connect()
        .await
        .unwrap()
        .query(
            "SELECT projection_name || '/' || partition_key || '=' || status FROM projection_checkpoints \
             ORDER BY projection_name, partition_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `pause NAME [--partition K]` sets the checkpoint rows to `stopped`
/// (only that projection's, only that partition's), says so when they
/// already are, refuses unknown names and partitions with the fix named,
/// and `resume` puts them back to `running`.
#[tokio::test]
async fn pause_stops_the_rows_and_resume_restarts_them() {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    // No checkpoints yet: nothing to pause, and the message says why.
    let o = run(&db, &["pause", "account_balances"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no checkpoints yet"),
        "{}",
        text(&o)
    );
    for key in ["0", "1"] {
        let o = run(
            &db,
            &["run-projections", "--once"],
            &[("TOTAL_PARTITIONS", "2"), ("PARTITION_KEY", key)],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
    let running = [
        "account_balances/0=running",
        "account_balances/1=running",
        "large_withdrawal_notifier/0=running",
        "large_withdrawal_notifier/1=running",
    ];
    assert_eq!(states(&db).await, running);

    let o = run(&db, &["pause", "account_balances", "--partition", "1"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("paused 1 partition(s) of account_balances"),
        "{}",
        text(&o)
    );
    assert_eq!(
        states(&db).await,
        [
            "account_balances/0=running",
            "account_balances/1=stopped",
            "large_withdrawal_notifier/0=running",
            "large_withdrawal_notifier/1=running",
        ]
    );
    let o = run(&db, &["pause", "account_balances"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("paused 1 partition(s)"),
        "only partition 0 was still running: {}",
        text(&o)
    );
    let o = run(&db, &["pause", "account_balances"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already paused"),
        "{}",
        text(&o)
    );
    assert_eq!(
        states(&db).await,
        [
            "account_balances/0=stopped",
            "account_balances/1=stopped",
            "large_withdrawal_notifier/0=running",
            "large_withdrawal_notifier/1=running",
        ]
    );

    // Unknown names and partitions: exit 2, the fix named, nothing changed.
    let o = run(&db, &["pause", "nope"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown projection \"nope\""),
        "{}",
        text(&o)
    );
    let o = run(&db, &["pause", "account_balances", "--partition", "7"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no checkpoint for partition 7"),
        "{}",
        text(&o)
    );

    let o = run(&db, &["resume", "account_balances"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("resumed 2"),
        "{}",
        text(&o)
    );
    assert_eq!(states(&db).await, running);
}
