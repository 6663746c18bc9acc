//! Sticky rebalancing with real worker processes of the bank example: when
//! a worker dies only its slots move, and a worker that joins takes only
//! its fair share, from the workers above theirs. Slots that changed owner
//! are found by comparing `consumer_assignments` snapshots: every change of
//! owner bumps a slot's generation, so a slot that moved and moved back
//! counts too.

use crate::cli::{bank, run, text};
use crate::common::wait_until;
use projectionist::testing::TestDatabase;
use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::Duration;

/// account_balances in 16 partitions + the notifier: 17 slots.
const PARTITIONS: &str = "account_balances=16";
const SLOTS: usize = 17;

/// A `bank run-projections` worker process, SIGKILLed on drop.
struct Worker(Child);

impl Worker {
    fn spawn(db: &TestDatabase) -> Worker {
        let child = bank()
            .env("DATABASE_URL", db.url())
            .env("RUN_MODE", "worker")
            .env("HEARTBEAT_INTERVAL", "200ms")
            .env("HEARTBEAT_TIMEOUT", "1500ms")
            .env("REBALANCE_INTERVAL", "300ms")
            .env("PROJECTION_PARTITIONS", PARTITIONS)
            .env("ADMIN_ADDR", "off")
            .env("POOL_SIZE", "4")
            .env("LOG_LEVEL", "warn")
            .arg("run-projections")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn worker");
        Worker(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn kill(&mut self) {
        self.0.kill().expect("SIGKILL a worker");
        self.0.wait().expect("reap a worker");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every slot: (projection, partition) → (owner, generation).
type Snapshot = BTreeMap<(String, i32), (Option<String>, i64)>;

async fn snapshot(c: &tokio_postgres::Client) -> Snapshot {
    c.query(
        "SELECT projection_name, partition_key, worker_id, generation FROM consumer_assignments",
        &[],
    )
    .await
    .expect("read consumer_assignments")
    .iter()
    .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
    .collect()
}

/// Slots held per live worker id.
async fn holdings(c: &tokio_postgres::Client) -> BTreeMap<String, usize> {
    let mut held: BTreeMap<String, usize> = c
        .query("SELECT worker_id FROM worker_nodes", &[])
        .await
        .expect("read worker_nodes")
        .iter()
        .map(|r| (r.get(0), 0))
        .collect();
    for (owner, _) in snapshot(c).await.into_values() {
        if let Some(n) = owner.and_then(|o| held.get_mut(&o)) {
            *n += 1;
        }
    }
    held
}

/// Waits until exactly `workers` workers are live and hold all the slots,
/// ⌊N/M⌋ or ⌈N/M⌉ each.
async fn wait_balanced(c: &tokio_postgres::Client, workers: usize) {
    wait_until(
        Duration::from_secs(30),
        &format!("{SLOTS} slots balanced over {workers} workers"),
        || async {
            let held = holdings(c).await;
            let (lo, hi) = (SLOTS / workers, SLOTS.div_ceil(workers));
            held.len() == workers
                && held.values().sum::<usize>() == SLOTS
                && held.values().all(|&n| n == lo || n == hi)
        },
    )
    .await;
}

/// The leader's worker id: the worker whose leader connection holds the
/// advisory lock.
async fn leader(c: &tokio_postgres::Client) -> Option<String> {
    c.query_opt(
        "SELECT w.worker_id FROM worker_nodes w WHERE EXISTS ( \
            SELECT 1 FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
            WHERE l.locktype = 'advisory' AND l.granted \
              AND s.application_name = 'projectionist-leader:' || w.worker_id)",
        &[],
    )
    .await
    .expect("find the leader")
    .map(|r| r.get(0))
}

/// The slots whose owner or generation differs between two snapshots.
fn moved(before: &Snapshot, after: &Snapshot) -> Vec<(String, i32)> {
    after
        .iter()
        .filter(|(slot, now)| before.get(*slot) != Some(*now))
        .map(|(slot, _)| slot.clone())
        .collect()
}

#[tokio::test]
async fn only_orphans_move_on_a_kill_and_a_newcomer_takes_only_its_share() {
    let db = TestDatabase::create().await.expect("create test database");
    let o = run(&db, &["migrate"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let c = db.connect().await.expect("connect");

    let mut workers: Vec<Worker> = (0..4).map(|_| Worker::spawn(&db)).collect();
    wait_balanced(&c, 4).await;
    wait_until(Duration::from_secs(10), "a leader", || async {
        leader(&c).await.is_some()
    })
    .await;
    let leader_id = leader(&c).await.expect("a leader");

    // SIGKILL the non-leader that holds the most slots.
    let before = snapshot(&c).await;
    let held = holdings(&c).await;
    let (victim_id, k) = held
        .iter()
        .filter(|(id, _)| **id != leader_id)
        .max_by_key(|(id, n)| (**n, std::cmp::Reverse((*id).clone())))
        .map(|(id, n)| (id.clone(), *n))
        .expect("a non-leader worker");
    let victim_pid: i32 = c
        .query_one(
            "SELECT pid FROM worker_nodes WHERE worker_id = $1",
            &[&victim_id],
        )
        .await
        .expect("the victim's pid")
        .get(0);
    workers
        .iter_mut()
        .find(|w| w.pid() == victim_pid)
        .expect("the victim is one of ours")
        .kill();
    wait_until(
        Duration::from_secs(30),
        "the killed worker to be removed",
        || async {
            !holdings(&c).await.contains_key(&victim_id)
                && !snapshot(&c)
                    .await
                    .values()
                    .any(|(o, _)| o.as_deref() == Some(victim_id.as_str()))
        },
    )
    .await;
    wait_balanced(&c, 3).await;
    let after_kill = snapshot(&c).await;
    let changed = moved(&before, &after_kill);
    let orphans: Vec<(String, i32)> = before
        .iter()
        .filter(|(_, (o, _))| o.as_deref() == Some(victim_id.as_str()))
        .map(|(slot, _)| slot.clone())
        .collect();
    assert!(
        changed.len() <= k + 3,
        "killing a worker with {k} of {SLOTS} slots moved {} slots (allowed {k} + 3): {changed:?}",
        changed.len()
    );
    assert_eq!(
        changed,
        orphans,
        "killing a worker with {k} of {SLOTS} slots moved {} slots; only its own should move",
        changed.len()
    );

    // A newcomer: it takes its fair share, and only from the workers above
    // theirs; nothing else moves.
    let held = holdings(&c).await;
    workers.push(Worker::spawn(&db));
    wait_balanced(&c, 4).await;
    let after_join = snapshot(&c).await;
    let newcomer = holdings(&c)
        .await
        .into_keys()
        .find(|id| !held.contains_key(id))
        .expect("the newcomer registered");
    let changed = moved(&after_kill, &after_join);
    let taken = changed
        .iter()
        .filter(|slot| after_join[*slot].0.as_deref() == Some(newcomer.as_str()))
        .count();
    assert!(
        taken <= SLOTS.div_ceil(4),
        "the newcomer took {taken} slots; its fair share is at most {}",
        SLOTS.div_ceil(4)
    );
    assert_eq!(
        changed.len(),
        taken,
        "{} slots moved when a worker joined, {taken} of them to the newcomer: {changed:?}",
        changed.len()
    );
    for slot in &changed {
        let giver = after_kill[slot]
            .0
            .clone()
            .expect("assigned before the join");
        assert!(
            held[&giver] > SLOTS / 4,
            "{giver} held {} slots, not above the fair share {}, yet gave {slot:?} away",
            held[&giver],
            SLOTS / 4
        );
    }
}
