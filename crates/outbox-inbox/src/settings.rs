//! The inbox's settings and their builder.

use std::time::Duration;

use outbox_core::TableRef;
use rdkafka::ClientConfig;
use sqlx::PgPool;

use crate::{Inbox, InboxError, InboxStats};

/// Properties the inbox sets itself, because its guarantees depend on them.
const RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
];

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) brokers: String,
    pub(crate) group_id: String,
    pub(crate) consumer: String,
    pub(crate) topics: Vec<String>,
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    /// `{topic}` stands for the source topic.
    pub(crate) dead_letter_topic: String,
    /// Create missing dead-letter topics at start (as many partitions as the source).
    pub(crate) create_dead_letter_topics: bool,
    pub(crate) retention: Retention,
    pub(crate) purge_interval: Duration,
    pub(crate) commit_interval: Duration,
    pub(crate) max_in_flight: usize,
    pub(crate) concurrency: usize,
    pub(crate) revoke_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) table: TableRef,
    pub(crate) kafka_properties: Vec<(String, String)>,
    pub(crate) consumer_properties: Vec<(String, String)>,
}

/// How long inbox rows are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Retention {
    /// As long as the topics may keep a message (read from the brokers at start).
    FollowTopics,
    /// A fixed period, refused at start if the topics keep messages longer.
    Fixed(Duration),
    Forever,
}

impl Settings {
    /// The wait before attempt `failures + 1`: the initial backoff, doubled per failure,
    /// capped at the maximum.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }

    pub(crate) fn dead_letter_topic_for(&self, topic: &str) -> String {
        self.dead_letter_topic.replace("{topic}", topic)
    }

    pub(crate) fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // A new group reads from the start, so no event written before it joined is
            // missed; the inbox drops what was already handled.
            .set("auto.offset.reset", "earliest")
            // Only the partitions that move are revoked, so a member joining or leaving
            // does not stop the work of the others.
            .set("partition.assignment.strategy", "cooperative-sticky");
        for (key, value) in self
            .kafka_properties
            .iter()
            .chain(&self.consumer_properties)
        {
            config.set(key, value);
        }
        config
    }

    /// Hides the values of secret properties (passwords, keys, JAAS) in librdkafka's
    /// texts.
    pub(crate) fn redactor(&self) -> outbox_kafka::Redactor {
        outbox_kafka::Redactor::for_properties(
            self.kafka_properties
                .iter()
                .chain(&self.consumer_properties)
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
    }

    /// librdkafka refused a configuration: its message may quote a secret value.
    pub(crate) fn config_error(&self, err: rdkafka::error::KafkaError) -> crate::InboxError {
        crate::InboxError::KafkaConfig(self.redactor().redact(&err.to_string()))
    }

    /// Connection and security properties only, for the admin client.
    pub(crate) fn admin_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.kafka_properties {
            config.set(key, value);
        }
        config
    }

    pub(crate) fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A failed dead-letter write is retried by the inbox (and logged) instead of
            // hanging in librdkafka for the default five minutes.
            .set("message.timeout.ms", "30000")
            // The partition a Java client would choose for the same key.
            .set("partitioner", "murmur2_random");
        for (key, value) in &self.kafka_properties {
            config.set(key, value);
        }
        config
    }

    fn validate(&self) -> Result<(), InboxError> {
        let invalid = |setting: &'static str, problem: String| {
            Err(InboxError::InvalidSetting { setting, problem })
        };
        if self.brokers.trim().is_empty() {
            return invalid("brokers", "empty; give host:port[,host:port...]".into());
        }
        if self.group_id.trim().is_empty() {
            return invalid("group_id", "empty; name the consumer group".into());
        }
        if self.consumer.trim().is_empty() {
            return invalid(
                "consumer_name",
                "empty; name the consumer (its inbox rows are kept under this name)".into(),
            );
        }
        if self.topics.is_empty() {
            return invalid("topics", "no topic to consume; call .topics([...])".into());
        }
        if let Some(topic) = self.topics.iter().find(|t| t.trim().is_empty()) {
            return invalid("topics", format!("{topic:?} is not a topic name"));
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts", "0; at least 1 attempt is needed".into());
        }
        if self.initial_backoff.is_zero() || self.max_backoff < self.initial_backoff {
            return invalid(
                "backoff",
                format!(
                    "initial {:?}, max {:?}; the initial backoff must be above zero and at most the maximum",
                    self.initial_backoff, self.max_backoff
                ),
            );
        }
        if self.dead_letter_topic.trim().is_empty() {
            return invalid(
                "dead_letter_topic",
                "empty; the default is \"{topic}.dlq\"".into(),
            );
        }
        for topic in &self.topics {
            if self.dead_letter_topic_for(topic) == *topic {
                return invalid(
                    "dead_letter_topic",
                    format!("{topic:?} would dead-letter into itself; choose another topic"),
                );
            }
        }
        if self.retention == Retention::Fixed(Duration::ZERO) {
            return invalid(
                "retention",
                "zero would forget every id at once; use disable_retention() to keep rows forever"
                    .into(),
            );
        }
        if self.purge_interval.is_zero() {
            return invalid(
                "purge_interval",
                "zero; use a period such as 10 minutes".into(),
            );
        }
        if self.commit_interval.is_zero() {
            return invalid("commit_interval", "zero; use a period such as 1 s".into());
        }
        if self.max_in_flight == 0 {
            return invalid("max_in_flight", "0; at least 1".into());
        }
        if self.concurrency == 0 {
            return invalid("concurrency", "0; at least 1".into());
        }
        for (key, _) in self
            .kafka_properties
            .iter()
            .chain(&self.consumer_properties)
        {
            if RESERVED_PROPERTIES.contains(&key.as_str()) {
                return invalid(
                    "kafka_property",
                    format!("{key:?} is set by the inbox (its guarantees depend on it); remove it"),
                );
            }
        }
        Ok(())
    }
}

