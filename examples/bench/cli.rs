//! The command line: every flag of the benchmark (`Args`) and the case
//! names that `--only` selects from, in run order.

use clap::Parser;
use std::path::PathBuf;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "Benchmarks projectionist against plain SQL on the same PostgreSQL database"
)]
pub struct Args {
    /// Events seeded for the catch-up cases.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub reps: u32,
    /// Run only these cases (comma separated; a prefix such as `append`
    /// selects every case starting with it).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Appends measured by the notify and raw LISTEN wake-up cases
    /// (default 1000, 200 with --quick).
    #[arg(long)]
    pub wakeups: Option<usize>,
    /// Shorter runs: smaller append cases and fewer wake-ups.
    #[arg(long)]
    pub quick: bool,
    /// Accounts (streams) the seeded events are spread over.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub accounts: u32,
    /// Diagnostic: `name=value` set on every benchmark database with
    /// `ALTER DATABASE … SET` (repeatable), e.g. `plan_cache_mode=force_generic_plan`.
    #[arg(long = "db-setting", value_name = "NAME=VALUE")]
    pub db_settings: Vec<String>,
    /// Batch size of the catch-up and partition cases (library
    /// `RunnerConfig::batch_size` and the raw baselines' page size).
    /// Default: the library's, 1000.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=projectionist::MAX_BATCH_SIZE))]
    pub batch_size: Option<i64>,
    /// Diagnostic: aggregates the `parallel_io` concurrency-mode events are
    /// spread over (more aggregates, fewer same-key chains in the window).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub io_aggregates: u32,
    /// Diagnostic: `max_in_flight` of the `parallel_io` concurrency mode.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub io_max_in_flight: u32,
    /// Let the library's connections negotiate TLS as they do by default
    /// (`sslmode=prefer`: encrypted when the server has `ssl = on`). Without
    /// it the library connects with `sslmode=disable`, like the raw
    /// baselines (which never use TLS), so that both sides pay the same
    /// transport. The bank worker processes always use the default.
    #[arg(long)]
    pub tls: bool,
    /// Diagnostic: the append cases' store sends no NOTIFY
    /// (`StoreConfig::notify_channel(None)`), to measure what the
    /// notification costs an append.
    #[arg(long)]
    pub no_append_notify: bool,
    /// Diagnostic: the append cases' store shares concurrent appends over
    /// this many lanes (`StoreConfig::append_lanes`; 0 = every append its
    /// own statement). Default: the library's default.
    #[arg(long)]
    pub append_lanes: Option<usize>,
    /// Diagnostic: the quiet time after each after-commit notification, in
    /// milliseconds (`StoreConfig::notify_interval`), for the append cases'
    /// store and the wake-up cases' writer. Default: the library's default.
    #[arg(long)]
    pub notify_interval_ms: Option<f64>,
    /// Diagnostic: how long the quiet time may grow during a burst, in
    /// milliseconds (`StoreConfig::notify_max_interval`), for the same
    /// stores. Default: the library's default.
    #[arg(long)]
    pub notify_max_interval_ms: Option<f64>,
    /// Run the scale benchmark instead of the cases (issue 12; not in CI):
    /// seeds `--scale-events` events with SQL, then measures status,
    /// /metrics and /readyz with the whole log as lag over 16 slots,
    /// catch-up per tenth of the log, RSS, index rows fetched by 1, 4 and 8
    /// static partitions, and the slots a rebalance moves after a SIGKILL.
    #[arg(long)]
    pub scale: bool,
    /// Events the scale benchmark seeds.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub scale_events: u64,
    /// Accounts (streams) the scale benchmark's events are spread over.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub scale_accounts: u32,
    /// Worker processes sharing the scale benchmark's 16 slots.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=16))]
    pub scale_workers: u32,
    /// Internal: run the RSS child against this database and print VmHWM.
    #[arg(long, hide = true, value_name = "DATABASE_URL")]
    pub child_rss: Option<String>,
}

/// Every selectable case, in run order.
pub const CASES: &[&str] = &[
    "append_batch_1",
    "append_batch_10",
    "append_batch_100",
    "append_batch_1000",
    "append_batch_1_8_writers",
    "append_batch_100_8_writers",
    "append_batch_1_32_writers",
    "append_copy_bulk",
    "append_breakdown",
    "catchup_noop",
    "catchup_large_payload",
    "catchup_read_model",
    "catchup_read_model_batch",
    "catchup_upcast",
    "wakeup_notify_ms",
    "wakeup_poll_ms",
    "wakeup_raw_listen_ms",
    "parallel_io",
    "partitions",
    "worker_failover_s",
    "worker_rebalance_s",
    "worker_rss_mb",
    "catchup_traced",
];

/// Diagnostics that run only when `--only` names them exactly: neither a
/// full run nor a prefix selects them.
pub const OPT_IN: &[&str] = &["append_breakdown"];

/// The cases an `--only` entry selects: itself, or every case it prefixes
/// (except the [`OPT_IN`] diagnostics).
pub fn matching(entry: &str) -> Vec<&'static str> {
    let entry = entry.trim();
    if let Some(c) = CASES.iter().find(|c| **c == entry) {
        return vec![c];
    }
    CASES
        .iter()
        .copied()
        .filter(|c| !entry.is_empty() && c.starts_with(entry) && !OPT_IN.contains(c))
        .collect()
}

/// The cases `only` selects (all when empty), in run order.
pub fn select(only: &[String]) -> Vec<&'static str> {
    if only.is_empty() {
        return CASES
            .iter()
            .copied()
            .filter(|c| !OPT_IN.contains(c))
            .collect();
    }
    let picked: Vec<&str> = only.iter().flat_map(|e| matching(e)).collect();
    CASES
        .iter()
        .copied()
        .filter(|c| picked.contains(c))
        .collect()
}
