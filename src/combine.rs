//! Combining concurrent requests into shared batches ("group commit in the
//! client"): the machinery behind [`EventStore::append`]'s combined appends,
//! with no SQL in it.
//!
//! A request runs at once, on its caller's task, while fewer than `lanes`
//! batches are in flight. Otherwise it queues; whenever a lane finishes a
//! batch it answers its callers, lets them run (they usually request again
//! at once), and takes what queued meanwhile (up to a size limit, never two
//! requests with the same key) as its next batch, on a spawned task. So a
//! lone caller pays nothing (no task, no channel), and under load each
//! commit carries many requests.
//!
//! A batch that takes long (a lock wait, a slow disk) must not hold the
//! others back: a request that has queued for [`Combiner::stall`] opens one
//! more lane for the queue itself.
//!
//! [`EventStore::append`]: crate::EventStore::append

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// What a lane runs: one batch of requests, one output per request, in
/// order.
pub(crate) trait Flush: Send + Sync + 'static {
    /// One request.
    type Item: Send + 'static;
    /// Its result.
    type Output: Send + 'static;
    /// Requests with equal keys never share a batch.
    fn key(item: &Self::Item) -> &str;
    /// The size a request adds to a batch (batches stay at or below
    /// [`Combiner::max_size`], except a single request larger than it).
    fn size(item: &Self::Item) -> usize;
    /// Runs a batch; returns exactly one output per item, in order.
    fn flush(
        self: Arc<Self>,
        batch: Vec<Self::Item>,
    ) -> Pin<Box<dyn Future<Output = Vec<Self::Output>> + Send>>;
}

type Waiting<F> = (<F as Flush>::Item, oneshot::Sender<<F as Flush>::Output>);

struct State<F: Flush> {
    queue: VecDeque<Waiting<F>>,
    in_flight: usize,
}

/// The request queue and its lanes. See the module documentation.
pub(crate) struct Combiner<F: Flush> {
    flush: Arc<F>,
    state: Mutex<State<F>>,
    lanes: usize,
    max_size: usize,
    stall: Duration,
}

/// The lane's result never arrived: its task panicked or the runtime shut
/// down.
#[derive(Debug)]
pub(crate) struct Lost;

