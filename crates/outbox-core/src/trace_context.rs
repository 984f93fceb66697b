//! The W3C Trace Context headers an event carries (`traceparent`, `tracestate`): what
//! the writer records, the relay continues and the inbox reads. Parsed and printed here
//! without any tracing library, so every crate reads them the same way.

use std::fmt;

/// The `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// A `traceparent` value: version 00, a trace id, a parent span id, and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace, 16 bytes (never all zero).
    pub trace_id: u128,
    /// The span that is the parent of whatever continues the trace, 8 bytes (never zero).
    pub span_id: u64,
    /// Trace flags: bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// Reads a `traceparent` header: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase. Later
    /// versions are read by their first four fields, as the specification asks; anything
    /// else, or zero ids, is `None` (the event then starts no trace of its own).
    pub fn parse(text: &str) -> Option<TraceParent> {
        let text = text.trim();
        let mut parts = text.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let well_formed = |part: &str, len: usize| {
            part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !well_formed(version, 2)
            || version == "ff"
            || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        if !(well_formed(trace, 32) && well_formed(span, 16) && well_formed(flags, 2)) {
            return None;
        }
        let parent = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (parent.trace_id != 0 && parent.span_id != 0).then_some(parent)
    }
}

/// Version 00, lowercase hex.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

#[cfg(feature = "opentelemetry")]
impl TraceParent {
    /// The current span of an OpenTelemetry context, if it has one.
    pub fn of_context(context: &opentelemetry::Context) -> Option<TraceParent> {
        use opentelemetry::trace::TraceContextExt;
        let span = context.span();
        let span = span.span_context();
        span.is_valid().then(|| TraceParent {
            trace_id: u128::from_be_bytes(span.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(span.span_id().to_bytes()),
            flags: span.trace_flags().to_u8(),
        })
    }

    /// A context whose parent is this remote span, with `tracestate` (when it parses).
    pub fn to_context(self, tracestate: Option<&str>) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let span = SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            TraceFlags::new(self.flags),
            true,
            state,
        );
        opentelemetry::Context::new().with_remote_span_context(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_written() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(text).unwrap();
        assert_eq!(parent.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parent.span_id, 0x00f067aa0ba902b7);
        assert_eq!(parent.flags, 1);
        assert_eq!(parent.to_string(), text);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for text in [
            "",
            "00-1-2-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(text), None, "{text:?}");
        }
        // A later version may add fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }
}
