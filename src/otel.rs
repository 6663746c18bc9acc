//! OpenTelemetry traces (cargo feature `otel`): the OTLP/HTTP exporter the
//! command line installs when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the
//! engine's spans — `projectionist.batch` per batch and
//! `projectionist.event` per handled event, continuing the trace named by
//! the event's `traceparent` — and the `traceparent` that appends made
//! inside a traced span store in the events' metadata.
//!
//! Without the feature, or with it but no exporter installed, every span
//! helper here returns [`Span::none`] after one relaxed atomic load: the
//! engine creates no span per event or per batch, and log lines look the
//! same as without tracing.

use crate::event::{Cursor, StoredEvent};
use tracing::Span;

/// At most this many distinct traces are linked from one batch span (the
/// SDK's default link limit is 128).
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
const MAX_BATCH_LINKS: usize = 32;

#[cfg(feature = "otel")]
static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the engine creates its batch and event spans.
#[inline]
pub(crate) fn active() -> bool {
    #[cfg(feature = "otel")]
    {
        ACTIVE.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "otel"))]
    {
        false
    }
}

/// Switches the engine's `projectionist.batch` and `projectionist.event`
/// spans on or off (off by default). [`crate::cli::init_logging`] switches
/// them on when it installs the OTLP exporter; do it yourself when your
/// binary installs its own `tracing-opentelemetry` layer instead.
#[cfg(feature = "otel")]
pub fn set_spans_enabled(enabled: bool) {
    ACTIVE.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// What a batch span records when it starts.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) struct BatchStart<'a> {
    pub(crate) projection: &'a str,
    pub(crate) partition: i32,
    pub(crate) version: i32,
    /// `sequential` or `concurrent`.
    pub(crate) mode: &'static str,
    pub(crate) cursor_before: Cursor,
    pub(crate) watermark: u64,
    pub(crate) events: &'a [StoredEvent],
}

/// A `projectionist.batch` span (not entered), linked to the traces of the
/// batch's events; [`Span::none`] when spans are off or the batch is empty.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn batch_span(b: &BatchStart<'_>) -> Span {
    if !active() || b.events.is_empty() {
        return Span::none();
    }
    #[cfg(feature = "otel")]
    {
        imp::batch_span(b)
    }
    #[cfg(not(feature = "otel"))]
    {
        Span::none()
    }
}

/// Records where the batch left the cursor and how many events it handled.
pub(crate) fn finish_batch(span: &Span, cursor_after: Cursor, handled: usize) {
    if span.is_none() {
        return;
    }
    span.record("cursor.after", tracing::field::display(cursor_after));
    span.record("handled", handled as u64);
}

/// A `projectionist.event` span for `event` (not entered): its trace is
/// the one the event's `traceparent` names (the append's), linked to
/// `batch`; without a `traceparent`, a child of `batch`. [`Span::none`]
/// when spans are off.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn event_span(batch: &Span, projection: &str, event: &StoredEvent) -> Span {
    if !active() {
        return Span::none();
    }
    #[cfg(feature = "otel")]
    {
        imp::event_span(batch, projection, event)
    }
    #[cfg(not(feature = "otel"))]
    {
        Span::none()
    }
}

/// One event span per event of a batch handed to a batch handler at once.
pub(crate) fn event_spans(batch: &Span, projection: &str, events: &[StoredEvent]) -> Vec<Span> {
    if !active() || batch.is_none() {
        return Vec::new();
    }
    events
        .iter()
        .map(|e| event_span(batch, projection, e))
        .collect()
}

/// Marks `span` as failed with `error`.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn fail(span: &Span, error: &dyn std::fmt::Display) {
    #[cfg(feature = "otel")]
    if !span.is_none() {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        span.set_status(opentelemetry::trace::Status::error(error.to_string()));
    }
}

