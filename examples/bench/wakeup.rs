//! The wake-up cases: the latency from an append's return to the handler's
//! start under the notify and the poll dispatcher, and the raw
//! LISTEN/NOTIFY floor.

use crate::events::{AGGREGATE_TYPE, EVENT_TYPE};
use crate::projections::Stamp;
use crate::setup::Bench;
use crate::stats::{fmt_latency, latencies, mark, median_stats, round};
use futures_util::StreamExt;
use projectionist::testing::TestDatabase;
use projectionist::{
    DispatcherKind, EventStore, ExpectedVersion, NewEvent, Runner, RunnerConfig, StoreConfig,
    DEFAULT_POLL_INTERVAL,
};
use rand::Rng;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

impl Bench {
    /// The wake-up cases selected, on `db` (an empty events table).
    pub async fn wakeup_cases(&mut self, db: &TestDatabase) {
        let notify_n = self
            .args
            .wakeups
            .unwrap_or(if self.args.quick { 200 } else { 1_000 });
        let poll_n = notify_n.min(if self.args.quick { 100 } else { 200 });
        let mut raw_listen = None;
        if self.wants("wakeup_raw_listen_ms") {
            let mut stats = Vec::new();
            for rep in 0..self.reps {
                let l = self.wakeup_raw(db, notify_n).await;
                self.progress(format!(
                    "wakeup_raw_listen_ms rep {}/{}: {} ({notify_n} INSERT + pg_notify)",
                    rep + 1,
                    self.reps,
                    fmt_latency(&l)
                ));
                stats.push(l);
            }
            let m = median_stats(&stats);
            self.json.insert(
                "wakeup_raw_listen_ms".into(),
                json!({"p50": round(m[0], 3), "p99": round(m[1], 3), "max": round(m[2], 3),
                       "appends": notify_n, "spacing_ms": "2-5"}),
            );
            self.row(
                "wakeup_raw_listen_ms",
                "—".into(),
                fmt_latency(&m),
                "—".into(),
                "—".into(),
            );
            raw_listen = Some(m);
        }
        if self.wants("wakeup_notify_ms") {
            let mut stats = Vec::new();
            for rep in 0..self.reps {
                let l = self
                    .wakeup_library(db, DispatcherKind::Notify, notify_n, (2, 5), rep)
                    .await;
                self.progress(format!(
                    "wakeup_notify_ms rep {}/{}: {} ({notify_n} appends)",
                    rep + 1,
                    self.reps,
                    fmt_latency(&l)
                ));
                stats.push(l);
            }
            let m = median_stats(&stats);
            self.json.insert(
                "wakeup_notify_ms".into(),
                json!({"p50": round(m[0], 3), "p99": round(m[1], 3), "max": round(m[2], 3),
                       "appends": notify_n, "spacing_ms": "2-5"}),
            );
            let ok = m[0] <= 1.0 && m[1] <= 2.0;
            self.row(
                "wakeup_notify_ms",
                fmt_latency(&m),
                raw_listen.map_or("—".into(), |r| {
                    format!("{} (raw LISTEN)", fmt_latency(&r))
                }),
                "—".into(),
                format!("p50 ≤ 1, p99 ≤ 2 ms {}", mark(ok)),
            );
        }
        if self.wants("wakeup_poll_ms") {
            let mut stats = Vec::new();
            for rep in 0..self.reps {
                let l = self
                    .wakeup_library(db, DispatcherKind::Poll, poll_n, (5, 25), rep)
                    .await;
                self.progress(format!(
                    "wakeup_poll_ms rep {}/{}: {} ({poll_n} appends, interval {} ms)",
                    rep + 1,
                    self.reps,
                    fmt_latency(&l),
                    DEFAULT_POLL_INTERVAL.as_millis()
                ));
                stats.push(l);
            }
            let m = median_stats(&stats);
            let interval = DEFAULT_POLL_INTERVAL.as_secs_f64() * 1000.0;
            self.json.insert(
                "wakeup_poll_ms".into(),
                json!({"p50": round(m[0], 3), "p99": round(m[1], 3), "max": round(m[2], 3),
                       "interval_ms": interval, "appends": poll_n, "spacing_ms": "5-25"}),
            );
            self.row(
                &format!("wakeup_poll_ms (interval {interval:.0} ms)"),
                fmt_latency(&m),
                "—".into(),
                "—".into(),
                format!(
                    "p99 ≤ {:.0} ms {}",
                    interval + 10.0,
                    mark(m[1] <= interval + 10.0)
                ),
            );
        }
    }

