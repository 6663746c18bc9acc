//! The crash window of concurrency mode: a page read BEFORE an in-place
//! crash recovery, committed past AFTER it. The page holds asynchronous
//! commits that the crash loses; their transaction ids are handed out again
//! to new events, which sit below the page's cursor. The checkpoint's
//! compare-and-set refuses the move because the crash sentinel no longer
//! holds the epoch the page was read in, so the new events are handled.
//!
//! In-process (library `Runner`), on a private cluster. The window is
//! reached deterministically: the page fills the concurrency window, so the
//! slot reads nothing more while its handlers are held at a gate; the first
//! thing it does after the gate opens (after the crash) is the commit.
//! Without the epoch condition in the compare-and-set, the cursor moves to
//! the lost page and the new events are skipped for ever.

use crate::common::wait_until;
use crate::crash::{await_recovery, Frozen, CRASH_SETTINGS};
use projectionist::testing::TestServer;
use projectionist::{
    Concurrency, ConcurrentProjection, EventStore, Registered, Runner, RunnerConfig, Scope,
    StoreConfig, StoredEvent,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Events in one page: the window, so that the slot reads nothing more
/// while the page's handlers are held (backpressure).
const WINDOW: usize = 3;

/// Transaction ids burnt asynchronously before the page's transaction, so
/// that the ids handed out again after the crash are below the page's. (Only
/// the transaction ids matter: global positions after the crash jump ahead,
/// since a sequence logs 32 values in advance, so a new event with the
/// page's own transaction id would sort after the page's cursor.)
const BURNT: usize = 20;

/// Records every event it handles in `crash_window_seen` (how many times,
/// by event id: global positions may be handed out again too), after
/// waiting at a gate the test opens and closes.
struct Recorder {
    pool: projectionist::Pool,
    gate: watch::Receiver<bool>,
    /// Positions of the events whose handler reached the gate.
    arrived: Mutex<Vec<i64>>,
}

#[projectionist::async_trait]
impl ConcurrentProjection for Recorder {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("crash_window")
    }

    fn concurrency(&self) -> Concurrency {
        Concurrency::new(WINDOW)
    }

    async fn handle(&self, event: &StoredEvent, _scope: &Scope) -> projectionist::Result<()> {
        self.arrived
            .lock()
            .expect("arrivals")
            .push(event.global_position);
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .map_err(|e| projectionist::Error::handler_msg(format!("gate dropped: {e}")))?;
        // Through the crash: the pool's connections die with it.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let written = async {
                self.pool
                    .get()
                    .await
                    .map_err(|e| e.to_string())?
                    .execute(
                        "INSERT INTO crash_window_seen (event_id, global_position, transaction_id, times) \
                         VALUES ($1, $2, $3, 1) \
                         ON CONFLICT (event_id) DO UPDATE SET times = crash_window_seen.times + 1",
                        &[
                            &event.event_id,
                            &event.global_position,
                            &(event.transaction_id as i64),
                        ],
                    )
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            match written {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(projectionist::Error::handler_msg(format!(
                        "recording position {} failed for 60 s: {e}",
                        event.global_position
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Per event id: (global position, transaction id, times recorded).
async fn recorded(c: &tokio_postgres::Client) -> BTreeMap<uuid::Uuid, (i64, i64, i32)> {
    c.query(
        "SELECT event_id, global_position, transaction_id, times FROM crash_window_seen",
        &[],
    )
    .await
    .expect("crash_window_seen")
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect()
}

/// Per event id: (global position, transaction id), of the events stored.
async fn stored(c: &tokio_postgres::Client) -> BTreeMap<uuid::Uuid, (i64, i64)> {
    c.query(
        "SELECT event_id, global_position, transaction_id::text::int8 FROM events",
        &[],
    )
    .await
    .expect("events")
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

/// The checkpoint row, as text, for failure messages.
async fn checkpoint(c: &tokio_postgres::Client) -> String {
    c.query_one(
        "SELECT 'cursor ' || last_transaction_id::text || '/' || last_global_position || ' last event ' || \
                last_event_transaction_id::text || '/' || last_event_position || ' ' || status || \
                ' epoch ' || coalesce(epoch::text, 'none') || ' handled ' || events_handled \
         FROM projection_checkpoints WHERE projection_name = 'crash_window'",
        &[],
    )
    .await
    .map(|r| r.get(0))
    .unwrap_or_else(|e| e.to_string())
}

/// Inserts `n` events into stream `id` from version `from` in one
/// statement (one transaction) on `c`; returns their (transaction id,
/// global position).
async fn insert(c: &tokio_postgres::Client, id: &str, from: i64, n: i64) -> Vec<(i64, i64)> {
    c.query(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         SELECT 'Window', $1, v, 'Noted', '{}' FROM generate_series($2::int8, $2 + $3 - 1) AS v \
         RETURNING transaction_id::text::int8, global_position",
        &[&id, &from, &n],
    )
    .await
    .expect("insert events")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_page_read_before_a_crash_is_not_committed_past_after_it() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let server = TestServer::start_private_with(CRASH_SETTINGS)
        .await
        .expect("private server");
    let db = server.create_database().await.expect("database");
    projectionist::migrate(&db.config(), "public")
        .await
        .expect("migrate");
    let store = EventStore::connect_config(db.config(), StoreConfig::default()).expect("store");
    let c = db.connect().await.expect("connect");
    c.batch_execute(
        "CREATE TABLE crash_window_seen (event_id uuid PRIMARY KEY, global_position int8 NOT NULL, \
                                         transaction_id int8 NOT NULL, times int4 NOT NULL)",
    )
    .await
    .expect("recorder table");
    let (gate, gate_rx) = watch::channel(true);
    let recorder = Arc::new(Recorder {
        pool: store.pool().clone(),
        gate: gate_rx,
        arrived: Mutex::default(),
    });
    let registered = Registered::concurrent(recorder.clone()).expect("register");
    let runner = Arc::new(
        Runner::new(
            store.clone(),
            RunnerConfig::default().max_backoff(Duration::from_millis(500)),
        )
        .with_projections(&[registered])
        .expect("runner"),
    );
    let (stop, mut stopped) = watch::channel(false);
    let running = tokio::spawn({
        let runner = runner.clone();
        async move {
            runner
                .run_until(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }
    });

    // 1. Durable events, handled and checkpointed; a synchronous commit
    // that writes WAL then makes all of it durable (the batch pool commits
    // asynchronously).
    let durable = insert(&c, "durable", 1, 3).await;
    let last_durable = durable.last().expect("durable events").1;
    wait_until(
        Duration::from_secs(30),
        "the durable events handled and checkpointed",
        || async {
            c.query_one(
                "SELECT last_global_position FROM projection_checkpoints WHERE projection_name = 'crash_window'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) >= last_durable)
        },
    )
    .await;
    c.batch_execute("CREATE TABLE durable_marker ()")
        .await
        .expect("durable marker");
    let started: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await
        .expect("start time")
        .get(0);
    // Handlers wait from now on.
    gate.send_replace(false);

    // 2. Freeze the WAL writer and the background writer: nothing writes
    // the WAL of the asynchronous commits below before the crash.
    let frozen = Frozen::wal_writers(&server, &c).await;

    // 3. Asynchronous commits: transactions that only take an id, then the
    // page's events, in one transaction above them.
    let writer = db.connect().await.expect("connect");
    writer
        .batch_execute("SET synchronous_commit = off")
        .await
        .expect("async commits");
    let mut burnt = Vec::new();
    for _ in 0..BURNT {
        burnt.push(
            writer
                .query_one("SELECT pg_current_xact_id()::text::int8", &[])
                .await
                .expect("burn an id")
                .get::<_, i64>(0),
        );
    }
    let lost = insert(&writer, "lost", 1, WINDOW as i64).await;
    let lost_xid = lost[0].0;
    let async_end: String = writer
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("insert lsn")
        .get(0);

    // 4. The engine reads the page (the window is full: it reads nothing
    // more) and its first handler waits at the gate.
    wait_until(
        Duration::from_secs(30),
        "the page of asynchronously committed events fetched and held",
        || async {
            recorder
                .arrived
                .lock()
                .expect("arrivals")
                .contains(&lost[0].1)
        },
    )
    .await;
    Frozen::assert_unwritten(&c, &async_end).await;

    // 5. The crash: SIGKILL a client backend (then the two frozen
    // processes, which cannot answer the postmaster's SIGQUIT).
    frozen.crash(&c).await;
    drop(writer);
    let c = await_recovery(&db, c).await;
    let started_after: chrono::DateTime<chrono::Utc> = c
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await
        .expect("start time")
        .get(0);
    assert_eq!(started_after, started, "crash recovery in place");
    let lost_left: i64 = c
        .query_one(
            "SELECT count(*) FROM events WHERE aggregate_id = 'lost'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        lost_left, 0,
        "test precondition: the asynchronously committed events were lost"
    );

    // 6. New events, each in a transaction of its own, with transaction ids
    // handed out again: below the page's, which the slot would commit past.
    let mut after = Vec::new();
    for v in 1..=3 {
        after.extend(insert(&c, "after", v, 1).await);
    }
    for (xid, position) in &after {
        assert!(
            xid < &lost_xid,
            "test precondition: the event at {position} appended after the crash has transaction \
             id {xid}, not below the lost page's {lost_xid} (burnt {burnt:?}): the ids were not \
             handed out again"
        );
    }

    // 7. Release the handlers: the slot must not commit past the lost page.
    gate.send_replace(true);
    let want = stored(&c).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let seen = recorded(&c).await;
        if want.keys().all(|id| seen.contains_key(id)) {
            break seen;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want
                .iter()
                .filter(|(id, _)| !seen.contains_key(id))
                .map(|(_, (position, xid))| format!("{position} (xid {xid})"))
                .collect();
            panic!(
                "events stored after the crash recovery were never handled within 30 s: {missing:?} \
                 (appended after the crash {after:?}, lost page {lost:?}); checkpoint: {}",
                checkpoint(&c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Every stored event once; the only other rows are the lost events,
    // handled once after the crash (a concurrent handler's writes are its
    // own, outside the checkpoint's transaction).
    for (id, (position, xid)) in &want {
        assert_eq!(
            seen[id].2, 1,
            "the event at {position} (xid {xid}) was handled {} times",
            seen[id].2
        );
    }
    let lost_positions: Vec<i64> = lost.iter().map(|l| l.1).collect();
    for (id, (position, xid, times)) in &seen {
        if !want.contains_key(id) {
            assert!(
                *xid == lost_xid && lost_positions.contains(position) && *times == 1,
                "an event neither stored nor lost was recorded: {position} (xid {xid}) {times} times"
            );
        }
    }
    // The slot runs on, its cursor past the new events.
    let last_after = after.last().expect("events after the crash");
    wait_until(
        Duration::from_secs(30),
        "the checkpoint past the events appended after the crash",
        || async {
            c.query_one(
                "SELECT last_transaction_id::text::int8, last_global_position, status \
                 FROM projection_checkpoints WHERE projection_name = 'crash_window'",
                &[],
            )
            .await
            .is_ok_and(|r| {
                (r.get::<_, i64>(0), r.get::<_, i64>(1)) >= *last_after
                    && r.get::<_, String>(2) == "running"
            })
        },
    )
    .await;
    stop.send_replace(true);
    running
        .await
        .expect("runner task")
        .expect("runner stops cleanly");
}
