//! Reading Kafka topics back, from the beginning, with a consumer of the test's own.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

use crate::Received;

/// The Kafka of `scripts/services` (or OUTBOX_KAFKA_BROKERS).
pub fn brokers() -> String {
    std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Reads `topics` from the beginning until `done` says so or `timeout` passes. Waits
/// for topics that do not exist yet.
pub async fn consume_until<F>(topics: Vec<String>, timeout: Duration, done: F) -> Vec<Received>
where
    F: FnMut(&[Received]) -> bool + Send + 'static,
{
    tokio::task::spawn_blocking(move || consume_blocking(&topics, timeout, done))
        .await
        .unwrap()
}

/// Reads until every id in `ids` has been seen; fails the test if some never arrive
/// within `timeout` (use [`consume_ids_or_partial`] where a partial read is expected).
pub async fn consume_ids(topics: Vec<String>, ids: &[Uuid], timeout: Duration) -> Vec<Received> {
    let received = consume_ids_or_partial(topics.clone(), ids, timeout).await;
    let seen: HashSet<Uuid> = received.iter().map(Received::id).collect();
    let missing = ids.iter().filter(|id| !seen.contains(id)).count();
    assert!(
        missing == 0,
        "{missing} of {} events never reached {topics:?} within {timeout:?}",
        ids.len()
    );
    received
}

/// Reads until every id in `ids` has been seen or `timeout` passes; returns what arrived.
pub async fn consume_ids_or_partial(
    topics: Vec<String>,
    ids: &[Uuid],
    timeout: Duration,
) -> Vec<Received> {
    let mut wanted: HashSet<Uuid> = ids.iter().copied().collect();
    let mut checked = 0;
    consume_until(topics, timeout, move |received| {
        for message in &received[checked..] {
            wanted.remove(&message.id());
        }
        checked = received.len();
        wanted.is_empty()
    })
    .await
}

fn consume_blocking<F: FnMut(&[Received]) -> bool>(
    topics: &[String],
    timeout: Duration,
    mut done: F,
) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("test-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        loop {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok();
            let partitions = metadata.as_ref().and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
            });
            match partitions {
                Some(n) if n > 0 => {
                    for p in 0..n as i32 {
                        assignment
                            .add_partition_offset(topic, p, Offset::Beginning)
                            .unwrap();
                    }
                    break;
                }
                _ if Instant::now() > deadline => {
                    return Vec::new();
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
    consumer.assign(&assignment).unwrap();
    let mut received = Vec::new();
    while Instant::now() < deadline && !done(&received) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let mut header_list = Vec::new();
                if let Some(h) = message.headers() {
                    for header in h.iter() {
                        header_list.push((
                            header.key.to_string(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        ));
                    }
                }
                let headers: HashMap<String, String> = header_list.iter().cloned().collect();
                received.push(Received {
                    topic: message.topic().to_string(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                    value: message.payload().map(|p| p.to_vec()),
                    headers,
                    header_list,
                });
            }
            Some(Err(err)) => eprintln!("consumer: {err}"),
            None => {}
        }
    }
    received
}
