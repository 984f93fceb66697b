//! Traces across the outbox: a writer's span, the relay's spans (the real binary,
//! exporting over OTLP because `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and the inbox
//! handler's span arrive at an OTLP receiver of the test's own, as one trace.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::routing::post;
use common::*;
use opentelemetry::trace::{FutureExt, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use outbox::Event;
use outbox_core::TraceParent;
use outbox_inbox::{handler_fn, HandlerError, Inbox};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

for_each_mode!(writer_relay_and_inbox_spans_form_one_trace,);

/// An OTLP/HTTP (JSON) receiver on loopback: every span it was sent.
struct Receiver {
    address: String,
    spans: Arc<Mutex<Vec<Value>>>,
}

/// One receiver and one tracer provider (this process's writer and inbox) for the
/// whole test binary, each on a thread of its own: they outlive any one test's runtime.
fn receiver() -> &'static Receiver {
    static RECEIVER: OnceLock<Receiver> = OnceLock::new();
    RECEIVER.get_or_init(|| {
        let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
        let kept = spans.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/v1/traces",
                    post(move |body: String| {
                        let kept = kept.clone();
                        async move {
                            let request: Value = serde_json::from_str(&body).unwrap();
                            let mut kept = kept.lock().unwrap();
                            for resource in request["resourceSpans"].as_array().unwrap() {
                                let service = resource["resource"]["attributes"]
                                    .as_array()
                                    .and_then(|attributes| {
                                        attributes.iter().find(|a| a["key"] == "service.name")
                                    })
                                    .map(|a| a["value"]["stringValue"].clone())
                                    .unwrap_or(Value::Null);
                                for scope in resource["scopeSpans"].as_array().unwrap() {
                                    for span in scope["spans"].as_array().unwrap() {
                                        let mut span = span.clone();
                                        span["service"] = service.clone();
                                        kept.push(span);
                                    }
                                }
                            }
                            "{}"
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        Receiver { address, spans }
    })
}

/// This process's tracer provider, exporting to the receiver; also the global one (the
/// inbox takes its tracer from there, as in an application).
fn provider() -> &'static SdkTracerProvider {
    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let endpoint = format!("{}/v1/traces", receiver().address);
        // The exporter's blocking HTTP client must be made outside any async runtime.
        std::thread::spawn(move || {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpJson)
                .with_endpoint(endpoint)
                .build()
                .unwrap();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("shop")
                        .build(),
                )
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            provider
        })
        .join()
        .unwrap()
    })
}

fn hex(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

async fn writer_relay_and_inbox_spans_form_one_trace(mode: Mode) {
    let receiver = receiver();
    let provider = provider();
    let db = TestDb::for_mode(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = spawn_relay(
        &db,
        &dir.path().join("relay.log"),
        &[
            ("OUTBOX_MODE", mode_name(mode)),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.address),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );

    // The writer: an application's span, and the event written inside it.
    let tracer = provider.tracer("shop");
    let span = tracer.start("place order");
    let writer = Context::current_with_span(span);
    let event = Event::json(
        "order",
        "o-1",
        "OrderPlaced",
        &serde_json::json!({"total": 5}),
    )
    .unwrap();
    let id = event.id;
    async { outbox::write(&db.pool, &event).await.unwrap() }
        .with_context(writer.clone())
        .await;
    writer.span().end();
    let written = TraceParent::of_context(&writer).unwrap();
    let (trace_id, writer_span) = (
        format!("{:032x}", written.trace_id),
        format!("{:016x}", written.span_id),
    );
    let stored: Option<Value> = sqlx::query_scalar("SELECT headers FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        stored.unwrap()["traceparent"],
        written.to_string(),
        "write recorded the caller's span"
    );

    // The consumer: the handler notes the span it runs in.
    let seen: Arc<Mutex<Option<TraceParent>>> = Arc::default();
    let noted = seen.clone();
    let inbox = Inbox::builder(
        db.pool.clone(),
        outbox_test_kit::kafka::brokers(),
        "billing",
        format!("traces-{}", db.name),
    )
    .topics([db.topic("order")])
    .build()
    .unwrap();
    inbox.migrate().await.unwrap();
    let shutdown = CancellationToken::new();
    let handler = handler_fn(move |_tx, _message| {
        let noted = noted.clone();
        Box::pin(async move {
            *noted.lock().unwrap() = TraceParent::of_context(&Context::current());
            Ok::<_, HandlerError>(())
        })
    });
    let running = tokio::spawn(inbox.run(handler, shutdown.clone()));
    let deadline = Instant::now() + WAIT;
    let in_handler = loop {
        if let Some(parent) = *seen.lock().unwrap() {
            break parent;
        }
        assert!(Instant::now() < deadline, "the handler never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(
        format!("{:032x}", in_handler.trace_id),
        trace_id,
        "the handler runs in the writer's trace"
    );
    tokio::task::spawn_blocking(move || provider.force_flush())
        .await
        .unwrap()
        .unwrap();

    // Writer → relay → consumer, one trace, as the receiver got it.
    let deadline = Instant::now() + WAIT;
    let (publish, batch, process) = loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let in_trace: Vec<&Value> = spans
            .iter()
            .filter(|s| hex(&s["traceId"]) == trace_id)
            .collect();
        let publish = in_trace
            .iter()
            .find(|s| s["service"] == "outbox-relay" && hex(&s["parentSpanId"]) == writer_span)
            .cloned()
            .cloned();
        let batch = spans
            .iter()
            .find(|s| {
                s["name"] == "outbox publish"
                    && s["links"].as_array().is_some_and(|links| {
                        links.iter().any(|l| {
                            hex(&l["traceId"]) == trace_id && hex(&l["spanId"]) == writer_span
                        })
                    })
            })
            .cloned();
        let process = publish.as_ref().and_then(|publish| {
            in_trace
                .iter()
                .find(|s| hex(&s["parentSpanId"]) == hex(&publish["spanId"]))
                .cloned()
                .cloned()
        });
        if let (Some(publish), Some(batch), Some(process)) = (&publish, &batch, &process) {
            break (publish.clone(), batch.clone(), process.clone());
        }
        assert!(
            Instant::now() < deadline,
            "the receiver has no writer → relay → consumer trace {trace_id}: publish {publish:?}, batch {batch:?}, process {process:?}; spans: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(publish["name"], format!("publish {}", db.topic("order")));
    assert_eq!(batch["service"], "outbox-relay");
    assert_eq!(process["name"], format!("process {}", db.topic("order")));
    assert_eq!(process["service"], "shop");
    assert_eq!(
        format!("{:016x}", in_handler.span_id),
        hex(&process["spanId"]),
        "the handler's current span is the inbox's process span"
    );

    sigterm(&relay);
    relay.wait().unwrap();
    db.drop_db().await;
}
