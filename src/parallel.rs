//! Key-ordered concurrency inside one slot (opt-in per projection, see
//! [`crate::Concurrency`]): events of one aggregate run strictly in order,
//! events of different aggregates concurrently, up to `max_in_flight`
//! fetched-and-uncommitted events. Fetching pauses at the limit
//! (backpressure). The checkpoint only advances to the high-water mark: the
//! highest position below which every event is complete. At-least-once:
//! after a crash at most the in-flight window is handled again.

use crate::dispatcher::Watermarks;
use crate::error::{Error, Kind, Result};
use crate::event::{Cursor, StoredEvent};
use crate::otel;
use crate::policy::OnFailure;
use crate::processor::{guarded, Processor};
use crate::progress::Progress;
use crate::projection::Concurrency;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, Span};

/// An idle slot re-reads at least this often.
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// How often completed work is checkpointed at most.
const COMMIT_EVERY: Duration = Duration::from_millis(50);

/// What a handler task reports.
enum Done {
    /// Handled (or dead-lettered): the event is complete.
    Complete,
    /// Policy Stop: the slot stops at this event.
    Failed(Error, u32, Box<StoredEvent>),
}

/// The in-flight window.
#[derive(Default)]
struct Window {
    /// Fetched, not yet committed events: done or not.
    order: BTreeMap<Cursor, bool>,
    /// Events waiting for an earlier event of their aggregate (with the
    /// error of a failed upcast, and the span of the page that fetched them).
    waiting: HashMap<String, VecDeque<Queued>>,
    /// Aggregates with an event running.
    busy: std::collections::HashSet<String>,
    /// The lowest incomplete event and since when it has been the lowest.
    blocking: Option<(Cursor, Instant)>,
    /// Entries of `order` passed over, not handled (`UnknownEvents::Ignore`).
    passed: std::collections::HashSet<Cursor>,
}

/// An event to run: the event, the error of its failed upcast, and the
/// batch span of the page that fetched it ([`Span::none`] when traces are
/// off).
type Queued = (StoredEvent, Option<String>, Span);

fn key(e: &StoredEvent) -> String {
    format!("{}\u{0}{}", e.aggregate_type, e.aggregate_id)
}

impl Window {
    fn gaps(&self) -> usize {
        self.order.values().filter(|d| **d).count()
    }

    /// Pops the complete prefix; returns the new high-water mark, if any,
    /// and how many handled events it passed.
    fn advance(&mut self) -> Option<(Cursor, usize)> {
        let mut hwm = None;
        let mut n = 0;
        while let Some((c, true)) = self.order.first_key_value().map(|(c, d)| (*c, *d)) {
            self.order.remove(&c);
            hwm = Some(c);
            if !self.passed.remove(&c) {
                n += 1;
            }
        }
        let lowest = self.order.keys().next().copied();
        match (lowest, self.blocking) {
            (Some(l), Some((b, _))) if l == b => {}
            (Some(l), _) => self.blocking = Some((l, Instant::now())),
            (None, _) => self.blocking = None,
        }
        hwm.map(|c| (c, n))
    }

    fn stats(&self, max: usize, running: usize) -> serde_json::Value {
        // Taken right at a commit, so what is in flight is the window.
        serde_json::json!({
            "max_in_flight": max,
            "in_flight": self.order.len(),
            "running": running,
            "gaps": self.gaps(),
            "blocking_position": self.blocking.map(|(c, _)| c.global_position),
            "blocked_seconds": self.blocking.map(|(_, t)| t.elapsed().as_secs_f64()).unwrap_or(0.0),
            "fetch_paused": self.order.len() >= max,
        })
    }
}

