//! The event store: appends, conflicts, stream reads, gap-safe reads,
//! migrations.

use crate::common::{env, read_all_events};
use projectionist::{Cursor, ExpectedVersion, Metadata, NewEvent, StoredEvent};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Deposited {
    amount: i64,
    note: String,
}

fn deposit(amount: i64) -> NewEvent {
    NewEvent::new(
        "MoneyDeposited",
        &Deposited {
            amount,
            note: format!("deposit of {amount}"),
        },
    )
    .unwrap()
}

#[tokio::test]
async fn append_and_read_round_trip_with_typed_payloads_and_metadata() {
    let env = env().await;
    let mut md = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cmd-7".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        ..Metadata::default()
    };
    md.extra.insert("user".into(), serde_json::json!("alice"));
    let events = vec![
        deposit(100).with_metadata(&md),
        deposit(250).with_event_version(2),
        deposit(-5),
    ];
    let ids: Vec<_> = events.iter().map(|e| e.event_id()).collect();
    let r = env
        .store
        .append("Account", "a-1", ExpectedVersion::NoStream, &events)
        .await
        .unwrap();
    assert_eq!(r.stream_version, 3);
    assert_eq!(r.last_position - r.first_position, 2);

    let stream = env
        .store
        .read_stream("Account", "a-1", 1, 100)
        .await
        .unwrap();
    assert_eq!(stream.len(), 3);
    assert_eq!(
        stream
            .iter()
            .map(|e| e.aggregate_version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(stream.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
    assert_eq!(stream[0].decode::<Deposited>().unwrap().amount, 100);
    assert_eq!(stream[1].event_version, 2);
    assert_eq!(stream[0].metadata().unwrap(), md);
    assert_eq!(stream[1].metadata().unwrap(), Metadata::default());
    assert!(stream.iter().all(|e| e.transaction_id == r.transaction_id));
    // From a version on.
    let tail = env
        .store
        .read_stream("Account", "a-1", 3, 100)
        .await
        .unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].decode::<Deposited>().unwrap().amount, -5);

    // Decoding into the wrong type names type, position and serde's message.
    #[derive(Deserialize, Debug)]
    struct Opened {
        #[allow(dead_code)]
        owner: String,
    }
    let e = stream[0].decode::<Opened>().unwrap_err();
    let msg = e.to_string();
    assert!(e.is_payload());
    assert!(
        msg.contains("MoneyDeposited")
            && msg.contains(&format!("global position {}", stream[0].global_position))
    );
    assert!(msg.contains("missing field `owner`"), "{msg}");

    // Appending at the right version continues the stream.
    let r2 = env
        .store
        .append("Account", "a-1", ExpectedVersion::Exact(3), &[deposit(1)])
        .await
        .unwrap();
    assert_eq!(r2.stream_version, 4);
    let all = read_all_events(&env.store, 4).await;
    assert_eq!(all.len(), 4);
}

#[tokio::test]
async fn version_conflicts_and_duplicate_ids_are_distinct_errors() {
    let env = env().await;
    let first = deposit(1);
    env.store
        .append(
            "Account",
            "a",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&first),
        )
        .await
        .unwrap();
    let e = env
        .store
        .append("Account", "a", ExpectedVersion::NoStream, &[deposit(2)])
        .await
        .unwrap_err();
    assert!(e.is_conflict() && e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("expected no stream"), "{e}");
    let e = env
        .store
        .append("Account", "a", ExpectedVersion::Exact(5), &[deposit(2)])
        .await
        .unwrap_err();
    assert!(e.is_conflict());
    assert!(
        e.to_string()
            .contains("expected version 5, but the stream is at version 1"),
        "{e}"
    );
    // Same event id again, even on another stream.
    let e = env
        .store
        .append(
            "Account",
            "b",
            ExpectedVersion::Any,
            std::slice::from_ref(&first),
        )
        .await
        .unwrap_err();
    assert!(
        e.is_duplicate_event() && !e.is_conflict() && !e.is_retryable(),
        "{e:?}"
    );
    assert!(e.to_string().contains("duplicate event id"), "{e}");
    // Nothing of the failed appends was written.
    assert_eq!(env.scalar_i64("SELECT count(*) FROM events").await, 1);
}

