//! The RabbitMQ sink while its broker is down: every message is unavailable (an outage
//! uses up no attempt), nothing waits longer than the confirm timeout, and the sink
//! connects again and publishes once the broker is back. Stops and starts the RabbitMQ
//! of `scripts/services`, so it has a test binary of its own.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox_core::{DeliveryOutcome, ErrorKind, Message, Sink};
use outbox_rabbitmq::{RabbitMqSettings, RabbitMqSink};
use uuid::Uuid;

fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/services");
    let status = Command::new(script).args(args).status().unwrap();
    assert!(status.success(), "scripts/services {args:?}");
}

fn settings(exchange: &str) -> RabbitMqSettings {
    let file = std::env::var("OUTBOX_RABBITMQ_PASSWORD_FILE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../.services/tls/rabbitmq-outbox.password"
        )
        .into()
    });
    let password = std::fs::read_to_string(&file).unwrap();
    let mut settings = RabbitMqSettings::new("127.0.0.1:5672", "outbox", password.trim(), exchange);
    settings.connect_timeout = Duration::from_secs(2);
    settings.confirm_timeout = Duration::from_secs(2);
    settings
}

fn message(n: usize) -> Message {
    Message {
        topic: "outbox.order".into(),
        key: b"a".to_vec(),
        value: Some(format!("{{\"n\":{n}}}").into_bytes()),
        headers: vec![("id".into(), Uuid::now_v7().to_string().into_bytes())],
    }
}

/// Publishes to an exchange without queues: delivered means confirmed (and returned
/// unroutable, which is retriable); what matters here is unavailable or not.
fn unavailable(outcome: &DeliveryOutcome) -> bool {
    matches!(outcome, DeliveryOutcome::Failed(err) if err.kind == ErrorKind::Unavailable)
}

#[tokio::test]
async fn an_outage_is_unavailable_and_the_sink_reconnects_when_the_broker_is_back() {
    services(&["start", "rabbitmq"]);
    let exchange = format!("x{}", Uuid::now_v7().simple());
    let sink = RabbitMqSink::connect(settings(&exchange)).await.unwrap();
    assert!(!unavailable(&sink.publish(vec![message(0)]).await[0]));

    services(&["stop", "rabbitmq"]);
    let started = Instant::now();
    let outcomes = sink.publish((1..4).map(message).collect()).await;
    let waited = started.elapsed();
    let checked = sink.check(Duration::from_secs(2)).await;
    services(&["start", "rabbitmq"]);
    assert!(outcomes.iter().all(unavailable), "{outcomes:?}");
    assert!(waited < Duration::from_secs(6), "waited {waited:?}");
    assert!(
        checked.is_err(),
        "the check passed while the broker was down"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcomes = sink.publish((1..4).map(message).collect()).await;
        if !outcomes.iter().any(unavailable) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still unavailable 60 s after the broker came back: {outcomes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sink.check(Duration::from_secs(5)).await.unwrap();
}
