use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use crate::{DeliveryOutcome, ErrorKind, StoredEvent};

/// How failed deliveries are retried: exponential backoff, then dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts before an event is dead-lettered (the first delivery counts as one).
    pub max_attempts: u32,
    /// The wait after the first failure; it doubles with each further failure.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before the next attempt, after `failed_attempts` failures (1 or more).
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff)
    }
}

/// What a dead letter does to the later events of its aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterPolicy {
    /// They wait in the table until an operator retries the dead letter (it goes first,
    /// so the aggregate's order holds) or skips it (`outbox dead-letters skip`).
    #[default]
    Park,
    /// They go on without it; a retried dead letter arrives after them.
    Skip,
}

/// What the relay records for one event after a delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The broker acknowledged it: mark the row published (or delete it).
    Published {
        /// The event's id.
        id: Uuid,
    },
    /// Try again after `backoff`; the aggregate's later events wait for it.
    Retry {
        /// The event's id.
        id: Uuid,
        /// The attempt count to record; not raised when the event was only held back
        /// behind another or the broker was unreachable.
        attempts: i32,
        /// How long to wait before the next attempt.
        backoff: Duration,
        /// The delivery error, recorded as the row's last error.
        error: String,
    },
    /// Give up: keep the row, flagged as a dead letter with the reason.
    DeadLetter {
        /// The event's id.
        id: Uuid,
        /// The attempt count to record, this attempt included.
        attempts: i32,
        /// Why it was given up on, recorded with the dead letter.
        error: String,
    },
}

