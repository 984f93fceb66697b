//! Reading back what the sink's broker holds, for `outbox verify`: Kafka topics,
//! JetStream streams and RabbitMQ's audit stream (`sink.audit_stream`) can be read;
//! webhooks leave nothing behind, so those say why they cannot be audited.

use std::collections::{BTreeSet, HashSet};

use outbox_core::{AuditRow, ObservedMessage, Router, StreamRead};
use uuid::Uuid;

use crate::sinks::SinkSettings;
use crate::RelayError;

/// One place the audit read: a Kafka topic or a JetStream stream.
#[derive(Debug, Clone)]
pub struct PlaceRead {
    /// "topic" or "stream".
    pub kind: &'static str,
    pub name: String,
    /// False when the broker does not know it: all its rows are unseen.
    pub exists: bool,
    pub partitions: usize,
    /// Messages read, whether or not their id was wanted.
    pub messages: u64,
    /// Messages without a readable `id` header.
    pub without_id: u64,
    /// Its oldest messages are gone (retention, limits, a purge): older rows may be
    /// missing for that reason.
    pub trimmed: bool,
}

/// What the audit read from the broker.
#[derive(Debug)]
pub struct ReadBack {
    pub places: Vec<PlaceRead>,
    /// The messages whose id is one of the audited rows'.
    pub messages: Vec<ObservedMessage>,
}

impl ReadBack {
    /// Adds what was read from one stream (JetStream, RabbitMQ's audit stream).
    fn add_stream(&mut self, read: StreamRead) {
        self.places.push(PlaceRead {
            kind: "stream",
            name: read.stream,
            exists: read.exists,
            partitions: 1,
            messages: read.messages,
            without_id: read.without_id,
            trimmed: read.trimmed,
        });
        self.messages.extend(read.observed);
    }
}

/// Reads the destinations of `rows` back from `sink`.
pub async fn read_back(
    sink: &SinkSettings,
    router: &Router,
    rows: &[AuditRow],
) -> Result<ReadBack, RelayError> {
    let destinations: Vec<String> = outbox_core::audit_topics(rows, router)
        .into_iter()
        .collect();
    let ids: HashSet<Uuid> = rows.iter().map(|r| r.id).collect();
    match sink {
        SinkSettings::Kafka(kafka) => {
            let read = outbox_kafka::read_topics(kafka, destinations, move |id| ids.contains(id))
                .await
                .map_err(|err| match err {
                    outbox_kafka::ReadError::Connect(err) => RelayError::Config(err.to_string()),
                    other => RelayError::ReadBack(Box::new(other)),
                })?;
            let places = read
                .topics
                .into_iter()
                .map(|t| PlaceRead {
                    kind: "topic",
                    name: t.topic,
                    exists: t.exists,
                    partitions: t.partitions,
                    messages: t.messages,
                    without_id: t.without_id,
                    trimmed: t.trimmed,
                })
                .collect();
            Ok(ReadBack {
                places,
                messages: read.messages,
            })
        }
        SinkSettings::Nats(nats) => {
            let streams: BTreeSet<String> = match &nats.stream {
                Some(stream) => [stream.name.clone()].into(),
                None => outbox_nats::streams_of(nats, &destinations)
                    .await
                    .map_err(nats_error)?,
            };
            let mut read_back = ReadBack {
                places: Vec::new(),
                messages: Vec::new(),
            };
            for stream in streams {
                let read = outbox_nats::read_stream(nats, &stream, |id| ids.contains(id))
                    .await
                    .map_err(nats_error)?;
                read_back.add_stream(read);
            }
            Ok(read_back)
        }
        SinkSettings::RabbitMq(rabbitmq) => {
            let Some(stream) = &rabbitmq.audit_stream else {
                return Err(RelayError::Config(
                    "outbox verify cannot read the rabbitmq sink back without an audit stream: a RabbitMQ queue hands each message to one consumer and keeps none; set sink.audit_stream (a stream queue the relay binds to the exchange), or audit on the consumers' side".into(),
                ));
            };
            let read = outbox_rabbitmq::read_audit_stream(rabbitmq, stream, |id| ids.contains(id))
                .await
                .map_err(|err| match err {
                    outbox_rabbitmq::ReadError::Connect { .. } => {
                        RelayError::Config(err.to_string())
                    }
                    other => RelayError::ReadBack(Box::new(other)),
                })?;
            let mut read_back = ReadBack {
                places: Vec::new(),
                messages: Vec::new(),
            };
            read_back.add_stream(read);
            Ok(read_back)
        }
        SinkSettings::Webhook(_) => Err(RelayError::Config(
            "outbox verify cannot read the webhook sink back: a webhook leaves nothing to read; audit on the receivers' side (their inbox) instead".into(),
        )),
    }
}

fn nats_error(err: outbox_nats::ReadError) -> RelayError {
    match err {
        outbox_nats::ReadError::Connect { .. } => RelayError::Config(err.to_string()),
        other => RelayError::ReadBack(Box::new(other)),
    }
}
