//! The sinks the relay can publish to: their `[sink]` sections, the validated settings,
//! and building one. The engine sees only `dyn Sink`; a new broker is a new sink crate
//! and one variant in each of the three enums here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{DestinationRule, Sink, TopicTemplate};
use outbox_kafka::{KafkaSettings, KafkaSink};
use outbox_nats::{NatsSettings, NatsSink, StreamSettings};
use outbox_rabbitmq::{RabbitMqSettings, RabbitMqSink};
use outbox_webhook::{WebhookSecret, WebhookSettings, WebhookSink};
use serde::Deserialize;

use crate::config::PropertyValue;
use crate::RelayError;

/// The `[sink]` section: `type` picks the broker, the other keys are that sink's.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkSection {
    /// Kafka's settings keep their own places: `kafka_brokers`, `[kafka]`, `[topics]`.
    Kafka(KafkaSinkSection),
    Nats(NatsSection),
    Rabbitmq(RabbitMqSection),
    Webhook(WebhookSection),
}

impl Default for SinkSection {
    fn default() -> Self {
        SinkSection::Kafka(KafkaSinkSection {})
    }
}

impl SinkSection {
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            SinkSection::Kafka(_) => "kafka",
            SinkSection::Nats(_) => "nats",
            SinkSection::Rabbitmq(_) => "rabbitmq",
            SinkSection::Webhook(_) => "webhook",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkSection {}

/// `[sink] type = "nats"`: NATS JetStream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// Server URL, such as `nats://127.0.0.1:4222`.
    pub url: String,
    /// The subject; `{aggregatetype}` is replaced by the event's aggregate type.
    pub subject: String,
    /// A stream the relay creates when it is missing (none: the stream must exist).
    pub stream: Option<String>,
    /// The created stream's subjects. Default: the subject template, `{aggregatetype}`
    /// read as a wildcard.
    pub stream_subjects: Vec<String>,
    /// The created stream's duplicate window: a relay's resend of an event within it
    /// (same `Nats-Msg-Id`) is dropped by the server.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a publish waits for the stream's acknowledgement.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
}

impl Default for NatsSection {
    fn default() -> Self {
        let nats = NatsSettings::new("");
        NatsSection {
            url: String::new(),
            subject: TopicTemplate::DEFAULT.into(),
            stream: None,
            stream_subjects: Vec::new(),
            duplicate_window: StreamSettings::new("", Vec::new()).duplicate_window,
            connect_timeout: nats.connect_timeout,
            ack_timeout: nats.ack_timeout,
        }
    }
}

/// `[sink] type = "rabbitmq"`: RabbitMQ over AMQP 0-9-1.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqSection {
    /// `host:port`, such as `127.0.0.1:5672`.
    pub address: String,
    pub user: String,
    /// The password: a string, or `{ file = "..." }` / `{ env = "VAR" }`.
    pub password: Option<PropertyValue>,
    pub vhost: String,
    /// The exchange messages are published to (a durable topic exchange when the relay
    /// declares it); `{aggregatetype}` is replaced by the event's aggregate type.
    pub exchange: String,
    /// Declare the exchange at start if it is missing.
    pub declare_exchange: bool,
    /// The routing key; `{aggregatetype}` is replaced by the event's aggregate type.
    pub routing_key: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a publish waits for the broker's confirm.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// A stream queue the relay declares and binds to the exchange for every routing
    /// key, for `outbox verify` to read back (none: RabbitMQ keeps nothing to audit).
    pub audit_stream: Option<String>,
    /// How long the audit stream keeps messages.
    #[serde(with = "humantime_serde")]
    pub audit_max_age: Duration,
}

impl Default for RabbitMqSection {
    fn default() -> Self {
        let rabbitmq = RabbitMqSettings::new("", "", "", "");
        RabbitMqSection {
            address: String::new(),
            user: "guest".into(),
            password: None,
            vhost: rabbitmq.vhost,
            exchange: "outbox".into(),
            declare_exchange: rabbitmq.declare_exchange,
            routing_key: TopicTemplate::DEFAULT.into(),
            connect_timeout: rabbitmq.connect_timeout,
            confirm_timeout: rabbitmq.confirm_timeout,
            audit_stream: None,
            audit_max_age: rabbitmq.audit_max_age,
        }
    }
}

/// `[sink] type = "webhook"`: one signed HTTP POST per event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSection {
    /// The URL; `{aggregatetype}` is replaced by the event's aggregate type.
    pub url: String,
    /// Standard Webhooks signing secret (`whsec_...`): a string, or `{ file = "..." }`
    /// / `{ env = "VAR" }`. Without it requests are not signed.
    pub secret: Option<PropertyValue>,
    /// The longest a request may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Requests at once, across aggregates.
    pub max_in_flight: usize,
    /// Events per request: 1 (each event alone, its payload as the body) or more (a
    /// JSON array per request to one URL).
    pub batch_size: usize,
    /// A PEM CA certificate to trust beside the usual roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for WebhookSection {
    fn default() -> Self {
        let webhook = WebhookSettings::new("");
        WebhookSection {
            url: String::new(),
            secret: None,
            timeout: webhook.timeout,
            max_in_flight: webhook.max_in_flight,
            batch_size: webhook.batch_size,
            ca_file: None,
        }
    }
}

