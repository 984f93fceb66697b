//! Reads topics back for `outbox verify`: every partition from its low watermark up to
//! the high watermark taken when reading starts, so the read ends even while the relay
//! keeps publishing. Partitions are assigned, never subscribed: no consumer group joins,
//! no offsets are committed.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use outbox_core::ObservedMessage;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::context::QuietLog;
use crate::{ConnectError, KafkaSettings};

/// How long one metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Reading gives up when no partition moves for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a metadata answer that names no leader yet (a topic just created) is asked again.
const METADATA_ATTEMPTS: u32 = 10;

/// What was found on one topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSummary {
    pub topic: String,
    /// False when the broker does not know the topic: all its rows are unseen.
    pub exists: bool,
    pub partitions: usize,
    /// Messages read (up to the snapshot), whether or not their id was wanted.
    pub messages: u64,
    /// Messages without a readable `id` header.
    pub without_id: u64,
    /// Some partition no longer starts at offset 0: Kafka's retention (or a deletion)
    /// removed its oldest messages, so older rows may be missing for that reason.
    pub trimmed: bool,
}

/// The messages of interest, and a summary per topic.
#[derive(Debug, Clone, Default)]
pub struct TopicRead {
    pub topics: Vec<TopicSummary>,
    pub messages: Vec<ObservedMessage>,
}

/// Why topics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The settings were refused or the brokers could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot read topic {topic:?}: {source}")]
    Topic { topic: String, source: KafkaError },
    #[error("reading {topic:?} partition {partition} stalled at offset {at} (it should reach {high}) for {STALL_TIMEOUT:?}; check the broker and the consumer rights on the topic")]
    Stalled {
        topic: String,
        partition: i32,
        at: i64,
        high: i64,
    },
}

/// Reads `topics` as of now and returns every message whose `id` header `wanted`
/// accepts, with its topic, partition, offset and key. A topic the broker does not know
/// is reported with `exists: false`, not as an error.
///
/// Runs on a blocking thread (librdkafka's consumer polls synchronously).
pub async fn read_topics<F>(
    settings: &KafkaSettings,
    topics: Vec<String>,
    wanted: F,
) -> Result<TopicRead, ReadError>
where
    F: FnMut(&Uuid) -> bool + Send + 'static,
{
    settings.validate().map_err(ConnectError::from)?;
    if settings.brokers.trim().is_empty() {
        return Err(ConnectError::from(crate::SettingsError::NoBrokers).into());
    }
    let mut config = settings.client_config();
    if config.get("group.id").is_none() {
        // librdkafka needs a group to assign partitions; it is never joined or committed.
        config.set("group.id", "outbox-verify");
    }
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        .set("auto.offset.reset", "earliest");
    let redactor = settings.redactor();
    let consumer: BaseConsumer<QuietLog> = config
        .create_with_context(QuietLog::redacting(redactor.clone()))
        .map_err(|err| ConnectError::Client(redactor.redact(&err.to_string())))?;
    let probe = settings.client_config();
    let brokers = settings.brokers.clone();
    tokio::task::spawn_blocking(move || {
        crate::check_connection(&probe, &redactor, &brokers, REQUEST_TIMEOUT)?;
        read_blocking(&consumer, &topics, wanted)
    })
    .await
    .expect("the topic reader does not panic")
}

/// A partition still to read, up to (not including) `high`.
struct Pending {
    high: i64,
    at: i64,
}

