//! The append cases: `append_batch_*` (`EventStore::append` against a raw
//! multi-row INSERT of the same rows, with one or eight writers) and
//! `append_copy_bulk` (against one binary COPY).

use crate::events::{append_plan, plan_events, stamp_ids, Batch, Part, AGGREGATE_TYPE};
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
    ("append_batch_1_32_writers", 1, 32),
];

/// How many parts the library's and the raw plan are run in, alternately.
const PARTS: usize = 8;

/// Runs part `part` of a plan through `EventStore::append`, one task per
/// writer.
async fn library_appends(store: &EventStore, plan: &Arc<Vec<Vec<Batch>>>, part: Part) -> Duration {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..plan.len() {
        let (store, plan) = (store.clone(), plan.clone());
        tasks.spawn(async move {
            for b in part.of(&plan[w]) {
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
        let most_writers = APPEND_CASES.iter().map(|c| c.2).max().unwrap_or(1);
        for _ in 0..most_writers {
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
            let probe = Arc::new(append_plan(&mut self.rng, "", writers, batch, probe_events));
            truncate().await;
            let d = library_appends(store, &probe, Part::ALL).await;
            truncate().await;
            raw_appends(&raw_clients, &probe, Part::ALL).await;
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
            // Per repetition, the library and the raw INSERT each write a
            // plan of their own into one table, part by part, alternating
            // which goes first: a disk whose flushes slow down or speed up
            // for a few seconds (common on shared machines) then weighs on
            // both sides alike. The ratio is the median of the repetitions'
            // ratios.
            let (mut lib, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut events = 0;
            for rep in 0..self.reps {
                let mut lib_plan = append_plan(&mut self.rng, "L", writers, batch, total);
                let mut raw_plan = append_plan(&mut self.rng, "R", writers, batch, total);
                // Which side runs first in each part.
                let order = |index: usize| {
                    [
                        (rep as usize + index) % 2 == 0,
                        (rep as usize + index) % 2 == 1,
                    ]
                };
                // Event ids in the order they will be written (see
                // `stamp_ids`): neither side's inserts land below the other's.
                for index in 0..PARTS {
                    let part = Part {
                        index,
                        parts: PARTS,
                    };
                    for run_lib in order(index) {
                        stamp_ids(
                            if run_lib {
                                &mut lib_plan
                            } else {
                                &mut raw_plan
                            },
                            part,
                        );
                    }
                }
                let (lib_plan, raw_plan) = (Arc::new(lib_plan), Arc::new(raw_plan));
                events = plan_events(&lib_plan) as u64;
                truncate().await;
                let (mut lib_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
                for index in 0..PARTS {
                    let part = Part {
                        index,
                        parts: PARTS,
                    };
                    for run_lib in order(index) {
                        if run_lib {
                            lib_time += library_appends(store, &lib_plan, part).await;
                        } else {
                            raw_time += raw_appends(&raw_clients, &raw_plan, part).await;
                        }
                    }
                }
                lib.push(rate(events, lib_time));
                raw.push(rate(events, raw_time));
                ratios.push(lib[lib.len() - 1] / raw[raw.len() - 1]);
                self.progress(format!(
                    "{name} rep {}/{}: projectionist {}, raw INSERT {}, ratio {:.2} ({events} events each, {batch}/batch, {writers} writer(s), {PARTS} alternating parts)",
                    rep + 1,
                    self.reps,
                    ev_s(lib[lib.len() - 1]),
                    ev_s(raw[raw.len() - 1]),
                    ratios[ratios.len() - 1],
                ));
            }
            let (l, r) = (median(&lib), median(&raw));
            if name == "append_batch_1000" {
                lib_1000 = Some((l, total));
            }
            if !self.wants(name) {
                continue;
            }
            let ratio = median(&ratios);
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
            let plan = append_plan(&mut self.rng, "", 1, 1000, total.max(100_000));
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