/// The metadata of `events` with the current span's `traceparent` added
/// where they have none, when the current span belongs to a valid
/// OpenTelemetry trace; `None` (nothing to change) otherwise.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn stamp_metadata(events: &[crate::event::NewEvent]) -> Option<Vec<String>> {
    #[cfg(feature = "otel")]
    {
        let traceparent = imp::current_traceparent()?;
        Some(
            events
                .iter()
                .map(|e| with_traceparent(&e.metadata, &traceparent))
                .collect(),
        )
    }
    #[cfg(not(feature = "otel"))]
    {
        None
    }
}

/// `metadata` (a JSON object's text) with `traceparent` added, unless it
/// has one already (or is not an object: left as it is, the database
/// judges it).
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
fn with_traceparent(metadata: &str, traceparent: &str) -> String {
    let Ok(mut map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(metadata)
    else {
        return metadata.to_owned();
    };
    if map.contains_key("traceparent") {
        return metadata.to_owned();
    }
    map.insert(
        "traceparent".to_owned(),
        serde_json::Value::String(traceparent.to_owned()),
    );
    serde_json::Value::Object(map).to_string()
}

/// The `traceparent` in an event's metadata text, if any.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
fn traceparent_of(metadata: &str) -> Option<String> {
    // Most metadata has none: skip the parse.
    if !metadata.contains("traceparent") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Trace {
        traceparent: Option<String>,
    }
    serde_json::from_str::<Trace>(metadata).ok()?.traceparent
}

#[cfg(feature = "otel")]
pub(crate) use imp::{flush, install};

#[cfg(feature = "otel")]
mod imp {
    use super::{traceparent_of, BatchStart, MAX_BATCH_LINKS};
    use crate::event::StoredEvent;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use tracing::field::Empty;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The provider the command line installed, flushed on shutdown.
    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// The remote span context a W3C `traceparent` names, if valid.
    fn remote_context(traceparent: &str) -> Option<opentelemetry::Context> {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        cx.span().span_context().is_valid().then_some(cx)
    }

    fn span_context(span: &Span) -> SpanContext {
        span.context().span().span_context().clone()
    }

    pub(super) fn batch_span(b: &BatchStart<'_>) -> Span {
        let oldest = b.events.iter().map(|e| e.created_at).min();
        let wait_ms = oldest
            .map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0))
            .unwrap_or(0);
        let span = tracing::info_span!(
            target: "projectionist",
            parent: None,
            "projectionist.batch",
            projection = b.projection,
            partition = b.partition,
            version = b.version,
            mode = b.mode,
            events = b.events.len() as u64,
            handled = Empty,
            "cursor.before" = %b.cursor_before,
            "cursor.after" = Empty,
            watermark = b.watermark,
            "watermark.wait_ms" = wait_ms,
        );
        let mut linked: Vec<opentelemetry::trace::TraceId> = Vec::new();
        for event in b.events {
            if linked.len() >= MAX_BATCH_LINKS {
                break;
            }
            let Some(cx) = traceparent_of(&event.metadata).and_then(|t| remote_context(&t)) else {
                continue;
            };
            let sc = cx.span().span_context().clone();
            if !linked.contains(&sc.trace_id()) {
                linked.push(sc.trace_id());
                span.add_link(sc);
            }
        }
        span
    }

    pub(super) fn event_span(batch: &Span, projection: &str, event: &StoredEvent) -> Span {
        let span = tracing::info_span!(
            target: "projectionist",
            parent: batch,
            "projectionist.event",
            "otel.kind" = "consumer",
            projection,
            "event.type" = %event.event_type,
            "event.id" = %event.event_id,
            "event.position" = event.global_position,
            "aggregate.type" = %event.aggregate_type,
            "aggregate.id" = %event.aggregate_id,
            "aggregate.version" = event.aggregate_version,
        );
        if let Some(cx) = traceparent_of(&event.metadata).and_then(|t| remote_context(&t)) {
            // The append's trace continues here; the batch is a link.
            let _ = span.set_parent(cx);
            if !batch.is_none() {
                span.add_link(span_context(batch));
            }
        }
        span
    }

    /// The W3C `traceparent` of the current span, when it belongs to a
    /// valid OpenTelemetry trace.
    pub(super) fn current_traceparent() -> Option<String> {
        let current = Span::current();
        if current.is_none() {
            return None;
        }
        let cx = current.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        Some(format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ))
    }

    /// Whether the standard variables ask for trace export: an OTLP
    /// endpoint is set, and neither `OTEL_SDK_DISABLED=true` nor
    /// `OTEL_TRACES_EXPORTER=none`.
    fn wanted() -> bool {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let endpoint =
            set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let disabled =
            std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let none = std::env::var("OTEL_TRACES_EXPORTER")
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
        endpoint && !disabled && !none
    }

    /// The service name when neither `OTEL_SERVICE_NAME` nor
    /// `OTEL_RESOURCE_ATTRIBUTES` names one: the binary's file name.
    fn default_service_name() -> Option<String> {
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        if named {
            return None;
        }
        std::env::current_exe()
            .ok()?
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
    }

    /// Builds the OTLP/HTTP (protobuf) exporter and its batch processor
    /// from the standard `OTEL_*` variables, when they ask for export, and
    /// returns the tracer for a `tracing-opentelemetry` layer. Errors are
    /// the exporter's configuration errors (a bad endpoint URL).
    pub(crate) fn install() -> Result<Option<opentelemetry_sdk::trace::Tracer>, String> {
        if !wanted() {
            return Ok(None);
        }
        if let Some(p) = PROVIDER.get() {
            return Ok(Some(p.tracer("projectionist")));
        }
        let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_default();
        if !protocol.is_empty() && protocol.trim() != "http/protobuf" {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={protocol:?} is not supported: this build exports \
                 over http/protobuf only; unset it or set it to http/protobuf"
            ));
        }
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            let url = std::env::var(name).unwrap_or_default();
            if url.trim().to_ascii_lowercase().starts_with("https://") {
                return Err(format!(
                    "{name}={url:?}: this build exports over plain HTTP only (no TLS); send to a \
                     collector beside the process (a sidecar or in-cluster service) over http://"
                ));
            }
        }
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|e| format!("cannot set up the OTLP trace exporter: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if let Some(name) = default_service_name() {
            resource = resource.with_service_name(name);
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        let provider = PROVIDER.get_or_init(|| provider);
        super::set_spans_enabled(true);
        Ok(Some(provider.tracer("projectionist")))
    }

    /// Exports every span ended so far (blocks until the exporter answered
    /// or timed out).
    pub(crate) fn flush() {
        if let Some(p) = PROVIDER.get() {
            if let Err(e) = p.force_flush() {
                tracing::warn!(error = %e, "flushing traces failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_added_only_where_there_is_none() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            with_traceparent("{}", tp),
            format!(r#"{{"traceparent":"{tp}"}}"#)
        );
        let mine = r#"{"traceparent":"00-11111111111111111111111111111111-2222222222222222-01"}"#;
        assert_eq!(with_traceparent(mine, tp), mine);
        let other: serde_json::Value =
            serde_json::from_str(&with_traceparent(r#"{"correlation_id":"c"}"#, tp)).unwrap();
        assert_eq!(other["correlation_id"], "c");
        assert_eq!(other["traceparent"], tp);
        assert_eq!(with_traceparent("not json", tp), "not json");
    }

    #[test]
    fn the_traceparent_is_read_from_metadata() {
        assert_eq!(traceparent_of("{}"), None);
        assert_eq!(
            traceparent_of(r#"{"traceparent":"00-a-b-01","x":1}"#).as_deref(),
            Some("00-a-b-01")
        );
        assert_eq!(traceparent_of(r#"{"x":"traceparent"}"#), None);
    }

    #[test]
    fn spans_are_off_until_enabled() {
        let events: Vec<StoredEvent> = Vec::new();
        let span = batch_span(&BatchStart {
            projection: "p",
            partition: 0,
            version: 1,
            mode: "sequential",
            cursor_before: Cursor::START,
            watermark: 1,
            events: &events,
        });
        assert!(span.is_none());
    }
}
