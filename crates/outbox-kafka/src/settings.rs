use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;

/// How missing topics are handled.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSettings {
    /// Create a missing topic through the admin API before the first send to it. Turn it
    /// off where ACLs forbid it; sends to a missing topic are then retried until someone
    /// creates it.
    pub create: bool,
    pub partitions: i32,
    pub replication_factor: i32,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            create: true,
            partitions: 3,
            replication_factor: 1,
        }
    }
}

/// The producer's settings. Secrets in `properties` (SASL passwords and the like) are
/// never printed: `Debug` shows only their names.
#[derive(Clone, PartialEq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`, such as `127.0.0.1:9092`.
    pub brokers: String,
    /// How long a batch waits in the producer for more messages (`linger.ms`). Zero,
    /// the default, sends each batch of the relay as soon as all of it is queued: the
    /// relay waits for every acknowledgement before it goes on, so waiting to fill a
    /// Kafka batch would only add latency, and the relay's batch is already whole.
    pub linger: Duration,
    /// The largest batch per partition in bytes (`batch.size`).
    pub batch_bytes: u32,
    /// How long one publish waits for the broker's acknowledgements. Past it, messages
    /// not yet sent are withdrawn and reported failed (the relay retries them with
    /// backoff, using up no attempt); see [`crate::KafkaSink`] for why librdkafka's own
    /// `message.timeout.ms` is not used for this.
    pub message_timeout: Duration,
    /// `compression.type`: none, gzip, snappy, lz4 or zstd.
    pub compression: String,
    /// Any other librdkafka property (`security.protocol`, `sasl.*`, `ssl.*`, ...).
    pub properties: BTreeMap<String, String>,
    pub topics: TopicSettings,
    /// Publish each batch in a Kafka transaction under this `transactional.id`, which
    /// fences a relay that lost its leadership: once its successor has published, the
    /// broker refuses the old relay's writes and aborts its open transaction, so no
    /// stale copy of it becomes visible to `read_committed` consumers. `None` publishes
    /// without transactions (for brokers that lack them).
    pub transactional_id: Option<String>,
}

/// librdkafka's `linger.ms` while the relay's batch is being queued, when `linger` is
/// zero: far longer than queueing a batch takes, never waited out.
const QUEUEING_LINGER: Duration = Duration::from_millis(5);

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            linger: Duration::ZERO,
            batch_bytes: 1_000_000,
            message_timeout: Duration::from_secs(30),
            compression: "none".into(),
            properties: BTreeMap::new(),
            topics: TopicSettings::default(),
            transactional_id: None,
        }
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("linger", &self.linger)
            .field("batch_bytes", &self.batch_bytes)
            .field("message_timeout", &self.message_timeout)
            .field("compression", &self.compression)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .field("topics", &self.topics)
            .field("transactional_id", &self.transactional_id)
            .finish()
    }
}

