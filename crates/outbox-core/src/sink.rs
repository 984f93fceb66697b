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
///   the sink's own retries. Once one of them fails, for whatever reason, no later
///   message of that key in the same batch may be delivered: the sink reports those as
///   failed too (held back) rather than sending them ahead of a retry, or past a dead
///   letter that parks its aggregate.
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

/// One aggregate's messages of a batch, with their places in it.
type Lane<'a> = Vec<(usize, &'a Message)>;

/// Publishes `messages` under the per-key order of the [`Sink`] contract, for brokers
/// without partitions or keys: one aggregate's messages (same topic and key) one after
/// another, each only after `publish_one` settled the previous one, and after a failure
/// the rest of that aggregate held back (with the failure's kind, or retriable behind a
/// permanent one); different aggregates at once. Returns one outcome per message, in their order.
pub async fn publish_per_aggregate<'a, F, Fut>(
    messages: &'a [Message],
    publish_one: F,
) -> Vec<DeliveryOutcome>
where
    F: Fn(&'a Message) -> Fut,
    Fut: Future<Output = DeliveryOutcome>,
{
    let mut lanes: std::collections::HashMap<(&str, &[u8]), Lane<'a>> =
        std::collections::HashMap::new();
    for (index, message) in messages.iter().enumerate() {
        lanes
            .entry((message.topic.as_str(), message.key.as_slice()))
            .or_default()
            .push((index, message));
    }
    let publish_one = &publish_one;
    let finished = futures::future::join_all(lanes.into_values().map(|lane| async move {
        let mut outcomes = Vec::with_capacity(lane.len());
        let mut held: Option<ErrorKind> = None;
        for (index, message) in lane {
            let outcome = match held {
                Some(kind) => DeliveryOutcome::Failed(DeliveryError {
                    kind,
                    reason: "held back behind an earlier event of the same aggregate that failed"
                        .into(),
                }),
                None => publish_one(message).await,
            };
            if let DeliveryOutcome::Failed(err) = &outcome {
                held.get_or_insert(match err.kind {
                    ErrorKind::Permanent => ErrorKind::Retriable,
                    kind => kind,
                });
            }
            outcomes.push((index, outcome));
        }
        outcomes
    }))
    .await;
    let mut outcomes: Vec<Option<DeliveryOutcome>> = vec![None; messages.len()];
    for (index, outcome) in finished.into_iter().flatten() {
        outcomes[index] = Some(outcome);
    }
    outcomes
        .into_iter()
        .map(|o| o.expect("every message has an outcome"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(key: &str, n: u8) -> Message {
        Message {
            topic: "t".into(),
            key: key.as_bytes().to_vec(),
            value: Some(vec![n]),
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_failure_holds_its_aggregate_back() {
        let messages = vec![
            message("a", 0), // permanent: a's later messages wait too
            message("b", 0), // unavailable: b's later messages wait
            message("a", 1),
            message("b", 1),
            message("c", 0),
        ];
        let sent = std::sync::Mutex::new(Vec::new());
        let outcomes = futures::executor::block_on(publish_per_aggregate(&messages, |m| {
            sent.lock().unwrap().push((m.key.clone(), m.value.clone()));
            let outcome = match (m.key.as_slice(), m.value.as_deref()) {
                (b"a", Some([0])) => DeliveryOutcome::Failed(DeliveryError::permanent("bad")),
                (b"b", Some([0])) => DeliveryOutcome::Failed(DeliveryError::unavailable("down")),
                _ => DeliveryOutcome::Delivered,
            };
            async move { outcome }
        }));
        assert_eq!(outcomes.len(), 5);
        assert!(
            matches!(&outcomes[0], DeliveryOutcome::Failed(e) if e.kind == ErrorKind::Permanent)
        );
        assert!(
            matches!(&outcomes[1], DeliveryOutcome::Failed(e) if e.kind == ErrorKind::Unavailable)
        );
        assert!(
            matches!(&outcomes[2], DeliveryOutcome::Failed(e) if e.reason.contains("held back")),
            "a's second went past its dead letter: {outcomes:?}"
        );
        let DeliveryOutcome::Failed(held) = &outcomes[3] else {
            panic!("b's second overtook its failed first: {outcomes:?}");
        };
        assert_eq!(held.kind, ErrorKind::Unavailable);
        assert!(held.reason.contains("held back"));
        assert_eq!(outcomes[4], DeliveryOutcome::Delivered);
        // The held-back messages never reached the broker.
        let sent = sent.lock().unwrap();
        assert!(!sent.contains(&(b"b".to_vec(), Some(vec![1]))));
        assert!(!sent.contains(&(b"a".to_vec(), Some(vec![1]))));
    }
}
