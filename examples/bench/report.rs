//! The report: the result table's rows, printed in case order at the end,
//! and the JSON file (`--json`); the benchmark's databases are dropped
//! last.

use crate::cli::CASES;
use crate::setup::Bench;
use crate::stats::round;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use serde_json::{json, Value};

impl Bench {
    /// Adds a row to the result table.
    pub fn row(&mut self, case: &str, lib: String, raw: String, ratio: String, target: String) {
        self.rows.push([case.to_owned(), lib, raw, ratio, target]);
    }

    /// The table rows in case order (a label sorts by the case it starts with).
    fn sorted_rows(&self) -> Vec<[String; 5]> {
        let key = |label: &str| {
            CASES
                .iter()
                .enumerate()
                .filter(|(_, c)| label.starts_with(*c))
                .max_by_key(|(_, c)| c.len())
                .map_or(CASES.len(), |(i, _)| i)
        };
        let mut rows = self.rows.clone();
        rows.sort_by_key(|r| key(&r[0]));
        rows
    }

    /// Prints the table, writes the JSON (`--json`) and drops the
    /// benchmark's databases.
    pub async fn finish(mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.json.insert("elapsed_s".into(), round(elapsed, 1));
        if let Some(load) = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        {
            // With the start's load average (machine.load_average): a
            // figure from a run the machine's other work disturbed is
            // worth repeating.
            self.json["machine"]["load_average_end"] = json!(load);
        }
        let mut table = Table::new();
        table
            .load_preset(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(vec![
                "case",
                "projectionist",
                "raw SQL baseline",
                "ratio",
                "target",
            ]);
        for r in self.sorted_rows() {
            table.add_row(r.to_vec());
        }
        let server = &self.json["server"];
        println!(
            "server: {} (PostgreSQL {}, fsync={}, synchronous_commit={}, full_page_writes={}); {} cores; \
             SELECT 1 round trip {} µs; batch size {}; median of {} reps",
            server["kind"].as_str().unwrap_or("?"),
            self.json["machine"]["postgres_version"].as_str().unwrap_or("?"),
            server["fsync"].as_str().unwrap_or("?"),
            server["synchronous_commit"].as_str().unwrap_or("?"),
            server["full_page_writes"].as_str().unwrap_or("?"),
            self.json["machine"]["cores"],
            self.json["machine"]["round_trip_us"],
            self.batch,
            self.reps
        );
        println!("{table}");
        println!(
            "ratio = projectionist ÷ raw SQL (medians). Targets refer to a stock server \
             (fsync and synchronous_commit on)."
        );
        if self.json.contains_key("append_breakdown") {
            println!(
                "append_breakdown rows: means per append over the rounds (not medians); their \
                 ratio = the raw unnest INSERT's mean ÷ the path's."
            );
        }
        if let Some(path) = &self.args.json {
            let text = serde_json::to_string_pretty(&Value::Object(self.json.clone()))
                .expect("JSON serialisation cannot fail");
            std::fs::write(path, text + "\n")
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            println!("wrote {}", path.display());
        }
        for db in self.dbs.drain(..) {
            let name = db.name().to_owned();
            if let Err(e) = db.drop_database().await {
                eprintln!("warning: could not drop database {name}: {e}");
            }
        }
        println!("total elapsed: {elapsed:.1}s");
    }
}
