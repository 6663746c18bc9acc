//! OpenTelemetry traces (feature `otel`): the bank example, run with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a small OTLP/HTTP receiver in
//! this test, exports batch and event spans that continue the trace named
//! by the events' `traceparent`; a traced `deposit` stores its span's
//! `traceparent` in the event it appends; appends inside a traced span of
//! the library do the same; the concurrent implementation (which no bank
//! projection uses) is checked in process.

use crate::cli::{bank, run, text};
use crate::common::wait_until;
use http_body_util::BodyExt;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use projectionist::testing::TestDatabase;
use projectionist::{EventStore, ExpectedVersion, Metadata, NewEvent, StoreConfig};
use prost::Message;
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::instrument::WithSubscriber;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// A span as the receiver got it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// Trace ids of the span's links.
    links: Vec<String>,
    attributes: HashMap<String, String>,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    status: i32,
}

impl Received {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map(String::as_str).unwrap_or("")
    }
}

fn value_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A minimal OTLP/HTTP trace receiver on 127.0.0.1: decodes each
/// `POST /v1/traces` body (protobuf `ExportTraceServiceRequest`) into
/// [`Received`] spans. Stops when dropped.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let store = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let store = store.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let store = store.clone();
                        async move { Ok::<_, std::convert::Infallible>(receive(req, &store).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { port, spans, task }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

async fn receive(
    req: hyper::Request<hyper::body::Incoming>,
    store: &Mutex<Vec<Received>>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let reply = |status: u16, body: Vec<u8>| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return reply(404, Vec::new());
    }
    let Ok(body) = req.into_body().collect().await else {
        return reply(400, Vec::new());
    };
    let Ok(request) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return reply(400, Vec::new());
    };
    let mut got = Vec::new();
    for rs in request.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Received {
                    service: service.clone(),
                    name: s.name.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    links: s.links.iter().map(|l| hex(&l.trace_id)).collect(),
                    attributes: attributes(&s.attributes),
                    status: s.status.map(|st| st.code).unwrap_or(0),
                });
            }
        }
    }
    store.lock().unwrap().extend(got);
    reply(200, ExportTraceServiceResponse::default().encode_to_vec())
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn event(event_type: &str, cents: i64) -> NewEvent {
    NewEvent::from_json(
        event_type,
        format!(r#"{{"cents":{cents},"currency":"EUR"}}"#),
    )
    .with_event_version(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_append_trace_continues_into_batch_and_event_spans() {
    let receiver = Receiver::start().await;
    let db = TestDatabase::create().await.unwrap();
    // An https endpoint is refused (no TLS in this build): said on stderr,
    // and the command runs without traces.
    let o = run(
        &db,
        &["migrate"],
        &[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://collector.invalid:4318",
        )],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("plain HTTP only"),
        "{}",
        text(&o)
    );

    // Appends that carry a known traceparent: a deposit (account_balances)
    // and a large withdrawal (also large_withdrawal_notifier, whose filter
    // takes withdrawals only).
    let store = EventStore::connect_config(db.config(), StoreConfig::default()).unwrap();
    let traced = Metadata::new().with_traceparent(format!("00-{TRACE_ID}-{PARENT_ID}-01"));
    store
        .append(
            "Account",
            "acct-traced",
            ExpectedVersion::NoStream,
            &[
                event("MoneyDeposited", 500_000).with_metadata(&traced),
                event("MoneyWithdrawn", 200_000).with_metadata(&traced),
            ],
        )
        .await
        .unwrap();
    // A traced request: `deposit` runs in a span whose traceparent its
    // append stores (and whose span it exports on exit).
    let otel_env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_SERVICE_NAME", "bank-traces-test".to_owned()),
        // Only the flush on shutdown exports: it must not lose anything.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
    ];
    let env: Vec<(&str, &str)> = otel_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let o = run(
        &db,
        &["deposit", "--account", "acct-deposit", "--cents", "700"],
        &env,
    );
    assert!(o.status.success(), "{}", text(&o));
    let c = db.connect().await.unwrap();
    let stored: String = c
        .query_one(
            "SELECT metadata->>'traceparent' FROM events WHERE aggregate_id = 'acct-deposit'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let deposit_trace = stored.split('-').nth(1).unwrap().to_owned();
    let deposit = receiver
        .spans()
        .into_iter()
        .find(|s| s.name == "bank.deposit")
        .expect("deposit exported its span on exit");
    assert_eq!(deposit.trace_id, deposit_trace, "{stored}");
    assert_eq!(
        stored,
        format!("00-{}-{}-01", deposit.trace_id, deposit.span_id)
    );

    let child = bank()
        .env("DATABASE_URL", db.url())
        .envs(otel_env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["run-projections"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "both projections to handle the three events",
        || async {
            let row = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE projection_name = 'account_balances' AND events_handled >= 3), \
                            count(*) FILTER (WHERE projection_name = 'large_withdrawal_notifier' AND events_handled >= 1) \
                     FROM projection_checkpoints",
                    &[],
                )
                .await;
            matches!(row, Ok(r) if r.get::<_, i64>(0) == 1 && r.get::<_, i64>(1) == 1)
        },
    )
    .await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let exited = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(exited.status.success(), "{}", text(&exited));

    // The exit flushed the batch processor: every span has arrived.
    let spans = receiver.spans();
    let dump = || {
        spans
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let events = |projection: &str, trace: &str| -> Vec<&Received> {
        spans
            .iter()
            .filter(|s| {
                s.name == "projectionist.event"
                    && s.attr("projection") == projection
                    && s.trace_id == trace
            })
            .collect()
    };
    // Sequential path: both traced events, parented on the traceparent's
    // span, in the append's trace.
    let balances = events("account_balances", TRACE_ID);
    assert_eq!(balances.len(), 2, "{}", dump());
    for s in &balances {
        assert_eq!(s.parent_span_id, PARENT_ID);
        assert_eq!(s.service, "bank-traces-test");
        assert_eq!(s.attr("aggregate.id"), "acct-traced");
        assert_eq!(s.attr("aggregate.type"), "Account");
        assert!(!s.attr("event.position").is_empty());
        assert_eq!(s.links.len(), 1, "an event span links its batch: {s:?}");
    }
    let mut types: Vec<&str> = balances.iter().map(|s| s.attr("event.type")).collect();
    types.sort();
    assert_eq!(types, ["MoneyDeposited", "MoneyWithdrawn"]);
    // The notifier: the withdrawal only.
    let notified = events("large_withdrawal_notifier", TRACE_ID);
    assert_eq!(notified.len(), 1, "{}", dump());
    assert_eq!(notified[0].attr("event.type"), "MoneyWithdrawn");
    assert_eq!(notified[0].parent_span_id, PARENT_ID);
    // The deposit's trace continues into the projection too.
    let continued = events("account_balances", &deposit.trace_id);
    assert_eq!(continued.len(), 1, "{}", dump());
    assert_eq!(continued[0].parent_span_id, deposit.span_id);

    // Batch spans: linked to the traces of their events, with the batch's
    // facts; each event span's link is its batch span's trace.
    let batches: Vec<&Received> = spans
        .iter()
        .filter(|s| s.name == "projectionist.batch" && s.links.iter().any(|l| l == TRACE_ID))
        .collect();
    for (projection, mode) in [
        ("account_balances", "sequential"),
        ("large_withdrawal_notifier", "sequential"),
    ] {
        let b = batches
            .iter()
            .find(|b| b.attr("projection") == projection)
            .unwrap_or_else(|| {
                panic!(
                    "no {projection} batch span linked to the trace:\n{}",
                    dump()
                )
            });
        assert_eq!(b.attr("mode"), mode);
        assert_eq!(b.attr("partition"), "0");
        assert_eq!(b.attr("version"), "1");
        for key in [
            "events",
            "handled",
            "cursor.before",
            "cursor.after",
            "watermark",
            "watermark.wait_ms",
        ] {
            assert!(!b.attr(key).is_empty(), "{key} missing: {b:?}");
        }
        assert_ne!(b.attr("cursor.before"), b.attr("cursor.after"));
        assert_eq!(b.parent_span_id, "", "a batch span is a root");
        assert_eq!(b.status, 0);
        assert!(
            spans.iter().any(|s| s.name == "projectionist.event"
                && s.attr("projection") == projection
                && s.links.contains(&b.trace_id)),
            "no event span links the {projection} batch:\n{}",
            dump()
        );
    }
}

/// Appends inside a traced span store its `traceparent` in events that
/// have none, and leave one that is set alone.
#[tokio::test]
async fn appends_in_a_traced_span_store_its_traceparent() {
    let db = TestDatabase::create().await.unwrap();
    projectionist::migrate(&db.config(), "public")
        .await
        .unwrap();
    let store = EventStore::connect_config(db.config(), StoreConfig::default()).unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let own = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let own_metadata = Metadata::new()
        .with_traceparent(own.clone())
        .with_correlation_id("c-1");
    let store2 = store.clone();
    let expected = async move {
        let span = tracing::info_span!("request");
        store2
            .append(
                "Order",
                "o-1",
                ExpectedVersion::NoStream,
                &[
                    NewEvent::from_json("Placed", "{}")
                        .with_metadata(&Metadata::new().with_correlation_id("c-1")),
                    NewEvent::from_json("Paid", "{}").with_metadata(&own_metadata),
                ],
            )
            .instrument(span.clone())
            .await
            .unwrap();
        let sc = span.context().span().span_context().clone();
        format!("00-{}-{}-01", sc.trace_id(), sc.span_id())
    }
    .with_subscriber(subscriber)
    .await;
    // Outside any span: nothing is added.
    store
        .append(
            "Order",
            "o-2",
            ExpectedVersion::NoStream,
            &[NewEvent::from_json("Placed", "{}")],
        )
        .await
        .unwrap();
    let c = db.connect().await.unwrap();
    let rows = c
        .query(
            "SELECT aggregate_id, event_type, metadata->>'traceparent', metadata->>'correlation_id' \
             FROM events ORDER BY global_position",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        [
            (
                "o-1".to_owned(),
                "Placed".to_owned(),
                Some(expected),
                Some("c-1".to_owned())
            ),
            (
                "o-1".to_owned(),
                "Paid".to_owned(),
                Some(own),
                Some("c-1".to_owned())
            ),
            ("o-2".to_owned(), "Placed".to_owned(), None, None),
        ]
    );
}

/// A span exporter that keeps what it is given.
#[derive(Clone, Debug, Default)]
struct Collect(Arc<Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

impl opentelemetry_sdk::trace::SpanExporter for Collect {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// Counts the events it handles.
struct Io(std::sync::atomic::AtomicUsize);

#[projectionist::async_trait]
impl projectionist::ConcurrentProjection for Io {
    fn options(&self) -> projectionist::ProjectionOptions {
        projectionist::ProjectionOptions::new("traced_io")
    }

    fn concurrency(&self) -> projectionist::Concurrency {
        projectionist::Concurrency::new(8)
    }

    async fn handle(
        &self,
        _event: &projectionist::StoredEvent,
        _scope: &projectionist::Scope,
    ) -> projectionist::Result<()> {
        // A span the handler opens is a child of the event's span.
        let _inner = tracing::info_span!("io.call").entered();
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The concurrent implementation (no bank projection uses it): a batch
/// span per fetched page, linked to the events' traces, and an event span
/// per event in the append's trace. The engine's tasks run on a runtime
/// of the test's own whose threads all use a subscriber with an
/// OpenTelemetry layer, so the rest of the test binary is left alone
/// (except that the engine's spans are switched on for the process).
#[test]
fn concurrent_batches_and_events_continue_the_trace() {
    use std::sync::atomic::Ordering;
    let exported = Collect::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exported.clone())
        .build();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test"))),
    );
    let for_threads = dispatch.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // Kept for the thread's life.
            std::mem::forget(tracing::dispatcher::set_default(&for_threads));
        })
        .build()
        .unwrap();
    projectionist::otel::set_spans_enabled(true);
    let io = Arc::new(Io(Default::default()));
    let handled = io.clone();
    rt.block_on(async move {
        let db = TestDatabase::create().await.unwrap();
        projectionist::migrate(&db.config(), "public")
            .await
            .unwrap();
        let store = EventStore::connect_config(db.config(), StoreConfig::default()).unwrap();
        let traced = Metadata::new().with_traceparent(format!("00-{TRACE_ID}-{PARENT_ID}-01"));
        store
            .append(
                "Order",
                "o-1",
                ExpectedVersion::NoStream,
                &[
                    NewEvent::from_json("Placed", "{}").with_metadata(&traced),
                    NewEvent::from_json("Paid", "{}").with_metadata(&traced),
                ],
            )
            .await
            .unwrap();
        store
            .append(
                "Order",
                "o-2",
                ExpectedVersion::NoStream,
                &[NewEvent::from_json("Placed", "{}")],
            )
            .await
            .unwrap();
        let runner = projectionist::Runner::new(store, projectionist::RunnerConfig::default())
            .with_concurrent_projection(handled.clone())
            .unwrap();
        wait_until(
            Duration::from_secs(30),
            "the three events handled",
            || async {
                runner.run_once().await.unwrap();
                handled.0.load(Ordering::SeqCst) >= 3
            },
        )
        .await;
    });
    drop(rt);
    assert_eq!(io.0.load(Ordering::SeqCst), 3);
    let spans = exported.0.lock().unwrap().clone();
    let dump = spans
        .iter()
        .map(|s| format!("{} {:?} {:?}", s.name, s.span_context, s.attributes))
        .collect::<Vec<_>>()
        .join("\n");
    let attr = |s: &opentelemetry_sdk::trace::SpanData, key: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
            .unwrap_or_default()
    };
    let events: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "projectionist.event")
        .collect();
    assert_eq!(events.len(), 3, "{dump}");
    let traced: Vec<_> = events
        .iter()
        .filter(|s| s.span_context.trace_id().to_string() == TRACE_ID)
        .collect();
    assert_eq!(traced.len(), 2, "{dump}");
    for s in &traced {
        assert_eq!(s.parent_span_id.to_string(), PARENT_ID);
        assert!(s.parent_span_is_remote);
        assert_eq!(attr(s, "projection"), "traced_io");
        assert_eq!(attr(s, "aggregate.id"), "o-1");
    }
    let batch = spans
        .iter()
        .find(|s| {
            s.name == "projectionist.batch"
                && s.links
                    .iter()
                    .any(|l| l.span_context.trace_id().to_string() == TRACE_ID)
        })
        .unwrap_or_else(|| panic!("no batch span linked to the trace:\n{dump}"));
    assert_eq!(attr(batch, "mode"), "concurrent");
    assert_eq!(attr(batch, "projection"), "traced_io");
    for s in &traced {
        assert!(
            s.links
                .iter()
                .any(|l| l.span_context.span_id() == batch.span_context.span_id()),
            "the event span links its batch: {dump}"
        );
    }
    // The untraced event: a child of its batch span.
    let plain = events
        .iter()
        .find(|s| attr(s, "aggregate.id") == "o-2")
        .unwrap();
    let parent = spans
        .iter()
        .find(|s| s.span_context.span_id() == plain.parent_span_id)
        .unwrap_or_else(|| panic!("the untraced event's parent was exported:\n{dump}"));
    assert_eq!(parent.name, "projectionist.batch");
    // The handler's own span is a child of its event's span.
    for e in &events {
        assert!(
            spans.iter().any(|s| s.name == "io.call"
                && s.parent_span_id == e.span_context.span_id()
                && s.span_context.trace_id() == e.span_context.trace_id()),
            "no handler span under {:?}:\n{dump}",
            e.span_context
        );
    }
}
