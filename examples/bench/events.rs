//! The benchmark's events: the aggregate and event types every case
//! appends, and append plans, which hold the same rows in the library's and
//! in the raw statement's shape so that both sides write exactly the same
//! data.

use projectionist::NewEvent;
use rand::rngs::StdRng;
use rand::Rng;
use uuid::Uuid;

/// Streams each append writer rotates over.
const STREAMS_PER_WRITER: usize = 64;

/// The aggregate type of every benchmark event.
pub const AGGREGATE_TYPE: &str = "Account";
/// The event type of every benchmark event.
pub const EVENT_TYPE: &str = "MoneyDeposited";

// ---------------------------------------------------------------------------
// Append plans: the same rows for the library and the raw baseline.

/// One append: a stream, its expected version and the events, in both the
/// library's and the raw statement's shape.
pub struct Batch {
    pub stream: String,
    pub expected: i64,
    pub events: Vec<NewEvent>,
    pub ids: Vec<Uuid>,
    pub aggregate_types: Vec<&'static str>,
    pub aggregate_ids: Vec<String>,
    pub versions: Vec<i64>,
    pub event_types: Vec<&'static str>,
    pub payloads: Vec<String>,
    pub metadata: Vec<&'static str>,
}

/// Per writer, its batches: `total` events split evenly, batches of `batch`
/// events rotating over the writer's own streams (their names end in
/// `side`, so that two plans can be written into one table side by side
/// with their streams interleaved in the stream index, neither side's all
/// after the other's).
pub fn append_plan(
    rng: &mut StdRng,
    side: &str,
    writers: usize,
    batch: usize,
    total: usize,
) -> Vec<Vec<Batch>> {
    let batches_per_writer = (total / writers / batch).max(1);
    (0..writers)
        .map(|w| {
            let mut versions = [0i64; STREAMS_PER_WRITER];
            (0..batches_per_writer)
                .map(|k| {
                    let s = k % STREAMS_PER_WRITER;
                    let stream = format!("w{w}-s{s}{side}");
                    let expected = versions[s];
                    versions[s] += batch as i64;
                    let payloads: Vec<String> = (0..batch)
                        .map(|_| format!(r#"{{"amount": {}}}"#, rng.gen_range(1..=10_000)))
                        .collect();
                    let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::now_v7()).collect();
                    let events = ids
                        .iter()
                        .zip(&payloads)
                        .map(|(id, p)| {
                            NewEvent::from_json(EVENT_TYPE, p.clone()).with_event_id(*id)
                        })
                        .collect();
                    Batch {
                        aggregate_ids: vec![stream.clone(); batch],
                        stream,
                        expected,
                        events,
                        ids,
                        aggregate_types: vec![AGGREGATE_TYPE; batch],
                        versions: (1..=batch as i64).map(|v| expected + v).collect(),
                        event_types: vec![EVENT_TYPE; batch],
                        payloads,
                        metadata: vec!["{}"; batch],
                    }
                })
                .collect()
        })
        .collect()
}

/// Gives the events of part `part` of `plan` fresh UUIDv7 ids (time
/// ordered), writers interleaved batch by batch as they would run.
///
/// Called part by part in the order the case will write them, so that
/// every side's ids are newer than every id already in the table, as in
/// an application that stamps its events when it appends them. Ids drawn
/// once per plan put one side's ids all below the other's: its inserts
/// landed in the middle of the `event_id` index (a descent from the root
/// and a middle page split) while the other side's went to its right end.
pub fn stamp_ids(plan: &mut [Vec<Batch>], part: Part) {
    let longest = plan.iter().map(|w| part.of(w).len()).max().unwrap_or(0);
    for k in 0..longest {
        for writer in plan.iter_mut() {
            let n = writer.len();
            let start = n * part.index / part.parts;
            let end = n * (part.index + 1) / part.parts;
            if start + k >= end {
                continue;
            }
            let b = &mut writer[start + k];
            b.ids = (0..b.ids.len()).map(|_| Uuid::now_v7()).collect();
            let events = std::mem::take(&mut b.events);
            b.events = events
                .into_iter()
                .zip(&b.ids)
                .map(|(e, id)| e.with_event_id(*id))
                .collect();
        }
    }
}

/// The number of events in a plan.
pub fn plan_events(plan: &[Vec<Batch>]) -> usize {
    plan.iter().flatten().map(|b| b.events.len()).sum()
}

/// Part `index` of `parts` equal parts of each writer's batches: the
/// append cases run the library's and the raw plan part by part,
/// alternately, so that both see the same disk and the same load.
#[derive(Clone, Copy, Debug)]
pub struct Part {
    pub index: usize,
    pub parts: usize,
}

impl Part {
    /// The whole plan.
    pub const ALL: Part = Part { index: 0, parts: 1 };

    /// This part of `batches`.
    pub fn of<'a>(&self, batches: &'a [Batch]) -> &'a [Batch] {
        let n = batches.len();
        &batches[n * self.index / self.parts..n * (self.index + 1) / self.parts]
    }
}
