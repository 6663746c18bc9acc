//! The `append_breakdown` diagnostic (opt-in: `--only append_breakdown`):
//! where a lone writer's single-event append spends its time, path by
//! path, from `EventStore::append` down to a raw `INSERT … VALUES`.
//!
//! Each round runs a block of single-event appends through every path, in
//! an order shuffled per round (a path that always followed the notifying
//! store would inherit its notifications), each path to streams of its
//! own that already hold events (so the stream-head read fetches a row,
//! as in `append_batch_1`). The mean per append of each path, and the
//! steps between neighbours, say what each layer costs: the
//! notification, the shared-append queue, the store's code, the pool,
//! the library's statement against the raw ones.

use crate::raw::RAW_INSERT;
use crate::setup::Bench;
use crate::stats::round;
use projectionist::{EventStore, ExpectedVersion, NewEvent};
use rand::seq::SliceRandom;
use serde_json::json;
use std::time::Instant;
use tokio_postgres::Client;
use uuid::Uuid;

/// Appends per path and round.
const BLOCK: usize = 20;
/// Rounds per repetition.
const ROUNDS: usize = 100;
/// Events each stream holds before the rounds.
const SEEDED_PER_STREAM: i64 = 5;

/// The paths, outermost first.
const PATHS: [&str; 7] = [
    "EventStore::append (default)",
    "  notify_channel(None)",
    "  notify_channel(None), append_lanes(0)",
    "the library's statement through the store's pool",
    "the library's statement, raw client",
    "raw INSERT (unnest, the append cases' baseline)",
    "raw INSERT ... VALUES",
];

const RAW_VALUES: &str = "INSERT INTO events (event_id, aggregate_type, aggregate_id, \
     aggregate_version, event_type, payload, metadata) \
     VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::jsonb)";

