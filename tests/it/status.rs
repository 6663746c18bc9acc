//! `status`, `/readyz` and `/metrics` cost the same at any log size; an
//! abandoned status query does not keep running on the server; stale
//! owners, unregistered projections and the passed position are shown.

use crate::cli::{bank, run, text};
use crate::common::{env, wait_until};
use crate::ops::{free_port, http};
use projectionist::{Filter, Registered, StatusOptions, StoredEvent, LAG_SAMPLE_EVENTS};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A projection that is only a name and a filter (status needs no more).
struct Named(&'static str, Filter);

#[projectionist::async_trait]
impl projectionist::Projection for Named {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(self.0).filter(self.1.clone())
    }

    async fn handle(
        &self,
        _: &StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        Ok(())
    }
}

/// The bank's `account_balances` as far as status is concerned.
fn account_balances() -> Vec<Registered> {
    vec![Registered::new(Arc::new(Named(
        "account_balances",
        Filter::all().aggregate_types(["Account"]),
    )))
    .unwrap()]
}

/// Every plan node with its parent's node type (depth first).
fn plan_nodes<'a>(
    node: &'a serde_json::Value,
    parent: &'a str,
    out: &mut Vec<(&'a serde_json::Value, &'a str)>,
) {
    out.push((node, parent));
    let me = node["Node Type"].as_str().unwrap_or("?");
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            plan_nodes(child, me, out);
        }
    }
}

/// The nodes of `plan` that read the events table other than by an index
/// scan with an index condition directly under a Limit (a sequential scan,
/// a bitmap scan, a full-index scan, or an index range without a bound on
/// the rows it reads).
fn unbounded_event_scans(plan: &serde_json::Value) -> Vec<String> {
    let mut nodes = Vec::new();
    plan_nodes(&plan[0]["Plan"], "", &mut nodes);
    nodes
        .into_iter()
        .filter(|(n, _)| {
            n["Relation Name"] == "events"
                || n["Index Name"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("events_"))
        })
        .filter(|(n, parent)| {
            !matches!(
                n["Node Type"].as_str(),
                Some("Index Scan") | Some("Index Only Scan")
            ) || n.get("Index Cond").is_none()
                || *parent != "Limit"
        })
        .map(|(n, parent)| {
            format!(
                "{} on {} using {} (index condition {}) under {parent}",
                n["Node Type"], n["Relation Name"], n["Index Name"], n["Index Cond"]
            )
        })
        .collect()
}

/// The log of 1M events (1000 accounts, deposits only) in one statement,
/// and 16 account_balances slots at the start: the whole log is lag.
async fn seed_million(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             SELECT 'Account', 'acct-' || (g % 1000), (g / 1000) + 1, 'MoneyDeposited', \
                    jsonb_build_object('amount', 1) \
             FROM generate_series(0, 999999) g; \
             INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions) \
             SELECT 'account_balances', k, 16 FROM generate_series(0, 15) k;",
        )
        .await
        .unwrap();
}

