//! Wake-ups, one dispatcher per process shared by every processor in it.
//!
//! - `poll`: every poll interval, read the log's head and the watermark
//!   (one cheap query) and wake the processors when either moved.
//! - `notify`: LISTEN on a dedicated connection (pooled connections never
//!   deliver notifications) and wake on every notification; a
//!   reconciliation poll every second covers raw-SQL appends and lost
//!   notifications, and every (re)connect wakes all processors, so nothing
//!   sent while the listener was away is missed.
//!
//! Architecture invariant: the LISTEN connection is the only long-lived
//! non-pooled connection of a processor runner. [`crate::Waiter`] drives
//! its own LISTEN connection through [`listen_loop`] too.

use crate::db;
use crate::error::{Error, Result};
use crate::event::Xid8;
use crate::ident::Ident;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

/// How processors learn that new events may be readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DispatcherKind {
    /// Poll the log's head every poll interval (the default).
    #[default]
    Poll,
    /// LISTEN for the appends' NOTIFY, with a reconciliation poll every second.
    Notify,
}

impl FromStr for DispatcherKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<DispatcherKind> {
        match s {
            "poll" => Ok(DispatcherKind::Poll),
            "notify" => Ok(DispatcherKind::Notify),
            other => Err(Error::config(format!(
                "unknown dispatcher {other:?}: use DISPATCHER=poll or DISPATCHER=notify"
            ))),
        }
    }
}

/// Interval of the notify dispatcher's reconciliation poll.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// The wake-up signal: a generation counter every processor watches.
pub(crate) type Wake = watch::Sender<u64>;

/// Shared between the listener and the processors: the newest appending
/// transaction announced by NOTIFY, and the highest watermark a processor
/// has read below. While an announced transaction is not yet below the
/// watermark (an older transaction elsewhere is still open), the listener
/// re-checks the watermark until it passes and wakes the processors again,
/// so a notified event is never left waiting for the reconciliation poll.
#[derive(Debug, Default)]
pub(crate) struct Watermarks {
    announced: AtomicU64,
    seen: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Watermarks {
    /// A processor read a page below `watermark`.
    pub(crate) fn saw(&self, watermark: u64) {
        self.seen.fetch_max(watermark, Ordering::Relaxed);
    }

    fn announce(&self, transaction_id: u64) {
        self.announced.fetch_max(transaction_id, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Announced but not yet read below the watermark.
    fn pending(&self) -> Option<u64> {
        let a = self.announced.load(Ordering::Relaxed);
        (a != 0 && self.seen.load(Ordering::Relaxed) <= a).then_some(a)
    }
}

/// Wakes the processors once announced transactions fall below the
/// watermark, checking every few milliseconds while any is pending.
pub(crate) async fn chase_watermark(
    pool: Pool,
    marks: Arc<Watermarks>,
    wake: Wake,
    shutdown: watch::Receiver<bool>,
) {
    chase(marks, wake, shutdown, || async {
        let client = pool.get().await?;
        let row = client
            .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())", &[])
            .await?;
        Ok::<_, Error>(row.try_get::<_, Xid8>(0)?.0)
    })
    .await
}

/// [`chase_watermark`] with the watermark query as `xmin`.
///
/// Once the watermark has passed an announced transaction and the
/// processors were woken, that watermark counts as seen: the chase of that
/// transaction is over whether or not a processor reads (a standby worker
/// with no slots, failed slots, a full concurrency window never do), so an
/// idle process does not query on and on.
async fn chase<F, Fut>(
    marks: Arc<Watermarks>,
    wake: Wake,
    mut shutdown: watch::Receiver<bool>,
    mut xmin: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    loop {
        let Some(pending) = marks.pending() else {
            tokio::select! {
                _ = marks.changed.notified() => continue,
                _ = shutdown.changed() => return,
            }
        };
        let mut delay = Duration::from_millis(2);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            if marks.pending().is_none() {
                break;
            }
            match xmin().await {
                Ok(xmin) if xmin > pending => {
                    marks.saw(xmin);
                    bump(&wake);
                    break;
                }
                Ok(_) => delay = (delay * 2).min(Duration::from_millis(50)),
                Err(e) => {
                    tracing::debug!(error = %e, "watermark check failed");
                    delay = Duration::from_millis(200);
                }
            }
        }
    }
}

pub(crate) fn bump(wake: &Wake) {
    wake.send_modify(|g| *g = g.wrapping_add(1));
}

/// Polls the head and the watermark every `interval`; wakes on change.
pub(crate) async fn poll_loop(
    pool: Pool,
    head_sql: String,
    interval: Duration,
    wake: Wake,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<(i64, u64)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        crate::server::tick();
        let head = async {
            let client = pool.get().await?;
            let stmt = client.prepare_cached(&head_sql).await?;
            let row = client.query_one(&stmt, &[]).await?;
            Ok::<_, Error>((row.try_get::<_, i64>(0)?, row.try_get::<_, Xid8>(1)?.0))
        }
        .await;
        match head {
            Ok(h) => {
                if last != Some(h) {
                    last = Some(h);
                    crate::metrics::with(|m| m.wakeups.with_label_values(&["poll"]).inc());
                    bump(&wake);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "dispatcher poll failed; retrying at the next interval");
                last = None;
            }
        }
    }
}