fn read_blocking<F: FnMut(&Uuid) -> bool>(
    consumer: &BaseConsumer<QuietLog>,
    topics: &[String],
    mut wanted: F,
) -> Result<TopicRead, ReadError> {
    let mut read = TopicRead::default();
    let mut summary_index: HashMap<String, usize> = HashMap::new();
    let mut pending: BTreeMap<(String, i32), Pending> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let topic_error = |source| ReadError::Topic {
            topic: topic.clone(),
            source,
        };
        let partitions = partition_count(consumer, topic).map_err(topic_error)?;
        let mut summary = TopicSummary {
            topic: topic.clone(),
            exists: partitions.is_some(),
            partitions: partitions.unwrap_or(0),
            messages: 0,
            without_id: 0,
            trimmed: false,
        };
        for partition in 0..summary.partitions as i32 {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                .map_err(topic_error)?;
            summary.trimmed |= low > 0;
            if low < high {
                assignment
                    .add_partition_offset(topic, partition, Offset::Offset(low))
                    .map_err(topic_error)?;
                pending.insert((topic.clone(), partition), Pending { high, at: low });
            }
        }
        summary_index.insert(topic.clone(), read.topics.len());
        read.topics.push(summary);
    }
    if pending.is_empty() {
        return Ok(read);
    }
    consumer
        .assign(&assignment)
        .map_err(|source| ReadError::Topic {
            topic: topics.join(","),
            source,
        })?;

    let mut last_progress = Instant::now();
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let key = (message.topic().to_string(), message.partition());
                let Some(partition) = pending.get_mut(&key) else {
                    continue;
                };
                let offset = message.offset();
                if offset >= partition.high {
                    // Written after the snapshot.
                    pending.remove(&key);
                    continue;
                }
                partition.at = offset + 1;
                last_progress = Instant::now();
                let summary = &mut read.topics[summary_index[&key.0]];
                summary.messages += 1;
                match id_header(&message) {
                    Some(id) if wanted(&id) => read.messages.push(ObservedMessage {
                        topic: key.0.clone(),
                        partition: key.1,
                        offset,
                        id,
                        key: message.key().map(<[u8]>::to_vec),
                    }),
                    Some(_) => {}
                    None => summary.without_id += 1,
                }
                if partition.at >= partition.high {
                    pending.remove(&key);
                }
            }
            None => {
                // Nothing new: the consumer's position may have moved past offsets that
                // hold no message (transaction markers, compacted records) up to the
                // snapshot's end.
                if let Ok(positions) = consumer.position() {
                    for ((topic, partition), offset) in positions.to_topic_map() {
                        if let (Some(p), Offset::Offset(at)) =
                            (pending.get(&(topic.clone(), partition)), offset)
                        {
                            if at >= p.high {
                                pending.remove(&(topic, partition));
                                last_progress = Instant::now();
                            }
                        }
                    }
                }
            }
            Some(Err(source)) => {
                if source.rdkafka_error_code().is_some_and(is_fatal) {
                    return Err(ReadError::Topic {
                        topic: topics.join(","),
                        source,
                    });
                }
                // Transient (a broker restarting): librdkafka retries on its own.
            }
        }
        if last_progress.elapsed() > STALL_TIMEOUT {
            let ((topic, partition), p) = pending.iter().next().expect("pending is not empty");
            return Err(ReadError::Stalled {
                topic: topic.clone(),
                partition: *partition,
                at: p.at,
                high: p.high,
            });
        }
    }
    Ok(read)
}

/// The topic's partition count, or `None` when the broker does not know the topic.
fn partition_count(
    consumer: &BaseConsumer<QuietLog>,
    topic: &str,
) -> Result<Option<usize>, KafkaError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        match found.error().map(RDKafkaErrorCode::from) {
            None => return Ok(Some(found.partitions().len())),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                return Ok(None)
            }
            Some(code) if attempts < METADATA_ATTEMPTS && is_transient(code) => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Some(code) => return Err(KafkaError::MetadataFetch(code)),
        }
    }
}

fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::RequestTimedOut
    )
}

/// Errors that no amount of waiting fixes while reading.
fn is_fatal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Fatal
    )
}

/// The event id: the first `id` header, as the inbox reads it (the relay's own header
/// comes first and the `headers` column cannot add another).
fn id_header<M: Message>(message: &M) -> Option<Uuid> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == "id")
        .and_then(|h| std::str::from_utf8(h.value?).ok())
        .and_then(|text| Uuid::parse_str(text).ok())
}
