//! The Prometheus metric set (one registry per process, names prefixed
//! `projectionist_`). Counters and histograms are updated where things
//! happen; gauges that describe the database (lag, state, dead letters,
//! the watermark holder) are refreshed from it when scraped, by queries
//! whose cost does not grow with the log (the lag is an estimate).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::OnceLock;

/// Every metric of the process.
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) events_handled: IntCounterVec,
    pub(crate) handler_duration: HistogramVec,
    pub(crate) batch_duration: HistogramVec,
    pub(crate) lag_events: IntGaugeVec,
    pub(crate) skipped_events: IntGaugeVec,
    pub(crate) lag_seconds: GaugeVec,
    pub(crate) eta_seconds: GaugeVec,
    pub(crate) handle_rate: GaugeVec,
    pub(crate) cursor_position: IntGaugeVec,
    pub(crate) projection_state: IntGaugeVec,
    pub(crate) events_appended: IntCounter,
    pub(crate) lost_commits: IntCounter,
    pub(crate) wakeups: IntCounterVec,
    pub(crate) worker_up: IntGauge,
    pub(crate) is_leader: IntGauge,
    pub(crate) slots_held: IntGauge,
    pub(crate) dead_letters: IntGaugeVec,
    pub(crate) pool_connections: IntGaugeVec,
    pub(crate) watermark_held: prometheus::Gauge,
    pub(crate) parallel: IntGaugeVec,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let m = Metrics {
        events_handled: IntCounterVec::new(
            Opts::new("projectionist_events_handled_total", "Events handed to handlers, by outcome (ok, error, dead_letter)."),
            &["projection", "partition", "result"],
        )?,
        handler_duration: HistogramVec::new(
            HistogramOpts::new("projectionist_handler_duration_seconds", "Time spent in a projection's handler per batch.")
                .buckets(buckets.clone()),
            &["projection"],
        )?,
        batch_duration: HistogramVec::new(
            HistogramOpts::new("projectionist_batch_duration_seconds", "Time of a whole batch transaction: read, handle, checkpoint, commit.")
                .buckets(buckets),
            &["projection"],
        )?,
        skipped_events: IntGaugeVec::new(
            Opts::new(
                "projectionist_skipped_events",
                "Events the slot receives that sort between its last handled event and its cursor: written after \
                 the cursor passed them, never to be handled unless the cursor moves back (should always be 0; \
                 checked over the newest 1000 events of that range).",
            ),
            &["projection", "partition"],
        )?,
        lag_events: IntGaugeVec::new(
            Opts::new(
                "projectionist_lag_events",
                format!(
                    "Events after the slot's cursor that it will receive. An estimate: the first {} events after \
                     the cursor are counted (exact when fewer remain), the rest extrapolated from global positions \
                     up to the log head; the status command's --exact flag counts.",
                    crate::admin::LAG_SAMPLE_EVENTS
                ),
            ),
            &["projection", "partition"],
        )?,
        lag_seconds: GaugeVec::new(
            Opts::new(
                "projectionist_lag_seconds",
                format!(
                    "Age of the oldest event after the slot's cursor that it receives, among the first {} after \
                     the cursor (of any of them if none is the slot's); 0 when caught up.",
                    crate::admin::LAG_SAMPLE_EVENTS
                ),
            ),
            &["projection", "partition"],
        )?,
        eta_seconds: GaugeVec::new(
            Opts::new(
                "projectionist_catch_up_eta_seconds",
                "Estimated seconds until the slot has caught up (a new projection version rebuilding, or a slot \
                 behind): its lag over its rate (a moving average over about the last 10 s of batches); \
                 0 when caught up or no rate is known yet. The projection label is the checkpoint key \
                 (name, or name@vN above version 1).",
            ),
            &["projection", "partition"],
        )?,
        handle_rate: GaugeVec::new(
            Opts::new(
                "projectionist_handle_rate_events_per_second",
                "Events the slot handles per second: a moving average over about the last 10 s of its batches, as of its last checkpoint.",
            ),
            &["projection", "partition"],
        )?,
        cursor_position: IntGaugeVec::new(
            Opts::new(
                "projectionist_cursor_position",
                "Global position of the last event the slot's cursor passed, in reading order (transaction id, \
                 then position); moves exactly when the cursor passes events.",
            ),
            &["projection", "partition"],
        )?,
        projection_state: IntGaugeVec::new(
            Opts::new("projectionist_projection_state", "1 for the slot's current state (running, stopped, failed)."),
            &["projection", "partition", "state"],
        )?,
        events_appended: IntCounter::new("projectionist_events_appended_total", "Events appended through this process.")?,
        lost_commits: IntCounter::new(
            "projectionist_lost_commits_detected_total",
            "Times this process found that PostgreSQL lost recent commits (crash recovery, immediate restart, \
             failover, restore) and moved its cursors back to the last handled events.",
        )?,
        wakeups: IntCounterVec::new(
            Opts::new("projectionist_dispatcher_wakeups_total", "Processor wake-ups by source (notify, poll)."),
            &["source"],
        )?,
        worker_up: IntGauge::new("projectionist_worker_up", "1 while this process runs projections.")?,
        is_leader: IntGauge::new("projectionist_is_leader", "1 while this worker holds the leader lock.")?,
        slots_held: IntGauge::new("projectionist_slots_held", "Slots this process runs.")?,
        dead_letters: IntGaugeVec::new(
            Opts::new(
                "projectionist_dead_letters",
                "Entries in the dead-letter table, counted up to 10000 per projection (a projection with more \
                 shows 10000).",
            ),
            &["projection"],
        )?,
        pool_connections: IntGaugeVec::new(
            Opts::new("projectionist_pool_connections", "Pooled database connections by state (in_use, idle)."),
            &["state"],
        )?,
        watermark_held: prometheus::Gauge::new(
            "projectionist_watermark_held_seconds",
            "Age of the oldest open writing transaction on the server, which holds back the gap-safe watermark.",
        )?,
        parallel: IntGaugeVec::new(
            Opts::new(
                "projectionist_parallel",
                "Concurrency mode: in_flight (fetched, not committed), gaps (done, not yet committable), \
                 blocking_position (lowest incomplete event), blocked_seconds, fetch_paused (0/1).",
            ),
            &["projection", "partition", "measure"],
        )?,
        registry,
    };
    m.registry.register(Box::new(m.events_handled.clone()))?;
    m.registry.register(Box::new(m.handler_duration.clone()))?;
    m.registry.register(Box::new(m.batch_duration.clone()))?;
    m.registry.register(Box::new(m.lag_events.clone()))?;
    m.registry.register(Box::new(m.lag_seconds.clone()))?;
    m.registry.register(Box::new(m.eta_seconds.clone()))?;
    m.registry.register(Box::new(m.handle_rate.clone()))?;
    m.registry.register(Box::new(m.cursor_position.clone()))?;
    m.registry.register(Box::new(m.projection_state.clone()))?;
    m.registry.register(Box::new(m.events_appended.clone()))?;
    m.registry.register(Box::new(m.lost_commits.clone()))?;
    m.registry.register(Box::new(m.skipped_events.clone()))?;
    m.registry.register(Box::new(m.wakeups.clone()))?;
    m.registry.register(Box::new(m.worker_up.clone()))?;
    m.registry.register(Box::new(m.is_leader.clone()))?;
    m.registry.register(Box::new(m.slots_held.clone()))?;
    m.registry.register(Box::new(m.dead_letters.clone()))?;
    m.registry.register(Box::new(m.pool_connections.clone()))?;
    m.registry.register(Box::new(m.watermark_held.clone()))?;
    m.registry.register(Box::new(m.parallel.clone()))?;
    Ok(m)
}

static METRICS: OnceLock<Option<Metrics>> = OnceLock::new();

/// The process's metrics (`None` only if the fixed metric set failed to
/// build, which would be a bug; metrics are then skipped, never fatal).
pub(crate) fn get() -> Option<&'static Metrics> {
    METRICS
        .get_or_init(|| match build() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the metric set; metrics disabled");
                None
            }
        })
        .as_ref()
}

/// Runs `f` on the metrics if they exist.
pub(crate) fn with(f: impl FnOnce(&Metrics)) {
    if let Some(m) = get() {
        f(m);
    }
}

/// The registry in the Prometheus text format.
pub(crate) fn render() -> String {
    let Some(m) = get() else {
        return String::new();
    };
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}