#[tokio::test]
async fn eight_concurrent_writers_exactly_one_wins_each_version() {
    let env = env().await;
    const WRITERS: usize = 8;
    const ROUNDS: i64 = 25;
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = env.store.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut conflicts = 0;
            for round in 0..ROUNDS {
                barrier.wait().await;
                let expected = if round == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(round)
                };
                match store
                    .append("Account", "hot", expected, &[deposit(w as i64)])
                    .await
                {
                    Ok(r) => wins.push(r.stream_version),
                    Err(e) if e.is_conflict() => conflicts += 1,
                    Err(e) => panic!("writer {w}: unexpected error {e:?}"),
                }
                // Every writer finishes the round before the next starts.
                barrier.wait().await;
            }
            (wins, conflicts)
        }));
    }
    let mut all_wins = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (w, c) = t.await.unwrap();
        all_wins.extend(w);
        conflicts += c;
    }
    all_wins.sort();
    assert_eq!(
        all_wins,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "one winner per version"
    );
    assert_eq!(conflicts, (WRITERS as i64 - 1) * ROUNDS);
    let stream = env
        .store
        .read_stream("Account", "hot", 1, 1000)
        .await
        .unwrap();
    let versions: Vec<i64> = stream.iter().map(|e| e.aggregate_version).collect();
    assert_eq!(versions, (1..=ROUNDS).collect::<Vec<_>>(), "no holes");
}

/// The gap scenario of DESIGN.md §2.1. Transaction A appends first (lower
/// global position) and stays open; B appends later and commits first.
///
/// A plain `global_position > cursor` reader would fail this test: while A
/// is open it would return B's event (B's position is visible) and move its
/// cursor to B's position; once A commits, A's event sits *below* that
/// cursor and is never read — it is skipped forever. The gap-safe read
/// instead stops below A's transaction until A has finished.
#[tokio::test]
async fn gap_safe_read_never_steps_over_an_open_transaction() {
    let env = env().await;
    env.store
        .append(
            "Account",
            "before",
            ExpectedVersion::NoStream,
            &[deposit(1)],
        )
        .await
        .unwrap();
    // Start reading after the event that was committed before A and B.
    let start = read_all_events(&env.store, 1).await[0].cursor();

    let mut a_client = env.client().await;
    let a_tx = a_client.transaction().await.unwrap();
    let a = env
        .store
        .append_in(
            &a_tx,
            "Account",
            "a",
            ExpectedVersion::NoStream,
            &[deposit(10)],
        )
        .await
        .unwrap();
    let b = env
        .store
        .append("Account", "b", ExpectedVersion::NoStream, &[deposit(20)])
        .await
        .unwrap();
    assert!(
        b.first_position > a.first_position,
        "B was inserted after A"
    );

    // While A is open: neither A's nor B's event, nothing past A.
    let page = env.store.read_all(start, 100).await.unwrap();
    let positions: Vec<i64> = page.events.iter().map(|e| e.global_position).collect();
    assert!(
        !positions.contains(&b.first_position),
        "B must not be read while A is open"
    );
    assert!(!positions.contains(&a.first_position));
    assert!(
        page.next_cursor < Cursor::new(a.transaction_id, a.first_position),
        "the cursor {} must stay below A's transaction {}",
        page.next_cursor,
        a.transaction_id
    );
    assert!(page.watermark <= a.transaction_id);

    a_tx.commit().await.unwrap();

    // Resumed from the returned cursor: A's event, then B's, nothing skipped.
    // (Other tests' transactions on the same server may hold the watermark
    // back briefly, so read until both have arrived.)
    let mut cursor = page.next_cursor;
    let mut seen: Vec<StoredEvent> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "A's and B's events never became readable"
        );
        let p = env.store.read_all(cursor, 100).await.unwrap();
        seen.extend(p.events);
        cursor = p.next_cursor;
        if seen.len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let after: Vec<i64> = seen.iter().map(|e| e.global_position).collect();
    assert_eq!(after, vec![a.first_position, b.first_position]);
}

