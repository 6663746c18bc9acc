//! Shared appends (`StoreConfig::append_lanes`): concurrent autocommit
//! appends of one store share statements, and each keeps its own checks
//! and outcome.

use crate::common::env;
use projectionist::{EventStore, ExpectedVersion, NewEvent, StoreConfig};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

fn event(n: i64) -> NewEvent {
    NewEvent::from_json("MoneyDeposited", format!(r#"{{"amount": {n}}}"#))
}

fn store_with_lanes(env: &crate::common::Env, lanes: usize) -> EventStore {
    EventStore::connect_config(env.db.config(), StoreConfig::default().append_lanes(lanes))
        .expect("store")
}

/// What one writer saw.
#[derive(Default)]
struct Outcomes {
    /// (stream, stream version, event id, transaction id) of every success.
    written: Vec<(String, i64, uuid::Uuid, u64)>,
    conflicts: usize,
    duplicates: usize,
    races: usize,
    /// Appends made to fail, by kind.
    meant_conflicts: usize,
    meant_duplicates: usize,
    /// Successful appends.
    ok: usize,
}

/// 16 writers on one store with one lane, so nearly every statement is
/// shared: own streams with exact versions, a shared stream with `Any`, and
/// on purpose a wrong expected version or an event id used before in every
/// fourth append. Each append must get exactly its own outcome.
#[tokio::test]
async fn shared_appends_keep_each_appends_checks_and_outcome() {
    let env = env().await;
    let store = store_with_lanes(&env, 1);
    const WRITERS: usize = 16;
    const APPENDS: usize = 60;
    let reused = uuid::Uuid::now_v7();
    store
        .append(
            "Account",
            "seed",
            ExpectedVersion::NoStream,
            &[event(0).with_event_id(reused)],
        )
        .await
        .expect("seed");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Outcomes::default();
            let own = format!("own-{w}");
            let mut version = 0i64;
            for k in 0..APPENDS {
                let (stream, expected, events, bad) = match k % 4 {
                    // A wrong expected version, above the stream's head or
                    // (every eighth append, once the stream exists) below
                    // it: must fail alone.
                    1 => {
                        let wrong = if k % 8 == 5 && version > 0 { version - 1 } else { version + 5 };
                        (own.clone(), ExpectedVersion::Exact(wrong), vec![event(1)], "conflict")
                    }
                    // An event id stored before, among good ones, in every
                    // eighth append: must fail alone (the others of its
                    // statement then run alone too, so it is not in every
                    // statement).
                    2 if k % 8 == 2 => (
                        format!("dup-{w}-{k}"),
                        ExpectedVersion::NoStream,
                        vec![event(2), event(3).with_event_id(reused)],
                        "duplicate",
                    ),
                    // A new stream.
                    2 => (
                        format!("new-{w}-{k}"),
                        ExpectedVersion::NoStream,
                        vec![event(5), event(6)],
                        "",
                    ),
                    // The shared stream, any version: concurrent appends to
                    // one stream may still race (a conflict, as without
                    // sharing).
                    3 => ("shared".to_string(), ExpectedVersion::Any, vec![event(4)], "race"),
                    _ => (
                        own.clone(),
                        ExpectedVersion::Exact(version),
                        (0..=(k % 3) as i64).map(event).collect(),
                        "",
                    ),
                };
                let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id()).collect();
                match bad {
                    "conflict" => seen.meant_conflicts += 1,
                    "duplicate" => seen.meant_duplicates += 1,
                    _ => {}
                }
                match (store.append("Account", &stream, expected, &events).await, bad) {
                    (Ok(r), "" | "race") => {
                        seen.ok += 1;
                        if stream == own {
                            assert_eq!(
                                r.stream_version,
                                version + ids.len() as i64,
                                "writer {w}, append {k}: {r:?}, {} events, expected {expected:?}; stream: {:?}",
                                ids.len(),
                                store.read_stream("Account", &own, 1, 100).await.map(|s| s
                                    .iter()
                                    .map(|e| (e.aggregate_version, e.transaction_id, e.global_position, e.event_id))
                                    .collect::<Vec<_>>())
                            );
                            version = r.stream_version;
                        }
                        // Positions come from one sequence shared with
                        // concurrent statements: bounds, not a range.
                        assert!(r.last_position - r.first_position + 1 >= ids.len() as i64);
                        let first = r.stream_version - ids.len() as i64 + 1;
                        for (i, id) in ids.iter().enumerate() {
                            seen.written.push((stream.clone(), first + i as i64, *id, r.transaction_id));
                        }
                    }
                    (Err(e), "conflict") if e.is_conflict() => {
                        assert!(e.to_string().contains("expected version"), "{e}");
                        seen.conflicts += 1;
                    }
                    (Err(e), "duplicate") if e.is_duplicate_event() => seen.duplicates += 1,
                    (Err(e), "race") if e.is_conflict() => seen.races += 1,
                    (other, bad) => panic!(
                        "writer {w}, append {k} to {stream} (expected to fail: {bad:?}): {:?}",
                        other.map(|r| r.stream_version)
                    ),
                }
            }
            seen
        }));
    }
    let mut all = Outcomes::default();
    for t in tasks {
        let o = t.await.expect("writer panicked");
        all.written.extend(o.written);
        all.conflicts += o.conflicts;
        all.duplicates += o.duplicates;
        all.races += o.races;
        all.meant_conflicts += o.meant_conflicts;
        all.meant_duplicates += o.meant_duplicates;
        all.ok += o.ok;
    }
    assert_eq!(all.conflicts, all.meant_conflicts);
    assert_eq!(all.conflicts, WRITERS * APPENDS / 4);
    assert_eq!(all.duplicates, all.meant_duplicates);
    assert!(all.duplicates >= WRITERS * APPENDS / 8);

    // Exactly the successful appends are stored, each event once, at the
    // version its append reported; every stream is 1..n without holes.
    let client = env.db.connect().await.expect("connect");
    let rows = client
        .query(
            "SELECT aggregate_id, aggregate_version, event_id, transaction_id::text::bigint \
             FROM events WHERE aggregate_id <> 'seed' ORDER BY global_position",
            &[],
        )
        .await
        .expect("read events");
    let stored: HashSet<(String, i64, uuid::Uuid)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, uuid::Uuid>(2),
            )
        })
        .collect();
    assert_eq!(stored.len(), rows.len(), "an event stored twice");
    let reported: HashSet<(String, i64, uuid::Uuid)> = all
        .written
        .iter()
        .map(|(s, v, id, _)| (s.clone(), *v, *id))
        .collect();
    assert_eq!(
        stored, reported,
        "stored events differ from the successful appends"
    );
    let mut streams: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (s, v, _) in &stored {
        streams.entry(s.clone()).or_default().push(*v);
    }
    for (s, mut versions) in streams {
        versions.sort();
        assert_eq!(
            versions,
            (1..=versions.len() as i64).collect::<Vec<_>>(),
            "stream {s}"
        );
    }
    // The statements were shared: fewer transactions than appends.
    let mut per_tx: HashMap<u64, HashSet<&str>> = HashMap::new();
    for (s, _, _, tx) in &all.written {
        per_tx.entry(*tx).or_default().insert(s);
    }
    let shared = per_tx.values().filter(|streams| streams.len() > 1).count();
    let appends = all.ok;
    assert!(
        shared > 0 && per_tx.len() < appends,
        "{appends} successful appends in {} transactions, {shared} of them shared: nothing was combined",
        per_tx.len()
    );
    eprintln!(
        "{appends} successful appends in {} transactions ({shared} shared)",
        per_tx.len()
    );
}