/// Property values stay out of the output: they hold passwords (`sasl.password`,
/// `ssl.key.password`).
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = |properties: &[(String, String)]| -> Vec<String> {
            properties
                .iter()
                .map(|(key, _)| format!("{key}=<redacted>"))
                .collect()
        };
        f.debug_struct("Settings")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("consumer", &self.consumer)
            .field("topics", &self.topics)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("retention", &self.retention)
            .field("purge_interval", &self.purge_interval)
            .field("commit_interval", &self.commit_interval)
            .field("max_in_flight", &self.max_in_flight)
            .field("concurrency", &self.concurrency)
            .field("revoke_timeout", &self.revoke_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("table", &self.table.to_string())
            .field("kafka_properties", &keys(&self.kafka_properties))
            .field("consumer_properties", &keys(&self.consumer_properties))
            .finish()
    }
}

/// Settings of an [`Inbox`]; start with [`Inbox::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the Inbox"]
pub struct InboxBuilder {
    pool: PgPool,
    settings: Settings,
}

impl InboxBuilder {
    pub(crate) fn new(pool: PgPool, brokers: String, group_id: String, consumer: String) -> Self {
        // Handlers each hold a connection for their transaction: more at once would
        // only wait for the pool.
        let concurrency = (pool.options().get_max_connections() as usize).max(1);
        InboxBuilder {
            pool,
            settings: Settings {
                brokers,
                group_id,
                consumer,
                topics: Vec::new(),
                max_attempts: 10,
                initial_backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(60),
                dead_letter_topic: "{topic}.dlq".into(),
                create_dead_letter_topics: true,
                retention: Retention::FollowTopics,
                purge_interval: Duration::from_secs(600),
                commit_interval: Duration::from_secs(1),
                max_in_flight: 1000,
                concurrency,
                revoke_timeout: Duration::from_secs(10),
                shutdown_timeout: Duration::from_secs(30),
                table: crate::table::default_table(),
                kafka_properties: Vec::new(),
                consumer_properties: Vec::new(),
            },
        }
    }

