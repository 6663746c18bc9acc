//! Key-ordered concurrency: every event once, per-aggregate order, bounded
//! re-handling after a crash, backpressure, dead letters.

use crate::common::{env, wait_until, Env};
use projectionist::{Concurrency, FailurePolicy, Registered, Runner, RunnerConfig, StoredEvent};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records each (aggregate, version) it sees, sleeping a random while.
struct Slow {
    max_in_flight: usize,
    max_delay_ms: u64,
    seen: Mutex<HashMap<String, Vec<i64>>>,
    calls: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    poison: Option<String>,
}

impl Slow {
    fn new(max_in_flight: usize, max_delay_ms: u64) -> Slow {
        Slow {
            max_in_flight,
            max_delay_ms,
            seen: Mutex::new(HashMap::new()),
            calls: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            poison: None,
        }
    }
}

#[projectionist::async_trait]
impl projectionist::ConcurrentProjection for Slow {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("slow_io").failure_policy(
            FailurePolicy::dead_letter()
                .attempts(2)
                .backoff(Duration::from_millis(1), Duration::from_millis(2)),
        )
    }

    fn concurrency(&self) -> projectionist::Concurrency {
        Concurrency::new(self.max_in_flight)
    }

    async fn handle(
        &self,
        event: &StoredEvent,
        _scope: &projectionist::Scope,
    ) -> projectionist::Result<()> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let delay = rand::thread_rng().gen_range(0..=self.max_delay_ms);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        if self.poison.as_deref() == Some(event.aggregate_id.as_str())
            && event.aggregate_version == 2
        {
            return Err(projectionist::Error::handler_msg("poison"));
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen
            .lock()
            .unwrap()
            .entry(event.aggregate_id.clone())
            .or_default()
            .push(event.aggregate_version);
        Ok(())
    }
}

/// `per` events for each of `aggregates` aggregates, interleaved.
async fn seed(env: &Env, aggregates: i64, per: i64) {
    env.client()
        .await
        .execute(
            "INSERT INTO events (aggregate_type, aggregate_id, aggregate_version, event_type, payload) \
             SELECT 'Account', 'a' || (g % $1::int8), (g / $1::int8) + 1, 'MoneyDeposited', '{}' \
             FROM generate_series(0::int8, $1::int8 * $2::int8 - 1) g",
            &[&aggregates, &per],
        )
        .await
        .unwrap();
}

fn runner(env: &Env, p: Arc<Slow>) -> Runner {
    Runner::new(
        env.store.clone(),
        RunnerConfig::default()
            .poll_interval(Duration::from_millis(20))
            .unwrap(),
    )
    .with_concurrent_projection(p)
    .unwrap()
}

fn spawn(
    r: Runner,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<projectionist::Result<()>>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        r.run_until(async {
            let _ = rx.await;
        })
        .await
    });
    (tx, h)
}

