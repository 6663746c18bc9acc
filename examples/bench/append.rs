//! The append cases: `append_batch_*` (`EventStore::append` against a raw
//! multi-row INSERT of the same rows, with one or eight writers) and
//! `append_copy_bulk` (against one binary COPY).

use crate::events::{append_plan, plan_events, Batch, AGGREGATE_TYPE};
use crate::raw::{raw_appends, raw_copy, RAW_INSERT};
use crate::setup::Bench;
use crate::stats::{ev_s, mark, median, rate, round};
use projectionist::testing::TestDatabase;
use projectionist::{EventStore, ExpectedVersion};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// The append cases: (name, events per batch, writers).
pub const APPEND_CASES: &[(&str, usize, usize)] = &[
    ("append_batch_1", 1, 1),
    ("append_batch_10", 10, 1),
    ("append_batch_100", 100, 1),
    ("append_batch_1000", 1000, 1),
    ("append_batch_1_8_writers", 1, 8),
    ("append_batch_100_8_writers", 100, 8),
];

/// Runs a plan through `EventStore::append`, one task per writer.
async fn library_appends(store: &EventStore, plan: &Arc<Vec<Vec<Batch>>>) -> Duration {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..plan.len() {
        let (store, plan) = (store.clone(), plan.clone());
        tasks.spawn(async move {
            for b in &plan[w] {
                store
                    .append(
                        AGGREGATE_TYPE,
                        &b.stream,
                        ExpectedVersion::Exact(b.expected),
                        &b.events,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("library append failed: {e}"));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a library append writer panicked");
    }
    start.elapsed()
}

impl Bench {
    /// The `append_batch_*` cases selected, and `append_copy_bulk`, on
    /// `db` (its events table is truncated before and after each run).
    pub async fn append_cases(&mut self, db: &TestDatabase, store: &EventStore, admin: &Client) {
        let truncate = || async {
            admin
                .batch_execute("TRUNCATE events RESTART IDENTITY")
                .await
                .expect("TRUNCATE events failed");
        };
        let mut raw_clients = Vec::new();
        for _ in 0..8 {
            let c = db
                .connect()
                .await
                .unwrap_or_else(|e| panic!("cannot connect: {e}"));
            let stmt = c
                .prepare(RAW_INSERT)
                .await
                .expect("cannot prepare RAW_INSERT");
            raw_clients.push((Arc::new(c), stmt));
        }
        let target_secs = if self.args.quick { 0.6 } else { 1.8 };
        let mut lib_1000: Option<(f64, usize)> = None;
        for &(name, batch, writers) in APPEND_CASES {
            let wanted =
                self.wants(name) || (name == "append_batch_1000" && self.wants("append_copy_bulk"));
            if !wanted {
                continue;
            }
            // Probe (also warms the pool and the raw connections): size the
            // case so the library side runs about `target_secs`.
            let unit = batch * writers;
            let probe_events = (unit * 4).max(if batch == 1 { 1_500 } else { 4_000 });
            let probe = Arc::new(append_plan(&mut self.rng, writers, batch, probe_events));
            truncate().await;
            let d = library_appends(store, &probe).await;
            truncate().await;
            raw_appends(&raw_clients, &probe).await;
            let probe_rate = rate(plan_events(&probe) as u64, d);
            // Floors keep an unlucky probe (a slow fsync) from making a case
            // too short to measure.
            let floor = match batch {
                1 => 3_000,
                10 => 10_000,
                100 => 20_000,
                _ => 50_000,
            };
            let floor = if self.args.quick { floor / 4 } else { floor };
            let total = ((probe_rate * target_secs) as usize).clamp(floor.max(unit * 5), 400_000)
                / unit
                * unit;
            let plan = Arc::new(append_plan(&mut self.rng, writers, batch, total));
            let events = plan_events(&plan) as u64;
            let (mut lib, mut raw) = (Vec::new(), Vec::new());
            for rep in 0..self.reps {
                for run_lib in [rep % 2 == 0, rep % 2 == 1] {
                    truncate().await;
                    if run_lib {
                        lib.push(rate(events, library_appends(store, &plan).await));
                    } else {
                        raw.push(rate(events, raw_appends(&raw_clients, &plan).await));
                    }
                }
                self.progress(format!(
                    "{name} rep {}/{}: projectionist {}, raw INSERT {} ({events} events, {batch}/batch, {writers} writer(s))",
                    rep + 1,
                    self.reps,
                    ev_s(*lib.last().unwrap_or(&f64::NAN)),
                    ev_s(*raw.last().unwrap_or(&f64::NAN)),
                ));
            }
            let (l, r) = (median(&lib), median(&raw));
            if name == "append_batch_1000" {
                lib_1000 = Some((l, total));
            }
            if !self.wants(name) {
                continue;
            }
            let ratio = l / r;
            // Issue 15's goals.
            let goal = match name {
                "append_batch_100" => Some(0.9),
                "append_batch_1" | "append_batch_1_8_writers" => Some(0.85),
                _ => None,
            };
            let target = match goal {
                Some(g) => format!("ratio ≥ {g} {}", mark(ratio >= g)),
                None => "—".into(),
            };
            self.json.insert(
                name.into(),
                json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                       "ratio": round(ratio, 3), "events": events, "batch": batch, "writers": writers}),
            );
            self.row(name, ev_s(l), ev_s(r), format!("{ratio:.2}"), target);
        }
        if self.wants("append_copy_bulk") {
            let (l, total) = lib_1000.expect("append_batch_1000 ran");
            let plan = append_plan(&mut self.rng, 1, 1000, total.max(100_000));
            let events = plan_events(&plan) as u64;
            let copier = &raw_clients[0].0;
            let mut raw = Vec::new();
            for rep in 0..self.reps {
                truncate().await;
                raw.push(rate(events, raw_copy(copier, &plan).await));
                self.progress(format!(
                    "append_copy_bulk rep {}/{}: raw COPY {} ({events} rows)",
                    rep + 1,
                    self.reps,
                    ev_s(raw[raw.len() - 1])
                ));
            }
            let r = median(&raw);
            let ratio = l / r;
            self.json.insert(
                "append_copy_bulk".into(),
                json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                       "ratio": round(ratio, 3), "events": events,
                       "note": "events_per_s is the library's append_batch_1000 figure; raw is one binary COPY"}),
            );
            self.row(
                "append_copy_bulk (lib = batch 1000)",
                ev_s(l),
                format!("{} (COPY)", ev_s(r)),
                format!("{ratio:.2}"),
                "—".into(),
            );
        }
        truncate().await;
    }
}
