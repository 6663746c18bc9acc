//! What every slot of one process shares, in static and worker mode alike:
//! the store, the [`RunnerConfig`], the registered projections, the
//! progress counters, and the background tasks (dispatcher, watermark
//! warning). [`crate::Runner`] owns an [`Engine`]; worker mode is handed
//! one, so it never reaches into the runner.

use crate::config::RunnerConfig;
use crate::dispatcher::{self, DispatcherKind, Route, Watermarks};
use crate::error::{Error, Result};
use crate::ident::Ident;
use crate::progress::Progress;
use crate::registered::Registered;
use crate::store::EventStore;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The shared parts of a process running projections.
pub(crate) struct Engine {
    pub(crate) store: EventStore,
    pub(crate) config: RunnerConfig,
    pub(crate) projections: Vec<Registered>,
    pub(crate) progress: Arc<Progress>,
}

impl Engine {
    /// Starts the process's background tasks on `background`: the
    /// watermark warning, and the dispatcher — poll, or LISTEN (with the
    /// watermark chaser and the reconciliation poll) — listening also on
    /// `extra_routes` (worker mode's channel).
    pub(crate) fn spawn_background(
        &self,
        background: &mut tokio::task::JoinSet<()>,
        wake: &dispatcher::Wake,
        marks: &Arc<Watermarks>,
        mut extra_routes: Vec<(Ident, Route)>,
        stop: &watch::Receiver<bool>,
    ) {
        background.spawn(watch_watermark(self.store.clone(), stop.clone()));
        let head_sql = self.store.statements().head().to_owned();
        let poll_interval = match self.config.dispatcher {
            DispatcherKind::Poll => self.config.poll_interval,
            DispatcherKind::Notify => {
                extra_routes.push((
                    self.config.notify_channel.clone(),
                    Route::Events {
                        marks: marks.clone(),
                        wake: wake.clone(),
                    },
                ));
                background.spawn(dispatcher::chase_watermark(
                    self.store.pool().clone(),
                    marks.clone(),
                    wake.clone(),
                    stop.clone(),
                ));
                self.config.reconcile_interval
            }
        };
        background.spawn(dispatcher::poll_loop(
            self.store.pool().clone(),
            head_sql,
            poll_interval,
            wake.clone(),
            stop.clone(),
        ));
        if !extra_routes.is_empty() {
            let mut listen_config = self.store.pg_config().clone();
            listen_config.application_name("projectionist-listener");
            background.spawn(dispatcher::listen_loop(
                listen_config,
                self.store.tls().clone(),
                extra_routes,
                self.config.max_backoff,
                stop.clone(),
            ));
        }
        if self.config.promote_when_caught_up {
            background.spawn(crate::versions::promote_when_caught_up(
                self.store.clone(),
                self.projections.clone(),
                stop.clone(),
            ));
        }
    }

    /// The error returned when in-flight batches outlive the shutdown
    /// timeout.
    pub(crate) fn shutdown_timeout_error(&self) -> Error {
        Error::new(
            crate::error::Kind::Other,
            format!(
                "shutdown timeout ({:?}) exceeded: unfinished batches were rolled back and will be \
                 handled again on the next start; raise SHUTDOWN_TIMEOUT if batches take longer",
                self.config.shutdown_timeout
            ),
        )
    }
}

/// Refuses empty and duplicate projection names.
pub(crate) fn check_unique<'a>(projections: impl Iterator<Item = &'a Registered>) -> Result<()> {
    let mut seen = HashSet::new();
    for p in projections {
        let name = p.name();
        if name.is_empty() {
            return Err(Error::config(
                "a projection has an empty name: give every projection a stable, unique name",
            ));
        }
        if !seen.insert(name.to_owned()) {
            return Err(Error::config(format!(
                "two projections are registered with the name {name:?}: names key the checkpoints, make them unique"
            )));
        }
    }
    Ok(())
}

/// A writing transaction open this long is named in a warning.
const WATERMARK_WARN_AFTER: Duration = Duration::from_secs(30);

/// Every 10 s, warns (naming it) about a writing transaction that has held
/// the gap-safe watermark back for longer than 30 s: otherwise a quiet
/// projection looks stuck for no reason.
async fn watch_watermark(store: EventStore, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.changed() => return,
        }
        if let Ok(Some(h)) = crate::admin::watermark_holder(&store).await {
            if h.open_seconds >= WATERMARK_WARN_AFTER.as_secs_f64() {
                tracing::warn!(
                    pid = h.pid,
                    database = h.database.as_deref().unwrap_or("?"),
                    application_name = h.application_name.as_deref().unwrap_or(""),
                    open_seconds = h.open_seconds as u64,
                    query = %h.query,
                    "an open writing transaction holds back the watermark: projections wait for it to end \
                     (end it with SELECT pg_terminate_backend(pid) if it is stuck)"
                );
            }
        }
    }
}
