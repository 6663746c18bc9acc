//! The projection engine: catch-up, restarts, partitions, filters,
//! dispatchers, concurrent writers.

use crate::common::{env, wait_until, Env};
use projectionist::{
    DispatcherKind, ExpectedVersion, Filter, NewEvent, Registered, Runner, RunnerConfig,
    StoredEvent,
};
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A projection that keeps `(aggregate_id, events, sum of amount)` in its
/// own table and counts handler calls.
struct Tally {
    name: String,
    filter: Filter,
    calls: Arc<AtomicU64>,
    seen: Option<mpsc::UnboundedSender<(i64, Instant)>>,
    pipelined: bool,
}

impl Tally {
    fn new(name: &str) -> Tally {
        Tally {
            name: name.to_owned(),
            filter: Filter::all(),
            calls: Arc::new(AtomicU64::new(0)),
            seen: None,
            pipelined: false,
        }
    }

    fn table(&self) -> String {
        format!("tally_{}", self.name)
    }

    async fn create_table(&self, env: &Env) {
        env.client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (aggregate_id text PRIMARY KEY, n bigint NOT NULL, total bigint NOT NULL)",
                self.table()
            ))
            .await
            .unwrap();
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for Tally {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
            .filter(self.filter.clone())
            .pipelined(self.pipelined)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(seen) = &self.seen {
            let _ = seen.send((event.global_position, Instant::now()));
        }
        let amount = event
            .payload_value()?
            .get("amount")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let stmt = tx
            .prepare_cached(&format!(
                "INSERT INTO {} (aggregate_id, n, total) VALUES ($1, 1, $2) \
                 ON CONFLICT (aggregate_id) DO UPDATE SET n = {t}.n + 1, total = {t}.total + excluded.total",
                self.table(),
                t = self.table()
            ))
            .await?;
        tx.execute(&stmt, &[&event.aggregate_id, &amount]).await?;
        Ok(())
    }
}

fn amount_event(amount: i64) -> NewEvent {
    NewEvent::new("MoneyDeposited", &serde_json::json!({ "amount": amount })).unwrap()
}

/// Appends `n` events over `streams` accounts, in batches of 10.
async fn seed(env: &Env, n: usize, streams: usize) {
    let mut versions = vec![0i64; streams];
    let mut written = 0;
    let mut i = 0;
    while written < n {
        let s = i % streams;
        let k = 10.min(n - written);
        let batch: Vec<NewEvent> = (0..k)
            .map(|j| amount_event((written + j) as i64 % 97))
            .collect();
        let r = env
            .store
            .append("Account", &format!("acc-{s}"), ExpectedVersion::Any, &batch)
            .await
            .unwrap();
        versions[s] = r.stream_version;
        written += k;
        i += 1;
    }
}

