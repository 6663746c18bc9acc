//! The operator console of the admin server: an HTML page at `/` (embedded
//! from `console.html`, no external scripts, styles or fonts) that polls
//! the JSON feed `console.json` every 2 s.
//!
//! The feed is the cached status report (every slot, the workers and the
//! leader, the transaction holding the watermark back, dead letters per
//! projection), plus what only the console needs: the newest dead letters
//! of each projection, and each slot's throughput over the last 15 minutes
//! from samples of `events_handled` that the server takes every 5 s in
//! memory (one read of the checkpoint table; a restarted process starts a
//! new series).
//!
//! Read-only, and nothing secret: passwords in queries and errors are
//! masked (`db::redact`). The page uses relative URLs only, so it works
//! behind a reverse proxy that serves the admin server under a path prefix,
//! and is sent with a strict Content-Security-Policy that allows only its
//! own inline script and style (by hash) and requests to its own origin.

use crate::admin::{within, StatusReport};
use crate::db::redact;
use crate::error::Result;
use crate::store::EventStore;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// The page, embedded in the binary.
const PAGE: &str = include_str!("console.html");

/// How often the server samples every slot's `events_handled` (5 s).
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// How long samples are kept (15 minutes).
pub(crate) const SAMPLE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Dead letters shown per projection: the ones with the highest global
/// positions (the newest, read through the `(projection_name,
/// global_position)` index).
const NEWEST_DEAD_LETTERS: i64 = 5;

/// How long a console query may take (3 s, as the admin server's): run
/// under this `statement_timeout` and cancelled when it passes.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the newest dead letters are reused (1 s, as the status report).
const CACHE_FOR: Duration = Duration::from_secs(1);

/// (projection, partition).
type SlotKey = (String, i32);

/// The console's state in the admin server: throughput samples and the
/// cached newest dead letters. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Console {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per slot: (seconds since the epoch, events handled), oldest first.
    samples: std::sync::Mutex<HashMap<SlotKey, VecDeque<(f64, i64)>>>,
    /// The newest dead letters, when they were read and the counts they
    /// were read for.
    dead_letters: tokio::sync::Mutex<Option<CachedLetters>>,
}

/// The newest dead letters as read at `at`, for the report's counts
/// `counts`: reused for [`CACHE_FOR`] while the counts are the same.
struct CachedLetters {
    at: Instant,
    counts: BTreeMap<String, i64>,
    letters: DeadLetters,
}

impl CachedLetters {
    /// The cached letters, if they are fresh and were read for `counts`
    /// (a report that counts a new dead letter must list it: the count
    /// and the list on one page never disagree for longer than a read).
    fn reuse(&self, counts: &BTreeMap<String, i64>) -> Option<DeadLetters> {
        (self.at.elapsed() < CACHE_FOR && &self.counts == counts).then(|| self.letters.clone())
    }
}

/// The newest dead letters per projection, or why they could not be read.
type DeadLetters = std::result::Result<Arc<Vec<serde_json::Value>>, String>;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Console {
    /// Records one sample per slot taken at `at`; slots absent from it
    /// (deleted by `reset`) are forgotten.
    fn record(&self, at: f64, handled: Vec<(SlotKey, i64)>) {
        let mut samples = self
            .inner
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut current = HashMap::with_capacity(handled.len());
        for (key, n) in handled {
            let mut series = samples.remove(&key).unwrap_or_default();
            series.push_back((at, n));
            while series
                .front()
                .is_some_and(|(t, _)| at - t > SAMPLE_WINDOW.as_secs_f64())
            {
                series.pop_front();
            }
            current.insert(key, series);
        }
        *samples = current;
    }

    /// A slot's throughput: `[seconds since the epoch, events per second]`
    /// per sampling interval, oldest first. A count that went down (a
    /// reset) counts as 0.
    fn throughput(&self, key: &SlotKey) -> Vec<(f64, f64)> {
        let samples = self
            .inner
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(series) = samples.get(key) else {
            return Vec::new();
        };
        series
            .iter()
            .zip(series.iter().skip(1))
            .filter(|((t0, _), (t1, _))| t1 > t0)
            .map(|((t0, n0), (t1, n1))| (*t1, (n1 - n0).max(0) as f64 / (t1 - t0)))
            .collect()
    }

    /// The newest dead letters of the projections counted in `counts`
    /// (the status report's), at most a second old and read again as soon
    /// as a count changes.
    async fn dead_letters(
        &self,
        store: &EventStore,
        counts: &BTreeMap<String, i64>,
    ) -> DeadLetters {
        let mut cache = self.inner.dead_letters.lock().await;
        if let Some(letters) = cache.as_ref().and_then(|c| c.reuse(counts)) {
            return letters;
        }
        let letters = newest_dead_letters(store, counts.keys().cloned().collect())
            .await
            .map(Arc::new)
            .map_err(|e| e.to_string());
        *cache = Some(CachedLetters {
            at: Instant::now(),
            counts: counts.clone(),
            letters: letters.clone(),
        });
        letters
    }
}

