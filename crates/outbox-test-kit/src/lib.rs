//! What the integration tests of the workspace share: a message as a test reads it back
//! from any sink's broker ([`Received`]), the readers ([`kafka`], [`TestSink`] for every
//! sink), a loopback proxy that turns into a black hole ([`FaultProxy`]), headless
//! Chromium for the status page ([`browser`]), and a client of
//! Toxiproxy's API ([`toxiproxy`]) for the chaos runs and the bench.
//!
//! Everything runs against the real services of `scripts/services`; the webhook
//! receiver is an HTTP server of the test's own.

use std::collections::HashMap;

use uuid::Uuid;

pub mod browser;
pub mod database;
pub mod kafka;
mod proxy;
pub mod replicated;
mod sinks;
pub mod toxiproxy;

pub use proxy::FaultProxy;
pub use sinks::{Poison, SinkKind, TestSink, FLAKY_FAILURES, WEBHOOK_FLAKY};

/// A message as a consumer saw it, whatever the broker.
#[derive(Debug, Clone)]
pub struct Received {
    /// The destination: Kafka topic, NATS subject, AMQP routing key, webhook URL.
    pub topic: String,
    /// Kafka's partition; 0 elsewhere.
    pub partition: i32,
    /// The position in the partition, stream or queue, or the order of arrival.
    pub offset: i64,
    /// The aggregate id (Kafka's key; the `aggregateid` header elsewhere).
    pub key: String,
    pub value: Option<Vec<u8>>,
    /// The last value of each header name.
    pub headers: HashMap<String, String>,
    /// Every header in the order the message carries them (names may repeat).
    pub header_list: Vec<(String, String)>,
}

impl Received {
    pub fn id(&self) -> Uuid {
        self.headers["id"].parse().expect("id header is a UUID")
    }

    fn new(
        topic: String,
        offset: i64,
        value: Option<Vec<u8>>,
        header_list: Vec<(String, String)>,
    ) -> Received {
        let headers: HashMap<String, String> = header_list.iter().cloned().collect();
        let key = headers.get("aggregateid").cloned().unwrap_or_default();
        Received {
            topic,
            partition: 0,
            offset,
            key,
            value,
            headers,
            header_list,
        }
    }
}
