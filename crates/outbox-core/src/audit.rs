//! The audit behind `outbox verify`: compares the outbox rows of a window with the
//! messages read back from their topics, and says what was lost, what is still pending,
//! what was duplicated and which aggregates reached the broker out of order.
//!
//! Pure: the rows come from the table and the messages from the broker through the I/O
//! crates; this module only compares them.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::Router;

/// How many lost events a report names (the count is always complete).
pub const LISTED_LOST: usize = 100;
/// How many examples of duplicates and of order violations a report shows.
pub const LISTED_EXAMPLES: usize = 10;

/// One outbox row as the audit needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// The event id, matched against the messages' `id` header.
    pub id: Uuid,
    /// The table's order; within one aggregate it is commit order (DESIGN.md).
    pub seq: i64,
    /// The `aggregatetype` column; routed to the topic to look on.
    pub aggregate_type: String,
    /// The `aggregateid` column.
    pub aggregate_id: String,
    /// `published_at` is set: the relay recorded the broker's acknowledgement.
    pub marked_published: bool,
    /// `dead_lettered_at` is set: the relay gave up on it, with a reason.
    pub dead_lettered: bool,
    /// How long ago it was written (`created_at`), as the database saw it.
    pub age: Duration,
    /// Queued again by `outbox dead-letters retry` (`dead_letter_retried_at` is set): it
    /// went out when the operator said so, after its aggregate's later events unless
    /// they were parked behind it.
    pub retried_dead_letter: bool,
    /// Kept waiting in the table by the relay (`next_attempt_at` set, neither published
    /// nor dead-lettered): an event of a parked aggregate, or one waiting for a retry.
    /// Pending, however old: in CDC mode too, where age alone would call it lost.
    pub waiting: bool,
}

/// What a sink's reader got back from one stream (a JetStream stream, a RabbitMQ audit
/// stream): the audit's input for brokers with one ordered log per stream.
#[derive(Debug)]
pub struct StreamRead {
    /// The stream's name.
    pub stream: String,
    /// False when the broker has no such stream: all its rows are unseen.
    pub exists: bool,
    /// Messages read, whether or not their id was wanted.
    pub messages: u64,
    /// Messages without a readable event id.
    pub without_id: u64,
    /// The stream no longer starts at its first message: its limits (or a purge)
    /// removed the oldest ones, so older rows may be missing for that reason.
    pub trimmed: bool,
    /// The wanted messages, in stream order.
    pub observed: Vec<ObservedMessage>,
}

impl StreamRead {
    /// Nothing read yet from `stream`.
    pub fn empty(stream: &str) -> StreamRead {
        StreamRead {
            stream: stream.to_string(),
            exists: false,
            messages: 0,
            without_id: 0,
            trimmed: false,
            observed: Vec::new(),
        }
    }
}

/// One message read back from a topic. Only its identity and position matter.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedMessage {
    /// The topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset within the partition.
    pub offset: i64,
    /// The `id` header.
    pub id: Uuid,
    /// The message key, if it has one.
    pub key: Option<Vec<u8>>,
}

/// What counts as lost.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPolicy {
    /// The relay marks rows it published (polling mode). In CDC mode rows are never
    /// marked, so an unseen row is lost once it is older than `grace`.
    pub rows_are_marked: bool,
    /// How long a row may take to reach the broker before it counts as lost (CDC mode).
    pub grace: Duration,
}

/// Where a message sits on its topic. Ordered by partition, then offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Position {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// Why a row counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// The table says published, the topic does not have it.
    MarkedPublished,
    /// CDC mode: unseen, not a dead letter, and older than the grace period.
    OlderThanGrace,
}

/// A row missing from its topic that should be there, as the report lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LostEvent {
    /// The event id.
    pub id: Uuid,
    /// The row's `seq`.
    pub seq: i64,
    /// The row's `aggregatetype`.
    #[serde(rename = "aggregatetype")]
    pub aggregate_type: String,
    /// The row's `aggregateid`.
    #[serde(rename = "aggregateid")]
    pub aggregate_id: String,
    /// The topic it should be on (`None` when its aggregate type makes no legal topic).
    pub topic: Option<String>,
    /// Why it counts as lost rather than pending.
    pub reason: LostReason,
}

/// An event id found on its topic more than once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DuplicateExample {
    /// The event id.
    pub id: Uuid,
    /// How many times the id is on its topic (2 or more).
    pub copies: u64,
}

