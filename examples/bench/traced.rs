//! `catchup_traced`: what OpenTelemetry traces cost a catch-up (cargo
//! feature `otel`). The no-op projection catches up with the engine's spans
//! off and on, alternating; on, every batch and event span goes through the
//! SDK's batch span processor and the OTLP/HTTP exporter to a dummy
//! receiver in this process (it decodes and counts the spans, then answers
//! 200), as `OTEL_EXPORTER_OTLP_ENDPOINT` would send them to a collector.
//! Off is the state of a binary without the endpoint: no span is created.
//! Before the case every seeded event gets a `traceparent` of its own
//! (an `UPDATE` of the metadata), so that on, each event span continues a
//! remote trace as it would behind traced requests; both sides read the
//! same rows.
//!
//! The exporter's layer is installed at start (see `main.rs`) only when the
//! case is selected, and only creates spans while the case switches them
//! on. The figure is the catch-up's wall time; the flush of what the
//! processor still holds afterwards is reported apart, with the spans the
//! receiver got and the spans the processor dropped (its queue holds
//! `OTEL_BSP_MAX_QUEUE_SIZE` spans, 2048 by default: a catch-up faster than
//! the export drops the excess rather than slow down).

#[cfg(feature = "otel")]
pub use imp::install;

#[cfg(not(feature = "otel"))]
impl crate::setup::Bench {
    /// Without the feature there is nothing to measure.
    pub async fn catchup_traced(&mut self, _: &crate::setup::Seeded) {
        self.progress("catchup_traced: skipped (build the bench with --features otel)");
    }
}

#[cfg(feature = "otel")]
mod imp {
    use crate::catchup::LibRunner;
    use crate::projections::Noop;
    use crate::setup::{Bench, Seeded};
    use crate::stats::{ev_s, median, rate, round};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Instant;

    /// The exporter and the receiver's listener, set up before the runtime.
    struct Traced {
        provider: opentelemetry_sdk::trace::SdkTracerProvider,
        listener: Mutex<Option<std::net::TcpListener>>,
        spans: Arc<AtomicU64>,
    }

    static TRACED: OnceLock<Traced> = OnceLock::new();

    /// Binds the dummy receiver's port and builds the provider exporting to
    /// it; returns the layer to install beside the log lines. Call before
    /// the runtime starts (the exporter's blocking client must not be
    /// built inside it).
    pub fn install<S>() -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("receiver address").port();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("http://127.0.0.1:{port}/v1/traces"))
            .build()
            .expect("cannot build the OTLP exporter");
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer("bench");
        let _ = TRACED.set(Traced {
            provider,
            listener: Mutex::new(Some(listener)),
            spans: Arc::default(),
        });
        tracing_opentelemetry::layer().with_tracer(tracer)
    }

    /// Serves the receiver: decodes every export and counts its spans.
    fn serve(t: &Traced) {
        let Some(listener) = t.listener.lock().unwrap().take() else {
            return;
        };
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let spans = t.spans.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let spans = spans.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let spans = spans.clone();
                            async move {
                                use http_body_util::BodyExt;
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                let n = body
                                    .ok()
                                    .and_then(|b| ExportTraceServiceRequest::decode(b).ok())
                                    .map(|r| {
                                        r.resource_spans
                                            .iter()
                                            .flat_map(|rs| &rs.scope_spans)
                                            .map(|ss| ss.spans.len() as u64)
                                            .sum::<u64>()
                                    })
                                    .unwrap_or(0);
                                spans.fetch_add(n, Ordering::Relaxed);
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }

    /// Exports what the processor holds; the time it took.
    async fn flush(t: &'static Traced) -> f64 {
        let started = Instant::now();
        tokio::task::spawn_blocking(move || t.provider.force_flush())
            .await
            .expect("flush task")
            .expect("flush");
        started.elapsed().as_secs_f64()
    }

    impl Bench {
        /// `catchup_traced`: the no-op catch-up with spans off and on.
        pub async fn catchup_traced(&mut self, s: &Seeded) {
            let Some(t) = TRACED.get() else {
                self.progress("catchup_traced: no exporter installed; skipped");
                return;
            };
            serve(t);
            for sql in [
                "UPDATE events SET metadata = jsonb_build_object('traceparent', \
                   '00-' || md5(global_position::text) || '-' || left(md5(event_id::text), 16) || '-01')",
                "VACUUM ANALYZE events",
            ] {
                s.client
                    .batch_execute(sql)
                    .await
                    .expect("cannot add traceparents");
            }
            let runner = LibRunner::of(
                &s.store,
                Arc::new(Noop {
                    name: "bench_noop".into(),
                }),
                self.catchup_config(),
            );
            // Warm-up of both sides.
            for on in [false, true] {
                projectionist::otel::set_spans_enabled(on);
                self.library_catchup(s, &runner).await;
            }
            projectionist::otel::set_spans_enabled(false);
            flush(t).await;
            let (mut off, mut on, mut flushes, mut received, mut dropped) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let batches = s.events.div_ceil(self.batch as u64);
            for rep in 0..self.reps {
                for side in 0..2 {
                    let traced = (side == 0) == (rep % 2 == 0);
                    projectionist::otel::set_spans_enabled(traced);
                    let before = t.spans.load(Ordering::Relaxed);
                    let d = self.library_catchup(s, &runner).await;
                    projectionist::otel::set_spans_enabled(false);
                    if traced {
                        on.push(rate(s.events, d));
                        flushes.push(flush(t).await);
                        let got = t.spans.load(Ordering::Relaxed) - before;
                        let created = s.events + batches;
                        received.push(got as f64);
                        dropped.push(created.saturating_sub(got) as f64);
                    } else {
                        off.push(rate(s.events, d));
                    }
                }
                self.progress(format!(
                    "catchup_traced rep {}/{}: spans off {}, on (exported) {}, {} of {} spans received",
                    rep + 1,
                    self.reps,
                    ev_s(off[off.len() - 1]),
                    ev_s(on[on.len() - 1]),
                    received[received.len() - 1],
                    s.events + batches,
                ));
            }
            let (l_off, l_on) = (median(&off), median(&on));
            let ratio = l_on / l_off;
            self.json.insert(
                "catchup_traced".into(),
                json!({"events_per_s_traces_on": round(l_on, 0), "events_per_s_traces_off": round(l_off, 0),
                       "ratio": round(ratio, 3), "events": s.events, "batch_size": self.batch,
                       "spans_per_catchup": s.events + batches,
                       "spans_received": round(median(&received), 0),
                       "spans_dropped": round(median(&dropped), 0),
                       "flush_after_s": round(median(&flushes), 3)}),
            );
            self.row(
                "catchup_traced",
                ev_s(l_on),
                ev_s(l_off),
                format!("{ratio:.2}"),
                format!(
                    "traces on vs off; {} of {} spans exported",
                    median(&received),
                    s.events + batches
                ),
            );
        }
    }
}
