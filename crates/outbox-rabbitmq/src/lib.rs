//! The RabbitMQ sink of the outbox relay (AMQP 0-9-1 through lapin).
//!
//! Each message is published persistent (`delivery_mode` 2), `mandatory`, with
//! `message_id` = the event id and the event's headers as AMQP headers, to the
//! configured exchange with the routed destination (`sink.routing_key`) as its routing
//! key. It counts as delivered only on the broker's publisher confirm; a message no
//! queue takes (returned) is retried, like a missing topic.
//!
//! Order: one channel in confirm mode. One aggregate's messages (one routing key and
//! key) are published one after another, each after the previous one's confirm, and
//! a failure holds the rest back; different aggregates are published at once.
//!
//! A lost connection is replaced at the next publish: lapin does not reconnect.

mod audit_stream;
mod settings;

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use outbox_core::{
    publish_per_aggregate, BoxFuture, CheckError, DeliveryError, DeliveryOutcome, Message, Sink,
};
use tokio::sync::Mutex;
use tracing::warn;

pub use audit_stream::{read_audit_stream, ReadError};
pub use settings::RabbitMqSettings;

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to RabbitMQ at {address}: {detail}; check the address, the user and its password")]
    Unreachable { address: String, detail: String },
    #[error("cannot declare the exchange {exchange:?}: {detail}")]
    Exchange { exchange: String, detail: String },
    #[error("cannot declare the audit stream {stream:?} or bind it to the exchange {exchange:?}: {detail}; an existing queue of that name must be a stream queue")]
    AuditStream {
        stream: String,
        exchange: String,
        detail: String,
    },
}

/// Publishes to RabbitMQ with publisher confirms.
pub struct RabbitMqSink {
    settings: RabbitMqSettings,
    /// Exchanges declared (and bound to the audit stream) so far: with
    /// `{aggregatetype}` in `exchange`, each is declared at its first message.
    declared: Mutex<HashSet<String>>,
    /// The connection and its confirm-mode channel; `None` after a failure, until the
    /// next publish connects again.
    link: Mutex<Option<(Connection, Channel)>>,
}

impl RabbitMqSink {
    /// Connects, declares the audit stream if there is one, and the exchange (bound to
    /// the stream) when it is fixed and the settings ask for it.
    pub async fn connect(settings: RabbitMqSettings) -> Result<RabbitMqSink, ConnectError> {
        let link = open(&settings).await?;
        if let Some(stream) = &settings.audit_stream {
            link.1
                .queue_declare(
                    stream,
                    lapin::options::QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    audit_stream::stream_arguments(settings.audit_max_age),
                )
                .await
                .map_err(|err| ConnectError::AuditStream {
                    stream: stream.clone(),
                    exchange: settings.exchange.clone(),
                    detail: err.to_string(),
                })?;
        }
        let sink = RabbitMqSink {
            settings,
            declared: Mutex::new(HashSet::new()),
            link: Mutex::new(None),
        };
        if !sink.settings.exchange.contains("{aggregatetype}") && !sink.settings.exchange.is_empty()
        {
            let exchange = sink.settings.exchange.clone();
            sink.prepare_exchange(&link.1, &exchange)
                .await
                .map_err(|detail| match &sink.settings.audit_stream {
                    Some(stream) => ConnectError::AuditStream {
                        stream: stream.clone(),
                        exchange: exchange.clone(),
                        detail,
                    },
                    None => ConnectError::Exchange {
                        exchange: exchange.clone(),
                        detail,
                    },
                })?;
        }
        *sink.link.lock().await = Some(link);
        Ok(sink)
    }

    /// Declares `exchange` when the settings ask for it and binds the audit stream to
    /// it, once per exchange.
    async fn prepare_exchange(&self, channel: &Channel, exchange: &str) -> Result<(), String> {
        let mut declared = self.declared.lock().await;
        if declared.contains(exchange) {
            return Ok(());
        }
        if self.settings.declare_exchange {
            channel
                .exchange_declare(
                    exchange,
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|err| err.to_string())?;
        }
        if let Some(stream) = &self.settings.audit_stream {
            channel
                .queue_bind(
                    stream,
                    exchange,
                    "#",
                    lapin::options::QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|err| err.to_string())?;
        }
        declared.insert(exchange.to_string());
        Ok(())
    }