    /// Appends `n` single events, spaced at random within `spacing` ms, to
    /// a database a runner with `kind` is following; returns the latency
    /// statistics from append return to handler start.
    async fn wakeup_library(
        &mut self,
        db: &TestDatabase,
        kind: DispatcherKind,
        n: usize,
        spacing: (u64, u64),
        rep: u32,
    ) -> [f64; 3] {
        let label = format!("{kind:?}").to_lowercase();
        let runner_store = EventStore::connect_config(self.lib_config(db), StoreConfig::default())
            .expect("cannot build the runner's store");
        let writer = EventStore::connect_config(self.lib_config(db), self.writer_store_config())
            .expect("cannot build the writer's store");
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let runner = Runner::new(runner_store, RunnerConfig::default().dispatcher(kind))
            .with_projection(Arc::new(Stamp {
                name: format!("bench_wakeup_{label}"),
                seen: seen_tx,
            }))
            .expect("cannot register the projection");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            runner
                .run_until(async {
                    let _ = stop_rx.await;
                })
                .await
        });
        let stream = format!("wake-{label}-{rep}");
        let mut version = 0i64;
        let append = |v: i64| {
            let writer = writer.clone();
            let stream = stream.clone();
            async move {
                let e = NewEvent::from_json(EVENT_TYPE, r#"{"amount": 1}"#);
                writer
                    .append(AGGREGATE_TYPE, &stream, ExpectedVersion::Exact(v), &[e])
                    .await
                    .unwrap_or_else(|e| panic!("wake-up append failed: {e}"))
            }
        };
        // Warm up: wait until the runner handles an event, then a few more.
        let mut got: HashMap<i64, Instant> = HashMap::new();
        for i in 0..5 {
            let r = append(version).await;
            version = r.stream_version;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !got.contains_key(&r.last_position) {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, seen.recv()).await {
                    Ok(Some((pos, at))) => {
                        got.entry(pos).or_insert(at);
                    }
                    _ => panic!("the {label} runner did not handle warm-up event {i} within 10s"),
                }
            }
        }
        let mut sent = Vec::with_capacity(n);
        let gaps: Vec<u64> = (0..n)
            .map(|_| self.rng.gen_range(spacing.0..=spacing.1))
            .collect();
        for gap in gaps {
            tokio::time::sleep(Duration::from_millis(gap)).await;
            let r = append(version).await;
            sent.push((r.last_position, Instant::now()));
            version = r.stream_version;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.iter().any(|(p, _)| !got.contains_key(p)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, seen.recv()).await {
                Ok(Some((pos, at))) => {
                    got.entry(pos).or_insert(at);
                }
                _ => panic!("the {label} runner did not handle every event within 10s"),
            }
        }
        let _ = stop_tx.send(());
        running
            .await
            .expect("the runner task panicked")
            .unwrap_or_else(|e| panic!("the {label} runner failed: {e}"));
        latencies(&sent, &got, &label)
    }

    /// The raw floor: LISTEN on a plain connection, INSERT + pg_notify on
    /// another.
    async fn wakeup_raw(&mut self, db: &TestDatabase, n: usize) -> [f64; 3] {
        let (listener, mut connection) = db
            .config()
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot open the LISTEN connection: {e}"));
        let (tx, mut rx) = mpsc::unbounded_channel::<(i64, Instant)>();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(m)) = messages.next().await {
                if let AsyncMessage::Notification(n) = m {
                    if let Ok(pos) = n.payload().parse::<i64>() {
                        let _ = tx.send((pos, Instant::now()));
                    }
                }
            }
        });
        listener
            .batch_execute("LISTEN bench_raw")
            .await
            .expect("LISTEN failed");
        let writer = db
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e}"));
        let stmt = writer
            .prepare(
                "WITH ins AS (INSERT INTO events (event_id, aggregate_type, aggregate_id, \
                    aggregate_version, event_type, payload, metadata) \
                    VALUES ($1, 'Raw', $2, $3, 'MoneyDeposited', $4::text::jsonb, '{}') \
                    RETURNING global_position) \
                 SELECT pg_notify('bench_raw', global_position::text) FROM ins",
            )
            .await
            .expect("cannot prepare the raw notify INSERT");
        let stream = format!("raw-{}", Uuid::new_v4().simple());
        let mut sent = Vec::with_capacity(n);
        let gaps: Vec<u64> = (0..n).map(|_| self.rng.gen_range(2..=5)).collect();
        for (i, gap) in gaps.into_iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(gap)).await;
            writer
                .execute(
                    &stmt,
                    &[
                        &Uuid::now_v7(),
                        &stream,
                        &(i as i64 + 1),
                        &r#"{"amount": 1}"#,
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("raw notify INSERT failed: {e}"));
            sent.push(Instant::now());
        }
        // Map the i-th INSERT to its global position.
        let rows = writer
            .query(
                "SELECT global_position FROM events WHERE aggregate_type = 'Raw' AND aggregate_id = $1 \
                 ORDER BY aggregate_version",
                &[&stream],
            )
            .await
            .expect("cannot read back the raw events");
        let sent: Vec<(i64, Instant)> = rows.iter().map(|r| r.get::<_, i64>(0)).zip(sent).collect();
        let mut got = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent.iter().any(|(p, _)| !got.contains_key(p)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((pos, at))) => {
                    got.entry(pos).or_insert(at);
                }
                _ => panic!("raw LISTEN did not receive every notification within 10s"),
            }
        }
        drop(listener);
        driver.abort();
        latencies(&sent, &got, "raw listen")
    }
}
