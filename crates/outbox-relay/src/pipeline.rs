//! The pipeline: while one batch is being published, the one before it is recorded and
//! the next one fetched, so a busy relay's batch takes the longer of publishing and of
//! its database work, not their sum (bench/README.md, "The pipeline"). The two batches
//! with payloads in memory keep to `polling.max_batch_bytes` together (give or take the
//! last row): the next batch gets what the one being published leaves of it. Below a
//! backlog nothing is fetched beside a publish (each small batch would cost a query and
//! a Kafka transaction); but the rows announced while a batch was published are fetched
//! before it is recorded, and go out beside its record.
//!
//! Publishing stays one batch at a time, in order. A batch goes to the sink only once
//! the one before it has its outcomes, and without the events of every aggregate that
//! one did not publish (a retry, a dead letter): those go back to the source, which
//! holds them behind their aggregate. So per-aggregate order and the crash guarantees
//! are [`Relay::pump`]'s: nothing is recorded before its acknowledgement, and a crash
//! leaves every unrecorded event to be published again.

use std::collections::HashSet;
use std::time::Instant;

use outbox_core::{Action, DeliveryOutcome, StoredEvent};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::engine::{LeadEnd, Relay};
use crate::source::Prefetch;
use crate::RelayError;

/// A published batch whose outcomes are not recorded yet. Its events keep what the
/// source needs to record them, not their payloads: up to three batches are held at
/// once, and the bytes bound is for the one being published.
struct Delivered {
    events: Vec<StoredEvent>,
    actions: Vec<Action>,
    outcomes: Vec<DeliveryOutcome>,
    started: Instant,
}

