//! The `partitions` case: catch-up of the seeded log by 1, 4 and 16 static
//! partitions, all running concurrently in this process.

use crate::projections::Noop;
use crate::setup::{Bench, Seeded};
use crate::stats::{ev_s, median, rate, round};
use projectionist::Runner;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// Partition counts of the `partitions` case.
const PARTITION_COUNTS: [i32; 3] = [1, 4, 16];

impl Bench {
    /// `partitions`: one concurrent catch-up per partition count.
    pub async fn partitions(&mut self, s: &Seeded) {
        let mut out = Map::new();
        for total in PARTITION_COUNTS {
            let name = format!("bench_partitions_{total}");
            let mut rates = Vec::new();
            for rep in 0..self.reps {
                s.client
                    .execute(
                        "DELETE FROM projection_checkpoints WHERE projection_name = $1",
                        &[&name],
                    )
                    .await
                    .expect("cannot reset the partition checkpoints");
                let runners: Vec<Runner> = (0..total)
                    .map(|k| {
                        let config = self
                            .catchup_config()
                            .partition(k, total)
                            .expect("valid partition");
                        Runner::new(s.store.clone(), config)
                            .with_projection(Arc::new(Noop { name: name.clone() }))
                            .expect("cannot register the projection")
                    })
                    .collect();
                let start = Instant::now();
                let results =
                    futures_util::future::join_all(runners.iter().map(|r| r.run_once())).await;
                let d = start.elapsed();
                for r in results {
                    r.unwrap_or_else(|e| panic!("{name}: run_once failed: {e}"));
                }
                let handled: u64 = runners.iter().map(|r| r.progress().events_handled()).sum();
                if handled != s.events {
                    self.progress(format!(
                        "{name}: handled {handled} of {} events (open transaction elsewhere?)",
                        s.events
                    ));
                }
                rates.push(rate(s.events, d));
                self.progress(format!(
                    "partitions_{total} rep {}/{}: {} ({total} runners concurrently)",
                    rep + 1,
                    self.reps,
                    ev_s(rates[rates.len() - 1])
                ));
            }
            let m = median(&rates);
            out.insert(
                format!("partitions_{total}"),
                json!({"events_per_s": round(m, 0)}),
            );
            self.row(
                &format!("partitions_{total}"),
                ev_s(m),
                "—".into(),
                "—".into(),
                "—".into(),
            );
        }
        self.json.insert("partitions".into(), Value::Object(out));
    }
}
