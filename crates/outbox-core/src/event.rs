use std::collections::BTreeMap;

use serde::Serialize;
use uuid::Uuid;

/// An event as an application writes it into the outbox, inside its own transaction.
///
/// Column names follow Debezium's outbox event router: `aggregatetype` picks the topic,
/// `aggregateid` is the message key (so one aggregate's events stay in one partition and
/// keep their order), `type` and `id` travel as headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event id; consumers deduplicate on it. A UUID v7 (time-ordered) unless given.
    pub id: Uuid,
    /// What the event is about, such as `order`. Picks the topic.
    pub aggregate_type: String,
    /// Which one, such as `42`. The message key.
    pub aggregate_id: String,
    /// The event type, such as `OrderCreated`.
    pub event_type: String,
    /// The message value.
    pub payload: Payload,
    /// Extra message headers (W3C `traceparent`, for example).
    pub headers: BTreeMap<String, String>,
}

/// The message value: JSON (stored in a `jsonb` column) or opaque bytes (`bytea`).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A JSON document. Fits either column type (a `bytea` table stores it as compact
    /// JSON text).
    Json(serde_json::Value),
    /// Opaque bytes (Protobuf, Avro, ...). A `jsonb` table accepts them only if they
    /// are valid JSON.
    Bytes(Vec<u8>),
}

/// A payload that cannot be stored in the table's payload column.
#[derive(thiserror::Error)]
pub enum PayloadError {
    /// A [`Payload::Bytes`] that is not valid JSON, for a table that stores `jsonb`:
    /// write JSON, or use a table created with the `bytea` payload type.
    #[error("the payload is not valid JSON but the outbox table stores JSON (jsonb): {0}; store it as JSON, or create the table for bytes with `outbox migrate --payload-type bytea` (outbox::migrate with PayloadType::Bytea)")]
    NotJson(serde_json::Error),
    /// [`Event::json`] could not turn the value into JSON (its `Serialize` impl returned
    /// an error, or a map key cannot be a JSON string).
    #[error("could not serialize the payload to JSON: {0}")]
    Serialize(serde_json::Error),
}

impl Event {
    /// A new event with a fresh UUID v7 id and no extra headers.
    ///
    /// `payload` is a [`serde_json::Value`] or bytes (`Vec<u8>`, `&[u8]`); see
    /// [`Event::json`] to serialize a value of your own type.
    ///
    /// # Example
    /// ```rust
    /// use outbox_core::{Event, Payload};
    ///
    /// let created = Event::new("order", "42", "OrderCreated", serde_json::json!({"total": 12}));
    /// assert_eq!(created.aggregate_id, "42");
    ///
    /// let encoded: Vec<u8> = vec![0x08, 0x2a]; // a Protobuf message, say
    /// let shipped = Event::new("order", "42", "OrderShipped", encoded.clone());
    /// assert_eq!(shipped.payload, Payload::Bytes(encoded));
    /// ```
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Payload>,
    ) -> Self {
        Event {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
        }
    }

    /// A new event whose payload is `value` serialized to JSON.
    ///
    /// # Errors
    /// [`PayloadError::Serialize`] when `value` cannot be serialized to JSON.
    ///
    /// # Example
    /// ```rust
    /// use outbox_core::Event;
    /// use serde::Serialize;
    ///
    /// #[derive(Serialize)]
    /// struct OrderCreated {
    ///     total: u32,
    /// }
    ///
    /// let event = Event::json("order", "42", "OrderCreated", &OrderCreated { total: 12 })?
    ///     .with_header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    /// assert_eq!(event.payload.to_bytes(), br#"{"total":12}"#);
    /// # Ok::<(), outbox_core::PayloadError>(())
    /// ```
    pub fn json<T: Serialize + ?Sized>(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        value: &T,
    ) -> Result<Self, PayloadError> {
        let value = serde_json::to_value(value).map_err(PayloadError::Serialize)?;
        Ok(Event::new(aggregate_type, aggregate_id, event_type, value))
    }

    /// Uses `id` instead of a generated one (for example an id the caller already logged).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Adds a message header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

