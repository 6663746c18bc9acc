//! The catch-up cases: `catchup_noop` (the engine's overhead over a raw
//! keyset reader), `catchup_large_payload` (the same over 2 KB payloads)
//! and `catchup_read_model[_batch]` (a balances read model kept per event
//! or per batch, against the same work in raw SQL), and the library
//! catch-up loop the `parallel_io` case shares.

use crate::projections::{BalancesBatch, BalancesPerEvent, Noop};
use crate::raw::{self, RAW_CHECKPOINT_NAME};
use crate::setup::{Bench, Seeded};
use crate::stats::{ev_s, mark, median, rate, round};
use projectionist::{EventStore, Projection, Registered, Runner, RunnerConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Events of the `catchup_large_payload` case (issue 15: 200,000).
pub const LARGE_PAYLOAD_EVENTS: u64 = 200_000;
/// Payload size of the `catchup_large_payload` case, in bytes of JSON text.
pub const LARGE_PAYLOAD_BYTES: usize = 2_048;
/// Catch-ups of each side per repetition of `catchup_noop`,
/// `catchup_large_payload`, `catchup_read_model_batch` and `catchup_upcast`, library and raw
/// alternately (see [`Bench::noop_against_raw`]).
pub const PASSES: usize = 4;

/// A projection's runner, kept across a case's catch-ups the way the raw
/// side keeps its one client: the runner's pool opens its connections and
/// prepares its statements in the case's untimed warm-up, not inside a
/// timed catch-up (a fresh runner per catch-up cost about 10 ms of
/// connecting and preparing, 3% of a 200,000-event catch-up, that the raw
/// side never paid).
pub struct LibRunner {
    runner: Runner,
    name: String,
}

impl LibRunner {
    /// A runner of `projection` alone over `store`.
    pub fn new(store: &EventStore, projection: Registered, config: RunnerConfig) -> LibRunner {
        let name = projection.name().to_owned();
        let runner = Runner::new(store.clone(), config)
            .with_registered(projection)
            .expect("cannot register the projection");
        LibRunner { runner, name }
    }

    /// A runner of the transactional `projection` alone over `store`.
    pub fn of(
        store: &EventStore,
        projection: Arc<dyn Projection>,
        config: RunnerConfig,
    ) -> LibRunner {
        let projection = Registered::new(projection).expect("cannot register the projection");
        LibRunner::new(store, projection, config)
    }
}

impl Bench {
    /// A catch-up of all of `s`'s events by `runner` from the start.
    pub async fn library_catchup(&self, s: &Seeded, runner: &LibRunner) -> Duration {
        self.catchup_on(runner, &s.client, s.events).await
    }

    /// `run_once` of a fresh runner of `projection` (connections and
    /// statements made inside the timed catch-up): for cases whose
    /// baseline is another library catch-up, or far from the ratio.
    pub async fn catchup_count(
        &self,
        store: &EventStore,
        client: &Client,
        expected: u64,
        projection: Registered,
        config: RunnerConfig,
    ) -> Duration {
        let runner = LibRunner::new(store, projection, config);
        self.catchup_on(&runner, client, expected).await
    }

    /// `run_once` of `r` from a deleted checkpoint until it has handled
    /// `expected` more events (looping if an open transaction elsewhere
    /// held the watermark back); the wall time.
    pub async fn catchup_on(&self, r: &LibRunner, client: &Client, expected: u64) -> Duration {
        let name = &r.name;
        client
            .execute(
                "DELETE FROM projection_checkpoints WHERE projection_name = $1",
                &[name],
            )
            .await
            .expect("cannot reset the checkpoint");
        let before = r.runner.progress().events_handled();
        let handled = || r.runner.progress().events_handled() - before;
        let start = Instant::now();
        loop {
            r.runner
                .run_once()
                .await
                .unwrap_or_else(|e| panic!("{name}: run_once failed: {e}"));
            if handled() >= expected {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "{name}: handled {} of {expected} events after 60s: is a transaction held open on the server?",
                    handled(),
                );
            }
            self.progress(format!(
                "{name}: only {} of {expected} events handled after run_once (open transaction elsewhere?); retrying",
                handled(),
            ));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    async fn check_balances(&self, s: &Seeded, who: &str) {
        let row = s
            .client
            .query_one(
                "SELECT coalesce(sum(event_count), 0)::int8, coalesce(sum(balance), 0)::int8 FROM bench_balances",
                &[],
            )
            .await
            .expect("cannot read bench_balances");
        let (count, sum): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            (count, sum),
            (s.events as i64, s.amount),
            "{who}: bench_balances totals are wrong"
        );
    }

    async fn reset_raw_checkpoint(&self, s: &Seeded) {
        s.client
            .execute(
                "UPDATE projection_checkpoints SET last_global_position = 0, events_handled = 0 \
                 WHERE projection_name = $1",
                &[&RAW_CHECKPOINT_NAME],
            )
            .await
            .expect("cannot reset the raw checkpoint");
    }

    /// `catchup_noop`: the no-op projection against the raw keyset reader.
    pub async fn catchup_noop(&mut self, s: &Seeded) {
        let (l, r, ratio) = self.noop_against_raw(s, "catchup_noop").await;
        self.json.insert(
            "catchup_noop".into(),
            json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                   "ratio": round(ratio, 3), "events": s.events, "batch_size": self.batch,
                   "catchups_per_side_per_rep": PASSES}),
        );
        self.row(
            "catchup_noop",
            ev_s(l),
            ev_s(r),
            format!("{ratio:.2}"),
            format!("ratio ≥ 1.0 {}", mark(ratio >= 1.0)),
        );
    }

    /// `catchup_large_payload`: the no-op projection against the raw keyset
    /// reader, like `catchup_noop`, over [`LARGE_PAYLOAD_EVENTS`] events of
    /// [`LARGE_PAYLOAD_BYTES`]-byte payloads (stored out of line), seeded
    /// into a database of its own.
    pub async fn catchup_large_payload(&mut self) {
        let s = self
            .seeded_with(LARGE_PAYLOAD_EVENTS, LARGE_PAYLOAD_BYTES)
            .await;
        let (l, r, ratio) = self.noop_against_raw(&s, "catchup_large_payload").await;
        let mb_s = |ev: f64| round(ev * LARGE_PAYLOAD_BYTES as f64 / 1e6, 1);
        self.json.insert(
            "catchup_large_payload".into(),
            json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                   "ratio": round(ratio, 3), "events": s.events, "batch_size": self.batch,
                   "catchups_per_side_per_rep": PASSES, "payload_bytes": LARGE_PAYLOAD_BYTES,
                   "payload_mb_per_s": mb_s(l), "raw_payload_mb_per_s": mb_s(r)}),
        );
        self.row(
            &format!("catchup_large_payload ({LARGE_PAYLOAD_BYTES} B payloads)"),
            ev_s(l),
            ev_s(r),
            format!("{ratio:.2}"),
            "— (reported)".into(),
        );
        self.dbs.push(s.db);
    }

    /// The no-op projection's catch-up of `s` against the raw keyset
    /// reader's, after an untimed warm-up of both. Each repetition runs
    /// [`PASSES`] catch-ups of each side, alternately (which side goes
    /// first alternates too), and its ratio is the ratio of the two sides'
    /// totals: one catch-up takes well under a second here, so a few
    /// seconds of a busy neighbour landed on one side when each ran once.
    /// Returns the medians of the repetitions' rates (library, raw) and of
    /// their ratios.
    async fn noop_against_raw(&mut self, s: &Seeded, case: &str) -> (f64, f64, f64) {
        // Untimed warm-up of both sides (caches, connections, plans).
        let runner = LibRunner::of(
            &s.store,
            Arc::new(Noop {
                name: "bench_noop".into(),
            }),
            self.catchup_config(),
        );
        self.library_catchup(s, &runner).await;
        self.reset_raw_checkpoint(s).await;
        raw::catchup_noop(&s.client, s.events, self.batch).await;
        let (mut lib, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..self.reps {
            let (mut lib_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
            for pass in 0..PASSES {
                for side in 0..2 {
                    if (side == 0) == ((rep as usize + pass) % 2 == 0) {
                        lib_time += self.library_catchup(s, &runner).await;
                    } else {
                        self.reset_raw_checkpoint(s).await;
                        raw_time += raw::catchup_noop(&s.client, s.events, self.batch).await;
                    }
                }
            }
            let events = s.events * PASSES as u64;
            lib.push(rate(events, lib_time));
            raw.push(rate(events, raw_time));
            ratios.push(lib[lib.len() - 1] / raw[raw.len() - 1]);
            self.progress(format!(
                "{case} rep {}/{}: projectionist {}, raw keyset {}, ratio {:.2} ({} events, page {}, \
                 {PASSES} alternating catch-ups each)",
                rep + 1,
                self.reps,
                ev_s(lib[lib.len() - 1]),
                ev_s(raw[raw.len() - 1]),
                ratios[ratios.len() - 1],
                s.events,
                self.batch
            ));
        }
        (median(&lib), median(&raw), median(&ratios))
    }

    /// `catchup_read_model` (per-event handler) or, with `batch`,
    /// `catchup_read_model_batch`, against the raw one-statement page.
    pub async fn catchup_read_model(&mut self, s: &Seeded, batch: bool) {
        let name = if batch {
            "catchup_read_model_batch"
        } else {
            "catchup_read_model"
        };
        let p: Arc<dyn Projection> = if batch {
            Arc::new(BalancesBatch)
        } else {
            Arc::new(BalancesPerEvent)
        };
        let runner = LibRunner::of(&s.store, p, self.catchup_config());
        // Untimed warm-up of the runner (connections, statements); the raw
        // side's client is warm from seeding.
        s.client
            .batch_execute("TRUNCATE bench_balances")
            .await
            .expect("TRUNCATE bench_balances failed");
        self.library_catchup(s, &runner).await;
        let (mut lib, mut raw, mut raw_per_event, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..self.reps {
            if !batch {
                s.client
                    .batch_execute("TRUNCATE bench_balances")
                    .await
                    .expect("TRUNCATE bench_balances failed");
                self.reset_raw_checkpoint(s).await;
                let d = raw::catchup_per_event(&s.client, s.events, self.batch).await;
                self.check_balances(s, "raw per-event").await;
                raw_per_event.push(rate(s.events, d));
            }
            // The batch case alternates [`PASSES`] catch-ups of each side
            // per repetition (like `noop_against_raw`); the per-event case,
            // four times slower, one.
            let passes = if batch { PASSES } else { 1 };
            let (mut lib_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
            for pass in 0..passes {
                for side in 0..2 {
                    s.client
                        .batch_execute("TRUNCATE bench_balances")
                        .await
                        .expect("TRUNCATE bench_balances failed");
                    if (side == 0) == ((rep as usize + pass) % 2 == 0) {
                        lib_time += self.library_catchup(s, &runner).await;
                        self.check_balances(s, name).await;
                    } else {
                        self.reset_raw_checkpoint(s).await;
                        raw_time += raw::catchup_read_model(&s.client, s.events, self.batch).await;
                        self.check_balances(s, "raw read model").await;
                    }
                }
            }
            let events = s.events * passes as u64;
            lib.push(rate(events, lib_time));
            raw.push(rate(events, raw_time));
            ratios.push(lib[lib.len() - 1] / raw[raw.len() - 1]);
            self.progress(format!(
                "{name} rep {}/{}: projectionist {}, raw SQL {}{}, ratio {:.2} ({} events, {passes} \
                 alternating catch-up(s) each)",
                rep + 1,
                self.reps,
                ev_s(lib[lib.len() - 1]),
                ev_s(raw[raw.len() - 1]),
                raw_per_event
                    .last()
                    .map(|r| format!(", raw per-event upserts {}", ev_s(*r)))
                    .unwrap_or_default(),
                ratios[ratios.len() - 1],
                s.events
            ));
        }
        let (l, r) = (median(&lib), median(&raw));
        let ratio = median(&ratios);
        let mut entry = json!({"events_per_s": round(l, 0), "raw_events_per_s": round(r, 0),
                               "ratio": round(ratio, 3), "events": s.events,
                               "accounts": self.args.accounts, "batch_size": self.batch});
        let target = if batch {
            entry["catchups_per_side_per_rep"] = json!(PASSES);
            format!("ratio ≥ 0.9 {}", mark(ratio >= 0.9))
        } else {
            entry["note"] = json!("per-event handler (pipelined) run over events/4");
            let rpe = median(&raw_per_event);
            entry["raw_per_event_events_per_s"] = round(rpe, 0);
            entry["ratio_to_raw_per_event"] = round(l / rpe, 3);
            format!(
                "≥ 25,000 ev/s {} (raw per-event upserts: {}, ratio {:.2})",
                mark(l >= 25_000.0),
                ev_s(rpe),
                l / rpe
            )
        };
        self.json.insert(name.into(), entry);
        let label = if batch {
            name.to_owned()
        } else {
            format!("{name} ({} events)", s.events)
        };
        self.row(&label, ev_s(l), ev_s(r), format!("{ratio:.2}"), target);
    }
}