/// Turns the outcomes of one batch into actions. `events[i]` was delivered with
/// `outcomes[i]`.
///
/// Per-aggregate order: the first failed event of an aggregate is judged on its own
/// outcome (retried, or dead-lettered); every later event of that aggregate in the batch
/// that did not reach the broker waits behind it, keeping its attempt count: it may have
/// failed only because of its elder (held back, or refused in the same request), so it
/// is never dead-lettered for that. When it goes next is the source's business: after
/// the elder's retry, or, behind a dead letter, as the [`DeadLetterPolicy`] says.
pub fn plan_batch(
    policy: &RetryPolicy,
    events: &[StoredEvent],
    outcomes: &[DeliveryOutcome],
) -> Vec<Action> {
    assert_eq!(events.len(), outcomes.len(), "one outcome per event");
    let mut failed: HashSet<(&str, &str)> = HashSet::new();
    let mut actions = Vec::with_capacity(events.len());
    for (event, outcome) in events.iter().zip(outcomes) {
        let aggregate = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
        let attempts = event.attempts.saturating_add(1);
        let action = match outcome {
            DeliveryOutcome::Delivered => Action::Published { id: event.id },
            // Behind an earlier failure: it waits for its elder, whose row decides when
            // the aggregate goes on.
            DeliveryOutcome::Failed(err) if failed.contains(&aggregate) => Action::Retry {
                id: event.id,
                attempts: event.attempts,
                backoff: Duration::ZERO,
                error: err.reason.clone(),
            },
            DeliveryOutcome::Failed(err) => {
                failed.insert(aggregate);
                match err.kind {
                    ErrorKind::Permanent => Action::DeadLetter {
                        id: event.id,
                        attempts,
                        error: err.reason.clone(),
                    },
                    ErrorKind::Retriable if attempts as i64 >= policy.max_attempts as i64 => {
                        Action::DeadLetter {
                            id: event.id,
                            attempts,
                            error: format!("gave up after {attempts} attempts: {}", err.reason),
                        }
                    }
                    ErrorKind::Retriable => Action::Retry {
                        id: event.id,
                        attempts,
                        backoff: policy.backoff(attempts as u32),
                        error: err.reason.clone(),
                    },
                    // An unreachable broker says nothing about the event: its attempt
                    // count stays, so an outage never dead-letters it.
                    ErrorKind::Unavailable => Action::Retry {
                        id: event.id,
                        attempts: event.attempts,
                        backoff: policy.backoff(event.attempts.max(1) as u32),
                        error: err.reason.clone(),
                    },
                }
            }
        };
        actions.push(action);
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeliveryError;

    fn event(aggregate: &str, seq: i64, attempts: i32) -> StoredEvent {
        StoredEvent {
            seq,
            id: Uuid::from_u128(seq as u128),
            aggregate_type: "order".into(),
            aggregate_id: aggregate.into(),
            event_type: "T".into(),
            payload: None,
            headers: vec![],
            attempts,
            unreadable: None,
            retried_dead_letter: false,
        }
    }

    fn retriable() -> DeliveryOutcome {
        DeliveryOutcome::Failed(DeliveryError::retriable("broker down"))
    }

    fn permanent() -> DeliveryOutcome {
        DeliveryOutcome::Failed(DeliveryError::permanent("too large"))
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(4), Duration::from_millis(800));
        assert_eq!(policy.backoff(5), Duration::from_secs(1));
        assert_eq!(policy.backoff(1000), Duration::from_secs(1));
    }

    #[test]
    fn delivered_events_are_published() {
        let events = [event("a", 1, 0), event("b", 2, 0)];
        let actions = plan_batch(
            &RetryPolicy::default(),
            &events,
            &[DeliveryOutcome::Delivered, DeliveryOutcome::Delivered],
        );
        assert!(actions
            .iter()
            .all(|a| matches!(a, Action::Published { .. })));
    }

    #[test]
    fn permanent_failure_is_dead_lettered_at_once_and_others_flow() {
        let events = [
            event("a", 1, 0),
            event("b", 2, 0),
            event("a", 3, 0),
            event("a", 4, 2),
        ];
        let actions = plan_batch(
            &RetryPolicy::default(),
            &events,
            &[
                permanent(),
                DeliveryOutcome::Delivered,
                permanent(),
                retriable(),
            ],
        );
        assert!(
            matches!(&actions[0], Action::DeadLetter { attempts: 1, error, .. } if error == "too large")
        );
        assert!(matches!(actions[1], Action::Published { .. }));
        // Refused along with its elder (a webhook batch, a held-back message): it waits
        // behind the dead letter with its attempt count, never dead-lettered for it.
        assert!(matches!(actions[2], Action::Retry { attempts: 0, .. }));
        assert!(matches!(actions[3], Action::Retry { attempts: 2, .. }));
    }

    #[test]
    fn retriable_failure_holds_back_its_aggregate_only() {
        let events = [
            event("a", 1, 0),
            event("b", 2, 0),
            event("a", 3, 0),
            event("a", 4, 0),
        ];
        let actions = plan_batch(
            &RetryPolicy::default(),
            &events,
            &[
                retriable(),
                DeliveryOutcome::Delivered,
                permanent(),
                retriable(),
            ],
        );
        assert!(matches!(actions[0], Action::Retry { attempts: 1, .. }));
        assert!(matches!(actions[1], Action::Published { .. }));
        // Behind a retry, a permanent failure is not dead-lettered ahead of its elder,
        // and a held-back event keeps its attempt count.
        assert!(matches!(actions[2], Action::Retry { attempts: 0, .. }));
        assert!(matches!(actions[3], Action::Retry { attempts: 0, .. }));
    }

    #[test]
    fn an_unreachable_broker_uses_up_no_attempt() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let outage = DeliveryOutcome::Failed(DeliveryError::unavailable("all brokers down"));
        let actions = plan_batch(&policy, &[event("a", 1, 7)], &[outage]);
        assert!(
            matches!(actions[0], Action::Retry { attempts: 7, .. }),
            "{actions:?}"
        );
    }

    #[test]
    fn exhausted_attempts_dead_letter_with_the_reason() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let actions = plan_batch(&policy, &[event("a", 1, 2)], &[retriable()]);
        match &actions[0] {
            Action::DeadLetter {
                attempts, error, ..
            } => {
                assert_eq!(*attempts, 3);
                assert!(
                    error.contains("gave up after 3 attempts: broker down"),
                    "{error}"
                );
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }
}