impl Relay<'_> {
    /// [`Relay::pump`], pipelined: the source's next batch is fetched, and its last one
    /// recorded, while a batch is being published.
    pub(crate) async fn pump_pipelined<S: Prefetch>(
        &self,
        source: &mut S,
        shutdown: &CancellationToken,
    ) -> LeadEnd {
        // Fetched while the last batch was being published.
        let mut ahead: Vec<StoredEvent> = Vec::new();
        let mut unrecorded: Option<Delivered> = None;
        loop {
            if ahead.is_empty() && !shutdown.is_cancelled() {
                // Rows committed while the last batch was published go out now, its
                // record beside them: the record is not on the path of the next events.
                if let Some(done) = &unrecorded {
                    ahead = match source
                        .next_batch_announced(self.config.max_batch_bytes)
                        .await
                    {
                        Ok(events) => events,
                        Err(end) => return end,
                    };
                    let held = hold_back(&done.events, &done.actions, &mut ahead);
                    source.give_back(&held);
                }
            }
            let events = if ahead.is_empty() || shutdown.is_cancelled() {
                source.give_back(&std::mem::take(&mut ahead));
                // Nothing to publish at once: record what is out before waiting.
                if let Some(done) = unrecorded.take() {
                    if let Err(end) = self.record_delivered(source, done, shutdown).await {
                        return end;
                    }
                }
                match source.next_batch(shutdown).await {
                    Ok(Some(events)) => events,
                    Ok(None) => return LeadEnd::Shutdown,
                    Err(end) => return end,
                }
            } else {
                std::mem::take(&mut ahead)
            };
            let started = Instant::now();
            let previous = unrecorded.take();
            let weight: u64 = events.iter().map(StoredEvent::weight).sum();
            let budget = self.config.max_batch_bytes.saturating_sub(weight);
            let (delivered, beside) = tokio::join!(self.deliver(&events), async {
                let recorded = Instant::now();
                if let Some(done) = previous {
                    self.record_delivered(source, done, shutdown).await?;
                }
                let fetched = Instant::now();
                let next = source.next_batch_now(budget).await?;
                Ok::<_, LeadEnd>((next, fetched - recorded, fetched.elapsed()))
            });
            let (actions, outcomes) = delivered;
            let published = started.elapsed();
            if self.sink.is_fenced() {
                return LeadEnd::Lost(RelayError::Fenced);
            }
            crash_point!("relay-published-not-recorded");
            let (next, record_time, fetch_time) = match beside {
                Ok(beside) => beside,
                Err(end) => return end,
            };
            ahead = next;
            let held = hold_back(&events, &actions, &mut ahead);
            source.give_back(&held);
            // Where a batch's time goes (bench/README.md, "Where the time goes").
            debug!(
                events = events.len(),
                publish_ms = published.as_secs_f64() * 1e3,
                record_previous_ms = record_time.as_secs_f64() * 1e3,
                fetch_next_ms = fetch_time.as_secs_f64() * 1e3,
                held_back = held.len(),
                "batch"
            );
            let events = events
                .into_iter()
                .map(|event| StoredEvent {
                    payload: None,
                    ..event
                })
                .collect();
            unrecorded = Some(Delivered {
                events,
                actions,
                outcomes,
                started,
            });
        }
    }

    async fn record_delivered<S: Prefetch>(
        &self,
        source: &mut S,
        done: Delivered,
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        source
            .record(done.events, &done.actions, &done.outcomes, shutdown)
            .await?;
        crash_point!("relay-recorded");
        self.record(&done.actions, &done.outcomes);
        self.metrics
            .batch_duration
            .observe(done.started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Takes out of `ahead` (fetched while `events` were being published) the events of
/// every aggregate that `actions` did not publish, and returns them: they must not
/// overtake the retry or dead letter of their aggregate.
fn hold_back(
    events: &[StoredEvent],
    actions: &[Action],
    ahead: &mut Vec<StoredEvent>,
) -> Vec<StoredEvent> {
    let stopped: HashSet<(&str, &str)> = events
        .iter()
        .zip(actions)
        .filter(|(_, action)| !matches!(action, Action::Published { .. }))
        .map(|(event, _)| (event.aggregate_type.as_str(), event.aggregate_id.as_str()))
        .collect();
    if stopped.is_empty() {
        return Vec::new();
    }
    let (held, go) = std::mem::take(ahead).into_iter().partition(|event| {
        stopped.contains(&(event.aggregate_type.as_str(), event.aggregate_id.as_str()))
    });
    *ahead = go;
    held
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use outbox_core::{Action, StoredEvent};
    use uuid::Uuid;

    use super::hold_back;

    fn event(seq: i64, aggregate: &str) -> StoredEvent {
        StoredEvent {
            seq,
            id: Uuid::now_v7(),
            aggregate_type: "order".into(),
            aggregate_id: aggregate.into(),
            event_type: "Tested".into(),
            payload: None,
            headers: Vec::new(),
            attempts: 0,
            unreadable: None,
            retried_dead_letter: false,
        }
    }

    #[test]
    fn the_aggregates_of_failed_events_wait_and_the_others_go() {
        let events = vec![event(1, "a"), event(2, "b"), event(3, "c")];
        let actions = vec![
            Action::Published { id: events[0].id },
            Action::Retry {
                id: events[1].id,
                attempts: 1,
                backoff: Duration::from_secs(1),
                error: "broker said no".into(),
            },
            Action::DeadLetter {
                id: events[2].id,
                attempts: 1,
                error: "not a legal topic".into(),
            },
        ];
        let mut ahead = vec![event(4, "a"), event(5, "b"), event(6, "c"), event(7, "a")];
        let held = hold_back(&events, &actions, &mut ahead);
        let seqs = |events: &[StoredEvent]| events.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&held), [5, 6]);
        assert_eq!(seqs(&ahead), [4, 7]);
    }

    #[test]
    fn a_fully_published_batch_holds_nothing_back() {
        let events = vec![event(1, "a")];
        let actions = vec![Action::Published { id: events[0].id }];
        let mut ahead = vec![event(2, "a")];
        assert!(hold_back(&events, &actions, &mut ahead).is_empty());
        assert_eq!(ahead.len(), 1);
    }
}