/// DESIGN.md §2.2: a transaction that took its transaction id before another
/// transaction appended to the same stream may not append after it.
#[tokio::test]
async fn per_stream_order_rule_refuses_an_older_transaction() {
    let env = env().await;
    let mut old_client = env.client().await;
    let old_tx = old_client.transaction().await.unwrap();
    // The old transaction takes its id first (e.g. it wrote something else).
    old_tx
        .query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    // A newer transaction appends version 1 and commits.
    env.store
        .append("Account", "s", ExpectedVersion::NoStream, &[deposit(1)])
        .await
        .unwrap();
    // The old transaction sees version 1 and tries to append version 2: a
    // reader ordered by transaction id would deliver it before version 1.
    for expected in [ExpectedVersion::Exact(1), ExpectedVersion::Any] {
        let e = env
            .store
            .append_in(&old_tx, "Account", "s", expected, &[deposit(2)])
            .await
            .unwrap_err();
        assert!(e.is_conflict() && e.is_retryable(), "{e:?}");
        assert!(e.to_string().contains("newer than this one"), "{e}");
    }
    old_tx.rollback().await.unwrap();
    // A fresh transaction may append.
    let r = env
        .store
        .append("Account", "s", ExpectedVersion::Exact(1), &[deposit(2)])
        .await
        .unwrap();
    assert_eq!(r.stream_version, 2);
}

#[tokio::test]
async fn raw_sql_inserts_are_read_like_any_other_event() {
    let env = env().await;
    let c = env.client().await;
    c.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         VALUES ('Account', 'raw-1', 1, 'AccountOpened', '{\"owner\": \"bob\"}')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO events (event_id, aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         VALUES ('0194b3a0-0000-7000-8000-000000000001', 'Account', 'raw-1', 2, 'MoneyDeposited', '{\"amount\": 5, \"note\": \"x\"}')",
        &[],
    )
    .await
    .unwrap();
    let stream = env
        .store
        .read_stream("Account", "raw-1", 1, 10)
        .await
        .unwrap();
    assert_eq!(stream.len(), 2);
    assert_eq!(stream[0].event_version, 1);
    assert_eq!(stream[0].metadata().unwrap(), Metadata::default());
    assert_eq!(stream[1].decode::<Deposited>().unwrap().amount, 5);
    assert_eq!(
        stream[1].event_id.to_string(),
        "0194b3a0-0000-7000-8000-000000000001"
    );
    assert_eq!(read_all_events(&env.store, 2).await.len(), 2);
    // And the library appends after them at the right version.
    let r = env
        .store
        .append("Account", "raw-1", ExpectedVersion::Exact(2), &[deposit(1)])
        .await
        .unwrap();
    assert_eq!(r.stream_version, 3);
}

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    let db = projectionist::testing::TestDatabase::create()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let config = db.config();
        tasks.push(tokio::spawn(async move {
            projectionist::migrate(&config, "public").await
        }));
    }
    let mut applied = Vec::new();
    for t in tasks {
        applied.extend(t.await.unwrap().unwrap().applied);
    }
    assert_eq!(
        applied,
        projectionist::embedded_migrations(),
        "each migration applied exactly once"
    );
    let c = db.connect().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM projectionist_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, projectionist::embedded_migrations().len());
    // Running it again is a no-op.
    let again = projectionist::migrate(&db.config(), "public")
        .await
        .unwrap();
    assert!(again.applied.is_empty());
}

