//! Traces (OpenTelemetry, exported over OTLP/HTTP): off unless the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
//!
//! Each published batch is one span, linked to the trace of every event in it (the
//! `traceparent` its writer recorded). Each such event also gets a span of its own in
//! its writer's trace, and its message carries that span as `traceparent`: a consumer
//! continues writer → relay → consumer as one trace.

use std::sync::OnceLock;

use opentelemetry::trace::{
    Link, Span, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use opentelemetry_sdk::Resource;
use outbox_core::{DeliveryOutcome, Message, StoredEvent, TraceParent, TRACEPARENT, TRACESTATE};

use crate::RelayError;

/// Set once, when traces are on.
static TRACER: OnceLock<Tracer> = OnceLock::new();

/// The exporter of a relay with traces on; [`Telemetry::shutdown`] sends what is left.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// The standard variables, read once.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Telemetry {
    /// Turns traces on when an OTLP endpoint is configured (and `OTEL_SDK_DISABLED` is
    /// not `true`, and `OTEL_TRACES_EXPORTER` is not `none`). Call it outside any async
    /// runtime: the exporter's HTTP client runs on a thread of its own.
    pub fn from_env() -> Result<Option<Telemetry>, RelayError> {
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        if endpoint.is_none() || disabled {
            return Ok(None);
        }
        let protocol_var = if var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").is_some() {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        } else {
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        };
        let protocol = match var(protocol_var).as_deref() {
            None | Some("http/protobuf") => Protocol::HttpBinary,
            Some("http/json") => Protocol::HttpJson,
            Some(other) => {
                return Err(RelayError::Config(format!(
                    "{protocol_var}={other:?}: the relay exports traces over OTLP/HTTP only; set it to http/protobuf (the default) or http/json, and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (4318)"
                )))
            }
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build()
            .map_err(|err| {
                RelayError::Config(format!(
                    "cannot set up the OTLP trace exporter: {err}; check OTEL_EXPORTER_OTLP_ENDPOINT"
                ))
            })?;
        let mut resource = Resource::builder();
        if var("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("outbox-relay");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let _ = TRACER.set(provider.tracer("outbox-relay"));
        tracing::info!(
            protocol = if protocol == Protocol::HttpJson {
                "http/json"
            } else {
                "http/protobuf"
            },
            "traces on: exporting spans over OTLP"
        );
        Ok(Some(Telemetry { provider }))
    }

    /// Sends the spans not yet exported, then stops the exporter. Blocks: call it
    /// outside any async runtime.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(%err, "could not export the last spans");
        }
    }
}

/// The spans of one batch in flight: ended with the batch's outcomes.
pub(crate) struct PublishTrace {
    batch: opentelemetry_sdk::trace::Span,
    /// One per message, for the events that came with a trace.
    messages: Vec<Option<opentelemetry_sdk::trace::Span>>,
}

/// Starts the spans of a batch about to be published (when traces are on), and
/// rewrites each traced message's `traceparent` to its own span. `messages[i]` is the
/// message of `events[sent[i]]`.
pub(crate) fn start_publish(
    events: &[StoredEvent],
    sent: &[usize],
    messages: &mut [Message],
    sink: &'static str,
) -> Option<PublishTrace> {
    let tracer = TRACER.get()?;
    let parents: Vec<Option<Context>> = sent
        .iter()
        .map(|&index| event_context(&events[index]))
        .collect();
    let links = parents
        .iter()
        .flatten()
        .map(|context| Link::with_context(context.span().span_context().clone()))
        .collect();
    let batch = tracer
        .span_builder("outbox publish")
        .with_kind(SpanKind::Producer)
        .with_links(links)
        .with_attributes([
            KeyValue::new("messaging.system", sink),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.batch.message_count", messages.len() as i64),
        ])
        .start_with_context(tracer, &Context::new());
    let batch_span = batch.span_context().clone();
    let spans = messages
        .iter_mut()
        .zip(parents)
        .map(|(message, parent)| {
            let parent = parent?;
            let span = tracer
                .span_builder(format!("publish {}", message.topic))
                .with_kind(SpanKind::Producer)
                .with_links(vec![Link::with_context(batch_span.clone())])
                .with_attributes([
                    KeyValue::new("messaging.system", sink),
                    KeyValue::new("messaging.destination.name", message.topic.clone()),
                ])
                .start_with_context(tracer, &parent);
            let context = Context::new().with_remote_span_context(span.span_context().clone());
            let own = TraceParent::of_context(&context).expect("a started span is valid");
            let state = span.span_context().trace_state().header();
            message
                .headers
                .retain(|(name, _)| name != TRACEPARENT && name != TRACESTATE);
            message
                .headers
                .push((TRACEPARENT.to_string(), own.to_string().into_bytes()));
            if !state.is_empty() {
                message
                    .headers
                    .push((TRACESTATE.to_string(), state.into_bytes()));
            }
            Some(span)
        })
        .collect();
    Some(PublishTrace {
        batch,
        messages: spans,
    })
}

impl PublishTrace {
    /// Ends the spans: a message the broker did not take is an error.
    pub(crate) fn end(mut self, delivered: &[DeliveryOutcome]) {
        let mut failed = 0;
        for (span, outcome) in self.messages.iter_mut().zip(delivered) {
            if let DeliveryOutcome::Failed(err) = outcome {
                failed += 1;
                if let Some(span) = span {
                    span.set_status(Status::error(err.reason.clone()));
                }
            }
            if let Some(span) = span {
                span.end();
            }
        }
        if failed > 0 {
            self.batch
                .set_status(Status::error(format!("{failed} message(s) not delivered")));
        }
        self.batch.end();
    }
}

/// The context an event's `traceparent` (and `tracestate`) header names, if any.
fn event_context(event: &StoredEvent) -> Option<Context> {
    let header = |wanted: &str| {
        event
            .headers
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.as_str())
    };
    let parent = TraceParent::parse(header(TRACEPARENT)?)?;
    Some(parent.to_context(header(TRACESTATE)))
}

#[cfg(test)]
// figment's Jail returns its own large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use figment::Jail;

    use super::*;

    #[test]
    fn traces_are_off_without_an_endpoint_and_grpc_is_refused() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            assert!(Telemetry::from_env().unwrap().is_none());
            jail.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
            jail.set_env("OTEL_SDK_DISABLED", "true");
            assert!(Telemetry::from_env().unwrap().is_none(), "disabled");
            jail.set_env("OTEL_SDK_DISABLED", "false");
            jail.set_env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
            let err = Telemetry::from_env().err().expect("grpc is refused");
            assert!(err.to_string().contains("http/protobuf"), "{err}");
            assert!(TRACER.get().is_none(), "nothing was turned on");
            Ok(())
        });
    }
}