    /// The exchange of `message`: `exchange` with `{aggregatetype}` replaced by the
    /// message's `aggregatetype` header.
    fn exchange_for(&self, message: &Message) -> Result<String, DeliveryError> {
        let template = &self.settings.exchange;
        if !template.contains("{aggregatetype}") {
            return Ok(template.clone());
        }
        let aggregate_type = message
            .headers
            .iter()
            .find(|(name, _)| name == "aggregatetype")
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
            .unwrap_or_default();
        let exchange = template.replace("{aggregatetype}", aggregate_type);
        check_exchange_name(&exchange)
            .map_err(|why| DeliveryError::permanent(format!("exchange {exchange:?} {why}")))?;
        Ok(exchange)
    }

    /// The channel in use, connecting again if the last one failed.
    async fn channel(&self) -> Result<Channel, DeliveryError> {
        let mut link = self.link.lock().await;
        if let Some((connection, channel)) = link.as_ref() {
            if connection.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        *link = None;
        let opened = open(&self.settings)
            .await
            .map_err(|err| DeliveryError::unavailable(err.to_string()))?;
        let channel = opened.1.clone();
        *link = Some(opened);
        Ok(channel)
    }

    async fn publish_one(&self, channel: &Channel, message: &Message) -> DeliveryOutcome {
        if let Err(why) = check_routing_key(&message.topic) {
            return DeliveryOutcome::Failed(DeliveryError::permanent(format!(
                "{:?} {why}",
                message.topic
            )));
        }
        // AMQP field names are short strings: a longer one cannot be sent at all.
        if let Some((name, _)) = message.headers.iter().find(|(name, _)| name.len() > 255) {
            return DeliveryOutcome::Failed(DeliveryError::permanent(format!(
                "the header name {:?}... is {} bytes long; AMQP carries header names of at most 255 bytes: shorten that key of the headers column",
                name.chars().take(40).collect::<String>(),
                name.len()
            )));
        }
        let exchange = match self.exchange_for(message) {
            Ok(exchange) => exchange,
            Err(err) => return DeliveryOutcome::Failed(err),
        };
        if let Err(detail) = self.prepare_exchange(channel, &exchange).await {
            // A refused declaration closes the channel: the next publish opens another.
            self.forget_link().await;
            return DeliveryOutcome::Failed(DeliveryError::unavailable(format!(
                "cannot declare the exchange {exchange:?}: {detail}"
            )));
        }
        let payload = message.value.clone().unwrap_or_default();
        let published = tokio::time::timeout(self.settings.confirm_timeout, async {
            let confirm = channel
                .basic_publish(
                    &exchange,
                    &message.topic,
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &payload,
                    properties(message),
                )
                .await?;
            confirm.await
        })
        .await;
        match published {
            Err(_) => {
                warn!(routing_key = %message.topic, "no publisher confirm from RabbitMQ in time; retried");
                DeliveryOutcome::Failed(DeliveryError::unavailable(format!(
                    "no publisher confirm from RabbitMQ within {:?}",
                    self.settings.confirm_timeout
                )))
            }
            Ok(Err(err)) => {
                self.forget_link().await;
                DeliveryOutcome::Failed(DeliveryError::unavailable(format!(
                    "RabbitMQ connection failed: {err}"
                )))
            }
            Ok(Ok(Confirmation::Ack(None))) => DeliveryOutcome::Delivered,
            Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                DeliveryOutcome::Failed(DeliveryError::retriable(format!(
                    "no queue is bound to the exchange {:?} for the routing key {:?} (returned: {}); bind one",
                    exchange, message.topic, returned.reply_text
                )))
            }
            Ok(Ok(Confirmation::Nack(_))) => DeliveryOutcome::Failed(DeliveryError::retriable(
                "RabbitMQ refused the message (nack)",
            )),
            Ok(Ok(Confirmation::NotRequested)) => DeliveryOutcome::Failed(
                DeliveryError::unavailable("the channel is not in confirm mode"),
            ),
        }
    }