fn publish(name: &str, partition: i32, stats: &serde_json::Value) {
    let partition = partition.to_string();
    crate::metrics::with(|m| {
        for (measure, field) in [
            ("in_flight", "in_flight"),
            ("gaps", "gaps"),
            ("blocking_position", "blocking_position"),
            ("blocked_seconds", "blocked_seconds"),
        ] {
            let v = stats[field].as_f64().unwrap_or(0.0) as i64;
            m.parallel
                .with_label_values(&[name, partition.as_str(), measure])
                .set(v);
        }
        let paused = i64::from(stats["fetch_paused"].as_bool().unwrap_or(false));
        m.parallel
            .with_label_values(&[name, partition.as_str(), "fetch_paused"])
            .set(paused);
    });
}

/// Completed work not yet checkpointed.
#[derive(Clone, Copy, Debug)]
struct Uncommitted {
    /// Where the checkpoint can move.
    to: Cursor,
    /// Events completed since the last commit.
    handled: usize,
    /// The last complete event at or before `to`, if any since the commit.
    last_event: Option<Cursor>,
}

/// Runs one slot in concurrency mode until stopped (or, with
/// `until_caught_up`, until nothing more is readable: `--once`); errors
/// when fenced, failed or the database fails.
pub(crate) async fn run(
    p: &mut Processor,
    c: Concurrency,
    marks: &Watermarks,
    mut wake: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    progress: &Progress,
    until_caught_up: bool,
) -> Result<()> {
    let max = c.max_in_flight;
    let projection = p.projection().clone();
    let policy = projection.failure_policy();
    let sink = p.sink();
    let pool = p.pool().clone();
    let name = projection.key().to_owned();
    let partition = p.slot().partition;
    let mut w = Window::default();
    let mut tasks: JoinSet<(String, Cursor, Done)> = JoinSet::new();
    let mut fetch_cursor = p.cursor();
    let mut caught_up = false;
    let mut uncommitted: Option<Uncommitted> = None;
    let mut last_commit = Instant::now();
    let mut failed: Option<(Error, u32, Box<StoredEvent>)> = None;
    // An event the registry does not know: the slot stops there once
    // everything before it is committed.
    let mut unknown: Option<(Box<StoredEvent>, String)> = None;

    let spawn = |tasks: &mut JoinSet<(String, Cursor, Done)>, (event, broken, batch): Queued| {
        let projection = projection.clone();
        let sink = sink.clone();
        let pool = pool.clone();
        let span = otel::event_span(&batch, projection.name(), &event);
        drop(batch);
        let handled = async move {
            let k = key(&event);
            let cursor = event.cursor();
            let mut attempt = 1u32;
            loop {
                // An event whose upcast failed goes to the policy at once.
                let outcome = match &broken {
                    Some(why) => Err(Error::new(Kind::Payload, why.clone())),
                    None => guarded(projection.handle_concurrent(&event)).await,
                };
                match outcome {
                    Ok(()) => return (k, cursor, Done::Complete),
                    Err(e) if broken.is_some() => {
                        otel::fail(&Span::current(), &e);
                        return match policy.on_failure {
                            OnFailure::DeadLetter => match sink
                                .insert_fenced(&pool, &event, &e, attempt)
                                .await
                            {
                                Ok(()) => (k, cursor, Done::Complete),
                                Err(db) => (k, cursor, Done::Failed(db, attempt, Box::new(event))),
                            },
                            OnFailure::Stop => {
                                (k, cursor, Done::Failed(e, attempt, Box::new(event)))
                            }
                        };
                    }
                    Err(e) if attempt < policy.attempts && !e.is_config() => {
                        attempt += 1;
                        tokio::time::sleep(policy.delay_before(attempt)).await;
                    }
                    Err(e) => {
                        otel::fail(&Span::current(), &e);
                        return match policy.on_failure {
                            OnFailure::DeadLetter => {
                                let stored = sink.insert_fenced(&pool, &event, &e, attempt).await;
                                match stored {
                                    Ok(()) => {
                                        tracing::error!(position = event.global_position, error = %e,
                                            "event dead-lettered; processing continues");
                                        (k, cursor, Done::Complete)
                                    }
                                    Err(db) => {
                                        (k, cursor, Done::Failed(db, attempt, Box::new(event)))
                                    }
                                }
                            }
                            OnFailure::Stop => {
                                (k, cursor, Done::Failed(e, attempt, Box::new(event)))
                            }
                        };
                    }
                }
            }
        };
        tasks.spawn(handled.instrument(span));
    };

    loop {
        // In flight: fetched and not yet committed (complete events above
        // the last commit count too: a crash would hand them out again).
        let pending_commit = uncommitted.map(|u| u.handled).unwrap_or(0);
        let in_flight = w.order.len() + pending_commit;
        progress.set_in_flight(in_flight);
        // Fetch while there is room (backpressure at max_in_flight).
        if !caught_up && failed.is_none() && unknown.is_none() && !*stop.borrow() && in_flight < max
        {
            wake.borrow_and_update();
            let limit = (max - in_flight) as i64;
            let Some((page, control)) = p.fetch(fetch_cursor, limit).await? else {
                // The slot resynchronised (lost commits, a reset, a moved
                // checkpoint): wait for running handlers, then start over
                // from the stored checkpoint.
                while tasks.join_next().await.is_some() {}
                w = Window::default();
                fetch_cursor = p.cursor();
                uncommitted = None;
                continue;
            };
            marks.saw(page.watermark);
            caught_up = (page.events.len() as i64) < limit;
            let passed = control.passed;
            let prepared = p.prepare(page.events, control.upcast_failed);
            // Feature `otel`: the page's batch span, open until its last
            // event is handled (none when traces are off).
            let batch = otel::batch_span(&otel::BatchStart {
                projection: projection.name(),
                partition,
                version: projection.version(),
                mode: "concurrent",
                cursor_before: fetch_cursor,
                watermark: page.watermark,
                events: &prepared.events,
            });
            otel::finish_batch(&batch, page.next_cursor, prepared.events.len());
            let mut broken = prepared.broken.into_iter().peekable();
            for (i, event) in prepared.events.into_iter().enumerate() {
                let why = broken.next_if(|(j, _)| *j == i).map(|(_, e)| e.to_string());
                w.order.insert(event.cursor(), false);
                let k = key(&event);
                if w.busy.contains(&k) {
                    w.waiting
                        .entry(k)
                        .or_default()
                        .push_back((event, why, batch.clone()));
                } else {
                    w.busy.insert(k);
                    spawn(&mut tasks, (event, why, batch.clone()));
                }
            }
            drop(batch);
            // Passed-over events are complete at once: the high-water mark
            // (and the last event dealt with) moves past them.
            for c in prepared.passed_over {
                w.order.insert(c, true);
                w.passed.insert(c);
            }
            match prepared.unknown {
                Some((event, message)) => {
                    // Nothing at or after the unknown event is fetched again.
                    if let Some(through) = prepared.through {
                        fetch_cursor = through;
                    }
                    unknown = Some((Box::new(event), message));
                }
                None => fetch_cursor = page.next_cursor,
            }
            if let Some((hwm, n)) = w.advance() {
                uncommitted = Some(Uncommitted {
                    to: hwm,
                    handled: uncommitted.map(|u| u.handled).unwrap_or(0) + n,
                    last_event: Some(hwm),
                });
            }
            let committing = uncommitted.map(|u| u.to).unwrap_or(p.cursor());
            if w.order.is_empty() && fetch_cursor > committing && passed {
                // Nothing in flight, and the page passed over events its
                // filter excluded: the cursor moves past them (so waiters
                // for them see it pass). A page that passed over nothing
                // needs no write.
                uncommitted = Some(Uncommitted {
                    to: fetch_cursor,
                    handled: uncommitted.map(|u| u.handled).unwrap_or(0),
                    last_event: uncommitted.and_then(|u| u.last_event),
                });
            }
            continue;
        }
        // Commit the high-water mark now and then, and when idle.
        if let Some(Uncommitted {
            to: hwm,
            handled,
            last_event,
        }) = uncommitted
        {
            let idle = tasks.is_empty();
            // An eighth of the window waiting for its commit is worth one:
            // waiting longer keeps slots from being refilled.
            let commit_due = handled * 8 >= max;
            if idle || commit_due || last_commit.elapsed() >= COMMIT_EVERY || *stop.borrow() {
                let stats = w.stats(max, tasks.len());
                publish(&name, partition, &stats);
                let last_event = last_event.unwrap_or(p.last_event());
                match p.commit_to(hwm, handled, last_event, &stats).await {
                    Ok(()) => {
                        uncommitted = None;
                        last_commit = Instant::now();
                    }
                    Err(e) if e.is_fenced() => {
                        while tasks.join_next().await.is_some() {}
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
                if handled > 0 {
                    progress.add(handled as u64);
                }
            }
        }
        if (failed.is_some() || unknown.is_some()) && tasks.is_empty() && uncommitted.is_none() {
            // Everything below the failing event is committed: stop there.
            if let Some((e, attempts, event)) = failed.take() {
                return Err(p.stop_at(&event, &e, attempts).await);
            }
            if let Some((event, message)) = unknown.take() {
                return Err(p.stop_unknown(&event, &message).await);
            }
        }
        let drained = tasks.is_empty() && uncommitted.is_none();
        if drained && (*stop.borrow() || (until_caught_up && caught_up && w.order.is_empty())) {
            return Ok(());
        }
        let room = w.order.len() + uncommitted.map(|u| u.handled).unwrap_or(0) < max;
        if room && !caught_up && failed.is_none() && unknown.is_none() && !*stop.borrow() {
            // The commit above made room: fetch more before waiting.
            continue;
        }
        tokio::select! {
            done = tasks.join_next(), if !tasks.is_empty() => {
                let Some(done) = done else { continue };
                let (k, cursor, outcome) =
                    done.map_err(|e| Error::handler_msg(format!("handler task failed: {e}")))?;
                match outcome {
                    Done::Complete => {
                        w.order.insert(cursor, true);
                        if let Some((hwm, n)) = w.advance() {
                            let prev = uncommitted.map(|u| u.handled).unwrap_or(0);
                            uncommitted = Some(Uncommitted {
                                to: hwm,
                                handled: prev + n,
                                last_event: Some(hwm),
                            });
                        }
                        if w.order.is_empty() && fetch_cursor > uncommitted.map(|u| u.to).unwrap_or(p.cursor()) {
                            uncommitted = Some(Uncommitted {
                                to: fetch_cursor,
                                handled: uncommitted.map(|u| u.handled).unwrap_or(0),
                                last_event: uncommitted.and_then(|u| u.last_event),
                            });
                        }
                    }
                    Done::Failed(e, attempts, event) => {
                        failed.get_or_insert((e, attempts, event));
                        // Later events of this aggregate must not run.
                        w.waiting.remove(&k);
                        w.busy.remove(&k);
                        continue;
                    }
                }
                match w.waiting.get_mut(&k).and_then(|q| q.pop_front()) {
                    Some(next) if failed.is_none() && !*stop.borrow() => spawn(&mut tasks, next),
                    _ => {
                        w.waiting.remove(&k);
                        w.busy.remove(&k);
                    }
                }
            }
            _ = wake.changed(), if caught_up => caught_up = false,
            // Idle: look again now and then (a reset, a pause, lost commits).
            _ = tokio::time::sleep(IDLE_RECHECK), if caught_up && tasks.is_empty() => caught_up = false,
            _ = stop.changed() => {}
            _ = tokio::time::sleep(COMMIT_EVERY), if uncommitted.is_some() => {}
        }
    }
}