/// At 1M events with 16 slots behind by the whole log: the status statement
/// reads `events` only through index conditions (before and after ANALYZE),
/// `status()` answers well under a second with estimates close to the true
/// lag, and a running process answers `/readyz` 200 and `/metrics` with the
/// lag of every slot. (The count per slot took 3.4–3.6 s here for 16
/// slots: /readyz and /status timed out after 3 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_costs_the_same_at_any_log_size() {
    // A server of its own: see common::private_env.
    let (_server, env) = crate::common::private_env().await;
    let client = env.client().await;
    let started = Instant::now();
    seed_million(&client).await;
    eprintln!("seeded 1M events in {:?}", started.elapsed());
    let projections = account_balances();

    for analyzed in [false, true] {
        if analyzed {
            client.batch_execute("ANALYZE events").await.unwrap();
        }
        let plan = projectionist::explain_status(&env.store, &projections)
            .await
            .unwrap();
        let bad = unbounded_event_scans(&plan);
        assert!(
            bad.is_empty(),
            "status scans events without an index condition (analyzed: {analyzed}): {bad:?}\n{plan:#}"
        );
        let mut nodes = Vec::new();
        plan_nodes(&plan[0]["Plan"], "", &mut nodes);
        assert!(
            nodes.iter().any(|(n, _)| n["Relation Name"] == "events"),
            "the plan reads events somewhere: {plan:#}"
        );
    }

    // The true lag per partition (one scan, here only).
    let truth: std::collections::HashMap<i32, i64> = client
        .query(
            "SELECT (aggregate_hash % 16)::int4, count(*) FROM events GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let _ = projectionist::status(&env.store, &projections)
        .await
        .unwrap();
    let mut best = Duration::MAX;
    let mut slots = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        slots = projectionist::status(&env.store, &projections)
            .await
            .unwrap();
        best = best.min(t.elapsed());
    }
    eprintln!("status() with 16 slots at 1M events: {best:?}");
    assert_eq!(slots.len(), 16);
    for s in &slots {
        let exact = truth[&s.partition];
        assert!(!s.lag_exact, "{s:?}");
        assert!(
            (s.lag_events - exact).abs() * 5 <= exact,
            "estimate {} too far from the true lag {exact}: {s:?}",
            s.lag_events
        );
        assert!(s.lag_seconds > 0.0, "{s:?}");
    }
    // The statement reads at most 16 x 1000 events; 1 s leaves a wide
    // margin on a loaded 2-core machine (measured ~20 ms), and is far below
    // the 3.4 s that counting took.
    assert!(
        best < Duration::from_secs(1),
        "status() took {best:?} at 1M events"
    );

    // A running process (it runs another projection, which finds nothing
    // to do) answers readiness and metrics while all 16 slots lag.
    let o = run(&env.db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let port = free_port();
    let mut child = bank()
        .env("DATABASE_URL", env.db.url())
        .env("ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .args([
            "run-projections",
            "--projection",
            "large_withdrawal_notifier",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "/readyz 200", || async {
        matches!(http(port, "GET", "/readyz").await, Ok((200, _)))
    })
    .await;
    let t = Instant::now();
    let (code, metrics) = http(port, "GET", "/metrics").await.unwrap();
    let took = t.elapsed();
    eprintln!("/metrics with 16 lagging slots at 1M events: {took:?}");
    assert_eq!(code, 200);
    for s in &slots {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "projectionist_lag_events{{partition=\"{}\",projection=\"account_balances\"}} ",
                    s.partition
                ))
            })
            .unwrap_or_else(|| panic!("no lag series for partition {}:\n{metrics}", s.partition));
        let value: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0, "{line}");
    }
    assert!(
        metrics.contains("# HELP projectionist_lag_events") && metrics.contains("estimate"),
        "the help text says the lag is an estimate:\n{metrics}"
    );
    assert!(took < Duration::from_secs(3), "/metrics took {took:?}");
    let t = Instant::now();
    assert_eq!(http(port, "GET", "/readyz").await.unwrap().0, 200);
    let (code, status) = http(port, "GET", "/status").await.unwrap();
    eprintln!("/readyz + /status: {:?}", t.elapsed());
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(status["projections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["lag_exact"] == false));
    let _ = child.kill();
    let _ = child.wait();
}

/// The report's query, blocked by a lock and abandoned by its caller, is
/// cancelled on the server; with a timeout option, status fails with an
/// error that names the timeout, and leaves nothing running either; nor
/// does `status --timeout` on the command line, which exits at once.
#[tokio::test]
async fn abandoned_status_queries_do_not_keep_running() {
    let env = env().await;
    let mut locker = env.client().await;
    locker
        .batch_execute(
            "INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions) \
             VALUES ('account_balances', 0, 1)",
        )
        .await
        .unwrap();
    let locker_pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let observer = env.client().await;
    let observer = &observer;
    let running = move || async move {
        observer
            .query(
                "SELECT pid, state, wait_event_type, left(query, 120) FROM pg_stat_activity \
                 WHERE datname = current_database() AND state = 'active' \
                   AND pid NOT IN (pg_backend_pid(), $1)",
                &[&locker_pid],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "pid {} {} (waits on {:?}): {}",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, Option<String>>(2),
                    r.get::<_, String>(3)
                )
            })
            .collect::<Vec<_>>()
    };
    // A lock (no transaction id: the watermark of other tests is not held).
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE projection_checkpoints IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    // 1. The caller gives up (as the admin server's timeout does).
    let projections = account_balances();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        projectionist::report(&env.store, &projections),
    )
    .await;
    assert!(abandoned.is_err(), "the report was blocked by the lock");
    wait_until(
        Duration::from_secs(5),
        "the abandoned status query to be cancelled",
        || {
            let now = running();
            async move { now.await.is_empty() }
        },
    )
    .await;

    // 2. The report's own timeout.
    let options = StatusOptions::default()
        .timeout(Duration::from_millis(300))
        .unwrap();
    let e = projectionist::report_with(&env.store, &projections, &options)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("did not finish within 300ms"), "{e}");
    wait_until(
        Duration::from_secs(5),
        "the timed-out status query to be cancelled",
        || {
            let now = running();
            async move { now.await.is_empty() }
        },
    )
    .await;
    let still = running().await;
    assert!(still.is_empty(), "{still:?}");

    // 3. The command line times out and exits: its query is cancelled
    // before it exits, not left waiting for the lock.
    let o = tokio::task::spawn_blocking({
        let db = env.db.url();
        move || {
            bank()
                .env("DATABASE_URL", db)
                .args(["status", "--timeout", "300ms"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("did not finish within 300ms"),
        "{}",
        text(&o)
    );
    wait_until(
        Duration::from_secs(5),
        "the query of the exited status command to be cancelled",
        || {
            let now = running();
            async move { now.await.is_empty() }
        },
    )
    .await;

    tx.rollback().await.unwrap();
    // The pool still works (the abandoned connections were not reused).
    let slots = projectionist::status(&env.store, &projections)
        .await
        .unwrap();
    assert_eq!(slots.len(), 1);
}

/// Owners whose worker is gone are stale, not current; a projection this
/// binary does not have says so in the table; at the watermark the passed
/// position is the last event passed (not the head); an exact count stops
/// at its limit.
#[tokio::test]
async fn status_marks_stale_owners_unregistered_projections_and_the_passed_position() {
    let env = env().await;
    let o = run(&env.db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let client = env.client().await;
    // Two transactions of 10 events each: positions 1..10 and 11..20.
    for first in [0, 10] {
        client
            .execute(
                "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
                 SELECT 'Account', 'acct-' || g, 1, 'MoneyDeposited', '{\"amount\": 1}' \
                 FROM generate_series($1::int4, $1::int4 + 9) g",
                &[&first],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions, \
                                                 last_transaction_id, last_global_position) \
             SELECT 'account_balances', k, 3, \
                    (SELECT transaction_id FROM events WHERE global_position = 1), 9223372036854775807 \
             FROM generate_series(0, 2) k; \
             INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions) \
             VALUES ('legacy_report', 0, 1); \
             INSERT INTO worker_nodes (worker_id, hostname, pid, version, heartbeat_at) VALUES \
               ('w-live', 'h', 1, 'v', now()), ('w-dead', 'h', 2, 'v', now() - interval '1 hour'); \
             INSERT INTO consumer_assignments (projection_name, partition_key, total_partitions, worker_id) VALUES \
               ('account_balances', 0, 3, 'w-live'), ('account_balances', 1, 3, 'w-dead'), \
               ('account_balances', 2, 3, 'w-gone');",
        )
        .await
        .unwrap();
    let projections = account_balances();
    let slots = projectionist::status(&env.store, &projections)
        .await
        .unwrap();
    assert_eq!(slots.len(), 4, "{slots:?}");
    let (balances, legacy) = slots.split_at(3);
    assert_eq!(balances[0].worker_id.as_deref(), Some("w-live"));
    assert_eq!(balances[0].stale_worker_id, None);
    assert_eq!(balances[1].worker_id, None);
    assert_eq!(balances[1].stale_worker_id.as_deref(), Some("w-dead"));
    assert_eq!(balances[2].worker_id, None);
    assert_eq!(balances[2].stale_worker_id.as_deref(), Some("w-gone"));
    for s in balances {
        assert!(s.registered);
        assert_eq!(s.cursor_position, None, "at the watermark: {s:?}");
        assert_eq!(s.last_passed_position, Some(10), "{s:?}");
        assert!(s.lag_exact, "fewer than {LAG_SAMPLE_EVENTS} remain: {s:?}");
    }
    let lag: i64 = balances.iter().map(|s| s.lag_events).sum();
    assert_eq!(lag, 10, "the second transaction's events: {balances:?}");
    assert!(!legacy[0].registered);
    assert_eq!(legacy[0].lag_events, 20);
    assert_eq!(legacy[0].last_passed_position, None);

    // An exact count of a lag the sample already counted is that count.
    let exact = projectionist::status_with(
        &env.store,
        &projections,
        &StatusOptions::default().exact(5).unwrap(),
    )
    .await
    .unwrap();
    let lags = |s: &[projectionist::SlotStatus]| {
        s.iter()
            .map(|s| (s.lag_events, s.lag_exact, s.lag_capped))
            .collect::<Vec<_>>()
    };
    assert_eq!(lags(&exact), lags(&slots));
    assert!(StatusOptions::default().exact(0).unwrap_err().is_config());

    // The table says what the JSON says.
    let o = run(&env.db, &["status"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    let row = |needle: &str| {
        table
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle}:\n{table}"))
            .to_owned()
    };
    assert!(
        row("legacy_report").contains("not in this binary"),
        "{table}"
    );
    assert!(row("1/3").contains("w-dead (stale)"), "{table}");
    assert!(
        row("0/3").contains("w-live") && !row("0/3").contains("stale"),
        "{table}"
    );
    let json = crate::crash::status_json(&env.db.url(), &[]);
    let legacy = json["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["projection"] == "legacy_report")
        .unwrap();
    assert_eq!(legacy["registered"], false);
    assert_eq!(legacy["lag_exact"], true);
    assert_eq!(legacy["stale_worker_id"], serde_json::Value::Null);

    // Beyond the sample: estimated, or counted up to a limit.
    client
        .execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             SELECT 'Other', 'o-' || g, 1, 'Happened', '{}' FROM generate_series(1, 2000) g",
            &[],
        )
        .await
        .unwrap();
    let slots = projectionist::status(&env.store, &projections)
        .await
        .unwrap();
    let legacy = &slots[3];
    assert!(!legacy.lag_exact && !legacy.lag_capped, "{legacy:?}");
    assert!((1800..=2200).contains(&legacy.lag_events), "{legacy:?}");
    for s in &slots[..3] {
        // account_balances receives none of the 2000 `Other` events.
        assert!(s.lag_events < 25, "{s:?}");
    }
    let counted = |limit: i64| {
        let projections = projections.clone();
        let store = env.store.clone();
        async move {
            projectionist::status_with(
                &store,
                &projections,
                &StatusOptions::default().exact(limit).unwrap(),
            )
            .await
            .unwrap()
        }
    };
    let capped = counted(1500).await;
    assert!(
        capped[3].lag_capped && !capped[3].lag_exact && capped[3].lag_events == 1500,
        "{:?}",
        capped[3]
    );
    let full = counted(5000).await;
    assert!(
        full[3].lag_exact && full[3].lag_events == 2020,
        "{:?}",
        full[3]
    );
    assert_eq!(
        full[..3].iter().map(|s| s.lag_events).sum::<i64>(),
        10,
        "{full:?}"
    );
    let o = run(&env.db, &["status"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("legacy_report") && l.contains("~")),
        "{table}"
    );
    assert!(table.contains("~ estimated"), "{table}");
    let o = run(
        &env.db,
        &["status", "--exact", "--exact-limit", "1500"],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("legacy_report") && l.contains(">1500")),
        "{table}"
    );
    let o = run(&env.db, &["status", "--exact", "--exact-limit", "0"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("STATUS_EXACT_LIMIT"),
        "{}",
        text(&o)
    );
}

/// Nothing secret in `status`: a password in the query of the transaction
/// that holds the watermark back, or in a slot's last error, is masked.
#[tokio::test]
async fn status_masks_passwords_in_the_holders_query_and_in_errors() {
    // A server of its own: the held transaction must be the oldest writer.
    let (_server, env) = crate::common::private_env().await;
    let c = env.client().await;
    c.batch_execute(
        "INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions, status, last_error) \
         VALUES ('account_balances', 0, 1, 'failed', 'cannot connect to postgres://app:s3cr3t@db/bank')",
    )
    .await
    .unwrap();
    let mut holder = env.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("CREATE ROLE status_test_role LOGIN PASSWORD 'hunter2-secret'")
        .await
        .unwrap();
    let report = projectionist::report(&env.store, &account_balances())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let held = report
        .watermark_held_by
        .as_ref()
        .expect("the held transaction");
    assert_eq!(
        held.query,
        "CREATE ROLE status_test_role LOGIN PASSWORD '***'"
    );
    assert_eq!(
        report.projections[0].last_error.as_deref(),
        Some("cannot connect to postgres://app:***@db/bank")
    );
    let json = serde_json::to_string(&report).unwrap();
    assert!(
        !json.contains("hunter2") && !json.contains("s3cr3t"),
        "{json}"
    );
}

/// Dead letters are counted through the index up to
/// `DEAD_LETTER_COUNT_LIMIT` per projection: a projection with 10,001
/// shows 10,000 and `dead_letters_capped` in the JSON, "10000+" in the
/// table; one with fewer shows its exact count.
#[tokio::test]
async fn dead_letters_are_counted_up_to_the_limit() {
    use projectionist::DEAD_LETTER_COUNT_LIMIT;
    assert_eq!(DEAD_LETTER_COUNT_LIMIT, 10_000);
    let env = env().await;
    let o = run(&env.db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let client = env.client().await;
    client
        .batch_execute(
            "INSERT INTO dead_letters (projection_name, partition_key, global_position, transaction_id, \
                                       event_id, aggregate_type, aggregate_id, event_type, error, attempts) \
             SELECT p, 0, g, '1', gen_random_uuid(), 'Account', 'a', 'MoneyDeposited', 'boom', 3 \
             FROM (VALUES ('account_balances', 10001), ('b_report', 7)) v(p, n), generate_series(1, v.n) g; \
             ANALYZE dead_letters;",
        )
        .await
        .unwrap();
    let report = projectionist::report(&env.store, &account_balances())
        .await
        .unwrap();
    assert_eq!(report.dead_letters.len(), 2, "{report:?}");
    assert_eq!(
        report.dead_letters["account_balances"],
        DEAD_LETTER_COUNT_LIMIT
    );
    assert_eq!(report.dead_letters["b_report"], 7);
    assert!(report.dead_letters_capped["account_balances"]);
    assert!(!report.dead_letters_capped["b_report"]);

    // One fewer: exact, not capped.
    client
        .execute(
            "DELETE FROM dead_letters WHERE id = (SELECT min(id) FROM dead_letters \
             WHERE projection_name = 'account_balances')",
            &[],
        )
        .await
        .unwrap();
    let json = crate::crash::status_json(&env.db.url(), &[]);
    assert_eq!(json["dead_letters"]["account_balances"], 10_000, "{json:#}");
    assert_eq!(
        json["dead_letters_capped"]["account_balances"], false,
        "{json:#}"
    );
    assert_eq!(json["dead_letters_capped"]["b_report"], false, "{json:#}");

    // And one more again: the table says "10000+".
    client
        .batch_execute(
            "INSERT INTO dead_letters (projection_name, partition_key, global_position, transaction_id, \
                                       event_id, aggregate_type, aggregate_id, event_type, error, attempts) \
             VALUES ('account_balances', 0, 0, '1', gen_random_uuid(), 'Account', 'a', 'MoneyDeposited', \
                     'boom', 3)",
        )
        .await
        .unwrap();
    let json = crate::crash::status_json(&env.db.url(), &[]);
    assert_eq!(json["dead_letters"]["account_balances"], 10_000, "{json:#}");
    assert_eq!(
        json["dead_letters_capped"]["account_balances"], true,
        "{json:#}"
    );
    let o = run(&env.db, &["status"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("account_balances: 10000+ dead letter(s)"),
        "{table}"
    );
    assert!(table.contains("b_report: 7 dead letter(s)"), "{table}");
}

/// The status statement is planned with JIT off even where the server
/// would JIT compile everything: compiling it cost more than running it at
/// 10M events (its cost estimate crosses `jit_above_cost`).
#[tokio::test]
async fn status_is_not_jit_compiled() {
    let env = env().await;
    let o = run(&env.db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let client = env.client().await;
    let jit: bool = client
        .query_one("SELECT pg_jit_available()", &[])
        .await
        .unwrap()
        .get(0);
    if !jit {
        eprintln!("this server has no JIT provider: nothing to check");
        return;
    }
    // Every later connection of this database would JIT compile any plan.
    client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET jit_above_cost = 0; \
             INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions) \
             VALUES ('account_balances', 0, 1)",
            env.db.name()
        ))
        .await
        .unwrap();
    let fresh = env.client().await;
    let plan: serde_json::Value = fresh
        .query_one("EXPLAIN (FORMAT JSON) SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        plan[0].get("JIT").is_some(),
        "the setting makes plans JIT compiled: {plan:#}"
    );
    let plan = projectionist::explain_status(&env.store, &account_balances())
        .await
        .unwrap();
    assert!(plan[0].get("JIT").is_none(), "{plan:#}");
    let slots = projectionist::status(&env.store, &account_balances())
        .await
        .unwrap();
    assert_eq!(slots.len(), 1);
}