impl Payload {
    /// The payload as JSON, for a `jsonb` column. Bytes must hold valid JSON.
    pub fn to_json(&self) -> Result<serde_json::Value, PayloadError> {
        match self {
            Payload::Json(value) => Ok(value.clone()),
            Payload::Bytes(bytes) => serde_json::from_slice(bytes).map_err(PayloadError::NotJson),
        }
    }

    /// The payload as bytes, for a `bytea` column. JSON is serialized compactly.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Payload::Json(value) => {
                serde_json::to_vec(value).expect("a serde_json::Value always serializes")
            }
            Payload::Bytes(bytes) => bytes.clone(),
        }
    }
}

impl From<serde_json::Value> for Payload {
    fn from(value: serde_json::Value) -> Self {
        Payload::Json(value)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Bytes(bytes)
    }
}

impl From<&[u8]> for Payload {
    fn from(bytes: &[u8]) -> Self {
        Payload::Bytes(bytes.to_vec())
    }
}

/// An outbox row as a source reads it back, ready for routing.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Insertion order assigned by the database; orders events within one aggregate.
    pub seq: i64,
    /// The event id (the `id` column); sent as the `id` header.
    pub id: Uuid,
    /// The `aggregatetype` column; picks the topic.
    pub aggregate_type: String,
    /// The `aggregateid` column; the message key.
    pub aggregate_id: String,
    /// The `type` column; sent as the `type` header.
    pub event_type: String,
    /// The payload bytes as the broker will receive them (`jsonb` rendered as JSON text).
    pub payload: Option<Vec<u8>>,
    /// Extra headers from the `headers` column, in the order they were stored.
    pub headers: Vec<(String, String)>,
    /// Delivery attempts that already failed.
    pub attempts: i32,
    /// Set when the row cannot be published as it is (a `headers` value that no JSON
    /// reader here can parse, say): the event is dead-lettered with this reason, and the
    /// rows after it keep flowing.
    pub unreadable: Option<String>,
    /// A dead letter queued again by `outbox dead-letters retry`: it is published after
    /// later events of its aggregate, so its message carries
    /// [`RETRIED_DEAD_LETTER_HEADER`](crate::RETRIED_DEAD_LETTER_HEADER).
    pub retried_dead_letter: bool,
}

impl StoredEvent {
    /// What the event weighs in a batch, in bytes: its payload and headers. Batches
    /// are bounded by it, so that large events do not pile up in memory.
    pub fn weight(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        (self.payload.as_ref().map_or(0, Vec::len) + headers) as u64
    }
}

/// The message and its causes, for `main() -> Result<(), Box<dyn Error>>`.
impl std::fmt::Debug for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::write_error_chain(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_events_get_distinct_time_ordered_ids() {
        let a = Event::new("order", "1", "OrderCreated", serde_json::json!({}));
        let b = Event::new("order", "1", "OrderCreated", serde_json::json!({}));
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.get_version_num(), 7);
        assert!(a.id < b.id, "v7 ids sort by creation time");
    }

    #[test]
    fn bytes_payload_must_be_json_for_a_jsonb_column() {
        let payload = Payload::Bytes(b"not json".to_vec());
        let err = payload.to_json().unwrap_err();
        assert!(err.to_string().contains("bytea"), "{err}");
        let ok = Payload::Bytes(br#"{"a":1}"#.to_vec()).to_json().unwrap();
        assert_eq!(ok, serde_json::json!({"a": 1}));
    }

    #[test]
    fn json_payload_serializes_compactly_for_a_bytea_column() {
        let payload = Payload::Json(serde_json::json!({"total": 12}));
        assert_eq!(payload.to_bytes(), br#"{"total":12}"#);
    }

    #[test]
    fn builder_sets_id_and_headers() {
        let id = Uuid::now_v7();
        let event = Event::json("order", "7", "OrderCreated", &serde_json::json!({"n": 1}))
            .unwrap()
            .with_id(id)
            .with_header("traceparent", "00-abc-def-01");
        assert_eq!(event.id, id);
        assert_eq!(event.headers["traceparent"], "00-abc-def-01");
    }
}