/// Settings that would break the relay's guarantees or cannot work.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error("kafka.properties.{0} cannot be set: outbox sets it itself ({1}) because its delivery and ordering guarantees depend on it; remove it")]
    Protected(String, &'static str),
    #[error("kafka.properties.{0} cannot be set; use the `kafka.{1}` setting instead")]
    UseSetting(String, &'static str),
    #[error("kafka_brokers is empty; set it (or OUTBOX_KAFKA_BROKERS) to host:port, such as 127.0.0.1:9092")]
    NoBrokers,
    #[error("kafka.compression {0:?} is not one of none, gzip, snappy, lz4, zstd")]
    Compression(String),
}

/// Properties the relay owns, and why.
const PROTECTED: &[(&str, &str)] = &[
    (
        "enable.idempotence",
        "true: no reordering or duplicates from producer retries",
    ),
    (
        "acks",
        "all: a message counts as delivered only once all in-sync replicas have it",
    ),
    (
        "request.required.acks",
        "all: a message counts as delivered only once all in-sync replicas have it",
    ),
    (
        "max.in.flight.requests.per.connection",
        "5: the most that idempotence allows while keeping order",
    ),
    (
        "max.in.flight",
        "5: the most that idempotence allows while keeping order",
    ),
    (
        "partitioner",
        "murmur2_random: the partitions a Java client would choose",
    ),
    ("bootstrap.servers", "from kafka_brokers"),
    ("metadata.broker.list", "from kafka_brokers"),
];

const AS_SETTING: &[(&str, &str)] = &[
    ("linger.ms", "linger"),
    ("queue.buffering.max.ms", "linger"),
    ("batch.size", "batch_bytes"),
    ("message.timeout.ms", "message_timeout"),
    ("delivery.timeout.ms", "message_timeout"),
    ("compression.type", "compression"),
    ("compression.codec", "compression"),
    ("transactional.id", "transactional_id"),
    ("transaction.timeout.ms", "message_timeout"),
];

impl KafkaSettings {
    /// Checks everything but the brokers (which only the relay needs).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.compression.as_str()) {
            return Err(SettingsError::Compression(self.compression.clone()));
        }
        for key in self.properties.keys() {
            if let Some((_, why)) = PROTECTED.iter().find(|(name, _)| name == key) {
                return Err(SettingsError::Protected(key.clone(), why));
            }
            if let Some((_, setting)) = AS_SETTING.iter().find(|(name, _)| name == key) {
                return Err(SettingsError::UseSetting(key.clone(), setting));
            }
        }
        Ok(())
    }

    /// Hides the values of the secret properties (see [`crate::is_secret_property`]) in
    /// any text.
    pub fn redactor(&self) -> crate::Redactor {
        crate::Redactor::for_properties(
            self.properties
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        )
    }

    /// Connection and security properties, shared by the producer and the admin client.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// With `linger` zero, librdkafka still lingers a little so that queueing a batch
    /// does not send its first messages alone; the sink then sends the whole batch at
    /// once (`send_now` in `sink.rs`).
    pub(crate) fn librdkafka_linger(&self) -> Duration {
        if self.linger.is_zero() {
            QUEUEING_LINGER
        } else {
            self.linger
        }
    }

    pub(crate) fn producer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("partitioner", "murmur2_random")
            .set(
                "linger.ms",
                self.librdkafka_linger().as_millis().to_string(),
            )
            .set("batch.size", self.batch_bytes.to_string())
            // Never time out inside librdkafka: a queued message that timed out while a
            // later one of its key was still queued would leave a gap, and the later one
            // could be written first. The sink bounds the wait itself (message_timeout).
            .set("message.timeout.ms", "0")
            .set("compression.type", &self.compression)
            // The producer also answers the metadata requests (a topic's existence, the
            // health probe): asking must never create a topic with the broker's defaults.
            // Topics are created through the admin API, with `topics.partitions`.
            .set("allow.auto.create.topics", "false");
        if let Some(id) = &self.transactional_id {
            config
                .set("transactional.id", id)
                .set(
                    "transaction.timeout.ms",
                    self.transaction_timeout().as_millis().to_string(),
                )
                // librdkafka requires message.timeout.ms <= transaction.timeout.ms; a
                // transaction aborted as a whole leaves no gap, so its own timeout is safe.
                .set(
                    "message.timeout.ms",
                    self.transaction_timeout().as_millis().to_string(),
                );
        }
        config
    }

    /// How long the broker lets a transaction stay open before aborting it: long enough
    /// for one publish (the sink's own deadline, its grace and the commit), and a bound on
    /// how long `read_committed` consumers wait behind the open transaction of a relay
    /// that died without a successor. Within the broker's default
    /// `transaction.max.timeout.ms` (15 minutes).
    pub fn transaction_timeout(&self) -> Duration {
        (self.message_timeout * 2 + Duration::from_secs(10))
            .clamp(Duration::from_secs(60), Duration::from_secs(900))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarantees_cannot_be_configured_away() {
        let mut settings = KafkaSettings::default();
        settings.properties.insert("acks".into(), "1".into());
        let err = settings.validate().unwrap_err();
        assert!(matches!(err, SettingsError::Protected(ref k, _) if k == "acks"));
        assert!(err.to_string().contains("remove it"));
    }

    #[test]
    fn dedicated_settings_are_pointed_to() {
        let mut settings = KafkaSettings::default();
        settings.properties.insert("linger.ms".into(), "50".into());
        assert_eq!(
            settings.validate().unwrap_err(),
            SettingsError::UseSetting("linger.ms".into(), "linger")
        );
    }

    #[test]
    fn producer_config_is_idempotent_and_java_compatible() {
        let config = KafkaSettings::default().producer_config();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("partitioner"), Some("murmur2_random"));
        assert_eq!(config.get("linger.ms"), Some("5"));
        assert_eq!(config.get("message.timeout.ms"), Some("0"));
        assert_eq!(config.get("allow.auto.create.topics"), Some("false"));
    }

    #[test]
    fn a_transactional_id_makes_a_transactional_producer_librdkafka_accepts() {
        let settings = KafkaSettings {
            transactional_id: Some("outbox-relay/shop/public.outbox".into()),
            ..KafkaSettings::default()
        };
        let config = settings.producer_config();
        assert_eq!(
            config.get("transactional.id"),
            Some("outbox-relay/shop/public.outbox")
        );
        assert_eq!(config.get("transaction.timeout.ms"), Some("70000"));
        let created: Result<rdkafka::producer::BaseProducer, _> = config.create();
        assert!(created.is_ok(), "{:?}", created.err());
        assert_eq!(
            KafkaSettings::default()
                .producer_config()
                .get("transactional.id"),
            None
        );
    }

    #[test]
    fn debug_hides_property_values() {
        let mut settings = KafkaSettings::default();
        settings
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        let shown = format!("{settings:?}");
        assert!(shown.contains("sasl.password"));
        assert!(!shown.contains("hunter2"));
    }
}