/// `(aggregates, events, sum of amounts)` in the event log.
async fn expected(env: &Env) -> (i64, i64, i64) {
    let c = env.client().await;
    let r = c
        .query_one(
            "SELECT count(DISTINCT aggregate_id), count(*), coalesce(sum((payload->>'amount')::bigint), 0)::int8 FROM events",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

async fn read_model(env: &Env, table: &str) -> (i64, i64, i64) {
    let c = env.client().await;
    let r = c
        .query_one(
            &format!("SELECT count(*), coalesce(sum(n), 0)::int8, coalesce(sum(total), 0)::int8 FROM {table}"),
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// A runner on its own task, stopped by the returned sender.
fn spawn_runner(
    runner: Runner,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<projectionist::Result<()>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        runner
            .run_until(async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, handle)
}

#[tokio::test]
async fn catch_up_of_10000_events_builds_the_exact_read_model() {
    let env = env().await;
    seed(&env, 10_000, 50).await;
    let tally = Arc::new(Tally::new("catchup"));
    tally.create_table(&env).await;
    let calls = tally.calls.clone();
    let runner = Runner::new(
        env.store.clone(),
        RunnerConfig::default().batch_size(500).unwrap(),
    )
    .with_projection(tally.clone())
    .unwrap();
    runner.run_once().await.unwrap();
    // Events of transactions still open elsewhere on the server may not be
    // readable yet; run again until everything has been handled.
    wait_until(Duration::from_secs(30), "read model complete", || async {
        runner.run_once().await.unwrap();
        read_model(&env, "tally_catchup").await.1 == 10_000
    })
    .await;
    assert_eq!(
        read_model(&env, "tally_catchup").await,
        expected(&env).await
    );
    assert_eq!(
        calls.load(Ordering::Relaxed),
        10_000,
        "each event handled once"
    );
    let status = projectionist::status(&env.store, &[Registered::new(tally).unwrap()])
        .await
        .unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].lag_events, 0);
    assert_eq!(status[0].events_handled, 10_000);
}

#[tokio::test]
async fn restart_resumes_from_the_checkpoint() {
    let env = env().await;
    seed(&env, 3_000, 20).await;
    let tally = Arc::new(Tally::new("restart"));
    tally.create_table(&env).await;
    let calls = tally.calls.clone();
    let config = RunnerConfig::default()
        .batch_size(100)
        .unwrap()
        .poll_interval(Duration::from_millis(20))
        .unwrap();

    // First run: stop part-way through.
    let runner = Runner::new(env.store.clone(), config.clone())
        .with_projection(tally.clone())
        .unwrap();
    let progress = runner.progress();
    let (stop, handle) = spawn_runner(runner);
    wait_until(Duration::from_secs(30), "some progress", || async {
        progress.events_handled() >= 500
    })
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    let first = calls.load(Ordering::Relaxed);
    assert_eq!(
        read_model(&env, "tally_restart").await.1 as u64,
        first,
        "every handled event committed"
    );

    // More events arrive while it is down; the second run resumes.
    seed(&env, 1_000, 7).await;
    let runner = Runner::new(env.store.clone(), config)
        .with_projection(tally.clone())
        .unwrap();
    let (stop, handle) = spawn_runner(runner);
    wait_until(Duration::from_secs(30), "all events handled", || async {
        read_model(&env, "tally_restart").await.1 == 4_000
    })
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert_eq!(
        calls.load(Ordering::Relaxed),
        4_000,
        "no event handled twice, none missed"
    );
    assert_eq!(
        read_model(&env, "tally_restart").await,
        expected(&env).await
    );
}

#[tokio::test]
async fn two_partitions_build_the_same_read_model_as_one() {
    let env = env().await;
    seed(&env, 2_000, 40).await;
    let single = Arc::new(Tally::new("single"));
    single.create_table(&env).await;
    let split = Arc::new(Tally::new("split"));
    split.create_table(&env).await;
    let cfg = RunnerConfig::default()
        .poll_interval(Duration::from_millis(20))
        .unwrap();

    let one = Runner::new(env.store.clone(), cfg.clone())
        .with_projection(single.clone())
        .unwrap();
    let p0 = Runner::new(env.store.clone(), cfg.clone().partition(0, 2).unwrap())
        .with_projection(split.clone())
        .unwrap();
    let p1 = Runner::new(env.store.clone(), cfg.clone().partition(1, 2).unwrap())
        .with_projection(split.clone())
        .unwrap();
    let p0_progress = p0.progress();
    let p1_progress = p1.progress();
    let handles = [spawn_runner(one), spawn_runner(p0), spawn_runner(p1)];
    wait_until(
        Duration::from_secs(30),
        "both read models complete",
        || async {
            read_model(&env, "tally_single").await.1 == 2_000
                && read_model(&env, "tally_split").await.1 == 2_000
        },
    )
    .await;
    for (stop, handle) in handles {
        stop.send(()).unwrap();
        handle.await.unwrap().unwrap();
    }
    assert_eq!(
        read_model(&env, "tally_single").await,
        read_model(&env, "tally_split").await
    );
    assert_eq!(read_model(&env, "tally_split").await, expected(&env).await);
    // Each partition got a share, and the shares follow the documented hash.
    let c = env.client().await;
    let in_p0: i64 = c
        .query_one(
            "SELECT count(*) FROM events WHERE projectionist_partition(aggregate_id, 2) = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(p0_progress.events_handled() as i64, in_p0);
    assert_eq!(p1_progress.events_handled() as i64, 2_000 - in_p0);
    assert!(in_p0 > 0 && in_p0 < 2_000);

    // A different TOTAL_PARTITIONS for the same projection is refused.
    let bad = Runner::new(env.store.clone(), cfg.clone().partition(0, 3).unwrap())
        .with_projection(split.clone())
        .unwrap();
    let e = bad.run_once().await.unwrap_err();
    assert!(e.is_config(), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("TOTAL_PARTITIONS=2") && msg.contains("reset split"),
        "{msg}"
    );
    // Nothing changed: still two checkpoint rows made with 2 partitions.
    let rows: i64 = c
        .query_one("SELECT count(*) FROM projection_checkpoints WHERE projection_name = 'split' AND total_partitions = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
    let total_rows: i64 = c
        .query_one(
            "SELECT count(*) FROM projection_checkpoints WHERE projection_name = 'split'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total_rows, 2);

    // An out-of-range key is refused before anything runs.
    for (key, total) in [(2, 2), (-1, 2), (0, 0)] {
        let e = RunnerConfig::default().partition(key, total).unwrap_err();
        assert!(e.is_config());
        assert!(
            e.to_string().contains("PARTITION_KEY") || e.to_string().contains("TOTAL_PARTITIONS"),
            "{e}"
        );
    }
}

/// The partition function documented in docs/concepts.md: first 32 bits of
/// md5(aggregate_id) as an unsigned big-endian integer, modulo the count.
#[tokio::test]
async fn partition_function_matches_its_documentation() {
    let env = env().await;
    let c = env.client().await;
    // md5("acc-1") = 0e5e8f0b…, md5("") = d41d8cd9…
    for (id, total) in [("acc-1", 4), ("", 7), ("x", 1)] {
        let got: i32 = c
            .query_one("SELECT projectionist_partition($1, $2)", &[&id, &total])
            .await
            .unwrap()
            .get(0);
        let hex: String = c.query_one("SELECT md5($1)", &[&id]).await.unwrap().get(0);
        let want = (u32::from_str_radix(&hex[..8], 16).unwrap() % total as u32) as i32;
        assert_eq!(got, want, "{id} mod {total}");
    }
}

#[tokio::test]
async fn a_filter_that_matches_nothing_still_advances_the_cursor() {
    let env = env().await;
    seed(&env, 500, 5).await;
    let mut tally = Tally::new("nothing");
    tally.filter = Filter::all().event_types(["NoSuchEvent"]);
    let tally = Arc::new(tally);
    tally.create_table(&env).await;
    let runner = Runner::new(env.store.clone(), RunnerConfig::default())
        .with_projection(tally.clone())
        .unwrap();
    let max_pos = env
        .scalar_i64("SELECT max(global_position) FROM events")
        .await;
    wait_until(Duration::from_secs(30), "cursor past every event", || async {
        runner.run_once().await.unwrap();
        env.scalar_i64("SELECT last_global_position FROM projection_checkpoints WHERE projection_name = 'nothing'")
            .await
            >= max_pos
            && env
                .scalar_i64(
                    "SELECT (last_transaction_id::text::int8 >= (SELECT max(transaction_id::text::int8) FROM events))::int4::int8 \
                     FROM projection_checkpoints WHERE projection_name = 'nothing'",
                )
                .await
                == 1
    })
    .await;
    assert_eq!(tally.calls.load(Ordering::Relaxed), 0);
    let status = projectionist::status(&env.store, &[Registered::new(tally).unwrap()])
        .await
        .unwrap();
    assert_eq!(status[0].lag_events, 0);
}

#[tokio::test]
async fn notify_wakes_within_100ms_and_survives_a_killed_listener() {
    // A server of its own: see common::private_env.
    let (_server, env) = crate::common::private_env().await;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let mut tally = Tally::new("notified");
    tally.seen = Some(seen_tx);
    let tally = Arc::new(tally);
    tally.create_table(&env).await;
    let cfg = RunnerConfig::default()
        .dispatcher(DispatcherKind::Notify)
        .poll_interval(Duration::from_secs(3600))
        .unwrap()
        .reconcile_interval(Duration::from_secs(3600));
    let runner = Runner::new(env.store.clone(), cfg)
        .with_projection(tally.clone())
        .unwrap();
    let (stop, handle) = spawn_runner(runner);
    let c = env.client().await;
    let listener_pid = || async {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'projectionist-listener' AND query ILIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, i32>(0))
    };
    wait_until(Duration::from_secs(10), "listener connected", || async {
        listener_pid().await.is_some()
    })
    .await;

    let mut latencies = Vec::new();
    for i in 0..5 {
        let r = env
            .store
            .append(
                "Account",
                &format!("n-{i}"),
                ExpectedVersion::NoStream,
                &[amount_event(1)],
            )
            .await
            .unwrap();
        let appended = Instant::now();
        let (pos, at) = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
            .await
            .expect("append handled")
            .unwrap();
        assert_eq!(pos, r.first_position);
        latencies.push(at.saturating_duration_since(appended));
    }
    latencies.sort();
    assert!(
        latencies[2] < Duration::from_millis(100),
        "median wake-up latency {:?} (all: {latencies:?})",
        latencies[2]
    );

    // Kill the listener's backend: the dispatcher reconnects and the next
    // append is still handled (with polling effectively off).
    let pid = listener_pid().await.unwrap();
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "listener reconnected", || async {
        matches!(listener_pid().await, Some(p) if p != pid)
    })
    .await;
    let r = env
        .store
        .append(
            "Account",
            "after-kill",
            ExpectedVersion::NoStream,
            &[amount_event(1)],
        )
        .await
        .unwrap();
    let (pos, _) = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
        .await
        .expect("append after the listener was killed is handled")
        .unwrap();
    assert_eq!(pos, r.first_position);
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn concurrent_writers_with_random_commit_delays_give_an_exact_read_model() {
    // Its open transactions hold the cluster-wide watermark: a server of its own.
    let (_server, env) = crate::common::private_env().await;
    let tally = Arc::new(Tally::new("racy"));
    tally.create_table(&env).await;
    let cfg = RunnerConfig::default()
        .batch_size(50)
        .unwrap()
        .poll_interval(Duration::from_millis(10))
        .unwrap();
    let runner = Runner::new(env.store.clone(), cfg)
        .with_projection(tally.clone())
        .unwrap();
    let (stop, handle) = spawn_runner(runner);

    const WRITERS: usize = 6;
    const PER_WRITER: usize = 150;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = env.store.clone();
        let db_config = env.db.config();
        writers.push(tokio::spawn(async move {
            let (mut client, conn) = db_config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            for i in 0..PER_WRITER {
                let delay = Duration::from_millis(rand::thread_rng().gen_range(0..4));
                let tx = client.transaction().await.unwrap();
                let stream = format!("w{w}-{}", i % 5);
                if w % 2 == 0 {
                    // Raw SQL append, as another service would write.
                    tx.execute(
                        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
                         SELECT 'Account', $1, coalesce(max(aggregate_version), 0) + 1, 'MoneyDeposited', \
                                jsonb_build_object('amount', $2::int8) \
                         FROM events WHERE aggregate_type = 'Account' AND aggregate_id = $1",
                        &[&stream, &(i as i64)],
                    )
                    .await
                    .unwrap();
                } else {
                    store
                        .append_in(&tx, "Account", &stream, ExpectedVersion::Any, &[amount_event(i as i64)])
                        .await
                        .unwrap();
                }
                // Hold the transaction open a little: later positions commit first.
                tokio::time::sleep(delay).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = (WRITERS * PER_WRITER) as i64;
    wait_until(Duration::from_secs(30), "every event projected", || async {
        read_model(&env, "tally_racy").await.1 >= total
    })
    .await;
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert_eq!(read_model(&env, "tally_racy").await, expected(&env).await);
    assert_eq!(
        tally.calls.load(Ordering::Relaxed) as i64,
        total,
        "each event handled exactly once"
    );
}

#[tokio::test]
async fn duplicate_projection_names_are_refused() {
    let env = env().await;
    let e = Runner::new(env.store.clone(), RunnerConfig::default())
        .with_projection(Arc::new(Tally::new("same")))
        .unwrap()
        .with_projection(Arc::new(Tally::new("same")))
        .err()
        .expect("duplicate refused");
    assert!(e.is_config() && e.to_string().contains("\"same\""), "{e}");
}

#[tokio::test]
async fn pipelined_per_event_handlers_build_the_exact_read_model() {
    let env = env().await;
    seed(&env, 5_000, 25).await;
    let mut tally = Tally::new("pipelined");
    tally.pipelined = true;
    let tally = Arc::new(tally);
    tally.create_table(&env).await;
    let runner = Runner::new(env.store.clone(), RunnerConfig::default())
        .with_projection(tally.clone())
        .unwrap();
    wait_until(Duration::from_secs(30), "read model complete", || async {
        runner.run_once().await.unwrap();
        read_model(&env, "tally_pipelined").await.1 == 5_000
    })
    .await;
    assert_eq!(
        read_model(&env, "tally_pipelined").await,
        expected(&env).await
    );
    assert_eq!(tally.calls.load(Ordering::Relaxed), 5_000);
}

/// Orders read model: each event type is its own prepared statement
/// (`prepare_cached`), so with pipelining an event whose statement is
/// already cached can overtake an earlier one still preparing.
struct Orders;

#[projectionist::async_trait]
impl projectionist::Projection for Orders {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("orders").pipelined(true)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let sql = match event.event_type.as_str() {
            "OrderPlaced" => {
                "INSERT INTO orders (order_id, status, version) VALUES ($1, 'placed', $2)"
            }
            "OrderPaid" => "UPDATE orders SET status = 'paid', version = $2 WHERE order_id = $1",
            "OrderCancelled" => {
                "UPDATE orders SET status = 'cancelled', version = $2 WHERE order_id = $1"
            }
            other => {
                return Err(projectionist::Error::handler_msg(format!(
                    "unknown {other}"
                )))
            }
        };
        let stmt = tx.prepare_cached(sql).await?;
        tx.execute(&stmt, &[&event.aggregate_id, &event.aggregate_version])
            .await?;
        Ok(())
    }

    async fn reset(
        &self,
        tx: &projectionist::Context<'_>,
        _: Option<projectionist::Partition>,
    ) -> projectionist::Result<()> {
        tx.batch_execute("TRUNCATE orders").await?;
        Ok(())
    }
}

/// Orders whose read-model row is not in the state of their last event.
async fn orders_out_of_state(env: &Env) -> Vec<(String, String, String)> {
    env.client()
        .await
        .query(
            "SELECT e.aggregate_id, \
                    CASE e.event_type WHEN 'OrderPlaced' THEN 'placed' WHEN 'OrderPaid' THEN 'paid' ELSE 'cancelled' END, \
                    coalesce(o.status, 'missing') \
             FROM (SELECT DISTINCT ON (aggregate_id) aggregate_id, event_type FROM events \
                   WHERE aggregate_type = 'Order' ORDER BY aggregate_id, aggregate_version DESC) e \
             LEFT JOIN orders o ON o.order_id = e.aggregate_id \
             WHERE o.status IS DISTINCT FROM \
                   CASE e.event_type WHEN 'OrderPlaced' THEN 'placed' WHEN 'OrderPaid' THEN 'paid' ELSE 'cancelled' END \
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Per-stream order holds with `pipelined() = true`: orders placed, paid
/// and cancelled, each event type its own prepared statement, rebuilt
/// several times from scratch with batch sizes that make a later batch
/// meet a statement for the first time while the others are cached. Every
/// order must end in the state of its last event.
#[tokio::test]
async fn pipelined_handlers_keep_each_streams_order_across_rebuilds() {
    let env = env().await;
    env.client()
        .await
        .batch_execute(
            "CREATE TABLE orders (order_id text PRIMARY KEY, status text NOT NULL, version bigint NOT NULL)",
        )
        .await
        .unwrap();
    // The log: 50 orders placed and cancelled at once (so the first batch
    // caches those two statements), then 550 orders whose events
    // interleave at random, a few orders at a time: placed, then paid,
    // paid and cancelled, or cancelled.
    let mut rng = rand::thread_rng();
    let mut log: Vec<(String, i64, &str)> = Vec::new();
    for o in 0..50 {
        log.push((format!("order-{o:04}"), 1, "OrderPlaced"));
    }
    for o in 0..50 {
        log.push((format!("order-{o:04}"), 2, "OrderCancelled"));
    }
    let mut pending: Vec<(String, Vec<&str>)> = (50..600)
        .map(|o| {
            let tail: &[&str] = match rng.gen_range(0..3) {
                0 => &["OrderPaid"],
                1 => &["OrderPaid", "OrderCancelled"],
                _ => &["OrderCancelled"],
            };
            let mut seq = vec!["OrderPlaced"];
            seq.extend_from_slice(tail);
            seq.reverse();
            (format!("order-{o:04}"), seq)
        })
        .collect();
    let mut version = std::collections::HashMap::<String, i64>::new();
    while !pending.is_empty() {
        // A few orders in progress at a time, as in a shop: an order's
        // events lie close together in the log.
        let i = rng.gen_range(0..pending.len().min(8));
        let (id, seq) = &mut pending[i];
        let v = version.entry(id.clone()).or_insert(0);
        *v += 1;
        log.push((id.clone(), *v, seq.pop().unwrap()));
        if seq.is_empty() {
            pending.remove(i);
        }
    }
    let c = env.client().await;
    let ids: Vec<&str> = log.iter().map(|(id, _, _)| id.as_str()).collect();
    let versions: Vec<i64> = log.iter().map(|(_, v, _)| *v).collect();
    let types: Vec<&str> = log.iter().map(|(_, _, t)| *t).collect();
    c.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         SELECT 'Order', id, v, t, '{}' FROM unnest($1::text[], $2::int8[], $3::text[]) WITH ORDINALITY AS u(id, v, t, n) \
         ORDER BY n",
        &[&ids, &versions, &types],
    )
    .await
    .unwrap();
    let total = log.len() as i64;
    let orders = Arc::new(Orders);
    let mut failures = Vec::new();
    for (run, batch_size) in [100i64, 64, 100, 30].into_iter().enumerate() {
        if run > 0 {
            projectionist::reset(&env.store, &Registered::new(orders.clone()).unwrap(), None)
                .await
                .unwrap();
        }
        // A new runner each time: new connections, empty statement caches.
        let runner = Runner::new(
            env.store.clone(),
            RunnerConfig::default().batch_size(batch_size).unwrap(),
        )
        .with_projection(orders.clone())
        .unwrap();
        wait_until(
            Duration::from_secs(30),
            "every order event handled",
            || async {
                runner.run_once().await.unwrap();
                env.scalar_i64(
                    "SELECT coalesce(sum(events_handled), 0)::int8 FROM projection_checkpoints",
                )
                .await
                    == total
            },
        )
        .await;
        let wrong = orders_out_of_state(&env).await;
        if !wrong.is_empty() {
            failures.push(format!(
                "run {run} (batch size {batch_size}): {} order(s) not in their last event's state, e.g. {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(3)]
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Two processes starting one projection with different partition counts
/// at the same moment: at most one may pass the partition-count check.
/// The race is widened deterministically: an open transaction has inserted
/// (uncommitted) rows with every key the processes will insert, so each
/// process's check runs and its insert then waits; the transaction rolls
/// back once every process is waiting. A check-then-insert lets both pass.
/// (On a server of its own: the open transaction holds the cluster-wide
/// watermark back while it waits.)
#[tokio::test]
async fn concurrent_starts_with_different_partition_counts_never_both_succeed() {
    let server = projectionist::testing::TestServer::start_private()
        .await
        .unwrap();
    let db = server.create_database().await.unwrap();
    projectionist::migrate(&db.config(), "public")
        .await
        .unwrap();
    let env = Env {
        store: projectionist::EventStore::connect_config(
            db.config(),
            projectionist::StoreConfig::default(),
        )
        .unwrap(),
        db,
    };
    const PAIRS: usize = 10;
    let mut holder = env.client().await;
    let hold = holder.transaction().await.unwrap();
    for i in 0..PAIRS {
        hold.execute(
            "INSERT INTO projection_checkpoints (projection_name, partition_key, total_partitions) \
             VALUES ($1, 0, 99), ($1, 1, 99)",
            &[&format!("race_{i}")],
        )
        .await
        .unwrap();
    }
    let start = |i: usize, key: i32, total: i32| {
        let store = env.store.clone();
        tokio::spawn(async move {
            Runner::new(
                store,
                RunnerConfig::default().partition(key, total).unwrap(),
            )
            .with_projection(Arc::new(Tally::new(&format!("race_{i}"))))
            .unwrap()
            .run_once()
            .await
        })
    };
    let pairs: Vec<_> = (0..PAIRS)
        .map(|i| (start(i, 0, 2), start(i, 1, 3)))
        .collect();
    let watcher = env.client().await;
    wait_until(
        Duration::from_secs(30),
        "every start to be waiting",
        || async {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            waiting == 2 * PAIRS as i64
        },
    )
    .await;
    hold.rollback().await.unwrap();
    let (mut both, mut mixed) = (Vec::new(), Vec::new());
    for (i, (a, b)) in pairs.into_iter().enumerate() {
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        if let Some(e) = [&a, &b].into_iter().find_map(|r| r.as_ref().err()) {
            assert!(
                e.is_config() && e.to_string().contains("partition(s)"),
                "race_{i}: {e}"
            );
        }
        if a.is_ok() && b.is_ok() {
            both.push(i);
        }
        let totals = env
            .scalar_i64(&format!(
                "SELECT count(DISTINCT total_partitions) FROM projection_checkpoints WHERE projection_name = 'race_{i}'"
            ))
            .await;
        if totals > 1 {
            mixed.push(i);
        }
    }
    assert!(
        both.is_empty() && mixed.is_empty(),
        "both starts with different partition counts succeeded for {} of {PAIRS} pairs ({both:?}); \
         checkpoints with two partition counts for {mixed:?}",
        both.len()
    );
}

/// A filtered slot's page costs the same at any cursor position: the probe
/// "did the page pass over events?" must be an index range scan, never a
/// sequential scan from the start of the table (under a generic plan
/// PostgreSQL turned the EXISTS form into one, and a 100,000-event rebuild
/// slowed from 13k to 4k events/s as its cursor advanced).
#[tokio::test]
async fn a_filtered_page_never_scans_the_events_table() {
    let env = env().await;
    let c = env.client().await;
    // One transaction of 20,000 events, most of them not the slot's.
    c.batch_execute(
        "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         SELECT CASE WHEN g % 10 = 0 THEN 'Order' ELSE 'Other' END, 'o' || g, 1, 'Placed', '{\"amount\": 1}' \
         FROM generate_series(1, 20000) g; ANALYZE events",
    )
    .await
    .unwrap();
    // Every connection of this database plans generically, as the batch
    // pool's prepared statements do after a few executions.
    c.batch_execute(&format!(
        "ALTER DATABASE {} SET plan_cache_mode = force_generic_plan",
        env.db.name()
    ))
    .await
    .unwrap();
    let seq_scans = || async {
        let c = env.client().await;
        c.batch_execute("SELECT pg_stat_clear_snapshot()")
            .await
            .unwrap();
        let r = c
            .query_one(
                "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relid = 'events'::regclass",
                &[],
            )
            .await
            .unwrap();
        (r.get::<_, i64>(0), r.get::<_, i64>(1))
    };
    let before = seq_scans().await;
    {
        // A store of its own: its connections end with it, and a backend
        // reports its statistics when it exits.
        let store = projectionist::EventStore::connect_config(
            env.db.config(),
            projectionist::StoreConfig::default(),
        )
        .unwrap();
        let mut orders = Tally::new("filtered_orders");
        orders.filter = Filter::all().aggregate_types(["Order"]);
        orders.create_table(&env).await;
        let orders = Arc::new(orders);
        Runner::new(
            store.clone(),
            RunnerConfig::default().batch_size(50).unwrap(),
        )
        .with_projection(orders.clone())
        .unwrap()
        .run_once()
        .await
        .unwrap();
        assert_eq!(orders.calls.load(Ordering::Relaxed), 2_000);
        store.pool().close();
    }
    // The runner's backends are gone (their statistics flushed).
    wait_until(
        Duration::from_secs(10),
        "the runner's backends to exit",
        || async {
            env.client()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                <= 1
        },
    )
    .await;
    let after = seq_scans().await;
    // The statistics did arrive: each of the 40 pages (50 of the 2,000
    // orders) probed the indexes at least twice.
    assert!(
        after.1 - before.1 >= 80,
        "index scans {before:?} -> {after:?}"
    );
    assert_eq!(
        after.0 - before.0,
        0,
        "the catch-up scanned the events table sequentially {} times",
        after.0 - before.0
    );
}

/// More slots than pooled connections: each slot reads its next page
/// ahead on a second connection, so a slot must never hold a connection
/// while it waits for its read ahead (which may be waiting for one).
#[tokio::test]
async fn more_slots_than_pooled_connections_still_catch_up() {
    let env = env().await;
    seed(&env, 600, 12).await;
    let store = projectionist::EventStore::connect_config(
        env.db.config(),
        projectionist::StoreConfig::default().pool_size(2),
    )
    .unwrap();
    let tallies: Vec<Arc<Tally>> = (0..4)
        .map(|i| Arc::new(Tally::new(&format!("tight{i}"))))
        .collect();
    let mut runner = Runner::new(store, RunnerConfig::default().batch_size(10).unwrap());
    for t in &tallies {
        t.create_table(&env).await;
        runner = runner.with_projection(t.clone()).unwrap();
    }
    let want = expected(&env).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            runner.run_once().await.unwrap();
            let mut done = true;
            for t in &tallies {
                done &= read_model(&env, &t.table()).await == want;
            }
            if done {
                break;
            }
        }
    })
    .await
    .expect("4 slots on a pool of 2 connections never caught up: a slot waits for a connection it holds");
}

/// Records what each event's metadata looked like in the handler.
struct MetadataSeen {
    name: String,
    reads_metadata: bool,
    seen: std::sync::Mutex<Vec<(String, Result<projectionist::Metadata, String>)>>,
}

#[projectionist::async_trait]
impl projectionist::Projection for MetadataSeen {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name).reads_metadata(self.reads_metadata)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        let decoded = event.metadata().map_err(|e| e.to_string());
        self.seen
            .lock()
            .unwrap()
            .push((event.metadata_json().to_owned(), decoded));
        Ok(())
    }
}

#[tokio::test]
async fn a_projection_that_reads_no_metadata_gets_none_and_is_told_why() {
    let env = env().await;
    let md = projectionist::Metadata::new().with_correlation_id("c-7");
    env.store
        .append(
            "Account",
            "acc-md",
            ExpectedVersion::Any,
            &[amount_event(5).with_metadata(&md), amount_event(6)],
        )
        .await
        .unwrap();
    for reads_metadata in [true, false] {
        let p = Arc::new(MetadataSeen {
            name: format!("metadata_seen_{reads_metadata}"),
            reads_metadata,
            seen: Default::default(),
        });
        let runner = Runner::new(env.store.clone(), RunnerConfig::default())
            .with_projection(p.clone())
            .unwrap();
        wait_until(Duration::from_secs(30), "both events handled", || async {
            runner.run_once().await.unwrap();
            p.seen.lock().unwrap().len() >= 2
        })
        .await;
        let seen = p.seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "each event handled once: {seen:?}");
        if reads_metadata {
            assert_eq!(seen[0].1.as_ref().unwrap(), &md);
            assert_eq!(
                seen[1].1.as_ref().unwrap(),
                &projectionist::Metadata::default()
            );
        } else {
            for (json, decoded) in seen.iter() {
                assert_eq!(json, "", "no metadata is read");
                let e = decoded.as_ref().unwrap_err();
                assert!(
                    e.contains("reads_metadata(false)") && e.contains("was not read"),
                    "the error names the option: {e}"
                );
            }
        }
    }
}
