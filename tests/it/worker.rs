//! Worker mode with real OS processes of the bank example: scaling,
//! SIGKILL, SIGSTOP, SIGTERM, leader failover. Intervals are short so the
//! suite stays fast; `PROJECTIONIST_SOAK=1` makes the kill test run for a
//! minute.

use crate::cli::{assert_read_model_exact, bank, run, text};
use crate::common::wait_until;
use projectionist::testing::TestDatabase;
use rand::Rng;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HEARTBEAT_INTERVAL: &str = "200ms";
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
const REBALANCE_INTERVAL: Duration = Duration::from_millis(300);
/// account_balances in 5 partitions + the notifier: 6 slots.
const PARTITIONS: &str = "account_balances=5";
const SLOTS: usize = 6;

/// A `bank run-projections --mode worker` process, killed on drop.
struct Worker {
    child: Option<Child>,
}

impl Worker {
    fn spawn(db: &TestDatabase, env: &[(&str, &str)]) -> Worker {
        let mut cmd = bank();
        cmd.env("DATABASE_URL", db.url())
            .env("RUN_MODE", "worker")
            .env("HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
            .env(
                "HEARTBEAT_TIMEOUT",
                format!("{}ms", HEARTBEAT_TIMEOUT.as_millis()),
            )
            .env(
                "REBALANCE_INTERVAL",
                format!("{}ms", REBALANCE_INTERVAL.as_millis()),
            )
            .env("PROJECTION_PARTITIONS", PARTITIONS)
            .env("POLL_INTERVAL", "50ms")
            .env("BATCH_SIZE", "20")
            .args(["run-projections"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Worker {
            child: Some(cmd.spawn().expect("spawn worker")),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits for the process to exit; returns its exit code and stderr.
    async fn wait(mut self) -> (Option<i32>, String) {
        let child = self.child.take().expect("running");
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("wait");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Assigned slots per live worker, sorted.
async fn distribution(c: &tokio_postgres::Client) -> (usize, Vec<i64>, i64) {
    let live: i64 = c
        .query_one("SELECT count(*) FROM worker_nodes", &[])
        .await
        .unwrap()
        .get(0);
    let counts: Vec<i64> = c
        .query(
            "SELECT count(*) FROM consumer_assignments a JOIN worker_nodes w USING (worker_id) \
             GROUP BY worker_id ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unassigned: i64 = c
        .query_one(
            "SELECT count(*) FROM consumer_assignments a WHERE NOT EXISTS \
             (SELECT 1 FROM worker_nodes w WHERE w.worker_id = a.worker_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    (live as usize, counts, unassigned)
}

/// Waits until `workers` workers are live and the slots are spread
/// ⌊N/M⌋/⌈N/M⌉ over them (workers beyond N hold nothing).
async fn wait_balanced(c: &tokio_postgres::Client, workers: usize) {
    wait_until(
        Duration::from_secs(30),
        &format!("{SLOTS} slots balanced over {workers} workers"),
        || async {
            let (live, counts, unassigned) = distribution(c).await;
            let holders = workers.min(SLOTS);
            let lo = (SLOTS / workers) as i64;
            let hi = SLOTS.div_ceil(workers) as i64;
            live == workers
                && unassigned == 0
                && counts.len() == holders
                && counts.iter().sum::<i64>() == SLOTS as i64
                && counts.iter().all(|&n| n == lo || n == hi)
        },
    )
    .await;
}

async fn wait_exact(db: &TestDatabase) {
    let c = db.connect().await.unwrap();
    wait_until(
        Duration::from_secs(60),
        "the read model to catch up",
        || async {
            let r = c
                .query_one(
                    "SELECT (SELECT count(*) FROM events WHERE aggregate_type = 'Account'), \
                        (SELECT coalesce(sum(event_count), 0)::int8 FROM account_balances)",
                    &[],
                )
                .await
                .unwrap();
            r.get::<_, i64>(0) == r.get::<_, i64>(1)
        },
    )
    .await;
    // And every slot has handled exactly the events it receives (the
    // bank's filters: Account aggregates; MoneyWithdrawn events). More
    // would be double handling: fail at once.
    wait_until(
        Duration::from_secs(60),
        "every slot to have handled its events",
        || async {
            let rows = c
                .query(
                    "SELECT p.name, coalesce((SELECT sum(events_handled)::int8 FROM projection_checkpoints \
                                              WHERE projection_name = p.name), 0), \
                            CASE p.name WHEN 'account_balances' \
                                 THEN (SELECT count(*) FROM events WHERE aggregate_type = 'Account') \
                                 ELSE (SELECT count(*) FROM events WHERE event_type = 'MoneyWithdrawn') END \
                     FROM (VALUES ('account_balances'), ('large_withdrawal_notifier')) p(name)",
                    &[],
                )
                .await
                .unwrap();
            rows.iter().all(|r| {
                let (name, handled, matching): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                assert!(handled <= matching, "{name} handled {handled} of {matching} events: some twice");
                handled == matching
            })
        },
    )
    .await;
    assert_read_model_exact(db).await;
}

fn simulate(db: &TestDatabase, events: u32) -> Child {
    bank()
        .env("DATABASE_URL", db.url())
        .args([
            "simulate",
            "--accounts",
            "40",
            "--events",
            &events.to_string(),
            "--writers",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn simulate")
}

async fn finish(child: Child) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

async fn migrated() -> (TestDatabase, tokio_postgres::Client) {
    let db = TestDatabase::create().await.unwrap();
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let c = db.connect().await.unwrap();
    (db, c)
}

#[tokio::test]
async fn scaling_one_three_one_converges_and_stays_exact() {
    let (db, c) = migrated().await;
    let load = simulate(&db, 3_000);
    let first = Worker::spawn(&db, &[]);
    wait_balanced(&c, 1).await;
    let second = Worker::spawn(&db, &[]);
    let third = Worker::spawn(&db, &[]);
    wait_balanced(&c, 3).await;
    second.signal("TERM");
    third.signal("TERM");
    let (code2, err2) = second.wait().await;
    let (code3, err3) = third.wait().await;
    assert_eq!(code2, Some(0), "{err2}");
    assert_eq!(code3, Some(0), "{err3}");
    wait_balanced(&c, 1).await;
    finish(load).await;
    wait_exact(&db).await;
    drop(first);
}

#[tokio::test]
async fn sigkill_random_workers_while_appending_applies_every_event_once() {
    let (db, c) = migrated().await;
    let soak = std::env::var("PROJECTIONIST_SOAK").is_ok_and(|v| v == "1");
    let run_for = if soak {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(6)
    };
    let load = simulate(&db, if soak { 60_000 } else { 4_000 });
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::spawn(&db, &[])).collect();
    wait_balanced(&c, 3).await;
    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(
            rand::thread_rng().gen_range(300..900),
        ))
        .await;
        let victim = rand::thread_rng().gen_range(0..workers.len());
        workers[victim].signal("KILL");
        kills += 1;
        workers[victim] = Worker::spawn(&db, &[]);
    }
    assert!(kills >= 5);
    finish(load).await;
    wait_exact(&db).await;
    // The killed workers' rows time out; the pool settles on the three live ones.
    wait_balanced(&c, 3).await;
}

async fn leader(c: &tokio_postgres::Client) -> Option<(String, i32)> {
    c.query_opt(
        "SELECT w.worker_id, w.pid FROM worker_nodes w WHERE EXISTS ( \
            SELECT 1 FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
            WHERE l.locktype = 'advisory' AND l.granted \
              AND s.application_name = 'projectionist-leader:' || w.worker_id)",
        &[],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test]
async fn a_killed_leader_is_replaced_within_timeout_plus_interval() {
    let (db, c) = migrated().await;
    let workers: Vec<Worker> = (0..3).map(|_| Worker::spawn(&db, &[])).collect();
    wait_balanced(&c, 3).await;
    wait_until(Duration::from_secs(10), "a leader", || async {
        leader(&c).await.is_some()
    })
    .await;
    let (old_id, old_pid) = leader(&c).await.unwrap();
    let victim = workers
        .iter()
        .find(|w| w.pid() as i32 == old_pid)
        .expect("leader is one of ours");
    victim.signal("KILL");
    let killed = Instant::now();
    wait_until(Duration::from_secs(10), "a new leader", || async {
        matches!(leader(&c).await, Some((id, _)) if id != old_id)
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took <= HEARTBEAT_TIMEOUT + REBALANCE_INTERVAL,
        "new leader after {took:?}, allowed {:?}",
        HEARTBEAT_TIMEOUT + REBALANCE_INTERVAL
    );
    // And the new leader moves the dead worker's slots to the two survivors.
    wait_balanced(&c, 2).await;
}

#[tokio::test]
async fn a_paused_worker_commits_nothing_for_slots_it_lost() {
    let (db, c) = migrated().await;
    let workers: Vec<Worker> = (0..2).map(|_| Worker::spawn(&db, &[])).collect();
    wait_balanced(&c, 2).await;
    let load = simulate(&db, 1_500);
    // Pause one worker in the middle of the load until its slots move.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused = &workers[0];
    let paused_id: String = c
        .query_one(
            "SELECT worker_id FROM worker_nodes WHERE pid = $1",
            &[&(paused.pid() as i32)],
        )
        .await
        .unwrap()
        .get(0);
    paused.signal("STOP");
    wait_until(
        Duration::from_secs(20),
        "the paused worker's slots to move",
        || async {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM consumer_assignments WHERE worker_id = $1",
                    &[&paused_id],
                )
                .await
                .unwrap()
                .get(0);
            n == 0
        },
    )
    .await;
    wait_balanced(&c, 1).await;
    finish(load).await;
    // The survivor finishes everything while the paused one is stopped.
    wait_exact(&db).await;
    let handled_before: i64 = c
        .query_one(
            "SELECT sum(events_handled)::int8 FROM projection_checkpoints",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    paused.signal("CONT");
    // It wakes up, finds it lost its slots (its sessions were ended, its
    // commits are fenced), re-registers and gets a share again.
    wait_balanced(&c, 2).await;
    assert_read_model_exact(&db).await;
    let handled_after: i64 = c
        .query_one(
            "SELECT sum(events_handled)::int8 FROM projection_checkpoints",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Every slot: `wait_exact` waited until each had handled exactly its
    // events (the notifier's count once looked like it rose after the
    // pause; it was still catching up when the count was taken).
    assert_eq!(
        handled_after, handled_before,
        "nothing was handled twice after the pause"
    );
}

#[tokio::test]
async fn sigterm_moves_slots_within_one_rebalance_interval() {
    let (db, c) = migrated().await;
    // A long heartbeat timeout: only the graceful leave can move the slots fast.
    let env = [("HEARTBEAT_TIMEOUT", "30s")];
    let workers: Vec<Worker> = (0..3).map(|_| Worker::spawn(&db, &env)).collect();
    wait_balanced(&c, 3).await;
    let mut workers = workers;
    let leaving = workers.remove(1);
    let leaving_id: String = c
        .query_one(
            "SELECT worker_id FROM worker_nodes WHERE pid = $1",
            &[&(leaving.pid() as i32)],
        )
        .await
        .unwrap()
        .get(0);
    leaving.signal("TERM");
    let (code, err) = leaving.wait().await;
    let exited = Instant::now();
    assert_eq!(code, Some(0), "{err}");
    wait_until(Duration::from_secs(10), "the slots to move", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM consumer_assignments WHERE worker_id = $1 OR worker_id IS NULL",
                &[&leaving_id],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    let took = exited.elapsed();
    // The leaving worker's NOTIFY makes the leader rebalance at once; the
    // alternative (the heartbeat timeout) is 30 s here. One interval plus
    // a little scheduling slack for a loaded 2-core machine (348 ms was
    // seen with the whole suite and a benchmark running).
    assert!(
        took <= REBALANCE_INTERVAL + Duration::from_millis(300),
        "slots moved {took:?} after exit; allowed one rebalance interval (plus scheduling slack)"
    );
    wait_balanced(&c, 2).await;
}

/// Sum of `events_handled` over every partition of `projection`.
async fn handled(c: &tokio_postgres::Client, projection: &str) -> i64 {
    c.query_one(
        "SELECT coalesce(sum(events_handled), 0)::int8 FROM projection_checkpoints \
         WHERE projection_name = $1",
        &[&projection],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn rewind_in_worker_mode_restarts_the_slot_and_handles_the_events_again() {
    const NOTIFIER: &str = "large_withdrawal_notifier";
    let (db, c) = migrated().await;
    let workers: Vec<Worker> = (0..2).map(|_| Worker::spawn(&db, &[])).collect();
    wait_balanced(&c, 2).await;
    finish(simulate(&db, 1_500)).await;
    // Every slot has handled exactly its events, once.
    wait_exact(&db).await;
    let balances_before = handled(&c, "account_balances").await;
    let notifier_before = handled(&c, NOTIFIER).await;
    // The notifier receives the MoneyWithdrawn events: rewind to the median
    // one's position.
    let (position, after): (i64, i64) = {
        let r = c
            .query_one(
                "WITH p AS (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY global_position) AS p \
                            FROM events WHERE event_type = 'MoneyWithdrawn') \
                 SELECT p.p, (SELECT count(*) FROM events \
                              WHERE event_type = 'MoneyWithdrawn' AND global_position >= p.p) FROM p",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        after > 0 && after < notifier_before,
        "P={position} is inside the notifier's events: {after} of {notifier_before} after it"
    );

    // While both workers run.
    let o = run(
        &db,
        &[
            "rewind",
            NOTIFIER,
            "--to-position",
            &position.to_string(),
            "--yes",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // "rewound large_withdrawal_notifier: N event(s) will be handled again in M partition(s); …"
    let printed: i64 = out
        .split_once(": ")
        .and_then(|(head, rest)| {
            assert!(head.starts_with("rewound"), "{out}");
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("rewind prints what it moved: {}", text(&o)));
    assert!(
        printed >= after,
        "rewind counts {printed} event(s), at least the {after} MoneyWithdrawn events from {position}: {out}"
    );
    assert!(out.contains("1 partition(s)"), "{out}");

    // The owner's next checkpoint is fenced, the slot stops and the next
    // reconcile restarts it from the rewound cursor: the events are handled
    // again, and the slot is back at the head, running.
    wait_until(
        Duration::from_secs(30),
        "the notifier to handle the rewound events again and catch up",
        || async {
            if handled(&c, NOTIFIER).await < notifier_before + printed {
                return false;
            }
            let s = run(&db, &["status", "--json"], &[]);
            assert!(s.status.success(), "{}", text(&s));
            let status: serde_json::Value =
                serde_json::from_slice(&s.stdout).expect("status --json is JSON");
            status["projections"]
                .as_array()
                .expect("projections array")
                .iter()
                .filter(|r| r["projection"] == NOTIFIER)
                .all(|r| r["lag_events"] == 0)
        },
    )
    .await;
    let rows = c
        .query(
            "SELECT partition_key, status, last_error FROM projection_checkpoints \
             WHERE projection_name = $1 ORDER BY partition_key",
            &[&NOTIFIER],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for r in &rows {
        let (partition, status, error): (i32, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            status, "running",
            "{NOTIFIER} partition {partition}: {error:?}"
        );
    }
    let notifier_after = handled(&c, NOTIFIER).await;
    assert_eq!(
        notifier_after - notifier_before,
        printed,
        "the notifier handled again exactly the events rewind counted"
    );
    // Only the named projection moved.
    assert_eq!(handled(&c, "account_balances").await, balances_before);
    assert_read_model_exact(&db).await;
    // Both workers are alive and still hold all the slots.
    wait_balanced(&c, 2).await;
    // The path taken: the owner's checkpoint compare-and-set failed (the
    // cursor moved under it), it stopped the slot, and a reconcile started
    // it again; no worker failed.
    let mut logs = String::new();
    for w in workers {
        w.signal("TERM");
        let (code, err) = w.wait().await;
        assert_eq!(code, Some(0), "{err}");
        logs.push_str(&err);
    }
    assert!(
        logs.contains("slot fenced; stopping it") && logs.contains(NOTIFIER),
        "the owner saw the moved cursor as a fence: {logs}"
    );
    assert!(
        !logs.contains("ERROR") && !logs.contains("panicked"),
        "{logs}"
    );
}
