//! A broker outage, whatever stage of a publish it hits, is reported as `Unavailable`:
//! the relay then retries without using up attempts, so an outage never dead-letters.

use std::time::{Duration, Instant};

use outbox_core::{DeliveryOutcome, ErrorKind, Message, Sink};
use outbox_kafka::{KafkaSettings, KafkaSink};

/// A loopback port nothing listens on: the broker is down.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn message(topic: &str) -> Message {
    Message {
        topic: topic.into(),
        key: b"1".to_vec(),
        value: Some(b"{}".to_vec()),
        headers: vec![("id".into(), b"x".to_vec())],
    }
}

/// The first message to a topic the sink has not seen goes through topic creation first;
/// with the broker down, creation fails, and that failure is an outage, not a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_creation_during_an_outage_uses_up_no_attempt() {
    let settings = KafkaSettings {
        brokers: format!("127.0.0.1:{}", closed_port()),
        message_timeout: Duration::from_secs(2),
        ..KafkaSettings::default()
    };
    let sink = KafkaSink::new(settings).unwrap();
    for round in 0..3 {
        let started = Instant::now();
        let outcomes = sink.publish(vec![message("outage.new-topic")]).await;
        let DeliveryOutcome::Failed(err) = &outcomes[0] else {
            panic!("nothing listens on the port, yet the message was delivered");
        };
        assert_eq!(
            err.kind,
            ErrorKind::Unavailable,
            "round {round}: an outage must not count as an attempt: {err:?}"
        );
        // Bounded by the message timeout, not by librdkafka's 60 s socket timeout.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "round {round} took {:?}",
            started.elapsed()
        );
    }
}

/// With topic creation off, a send to an unreachable broker is an outage too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_during_an_outage_are_unavailable() {
    let mut settings = KafkaSettings {
        brokers: format!("127.0.0.1:{}", closed_port()),
        message_timeout: Duration::from_secs(2),
        ..KafkaSettings::default()
    };
    settings.topics.create = false;
    let sink = KafkaSink::new(settings).unwrap();
    let outcomes = sink.publish(vec![message("outage.known-topic")]).await;
    match &outcomes[0] {
        DeliveryOutcome::Failed(err) => assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}"),
        DeliveryOutcome::Delivered => panic!("delivered to a closed port"),
    }
}
