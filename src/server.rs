//! The admin HTTP server (hyper 1), read-only: `/metrics` (Prometheus text
//! format), `/healthz` (liveness: the process's loops are ticking),
//! `/readyz` (database reachable, no failed projection, lag under
//! `READY_MAX_LAG` if set), `/status` (JSON, as `status --json`),
//! `/wait` (read-your-writes, see `wait.rs`) and the operator console at
//! `/` with its feed `/console.json` (see `console.rs`).
//!
//! Database-backed answers are cached for a second and refreshed by one
//! request at a time, so thousands of concurrent requests cost one query
//! round. Every query they run costs the same at any log size (the lag is
//! estimated, see `admin::status_with`), runs under a `statement_timeout`
//! of [`QUERY_TIMEOUT`], and is cancelled on the server if it takes longer.
//! `/readyz` does not use the status report: it reads only the checkpoint
//! states (and the estimated lag when `READY_MAX_LAG` is set).

use crate::admin::{failed_slots, report_with, status_with, StatusOptions, StatusReport};
use crate::error::{Error, Result};
use crate::registered::Registered;
use crate::store::EventStore;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Mutex};

/// How long a database-backed answer may take (3 s): the queries run
/// under this `statement_timeout` and are cancelled when it passes.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a fetched answer is reused (1 s).
const CACHE_FOR: Duration = Duration::from_secs(1);

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

/// A readiness verdict: the reasons not to be ready (empty: ready), or why
/// the database could not answer.
type Readiness = std::result::Result<Vec<String>, String>;

/// A value fetched at most once per [`CACHE_FOR`].
struct Cached<T>(Mutex<Option<(Instant, T)>>);

impl<T: Clone> Cached<T> {
    fn new() -> Cached<T> {
        Cached(Mutex::new(None))
    }

    async fn get<F: std::future::Future<Output = T>>(&self, fetch: impl FnOnce() -> F) -> T {
        let mut cache = self.0.lock().await;
        if let Some((at, v)) = cache.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return v.clone();
            }
        }
        let fresh = fetch().await;
        *cache = Some((Instant::now(), fresh.clone()));
        fresh
    }
}

/// The label values the database gauges were last set for, so that the
/// series of slots (and dead-letter projections) that went away are
/// removed after the current ones are set, never before.
#[derive(Default)]
struct GaugeLabels {
    /// (projection, partition) of the slot gauges.
    slots: HashSet<(String, String)>,
    /// Projections with dead letters.
    dead_letters: HashSet<String>,
}

/// What the admin server needs.
pub(crate) struct AdminState {
    store: EventStore,
    projections: Vec<Registered>,
    ready_max_lag: Option<i64>,
    /// Loops that have not ticked for this long make `/healthz` fail.
    liveness_window: Duration,
    options: StatusOptions,
    report: Cached<Fetched>,
    readiness: Cached<Readiness>,
    /// The labels the database gauges were last set for.
    gauge_labels: std::sync::Mutex<GaugeLabels>,
    /// `/wait`: one LISTEN connection for every request, opened on the first.
    waiter: crate::wait::Waiter,
    /// The console's throughput samples and dead-letter cache.
    console: crate::console::Console,
}

