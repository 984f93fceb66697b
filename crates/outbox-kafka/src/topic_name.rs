//! Kafka's rules for topic names, the Kafka sink's [`outbox_core::DestinationRule`].

/// Why `topic` cannot be a Kafka topic
/// (`org.apache.kafka.common.internals.Topic.validate`), or `Ok`.
pub fn check_topic_name(topic: &str) -> Result<(), String> {
    let why = if topic.is_empty() {
        "it is empty"
    } else if topic == "." || topic == ".." {
        "\".\" and \"..\" are reserved"
    } else if topic.len() > 249 {
        "it is longer than 249 characters"
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        "only ASCII letters, digits, '.', '_' and '-' are allowed"
    } else {
        return Ok(());
    };
    Err(format!("is not a legal Kafka topic name: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_topic_names() {
        assert!(check_topic_name("outbox.event.order_1-a").is_ok());
        for bad in ["", ".", "..", "my order", "ordér", &"a".repeat(250)] {
            let err = check_topic_name(bad).unwrap_err();
            assert!(err.starts_with("is not a legal Kafka topic name"), "{err}");
        }
        assert!(check_topic_name(&"a".repeat(249)).is_ok());
    }
}