    /// The topics to consume (required).
    pub fn topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.settings.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// Handler attempts before a message is dead-lettered (default 10).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.settings.max_attempts = attempts;
        self
    }

    /// Wait after a failed attempt: `initial`, doubled per failure, at most `max`
    /// (default 500 ms and 60 s). Later messages of the same key wait too; other keys
    /// go on.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.settings.initial_backoff = initial;
        self.settings.max_backoff = max;
        self
    }

    /// Where dead letters go: a topic name, in which `{topic}` stands for the source
    /// topic (default `"{topic}.dlq"`). Missing ones are created at start; see
    /// [`InboxBuilder::create_dead_letter_topics`].
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.settings.dead_letter_topic = topic.into();
        self
    }

    /// Whether `run` creates missing dead-letter topics, with as many partitions as their
    /// source topic (3, the relay's default, when the source does not exist yet) and the
    /// broker's default replication factor. On by default; turn it off where ACLs forbid
    /// creating topics, and `run` then refuses to start until they exist.
    pub fn create_dead_letter_topics(mut self, create: bool) -> Self {
        self.settings.create_dead_letter_topics = create;
        self
    }

    /// Inbox rows older than this are deleted in the background. A duplicate that
    /// arrives later than this is **not** recognised and is processed again, so the
    /// inbox refuses to start when the topics may keep a message longer
    /// (`retention.ms + segment.ms`). Unset (the default), rows are kept exactly that
    /// long, read from the brokers at start (forever for a topic with
    /// `retention.ms = -1`).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.settings.retention = Retention::Fixed(retention);
        self
    }

    /// Keep inbox rows forever (no background purge).
    pub fn disable_retention(mut self) -> Self {
        self.settings.retention = Retention::Forever;
        self
    }

    /// How often the retention purge runs (default 10 minutes).
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        self.settings.purge_interval = interval;
        self
    }

    /// How often finished offsets are committed to Kafka (default 1 s). They are also
    /// committed, synchronously, when partitions are revoked and on shutdown. A longer
    /// interval means fewer commits and more replays (dropped by the inbox) after a
    /// crash.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.settings.commit_interval = interval;
        self
    }

    /// Messages received and not finished, at most (default 1000). Beyond it the
    /// consumer pauses fetching; it may overshoot by what librdkafka already returned.
    pub fn max_in_flight(mut self, messages: usize) -> Self {
        self.settings.max_in_flight = messages;
        self
    }

    /// Handlers running at once, at most (default: the pool's `max_connections`).
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.settings.concurrency = handlers;
        self
    }

    /// How long a running handler of a revoked partition may take to finish before it
    /// is abandoned (its transaction rolled back; the new owner replays the message).
    /// Default 10 s; keep it well below the group's rebalance timeout.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.settings.revoke_timeout = timeout;
        self
    }

    /// How long running handlers may take to finish after shutdown is requested before
    /// they are abandoned (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = timeout;
        self
    }

    /// The inbox table (default `public.outbox_inbox`).
    pub fn table(mut self, table: outbox_core::TableRef) -> Self {
        self.settings.table = table;
        self
    }

    /// A librdkafka property for both the consumer and the dead-letter producer:
    /// `security.protocol`, `sasl.*`, `ssl.*`, `client.id`. Properties the guarantees
    /// depend on (`enable.auto.commit`, `enable.auto.offset.store`,
    /// `enable.idempotence`, `acks`, `group.id`, `bootstrap.servers`) are refused.
    pub fn kafka_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings
            .kafka_properties
            .push((key.into(), value.into()));
        self
    }

    /// Makes this consumer a static member of its group (`group.instance.id`): restarted
    /// with the same id (after a crash, a deploy), it takes its partitions back at once,
    /// without a rebalance, instead of waiting for the dead member's session timeout
    /// (`session.timeout.ms`, 45 s by default). The id must be unique in the group and
    /// stable across restarts of the same member (a pod name, `host-1`). The trade-off:
    /// a static member that stops for good keeps its partitions unconsumed until its
    /// session timeout passes, since it does not leave the group on shutdown.
    pub fn static_member(mut self, instance_id: impl Into<String>) -> Self {
        self.settings
            .consumer_properties
            .push(("group.instance.id".into(), instance_id.into()));
        self
    }

    /// A librdkafka property for the consumer only: `session.timeout.ms`,
    /// `auto.offset.reset` (default here `earliest`), `partition.assignment.strategy`
    /// (default here `cooperative-sticky`), `fetch.*`, ... The same properties as for
    /// [`InboxBuilder::kafka_property`] are refused.
    pub fn consumer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings
            .consumer_properties
            .push((key.into(), value.into()));
        self
    }

    /// Checks the settings. Contacts nothing: [`Inbox::run`] does.
    pub fn build(self) -> Result<Inbox, InboxError> {
        self.settings.validate()?;
        Ok(Inbox {
            pool: self.pool,
            settings: self.settings,
            stats: InboxStats::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            brokers: "127.0.0.1:9092".into(),
            group_id: "billing".into(),
            consumer: "billing".into(),
            topics: vec!["orders".into()],
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            dead_letter_topic: "{topic}.dlq".into(),
            create_dead_letter_topics: true,
            retention: Retention::Fixed(Duration::from_secs(3600)),
            purge_interval: Duration::from_secs(60),
            commit_interval: Duration::from_secs(1),
            max_in_flight: 10,
            concurrency: 4,
            revoke_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
            table: crate::table::default_table(),
            kafka_properties: Vec::new(),
            consumer_properties: Vec::new(),
        }
    }

    #[test]
    fn debug_output_hides_property_values() {
        let mut s = settings();
        s.kafka_properties
            .push(("sasl.password".into(), "hunter2".into()));
        let shown = format!("{s:?}");
        assert!(shown.contains("sasl.password=<redacted>"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let s = settings();
        assert_eq!(s.backoff(1), Duration::from_millis(100));
        assert_eq!(s.backoff(2), Duration::from_millis(200));
        assert_eq!(s.backoff(4), Duration::from_millis(800));
        assert_eq!(s.backoff(5), Duration::from_millis(1000));
        assert_eq!(s.backoff(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn dead_letter_topic_defaults_to_the_source_topic_plus_dlq() {
        let s = settings();
        assert_eq!(s.dead_letter_topic_for("orders"), "orders.dlq");
        assert!(s.validate().is_ok());
    }

    #[test]
    fn refuses_settings_that_break_the_guarantees() {
        let mut s = settings();
        s.kafka_properties
            .push(("enable.auto.commit".into(), "true".into()));
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");

        let mut s = settings();
        s.dead_letter_topic = "orders".into();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("into itself"), "{err}");

        let mut s = settings();
        s.topics.clear();
        assert!(s.validate().unwrap_err().to_string().contains(".topics("));

        let mut s = settings();
        s.max_attempts = 0;
        assert!(s.validate().is_err());
    }
}
