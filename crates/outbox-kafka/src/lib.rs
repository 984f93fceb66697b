//! Kafka sink of the outbox relay, on librdkafka (through `rdkafka`).
//!
//! - [`KafkaSettings`]: what the relay's configuration says about Kafka.
//! - [`KafkaSink`]: an idempotent producer (`acks=all`, `enable.idempotence=true`,
//!   `partitioner=murmur2_random` so keys land where a Java client puts them) that
//!   creates missing topics and reports one [`outbox_core::DeliveryOutcome`] per message.

mod classify;
mod context;
mod settings;
mod sink;

pub use settings::{KafkaSettings, SettingsError, TopicSettings};
pub use sink::{ConnectError, KafkaSink};
