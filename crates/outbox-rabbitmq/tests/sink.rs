//! The RabbitMQ sink against the real broker of `scripts/services`.

use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use outbox_core::{DeliveryOutcome, ErrorKind, Message, Sink};
use outbox_rabbitmq::{RabbitMqSettings, RabbitMqSink};
use uuid::Uuid;

fn settings(exchange: &str) -> RabbitMqSettings {
    let address =
        std::env::var("OUTBOX_RABBITMQ_ADDRESS").unwrap_or_else(|_| "127.0.0.1:5672".into());
    let user = std::env::var("OUTBOX_RABBITMQ_USER").unwrap_or_else(|_| "outbox".into());
    let file = std::env::var("OUTBOX_RABBITMQ_PASSWORD_FILE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../.services/tls/rabbitmq-outbox.password"
        )
        .into()
    });
    let password = std::fs::read_to_string(&file)
        .unwrap_or_else(|err| panic!("{file}: {err}; run scripts/services start rabbitmq"));
    RabbitMqSettings::new(address, user, password.trim(), exchange)
}

/// A channel of the test's own, and a durable queue bound to `exchange` for `key`.
async fn queue(exchange: &str, key: &str) -> (Connection, Channel, String) {
    let s = settings(exchange);
    let uri = format!(
        "amqp://{}:{}@{}/%2f",
        s.user,
        s.password.replace('%', "%25"),
        s.address
    );
    let connection = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let name = format!("q{}", Uuid::now_v7().simple());
    channel
        .queue_declare(
            &name,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            &name,
            exchange,
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (connection, channel, name)
}

fn message(routing_key: &str, key: &str, n: usize) -> (Uuid, Message) {
    let id = Uuid::now_v7();
    let message = Message {
        topic: routing_key.to_string(),
        key: key.as_bytes().to_vec(),
        value: Some(format!("{{\"n\":{n}}}").into_bytes()),
        headers: vec![
            ("id".into(), id.to_string().into_bytes()),
            ("type".into(), b"Changed".to_vec()),
            ("odd".into(), vec![0xff, b'\r', b'\n', 0]),
        ],
    };
    (id, message)
}

#[tokio::test]
async fn publishes_confirmed_persistent_messages_in_order_with_id_and_headers() {
    let exchange = format!("x{}", Uuid::now_v7().simple());
    let sink = RabbitMqSink::connect(settings(&exchange)).await.unwrap();
    sink.check(Duration::from_secs(5)).await.unwrap();
    let routing_key = "outbox.order";
    let (_connection, channel, queue) = queue(&exchange, routing_key).await;

    let batch: Vec<(Uuid, Message)> = (0..20)
        .map(|n| message(routing_key, if n % 2 == 0 { "a" } else { "b" }, n))
        .collect();
    let outcomes = sink
        .publish(batch.iter().map(|(_, m)| m.clone()).collect())
        .await;
    assert!(
        outcomes.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "{outcomes:?}"
    );

    let mut got: Vec<(String, String)> = Vec::new();
    while let Some(delivery) = channel
        .basic_get(&queue, BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let properties = &delivery.delivery.properties;
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        let headers = properties.headers().as_ref().unwrap().inner();
        let Some(AMQPValue::ByteArray(odd)) = headers.get("odd") else {
            panic!("the odd header is missing: {headers:?}");
        };
        assert_eq!(
            odd.as_slice(),
            &[0xff, b'\r', b'\n', 0],
            "bytes carried as they are"
        );
        let Some(AMQPValue::LongString(aggregate)) = headers.get("aggregateid") else {
            panic!("no aggregateid: {headers:?}");
        };
        got.push((
            String::from_utf8(aggregate.as_bytes().to_vec()).unwrap(),
            properties.message_id().as_ref().unwrap().to_string(),
        ));
    }
    assert_eq!(got.len(), 20);
    for key in ["a", "b"] {
        let sent: Vec<String> = batch
            .iter()
            .filter(|(_, m)| m.key == key.as_bytes())
            .map(|(id, _)| id.to_string())
            .collect();
        let landed: Vec<String> = got
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(landed, sent, "aggregate {key} in order");
    }
    channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_message_no_queue_takes_is_retried_and_holds_its_aggregate_back() {
    let exchange = format!("x{}", Uuid::now_v7().simple());
    let sink = RabbitMqSink::connect(settings(&exchange)).await.unwrap();
    let (_, first) = message("nobody.listens", "a", 0);
    let (_, second) = message("nobody.listens", "a", 1);
    let outcomes = sink.publish(vec![first, second]).await;
    let DeliveryOutcome::Failed(err) = &outcomes[0] else {
        panic!("an unroutable message counted as delivered: {outcomes:?}");
    };
    assert_eq!(err.kind, ErrorKind::Retriable);
    assert!(err.reason.contains("no queue is bound"), "{}", err.reason);
    let DeliveryOutcome::Failed(held) = &outcomes[1] else {
        panic!("the second overtook the first: {outcomes:?}");
    };
    assert!(held.reason.contains("held back"), "{}", held.reason);
}

#[tokio::test]
async fn a_wrong_password_is_refused_without_showing_it() {
    let mut wrong = settings("x");
    wrong.password = "not-the-password-4711".into();
    wrong.connect_timeout = Duration::from_secs(5);
    let err = RabbitMqSink::connect(wrong.clone())
        .await
        .err()
        .expect("refused");
    let text = format!("{err} {err:?} {wrong:?}");
    assert!(text.contains("cannot connect to RabbitMQ"), "{text}");
    assert!(!text.contains("4711"), "the password leaked: {text}");
}

/// `exchange` with `{aggregatetype}`: each message goes to the exchange of its
/// aggregate type (declared by the sink at its first message, idempotently); a type
/// that makes no valid exchange name is refused for good.
#[tokio::test]
async fn the_exchange_can_come_from_the_aggregate_type() {
    let prefix = format!("x{}", Uuid::now_v7().simple());
    let sink = RabbitMqSink::connect(settings(&format!("{prefix}.{{aggregatetype}}")))
        .await
        .unwrap();
    // The exchanges exist before the queues bind to them, declared as the sink does.
    let mut queues = Vec::new();
    for aggregate_type in ["order", "user"] {
        let exchange = format!("{prefix}.{aggregate_type}");
        let (connection, channel, _) = queue("amq.topic", "unused").await;
        channel
            .exchange_declare(
                &exchange,
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        drop((connection, channel));
        let (connection, channel, name) = queue(&exchange, "#").await;
        queues.push((aggregate_type, connection, channel, name));
    }
    let with_type = |aggregate_type: &str, n: usize| {
        let (id, mut message) = message("events", "a", n);
        message
            .headers
            .push(("aggregatetype".into(), aggregate_type.as_bytes().to_vec()));
        (id, message)
    };
    let batch = [
        with_type("order", 0),
        with_type("user", 1),
        with_type("order", 2),
    ];
    let outcomes = sink
        .publish(batch.iter().map(|(_, m)| m.clone()).collect())
        .await;
    assert!(
        outcomes.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "{outcomes:?}"
    );
    for (aggregate_type, _connection, channel, queue) in &queues {
        let mut ids = Vec::new();
        while let Some(delivery) = channel
            .basic_get(queue, BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let id = delivery.delivery.properties.message_id().as_ref().unwrap();
            ids.push(id.to_string());
        }
        let wanted: Vec<String> = batch
            .iter()
            .filter(|(_, m)| m.headers.last().unwrap().1 == aggregate_type.as_bytes())
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(ids, wanted, "the {aggregate_type} exchange's messages");
    }
    let outcomes = sink.publish(vec![with_type("my order", 3).1]).await;
    let DeliveryOutcome::Failed(err) = &outcomes[0] else {
        panic!("{outcomes:?}")
    };
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert!(
        err.reason.contains("not a valid AMQP exchange name"),
        "{}",
        err.reason
    );
    for (aggregate_type, _, channel, queue) in &queues {
        let _ = channel
            .queue_delete(queue, QueueDeleteOptions::default())
            .await;
        let _ = channel
            .exchange_delete(&format!("{prefix}.{aggregate_type}"), Default::default())
            .await;
    }
}
