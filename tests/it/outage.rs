//! Database outages: the server is stopped (immediate mode) and started
//! again twice while events are appended and projected; and start-up while
//! the database is unreachable.

use crate::cli::{assert_read_model_exact, bank, run, text};
use projectionist::testing::TestServer;
use projectionist::{EventStore, ExpectedVersion, NewEvent, StoreConfig};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Appends `n` deposits to `stream`, one per call, retrying through
/// outages. A retried append reuses its event id, so an append whose commit
/// was lost in the outage is told apart from one that committed.
async fn append_through_outages(store: EventStore, stream: String, n: i64) {
    let mut version = 0i64;
    while version < n {
        let event = NewEvent::new(
            "MoneyDeposited",
            &serde_json::json!({ "amount": version + 1 }),
        )
        .unwrap()
        .with_event_id(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{stream}/{version}").as_bytes(),
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last_error = None;
        loop {
            assert!(
                Instant::now() < deadline,
                "appends did not resume: {last_error:?}"
            );
            match store
                .append(
                    "Account",
                    &stream,
                    ExpectedVersion::Exact(version),
                    std::slice::from_ref(&event),
                )
                .await
            {
                Ok(_) => break,
                // The earlier attempt committed before the connection dropped.
                Err(e) if e.is_duplicate_event() => break,
                Err(e) if e.is_connection() || e.is_retryable() => {
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("append failed: {e:?}"),
            }
        }
        version += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_immediate_restarts_during_a_run_leave_the_read_model_exact() {
    let server = TestServer::start_private().await.unwrap();
    let db = server.create_database().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let mut projections = bank()
        .env("DATABASE_URL", db.url())
        .env("DISPATCHER", "notify")
        .env("POLL_INTERVAL", "100ms")
        .env("MAX_BACKOFF", "500ms")
        .args(["run-projections"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let store = EventStore::connect_config(db.config(), StoreConfig::default()).unwrap();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(append_through_outages(
                store.clone(),
                format!("acct-{w}"),
                400,
            ))
        })
        .collect();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        tokio::task::block_in_place(|| server.stop()).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| server.start()).unwrap();
    }
    for w in writers {
        w.await.unwrap();
    }
    let c = db.connect().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM events), (SELECT coalesce(sum(event_count), 0)::int8 FROM account_balances)",
                &[],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)));
        if matches!(r, Ok((1200, 1200))) {
            break;
        }
        if Instant::now() > deadline {
            let _ = projections.kill();
            let out = projections.wait_with_output().unwrap();
            panic!("never caught up: {r:?}\n{}", text(&out));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_read_model_exact(&db).await;
    assert!(
        projections.try_wait().unwrap().is_none(),
        "run-projections survived the outages"
    );
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &projections.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = tokio::task::spawn_blocking(move || projections.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_the_database_then_gives_up_with_a_clear_error() {
    // Nothing listens on this port: every attempt is refused.
    let o = bank()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:9/nowhere")
        .env("CONNECT_TIMEOUT", "1500ms")
        .args(["status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("could not connect to postgres@127.0.0.1:9/nowhere within"),
        "{err}"
    );
    assert!(err.contains("CONNECT_TIMEOUT"), "{err}");
    assert!(
        err.matches("database unreachable; retrying").count() >= 2,
        "each attempt is logged: {err}"
    );

    // A database that comes up within the timeout is used.
    let server = TestServer::start_private().await.unwrap();
    let db = server.create_database().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    tokio::task::block_in_place(|| server.stop()).unwrap();
    let mut cmd = bank();
    cmd.env("DATABASE_URL", db.url())
        .env("CONNECT_TIMEOUT", "30s")
        .args(["status", "--json"]);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tokio::task::block_in_place(|| server.start()).unwrap();
    let o = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("database unreachable; retrying"),
        "{}",
        text(&o)
    );
}
