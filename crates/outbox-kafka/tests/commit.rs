//! Committing a batch's Kafka transaction on the real broker, while the sink's delivery
//! thread still holds the last report (it has told the batch, not yet released the
//! message): the commit must wait for that thread, not poll the report queue itself
//! for a report that is not coming.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox_core::{DeliveryOutcome, Message, Sink};
use outbox_kafka::{KafkaSettings, KafkaSink};

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{nanos}")
}

/// How long the delivery thread holds each report after telling it.
const HELD: Duration = Duration::from_millis(30);

#[tokio::test]
async fn a_commit_waits_for_the_delivery_thread_not_for_a_poll_of_its_own() {
    assert!(
        fail::has_failpoints(),
        "this test needs the fail crate's failpoints feature (a dev-dependency of outbox-kafka)"
    );
    let sink = KafkaSink::new(KafkaSettings {
        brokers: std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        message_timeout: Duration::from_secs(10),
        transactional_id: Some(unique("commit-test")),
        ..KafkaSettings::default()
    })
    .unwrap();
    let topic = unique("commit-test");
    let batch = |n: usize| {
        vec![Message {
            topic: topic.clone(),
            key: b"order-1".to_vec(),
            value: Some(format!("{n}").into_bytes()),
            headers: vec![("id".into(), format!("{n}").into_bytes())],
        }]
    };
    // The first batch creates the topic and initializes the transactions.
    assert_eq!(
        sink.publish(batch(0)).await,
        vec![DeliveryOutcome::Delivered]
    );

    fail::cfg(
        "kafka-delivery-report-held",
        &format!("sleep({})", HELD.as_millis()),
    )
    .unwrap();
    let mut slowest = Duration::ZERO;
    for n in 1..=5 {
        let started = Instant::now();
        let outcomes = sink.publish(batch(n)).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(outcomes, vec![DeliveryOutcome::Delivered]);
    }
    fail::remove("kafka-delivery-report-held");
    // Held 30 ms, then a round trip or two on loopback. rust-rdkafka's own commit polls
    // the report queue for 100 ms whenever a message is still outstanding, and here no
    // other report comes to end that poll early.
    assert!(
        slowest < HELD + Duration::from_millis(60),
        "a batch of one message took {slowest:?} with its report held for {HELD:?}: the commit waited out a poll of its own"
    );
}
