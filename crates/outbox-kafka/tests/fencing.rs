//! Fencing on the real broker: a relay that lost its leadership while holding a batch it
//! had produced and not sent (a paused process) must not make that batch visible after
//! its successor published. Both "relays" here are sinks of one transactional id; the
//! old one's batch lingers in its client while the new one publishes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox_core::{DeliveryOutcome, ErrorKind, Message, Sink};
use outbox_kafka::{KafkaSettings, KafkaSink};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

fn brokers() -> String {
    std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{nanos}")
}

fn messages(topic: &str, from: &str, count: usize) -> Vec<Message> {
    (0..count)
        .map(|n| Message {
            topic: topic.into(),
            key: b"order-1".to_vec(),
            value: Some(format!("{from}-{n}").into_bytes()),
            headers: vec![("id".into(), format!("{from}-{n}").into_bytes())],
        })
        .collect()
}

fn sink(transactional_id: Option<&str>, linger: Duration) -> KafkaSink {
    KafkaSink::new(KafkaSettings {
        brokers: brokers(),
        linger,
        message_timeout: Duration::from_secs(10),
        transactional_id: transactional_id.map(String::from),
        ..KafkaSettings::default()
    })
    .unwrap()
}

/// Every value of the topic's one partition (created with one partition so the order
/// is total), read committed or not.
fn read_values(topic: &str, isolation: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("fencing-read"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut values = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => values
                .push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned()),
            Some(Err(_)) => {}
            None => {
                // Past the end (transaction markers hold offsets but no message).
                let position = consumer.position().unwrap();
                let at = position.find_partition(topic, 0).map(|p| p.offset());
                if matches!(at, Some(Offset::Offset(at)) if at >= high) {
                    break;
                }
            }
        }
    }
    values
}

async fn create_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
}

/// The old relay produced a batch that lingers 3 s in its client; meanwhile its
/// successor (same transactional id) publishes. Returns the old relay's outcomes and
/// the topic.
async fn old_batch_lingers_while_successor_publishes(
    transactional_id: Option<&str>,
) -> (Vec<DeliveryOutcome>, String, Arc<KafkaSink>, KafkaSink) {
    let topic = unique("fencing");
    create_topic(&topic).await;
    let old = Arc::new(sink(transactional_id, Duration::from_secs(3)));
    let new = sink(transactional_id, Duration::from_millis(5));
    // The old relay publishes once, so its transactions are initialized (as when it was
    // the active relay), then holds its next batch.
    assert!(old
        .publish(messages(&topic, "old-first", 1))
        .await
        .iter()
        .all(|o| *o == DeliveryOutcome::Delivered));
    let held = {
        let topic = topic.clone();
        let old = old.clone();
        tokio::spawn(async move { old.publish(messages(&topic, "old", 5)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let successor = new.publish(messages(&topic, "new", 5)).await;
    assert!(
        successor.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "{successor:?}"
    );
    (held.await.unwrap(), topic, old, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_relays_lingering_batch_never_becomes_visible() {
    let id = unique("outbox-relay/fencing-test");
    let (old_outcomes, topic, old, new) =
        old_batch_lingers_while_successor_publishes(Some(&id)).await;
    for outcome in &old_outcomes {
        match outcome {
            DeliveryOutcome::Failed(err) => assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}"),
            DeliveryOutcome::Delivered => panic!("the fenced relay's batch was reported delivered"),
        }
    }
    assert!(old.is_fenced(), "the old sink must know it was fenced");
    assert!(!new.is_fenced());
    // Fenced, the old sink publishes nothing, and above all does not initialize its
    // transactions again (which would fence its successor in turn)...
    let again = old.publish(messages(&topic, "old-again", 2)).await;
    assert!(again
        .iter()
        .all(|o| matches!(o, DeliveryOutcome::Failed(e) if e.kind == ErrorKind::Unavailable)));
    let successor = new.publish(messages(&topic, "new-again", 2)).await;
    assert!(
        successor.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "the successor was fenced by the old relay: {successor:?}"
    );
    assert!(!new.is_fenced());
    let values = read_values(&topic, "read_committed");
    let expected: Vec<String> = std::iter::once("old-first-0".to_string())
        .chain((0..5).map(|n| format!("new-{n}")))
        .chain((0..2).map(|n| format!("new-again-{n}")))
        .collect();
    assert_eq!(
        values, expected,
        "read_committed sees only committed batches, in order"
    );
}

/// The control: without transactions the same timing puts the old relay's batch after
/// its successor's, which is what the fencing prevents. If this stops happening, the
/// test above proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_transactions_the_old_relays_batch_lands_after_its_successors() {
    let (old_outcomes, topic, _, _) = old_batch_lingers_while_successor_publishes(None).await;
    assert!(old_outcomes
        .iter()
        .all(|o| *o == DeliveryOutcome::Delivered));
    let values = read_values(&topic, "read_committed");
    let position: HashMap<&str, usize> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_str(), i))
        .collect();
    assert!(
        position["old-0"] > position["new-4"],
        "the old batch should land after the successor's: {values:?}"
    );
}

/// A transactional sink whose broker is down: initializing its transactions fails, and
/// that is an outage (no attempt used up), bounded by the message timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_during_an_outage_are_unavailable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = KafkaSettings {
        brokers: format!("127.0.0.1:{closed}"),
        message_timeout: Duration::from_secs(2),
        transactional_id: Some(unique("outbox-relay/outage-test")),
        ..KafkaSettings::default()
    };
    settings.topics.create = false;
    let sink = KafkaSink::new(settings).unwrap();
    for round in 0..2 {
        let started = Instant::now();
        let outcomes = sink.publish(messages("fencing.outage", "x", 2)).await;
        for outcome in &outcomes {
            match outcome {
                DeliveryOutcome::Failed(err) => {
                    assert_eq!(err.kind, ErrorKind::Unavailable, "round {round}: {err:?}")
                }
                DeliveryOutcome::Delivered => panic!("delivered to a closed port"),
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "round {round}");
    }
}