    async fn forget_link(&self) {
        *self.link.lock().await = None;
    }
}

impl Sink for RabbitMqSink {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn publish(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<DeliveryOutcome>> {
        Box::pin(async move {
            let channel = match self.channel().await {
                Ok(channel) => channel,
                Err(err) => {
                    return messages
                        .iter()
                        .map(|_| DeliveryOutcome::Failed(err.clone()))
                        .collect()
                }
            };
            publish_per_aggregate(&messages, |message| self.publish_one(&channel, message)).await
        })
    }

    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), CheckError>> {
        Box::pin(async move {
            tokio::time::timeout(timeout, self.channel())
                .await
                .map_err(|_| format!("no answer from RabbitMQ within {timeout:?}"))?
                .map_err(|err| err.reason)?;
            Ok(())
        })
    }
}

/// A connection and a channel in confirm mode.
async fn open(settings: &RabbitMqSettings) -> Result<(Connection, Channel), ConnectError> {
    let unreachable = |detail: String| ConnectError::Unreachable {
        address: settings.address.clone(),
        detail,
    };
    let (connection, channel) = connect(settings).await.map_err(unreachable)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|err| unreachable(err.to_string()))?;
    Ok((connection, channel))
}

/// A connection and a channel, within `connect_timeout`; the error says why not.
async fn connect(settings: &RabbitMqSettings) -> Result<(Connection, Channel), String> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connect = async {
        let connection = Connection::connect(&settings.uri(), properties).await?;
        let channel = connection.create_channel().await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    tokio::time::timeout(settings.connect_timeout, connect)
        .await
        .map_err(|_| format!("no answer within {:?}", settings.connect_timeout))?
        .map_err(|err| err.to_string())
}

/// Persistent, `message_id` = the event id, the event's headers as AMQP headers
/// (binary-safe), and the aggregate id as the `aggregateid` header.
fn properties(message: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut id = None;
    for (name, value) in &message.headers {
        if name == "id" {
            id = std::str::from_utf8(value).ok().map(str::to_string);
        }
        headers.insert(
            ShortString::from(name.clone()),
            AMQPValue::ByteArray(ByteArray::from(value.clone())),
        );
    }
    headers.insert(
        ShortString::from("aggregateid"),
        AMQPValue::LongString(LongString::from(message.key.clone())),
    );
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(id) = id {
        properties = properties.with_message_id(ShortString::from(id));
    }
    properties
}

/// Whether `routing_key` fits AMQP's short string (at most 255 bytes): the RabbitMQ
/// sink's [`outbox_core::DestinationRule`].
pub fn check_routing_key(routing_key: &str) -> Result<(), String> {
    match routing_key.len() {
        0..=255 => Ok(()),
        _ => Err("is not a valid AMQP routing key: it is longer than 255 bytes; shorten the event's aggregatetype or sink.routing_key".into()),
    }
}

/// Whether `exchange` is a name AMQP 0-9-1 allows: 1 to 255 letters, digits, `-`,
/// `_`, `.` and `:`.
pub fn check_exchange_name(exchange: &str) -> Result<(), String> {
    let valid = !exchange.is_empty()
        && exchange.len() <= 255
        && exchange
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    match valid {
        true => Ok(()),
        false => Err("is not a valid AMQP exchange name (1 to 255 letters, digits, '-', '_', '.', ':'); change the event's aggregatetype or sink.exchange".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_names() {
        assert!(check_exchange_name("outbox.order_v1-x:y").is_ok());
        for bad in ["", "my order", "ordér", &"e".repeat(256)] {
            assert!(check_exchange_name(bad).is_err(), "{bad:?}");
        }
    }
}