/// Samples every slot's `events_handled` every [`SAMPLE_EVERY`] until
/// `stop` turns true (spawned by the admin server).
pub(crate) async fn sample(store: EventStore, console: Console, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        match handled_per_slot(&store).await {
            Ok(handled) => console.record(unix_now(), handled),
            Err(e) => tracing::debug!(error = %e, "console: cannot sample the checkpoints"),
        }
    }
}

/// `events_handled` of every checkpoint (one read of the checkpoint table).
async fn handled_per_slot(store: &EventStore) -> Result<Vec<(SlotKey, i64)>> {
    within(
        store,
        QUERY_TIMEOUT,
        "console sample",
        |mut session| async move {
            let sql = format!(
                "SELECT projection_name, partition_key, events_handled FROM {}",
                store.statements().checkpoints
            );
            let rows = session
                .pipelined(QUERY_TIMEOUT, &[(&sql, &[])], true)
                .await?
                .into_iter()
                .next()
                .unwrap_or_default();
            let handled = rows
                .iter()
                .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?)))
                .collect::<Result<Vec<_>>>()?;
            session.finish();
            Ok(handled)
        },
    )
    .await
}

/// The [`NEWEST_DEAD_LETTERS`] newest dead letters of each of `projections`,
/// errors masked.
async fn newest_dead_letters(
    store: &EventStore,
    projections: Vec<String>,
) -> Result<Vec<serde_json::Value>> {
    if projections.is_empty() {
        return Ok(Vec::new());
    }
    within(
        store,
        QUERY_TIMEOUT,
        "console dead letters",
        |mut session| async move {
            let sql = format!(
                "SELECT d.id, d.projection_name, d.partition_key, d.global_position, \
                        d.aggregate_type, d.aggregate_id, d.event_type, d.error, d.attempts, \
                        d.last_attempt_at \
                 FROM unnest($1::text[]) AS p(name) \
                 CROSS JOIN LATERAL ( \
                     SELECT * FROM {} WHERE projection_name = p.name \
                     ORDER BY global_position DESC LIMIT $2) d \
                 ORDER BY d.projection_name, d.global_position DESC",
                store.statements().dead_letters
            );
            let params: [(
                &(dyn tokio_postgres::types::ToSql + Sync),
                tokio_postgres::types::Type,
            ); 2] = [
                (&projections, tokio_postgres::types::Type::TEXT_ARRAY),
                (&NEWEST_DEAD_LETTERS, tokio_postgres::types::Type::INT8),
            ];
            let rows = session
                .pipelined(QUERY_TIMEOUT, &[(&sql, &params)], true)
                .await?
                .into_iter()
                .next()
                .unwrap_or_default();
            let letters = rows
                .iter()
                .map(|r| {
                    Ok(serde_json::json!({
                        "id": r.try_get::<_, i64>(0)?,
                        "projection": r.try_get::<_, String>(1)?,
                        "partition": r.try_get::<_, i32>(2)?,
                        "global_position": r.try_get::<_, i64>(3)?,
                        "aggregate_type": r.try_get::<_, String>(4)?,
                        "aggregate_id": r.try_get::<_, String>(5)?,
                        "event_type": r.try_get::<_, String>(6)?,
                        "error": redact(&r.try_get::<_, String>(7)?),
                        "attempts": r.try_get::<_, i32>(8)?,
                        "last_attempt_at": r
                            .try_get::<_, chrono::DateTime<chrono::Utc>>(9)?
                            .to_rfc3339(),
                    }))
                })
                .collect::<Result<Vec<_>>>()?;
            session.finish();
            Ok(letters)
        },
    )
    .await
}

/// The Content-Security-Policy of the page: nothing but its own inline
/// script and style (by hash), requests to its own origin, no framing.
fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash(PAGE, "script"),
            inline_hash(PAGE, "style")
        )
    })
}

/// `sha256-…` of the content of the first `<tag>` element of `page`.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let content = page
        .split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map(|(content, _)| content)
        .unwrap_or("");
    let digest = ring::digest::digest(&ring::digest::SHA256, content.as_bytes());
    format!("sha256-{}", base64(digest.as_ref()))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

/// `GET /`: the page.
pub(crate) fn page() -> Response<Full<Bytes>> {
    let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_owned());
    if let Ok(csp) = hyper::header::HeaderValue::from_str(content_security_policy()) {
        r.headers_mut()
            .insert(hyper::header::CONTENT_SECURITY_POLICY, csp);
    }
    r
}

/// `GET /console.json`: the report, each slot with its throughput, and the
/// newest dead letters.
pub(crate) async fn feed(
    console: &Console,
    store: &EventStore,
    report: std::result::Result<Arc<StatusReport>, String>,
) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            return respond(
                StatusCode::SERVICE_UNAVAILABLE,
                JSON,
                serde_json::json!({ "error": redact(&e) }).to_string(),
            )
        }
    };
    let letters = console.dead_letters(store, &report.dead_letters).await;
    respond(
        StatusCode::OK,
        JSON,
        body(console, &report, letters).to_string(),
    )
}