/// An event that reached the broker before an event of its aggregate with a lower `seq`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderViolation {
    /// The aggregate's `aggregatetype`.
    #[serde(rename = "aggregatetype")]
    pub aggregate_type: String,
    /// The aggregate's `aggregateid`.
    #[serde(rename = "aggregateid")]
    pub aggregate_id: String,
    /// The topic both events are on.
    pub topic: String,
    /// The later event (higher `seq`) ...
    pub id: Uuid,
    /// Its `seq`.
    pub seq: i64,
    /// Where it first appeared.
    pub position: Position,
    /// ... first appeared before this earlier one.
    pub overtaken_id: Uuid,
    /// The earlier event's `seq`.
    pub overtaken_seq: i64,
    /// Where the earlier event first appeared.
    pub overtaken_position: Position,
}

/// The outcome of an audit. Every row of the window is exactly one of published, lost,
/// pending or dead-lettered: `committed = published + lost + pending + dead_lettered`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuditReport {
    /// Rows in the window.
    pub committed: u64,
    /// Rows whose id is on their topic (at least once).
    pub published: u64,
    /// Rows absent from their topic that should be there (see [`LostReason`]).
    pub lost: u64,
    /// Rows absent from their topic that the relay may still publish.
    pub pending: u64,
    /// Rows absent from their topic that the relay dead-lettered (not lost: listed by
    /// `outbox dead-letters list`).
    pub dead_lettered: u64,
    /// Ids on their topic more than once (at-least-once delivery; not a failure).
    pub duplicated_ids: u64,
    /// Copies beyond the first, summed over those ids.
    pub duplicate_copies: u64,
    /// Events whose first appearance on the broker comes before that of an earlier
    /// event (lower `seq`) of the same aggregate.
    pub order_violations: u64,
    /// Published rows that `outbox dead-letters retry` queued again: they reached their
    /// topic after later events of their aggregate, by the operator's choice (not an
    /// order violation; their messages carry `outbox.retried-dead-letter`).
    pub retried_dead_letters: u64,
    /// The first [`LISTED_LOST`] lost events, in `seq` order.
    pub lost_events: Vec<LostEvent>,
    /// The first [`LISTED_EXAMPLES`] duplicated ids, in `seq` order.
    pub duplicate_examples: Vec<DuplicateExample>,
    /// The first [`LISTED_EXAMPLES`] order violations, in `seq` order of the later event.
    pub order_violation_examples: Vec<OrderViolation>,
}

impl AuditReport {
    /// Nothing lost and nothing out of order. Duplicates alone pass: they are what
    /// at-least-once delivery allows.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.order_violations == 0
    }
}