/// A sink's validated settings.
#[derive(Debug, Clone)]
pub enum SinkSettings {
    Kafka(KafkaSettings),
    Nats(NatsSettings),
    RabbitMq(RabbitMqSettings),
    Webhook(WebhookSettings),
}

impl SinkSettings {
    /// The broker's name, as in `[sink] type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkSettings::Kafka(_) => "kafka",
            SinkSettings::Nats(_) => "nats",
            SinkSettings::RabbitMq(_) => "rabbitmq",
            SinkSettings::Webhook(_) => "webhook",
        }
    }

    /// Where the relay publishes, for the start-up log (no credentials).
    pub fn target(&self) -> String {
        match self {
            SinkSettings::Kafka(kafka) => kafka.brokers.clone(),
            SinkSettings::Nats(nats) => nats.shown_url(),
            SinkSettings::RabbitMq(rabbitmq) => {
                format!("{} exchange {:?}", rabbitmq.address, rabbitmq.exchange)
            }
            SinkSettings::Webhook(webhook) => outbox_webhook::redacted(&webhook.url),
        }
    }
}

/// A `[sink]` section checked and turned into settings, with the routing template and
/// the destination rule of that sink. Kafka's settings come in resolved already.
pub(crate) fn resolve(
    section: SinkSection,
    kafka: impl FnOnce() -> Result<(KafkaSettings, String), RelayError>,
) -> Result<(SinkSettings, String, DestinationRule), RelayError> {
    let config = |text: String| RelayError::Config(text);
    let required = |sink: &str, key: &str, value: &str, example: &str| {
        if value.trim().is_empty() {
            Err(config(format!(
                "sink.{key} is not set; the {sink} sink needs it: add {key} = {example:?} to [sink] (or set OUTBOX_SINK__{})",
                key.to_uppercase()
            )))
        } else {
            Ok(())
        }
    };
    let timeouts = |pairs: &[(&str, Duration)]| {
        for (key, value) in pairs {
            if *value < Duration::from_millis(100) || *value > Duration::from_secs(3600) {
                return Err(config(format!(
                    "sink.{key} is {}; set it between 100ms and 1h",
                    humantime_serde::re::humantime::format_duration(*value)
                )));
            }
        }
        Ok(())
    };
    Ok(match section {
        SinkSection::Kafka(KafkaSinkSection {}) => {
            let (kafka, template) = kafka()?;
            (
                SinkSettings::Kafka(kafka),
                template,
                outbox_kafka::check_topic_name,
            )
        }
        SinkSection::Nats(nats) => {
            required("nats", "url", &nats.url, "nats://127.0.0.1:4222")?;
            timeouts(&[
                ("connect_timeout", nats.connect_timeout),
                ("ack_timeout", nats.ack_timeout),
            ])?;
            check_template("subject", &nats.subject)?;
            let stream = nats.stream.map(|name| {
                let subjects = match nats.stream_subjects.is_empty() {
                    true => vec![stream_subject(&nats.subject)],
                    false => nats.stream_subjects.clone(),
                };
                StreamSettings {
                    duplicate_window: nats.duplicate_window,
                    ..StreamSettings::new(name, subjects)
                }
            });
            if stream.is_none() && !nats.stream_subjects.is_empty() {
                return Err(config(
                    "sink.stream_subjects is set without sink.stream; name the stream the relay should create, or remove stream_subjects".into(),
                ));
            }
            let settings = NatsSettings {
                connect_timeout: nats.connect_timeout,
                ack_timeout: nats.ack_timeout,
                stream,
                ..NatsSettings::new(nats.url)
            };
            (
                SinkSettings::Nats(settings),
                nats.subject,
                outbox_nats::check_subject,
            )
        }
        SinkSection::Rabbitmq(rabbitmq) => {
            required("rabbitmq", "address", &rabbitmq.address, "127.0.0.1:5672")?;
            timeouts(&[
                ("connect_timeout", rabbitmq.connect_timeout),
                ("confirm_timeout", rabbitmq.confirm_timeout),
            ])?;
            check_template("routing_key", &rabbitmq.routing_key)?;
            check_template("exchange", &rabbitmq.exchange)?;
            outbox_rabbitmq::check_exchange_name(
                &rabbitmq.exchange.replace("{aggregatetype}", "x"),
            )
            .map_err(|why| config(format!("sink.exchange {:?} {why}", rabbitmq.exchange)))?;
            let password = match rabbitmq.password {
                Some(password) => password.resolve("sink.password")?,
                None => String::new(),
            };
            if rabbitmq
                .audit_stream
                .as_deref()
                .is_some_and(|s| s.trim().is_empty())
            {
                return Err(config(
                    "sink.audit_stream is empty; name the stream queue (such as \"outbox.audit\") or remove the key".into(),
                ));
            }
            if rabbitmq.audit_max_age < Duration::from_secs(60) {
                return Err(config(
                    "sink.audit_max_age is below 1m; keep audit messages at least as long as you audit back (7d is the default)".into(),
                ));
            }
            let settings = RabbitMqSettings {
                audit_stream: rabbitmq.audit_stream,
                audit_max_age: rabbitmq.audit_max_age,
                vhost: rabbitmq.vhost,
                declare_exchange: rabbitmq.declare_exchange,
                connect_timeout: rabbitmq.connect_timeout,
                confirm_timeout: rabbitmq.confirm_timeout,
                ..RabbitMqSettings::new(
                    rabbitmq.address,
                    rabbitmq.user,
                    password,
                    rabbitmq.exchange,
                )
            };
            (
                SinkSettings::RabbitMq(settings),
                rabbitmq.routing_key,
                outbox_rabbitmq::check_routing_key,
            )
        }
        SinkSection::Webhook(webhook) => {
            required(
                "webhook",
                "url",
                &webhook.url,
                "https://hooks.example/{aggregatetype}",
            )?;
            timeouts(&[("timeout", webhook.timeout)])?;
            check_template("url", &webhook.url)?;
            outbox_webhook::check_url(&webhook.url.replace("{aggregatetype}", "x"))
                .map_err(|why| config(format!("sink.url {:?} {why}", webhook.url)))?;
            if !(1..=1024).contains(&webhook.max_in_flight) {
                return Err(config(format!(
                    "sink.max_in_flight is {}; set it between 1 and 1024 (64 is the default)",
                    webhook.max_in_flight
                )));
            }
            if !(1..=1000).contains(&webhook.batch_size) {
                return Err(config(format!(
                    "sink.batch_size is {}; set it between 1 (one event per request, the default) and 1000",
                    webhook.batch_size
                )));
            }
            let secret = match webhook.secret {
                Some(secret) => Some(
                    WebhookSecret::parse(&secret.resolve("sink.secret")?)
                        .map_err(|err| config(format!("sink.secret: {err}")))?,
                ),
                None => None,
            };
            let settings = WebhookSettings {
                secret,
                timeout: webhook.timeout,
                max_in_flight: webhook.max_in_flight,
                batch_size: webhook.batch_size,
                ca_file: webhook.ca_file,
                ..WebhookSettings::new(webhook.url.clone())
            };
            (
                SinkSettings::Webhook(settings),
                webhook.url,
                outbox_webhook::check_url,
            )
        }
    })
}