/// An append stuck on a lock (a caller's open transaction wrote the same
/// stream version) holds its lane; the store's other appends go on within
/// the stall time, and the stuck one finishes once the lock is released.
#[tokio::test]
async fn an_append_stuck_on_a_lock_does_not_hold_the_others_back() {
    let env = env().await;
    let store = store_with_lanes(&env, 1);
    let mut holder = env.db.connect().await.expect("connect");
    let tx = holder.transaction().await.expect("begin");
    store
        .append_in(
            &tx,
            "Account",
            "locked",
            ExpectedVersion::NoStream,
            &[event(1)],
        )
        .await
        .expect("append in the open transaction");
    // The lane's append waits for the open transaction (same key).
    let stuck = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .append("Account", "locked", ExpectedVersion::NoStream, &[event(2)])
                .await
        }
    });
    let check = env.db.connect().await.expect("connect");
    let mut waited = 0;
    loop {
        let n: i64 = check
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n > 0 {
            break;
        }
        waited += 1;
        assert!(waited < 500, "the append never waited for the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let others = async {
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..5 {
                    store
                        .append(
                            "Account",
                            &format!("free-{w}"),
                            ExpectedVersion::Exact(k),
                            &[event(k)],
                        )
                        .await
                        .expect("a free append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer panicked");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), others)
        .await
        .expect("appends behind a stuck one did not finish within 20 s");
    assert!(
        !stuck.is_finished(),
        "the stuck append finished while the lock was held"
    );
    tx.commit().await.expect("commit");
    let err = tokio::time::timeout(Duration::from_secs(20), stuck)
        .await
        .expect("the stuck append did not finish after the lock was released")
        .expect("task")
        .expect_err("the stream exists now: NoStream must fail");
    assert!(err.is_conflict(), "{err}");
}

