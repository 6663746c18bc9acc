//! Operations: the admin HTTP server, metrics (checked by promtool), JSON
//! logs, and naming the transaction that holds the watermark back.

use crate::cli::{bank, run, text};
use crate::common::wait_until;
use projectionist::testing::{TestDatabase, TestServer};
use std::process::{Child, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 GET: `(status, body)`.
pub(crate) async fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn promtool() -> Option<std::path::PathBuf> {
    let mut candidates: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("promtool"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(
            std::path::Path::new(&home).join(".cache/projectionist-check-deploy/bin/promtool"),
        );
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn spawn_worker(db: &TestDatabase, port: u16) -> Child {
    bank()
        .env("DATABASE_URL", db.url())
        .env("ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .env("RUN_MODE", "worker")
        .env("HEARTBEAT_INTERVAL", "200ms")
        .env("HEARTBEAT_TIMEOUT", "2s")
        .env("REBALANCE_INTERVAL", "300ms")
        .env("MAX_BACKOFF", "300ms")
        .args(["run-projections"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_server_metrics_health_readiness_and_status() {
    let server = TestServer::start_private().await.unwrap();
    let db = server.create_database().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &db,
        &[
            "simulate",
            "--accounts",
            "5",
            "--events",
            "200",
            "--writers",
            "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let port = free_port();
    let mut worker = spawn_worker(&db, port);
    wait_until(Duration::from_secs(20), "/readyz 200 and the events handled", || async {
        let ready = matches!(http(port, "GET", "/readyz").await, Ok((200, _)));
        let metrics = http(port, "GET", "/metrics").await.map(|(_, b)| b).unwrap_or_default();
        ready
            && metrics.contains(
                "projectionist_events_handled_total{partition=\"0\",projection=\"account_balances\",result=\"ok\"} 205",
            )
            && metrics.contains("projectionist_lag_events{partition=\"0\",projection=\"account_balances\"} 0")
    })
    .await;

    let (code, metrics) = http(port, "GET", "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in [
        "projectionist_lag_events",
        "projectionist_lag_seconds",
        "projectionist_cursor_position",
        "projectionist_projection_state",
        "projectionist_batch_duration_seconds_bucket",
        "projectionist_handler_duration_seconds_bucket",
        "projectionist_worker_up 1",
        "projectionist_is_leader 1",
        "projectionist_slots_held 2",
        "projectionist_watermark_held_seconds",
        "projectionist_pool_connections",
        "projectionist_dispatcher_wakeups_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    match promtool() {
        Some(promtool) => {
            let mut child = std::process::Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(metrics.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}",
                text(&out)
            );
        }
        None => assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI (.ci/check-deploy installs it)"
        ),
    }

    assert_eq!(http(port, "GET", "/healthz").await.unwrap().0, 200);
    let (code, status) = http(port, "GET", "/status").await.unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["workers"].as_array().unwrap().len(), 1);
    assert!(status["leader"].is_string(), "{status}");
    assert_eq!(status["projections"].as_array().unwrap().len(), 2);
    assert_eq!(http(port, "GET", "/nope").await.unwrap().0, 404);
    assert_eq!(http(port, "POST", "/status").await.unwrap().0, 405);

    // Thousands of concurrent requests: all answered.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2000 {
        let path = if i % 2 == 0 { "/healthz" } else { "/status" };
        tasks.spawn(async move { http(port, "GET", path).await });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(Ok((200, _)))) {
            ok += 1;
        }
    }
    assert_eq!(ok, 2000);

    // The database goes away: not ready (but alive); back: ready again.
    tokio::task::block_in_place(|| server.stop()).unwrap();
    wait_until(
        Duration::from_secs(20),
        "/readyz to fail while the database is down",
        || async { matches!(http(port, "GET", "/readyz").await, Ok((503, _))) },
    )
    .await;
    assert_eq!(http(port, "GET", "/healthz").await.unwrap().0, 200);
    tokio::task::block_in_place(|| server.start()).unwrap();
    wait_until(Duration::from_secs(30), "/readyz to recover", || async {
        matches!(http(port, "GET", "/readyz").await, Ok((200, _)))
    })
    .await;
    let _ = worker.kill();
    let _ = worker.wait();
}

#[tokio::test]
async fn json_logs_parse_line_by_line() {
    let db = TestDatabase::create().await.unwrap();
    let o = run(
        &db,
        &["migrate"],
        &[("LOG_FORMAT", "json"), ("LOG_LEVEL", "debug")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = run(
        &db,
        &["run-projections", "--once"],
        &[("LOG_FORMAT", "json"), ("LOG_LEVEL", "debug")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let mut lines = 0;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("timestamp").is_some() && v.get("level").is_some() && v.get("target").is_some(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 0, "debug logs were written");
}

#[tokio::test]
async fn status_names_the_transaction_that_holds_the_watermark() {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let mut c = db.connect().await.unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let tx = c.transaction().await.unwrap();
    tx.batch_execute(
        "CREATE TABLE held (x int); INSERT INTO held VALUES (1) /* held-open-by-test */",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let o = run(&db, &["status", "--json"], &[]);
    let o2 = run(&db, &["status"], &[]);
    tx.rollback().await.unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let held = &status["watermark_held_by"];
    // The oldest writer on a shared server may be another test's; ours is
    // open for over a second, so it is named unless an older one is open.
    if held["pid"].as_i64() == Some(pid as i64) {
        assert!(held["open_seconds"].as_f64().unwrap() >= 1.0, "{held}");
        assert!(
            held["query"]
                .as_str()
                .unwrap()
                .contains("held-open-by-test"),
            "{held}"
        );
        let table = String::from_utf8_lossy(&o2.stdout);
        assert!(
            table.contains(&format!("watermark held back by pid {pid}")),
            "{table}"
        );
    } else {
        assert!(
            held["open_seconds"].as_f64().unwrap() >= 1.0,
            "an older writer holds it: {held}"
        );
    }
}
