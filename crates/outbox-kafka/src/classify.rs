//! Which Kafka errors are worth retrying.

use outbox_core::DeliveryError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Classifies a produce or delivery error.
///
/// Permanent: the message itself can never be accepted (too large for the producer or
/// the broker, a record the broker calls invalid, an illegal topic). Retrying those would
/// only block the relay, so they are dead-lettered at once.
///
/// Unavailable: the cluster could not be reached or did not answer in time (broker down,
/// timeouts, no leader, too few in-sync replicas). Retried without using up attempts, so
/// an outage never dead-letters events.
///
/// Everything else (a missing topic, authorization an operator may still grant) is
/// retried with backoff and dead-lettered after `max_attempts`.
pub(crate) fn delivery_error(err: &KafkaError) -> DeliveryError {
    // rdkafka reports no code for admin operations; their code is in the variant.
    let code = match err {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    let reason = match code {
        Some(code) => format!("{err} ({code:?})"),
        None => err.to_string(),
    };
    match code {
        // A missing ACL is the operator's to fix, not the event's fault: the events wait
        // (in order, using up no attempt) until it is granted.
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication,
        ) => DeliveryError::unavailable(format!(
            "{reason}; grant the relay's principal the ACLs it needs (README, \"Least privilege\"): Write and Describe on the topic, Create when topics.create = true, Write and Describe on its transactional id when kafka.transactions = true"
        )),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic,
        ) => DeliveryError::permanent(reason),
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::QueueFull
            // Withdrawn by the sink when the broker did not answer in time.
            | RDKafkaErrorCode::PurgeQueue
            | RDKafkaErrorCode::PurgeInflight
            // The producer, not the message: fenced by a newer relay of the table, or
            // its transaction aborted. The batch is sent again by whoever is active.
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::InvalidTransactionalState
            | RDKafkaErrorCode::State,
        ) => DeliveryError::unavailable(reason),
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
    fn outages_use_up_no_attempts() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::PurgeQueue,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::Fenced,
        ] {
            let err = KafkaError::MessageProduction(code);
            assert_eq!(
                delivery_error(&err).kind,
                ErrorKind::Unavailable,
                "{code:?}"
            );
        }
    }

    #[test]
    fn admin_timeouts_are_outages() {
        let err = KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut);
        assert_eq!(delivery_error(&err).kind, ErrorKind::Unavailable);
    }

    #[test]
    fn refusals_that_may_pass_are_retried() {
        let err = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert_eq!(delivery_error(&err).kind, ErrorKind::Retriable);
    }

    #[test]
    fn missing_acls_hold_events_back_without_attempts() {
        for err in [
            KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
            KafkaError::AdminOp(RDKafkaErrorCode::TopicAuthorizationFailed),
            KafkaError::MessageProduction(RDKafkaErrorCode::ClusterAuthorizationFailed),
        ] {
            let error = delivery_error(&err);
            assert_eq!(error.kind, ErrorKind::Unavailable, "{err:?}");
            assert!(error.reason.contains("Least privilege"), "{}", error.reason);
        }
    }
}