/// What a notification on one channel does.
#[derive(Clone)]
pub(crate) enum Route {
    /// Appends: the payload is the appending transaction id; wake the
    /// processors.
    Events { marks: Arc<Watermarks>, wake: Wake },
    /// Worker-mode membership and assignment changes: wake the worker's
    /// leader and follower loops.
    Workers { wake: Wake },
    /// Checkpoint advances (the payload is the projection's name): wake
    /// the [`crate::Waiter`]s of that projection; a (re)connect wakes all.
    Checkpoints(Arc<crate::wait::Hub>),
}

impl Route {
    fn deliver(&self, payload: Option<&str>) {
        match self {
            Route::Events { marks, wake } => {
                if let Some(tx) = payload.and_then(|p| p.parse::<u64>().ok()) {
                    marks.announce(tx);
                }
                if payload.is_some() {
                    crate::metrics::with(|m| m.wakeups.with_label_values(&["notify"]).inc());
                }
                bump(wake);
            }
            Route::Workers { wake } => bump(wake),
            Route::Checkpoints(hub) => match payload {
                Some(name) => hub.advanced(name),
                None => hub.listening(),
            },
        }
    }
}

/// Listens on every channel of `routes` over one dedicated connection,
/// reconnecting with backoff; after every (re)connect every route is woken,
/// so nothing sent while the listener was away is missed.
pub(crate) async fn listen_loop(
    config: tokio_postgres::Config,
    tls: crate::tls::MakeRustlsConnect,
    routes: Vec<(Ident, Route)>,
    max_backoff: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match listen_once(&config, &tls, &routes, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "notify listener disconnected; reconnecting");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// One listener connection's life. Returns `Ok` on shutdown, `Err` when the
/// connection failed or ended.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &crate::tls::MakeRustlsConnect,
    routes: &[(Ident, Route)],
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    let (client, mut connection) = config.connect(tls.clone()).await.map_err(|e| {
        Error::from(e).context(format!("LISTEN connection to {}", db::describe(config)))
    })?;
    let (ended_tx, mut ended_rx) = tokio::sync::oneshot::channel::<String>();
    let table: Vec<(String, Route)> = routes
        .iter()
        .map(|(c, r)| (c.as_str().to_owned(), r.clone()))
        .collect();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let reason = loop {
            match messages.next().await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    for (channel, route) in &table {
                        if channel == n.channel() {
                            route.deliver(Some(n.payload()));
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "connection closed".to_owned(),
            }
        };
        let _ = ended_tx.send(reason);
    });
    let listen: String = routes
        .iter()
        .map(|(c, _)| format!("LISTEN {};", c.quoted()))
        .collect();
    if let Err(e) = client.batch_execute(&listen).await {
        driver.abort();
        return Err(Error::from(e).context("LISTEN failed"));
    }
    tracing::debug!(channels = routes.len(), "listening for notifications");
    // Anything sent while we were not listening must still be acted on.
    for (_, route) in routes {
        route.deliver(None);
    }
    let result = tokio::select! {
        reason = &mut ended_rx => Err(Error::new(
            crate::error::Kind::Connection,
            format!("LISTEN connection ended: {}", reason.unwrap_or_else(|_| "driver stopped".into())),
        )),
        _ = shutdown.changed() => Ok(()),
    };
    drop(client);
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Runs the chaser with a watermark query answering `answers` in turn
    /// (then the last one for ever) and counting its calls, announces
    /// transaction 100, and returns the call count once the processors
    /// were woken and after `idle` more.
    async fn chase_queries(answers: &'static [u64], idle: Duration) -> usize {
        let marks = Arc::new(Watermarks::default());
        let (wake, mut woken) = watch::channel(0u64);
        let (stop, shutdown) = watch::channel(false);
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let chaser = tokio::spawn(chase(marks.clone(), wake, shutdown, move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok(answers[n.min(answers.len() - 1)]) }
        }));
        marks.announce(100);
        woken.changed().await.unwrap();
        // Nobody reads (no processor calls `saw`): the chaser must go quiet.
        tokio::time::sleep(idle).await;
        let n = calls.load(Ordering::SeqCst);
        stop.send(true).unwrap();
        chaser.await.unwrap();
        n
    }

    #[tokio::test]
    async fn the_chaser_stops_once_the_watermark_passed_even_if_nobody_reads() {
        let idle = Duration::from_millis(300);
        assert_eq!(chase_queries(&[200], idle).await, 1);
        // Behind the watermark three times, then past it: four queries.
        assert_eq!(chase_queries(&[50, 60, 70, 200], idle).await, 4);
    }

    #[test]
    fn parses_dispatcher_names() {
        assert_eq!(
            "poll".parse::<DispatcherKind>().unwrap(),
            DispatcherKind::Poll
        );
        assert_eq!(
            "notify".parse::<DispatcherKind>().unwrap(),
            DispatcherKind::Notify
        );
        let e = "kafka".parse::<DispatcherKind>().unwrap_err();
        assert!(e.is_config() && e.to_string().contains("DISPATCHER=poll"));
    }
}
