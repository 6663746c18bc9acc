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