/// The topics the rows are routed to: the ones to read back. Rows whose aggregate type
/// makes no legal topic name are left out (the relay dead-letters them).
pub fn audit_topics(rows: &[AuditRow], router: &Router) -> BTreeSet<String> {
    let mut types: Vec<&str> = rows.iter().map(|r| r.aggregate_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    types
        .into_iter()
        .filter_map(|t| router.topic_for(t).ok())
        .collect()
}

/// Compares the rows with the messages read back from their topics.
///
/// A message counts for a row only on the row's own topic (routed with the same
/// `router` as the relay); messages of other ids are ignored. An aggregate is the pair
/// (`aggregatetype`, `aggregateid`); its events must first appear on the broker, by
/// (partition, offset), in `seq` order.
pub fn audit_report(
    rows: &[AuditRow],
    messages: &[ObservedMessage],
    router: &Router,
    policy: &AuditPolicy,
) -> AuditReport {
    let mut topics: HashMap<&str, Option<String>> = HashMap::new();
    for row in rows {
        topics
            .entry(row.aggregate_type.as_str())
            .or_insert_with(|| router.topic_for(&row.aggregate_type).ok());
    }
    let topic_of = |row: &AuditRow| topics[row.aggregate_type.as_str()].as_deref();

    // Sightings per row: how many copies, and the first position.
    let index: HashMap<Uuid, usize> = rows.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let mut copies = vec![0u64; rows.len()];
    let mut first: Vec<Option<Position>> = vec![None; rows.len()];
    for message in messages {
        let Some(&i) = index.get(&message.id) else {
            continue;
        };
        if topic_of(&rows[i]) != Some(message.topic.as_str()) {
            continue;
        }
        copies[i] += 1;
        let position = Position {
            partition: message.partition,
            offset: message.offset,
        };
        first[i] = Some(first[i].map_or(position, |p| p.min(position)));
    }

    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].seq);

    let mut report = AuditReport {
        committed: rows.len() as u64,
        ..AuditReport::default()
    };
    // Per aggregate: the row with the latest first appearance so far, in seq order.
    let mut latest: HashMap<(&str, &str), usize> = HashMap::new();
    for &i in &order {
        let row = &rows[i];
        let Some(position) = first[i] else {
            if row.dead_lettered {
                report.dead_lettered += 1;
                continue;
            }
            let reason = if row.marked_published {
                Some(LostReason::MarkedPublished)
            } else if !policy.rows_are_marked && row.age >= policy.grace && !row.waiting {
                Some(LostReason::OlderThanGrace)
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    report.lost += 1;
                    if report.lost_events.len() < LISTED_LOST {
                        report.lost_events.push(LostEvent {
                            id: row.id,
                            seq: row.seq,
                            aggregate_type: row.aggregate_type.clone(),
                            aggregate_id: row.aggregate_id.clone(),
                            topic: topic_of(row).map(str::to_string),
                            reason,
                        });
                    }
                }
                None => report.pending += 1,
            }
            continue;
        };
        report.published += 1;
        if row.retried_dead_letter {
            report.retried_dead_letters += 1;
        }
        if copies[i] > 1 {
            report.duplicated_ids += 1;
            report.duplicate_copies += copies[i] - 1;
            if report.duplicate_examples.len() < LISTED_EXAMPLES {
                report.duplicate_examples.push(DuplicateExample {
                    id: row.id,
                    copies: copies[i],
                });
            }
        }
        // A retried dead letter keeps its `seq` but went out when an operator said so,
        // after its aggregate's later events unless they were parked: counted above,
        // never an order violation (its message carries `outbox.retried-dead-letter`).
        if row.retried_dead_letter {
            continue;
        }
        let aggregate = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
        match latest.get(&aggregate) {
            Some(&before) if first[before].expect("seen") > position => {
                report.order_violations += 1;
                if report.order_violation_examples.len() < LISTED_EXAMPLES {
                    let earlier = &rows[before];
                    report.order_violation_examples.push(OrderViolation {
                        aggregate_type: row.aggregate_type.clone(),
                        aggregate_id: row.aggregate_id.clone(),
                        topic: topic_of(row).unwrap_or_default().to_string(),
                        id: row.id,
                        seq: row.seq,
                        position,
                        overtaken_id: earlier.id,
                        overtaken_seq: earlier.seq,
                        overtaken_position: first[before].expect("seen"),
                    });
                }
            }
            _ => {
                latest.insert(aggregate, i);
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TopicTemplate;

    const POLLING: AuditPolicy = AuditPolicy {
        rows_are_marked: true,
        grace: Duration::from_secs(30),
    };
    const CDC: AuditPolicy = AuditPolicy {
        rows_are_marked: false,
        grace: Duration::from_secs(30),
    };

    fn row(seq: i64, aggregate_id: &str) -> AuditRow {
        AuditRow {
            id: Uuid::from_u128(seq as u128),
            seq,
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            marked_published: true,
            dead_lettered: false,
            age: Duration::from_secs(60),
            waiting: false,
            retried_dead_letter: false,
        }
    }

    fn on_topic(row: &AuditRow, partition: i32, offset: i64) -> ObservedMessage {
        ObservedMessage {
            topic: format!("outbox.event.{}", row.aggregate_type),
            partition,
            offset,
            id: row.id,
            key: Some(row.aggregate_id.clone().into_bytes()),
        }
    }

    fn report(
        rows: &[AuditRow],
        messages: &[ObservedMessage],
        policy: &AuditPolicy,
    ) -> AuditReport {
        audit_report(rows, messages, &Router::default(), policy)
    }

    #[test]
    fn everything_on_its_topic_in_order_passes() {
        let rows = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "b")];
        let messages = [
            on_topic(&rows[0], 0, 0),
            on_topic(&rows[1], 1, 0),
            on_topic(&rows[2], 0, 1),
            on_topic(&rows[3], 1, 1),
        ];
        let report = report(&rows, &messages, &POLLING);
        assert_eq!(report.committed, 4);
        assert_eq!(report.published, 4);
        assert_eq!(
            (report.lost, report.pending, report.dead_lettered),
            (0, 0, 0)
        );
        assert_eq!(report.order_violations, 0);
        assert!(report.passed());
    }

    #[test]
    fn a_marked_row_missing_from_its_topic_is_lost() {
        let rows = [row(1, "a"), row(2, "a")];
        let report = report(&rows, &[on_topic(&rows[0], 0, 0)], &POLLING);
        assert_eq!((report.published, report.lost), (1, 1));
        assert_eq!(report.lost_events[0].id, rows[1].id);
        assert_eq!(report.lost_events[0].reason, LostReason::MarkedPublished);
        assert_eq!(
            report.lost_events[0].topic.as_deref(),
            Some("outbox.event.order")
        );
        assert!(!report.passed());
    }

    #[test]
    fn a_message_on_another_topic_does_not_count() {
        let rows = [row(1, "a")];
        let mut elsewhere = on_topic(&rows[0], 0, 0);
        elsewhere.topic = "somewhere.else".into();
        let report = report(&rows, &[elsewhere], &POLLING);
        assert_eq!(report.lost, 1);
        let other = Router::new(TopicTemplate::parse("x.{aggregatetype}").unwrap());
        let report = audit_report(&rows, &[on_topic(&rows[0], 0, 0)], &other, &POLLING);
        assert_eq!(report.lost, 1, "the audit looks where its router says");
    }

    #[test]
    fn unmarked_rows_are_pending_when_polling_whatever_their_age() {
        let mut young = row(1, "a");
        young.marked_published = false;
        young.age = Duration::from_secs(1);
        let mut old = row(2, "a");
        old.marked_published = false;
        old.age = Duration::from_secs(3600);
        let report = report(&[young, old], &[], &POLLING);
        assert_eq!((report.pending, report.lost), (2, 0));
        assert!(report.passed());
    }

    #[test]
    fn cdc_rows_are_lost_once_older_than_the_grace() {
        let mut young = row(1, "a");
        young.marked_published = false;
        young.age = Duration::from_secs(5);
        let mut old = row(2, "b");
        old.marked_published = false;
        old.age = Duration::from_secs(31);
        let rows = [young, old];
        let report = report(&rows, &[], &CDC);
        assert_eq!((report.pending, report.lost), (1, 1));
        assert_eq!(report.lost_events[0].id, rows[1].id);
        assert_eq!(report.lost_events[0].reason, LostReason::OlderThanGrace);
        let no_grace = AuditPolicy {
            grace: Duration::ZERO,
            ..CDC
        };
        let report = audit_report(&rows, &[], &Router::default(), &no_grace);
        assert_eq!((report.pending, report.lost), (0, 2));
    }

    #[test]
    fn dead_letters_are_counted_apart_not_lost() {
        let mut dead = row(1, "a");
        dead.marked_published = false;
        dead.dead_lettered = true;
        let report = report(&[dead.clone()], &[], &CDC);
        assert_eq!(
            (report.dead_lettered, report.lost, report.pending),
            (1, 0, 0)
        );
        assert!(report.passed());
        // One that did reach its topic counts as published.
        let report = self::report(&[dead.clone()], &[on_topic(&dead, 0, 0)], &CDC);
        assert_eq!((report.published, report.dead_lettered), (1, 0));
    }

    #[test]
    fn rows_waiting_in_the_table_are_pending_not_lost() {
        let mut parked = row(2, "a");
        parked.marked_published = false;
        parked.waiting = true;
        let rows = [row(1, "a"), parked];
        let messages = [on_topic(&rows[0], 0, 0)];
        let report = report(&rows, &messages, &CDC);
        assert_eq!((report.lost, report.pending), (0, 1), "{report:?}");
        assert!(report.passed());
    }

    #[test]
    fn retried_dead_letters_are_counted() {
        let mut retried = row(5, "a");
        retried.retried_dead_letter = true;
        let rows = [row(1, "a"), retried.clone()];
        let messages = [on_topic(&rows[0], 0, 0), on_topic(&retried, 0, 1)];
        let report = report(&rows, &messages, &POLLING);
        assert_eq!((report.published, report.retried_dead_letters), (2, 1));
        assert!(report.passed());

        // Skipped, then retried: it keeps its place in the table (`seq` 1) but reached
        // the topic after its aggregate's later events.
        let mut retried = row(1, "a");
        retried.retried_dead_letter = true;
        let rows = [retried.clone(), row(2, "a"), row(3, "a")];
        let messages = [
            on_topic(&rows[1], 0, 0),
            on_topic(&rows[2], 0, 1),
            on_topic(&retried, 0, 2),
        ];
        let skipped = audit_report(&rows, &messages, &Router::default(), &POLLING);
        assert_eq!(skipped.order_violations, 0, "{skipped:?}");
        assert!(skipped.passed());
        // The others are still checked among themselves.
        let messages = [
            on_topic(&rows[2], 0, 0),
            on_topic(&rows[1], 0, 1),
            on_topic(&retried, 0, 2),
        ];
        let reordered = audit_report(&rows, &messages, &Router::default(), &POLLING);
        assert_eq!(reordered.order_violations, 1);
    }

    #[test]
    fn duplicates_are_reported_and_pass() {
        let rows = [row(1, "a"), row(2, "a")];
        let messages = [
            on_topic(&rows[0], 0, 0),
            on_topic(&rows[1], 0, 1),
            on_topic(&rows[0], 0, 2),
            on_topic(&rows[1], 0, 3),
            on_topic(&rows[0], 0, 4),
        ];
        let report = report(&rows, &messages, &POLLING);
        assert_eq!(report.published, 2);
        assert_eq!((report.duplicated_ids, report.duplicate_copies), (2, 3));
        assert_eq!(report.duplicate_examples[0].copies, 3);
        assert_eq!(
            report.order_violations, 0,
            "a redelivery after the later event is not a violation: first appearances count"
        );
        assert!(report.passed());
    }

    #[test]
    fn a_later_event_first_seen_before_an_earlier_one_is_a_violation() {
        let rows = [row(1, "a"), row(2, "a"), row(3, "a"), row(4, "b")];
        // a: seq 3 arrives first, then 1, then 2. b is alone.
        let messages = [
            on_topic(&rows[2], 0, 10),
            on_topic(&rows[0], 0, 11),
            on_topic(&rows[1], 0, 12),
            on_topic(&rows[3], 1, 0),
        ];
        let report = report(&rows, &messages, &POLLING);
        assert_eq!(report.order_violations, 1);
        let example = &report.order_violation_examples[0];
        assert_eq!((example.id, example.seq), (rows[2].id, 3));
        assert_eq!(example.overtaken_id, rows[1].id);
        assert_eq!(
            example.position,
            Position {
                partition: 0,
                offset: 10
            }
        );
        assert_eq!(example.overtaken_position.offset, 12);
        assert!(!report.passed());
    }

    #[test]
    fn each_overtaking_event_counts_once() {
        // seq order 1..=4, broker order 4, 3, 2, 1: three events overtook an earlier one.
        let rows = [row(1, "a"), row(2, "a"), row(3, "a"), row(4, "a")];
        let messages: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| on_topic(r, 0, 10 - i as i64))
            .collect();
        assert_eq!(report(&rows, &messages, &POLLING).order_violations, 3);
    }

    #[test]
    fn aggregates_are_type_and_id() {
        let a = row(1, "7");
        let mut b = row(2, "7");
        b.aggregate_type = "user".into();
        // user/7 (seq 2) at offset 0 of its own topic, order/7 (seq 1) at offset 5.
        let report = report(
            &[a.clone(), b.clone()],
            &[on_topic(&a, 0, 5), on_topic(&b, 0, 0)],
            &POLLING,
        );
        assert_eq!(report.order_violations, 0);
    }

    #[test]
    fn ids_outside_the_window_are_ignored() {
        let rows = [row(1, "a")];
        let stranger = ObservedMessage {
            id: Uuid::from_u128(999),
            ..on_topic(&rows[0], 0, 0)
        };
        let report = report(&rows, &[stranger, on_topic(&rows[0], 0, 1)], &POLLING);
        assert_eq!((report.published, report.duplicated_ids), (1, 0));
    }

    #[test]
    fn topics_are_those_the_router_gives() {
        let mut user = row(2, "1");
        user.aggregate_type = "user".into();
        let mut bad = row(3, "1");
        bad.aggregate_type = "not legal".into();
        let router = Router::default().with_rule(|topic| match topic.contains(' ') {
            true => Err("is not legal".into()),
            false => Ok(()),
        });
        let topics = audit_topics(&[row(1, "1"), user, bad], &router);
        assert_eq!(
            topics.into_iter().collect::<Vec<_>>(),
            ["outbox.event.order", "outbox.event.user"]
        );
    }

    #[test]
    fn lost_events_are_listed_up_to_the_limit() {
        let rows: Vec<_> = (1..=(LISTED_LOST as i64 + 5))
            .map(|s| row(s, "a"))
            .collect();
        let report = report(&rows, &[], &POLLING);
        assert_eq!(report.lost, LISTED_LOST as u64 + 5);
        assert_eq!(report.lost_events.len(), LISTED_LOST);
        assert_eq!(report.lost_events[0].seq, 1);
    }
}
