//! Reading a JetStream stream back for `outbox verify`: every message up to the last
//! one at the time of reading, with its subject, stream sequence, id and aggregate id.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use outbox_core::{ObservedMessage, StreamRead};
use uuid::Uuid;

use crate::NatsSettings;

/// Why the stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot connect to NATS at {url}: {detail}; check sink.url and that the server runs")]
    Connect { url: String, detail: String },
    #[error("cannot read the JetStream stream {stream:?}: {detail}")]
    Read { stream: String, detail: String },
}

/// How long a fetch waits for messages before the reader counts the stream as read.
const FETCH_WAIT: Duration = Duration::from_secs(2);

/// Reads `stream` as of now (an ephemeral consumer, nothing acknowledged) and returns
/// every message whose `id` header `wanted` accepts.
pub async fn read_stream<F>(
    settings: &NatsSettings,
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
    let jetstream = jetstream::new(connect(settings).await?);
    let mut read = StreamRead::empty(stream);
    let mut handle = match jetstream.get_stream(stream).await {
        Ok(handle) => handle,
        Err(err) if err.to_string().contains("not found") => return Ok(read),
        Err(err) => return Err(read_error(err.to_string())),
    };
    read.exists = true;
    let state = handle
        .info()
        .await
        .map_err(|err| read_error(err.to_string()))?
        .state
        .clone();
    read.trimmed = state.first_sequence > 1;
    if state.messages == 0 {
        return Ok(read);
    }
    let reader = handle
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|err| read_error(err.to_string()))?;
    'fetching: loop {
        let mut batch = reader
            .fetch()
            .max_messages(1000)
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|err| read_error(err.to_string()))?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|err| read_error(err.to_string()))?;
            got += 1;
            let sequence = message
                .info()
                .map_err(|err| read_error(err.to_string()))?
                .stream_sequence;
            if sequence > state.last_sequence {
                break 'fetching;
            }
            read.messages += 1;
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            match header("id").and_then(|id| id.parse::<Uuid>().ok()) {
                Some(id) if wanted(&id) => read.observed.push(ObservedMessage {
                    topic: message.subject.to_string(),
                    partition: 0,
                    offset: sequence as i64,
                    id,
                    key: header("aggregateid").map(String::into_bytes),
                }),
                Some(_) => {}
                None => read.without_id += 1,
            }
            if sequence >= state.last_sequence {
                break 'fetching;
            }
        }
        if got == 0 {
            // Nothing more within the wait: the rest was deleted from the stream.
            break;
        }
    }
    Ok(read)
}

/// The streams that capture `subjects` (one lookup per subject).
pub async fn streams_of(
    settings: &NatsSettings,
    subjects: &[String],
) -> Result<std::collections::BTreeSet<String>, ReadError> {
    let jetstream = jetstream::new(connect(settings).await?);
    let mut streams = std::collections::BTreeSet::new();
    for subject in subjects {
        // A subject no stream captures has nothing to read: its rows count as unseen.
        if let Ok(name) = jetstream.stream_by_subject(subject.as_str()).await {
            streams.insert(name);
        }
    }
    Ok(streams)
}

async fn connect(settings: &NatsSettings) -> Result<async_nats::Client, ReadError> {
    settings
        .client()
        .await
        .map_err(|detail| ReadError::Connect {
            url: settings.shown_url(),
            detail,
        })
}
