use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::Message;

/// A boxed future, so that [`Sink`] can be used as `dyn Sink`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a sink's broker did not answer a check; its `Display` names what to change.
pub type CheckError = Box<dyn std::error::Error + Send + Sync>;

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
///
/// The relay holds its sink as `Arc<dyn Sink>`: the engine knows nothing of the broker
/// behind it. A sink is built by its own crate from its own settings.
pub trait Sink: Send + Sync {
    /// The broker's name, for logs and health ("kafka").
    fn name(&self) -> &'static str;

    /// Sends `messages` and reports one outcome per message, in their order.
    fn publish(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<DeliveryOutcome>>;

    /// Whether the broker answers, waiting at most `timeout`: at start (a refusal that
    /// retrying cannot fix ends the relay with the error's advice) and for `/healthz`.
    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), CheckError>>;

    /// This relay just became the active one. A sink that fences older relays (Kafka's
    /// transactions) may fence again from here on.
    fn lead(&self) {}

    /// Whether a newer relay fenced this one off at the broker since the last
    /// [`Sink::lead`]: the relay then stops leading and waits as a standby.
    fn is_fenced(&self) -> bool {
        false
    }
}