/// Transactions used by 8 writers of 20 single-event appends each.
async fn transactions_of_eight_writers(store: EventStore) -> usize {
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut txs = Vec::new();
            for k in 0..20 {
                let r = store
                    .append(
                        "Account",
                        &format!("s-{w}"),
                        ExpectedVersion::Any,
                        &[event(k)],
                    )
                    .await
                    .expect("append");
                txs.push(r.transaction_id);
            }
            txs
        }));
    }
    let mut txs = HashSet::new();
    for t in tasks {
        txs.extend(t.await.expect("writer panicked"));
    }
    txs.len()
}

/// With sharing off every append is its own transaction; with one lane,
/// eight writers commit together.
#[tokio::test]
async fn lanes_zero_turns_sharing_off_and_one_lane_shares_commits() {
    let env = env().await;
    let alone = transactions_of_eight_writers(store_with_lanes(&env, 0)).await;
    assert_eq!(alone, 160, "appends shared a transaction with sharing off");
    let shared = transactions_of_eight_writers(store_with_lanes(&env, 1)).await;
    eprintln!("160 appends of 8 writers: {shared} transactions with one lane");
    assert!(
        shared <= 80,
        "160 appends of 8 writers in {shared} transactions with one lane"
    );
}

/// Two stores (two deployments side by side) share statements over the
/// same streams, queued in opposite orders: their statements collide on
/// stream versions but never deadlock. Each append succeeds or gets a
/// conflict, never another error, and exactly the successful ones are
/// stored, streams without holes.
#[tokio::test]
async fn two_stores_sharing_statements_over_the_same_streams() {
    let env = env().await;
    let store = || {
        let mut pg = env.db.config();
        pg.application_name("two-stores");
        EventStore::connect_config(pg, StoreConfig::default().append_lanes(1)).expect("store")
    };
    let stores = [store(), store()];
    let check = env.db.connect().await.expect("connect");
    let deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()";
    let deadlocks_before: i64 = check.query_one(deadlocks, &[]).await.expect("stats").get(0);
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for w in 0..8usize {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut conflicts) = (Vec::new(), 0);
                for k in 0..80usize {
                    // Store 0 walks the streams up, store 1 down, so their
                    // statements hold them in opposite orders.
                    let i = (w + k) % 8;
                    let stream = format!("hot-{}", if s == 0 { i } else { 7 - i });
                    let e = event(k as i64);
                    let id = e.event_id();
                    match store
                        .append("Account", &stream, ExpectedVersion::Any, &[e])
                        .await
                    {
                        Ok(r) => ok.push((stream, r.stream_version, id)),
                        Err(e) if e.is_conflict() => conflicts += 1,
                        Err(e) => panic!("store {s}, writer {w}: {e}"),
                    }
                }
                (ok, conflicts)
            }));
        }
    }
    let (mut ok, mut conflicts) = (HashSet::new(), 0);
    for t in tasks {
        let (o, c) = t.await.expect("writer panicked");
        ok.extend(o);
        conflicts += c;
    }
    let rows = check
        .query(
            "SELECT aggregate_id, aggregate_version, event_id FROM events",
            &[],
        )
        .await
        .expect("read events");
    let stored: HashSet<(String, i64, uuid::Uuid)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        stored, ok,
        "stored events differ from the successful appends"
    );
    let mut streams: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (s, v, _) in &stored {
        streams.entry(s.clone()).or_default().push(*v);
    }
    for (s, mut versions) in streams {
        versions.sort();
        assert_eq!(
            versions,
            (1..=versions.len() as i64).collect::<Vec<_>>(),
            "stream {s}"
        );
    }
    // A backend reports its deadlocks to the statistics when it is idle
    // for a while or exits: close the stores' connections and wait for
    // their backends to go.
    drop(stores);
    let mut waited = 0;
    loop {
        let open: i64 = check
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'two-stores'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if open == 0 {
            break;
        }
        waited += 1;
        assert!(waited < 500, "the stores' connections did not close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .expect("clear snapshot");
    let deadlocks_after: i64 = check.query_one(deadlocks, &[]).await.expect("stats").get(0);
    eprintln!("{} appends stored, {conflicts} conflicts", ok.len());
    assert_eq!(ok.len() + conflicts, 2 * 8 * 80);
    // Shared statements take streams in one order: they never deadlock
    // (each deadlock stalls both for `deadlock_timeout`).
    assert_eq!(
        deadlocks_after, deadlocks_before,
        "shared statements deadlocked"
    );
}
