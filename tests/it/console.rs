//! The operator console (`/` on the admin server), rendered by headless
//! Chromium: every projection with its lag and state, a failed slot and a
//! dead letter after they happen, the transaction holding the watermark
//! back with its password masked, and the page behind a reverse proxy that
//! serves it under a path prefix. Saves a screenshot for the docs
//! (`target/tmp/console.png`).

use crate::cli::{bank, run, text};
use crate::ops::{free_port, http};
use projectionist::testing::TestServer;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Kills the bank processes however the test ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_worker(db: &projectionist::testing::TestDatabase, admin: Option<u16>) -> Child {
    let mut cmd = bank();
    cmd.env("DATABASE_URL", db.url())
        .env("RUN_MODE", "worker")
        .env("HEARTBEAT_INTERVAL", "200ms")
        .env("HEARTBEAT_TIMEOUT", "2s")
        .env("REBALANCE_INTERVAL", "300ms")
        .env("MAX_BACKOFF", "300ms")
        .env("LOG_LEVEL", "error")
        .args(["run-projections"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(port) = admin {
        cmd.env("ADMIN_ADDR", format!("127.0.0.1:{port}"));
    }
    cmd.spawn().expect("spawn bank run-projections")
}

/// A fresh Chromium profile directory under `target/tmp`, removed on drop.
struct Profile(PathBuf);

impl Profile {
    fn new() -> Profile {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("console-chromium-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Profile(dir)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs headless Chromium on `url` with `args`, giving the page 3 s of
/// virtual time (which does not pass while a fetch is pending) to load
/// and render its first feed; returns stdout.
async fn chromium(url: &str, args: &[&str]) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install it with `apt-get install -y chromium` (.ci/run does)"
    );
    let profile = Profile::new();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 60 s")
    .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Loads `url` in Chromium until the rendered DOM satisfies `check`
/// (the console refreshes every 2 s; the server caches for 1 s).
async fn dom_until(url: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let dom = chromium(url, &["--dump-dom"]).await;
        if check(&dom) {
            return dom;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the console at {url} to show {what}; last DOM:\n{}",
            body_of(&dom)
        );
    }
}

/// The rendered row of slot `projection/partition`, from its `data-slot`
/// attribute to `</tr>`.
fn slot_row<'a>(dom: &'a str, slot: &str) -> Option<&'a str> {
    let start = dom.find(&format!(" data-slot=\"{slot}\""))?;
    let len = dom[start..].find("</tr>")?;
    Some(&dom[start..start + len])
}

fn slot_shows(dom: &str, slot: &str, state: &str, lag_events: i64) -> bool {
    slot_row(dom, slot).is_some_and(|row| {
        row.contains(&format!("data-state=\"{state}\""))
            && row.contains(&format!("<span class=\"badge {state}\">{state}</span>"))
            && row.contains(&format!("data-lag-events=\"{lag_events}\""))
            && row.contains(&format!("class=\"num lag-events\">{lag_events}</td>"))
    })
}

/// A raw GET: the response head and body.
async fn get(port: u16, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_ascii_lowercase(), body.to_owned())
}

