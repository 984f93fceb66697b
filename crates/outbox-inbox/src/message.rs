//! The message a handler sees, and how its event id is read.

use rdkafka::message::{BorrowedMessage, Headers, Message};
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// The header that carries the event id. The outbox relay sets it, and so does
/// Debezium's outbox event router.
pub const ID_HEADER: &str = "id";

/// A Kafka message whose event id is not yet in the inbox, handed to the
/// [`Handler`](crate::Handler) together with the transaction that records it.
#[derive(Debug, Clone)]
pub struct InboxMessage {
    pub(crate) id: Uuid,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) timestamp_ms: Option<i64>,
    pub(crate) attempt: u32,
}

/// The payload is missing or does not decode as the requested type. A handler that
/// returns it with `?` has the message dead-lettered at once: retrying cannot fix the
/// bytes.
#[derive(thiserror::Error)]
pub enum PayloadError {
    /// The message has no value (a tombstone).
    #[error("the message has no payload (a tombstone); expected JSON")]
    Missing,
    /// The value is not JSON of the requested shape; serde's error says where.
    #[error("the payload is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl InboxMessage {
    /// The event id (the `id` header).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The topic the message came from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Its offset in the partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The message key: the aggregate id for outbox events.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The key as UTF-8, when it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|key| std::str::from_utf8(key).ok())
    }

    /// The value bytes; `None` for a tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// The value decoded from JSON.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        let bytes = self.payload().ok_or(PayloadError::Missing)?;
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Every header in the order the producer wrote them (a key may repeat).
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_deref()))
    }

    /// The last value of header `key` (as Kafka's Java client's `lastHeader`).
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, value)| value.as_deref())
    }

    /// The last value of header `key` as UTF-8, when it is.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        self.header(key)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The `type` header (`OrderCreated`) that the outbox relay sets: the first one, as
    /// for the id (the relay's own headers come first).
    pub fn event_type(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == "type")
            .and_then(|(_, value)| value.as_deref())
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The message timestamp in milliseconds since the Unix epoch, if it has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }

    /// Which attempt this is: 1 the first time, 2 after one handler error, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Copies a consumed message out of librdkafka's buffer. The id is left nil when the
    /// header is missing or malformed; the second value then says what is wrong.
    pub(crate) fn from_kafka(message: &BorrowedMessage<'_>) -> (InboxMessage, Option<String>) {
        let headers: Vec<(String, Option<Vec<u8>>)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        let mut inbox_message = InboxMessage {
            id: Uuid::nil(),
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
            attempt: 0,
        };
        let problem = match event_id(&inbox_message.headers) {
            Ok(id) => {
                inbox_message.id = id;
                None
            }
            Err(problem) => Some(problem),
        };
        (inbox_message, problem)
    }
}

/// Reads the `id` header: a UUID as text (the relay, Debezium with its default string
/// header converter), as a JSON string (Debezium with the JSON header converter), or as
/// 16 raw bytes.
pub(crate) fn parse_event_id(header: Option<Option<&[u8]>>) -> Result<Uuid, String> {
    const FIX: &str = "the inbox deduplicates on it, so the message was not handled; \
                       set an `id` header holding a UUID when producing (the outbox relay and \
                       Debezium's outbox event router do)";
    let value = match header {
        None => return Err(format!("the message has no `{ID_HEADER}` header; {FIX}")),
        Some(None) => return Err(format!("the message's `{ID_HEADER}` header is null; {FIX}")),
        Some(Some(value)) => value,
    };
    if value.len() == 16 {
        if let Ok(id) = Uuid::from_slice(value) {
            return Ok(id);
        }
    }
    if let Ok(text) = std::str::from_utf8(value) {
        let text = text.trim();
        let text = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        if let Ok(id) = Uuid::parse_str(text) {
            return Ok(id);
        }
    }
    let shown: String = String::from_utf8_lossy(value).chars().take(64).collect();
    Err(format!(
        "the message's `{ID_HEADER}` header {shown:?} is not a UUID; {FIX}"
    ))
}

/// The event id: the first `id` header, the one the relay sets from the row (the
/// relay never lets the `headers` column add another). `outbox verify` reads the same.
fn event_id(headers: &[(String, Option<Vec<u8>>)]) -> Result<Uuid, String> {
    let header = headers
        .iter()
        .find(|(key, _)| key == ID_HEADER)
        .map(|(_, value)| value.as_deref());
    parse_event_id(header)
}

/// The message and its causes, for `main() -> Result<(), Box<dyn Error>>`.
impl std::fmt::Debug for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        outbox_core::write_error_chain(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0190a6f2-7d4c-7b3e-9a51-2f6c1b8e4d20";

    #[test]
    fn reads_the_id_as_text_json_string_or_bytes() {
        let id = Uuid::parse_str(ID).unwrap();
        assert_eq!(parse_event_id(Some(Some(ID.as_bytes()))), Ok(id));
        let quoted = format!("\"{ID}\"");
        assert_eq!(parse_event_id(Some(Some(quoted.as_bytes()))), Ok(id));
        assert_eq!(parse_event_id(Some(Some(id.as_bytes()))), Ok(id));
    }

    #[test]
    fn the_first_id_header_is_the_event_id() {
        let id = Uuid::parse_str(ID).unwrap();
        let headers = vec![
            ("id".to_string(), Some(ID.as_bytes().to_vec())),
            ("id".to_string(), Some(Uuid::nil().to_string().into_bytes())),
        ];
        assert_eq!(event_id(&headers), Ok(id));
    }

    #[test]
    fn missing_null_or_malformed_ids_are_explained() {
        let missing = parse_event_id(None).unwrap_err();
        assert!(missing.contains("no `id` header"), "{missing}");
        let null = parse_event_id(Some(None)).unwrap_err();
        assert!(null.contains("null"), "{null}");
        let bad = parse_event_id(Some(Some(b"order-42"))).unwrap_err();
        assert!(bad.contains("\"order-42\" is not a UUID"), "{bad}");
        assert!(bad.contains("set an `id` header"), "{bad}");
    }

    #[test]
    fn payload_json_names_the_problem() {
        let message = InboxMessage {
            id: Uuid::nil(),
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: Some(b"42".to_vec()),
            payload: Some(br#"{"total": 1299}"#.to_vec()),
            headers: vec![
                ("type".into(), Some(b"OrderCreated".to_vec())),
                ("type".into(), Some(b"OrderUpdated".to_vec())),
            ],
            timestamp_ms: None,
            attempt: 1,
        };
        #[derive(serde::Deserialize)]
        struct Order {
            total: i64,
        }
        assert_eq!(message.payload_json::<Order>().unwrap().total, 1299);
        assert!(matches!(
            message.payload_json::<Vec<i32>>(),
            Err(PayloadError::Json(_))
        ));
        assert_eq!(message.event_type(), Some("OrderCreated"));
        assert_eq!(message.header_str("type"), Some("OrderUpdated"));
        assert_eq!(message.key_str(), Some("42"));
        assert_eq!(message.headers().count(), 2);
    }
}
