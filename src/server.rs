//! The admin HTTP server (hyper 1), read-only: `/metrics` (Prometheus text
//! format), `/healthz` (liveness: the process's loops are ticking),
//! `/readyz` (database reachable, no failed projection, lag under
//! `READY_MAX_LAG` if set), `/status` (JSON, as `status --json`) and
//! `/wait` (read-your-writes, see `wait.rs`).
//!
//! Database-backed answers come from one status report cached for a second
//! and refreshed by one request at a time, so thousands of concurrent
//! requests cost one query round.

use crate::admin::{report, StatusReport};
use crate::error::{Error, Result};
use crate::projection::Projection;
use crate::store::EventStore;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Mutex};

/// The time of the last tick of the process's loops, in seconds since the
/// epoch (the dispatcher and the worker follower tick it).
static LAST_TICK: AtomicU64 = AtomicU64::new(0);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records that the process's loops are alive.
pub(crate) fn tick() {
    LAST_TICK.store(now_secs(), Ordering::Relaxed);
}

/// A fetched status report, or why it could not be fetched.
type Fetched = std::result::Result<Arc<StatusReport>, String>;

/// What the admin server needs.
pub(crate) struct AdminState {
    store: EventStore,
    projections: Vec<Arc<dyn Projection>>,
    ready_max_lag: Option<i64>,
    /// Loops that have not ticked for this long make `/healthz` fail.
    liveness_window: Duration,
    cache: Mutex<Option<(Instant, Fetched)>>,
    /// `/wait`: one LISTEN connection for every request, opened on the first.
    waiter: crate::wait::Waiter,
}

impl AdminState {
    pub(crate) fn new(
        store: EventStore,
        projections: Vec<Arc<dyn Projection>>,
        ready_max_lag: Option<i64>,
        liveness_window: Duration,
    ) -> AdminState {
        tick();
        AdminState {
            waiter: crate::wait::Waiter::new(&store),
            store,
            projections,
            ready_max_lag,
            liveness_window,
            cache: Mutex::new(None),
        }
    }

    /// The status report, at most a second old; also refreshes the gauges.
    async fn report(&self) -> Fetched {
        let mut cache = self.cache.lock().await;
        if let Some((at, r)) = cache.as_ref() {
            if at.elapsed() < Duration::from_secs(1) {
                return r.clone();
            }
        }
        let fresh = match tokio::time::timeout(
            Duration::from_secs(3),
            report(&self.store, &self.projections),
        )
        .await
        {
            Ok(Ok(r)) => {
                refresh_gauges(&r, &self.store);
                Ok(Arc::new(r))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the database did not answer within 3s".to_owned()),
        };
        *cache = Some((Instant::now(), fresh.clone()));
        fresh
    }
}

fn refresh_gauges(r: &StatusReport, store: &EventStore) {
    crate::metrics::with(|m| {
        m.lag_events.reset();
        m.lag_seconds.reset();
        m.cursor_position.reset();
        m.projection_state.reset();
        m.dead_letters.reset();
        for s in &r.projections {
            let partition = s.partition.to_string();
            let labels = [s.projection.as_str(), partition.as_str()];
            m.lag_events.with_label_values(&labels).set(s.lag_events);
            m.lag_seconds.with_label_values(&labels).set(s.lag_seconds);
            m.cursor_position
                .with_label_values(&labels)
                .set(s.cursor_position.unwrap_or(r.log_head));
            for state in ["running", "stopped", "failed"] {
                m.projection_state
                    .with_label_values(&[s.projection.as_str(), partition.as_str(), state])
                    .set(i64::from(s.state == state));
            }
        }
        for (p, n) in &r.dead_letters {
            m.dead_letters.with_label_values(&[p.as_str()]).set(*n);
        }
        m.watermark_held.set(
            r.watermark_held_by
                .as_ref()
                .map(|h| h.open_seconds)
                .unwrap_or(0.0),
        );
        let pool = store.pool().status();
        let in_use = pool.size.saturating_sub(pool.available) as i64;
        m.pool_connections
            .with_label_values(&["in_use"])
            .set(in_use);
        m.pool_connections
            .with_label_values(&["idle"])
            .set(pool.available as i64);
    });
}

/// Parses `ADMIN_ADDR`: `host:port`, or `off`.
pub fn parse_admin_addr(value: &str) -> Result<Option<SocketAddr>> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        Error::config(format!(
            "ADMIN_ADDR {value:?} is not an address: use host:port such as 0.0.0.0:9090, or off to disable \
             the admin server"
        ))
    })
}

/// Binds `addr` and serves until `stop` turns true. Returns the bound
/// address (useful with port 0).
pub(crate) async fn serve(
    addr: SocketAddr,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::config(format!(
            "cannot listen on ADMIN_ADDR {addr} ({e}): choose a free port, or set ADMIN_ADDR=off"
        ))
    })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "admin server listening (/metrics /healthz /readyz /status)");
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(&state, req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(bound)
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(state: &AdminState, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "read-only: use GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let _ = state.report().await;
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(),
            )
        }
        "/healthz" => {
            let age = now_secs().saturating_sub(LAST_TICK.load(Ordering::Relaxed));
            if Duration::from_secs(age) <= state.liveness_window {
                respond(StatusCode::OK, TEXT, "ok\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("loops have not ticked for {age}s\n"),
                )
            }
        }
        "/readyz" => match state.report().await {
            Err(e) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("database unavailable: {e}\n"),
            ),
            Ok(r) => {
                let failed: Vec<String> = r
                    .projections
                    .iter()
                    .filter(|s| s.state == "failed")
                    .map(|s| format!("{}/{}", s.projection, s.partition))
                    .collect();
                if !failed.is_empty() {
                    return respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        format!("failed projections: {}\n", failed.join(", ")),
                    );
                }
                if let Some(max) = state.ready_max_lag {
                    let lagging: Vec<String> = r
                        .projections
                        .iter()
                        .filter(|s| s.lag_events > max)
                        .map(|s| {
                            format!("{}/{} ({} events)", s.projection, s.partition, s.lag_events)
                        })
                        .collect();
                    if !lagging.is_empty() {
                        return respond(
                            StatusCode::SERVICE_UNAVAILABLE,
                            TEXT,
                            format!("lag over READY_MAX_LAG={max}: {}\n", lagging.join(", ")),
                        );
                    }
                }
                respond(StatusCode::OK, TEXT, "ready\n")
            }
        },
        "/status" => match state.report().await {
            Ok(r) => {
                let leader = r
                    .workers
                    .iter()
                    .find(|w| w.is_leader)
                    .map(|w| w.worker_id.clone());
                let mut body = serde_json::to_value(&*r).unwrap_or_default();
                if let Some(obj) = body.as_object_mut() {
                    obj.insert("leader".into(), serde_json::json!(leader));
                }
                respond(StatusCode::OK, "application/json", body.to_string())
            }
            Err(e) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({ "error": e }).to_string(),
            ),
        },
        "/wait" => {
            let (code, body) = crate::wait::http(&state.waiter, req.uri().query()).await;
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            respond(code, "application/json", body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics /healthz /readyz /status\n",
        ),
    }
}
