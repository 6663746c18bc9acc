//! Static partitions read only their own events: n partitions together
//! fetch about one log's worth of index rows, not n logs.

use crate::common::wait_until;
use projectionist::{Runner, RunnerConfig, StoredEvent};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Noop {
    calls: AtomicU64,
    name: &'static str,
}

impl Noop {
    fn new() -> Self {
        Self::named("noop")
    }

    fn named(name: &'static str) -> Self {
        Noop {
            calls: AtomicU64::new(0),
            name,
        }
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for Noop {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(self.name)
    }

    async fn handle(
        &self,
        _: &StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Index tuples read from the `events` table's indexes so far, as the
/// cumulative statistics show them once every other session ended.
async fn index_rows_read(c: &tokio_postgres::Client) -> i64 {
    wait_until(
        Duration::from_secs(30),
        "the runners' sessions to end (they flush their statistics on exit)",
        || async {
            let others: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            others == 0
        },
    )
    .await;
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    c.query_one(
        "SELECT coalesce(sum(idx_tup_read), 0)::int8 FROM pg_stat_user_indexes WHERE relname = 'events'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Catches up partitions 0 to 3 of 4, one after the other.
async fn run_four_partitions(store: &projectionist::EventStore, noop: &Arc<Noop>) {
    for partition in 0..4 {
        let runner = Runner::new(
            store.clone(),
            RunnerConfig::default().partition(partition, 4).unwrap(),
        )
        .with_projection(noop.clone())
        .unwrap();
        runner.run_once().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_partitions_together_read_the_log_about_once() {
    const EVENTS: i64 = 100_000;
    // A server of its own: see common::private_env.
    let (_server, env) = crate::common::private_env().await;
    let c = env.client().await;
    c.batch_execute(&format!(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         SELECT 'Thing', 't' || (i % 5000), i / 5000 + 1, 'Counted', '{{}}' \
         FROM generate_series(0, {EVENTS} - 1) i"
    ))
    .await
    .unwrap();
    c.batch_execute("ANALYZE events").await.unwrap();
    let noop = Arc::new(Noop::new());
    let store = projectionist::EventStore::connect_config(
        env.db.config(),
        projectionist::StoreConfig::default(),
    )
    .unwrap();
    // The index is built once, before the partitions read.
    run_four_partitions(&store, &noop).await;
    assert_eq!(noop.calls.load(Ordering::Relaxed) as i64, EVENTS);
    let built: bool = c
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('public.events_partitions_4_idx')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        built,
        "the partition index for 4 partitions exists and is valid"
    );
    drop(store);
    let before = index_rows_read(&c).await;

    // Again from the start: the reads alone.
    c.batch_execute("DELETE FROM projection_checkpoints")
        .await
        .unwrap();
    let store = projectionist::EventStore::connect_config(
        env.db.config(),
        projectionist::StoreConfig::default(),
    )
    .unwrap();
    run_four_partitions(&store, &noop).await;
    drop(store);
    let read = index_rows_read(&c).await - before;
    assert_eq!(noop.calls.load(Ordering::Relaxed) as i64, 2 * EVENTS);
    println!(
        "4 partitions read {read} index rows for {EVENTS} events ({:.2}x)",
        read as f64 / EVENTS as f64
    );
    assert!(
        read <= EVENTS * 12 / 10,
        "4 partitions read {read} index rows for a log of {EVENTS} events ({:.2}x); at most 1.2x expected",
        read as f64 / EVENTS as f64
    );
}

/// Partitions starting together build their index once and all run: the
/// ones that wait for the builder must not hold a snapshot meanwhile, since
/// `CREATE INDEX CONCURRENTLY` waits for every older snapshot before it
/// finishes (a waiter blocked in `pg_advisory_lock` deadlocked with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_starting_together_build_their_index_without_a_deadlock() {
    const EVENTS: i64 = 20_000;
    const TOTAL: i32 = 6;
    let (_server, env) = crate::common::private_env().await;
    let c = env.client().await;
    c.batch_execute(&format!(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         SELECT 'Thing', 't' || (i % 500), i / 500 + 1, 'Counted', '{{}}' \
         FROM generate_series(0, {EVENTS} - 1) i"
    ))
    .await
    .unwrap();
    let noop = Arc::new(Noop::new());
    let runners: Vec<Runner> = (0..TOTAL)
        .map(|k| {
            Runner::new(
                env.store.clone(),
                RunnerConfig::default().partition(k, TOTAL).unwrap(),
            )
            .with_projection(noop.clone())
            .unwrap()
        })
        .collect();
    let results = futures_util::future::join_all(runners.iter().map(|r| r.run_once())).await;
    for (k, r) in results.into_iter().enumerate() {
        if let Err(e) = r {
            panic!("partition {k} of {TOTAL} failed to start: {e}");
        }
    }
    assert_eq!(noop.calls.load(Ordering::Relaxed) as i64, EVENTS);
    let valid: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_index WHERE indisvalid \
                 AND indexrelid = to_regclass('public.events_partitions_{TOTAL}_idx')"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(valid, 1, "the partition index exists and is valid");
}

/// Processes starting together with *different* partition counts build
/// different indexes on the same table. Two `CREATE INDEX CONCURRENTLY` on
/// one table wait for each other's transactions (an expression index is
/// never skipped in that wait) and PostgreSQL aborts one with "deadlock
/// detected"; the builds must take turns, whatever the partition count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_partition_counts_starting_together_build_their_indexes_in_turn() {
    const EVENTS: i64 = 20_000;
    const NAMES: [&str; 5] = ["by_2", "by_3", "by_4", "by_5", "by_6"];
    let (_server, env) = crate::common::private_env().await;
    let c = env.client().await;
    c.batch_execute(&format!(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         SELECT 'Thing', 't' || (i % 500), i / 500 + 1, 'Counted', '{{}}' \
         FROM generate_series(0, {EVENTS} - 1) i"
    ))
    .await
    .unwrap();
    let runners: Vec<(i32, Arc<Noop>, Runner)> = NAMES
        .iter()
        .zip(2..)
        .map(|(name, total)| {
            let noop = Arc::new(Noop::named(name));
            let runner = Runner::new(
                env.store.clone(),
                RunnerConfig::default().partition(0, total).unwrap(),
            )
            .with_projection(noop.clone())
            .unwrap();
            (total, noop, runner)
        })
        .collect();
    let results =
        futures_util::future::join_all(runners.iter().map(|(_, _, r)| r.run_once())).await;
    for ((total, noop, _), r) in runners.iter().zip(results) {
        if let Err(e) = r {
            panic!("partition 0 of {total} failed to start: {e}");
        }
        assert!(
            noop.calls.load(Ordering::Relaxed) > 0,
            "partition 0 of {total} handled nothing"
        );
    }
    let valid: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_index WHERE indisvalid \
             AND indexrelid::regclass::text LIKE 'events_partitions_%_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        valid,
        NAMES.len() as i64,
        "one valid index per partition count"
    );
}
