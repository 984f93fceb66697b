//! Which Kafka errors are worth retrying.

use outbox_core::DeliveryError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Classifies a produce or delivery error.
///
/// Permanent: the message itself can never be accepted (too large for the producer or
/// the broker, a record the broker calls invalid, an illegal topic). Retrying those would
/// only block the relay, so they are dead-lettered at once. Everything else (broker down,
/// timeouts, leadership changes, missing topics, authorization that an operator may still
/// grant) may pass, and is retried with backoff.
pub(crate) fn delivery_error(err: &KafkaError) -> DeliveryError {
    let code = err.rdkafka_error_code();
    let reason = match code {
        Some(code) => format!("{err} ({code:?})"),
        None => err.to_string(),
    };
    match code {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic,
        ) => DeliveryError::permanent(reason),
        _ => DeliveryError::retriable(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::ErrorKind;

    #[test]
    fn oversized_messages_are_permanent() {
        let err = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(delivery_error(&err).kind, ErrorKind::Permanent);
    }

    #[test]
    fn timeouts_and_outages_are_retried() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            let err = KafkaError::MessageProduction(code);
            assert_eq!(delivery_error(&err).kind, ErrorKind::Retriable, "{code:?}");
        }
    }
}