impl AdminState {
    pub(crate) fn new(
        store: EventStore,
        projections: Vec<Registered>,
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
            options: StatusOptions {
                timeout: QUERY_TIMEOUT,
                ..StatusOptions::default()
            },
            report: Cached::new(),
            readiness: Cached::new(),
            gauge_labels: std::sync::Mutex::new(GaugeLabels::default()),
            console: crate::console::Console::default(),
        }
    }

    /// Worker mode: after how long without a heartbeat a slot's owner is
    /// shown as stale (`HEARTBEAT_TIMEOUT`). Default: 30 s.
    pub(crate) fn heartbeat_timeout(mut self, d: Duration) -> AdminState {
        self.options.heartbeat_timeout = d;
        self
    }

    /// The status report, at most a second old; also refreshes the gauges.
    async fn report(&self) -> Fetched {
        self.report
            .get(|| async {
                match report_with(&self.store, &self.projections, &self.options).await {
                    Ok(r) => {
                        self.refresh_gauges(&r);
                        Ok(Arc::new(r))
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
            .await
    }

    /// What `/readyz` checks, at most a second old: the database answers and
    /// no slot is failed (one read of the checkpoint table), and, with
    /// `READY_MAX_LAG`, no slot's estimated lag is above it.
    async fn readiness(&self) -> Readiness {
        self.readiness
            .get(|| async {
                let Some(max) = self.ready_max_lag else {
                    return failed_slots(&self.store, QUERY_TIMEOUT)
                        .await
                        .map(|failed| {
                            failed
                                .into_iter()
                                .map(|s| format!("failed projection {s}"))
                                .collect()
                        })
                        .map_err(|e| e.to_string());
                };
                let slots = status_with(&self.store, &self.projections, &self.options)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut reasons = Vec::new();
                for s in &slots {
                    if s.state == "failed" {
                        reasons.push(format!(
                            "failed projection {}/{}",
                            s.projection, s.partition
                        ));
                    } else if s.lag_events > max {
                        reasons.push(format!(
                            "{}/{} lags {}{} events, over READY_MAX_LAG={max}",
                            s.projection,
                            s.partition,
                            if s.lag_exact { "" } else { "~" },
                            s.lag_events
                        ));
                    }
                }
                Ok(reasons)
            })
            .await
    }

    fn refresh_gauges(&self, r: &StatusReport) {
        let store = &self.store;
        let mut previous = self
            .gauge_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::metrics::with(|m| {
            // Set every current series first and only then remove those of
            // slots that went away, so a concurrent scrape never sees a
            // slot's series missing.
            let mut current = HashSet::new();
            for s in &r.projections {
                let partition = s.partition.to_string();
                let labels = [s.projection.as_str(), partition.as_str()];
                m.lag_events.with_label_values(&labels).set(s.lag_events);
                m.lag_seconds.with_label_values(&labels).set(s.lag_seconds);
                m.eta_seconds
                    .with_label_values(&labels)
                    .set(s.eta_seconds.unwrap_or(0.0));
                m.handle_rate
                    .with_label_values(&labels)
                    .set(s.rate.unwrap_or(0.0));
                m.skipped_events
                    .with_label_values(&labels)
                    .set(s.skipped_events);
                m.cursor_position
                    .with_label_values(&labels)
                    .set(s.gauge_position());
                for state in ["running", "stopped", "failed"] {
                    m.projection_state
                        .with_label_values(&[s.projection.as_str(), partition.as_str(), state])
                        .set(i64::from(s.state == state));
                }
                current.insert((s.projection.clone(), partition));
            }
            for (projection, partition) in previous.slots.difference(&current) {
                let labels = [projection.as_str(), partition.as_str()];
                let _ = m.lag_events.remove_label_values(&labels);
                let _ = m.lag_seconds.remove_label_values(&labels);
                let _ = m.eta_seconds.remove_label_values(&labels);
                let _ = m.handle_rate.remove_label_values(&labels);
                let _ = m.skipped_events.remove_label_values(&labels);
                let _ = m.cursor_position.remove_label_values(&labels);
                for state in ["running", "stopped", "failed"] {
                    let _ = m.projection_state.remove_label_values(&[
                        projection.as_str(),
                        partition.as_str(),
                        state,
                    ]);
                }
            }
            previous.slots = current;
            for (p, n) in &r.dead_letters {
                m.dead_letters.with_label_values(&[p.as_str()]).set(*n);
            }
            for p in previous.dead_letters.iter() {
                if !r.dead_letters.contains_key(p) {
                    let _ = m.dead_letters.remove_label_values(&[p.as_str()]);
                }
            }
            previous.dead_letters = r.dead_letters.keys().cloned().collect();
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
    tracing::info!(addr = %bound, "admin server listening (/ /metrics /healthz /readyz /status)");
    tokio::spawn(crate::console::sample(
        state.store.clone(),
        state.console.clone(),
        stop.clone(),
    ));
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
        "/readyz" => match state.readiness().await {
            Err(e) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("database unavailable: {e}\n"),
            ),
            Ok(reasons) if !reasons.is_empty() => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {}\n", reasons.join(", ")),
            ),
            Ok(_) => respond(StatusCode::OK, TEXT, "ready\n"),
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
        "/" => crate::console::page(),
        "/console.json" => {
            crate::console::feed(&state.console, &state.store, state.report().await).await
        }
        "/wait" => {
            let (code, body) = crate::wait::http(&state.waiter, req.uri().query()).await;
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            respond(code, "application/json", body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try / (the console) /metrics /healthz /readyz /status\n",
        ),
    }
}
