//! The NATS sink while its server is down: every message is unavailable (an outage uses
//! up no attempt), nothing waits longer than the acknowledgement timeout, and the sink
//! publishes again once the server is back. Stops and starts the NATS of
//! `scripts/services`, so it has a test binary of its own.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox_core::{DeliveryOutcome, ErrorKind, Message, Sink};
use outbox_nats::{NatsSettings, NatsSink, StreamSettings};
use uuid::Uuid;

fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/services");
    let status = Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "scripts/services {args:?}");
}

fn message(subject: &str, n: usize) -> Message {
    Message {
        topic: subject.to_string(),
        key: b"a".to_vec(),
        value: Some(format!("{{\"n\":{n}}}").into_bytes()),
        headers: vec![("id".into(), Uuid::now_v7().to_string().into_bytes())],
    }
}

#[tokio::test]
async fn an_outage_is_unavailable_within_the_ack_timeout_and_publishing_resumes() {
    services(&["start", "nats"]);
    let url = std::env::var("OUTBOX_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("t{}", Uuid::now_v7().simple());
    let mut settings = NatsSettings::new(url);
    settings.ack_timeout = Duration::from_secs(1);
    settings.stream = Some(StreamSettings::new(
        prefix.to_uppercase(),
        vec![format!("{prefix}.>")],
    ));
    let sink = NatsSink::connect(settings).await.unwrap();
    let subject = format!("{prefix}.order");
    assert_eq!(
        sink.publish(vec![message(&subject, 0)]).await,
        vec![DeliveryOutcome::Delivered]
    );

    services(&["stop", "nats"]);
    let started = Instant::now();
    let outcomes = sink
        .publish((1..4).map(|n| message(&subject, n)).collect())
        .await;
    let waited = started.elapsed();
    let checked = sink.check(Duration::from_secs(1)).await;
    services(&["start", "nats"]);
    assert!(
        checked.is_err(),
        "the check passed while the server was down"
    );
    for outcome in &outcomes {
        let DeliveryOutcome::Failed(err) = outcome else {
            panic!("delivered while the server was down: {outcomes:?}");
        };
        assert_eq!(err.kind, ErrorKind::Unavailable, "{}", err.reason);
    }
    // The first waits out the timeout; the others are held back behind it.
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");

    // Back: the client reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outcomes = sink
            .publish((1..4).map(|n| message(&subject, n)).collect())
            .await;
        if outcomes.iter().all(|o| *o == DeliveryOutcome::Delivered) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not publishing 30 s after the server came back: {outcomes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sink.check(Duration::from_secs(5)).await.unwrap();
}
