//! A slot's lifecycle under faults a user can cause: handler panics (in
//! sequential and concurrency mode), `reset` and `pause`/`resume` while a
//! process runs, and a worker shutdown with a hung handler.

use crate::common::{env, wait_until, Env};
use projectionist::{
    Concurrency, ExpectedVersion, FailurePolicy, Filter, NewEvent, Registered, Runner,
    RunnerConfig, StoredEvent, WorkerConfig,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// What the handler does with an event whose amount is negative.
#[derive(Clone, Copy, PartialEq)]
enum OnPoison {
    Panic,
    Hang,
    Nothing,
}

/// Counts events per aggregate in its own table (sequential mode) or in
/// memory (concurrency mode).
struct Counter {
    name: String,
    poison: OnPoison,
    concurrent: bool,
    calls: AtomicU64,
    /// Set when a hung handler's future is dropped.
    hang_dropped: Arc<AtomicBool>,
}

impl Counter {
    /// Registered through the trait its mode asks for.
    fn registered(self: &Arc<Self>) -> Registered {
        if self.concurrent {
            Registered::concurrent(self.clone()).unwrap()
        } else {
            Registered::new(self.clone()).unwrap()
        }
    }

    fn new(name: &str, poison: OnPoison, concurrent: bool) -> Arc<Counter> {
        Arc::new(Counter {
            name: name.to_owned(),
            poison,
            concurrent,
            calls: AtomicU64::new(0),
            hang_dropped: Arc::new(AtomicBool::new(false)),
        })
    }

    fn table(&self) -> String {
        format!("count_{}", self.name)
    }

    async fn create_table(&self, env: &Env) {
        env.client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (aggregate_id text PRIMARY KEY, n bigint NOT NULL)",
                self.table()
            ))
            .await
            .unwrap();
    }

    async fn rows(&self, env: &Env) -> i64 {
        env.scalar_i64(&format!(
            "SELECT coalesce(sum(n), 0)::int8 FROM {}",
            self.table()
        ))
        .await
    }

    /// Panics or hangs on a poison event.
    async fn poisoned(&self, event: &StoredEvent) {
        let amount = event
            .payload_value()
            .ok()
            .and_then(|v| v.get("amount").and_then(|a| a.as_i64()))
            .unwrap_or(0);
        if amount >= 0 {
            return;
        }
        match self.poison {
            OnPoison::Nothing => {}
            OnPoison::Panic => panic!("poison event at {}", event.global_position),
            OnPoison::Hang => {
                struct Flag(Arc<AtomicBool>);
                impl Drop for Flag {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _flag = Flag(self.hang_dropped.clone());
                std::future::pending::<()>().await;
            }
        }
    }
}

#[projectionist::async_trait]
impl projectionist::Projection for Counter {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
            .filter(Filter::all().aggregate_types(["Thing"]))
            .failure_policy(
                FailurePolicy::dead_letter()
                    .attempts(2)
                    .backoff(Duration::from_millis(10), Duration::from_millis(10)),
            )
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        tx: &projectionist::Context<'_>,
    ) -> projectionist::Result<()> {
        self.poisoned(event).await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        tx.execute(
            &format!(
                "INSERT INTO {t} (aggregate_id, n) VALUES ($1, 1) \
                 ON CONFLICT (aggregate_id) DO UPDATE SET n = {t}.n + 1",
                t = self.table()
            ),
            &[&event.aggregate_id],
        )
        .await?;
        Ok(())
    }
}

#[projectionist::async_trait]
impl projectionist::ConcurrentProjection for Counter {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new(&self.name)
            .filter(Filter::all().aggregate_types(["Thing"]))
            .failure_policy(
                FailurePolicy::dead_letter()
                    .attempts(2)
                    .backoff(Duration::from_millis(10), Duration::from_millis(10)),
            )
    }

    fn concurrency(&self) -> projectionist::Concurrency {
        Concurrency::new(8)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _scope: &projectionist::Scope,
    ) -> projectionist::Result<()> {
        self.poisoned(event).await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn append(env: &Env, stream: &str, amounts: &[i64]) {
    let events: Vec<NewEvent> = amounts
        .iter()
        .map(|a| NewEvent::new("Counted", &serde_json::json!({ "amount": a })).unwrap())
        .collect();
    env.store
        .append("Thing", stream, ExpectedVersion::Any, &events)
        .await
        .unwrap();
}

fn config() -> RunnerConfig {
    RunnerConfig::default()
        .poll_interval(Duration::from_millis(20))
        .unwrap()
        .batch_size(10)
        .unwrap()
}

/// Runs `runner` until the returned sender fires.
fn spawn(
    runner: Runner,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<projectionist::Result<()>>,
) {
    let (tx, rx) = oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        runner
            .run_until(async {
                let _ = rx.await;
            })
            .await
    });
    (tx, h)
}

