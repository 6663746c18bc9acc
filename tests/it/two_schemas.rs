//! Two deployments of the bank in two schemas of one database, each with
//! two workers: leadership, its lock and the cleanup of dead leaders are the
//! schema's own, so neither deployment ever ends the other's leader.

use crate::cli::{run, text};
use crate::common::wait_until;
use crate::crash::{all_caught_up, balances, mismatches, status_json, BankProcess};
use projectionist::testing::TestDatabase;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

const SCHEMAS: [&str; 2] = ["alpha", "beta"];
/// How long the leaders are watched.
const WATCH: Duration = Duration::from_secs(10);

/// The database URL with `search_path` set to `schema`, where the bank's
/// read model then lives too.
fn schema_url(db: &TestDatabase, schema: &str) -> String {
    format!("{} options='-c search_path={schema}'", db.url())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let config = tokio_postgres::Config::from_str(url).expect("url");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

fn worker(url: &str, schema: &str) -> BankProcess {
    BankProcess::spawn(
        url,
        &[
            ("PROJECTIONIST_SCHEMA", schema),
            ("RUN_MODE", "worker"),
            ("HEARTBEAT_INTERVAL", "200ms"),
            ("HEARTBEAT_TIMEOUT", "3s"),
            ("REBALANCE_INTERVAL", "300ms"),
            ("PROJECTION_PARTITIONS", "account_balances=2"),
            ("POLL_INTERVAL", "50ms"),
            ("BATCH_SIZE", "20"),
        ],
    )
}

/// The backend pid holding `schema`'s leader lock: a session named after
/// one of the schema's workers, holding an advisory lock in this database.
async fn leader_pid(c: &tokio_postgres::Client, schema: &str) -> Option<i32> {
    c.query_opt(
        &format!(
            "SELECT s.pid FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
             JOIN {schema}.worker_nodes w ON s.application_name = 'projectionist-leader:' || w.worker_id \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        &[],
    )
    .await
    .expect("leader")
    .map(|r| r.get(0))
}

/// Appends `rounds` × 10 deposits and withdrawals, one per account of 10
/// accounts of `schema` per statement (so that each statement's versions
/// follow the stored ones).
async fn append(c: &tokio_postgres::Client, schema: &str, rounds: usize) {
    for _ in 0..rounds {
        c.execute(
            &format!(
                "INSERT INTO {schema}.events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
                 SELECT 'Account', 'acct-' || g, \
                        coalesce((SELECT max(aggregate_version) FROM {schema}.events e \
                                  WHERE e.aggregate_type = 'Account' AND e.aggregate_id = 'acct-' || g), 0) + 1, \
                        CASE WHEN g % 3 = 2 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
                        jsonb_build_object('amount', 10 * g + 1) \
                 FROM generate_series(0, 9) g"
            ),
            &[],
        )
        .await
        .expect("append");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schemas_in_one_database_never_end_each_others_leader() {
    let db = TestDatabase::create().await.expect("database");
    let mut workers = Vec::new();
    let mut clients = BTreeMap::new();
    for schema in SCHEMAS {
        let url = schema_url(&db, schema);
        let o = run(
            &db,
            &["migrate"],
            &[("PROJECTIONIST_SCHEMA", schema), ("DATABASE_URL", &url)],
        );
        assert!(o.status.success(), "{}", text(&o));
        let c = connect(&url).await;
        append(&c, schema, 5).await;
        clients.insert(schema, c);
        workers.push(worker(&url, schema));
        workers.push(worker(&url, schema));
    }
    let c = db.connect().await.expect("connect");
    for schema in SCHEMAS {
        wait_until(
            Duration::from_secs(30),
            &format!("a leader and a balanced assignment in {schema}"),
            || async {
                let assigned: i64 = c
                    .query_one(
                        &format!(
                            "SELECT count(DISTINCT a.worker_id) FROM {schema}.consumer_assignments a \
                             JOIN {schema}.worker_nodes w USING (worker_id)"
                        ),
                        &[],
                    )
                    .await
                    .expect("assignments")
                    .get(0);
                assigned == 2 && leader_pid(&c, schema).await.is_some()
            },
        )
        .await;
    }

    // Watch the leaders' sessions while both deployments work.
    let mut seen: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < WATCH {
        for schema in SCHEMAS {
            if let Some(pid) = leader_pid(&c, schema).await {
                let pids = seen.entry(schema).or_default();
                if pids.last() != Some(&pid) {
                    pids.push(pid);
                }
            }
            if rounds % 10 == 0 {
                append(&clients[schema], schema, 1).await;
            }
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, w) in workers.iter_mut().enumerate() {
        assert!(w.alive(), "worker {i} exited:\n{}", w.stderr_tail());
    }
    for schema in SCHEMAS {
        let pids = &seen[schema];
        assert_eq!(
            pids.len(),
            1,
            "{schema}: the leader's session was replaced {} times in {WATCH:?} (leader pids in \
             order: {pids:?}); worker logs:\n{}",
            pids.len() - 1,
            workers
                .iter()
                .map(BankProcess::stderr_tail)
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }

    // A paused leader (its session keeps the lock) is still replaced: the
    // other worker of its schema finds the lock's holder and ends it. The
    // other schema's leader stays.
    let (old_leader, old_worker_pid): (i32, i32) = c
        .query_one(
            "SELECT s.pid, w.pid FROM pg_stat_activity s \
             JOIN alpha.worker_nodes w ON s.application_name = 'projectionist-leader:' || w.worker_id \
             WHERE s.pid = $1",
            &[&seen["alpha"][0]],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("alpha's leader and its worker");
    let paused = workers
        .iter()
        .find(|w| w.pid() as i32 == old_worker_pid)
        .expect("alpha's leader is one of ours");
    paused.signal("STOP");
    let beta_leader = seen["beta"][0];
    let took = Instant::now();
    let deadline = took + Duration::from_secs(20);
    loop {
        let alpha = leader_pid(&c, "alpha").await;
        let beta = leader_pid(&c, "beta").await;
        assert!(
            beta.is_none_or(|p| p == beta_leader),
            "beta's leader changed ({beta_leader} to {beta:?}) while alpha's was paused"
        );
        if alpha.is_some_and(|p| p != old_leader) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alpha's paused leader (session {old_leader}) was not replaced within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = took.elapsed();
    paused.signal("CONT");
    // HEARTBEAT_TIMEOUT + REBALANCE_INTERVAL, and a second of slack for a
    // busy machine.
    assert!(
        took <= Duration::from_millis(3_000 + 300 + 1_000),
        "alpha's paused leader was replaced only after {took:?}"
    );
    assert_eq!(leader_pid(&c, "beta").await, Some(beta_leader));

    // Both deployments processed everything appended to them, exactly.
    for schema in SCHEMAS {
        let url = schema_url(&db, schema);
        let env = [("PROJECTIONIST_SCHEMA", schema)];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (want, got) = balances(&clients[schema]).await;
            let wrong = mismatches(&want, &got);
            let status = tokio::task::block_in_place(|| status_json(&url, &env));
            if wrong.is_empty() && !want.is_empty() && all_caught_up(&status) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{schema}: the read model did not catch up within 60 s: {wrong:?}\n{status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
