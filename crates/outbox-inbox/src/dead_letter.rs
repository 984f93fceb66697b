//! The dead-letter topic: where a message goes when its handler keeps failing or it
//! cannot be handled at all (no event id).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::message::InboxMessage;
use crate::settings::Settings;
use crate::InboxError;
use outbox_kafka::QuietLog;

/// Header with the reason (the handler's last error, or what is wrong with the message).
pub const ERROR_HEADER: &str = "outbox.inbox.error";
/// Header with the number of handler attempts made (0: the handler never ran).
pub const ATTEMPTS_HEADER: &str = "outbox.inbox.attempts";
/// Header with the consumer name that gave up on the message.
pub const CONSUMER_HEADER: &str = "outbox.inbox.consumer";
/// Header with where the message came from: `topic/partition/offset`.
pub const SOURCE_HEADER: &str = "outbox.inbox.source";

/// Longest error text put in a header; errors are short, but a handler may format a
/// whole payload into one.
const MAX_ERROR_BYTES: usize = 4096;

pub(crate) struct DeadLetters {
    producer: FutureProducer<QuietLog>,
    settings: Settings,
}

impl DeadLetters {
    /// Builds the producer (idempotent, `acks=all`). Contacts nothing yet.
    pub(crate) fn new(settings: &Settings) -> Result<DeadLetters, InboxError> {
        let producer = settings
            .producer_config()
            .create_with_context(QuietLog::redacting(settings.redactor()))
            .map_err(|err| settings.config_error(err))?;
        Ok(DeadLetters {
            producer,
            settings: settings.clone(),
        })
    }

    pub(crate) fn topic_for(&self, source: &str) -> String {
        self.settings.dead_letter_topic_for(source)
    }

    /// Writes `message` to its dead-letter topic with the original key, value and
    /// headers plus the reason, and waits for the broker's acknowledgement.
    pub(crate) async fn send(
        &self,
        message: &InboxMessage,
        reason: &str,
        attempts: u32,
    ) -> Result<(), KafkaError> {
        let topic = self.topic_for(&message.topic);
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 4);
        for (key, value) in &message.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let attempts = attempts.to_string();
        let source = format!("{}/{}/{}", message.topic, message.partition, message.offset);
        for (key, value) in [
            (ERROR_HEADER, truncate(reason, MAX_ERROR_BYTES)),
            (ATTEMPTS_HEADER, attempts.as_str()),
            (CONSUMER_HEADER, self.settings.consumer.as_str()),
            (SOURCE_HEADER, source.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(error, _)| error)
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncates_on_a_char_boundary() {
        assert_eq!(super::truncate("héllo", 2), "h");
        assert_eq!(super::truncate("héllo", 3), "hé");
        assert_eq!(super::truncate("abc", 10), "abc");
    }
}