/// A reverse proxy that serves the admin server at `upstream` under
/// `/prefix` (stripping it), answers 404 to anything else, and records
/// every path it was asked for.
async fn prefix_proxy(upstream: u16) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match client.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                log.lock().unwrap().push(path.to_owned());
                let inner = if path == "/prefix" {
                    Some("/".to_owned())
                } else {
                    path.strip_prefix("/prefix/").map(|rest| format!("/{rest}"))
                };
                let response = match inner {
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                    Some(inner) => {
                        let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                            .await
                            .unwrap();
                        up.write_all(
                            format!(
                                "{method} {inner} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                            )
                            .as_bytes(),
                        )
                        .await
                        .unwrap();
                        let mut buf = Vec::new();
                        let _ = up.read_to_end(&mut buf).await;
                        buf
                    }
                };
                let _ = client.write_all(&response).await;
                let _ = client.shutdown().await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_renders_slots_failures_dead_letters_and_works_behind_a_prefix() {
    // A server of its own: the test holds a writing transaction open.
    let server = TestServer::start_private().await.unwrap();
    let db = server.create_database().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let simulate = [
        "simulate",
        "--accounts",
        "5",
        "--events",
        "300",
        "--writers",
        "1",
    ];
    let o = run(&db, &simulate, &[]);
    assert!(o.status.success(), "{}", text(&o));

    let port = free_port();
    let mut processes = Processes(Vec::new());
    processes.0.push(spawn_worker(&db, Some(port)));
    processes.0.push(spawn_worker(&db, None));

    // Every projection the binary has, caught up.
    crate::common::wait_until(
        Duration::from_secs(60),
        "/status: every slot caught up",
        || async {
            let Ok((200, body)) = http(port, "GET", "/status").await else {
                return false;
            };
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            let slots = status["projections"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            slots.len() == 2
                && slots
                    .iter()
                    .all(|s| s["lag_events"] == 0 && s["state"] == "running")
        },
    )
    .await;
    let (_, status) = http(port, "GET", "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let projections: Vec<(String, i64)> = status["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["projection"].as_str().unwrap().to_owned(),
                s["partition"].as_i64().unwrap(),
            )
        })
        .collect();

    // The page: self-contained, a strict policy, relative URLs.
    let (head, page) = get(port, "/").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'sha256-"),
        "{head}"
    );
    assert!(page.contains("'console.json'"), "the feed is relative");

    let url = format!("http://127.0.0.1:{port}/");
    let dom = dom_until(&url, "every projection running, lag 0", |dom| {
        projections
            .iter()
            .all(|(p, n)| slot_shows(dom, &format!("{p}/{n}"), "running", 0))
    })
    .await;
    assert!(dom.contains("Leader: "), "the leader is named");
    assert!(dom.contains("No dead letters."), "{}", body_of(&dom));

    // Events keep coming until the server's samples (every 5 s) show
    // account_balances handling them.
    crate::common::wait_until(
        Duration::from_secs(60),
        "console.json: account_balances' throughput",
        || async {
            let o = tokio::task::block_in_place(|| run(&db, &simulate, &[]));
            assert!(o.status.success(), "{}", text(&o));
            let Ok((200, body)) = http(port, "GET", "/console.json").await else {
                return false;
            };
            let feed: serde_json::Value = serde_json::from_str(&body).unwrap();
            let slots = feed["slots"].as_array().cloned().unwrap_or_default();
            slots.iter().any(|s| {
                s["projection"] == "account_balances"
                    && s["throughput"].as_array().is_some_and(|t| {
                        // The newest sample: earlier ones may be from
                        // before the appends started (a rate of 0).
                        t.len() >= 2
                            && t.last()
                                .is_some_and(|p| p[1].as_f64().is_some_and(|r| r > 0.0))
                    })
            })
        },
    )
    .await;

    // A withdrawal whose amount is not a number: account_balances
    // dead-letters it (its policy), large_withdrawal_notifier stops on it
    // (the default policy).
    db.connect()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             VALUES ('Account', 'console-poison', 1, 'MoneyWithdrawn', '{\"amount\": \"lots\"}')",
        )
        .await
        .unwrap();
    let dom = dom_until(
        &url,
        "the notifier failed and account_balances' dead letter",
        |dom| {
            slot_row(dom, "large_withdrawal_notifier/0").is_some_and(|row| {
                row.contains("data-state=\"failed\"") && row.contains(">failed</span>")
            }) && dom.contains("data-projection=\"account_balances\" data-count=\"1\"")
                && slot_shows(dom, "account_balances/0", "running", 0)
        },
    )
    .await;
    assert!(
        slot_row(&dom, "account_balances/0").is_some_and(|row| row.contains("<polyline")),
        "the throughput chart is drawn"
    );
    let letters = &dom[dom.find("data-projection=\"account_balances\"").unwrap()..];
    assert!(
        letters.contains("Account/console-poison") && letters.contains("MoneyWithdrawn"),
        "{}",
        body_of(letters)
    );
    let error = dom
        .find("data-error-of=\"large_withdrawal_notifier/0\"")
        .map(|at| &dom[at..at + dom[at..].find("</tr>").unwrap()]);
    assert!(
        error.is_some_and(|e| e.contains("cannot decode") && e.contains("resume")),
        "the failed slot shows its error: {error:?}"
    );

    // A writing transaction left open holds the watermark back: the console
    // (and /status) names it, with the password in its query masked.
    let mut holder = db.connect().await.unwrap();
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("CREATE ROLE console_test_role LOGIN PASSWORD 'hunter2-secret'")
        .await
        .unwrap();
    let dom = dom_until(&url, "the watermark holder", |dom| {
        dom.contains(&format!("<div id=\"watermark\" data-pid=\"{pid}\">"))
    })
    .await;
    assert!(
        dom.contains("CREATE ROLE console_test_role LOGIN PASSWORD '***'"),
        "{}",
        body_of(&dom)
    );
    assert!(!dom.contains("hunter2"), "{}", body_of(&dom));
    let (code, status) = http(port, "GET", "/status").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        status.contains("PASSWORD '***'") && !status.contains("hunter2"),
        "/status masks the password: {status}"
    );

    // The screenshot for docs/operations.md (copied to docs/console.png).
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &url,
        &[
            "--hide-scrollbars",
            "--window-size=1360,1180",
            &format!("--screenshot={}", shot.display()),
        ],
    )
    .await;
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot saved at {}",
        shot.display()
    );
    tx.rollback().await.unwrap();

    // Behind a reverse proxy that serves the admin server under /prefix:
    // the page and its feed load through the prefix only.
    let (proxy, seen) = prefix_proxy(port).await;
    for entry in ["/prefix/", "/prefix"] {
        let proxied = format!("http://127.0.0.1:{proxy}{entry}");
        dom_until(&proxied, "the slots through the prefix", |dom| {
            dom.contains("data-loaded=\"true\"")
                && projections
                    .iter()
                    .all(|(p, n)| slot_row(dom, &format!("{p}/{n}")).is_some())
        })
        .await;
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|p| p == "/prefix/console.json"),
        "the feed was asked through the prefix: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|p| p == "/prefix" || p.starts_with("/prefix/")),
        "nothing asked outside the prefix: {seen:?}"
    );
    drop(processes);
}

/// The rendered page without its embedded script and style, for failure
/// messages: the rest of a failing run's output stays readable.
fn body_of(dom: &str) -> String {
    let mut out = dom.to_owned();
    for (open, close) in [("<script", "</script>"), ("<style", "</style>")] {
        while let Some(start) = out.find(open) {
            let Some(len) = out[start..].find(close) else {
                break;
            };
            out.replace_range(start..start + len + close.len(), "");
        }
    }
    out
}
