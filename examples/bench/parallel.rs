//! The `parallel_io` case: an I/O-bound handler in concurrency mode
//! against the same handler in sequential mode, checking the concurrency
//! contract (per-aggregate order, no overlap, every event once) as it goes.

use crate::events::EVENT_TYPE;
use crate::projections::{SleepConcurrent, SleepSequential, IO_PAR_TYPE, IO_SEQ_TYPE, IO_SLEEP};
use crate::raw::RAW_INSERT;
use crate::setup::{Bench, SEED_CHUNK};
use crate::stats::{ev_s, mark, median, rate, round};
use projectionist::{Registered, RunnerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_postgres::Client;
use uuid::Uuid;

impl Bench {
    /// Appends `n` events of `aggregate_type`, each to one of `aggregates`
    /// streams picked at random by `rng` (versions kept), with the raw INSERT.
    async fn insert_events(
        rng: &mut StdRng,
        client: &Client,
        aggregate_type: &str,
        n: usize,
        aggregates: usize,
    ) {
        let stmt = client
            .prepare(RAW_INSERT)
            .await
            .expect("prepare RAW_INSERT");
        let names: Vec<String> = (0..aggregates)
            .map(|a| format!("{}-{a:05}", aggregate_type.to_lowercase()))
            .collect();
        let mut versions = vec![0i64; aggregates];
        let mut left = n;
        while left > 0 {
            let k = left.min(SEED_CHUNK);
            left -= k;
            let (mut ids, mut aids, mut vers, mut payloads) = (
                Vec::with_capacity(k),
                Vec::with_capacity(k),
                Vec::with_capacity(k),
                Vec::with_capacity(k),
            );
            for _ in 0..k {
                let a = rng.gen_range(0..aggregates);
                versions[a] += 1;
                ids.push(Uuid::now_v7());
                aids.push(names[a].as_str());
                vers.push(versions[a]);
                payloads.push(format!(r#"{{"amount": {}}}"#, rng.gen_range(1..=10_000)));
            }
            client
                .execute(
                    &stmt,
                    &[
                        &ids,
                        &vec![aggregate_type; k],
                        &aids,
                        &vers,
                        &vec![EVENT_TYPE; k],
                        &payloads,
                        &vec!["{}"; k],
                    ],
                )
                .await
                .unwrap_or_else(|e| panic!("INSERT of {aggregate_type} events failed: {e}"));
        }
    }

    /// `parallel_io`: concurrency mode against sequential mode.
    pub async fn parallel_io(&mut self) {
        const SEQ_EVENTS: usize = 200;
        const PAR_EVENTS: usize = 5_000;
        let par_aggregates = self.args.io_aggregates as usize;
        let max_in_flight = self.args.io_max_in_flight as usize;
        let (db, store, client) = self.fresh_db().await;
        let (mut seq, mut par) = (Vec::new(), Vec::new());
        let (mut peak, mut out_of_order, mut overlapping, mut extra_calls) =
            (0usize, 0usize, 0usize, 0usize);
        for rep in 0..self.reps {
            // A fresh arrangement per repetition, from a seed of its own:
            // where same-aggregate events fall decides how often the window
            // waits on a chain (see docs/performance.md), so the median
            // covers several arrangements and does not depend on which
            // cases ran before.
            let mut rng = StdRng::seed_from_u64(4242 + u64::from(rep));
            client
                .batch_execute("TRUNCATE events RESTART IDENTITY")
                .await
                .expect("TRUNCATE events failed");
            Self::insert_events(&mut rng, &client, IO_SEQ_TYPE, SEQ_EVENTS, SEQ_EVENTS).await;
            Self::insert_events(&mut rng, &client, IO_PAR_TYPE, PAR_EVENTS, par_aggregates).await;
            client
                .batch_execute("ANALYZE events")
                .await
                .expect("ANALYZE events failed");
            for side in 0..2 {
                if (side == 0) == (rep % 2 == 0) {
                    let d = self
                        .catchup_count(
                            &store,
                            &client,
                            SEQ_EVENTS as u64,
                            Registered::new(Arc::new(SleepSequential))
                                .expect("cannot register the projection"),
                            RunnerConfig::default(),
                        )
                        .await;
                    seq.push(rate(SEQ_EVENTS as u64, d));
                } else {
                    let p = Arc::new(SleepConcurrent {
                        max_in_flight,
                        ..SleepConcurrent::default()
                    });
                    let d = self
                        .catchup_count(
                            &store,
                            &client,
                            PAR_EVENTS as u64,
                            Registered::concurrent(p.clone())
                                .expect("cannot register the projection"),
                            RunnerConfig::default(),
                        )
                        .await;
                    par.push(rate(PAR_EVENTS as u64, d));
                    let last_versions: i64 = p.versions.lock().expect("poisoned").values().sum();
                    assert_eq!(
                        last_versions, PAR_EVENTS as i64,
                        "parallel_io: not every aggregate's events were all handled"
                    );
                    peak = peak.max(p.peak.load(Ordering::SeqCst));
                    out_of_order += p.out_of_order.load(Ordering::Relaxed);
                    overlapping += p.overlapping.load(Ordering::Relaxed);
                    extra_calls += p.calls.load(Ordering::Relaxed).saturating_sub(PAR_EVENTS);
                }
            }
            self.progress(format!(
                "parallel_io rep {}/{}: concurrency mode {} ({PAR_EVENTS} events, {par_aggregates} aggregates, \
                 max_in_flight {max_in_flight}, peak running {peak}), sequential {} ({SEQ_EVENTS} events); \
                 {} ms per event",
                rep + 1,
                self.reps,
                ev_s(par[par.len() - 1]),
                ev_s(seq[seq.len() - 1]),
                IO_SLEEP.as_millis()
            ));
        }
        if out_of_order + overlapping + extra_calls > 0 {
            eprintln!(
                "           parallel_io: LIBRARY PROBLEM: {out_of_order} events out of aggregate order, \
                 {overlapping} overlapping handlers of one aggregate, {extra_calls} extra handler calls"
            );
        }
        let (l, r) = (median(&par), median(&seq));
        let ratio = l / r;
        let ideal = max_in_flight as f64 / IO_SLEEP.as_secs_f64();
        self.json.insert(
            "parallel_io".into(),
            json!({"events_per_s": round(l, 0), "sequential_events_per_s": round(r, 1),
                   "ratio": round(ratio, 1), "max_in_flight": max_in_flight,
                   "peak_running": peak, "ideal_events_per_s": round(ideal, 0),
                   "events": PAR_EVENTS, "aggregates": par_aggregates,
                   "sequential_events": SEQ_EVENTS, "handler_sleep_ms": IO_SLEEP.as_millis() as u64,
                   "out_of_order": out_of_order, "overlapping": overlapping,
                   "extra_handler_calls": extra_calls}),
        );
        self.row(
            &format!("parallel_io (10 ms handler, {max_in_flight} in flight)"),
            format!("{} (peak {peak} running)", ev_s(l)),
            format!("{} (sequential mode)", ev_s(r)),
            format!("{ratio:.1}"),
            format!("ratio ≥ 40 {}", mark(ratio >= 40.0)),
        );
        drop((store, client));
        self.dbs.push(db);
    }
}
