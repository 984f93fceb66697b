//! The NATS sink against the real JetStream server of `scripts/services`.

use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use outbox_core::{DeliveryOutcome, ErrorKind, Message, Sink};
use outbox_nats::{NatsSettings, NatsSink, StreamSettings};
use uuid::Uuid;

fn url() -> String {
    std::env::var("OUTBOX_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A unique subject prefix and a stream capturing it.
fn fresh() -> (String, StreamSettings) {
    let prefix = format!("t{}", Uuid::now_v7().simple());
    let stream = StreamSettings::new(prefix.to_uppercase(), vec![format!("{prefix}.>")]);
    (prefix, stream)
}

fn message(subject: &str, key: &str, n: usize) -> (Uuid, Message) {
    let id = Uuid::now_v7();
    let message = Message {
        topic: subject.to_string(),
        key: key.as_bytes().to_vec(),
        value: Some(format!("{{\"n\":{n}}}").into_bytes()),
        headers: vec![
            ("id".into(), id.to_string().into_bytes()),
            ("type".into(), b"Changed".to_vec()),
            ("aggregatetype".into(), b"order".to_vec()),
        ],
    };
    (id, message)
}

async fn stream_messages(name: &str) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let client = async_nats::connect(url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(name).await.unwrap();
    let count = stream.info().await.unwrap().state.messages;
    let mut messages = Vec::new();
    for seq in 1..=count {
        messages.push(stream.get_raw_message(seq).await.unwrap());
    }
    messages
}

async fn delete_stream(name: &str) {
    let client = async_nats::connect(url()).await.unwrap();
    let _ = async_nats::jetstream::new(client).delete_stream(name).await;
}

#[tokio::test]
async fn publishes_in_order_with_headers_and_the_server_drops_resent_copies() {
    let (prefix, stream) = fresh();
    let mut settings = NatsSettings::new(url());
    settings.stream = Some(stream.clone());
    let sink = NatsSink::connect(settings).await.unwrap();
    sink.check(Duration::from_secs(5)).await.unwrap();

    let subject = format!("{prefix}.order");
    let batch: Vec<(Uuid, Message)> = (0..20)
        .map(|n| message(&subject, if n % 2 == 0 { "a" } else { "b" }, n))
        .collect();
    let messages: Vec<Message> = batch.iter().map(|(_, m)| m.clone()).collect();
    let outcomes = sink.publish(messages.clone()).await;
    assert!(
        outcomes.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "{outcomes:?}"
    );

    // Sent again, as a relay does after a lost acknowledgement: the stream's duplicate
    // window drops every copy, and the sink still reports them delivered.
    let again = sink.publish(messages).await;
    assert!(
        again.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "{again:?}"
    );

    let stored = stream_messages(&stream.name).await;
    assert_eq!(
        stored.len(),
        20,
        "resent copies must be dropped by Nats-Msg-Id"
    );
    for key in ["a", "b"] {
        let sent: Vec<String> = batch
            .iter()
            .filter(|(_, m)| m.key == key.as_bytes())
            .map(|(id, _)| id.to_string())
            .collect();
        let landed: Vec<String> = stored
            .iter()
            .filter(|m| m.headers.get("aggregateid").map(|v| v.as_str()) == Some(key))
            .map(|m| m.headers.get(NATS_MESSAGE_ID).unwrap().as_str().to_string())
            .collect();
        assert_eq!(landed, sent, "aggregate {key} in order, each id once");
    }
    let first = &stored[0];
    assert_eq!(first.subject.as_str(), subject);
    assert_eq!(first.headers.get("type").unwrap().as_str(), "Changed");
    assert_eq!(
        first.headers.get("aggregatetype").unwrap().as_str(),
        "order"
    );
    assert_eq!(
        first.headers.get("id").unwrap().as_str(),
        first.headers.get(NATS_MESSAGE_ID).unwrap().as_str()
    );
    delete_stream(&stream.name).await;
}

#[tokio::test]
async fn a_subject_no_stream_captures_is_retried_and_holds_its_aggregate_back() {
    let (prefix, _) = fresh();
    let sink = NatsSink::connect(NatsSettings::new(url())).await.unwrap();
    let subject = format!("{prefix}.order");
    let (_, first) = message(&subject, "a", 0);
    let (_, second) = message(&subject, "a", 1);
    let outcomes = sink.publish(vec![first, second]).await;
    let DeliveryOutcome::Failed(err) = &outcomes[0] else {
        panic!("published without a stream: {outcomes:?}");
    };
    assert_eq!(err.kind, ErrorKind::Retriable);
    assert!(err.reason.contains("no JetStream stream"), "{}", err.reason);
    let DeliveryOutcome::Failed(held) = &outcomes[1] else {
        panic!("the second overtook the first: {outcomes:?}");
    };
    assert!(held.reason.contains("held back"), "{}", held.reason);
}

#[tokio::test]
async fn an_invalid_subject_or_header_is_permanent_and_the_others_are_published() {
    let (prefix, stream) = fresh();
    let mut settings = NatsSettings::new(url());
    settings.stream = Some(stream.clone());
    let sink = NatsSink::connect(settings).await.unwrap();
    let good = format!("{prefix}.order");
    let (_, before) = message(&good, "a", 0);
    let (_, bad_subject) = message(&format!("{prefix}.or der"), "b", 0);
    let (_, mut bad_header) = message(&good, "c", 0);
    bad_header
        .headers
        .push(("note".into(), b"two\r\nlines".to_vec()));
    let (_, after) = message(&good, "a", 1);
    let outcomes = sink
        .publish(vec![before, bad_subject, bad_header, after])
        .await;
    assert_eq!(outcomes[0], DeliveryOutcome::Delivered);
    assert_eq!(outcomes[3], DeliveryOutcome::Delivered);
    for (index, what) in [(1, "valid NATS subject"), (2, "line breaks")] {
        let DeliveryOutcome::Failed(err) = &outcomes[index] else {
            panic!("{index} was published: {outcomes:?}");
        };
        assert_eq!(err.kind, ErrorKind::Permanent, "{}", err.reason);
        assert!(err.reason.contains(what), "{}", err.reason);
    }
    assert_eq!(stream_messages(&stream.name).await.len(), 2);
    delete_stream(&stream.name).await;
}

#[tokio::test]
async fn an_address_without_a_server_is_refused_with_the_fix() {
    // Nothing listens on port 1 of loopback.
    let mut settings = NatsSettings::new("nats://127.0.0.1:1");
    settings.connect_timeout = Duration::from_secs(2);
    let err = NatsSink::connect(settings).await.err().expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{text}"
    );
}