fn body(console: &Console, report: &StatusReport, letters: DeadLetters) -> serde_json::Value {
    let slots: Vec<serde_json::Value> = report
        .projections
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                let throughput = console.throughput(&(s.projection.clone(), s.partition));
                obj.insert(
                    "events_per_second".into(),
                    serde_json::json!(throughput.last().map(|(_, r)| *r)),
                );
                obj.insert(
                    "throughput".into(),
                    serde_json::json!(throughput
                        .iter()
                        .map(|(t, r)| [t.round(), (r * 10.0).round() / 10.0])
                        .collect::<Vec<_>>()),
                );
            }
            v
        })
        .collect();
    let (newest, letters_error) = match letters {
        Ok(l) => (l, None),
        Err(e) => (Arc::new(Vec::new()), Some(redact(&e))),
    };
    let dead_letters: Vec<serde_json::Value> = report
        .dead_letters
        .iter()
        .map(|(projection, count)| {
            serde_json::json!({
                "projection": projection,
                "count": count,
                "newest": newest
                    .iter()
                    .filter(|l| l["projection"] == projection.as_str())
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "now": unix_now().round(),
        "sample_seconds": SAMPLE_EVERY.as_secs(),
        "window_seconds": SAMPLE_WINDOW.as_secs(),
        "log_head": report.log_head,
        "slots": slots,
        "workers": report.workers,
        "leader": report.workers.iter().find(|w| w.is_leader).map(|w| &w.worker_id),
        "watermark_held_by": report.watermark_held_by,
        "dead_letters": dead_letters,
        "dead_letters_error": letters_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_letters_are_read_again_when_a_count_changes() {
        let counts = |n: i64| BTreeMap::from([("account_balances".to_owned(), n)]);
        let cached = CachedLetters {
            at: Instant::now(),
            counts: BTreeMap::new(),
            letters: Ok(Arc::new(Vec::new())),
        };
        // Read before the first dead letter: a report counting one must
        // not show the empty list beside its count.
        assert!(cached.reuse(&counts(1)).is_none());
        assert!(cached.reuse(&BTreeMap::new()).is_some());
        let old = CachedLetters {
            at: Instant::now() - CACHE_FOR,
            counts: counts(1),
            letters: Ok(Arc::new(Vec::new())),
        };
        assert!(old.reuse(&counts(1)).is_none(), "at most CACHE_FOR old");
    }

    #[test]
    fn base64_matches_the_standard() {
        for (raw, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), want);
        }
    }

    #[test]
    fn the_page_is_self_contained_and_uses_relative_urls_only() {
        // The SVG namespace is a name, never fetched.
        let lower = PAGE
            .to_ascii_lowercase()
            .replace("'http://www.w3.org/2000/svg'", "");
        for absolute in [
            "http:",
            "https:",
            "//",
            "src=\"/",
            "href=\"/",
            "fetch('/",
            "fetch(\"/",
            "url(",
            "@import",
        ] {
            // `//` would also catch protocol-relative URLs; the page has no
            // `//` comments for that reason.
            assert!(
                !lower.contains(absolute),
                "console.html contains {absolute:?}: keep it self-contained with relative URLs"
            );
        }
        assert_eq!(lower.matches("<script>").count(), 1, "one inline script");
        assert_eq!(lower.matches("<style>").count(), 1, "one inline style");
        assert!(!lower.contains("<script src"), "no external script");
        assert!(
            !lower.contains(" style=\""),
            "no style attributes (the CSP forbids them)"
        );
        assert!(
            !lower.contains("innerhtml"),
            "text goes in with textContent"
        );
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_script_and_style() {
        let csp = content_security_policy();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'sha256-"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_ne!(inline_hash(PAGE, "script"), inline_hash("", "script"));
        assert_ne!(inline_hash(PAGE, "style"), inline_hash("", "style"));
    }

    #[test]
    fn throughput_is_the_rate_between_samples_and_forgets_old_ones() {
        let c = Console::default();
        let key: SlotKey = ("p".into(), 0);
        c.record(1000.0, vec![(key.clone(), 0)]);
        c.record(1005.0, vec![(key.clone(), 50)]);
        c.record(1010.0, vec![(key.clone(), 20)]); // a reset
        c.record(1015.0, vec![(key.clone(), 120)]);
        assert_eq!(
            c.throughput(&key),
            vec![(1005.0, 10.0), (1010.0, 0.0), (1015.0, 20.0)]
        );
        c.record(1000.0 + 15.0 * 60.0 + 6.0, vec![(key.clone(), 130)]);
        assert_eq!(c.throughput(&key).len(), 2, "samples older than 15 min go");
        c.record(2000.0, vec![]);
        assert!(
            c.throughput(&key).is_empty(),
            "a slot that went away is forgotten"
        );
    }
}
