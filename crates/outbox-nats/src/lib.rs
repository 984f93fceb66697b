//! The NATS JetStream sink of the outbox relay.
//!
//! Each message is published to JetStream and counts as delivered only once the
//! stream's acknowledgement arrives. Its `Nats-Msg-Id` is the event id, so the stream's
//! duplicate window drops the copies a relay sends again after a lost acknowledgement
//! or a restart. The subject is the routed destination (`topics.template`, such as
//! `outbox.{aggregatetype}`).
//!
//! Order: JetStream has no partitions or keys. Messages of one aggregate (one subject
//! and key) are published one at a time, each after the previous one's acknowledgement,
//! and a failure holds the aggregate's later messages back; different aggregates are
//! published concurrently.

mod settings;
mod stream_reader;

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::HeaderMap;
use outbox_core::{
    publish_per_aggregate, BoxFuture, CheckError, DeliveryError, DeliveryOutcome, Message, Sink,
};
use tracing::{info, warn};

pub use settings::{NatsSettings, StreamSettings};
pub use stream_reader::{read_stream, streams_of, ReadError};

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "cannot connect to NATS at {url}: {detail}; check the address and that the server runs"
    )]
    Unreachable { url: String, detail: String },
    #[error("NATS at {url} answered, but JetStream is not enabled there ({detail}); start the server with --jetstream")]
    NoJetStream { url: String, detail: String },
    #[error("cannot create or update the JetStream stream {stream:?}: {detail}")]
    Stream { stream: String, detail: String },
}

/// Publishes to NATS JetStream with acknowledgements.
pub struct NatsSink {
    settings: NatsSettings,
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

impl NatsSink {
    /// Connects, checks that JetStream answers, and creates the configured stream if
    /// there is one and it is missing.
    pub async fn connect(settings: NatsSettings) -> Result<NatsSink, ConnectError> {
        let unreachable = |detail: String| ConnectError::Unreachable {
            url: settings.shown_url(),
            detail,
        };
        let client = settings.client().await.map_err(unreachable)?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(settings.ack_timeout);
        let sink = NatsSink {
            settings,
            client,
            jetstream,
        };
        sink.check_jetstream(sink.settings.connect_timeout).await?;
        if let Some(stream) = &sink.settings.stream {
            sink.ensure_stream(stream).await?;
        }
        Ok(sink)
    }

    async fn check_jetstream(&self, timeout: Duration) -> Result<(), ConnectError> {
        let no_jetstream = |detail: String| ConnectError::NoJetStream {
            url: self.settings.shown_url(),
            detail,
        };
        // The account request, read loosely: the client's typed answer wants fields
        // that servers before 2.10 (Debian 12 ships 2.9) do not send.
        let answer = tokio::time::timeout(
            timeout,
            self.client.request("$JS.API.INFO", Default::default()),
        )
        .await
        .map_err(|_| no_jetstream(format!("no answer within {timeout:?}")))?
        .map_err(|err| no_jetstream(err.to_string()))?;
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload)
            .map_err(|err| no_jetstream(format!("an answer that is not JSON: {err}")))?;
        if let Some(error) = answer.get("error") {
            return Err(no_jetstream(error.to_string()));
        }
        Ok(())
    }

    async fn ensure_stream(&self, wanted: &StreamSettings) -> Result<(), ConnectError> {
        let config = stream::Config {
            name: wanted.name.clone(),
            subjects: wanted.subjects.clone(),
            duplicate_window: wanted.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        self.jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|err| ConnectError::Stream {
                stream: wanted.name.clone(),
                detail: err.to_string(),
            })?;
        info!(stream = %wanted.name, subjects = ?wanted.subjects, "JetStream stream ready");
        Ok(())
    }

    async fn publish_one(&self, message: &Message) -> DeliveryOutcome {
        let publish = match self.build(message) {
            Ok(publish) => publish,
            Err(err) => return DeliveryOutcome::Failed(err),
        };
        let sent = self
            .jetstream
            .send_publish(message.topic.clone(), publish)
            .await;
        let acknowledged = match sent {
            Ok(ack) => ack.await,
            Err(err) => Err(err),
        };
        match acknowledged {
            Ok(_) => DeliveryOutcome::Delivered,
            Err(err) => DeliveryOutcome::Failed(classify(&message.topic, &err)),
        }
    }

    /// The JetStream message for `message`, or why it can never be published.
    fn build(&self, message: &Message) -> Result<jetstream::context::Publish, DeliveryError> {
        if let Err(why) = check_subject(&message.topic) {
            return Err(DeliveryError::permanent(format!(
                "{:?} {why}",
                message.topic
            )));
        }
        let payload = message.value.clone().unwrap_or_default();
        let max_payload = self.client.server_info().max_payload;
        let size = payload.len()
            + message
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 4)
                .sum::<usize>();
        if size > max_payload {
            return Err(DeliveryError::permanent(format!(
                "the message is {size} bytes, more than the NATS server's max_payload of {max_payload}"
            )));
        }
        let mut headers = HeaderMap::new();
        let mut id = None;
        for (name, value) in &message.headers {
            let text = std::str::from_utf8(value)
                .ok()
                .filter(|text| !text.contains(['\r', '\n']))
                .ok_or_else(|| {
                    DeliveryError::permanent(format!(
                        "the header {name:?} is not UTF-8 text without line breaks, which NATS headers require"
                    ))
                })?;
            if name.is_empty() || name.contains([':', ' ', '\r', '\n']) {
                return Err(DeliveryError::permanent(format!(
                    "{name:?} is not a valid NATS header name"
                )));
            }
            if name == "id" {
                id = Some(text.to_string());
            }
            headers.insert(name.as_str(), text);
        }
        if let Ok(key) = std::str::from_utf8(&message.key) {
            if !key.contains(['\r', '\n']) {
                headers.insert("aggregateid", key);
            }
        }
        let mut publish = jetstream::context::Publish::build()
            .payload(payload.into())
            .headers(headers);
        if let Some(id) = id {
            publish = publish.message_id(id);
        }
        Ok(publish)
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publish(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<DeliveryOutcome>> {
        Box::pin(async move {
            publish_per_aggregate(&messages, |message| self.publish_one(message)).await
        })
    }

    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), CheckError>> {
        Box::pin(async move { Ok(self.check_jetstream(timeout).await?) })
    }
}

/// What a failed publish means for the relay.
fn classify(subject: &str, err: &jetstream::context::PublishError) -> DeliveryError {
    match err.kind() {
        PublishErrorKind::StreamNotFound => DeliveryError::retriable(format!(
            "no JetStream stream captures the subject {subject:?}; create one whose subjects match it (or set nats.stream so the relay creates it)"
        )),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            warn!(%subject, error = %err, "no acknowledgement from NATS; retried");
            DeliveryError::unavailable(format!("no acknowledgement from NATS: {err}"))
        }
        _ => DeliveryError::retriable(format!("NATS refused the message: {err}")),
    }
}

/// Whether a message can be published to `subject` (dot-separated non-empty tokens, no
/// whitespace, no wildcards): the NATS sink's [`outbox_core::DestinationRule`].
pub fn check_subject(subject: &str) -> Result<(), String> {
    let valid = !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && !token.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        });
    match valid {
        true => Ok(()),
        false => Err("is not a valid NATS subject (tokens separated by dots, no spaces, no wildcards * or >); change the event's aggregatetype or sink.subject".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(check_subject("outbox.order").is_ok());
        assert!(check_subject("orders").is_ok());
        for bad in [
            "",
            "outbox..order",
            "outbox.order.",
            "out box",
            "outbox.*",
            "outbox.>",
        ] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }
}
