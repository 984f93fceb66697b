use rdkafka::error::KafkaError;

/// Why the inbox could not start or had to stop. Handler failures are not here: they
/// are retried and dead-lettered, and consumption goes on.
///
/// `Debug` shows the message and its causes (as `anyhow` does), so a program whose
/// `main` returns `Result<(), Box<dyn Error>>` prints the hint, not a struct dump.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// A builder setting was out of range or inconsistent; raised by
    /// [`InboxBuilder::build`](crate::InboxBuilder::build).
    #[error("invalid inbox setting `{setting}`: {problem}")]
    InvalidSetting {
        /// The builder method or property at fault.
        setting: &'static str,
        /// What is wrong with it and what is allowed.
        problem: String,
    },
    /// The text is librdkafka's, with the values of secret properties removed.
    #[error("librdkafka refused the configuration: {0}; check the properties given with kafka_property()")]
    KafkaConfig(String),
    /// The brokers did not answer in time (the message says what was tried).
    #[error("{0}")]
    KafkaUnreachable(String),
    /// The brokers answered but refused the inbox (TLS, SASL): retrying cannot help.
    #[error("Kafka brokers {brokers} refused the connection: {hint} ({detail})")]
    KafkaRefused {
        /// The broker list as given.
        brokers: String,
        /// The setting to change.
        hint: &'static str,
        /// librdkafka's reason, with secrets removed.
        detail: String,
    },
    /// Kafka did not answer the inbox's first metadata request.
    #[error("cannot reach the Kafka brokers {brokers}: {source}; check the broker list and that the brokers are running")]
    BrokersUnreachable {
        /// The broker list as given.
        brokers: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    #[error("the dead-letter topic {topic:?} does not exist and create_dead_letter_topics(false) forbids creating it; create it (with as many partitions as its source topic, for example `kafka-topics.sh --create --topic {topic}` from Kafka's distribution), turn creation back on, or name another with dead_letter_topic()")]
    /// A dead-letter topic is missing and
    /// [`create_dead_letter_topics(false)`](crate::InboxBuilder::create_dead_letter_topics)
    /// forbids creating it.
    MissingDeadLetterTopic {
        /// The missing topic.
        topic: String,
    },
    #[error("cannot create the dead-letter topic {topic:?}: {reason}; grant the inbox's principal Create on it, create it yourself (as many partitions as its source topic), or name another with dead_letter_topic()")]
    /// Creating a missing dead-letter topic failed (most often for lack of a Kafka ACL).
    CreateDeadLetterTopic {
        /// The topic the inbox tried to create.
        topic: String,
        /// The broker's answer.
        reason: String,
    },
    #[error("cannot read the inbox table {table}: {source}; create it with outbox_inbox::migrate (Inbox::migrate) and grant the consumer's role SELECT, INSERT and DELETE on it")]
    /// The inbox table cannot be read: not created yet, or not granted to the role.
    MissingTable {
        /// The inbox table, schema-qualified.
        table: String,
        /// PostgreSQL's error.
        #[source]
        source: sqlx::Error,
    },
    /// PostgreSQL failed outside a handler's transaction (connecting, migrating, purging).
    #[error("database error while {doing}: {source}")]
    Database {
        /// What the inbox was doing.
        doing: &'static str,
        /// PostgreSQL's error.
        #[source]
        source: sqlx::Error,
    },
    #[error("the inbox retention ({retention:?}) is shorter than the topics {topics:?} may keep a message ({lifetime}); a replay after an offset reset would apply events twice. Raise retention(), leave it unset to follow the topics, or use disable_retention()")]
    /// The inbox would forget event ids while Kafka still holds messages that carry
    /// them, so a replay could apply them twice.
    RetentionTooShort {
        /// The retention asked for with `retention()`.
        retention: std::time::Duration,
        /// The topics whose configuration keeps messages longer.
        topics: Vec<String>,
        /// How long they keep them (their `retention.ms`, or "forever").
        lifetime: String,
    },
    /// Kafka refused the subscription.
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        /// The topics asked for.
        topics: Vec<String>,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The consumer hit an error it cannot recover from; [`Inbox::run`](crate::Inbox::run)
    /// returns it after committing the offsets of finished work.
    #[error("the Kafka consumer failed: {0}; restart it (the offsets of finished work were committed, the rest is replayed and deduplicated)")]
    Consumer(#[source] KafkaError),
    /// The thread that polls Kafka did not start, or panicked.
    #[error("the inbox's Kafka polling thread could not start or panicked; see the log above, then restart the consumer")]
    PollThreadFailed,
}

impl std::fmt::Debug for InboxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        outbox_core::write_error_chain(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `main() -> Result<(), Box<dyn Error>>` prints when the inbox fails.
    #[test]
    fn debug_shows_the_message_and_its_hint() {
        let err = InboxError::MissingDeadLetterTopic {
            topic: "orders.dlq".into(),
        };
        let boxed: Box<dyn std::error::Error> = Box::new(err);
        let shown = format!("Error: {boxed:?}");
        assert!(
            shown.starts_with("Error: the dead-letter topic \"orders.dlq\""),
            "{shown}"
        );
        assert!(!shown.contains("MissingDeadLetterTopic {"), "{shown}");
        let caused = InboxError::Subscribe {
            topics: vec!["t".into()],
            source: KafkaError::Subscription("bad pattern".into()),
        };
        let shown = format!("{caused:?}");
        assert!(shown.contains("Caused by:\n    "), "{shown}");
    }
}