#[tokio::test]
async fn migrations_into_another_schema_and_bad_schema_names() {
    let db = projectionist::testing::TestDatabase::create()
        .await
        .unwrap();
    projectionist::migrate(&db.config(), "es").await.unwrap();
    let store = projectionist::EventStore::connect_config(
        db.config(),
        projectionist::StoreConfig::default().schema("es").unwrap(),
    )
    .unwrap();
    store
        .append("Account", "x", ExpectedVersion::NoStream, &[deposit(3)])
        .await
        .unwrap();
    let c = db.connect().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM es.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let public_events: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'events'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(public_events, 0);

    let e = projectionist::migrate(&db.config(), "x\"; DROP TABLE es.events; --")
        .await
        .unwrap_err();
    assert!(
        e.is_config() && e.to_string().contains("plain identifier"),
        "{e}"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM es.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn nul_bytes_and_large_payloads() {
    let env = env().await;
    // A NUL byte in a text field is refused cleanly.
    let e = env
        .store
        .append("Account", "nul\0id", ExpectedVersion::Any, &[deposit(1)])
        .await
        .unwrap_err();
    assert!(e.is_payload(), "{e:?}");
    assert!(e.to_string().contains("NUL"), "{e}");
    // So is a \u0000 escape in the JSON payload (jsonb cannot store it).
    let e = env
        .store
        .append(
            "Account",
            "nul",
            ExpectedVersion::Any,
            &[NewEvent::new(
                "MoneyDeposited",
                &Deposited {
                    amount: 1,
                    note: "a\0b".into(),
                },
            )
            .unwrap()],
        )
        .await
        .unwrap_err();
    assert!(e.is_payload(), "{e:?}");
    assert_eq!(env.scalar_i64("SELECT count(*) FROM events").await, 0);
    // A payload of several megabytes round-trips.
    let big = Deposited {
        amount: 7,
        note: "x".repeat(5 * 1024 * 1024),
    };
    env.store
        .append(
            "Account",
            "big",
            ExpectedVersion::NoStream,
            &[NewEvent::new("MoneyDeposited", &big).unwrap()],
        )
        .await
        .unwrap();
    let back = env.store.read_stream("Account", "big", 1, 1).await.unwrap();
    assert_eq!(back[0].decode::<Deposited>().unwrap(), big);
}

/// After-commit notifications of a burst of appends are shared (one per
/// `notify_interval`), and the last one always names the newest append's
/// transaction: a listener never misses the end of a burst.
#[tokio::test]
async fn a_burst_of_appends_shares_notifications_and_the_last_one_arrives() {
    burst_of_appends(
        projectionist::StoreConfig::default().notify_interval(Duration::from_millis(50)),
        "burst_test",
        1,
    )
    .await;
}

/// The same while the quiet time grows during the burst (a short start, a
/// long maximum; appends of two events, so every notification announces
/// several): the burst's end is still announced, once the grown wait is
/// over.
#[tokio::test]
async fn a_burst_announces_its_end_while_the_quiet_time_grows() {
    burst_of_appends(
        projectionist::StoreConfig::default()
            .notify_interval(Duration::from_millis(1))
            .notify_max_interval(Duration::from_millis(300)),
        "burst_grow_test",
        2,
    )
    .await;
}

/// Appends a burst (appends of `events` events) through a store notifying
/// `channel` and checks what a listener hears: fewer notifications than
/// appends, each naming a newer transaction, the last naming the last
/// append's.
async fn burst_of_appends(config: projectionist::StoreConfig, channel: &str, events: i64) {
    use futures_util::StreamExt;
    let env = env().await;
    let store = projectionist::EventStore::connect_config(
        env.db.config(),
        config.notify_channel(Some(channel)).unwrap(),
    )
    .unwrap();
    let (listener, mut connection) = env
        .db
        .config()
        .connect(tokio_postgres::NoTls)
        .await
        .expect("LISTEN connection");
    let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<u64>();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().parse().expect("a transaction id"));
            }
        }
    });
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    const APPENDS: usize = 40;
    let mut last = 0;
    for i in 0..APPENDS {
        let r = store
            .append(
                "Account",
                &format!("{channel}-{}", i % 4),
                ExpectedVersion::Any,
                &(0..events)
                    .map(|k| deposit(i as i64 * events + k))
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
        last = r.transaction_id;
    }
    let mut payloads = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(p) = heard.recv().await {
            payloads.push(p);
            if p == last {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no notification named the last append ({last}): {payloads:?}"));
    assert!(
        payloads.windows(2).all(|w| w[0] < w[1]),
        "each notification names a newer transaction: {payloads:?}"
    );
    assert!(
        payloads.len() < APPENDS,
        "{} notifications for {APPENDS} appends: bursts are not shared",
        payloads.len()
    );
}

/// A single event has its own statement (scalar parameters), small appends
/// report their rows, large ones a summary row (speed choices inside the
/// store): all report the same positions, version and
/// transaction, all refuse a wrong expected version without writing, in
/// autocommit and in a caller's transaction.
#[tokio::test]
async fn appends_of_every_size_report_what_they_wrote() {
    let env = env().await;
    for (i, n) in [1usize, 2, 10, 32, 33, 100].into_iter().enumerate() {
        let stream = format!("sized-{n}");
        let batch: Vec<NewEvent> = (0..n).map(|k| deposit(k as i64)).collect();
        let r = env
            .store
            .append("Account", &stream, ExpectedVersion::NoStream, &batch)
            .await
            .unwrap();
        let e = env
            .store
            .append(
                "Account",
                &stream,
                ExpectedVersion::Exact(n as i64 + 1),
                &batch[..1],
            )
            .await
            .unwrap_err();
        assert!(e.is_conflict(), "{n} events: {e:?}");
        let mut c = env.client().await;
        let tx = c.transaction().await.unwrap();
        let more: Vec<NewEvent> = (0..n).map(|k| deposit(1000 + k as i64)).collect();
        // Twice with the same expected version: the second time it is
        // stale (below the head, which is then 2n) and refused without
        // writing, and the caller's transaction stays usable.
        let mut results = Vec::new();
        for events in [&more, &batch] {
            results.push(
                env.store
                    .append_in(
                        &tx,
                        "Account",
                        &stream,
                        ExpectedVersion::Exact(n as i64),
                        events,
                    )
                    .await,
            );
        }
        let e = results.pop().unwrap().unwrap_err();
        let r2 = results.pop().unwrap().unwrap();
        assert!(e.is_conflict(), "{n} events, in a transaction: {e:?}");
        tx.commit().await.unwrap();
        let e = env
            .store
            .append("Account", &stream, ExpectedVersion::Exact(n as i64), &batch)
            .await
            .unwrap_err();
        assert!(e.is_conflict(), "{n} events, stale version: {e:?}");
        assert!(
            e.to_string().contains(&format!(
                "expected version {n}, but the stream is at version {}",
                2 * n
            )),
            "{e}"
        );
        for (r, from) in [(r, 1), (r2, n as i64 + 1)] {
            let rows = c
                .query(
                    "SELECT global_position, aggregate_version, transaction_id::text::int8 FROM events \
                     WHERE aggregate_id = $1 AND aggregate_version >= $2 AND aggregate_version < $3 \
                     ORDER BY aggregate_version",
                    &[&stream, &from, &(from + n as i64)],
                )
                .await
                .unwrap();
            assert_eq!(rows.len(), n, "{n} events, case {i}");
            let positions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            assert_eq!(r.first_position, positions[0], "{n} events");
            assert_eq!(r.last_position, positions[n - 1], "{n} events");
            assert_eq!(r.stream_version, from + n as i64 - 1, "{n} events");
            assert!(
                rows.iter()
                    .all(|row| row.get::<_, i64>(2) as u64 == r.transaction_id),
                "{n} events: one transaction, the one reported"
            );
        }
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM events").await,
        2 * (1 + 2 + 10 + 32 + 33 + 100)
    );
}

/// Dropping the last clone of a store closes its connections, also after
/// appends started the after-commit notifier (which used to keep the pool
/// alive until it next looked, up to 5 s later, so a database dropped
/// meanwhile logged connection errors).
#[tokio::test]
async fn dropping_the_store_closes_its_connections() {
    let env = env().await;
    let check = env.db.connect().await.expect("connect");
    let ours = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                AND pid <> pg_backend_pid() AND application_name = 'dropped-store'";
    let mut pg = env.db.config();
    pg.application_name("dropped-store");
    let store =
        projectionist::EventStore::connect_config(pg, projectionist::StoreConfig::default())
            .expect("store");
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..10 {
                store
                    .append(
                        "Account",
                        &format!("d-{w}"),
                        ExpectedVersion::Exact(k),
                        &[deposit(k)],
                    )
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer panicked");
    }
    let open: i64 = check.query_one(ours, &[]).await.expect("count").get(0);
    assert!(open > 0, "the store had no connection open");
    drop(store);
    let started = std::time::Instant::now();
    loop {
        let open: i64 = check.query_one(ours, &[]).await.expect("count").get(0);
        if open == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{open} connections of a dropped store still open after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A lone writer's appends all run on one connection of the store's pool:
/// the after-commit notifications have a connection of their own. (On the
/// store's pool, each notification took the connection the writer had just
/// returned, so the writer's next append ran on another one, and another
/// server process, after every notification.)
#[tokio::test]
async fn notifications_do_not_take_the_writers_connection() {
    let env = env().await;
    let store = projectionist::EventStore::connect_config(
        env.db.config(),
        projectionist::StoreConfig::default().notify_interval(Duration::ZERO),
    )
    .expect("store");
    for k in 0..200 {
        store
            .append("Account", "lone", ExpectedVersion::Exact(k), &[deposit(k)])
            .await
            .expect("append");
    }
    let status = store.pool().status();
    assert_eq!(
        status.size, 1,
        "a lone writer's appends opened {} connections of the store's pool",
        status.size
    );
}