fn check_template(key: &str, template: &str) -> Result<(), RelayError> {
    TopicTemplate::parse(template)
        .map(|_| ())
        .map_err(|err| RelayError::Config(format!("sink.{key}: {err}")))
}

/// The stream subject that captures every subject the template renders:
/// `{aggregatetype}` as `>` at the end (an aggregate type may hold dots), `*` elsewhere.
fn stream_subject(template: &str) -> String {
    match template.strip_suffix("{aggregatetype}") {
        Some(head) if !head.contains("{aggregatetype}") => format!("{head}>"),
        _ => template.replace("{aggregatetype}", "*"),
    }
}

/// Connects the sink `settings` name.
pub(crate) async fn build(settings: &SinkSettings) -> Result<Arc<dyn Sink>, RelayError> {
    let config = |err: &dyn std::fmt::Display| RelayError::Config(err.to_string());
    Ok(match settings {
        SinkSettings::Kafka(kafka) => {
            Arc::new(KafkaSink::new(kafka.clone()).map_err(|e| config(&e))?)
        }
        SinkSettings::Nats(nats) => Arc::new(
            NatsSink::connect(nats.clone())
                .await
                .map_err(|e| config(&e))?,
        ),
        SinkSettings::RabbitMq(rabbitmq) => Arc::new(
            RabbitMqSink::connect(rabbitmq.clone())
                .await
                .map_err(|e| config(&e))?,
        ),
        SinkSettings::Webhook(webhook) => {
            Arc::new(WebhookSink::new(webhook.clone()).map_err(|e| config(&e))?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_subjects_capture_the_template() {
        assert_eq!(
            stream_subject("outbox.event.{aggregatetype}"),
            "outbox.event.>"
        );
        assert_eq!(stream_subject("{aggregatetype}.events"), "*.events");
        assert_eq!(stream_subject("orders"), "orders");
    }
}
