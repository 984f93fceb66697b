//! Core types of the transactional outbox, shared by the writer library, the relay and
//! its sources and sinks. Nothing here performs I/O, so all of it is unit-tested without
//! a database or a broker.
//!
//! - [`Event`]: what an application writes into the outbox table.
//! - [`StoredEvent`]: a row as a source reads it back.
//! - [`Router`]: DESIGN.md's routing rules (topic, key, value, headers) → [`Message`].
//! - [`Sink`]: the contract every broker sink implements, and [`DeliveryOutcome`].
//! - [`RetryPolicy`] and [`plan_batch`]: what the relay does with each outcome.
//! - [`TableRef`]: a schema-qualified, always-quoted table name.
//! - [`TraceParent`]: the W3C `traceparent` header events carry.
//! - [`audit_report`]: `outbox verify`'s comparison of outbox rows with the messages
//!   read back from their topics.

#![deny(missing_docs)]

mod audit;
mod event;
mod outcome;
mod report;
mod routing;
mod sink;
mod table;
mod trace_context;

pub use audit::{
    audit_report, audit_topics, AuditPolicy, AuditReport, AuditRow, DuplicateExample, LostEvent,
    LostReason, ObservedMessage, OrderViolation, Position, StreamRead, LISTED_EXAMPLES,
    LISTED_LOST,
};
pub use event::{Event, Payload, PayloadError, StoredEvent};
pub use outcome::{plan_batch, Action, DeadLetterPolicy, RetryPolicy};
pub use report::write_error_chain;
pub use routing::{
    DestinationRule, Message, RouteError, Router, TopicTemplate, TopicTemplateError,
    RESERVED_HEADERS, RETRIED_DEAD_LETTER_HEADER,
};
pub use sink::{
    publish_per_aggregate, BoxFuture, CheckError, DeliveryError, DeliveryOutcome, ErrorKind, Sink,
};
pub use table::{quote_ident, TableRef, TableRefError};
pub use trace_context::{TraceParent, TRACEPARENT, TRACESTATE};