fn assert_in_order(seen: &HashMap<String, Vec<i64>>, per: i64) {
    for (agg, versions) in seen {
        assert_eq!(
            versions,
            &(1..=per).collect::<Vec<_>>(),
            "aggregate {agg}: order or duplicates"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_delays_over_1000_aggregates_every_event_once_in_order_within_the_limit() {
    let env = env().await;
    seed(&env, 1000, 4).await;
    let slow = Arc::new(Slow::new(32, 3));
    let r = runner(&env, slow.clone());
    let progress = r.progress();
    let (stop, h) = spawn(r);
    // Sample the engine's in-flight count throughout the run.
    let sampler = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut max = 0;
            for _ in 0..100_000 {
                max = max.max(progress.in_flight());
                tokio::time::sleep(Duration::from_micros(500)).await;
                if progress.events_handled() >= 4000 {
                    break;
                }
            }
            max
        })
    };
    wait_until(Duration::from_secs(60), "4000 events handled", || async {
        slow.calls.load(Ordering::SeqCst) >= 4000 && progress.events_handled() >= 4000
    })
    .await;
    let sampled_max = sampler.await.unwrap();
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
    assert_eq!(
        slow.calls.load(Ordering::SeqCst),
        4000,
        "every event exactly once"
    );
    {
        let seen = slow.seen.lock().unwrap();
        assert_eq!(seen.len(), 1000);
        assert_in_order(&seen, 4);
    }
    assert!(
        sampled_max <= 32 && sampled_max > 1,
        "in-flight sampled max {sampled_max}"
    );
    assert!(slow.max_running.load(Ordering::SeqCst) <= 32);
    assert!(
        slow.max_running.load(Ordering::SeqCst) > 1,
        "ran concurrently"
    );
    let status =
        projectionist::status(&env.store, &[Registered::concurrent(slow.clone()).unwrap()])
            .await
            .unwrap();
    assert_eq!(status[0].lag_events, 0);
    let parallel = status[0]
        .parallel
        .as_ref()
        .expect("parallel stats in status");
    assert_eq!(parallel["max_in_flight"], 32);
    assert_eq!(parallel["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_re_handles_at_most_the_window_and_loses_nothing() {
    let env = env().await;
    seed(&env, 200, 10).await;
    let slow = Arc::new(Slow::new(16, 4));
    let r = runner(&env, slow.clone());
    let progress = r.progress();
    let (_stop, h) = spawn(r);
    wait_until(Duration::from_secs(30), "part of the run", || async {
        progress.events_handled() >= 500
    })
    .await;
    // Crash: the runner is dropped mid-flight, nothing is committed on the way out.
    h.abort();
    let _ = h.await;
    let before_restart = slow.calls.load(Ordering::SeqCst);
    assert!(before_restart < 2000);

    let again = Arc::new(Slow::new(16, 1));
    let r = runner(&env, again.clone());
    let (stop, h) = spawn(r);
    wait_until(Duration::from_secs(60), "the rest handled", || async {
        let status = projectionist::status(
            &env.store,
            &[Registered::concurrent(again.clone()).unwrap()],
        )
        .await
        .unwrap();
        status[0].lag_events == 0
    })
    .await;
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
    // Nothing lost: every version of every aggregate was handled by one of the runs.
    let first = slow.seen.lock().unwrap();
    let second = again.seen.lock().unwrap();
    let mut redone = 0;
    for a in 0..200 {
        let k = format!("a{a}");
        let mut all: Vec<i64> = first.get(&k).cloned().unwrap_or_default();
        all.extend(second.get(&k).cloned().unwrap_or_default());
        all.sort();
        let unique: std::collections::BTreeSet<i64> = all.iter().copied().collect();
        assert_eq!(unique, (1..=10).collect(), "aggregate {k} lost an event");
        redone += all.len() - unique.len();
        // The second run continues each aggregate in order.
        if let Some(v) = second.get(&k) {
            assert!(
                v.windows(2).all(|w| w[1] == w[0] + 1),
                "aggregate {k}: {v:?}"
            );
        }
    }
    assert!(
        redone <= 16,
        "{redone} events handled again; the window is 16"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_and_does_not_block_the_projection() {
    let env = env().await;
    seed(&env, 50, 4).await;
    let mut slow = Slow::new(8, 1);
    slow.poison = Some("a7".into());
    let slow = Arc::new(slow);
    let r = runner(&env, slow.clone());
    let (stop, h) = spawn(r);
    wait_until(Duration::from_secs(30), "caught up", || async {
        let status =
            projectionist::status(&env.store, &[Registered::concurrent(slow.clone()).unwrap()])
                .await
                .unwrap();
        !status.is_empty() && status[0].lag_events == 0
    })
    .await;
    stop.send(()).unwrap();
    h.await.unwrap().unwrap();
    assert_eq!(slow.calls.load(Ordering::SeqCst), 199);
    let letters = projectionist::dead_letter::list(&env.store, Some("slow_io"))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].aggregate_id, "a7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_catches_up_in_concurrency_mode() {
    let env = env().await;
    seed(&env, 100, 3).await;
    let slow = Arc::new(Slow::new(16, 1));
    let r = runner(&env, slow.clone());
    wait_until(Duration::from_secs(30), "caught up with --once", || async {
        r.run_once().await.unwrap();
        slow.calls.load(Ordering::SeqCst) >= 300
    })
    .await;
    assert_eq!(slow.calls.load(Ordering::SeqCst), 300);
    assert_in_order(&slow.seen.lock().unwrap(), 3);
}
