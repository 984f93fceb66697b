use std::future::Future;

use crate::Message;

/// Whether retrying a failed delivery can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The broker refused this message for a reason that may pass (a missing topic,
    /// authorization an operator may still grant): retry with backoff; after
    /// `max_attempts` the event is dead-lettered.
    Retriable,
    /// The broker could not be reached or did not answer in time. That says nothing
    /// about the message, so it is retried without using up one of its attempts: an
    /// outage, however long, never dead-letters anything.
    Unavailable,
    /// The message can never be accepted as it is (too large, illegal topic): dead-letter
    /// it at once.
    Permanent,
}

/// Why a sink could not deliver one message, and whether retrying can help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct DeliveryError {
    /// Decides what the relay does next: retry, wait for the broker, or dead-letter.
    pub kind: ErrorKind,
    /// What went wrong, for the log and the dead letter's `last_error`.
    pub reason: String,
}

impl DeliveryError {
    /// An [`ErrorKind::Retriable`] failure.
    pub fn retriable(reason: impl Into<String>) -> Self {
        DeliveryError {
            kind: ErrorKind::Retriable,
            reason: reason.into(),
        }
    }

    /// An [`ErrorKind::Unavailable`] failure.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        DeliveryError {
            kind: ErrorKind::Unavailable,
            reason: reason.into(),
        }
    }

    /// An [`ErrorKind::Permanent`] failure.
    pub fn permanent(reason: impl Into<String>) -> Self {
        DeliveryError {
            kind: ErrorKind::Permanent,
            reason: reason.into(),
        }
    }
}

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// The broker acknowledged the message durably (for Kafka: `acks=all`).
    Delivered,
    /// Not acknowledged; the message may still have reached the broker.
    Failed(DeliveryError),
}

/// A message broker the relay publishes to.
///
/// # Contract
/// - `publish` returns exactly one outcome per message, in the order of `messages`.
/// - [`DeliveryOutcome::Delivered`] means the broker has acknowledged the message
///   durably; the relay then marks the row published and will not send it again.
///   Anything short of that must be reported as `Failed`.
/// - Messages with the same topic and key reach the broker in the order given, across
///   the sink's own retries. If one of them fails with a non-permanent error, no later
///   message of that key in the same batch may be delivered ahead of it: the sink
///   reports those as failed too rather than sending them out of order.
/// - Delivery is at-least-once: a message may reach the broker and still be reported
///   failed (a lost acknowledgement). Consumers deduplicate by the `id` header.
pub trait Sink: Send + Sync {
    /// Sends `messages` and reports one outcome per message, in their order.
    fn publish(&self, messages: Vec<Message>) -> impl Future<Output = Vec<DeliveryOutcome>> + Send;
}