impl<F: Flush> Combiner<F> {
    /// `lanes` batches at most in flight (at least 1) before requests
    /// queue; batches of at most `max_size`; a request queued for `stall`
    /// opens a lane of its own.
    pub(crate) fn new(flush: F, lanes: usize, max_size: usize, stall: Duration) -> Arc<Self> {
        Arc::new(Combiner {
            flush: Arc::new(flush),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                in_flight: 0,
            }),
            lanes: lanes.max(1),
            max_size: max_size.max(1),
            stall,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<F>> {
        // A panic while holding the lock leaves the queue consistent (every
        // critical section is a few pushes and pops), so poisoning is
        // ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a lane for a request the caller runs itself, on its own task,
    /// when one is free and nothing queues (what [`Combiner::submit`] does
    /// first, without handing the request over): requests arriving while
    /// the guard lives queue, and dropping it hands them on as a lane's end
    /// does. `None`: submit the request instead.
    pub(crate) fn try_lane(self: &Arc<Self>) -> Option<LaneGuard<F>> {
        let mut s = self.lock();
        if s.in_flight < self.lanes && s.queue.is_empty() {
            s.in_flight += 1;
            Some(LaneGuard(Some(self.clone())))
        } else {
            None
        }
    }

    /// Runs `item`, alone or in a batch with others.
    pub(crate) async fn submit(self: &Arc<Self>, item: F::Item) -> Result<F::Output, Lost> {
        let (tx, mut rx) = oneshot::channel();
        let own = {
            let mut s = self.lock();
            if s.in_flight < self.lanes && s.queue.is_empty() {
                s.in_flight += 1;
                Some(item)
            } else {
                s.queue.push_back((item, tx));
                None
            }
        };
        if let Some(item) = own {
            // A lane on the caller's task; the guard hands the queue on to
            // a spawned lane when it ends (also when the caller is dropped).
            let _lane = LaneGuard(Some(self.clone()));
            let mut out = self.flush.clone().flush(vec![item]).await;
            return out.pop().ok_or(Lost);
        }
        if let Ok(r) = tokio::time::timeout(self.stall, &mut rx).await {
            return r.map_err(|_| Lost);
        }
        // Every lane is busy for longer than a batch should take: open one
        // more for what is queued (this request, unless a lane took it).
        let batch = {
            let mut s = self.lock();
            let batch = self.take_batch(&mut s);
            if !batch.is_empty() {
                s.in_flight += 1;
            }
            batch
        };
        if !batch.is_empty() {
            tokio::spawn(self.clone().lane(batch));
        }
        rx.await.map_err(|_| Lost)
    }

    /// The next batch from the queue: front to back, skipping (and
    /// keeping, in order) requests whose key is already in the batch, up to
    /// `max_size`; requests whose caller is gone are dropped.
    fn take_batch(&self, s: &mut State<F>) -> Vec<Waiting<F>> {
        let mut batch: Vec<Waiting<F>> = Vec::new();
        let mut size = 0;
        let mut kept = VecDeque::new();
        while let Some(w) = s.queue.pop_front() {
            if w.1.is_closed() {
                // Its caller gave up (dropped the future) before a lane
                // took it: it is not run.
                continue;
            }
            let n = F::size(&w.0);
            if !batch.is_empty() && size + n > self.max_size {
                s.queue.push_front(w);
                break;
            }
            if batch.iter().any(|b| F::key(&b.0) == F::key(&w.0)) {
                kept.push_back(w);
                continue;
            }
            size += n;
            batch.push(w);
        }
        while let Some(w) = kept.pop_back() {
            s.queue.push_front(w);
        }
        batch
    }

    /// A spawned lane: runs `batch`, then what queued meanwhile, until the
    /// queue is empty.
    async fn lane(self: Arc<Self>, mut batch: Vec<Waiting<F>>) {
        loop {
            let (items, senders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            // If the flush panics, the senders are dropped (their callers
            // get `Lost`) and the guard hands the queue on.
            let mut guard = LaneGuard(Some(self.clone()));
            let outputs = self.flush.clone().flush(items).await;
            guard.0 = None;
            for (tx, out) in senders.into_iter().zip(outputs) {
                // The caller may have gone; its result is dropped.
                let _ = tx.send(out);
            }
            // The callers just woken usually request again at once (a
            // writer's next append): let them run first, so their requests
            // queue behind this still-open lane and share its next batch.
            // Otherwise the lane ends on a momentarily empty queue, the
            // first of them runs alone, and the rest wait a whole batch for
            // it: batches of 1 and n-1 in turn, half the throughput.
            tokio::task::yield_now().await;
            let mut s = self.lock();
            batch = self.take_batch(&mut s);
            if batch.is_empty() {
                s.in_flight -= 1;
                return;
            }
        }
    }
}

/// Ends a lane: starts a spawned lane for the queue, or frees the lane.
/// `None` when the lane goes on by itself.
pub(crate) struct LaneGuard<F: Flush>(Option<Arc<Combiner<F>>>);

impl<F: Flush> Drop for LaneGuard<F> {
    fn drop(&mut self) {
        let Some(c) = self.0.take() else { return };
        let mut s = c.lock();
        let batch = c.take_batch(&mut s);
        if batch.is_empty() {
            s.in_flight -= 1;
            return;
        }
        drop(s);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(c.clone().lane(batch));
            }
            Err(_) => {
                // No runtime (it is shutting down): the queued callers get
                // `Lost` when their senders drop here.
                c.lock().in_flight -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records batch sizes; each output is the item.
    struct Echo {
        batches: Mutex<Vec<Vec<String>>>,
        running: AtomicUsize,
        max_running: AtomicUsize,
        gate: tokio::sync::Semaphore,
        /// Only batches with an item of this prefix wait at the gate.
        hold_only: Option<&'static str>,
        /// Times a batch yields to the runtime (a statement's round trip).
        yields: usize,
    }

    impl Flush for Echo {
        type Item = String;
        type Output = String;
        fn key(item: &String) -> &str {
            item.split('#').next().unwrap_or(item)
        }
        fn size(_: &String) -> usize {
            1
        }
        fn flush(
            self: Arc<Self>,
            batch: Vec<String>,
        ) -> Pin<Box<dyn Future<Output = Vec<String>> + Send>> {
            Box::pin(async move {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_running.fetch_max(now, Ordering::SeqCst);
                let held = match self.hold_only {
                    Some(p) => batch.iter().any(|i| i.starts_with(p)),
                    None => true,
                };
                if held {
                    let permit = self.gate.acquire().await;
                    drop(permit);
                }
                for _ in 0..self.yields {
                    tokio::task::yield_now().await;
                }
                self.batches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(batch.clone());
                self.running.fetch_sub(1, Ordering::SeqCst);
                batch
            })
        }
    }

    fn echo(open: usize) -> Echo {
        Echo {
            batches: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(open),
            hold_only: None,
            yields: 0,
        }
    }

    /// Every lane ends once the queue is empty (a lane first lets the
    /// callers it answered run, so it may end a moment after they did).
    async fn assert_lanes_freed(c: &Arc<Combiner<Echo>>) {
        for _ in 0..1000 {
            if c.lock().in_flight == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(c.lock().in_flight, 0, "a lane never ended");
    }

    #[tokio::test]
    async fn callers_that_request_again_at_once_share_the_next_batch() {
        // Eight writers, each sending its next request as soon as the last
        // one returns (a closed loop, like concurrent request handlers
        // under load), through one lane.
        let (writers, rounds) = (8, 20);
        let c = Combiner::new(
            Echo {
                yields: 3,
                ..echo(usize::MAX >> 4)
            },
            1,
            100,
            Duration::from_secs(60),
        );
        let mut all = Vec::new();
        for w in 0..writers {
            let c = c.clone();
            all.push(tokio::spawn(async move {
                for r in 0..rounds {
                    let item = format!("w{w}#{r}");
                    assert_eq!(c.submit(item.clone()).await.unwrap(), item);
                }
            }));
        }
        for h in all {
            h.await.unwrap();
        }
        let batches = c.flush.batches.lock().unwrap().clone();
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), writers * rounds);
        // After the first request (alone), every batch carries every
        // writer: the lane lets the callers it answered request again
        // before it looks at the queue. (Without that, the lane ended on an
        // empty queue, the first writer back ran alone and the other seven
        // waited for it: sizes 1, 7, 1, 7, ...: 40 batches.)
        assert!(
            batches.len() <= rounds + 2,
            "{} batches for {} rounds of {writers} writers: {sizes:?}",
            batches.len(),
            rounds
        );
        assert_lanes_freed(&c).await;
    }

    #[tokio::test]
    async fn a_lone_request_runs_alone_and_queued_ones_share_the_next_batch() {
        let c = Combiner::new(echo(0), 1, 100, Duration::from_secs(60));
        let first = tokio::spawn({
            let c = c.clone();
            async move { c.submit("a".to_string()).await }
        });
        // Wait until the first request holds the only lane.
        while c.flush.running.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let mut rest = Vec::new();
        for item in ["b", "c", "b#2", "d"] {
            let c = c.clone();
            rest.push(tokio::spawn(
                async move { c.submit(item.to_string()).await },
            ));
        }
        while c.lock().queue.len() < 4 {
            tokio::task::yield_now().await;
        }
        c.flush.gate.add_permits(1000);
        assert_eq!(first.await.unwrap().unwrap(), "a");
        for (h, want) in rest.into_iter().zip(["b", "c", "b#2", "d"]) {
            assert_eq!(h.await.unwrap().unwrap(), want);
        }
        let batches = c.flush.batches.lock().unwrap().clone();
        // The same key ("b") never shares a batch: "b#2" waits for the next.
        assert_eq!(
            batches,
            vec![
                vec!["a".to_string()],
                vec!["b".into(), "c".into(), "d".into()],
                vec!["b#2".into()],
            ]
        );
        assert_lanes_freed(&c).await;
        assert_eq!(c.flush.max_running.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn batches_stay_within_the_size_limit() {
        let c = Combiner::new(echo(0), 1, 2, Duration::from_secs(60));
        let mut all = vec![tokio::spawn({
            let c = c.clone();
            async move { c.submit("x".to_string()).await }
        })];
        while c.flush.running.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for i in 0..5 {
            let c = c.clone();
            all.push(tokio::spawn(async move { c.submit(format!("k{i}")).await }));
        }
        while c.lock().queue.len() < 5 {
            tokio::task::yield_now().await;
        }
        c.flush.gate.add_permits(1000);
        for h in all {
            h.await.unwrap().unwrap();
        }
        let sizes: Vec<usize> = c
            .flush
            .batches
            .lock()
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![1, 2, 2, 1]);
    }

    #[tokio::test]
    async fn a_stalled_lane_does_not_hold_back_the_queue() {
        // One lane, stuck on the gate until the end; a request queued
        // behind it opens its own lane after the stall time.
        let c = Combiner::new(
            Echo {
                hold_only: Some("stuck"),
                ..echo(0)
            },
            1,
            100,
            Duration::from_millis(20),
        );
        let stuck = tokio::spawn({
            let c = c.clone();
            async move { c.submit("stuck".to_string()).await }
        });
        while c.flush.running.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let next = tokio::spawn({
            let c = c.clone();
            async move { c.submit("next".to_string()).await }
        });
        assert_eq!(next.await.unwrap().unwrap(), "next");
        assert!(!stuck.is_finished());
        assert_eq!(c.flush.max_running.load(Ordering::SeqCst), 2);
        c.flush.gate.add_permits(1);
        assert_eq!(stuck.await.unwrap().unwrap(), "stuck");
        assert_lanes_freed(&c).await;
    }

    #[tokio::test]
    async fn a_request_whose_caller_gave_up_while_queued_is_not_run() {
        let c = Combiner::new(echo(0), 1, 100, Duration::from_secs(60));
        let first = tokio::spawn({
            let c = c.clone();
            async move { c.submit("first".to_string()).await }
        });
        while c.flush.running.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let abandoned = tokio::spawn({
            let c = c.clone();
            async move { c.submit("abandoned".to_string()).await }
        });
        let kept = tokio::spawn({
            let c = c.clone();
            async move { c.submit("kept".to_string()).await }
        });
        while c.lock().queue.len() < 2 {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        c.flush.gate.add_permits(1000);
        assert_eq!(first.await.unwrap().unwrap(), "first");
        assert_eq!(kept.await.unwrap().unwrap(), "kept");
        let batches = c.flush.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![vec!["first".to_string()], vec!["kept".into()]]
        );
    }

    #[tokio::test]
    async fn a_dropped_caller_hands_the_queue_on() {
        let c = Combiner::new(echo(0), 1, 100, Duration::from_secs(60));
        let first = tokio::spawn({
            let c = c.clone();
            async move { c.submit("first".to_string()).await }
        });
        while c.flush.running.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let queued = tokio::spawn({
            let c = c.clone();
            async move { c.submit("queued".to_string()).await }
        });
        while c.lock().queue.is_empty() {
            tokio::task::yield_now().await;
        }
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        c.flush.gate.add_permits(1000);
        assert_eq!(queued.await.unwrap().unwrap(), "queued");
        assert_lanes_freed(&c).await;
    }
}