/// Runs `runner` in worker mode (fast heartbeats) until the returned
/// sender fires.
fn spawn_worker(
    runner: Runner,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<projectionist::Result<()>>,
) {
    let wc = WorkerConfig::default()
        .heartbeat_interval(Duration::from_millis(100))
        .unwrap()
        .heartbeat_timeout(Duration::from_secs(2))
        .unwrap()
        .rebalance_interval(Duration::from_millis(100))
        .unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        runner
            .run_workers_until(wc, async {
                let _ = stop_rx.await;
            })
            .await
    });
    (stop_tx, h)
}

async fn dead_letters(env: &Env, name: &str) -> i64 {
    env.scalar_i64(&format!(
        "SELECT count(*) FROM dead_letters WHERE projection_name = '{name}'"
    ))
    .await
}

async fn panic_is_dead_lettered(concurrent: bool) {
    let env = env().await;
    let panicky = Counter::new("panicky", OnPoison::Panic, concurrent);
    let calm = Counter::new("calm", OnPoison::Nothing, false);
    panicky.create_table(&env).await;
    calm.create_table(&env).await;
    append(&env, "a", &[1, 1, 1]).await;
    append(&env, "b", &[-1]).await;
    append(&env, "c", &[1, 1, 1, 1]).await;
    let runner = Runner::new(env.store.clone(), config())
        .with_projections(&[panicky.registered(), calm.registered()])
        .unwrap();
    let (stop, h) = spawn(runner);
    wait_until(
        Duration::from_secs(30),
        "the panicking event dead-lettered and the events after it handled",
        || async {
            // Calls count handlers run, not batches committed: in sequential
            // mode also wait for the commit of the batch holding the 7th.
            dead_letters(&env, "panicky").await == 1
                && panicky.calls.load(Ordering::SeqCst) >= 7
                && (concurrent || panicky.rows(&env).await == 7)
        },
    )
    .await;
    wait_until(Duration::from_secs(30), "the other projection", || async {
        calm.calls.load(Ordering::SeqCst) == 8
    })
    .await;
    if !concurrent {
        assert_eq!(panicky.rows(&env).await, 7);
    }
    // The process still serves: a new event reaches both projections.
    append(&env, "d", &[1]).await;
    wait_until(Duration::from_secs(30), "a later event", || async {
        calm.calls.load(Ordering::SeqCst) == 9 && panicky.calls.load(Ordering::SeqCst) >= 8
    })
    .await;
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_is_a_handler_failure() {
    panic_is_dead_lettered(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_in_concurrency_mode_is_a_handler_failure() {
    panic_is_dead_lettered(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_while_running_rebuilds_the_projection() {
    let env = env().await;
    let counter = Counter::new("rebuilt", OnPoison::Panic, false);
    counter.create_table(&env).await;
    for i in 0..5 {
        append(&env, &format!("s{i}"), &[1, 1, 1, 1]).await;
    }
    let runner = Runner::new(env.store.clone(), config())
        .with_registered(counter.registered())
        .unwrap();
    let (stop, h) = spawn(runner);
    wait_until(Duration::from_secs(30), "the first build", || async {
        counter.rows(&env).await == 20
    })
    .await;
    // The reset clears the table (no reset hook here: do it by hand in the
    // same way the hook would) and deletes the checkpoint.
    env.client()
        .await
        .batch_execute(&format!("TRUNCATE {}", counter.table()))
        .await
        .unwrap();
    let deleted = projectionist::reset(&env.store, &counter.registered(), None)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    wait_until(
        Duration::from_secs(30),
        "the running process to rebuild after the reset",
        || async {
            let status = projectionist::status(&env.store, &[counter.registered()])
                .await
                .unwrap();
            counter.rows(&env).await == 20
                && status.len() == 1
                && status[0].events_handled == 20
                && status[0].lag_events == 0
        },
    )
    .await;
    assert_eq!(counter.calls.load(Ordering::SeqCst), 40);
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_slot_handles_nothing_until_resumed() {
    let env = env().await;
    let counter = Counter::new("paused", OnPoison::Panic, false);
    counter.create_table(&env).await;
    append(&env, "a", &[1, 1]).await;
    let runner = Runner::new(env.store.clone(), config())
        .with_registered(counter.registered())
        .unwrap();
    let (stop, h) = spawn(runner);
    wait_until(Duration::from_secs(30), "the first events", || async {
        counter.rows(&env).await == 2
    })
    .await;
    let c = env.client().await;
    c.execute(
        "UPDATE projection_checkpoints SET status = 'stopped' WHERE projection_name = 'paused'",
        &[],
    )
    .await
    .unwrap();
    append(&env, "a", &[1, 1, 1]).await;
    // Nothing can be awaited for "did not happen": give the slot many poll
    // intervals (20 ms) and its idle re-check to misbehave.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(counter.rows(&env).await, 2, "a paused slot handled events");
    let status: String = c
        .query_one(
            "SELECT status FROM projection_checkpoints WHERE projection_name = 'paused'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "stopped");
    c.execute(
        "UPDATE projection_checkpoints SET status = 'running' WHERE projection_name = 'paused'",
        &[],
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "resumed", || async {
        counter.rows(&env).await == 5
    })
    .await;
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_shutdown_does_not_leave_a_hung_handler_running() {
    let env = env().await;
    let hung = Counter::new("hung", OnPoison::Hang, false);
    hung.create_table(&env).await;
    append(&env, "a", &[1, -1, 1]).await;
    let runner = Runner::new(
        env.store.clone(),
        config().shutdown_timeout(Duration::from_millis(500)),
    )
    .with_registered(hung.registered())
    .unwrap();
    let (stop_tx, h) = spawn_worker(runner);
    wait_until(Duration::from_secs(30), "the handler to hang", || async {
        hung.calls.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(!hung.hang_dropped.load(Ordering::SeqCst));
    stop_tx.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .expect("worker shutdown is bounded by the shutdown timeout")
        .unwrap();
    assert!(
        result.is_err(),
        "the hung batch exceeds the shutdown timeout"
    );
    // The worker returned: its slot task must not live on.
    wait_until(
        Duration::from_secs(5),
        "the hung handler dropped",
        || async { hung.hang_dropped.load(Ordering::SeqCst) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_mark_is_never_overwritten_by_a_later_batch_in_worker_mode() {
    let env = env().await;
    let counter = Counter::new("marked", OnPoison::Nothing, false);
    counter.create_table(&env).await;
    append(&env, "a", &[1, 1]).await;
    let runner = Runner::new(env.store.clone(), config())
        .with_registered(counter.registered())
        .unwrap();
    let (stop_tx, h) = spawn_worker(runner);
    wait_until(Duration::from_secs(30), "the first events", || async {
        counter.rows(&env).await == 2
    })
    .await;
    // Another worker (deposed a moment later) marked the slot failed.
    let c = env.client().await;
    c.execute(
        "UPDATE projection_checkpoints SET status = 'failed', last_error = 'stopped at 2', \
         failed_position = 2 WHERE projection_name = 'marked'",
        &[],
    )
    .await
    .unwrap();
    append(&env, "a", &[1, 1, 1]).await;
    // "Did not happen" cannot be awaited: give the worker many poll
    // intervals and its idle re-check to overwrite the mark.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let row = c
        .query_one(
            "SELECT status, failed_position FROM projection_checkpoints WHERE projection_name = 'marked'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "failed",
        "a batch overwrote the failed mark"
    );
    assert_eq!(row.get::<_, Option<i64>>(1), Some(2));
    assert_eq!(counter.rows(&env).await, 2, "a failed slot handled events");
    c.execute(
        "UPDATE projection_checkpoints SET status = 'running' WHERE projection_name = 'marked'",
        &[],
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "resumed", || async {
        counter.rows(&env).await == 5
    })
    .await;
    stop_tx.send(()).unwrap();
    h.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_flags_events_below_the_cursor_that_were_never_handled() {
    let env = env().await;
    let counter = Counter::new("skipper", OnPoison::Nothing, false);
    counter.create_table(&env).await;
    append(&env, "a", &[1, 1]).await;
    let runner = Runner::new(env.store.clone(), config())
        .with_registered(counter.registered())
        .unwrap();
    let (stop, h) = spawn(runner);
    wait_until(Duration::from_secs(30), "the first events", || async {
        counter.rows(&env).await == 2
    })
    .await;
    // An event the projection filters out moves its cursor past its
    // transaction without handling anything.
    let other = env
        .store
        .append(
            "Other",
            "x",
            ExpectedVersion::Any,
            &[NewEvent::new("Noted", &serde_json::json!({})).unwrap()],
        )
        .await
        .unwrap();
    let c = env.client().await;
    wait_until(Duration::from_secs(30), "the cursor past it", || async {
        let tx: String = c
            .query_one(
                "SELECT last_transaction_id::text FROM projection_checkpoints WHERE projection_name = 'skipper'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        tx.parse::<u64>().unwrap() >= other.transaction_id
    })
    .await;
    // What reused transaction ids do: an event the projection receives,
    // sorting below its cursor (the transaction id of the filtered event).
    c.execute(
        "INSERT INTO events (transaction_id, aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
         VALUES ($1::text::xid8, 'Thing', 'reused', 1, 'Counted', '{\"amount\": 1}')",
        &[&other.transaction_id.to_string()],
    )
    .await
    .unwrap();
    let projections = [counter.registered()];
    let status = projectionist::status(&env.store, &projections)
        .await
        .unwrap();
    assert_eq!(status[0].skipped_events, 1, "{status:?}");
    assert_eq!(
        status[0].lag_events, 0,
        "the event is below the cursor: no lag"
    );
    // The fix the status names: the engine moves the cursor back.
    c.execute(
        "UPDATE projection_checkpoints SET epoch = NULL WHERE projection_name = 'skipper'",
        &[],
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the skipped event handled",
        || async { counter.rows(&env).await == 3 },
    )
    .await;
    let status = projectionist::status(&env.store, &projections)
        .await
        .unwrap();
    assert_eq!(status[0].skipped_events, 0);
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
}