/// The library's single-event append statement as its pool prepared it
/// (read back from `pg_prepared_statements` after an append, so that the
/// diagnostic follows the library's SQL instead of copying it).
async fn library_statement(store: &EventStore) -> String {
    let client = store
        .pool()
        .get()
        .await
        .unwrap_or_else(|e| panic!("cannot get a pooled connection: {e}"));
    let rows = client
        .query(
            "SELECT statement FROM pg_prepared_statements \
             WHERE statement LIKE 'INSERT INTO%' AND statement NOT LIKE '%unnest%' \
               AND statement NOT LIKE '%pg_notify%'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("cannot read pg_prepared_statements: {e}"));
    match rows.as_slice() {
        [row] => row.get(0),
        _ => panic!(
            "expected the library's one single-event append statement among the pooled \
             connection's prepared statements, found {}",
            rows.len()
        ),
    }
}

impl Bench {
    /// The `append_breakdown` diagnostic on a fresh database.
    pub async fn append_breakdown(&mut self) {
        let (db, default_store, admin) = self.fresh_db().await;
        let config = self.lib_config(&db);
        let quiet = EventStore::connect_config(
            config.clone(),
            self.writer_store_config()
                .notify_channel(None)
                .expect("no channel is valid"),
        )
        .unwrap_or_else(|e| panic!("cannot build the store: {e}"));
        let unshared = EventStore::connect_config(
            config,
            self.writer_store_config()
                .notify_channel(None)
                .expect("no channel is valid")
                .append_lanes(0),
        )
        .unwrap_or_else(|e| panic!("cannot build the store: {e}"));
        let mut raw: Vec<Client> = Vec::new();
        for _ in 0..3 {
            raw.push(
                db.connect()
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect: {e}")),
            );
        }
        let values = raw[2]
            .prepare(RAW_VALUES)
            .await
            .unwrap_or_else(|e| panic!("cannot prepare RAW_VALUES: {e}"));
        // Seed every path's streams with raw inserts (no path's
        // connection is warmer for it).
        let stream = |path: usize, s: usize| format!("b{path}-{s}");
        for path in 0..PATHS.len() {
            for s in 0..BLOCK {
                for v in 1..=SEEDED_PER_STREAM {
                    raw[2]
                        .execute(
                            &values,
                            &[
                                &Uuid::now_v7(),
                                &"Account",
                                &stream(path, s),
                                &v,
                                &"MoneyDeposited",
                                &r#"{"amount": 1}"#,
                                &"{}",
                            ],
                        )
                        .await
                        .unwrap_or_else(|e| panic!("seeding failed: {e}"));
                }
            }
        }
        let mut versions = vec![vec![SEEDED_PER_STREAM; BLOCK]; PATHS.len()];
        // One single-event append prepares the library's statement on the
        // unshared store's connection, where it is read back.
        unshared
            .append(
                "Account",
                "b-prepare",
                ExpectedVersion::NoStream,
                &[NewEvent::from_json("MoneyDeposited", r#"{"amount": 1}"#)],
            )
            .await
            .unwrap_or_else(|e| panic!("the first append failed: {e}"));
        let library_sql = library_statement(&unshared).await;
        let lib_on_raw = raw[0]
            .prepare(&library_sql)
            .await
            .unwrap_or_else(|e| panic!("cannot prepare the library's statement: {e}"));
        let unnest = raw[1]
            .prepare(RAW_INSERT)
            .await
            .unwrap_or_else(|e| panic!("cannot prepare RAW_INSERT: {e}"));
        let stores = [&default_store, &quiet, &unshared];
        let rounds = ROUNDS * self.reps as usize;
        // Round 0 warms every path (its connections, statements and
        // streams) and is not counted.
        let mut totals = vec![0f64; PATHS.len()];
        let mut order: Vec<usize> = (0..PATHS.len()).collect();
        for r in 0..=rounds {
            order.shuffle(&mut self.rng);
            for &path in &order {
                // Built before the clock starts, as the append cases' plans.
                let block: Vec<(String, i64, Uuid, String, NewEvent)> = (0..BLOCK)
                    .map(|s| {
                        let id = Uuid::now_v7();
                        let payload = format!(r#"{{"amount": {}}}"#, r * BLOCK + s);
                        let e = NewEvent::from_json("MoneyDeposited", payload.clone())
                            .with_event_id(id);
                        (stream(path, s), versions[path][s], id, payload, e)
                    })
                    .collect();
                let start = Instant::now();
                for (stream, expected, id, payload, e) in &block {
                    let lib_params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
                        &"Account",
                        stream,
                        &Some(*expected),
                        id,
                        &"MoneyDeposited",
                        &1i32,
                        payload,
                        &"{}",
                    ];
                    let written = match path {
                        0..=2 => stores[path]
                            .append(
                                "Account",
                                stream,
                                ExpectedVersion::Exact(*expected),
                                std::slice::from_ref(e),
                            )
                            .await
                            .map(|_| 1)
                            .map_err(|e| e.to_string()),
                        3 => {
                            let c = unshared
                                .pool()
                                .get()
                                .await
                                .unwrap_or_else(|e| panic!("no pooled connection: {e}"));
                            let stmt = c
                                .prepare_cached(&library_sql)
                                .await
                                .unwrap_or_else(|e| panic!("prepare failed: {e}"));
                            c.query(&stmt, &lib_params)
                                .await
                                .map(|rows| rows.len() as u64)
                                .map_err(|e| e.to_string())
                        }
                        4 => raw[0]
                            .query(&lib_on_raw, &lib_params)
                            .await
                            .map(|rows| rows.len() as u64)
                            .map_err(|e| e.to_string()),
                        5 => raw[1]
                            .execute(
                                &unnest,
                                &[
                                    &vec![*id],
                                    &vec!["Account"],
                                    &vec![stream.as_str()],
                                    &vec![expected + 1],
                                    &vec!["MoneyDeposited"],
                                    &vec![payload.as_str()],
                                    &vec!["{}"],
                                ],
                            )
                            .await
                            .map_err(|e| e.to_string()),
                        _ => raw[2]
                            .execute(
                                &values,
                                &[
                                    id,
                                    &"Account",
                                    stream,
                                    &(expected + 1),
                                    &"MoneyDeposited",
                                    payload,
                                    &"{}",
                                ],
                            )
                            .await
                            .map_err(|e| e.to_string()),
                    };
                    match written {
                        Ok(1) => {}
                        other => panic!("append_breakdown: {} wrote {other:?}", PATHS[path]),
                    }
                }
                if r > 0 {
                    totals[path] += start.elapsed().as_secs_f64() * 1e6 / BLOCK as f64;
                }
                for v in versions[path].iter_mut() {
                    *v += 1;
                }
            }
            if r > 0 && r % ROUNDS == 0 {
                self.progress(format!(
                    "append_breakdown: {r} of {rounds} rounds ({BLOCK} appends per path each)"
                ));
            }
        }
        let means: Vec<f64> = totals.iter().map(|t| t / rounds as f64).collect();
        let mut paths = Vec::new();
        for (path, name) in PATHS.iter().enumerate() {
            let step = means
                .get(path + 1)
                .map(|next| means[path] - next)
                .unwrap_or(0.0);
            self.row(
                &format!("append_breakdown: {}", name.trim()),
                format!("{:.1} µs/append", means[path]),
                "—".into(),
                format!("{:.2}", means[5] / means[path]),
                if path + 1 < PATHS.len() {
                    format!("{step:+.1} µs over the next path")
                } else {
                    "—".into()
                },
            );
            paths.push(
                json!({"path": name.trim(), "mean_us": round(means[path], 1),
                              "ratio_to_raw_unnest": round(means[5] / means[path], 3)}),
            );
        }
        self.json.insert(
            "append_breakdown".into(),
            json!({"rounds": rounds, "appends_per_path_per_round": BLOCK, "paths": paths}),
        );
        drop((default_store, quiet, unshared, admin, raw));
        self.dbs.push(db);
    }
}
