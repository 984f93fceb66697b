//! Kafka sink of the outbox relay, on librdkafka (through `rdkafka`).
//!
//! - [`KafkaSettings`]: what the relay's configuration says about Kafka.
//! - [`KafkaSink`]: an idempotent producer (`acks=all`, `enable.idempotence=true`,
//!   `partitioner=murmur2_random` so keys land where a Java client puts them) that
//!   creates missing topics and reports one [`outbox_core::DeliveryOutcome`] per message.
//! - [`Redactor`]: secrets of the properties never reach a log line or an error.
//! - [`read_topics`]: reads topics back up to a snapshot of their ends, for `outbox verify`.

mod classify;
mod context;
mod producer;
mod security;
mod settings;
mod sink;
mod topic_name;
mod topic_reader;

pub use context::QuietLog;
pub use security::{is_secret_property, refused_connection_hint, Redactor};
pub use settings::{KafkaSettings, SettingsError, TopicSettings};
pub use sink::{check_connection, ConnectError, KafkaSink};
pub use topic_name::check_topic_name;
pub use topic_reader::{read_topics, ReadError, TopicRead, TopicSummary};
