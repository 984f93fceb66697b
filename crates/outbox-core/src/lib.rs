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

mod event;
mod outcome;
mod routing;
mod sink;
mod table;

pub use event::{Event, Payload, PayloadError, StoredEvent};
pub use outcome::{plan_batch, Action, RetryPolicy};
pub use routing::{Message, RouteError, Router, TopicTemplate, TopicTemplateError};
pub use sink::{DeliveryError, DeliveryOutcome, ErrorKind, Sink};
pub use table::{quote_ident, TableRef, TableRefError};
