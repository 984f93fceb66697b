//! The audit stream: a RabbitMQ stream queue bound to the sink's exchange for every
//! routing key, so that `outbox verify` can read back what was published (a classic
//! queue hands each message to one consumer and keeps none).

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Channel;
use outbox_core::{ObservedMessage, StreamRead};
use uuid::Uuid;

use crate::RabbitMqSettings;

/// Why the audit stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot connect to RabbitMQ at {address}: {detail}; check sink.address, the user and its password")]
    Connect { address: String, detail: String },
    #[error("cannot read the RabbitMQ stream {stream:?}: {detail}")]
    Read { stream: String, detail: String },
}

/// How long the reader waits for a next message before it counts the stream as read.
const IDLE: Duration = Duration::from_secs(2);
/// How long the end-finding consumer waits for the rest of the last chunk.
const LAST_CHUNK_WAIT: Duration = Duration::from_millis(500);

/// The queue arguments of an audit stream keeping messages for `max_age`.
pub(crate) fn stream_arguments(max_age: Duration) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("stream".into()),
    );
    // RabbitMQ's units: Y, M, D, h, m, s.
    arguments.insert(
        ShortString::from("x-max-age"),
        AMQPValue::LongString(format!("{}s", max_age.as_secs().max(1)).into()),
    );
    arguments
}

/// Reads the audit stream `stream` from its first offset up to its last message at the
/// time of reading, and returns every message whose `message_id` `wanted` accepts.
pub async fn read_audit_stream<F>(
    settings: &RabbitMqSettings,
    stream: &str,
    mut wanted: F,
) -> Result<StreamRead, ReadError>
where
    F: FnMut(&Uuid) -> bool,
{
    let read_error = |detail: String| ReadError::Read {
        stream: stream.to_string(),
        detail,
    };
    let (_connection, channel) =
        crate::connect(settings)
            .await
            .map_err(|detail| ReadError::Connect {
                address: settings.address.clone(),
                detail,
            })?;
    let mut read = StreamRead::empty(stream);
    let declared = channel
        .queue_declare(
            stream,
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {}
        // A passive declare of a missing queue closes the channel with 404.
        Err(err) if err.to_string().contains("NOT_FOUND") => return Ok(read),
        Err(err) => return Err(read_error(err.to_string())),
    }
    read.exists = true;
    // A stream's declare-ok counts no messages, so its end is found first: a consumer
    // from "last" gets the last chunk, whose highest offset is the last message now.
    let Some(end) = highest_offset(&channel, stream, "last")
        .await
        .map_err(read_error)?
    else {
        return Ok(read);
    };
    let mut deliveries = consume(&channel, stream, "first", "outbox-verify")
        .await
        .map_err(read_error)?;
    let mut first_offset = None;
    loop {
        let Ok(next) = tokio::time::timeout(IDLE, deliveries.next()).await else {
            // Nothing more within the wait: the rest was removed by the retention.
            break;
        };
        let Some(delivery) = next else { break };
        let delivery = delivery.map_err(|err| read_error(err.to_string()))?;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let offset = stream_offset(&headers).unwrap_or(read.messages as i64);
        if offset > end {
            break;
        }
        first_offset.get_or_insert(offset);
        read.messages += 1;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| id.as_str().parse::<Uuid>().ok());
        match id {
            Some(id) if wanted(&id) => {
                let key = match headers.inner().get("aggregateid") {
                    Some(AMQPValue::LongString(key)) => Some(key.as_bytes().to_vec()),
                    Some(AMQPValue::ByteArray(key)) => Some(key.as_slice().to_vec()),
                    _ => None,
                };
                read.observed.push(ObservedMessage {
                    topic: delivery.routing_key.to_string(),
                    partition: 0,
                    offset,
                    id,
                    key,
                });
            }
            Some(_) => {}
            None => read.without_id += 1,
        }
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|err| read_error(err.to_string()))?;
        if offset >= end {
            break;
        }
    }
    read.trimmed = first_offset.is_some_and(|offset| offset > 0);
    Ok(read)
}

/// A consumer of `stream` from `from` ("first", "last"), acknowledging as it goes.
async fn consume(
    channel: &Channel,
    stream: &str,
    from: &str,
    tag: &str,
) -> Result<lapin::Consumer, String> {
    // A stream consumer needs a prefetch limit.
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .map_err(|err| err.to_string())?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-stream-offset"),
        AMQPValue::LongString(from.into()),
    );
    channel
        .basic_consume(stream, tag, BasicConsumeOptions::default(), arguments)
        .await
        .map_err(|err| err.to_string())
}

/// The highest offset a consumer from `from` gets before the stream is quiet for
/// [`LAST_CHUNK_WAIT`]; `None` for an empty stream.
async fn highest_offset(
    channel: &Channel,
    stream: &str,
    from: &str,
) -> Result<Option<i64>, String> {
    let mut deliveries = consume(channel, stream, from, "outbox-verify-end").await?;
    let mut highest = None;
    while let Ok(Some(delivery)) = tokio::time::timeout(LAST_CHUNK_WAIT, deliveries.next()).await {
        let delivery = delivery.map_err(|err| err.to_string())?;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        if let Some(offset) = stream_offset(&headers) {
            highest = highest.max(Some(offset));
        }
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|err| err.to_string())?;
    }
    channel
        .basic_cancel("outbox-verify-end", Default::default())
        .await
        .map_err(|err| err.to_string())?;
    Ok(highest)
}

/// The `x-stream-offset` RabbitMQ sets on each message of a stream.
fn stream_offset(headers: &FieldTable) -> Option<i64> {
    match headers.inner().get("x-stream-offset") {
        Some(AMQPValue::LongLongInt(offset)) => Some(*offset),
        Some(AMQPValue::LongInt(offset)) => Some(i64::from(*offset)),
        _ => None,
    }
}
