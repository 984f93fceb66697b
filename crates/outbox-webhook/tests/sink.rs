//! The webhook sink against a real HTTP server on loopback (the receiver of these tests:
//! it records each request and answers as the test says).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use outbox_core::{DeliveryOutcome, ErrorKind, Message, Sink};
use outbox_webhook::{sign, WebhookSecret, WebhookSettings, WebhookSink};
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

/// What the receiver answers to a request whose body contains the key's text.
type Answers = HashMap<&'static str, (StatusCode, Duration)>;

#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    answers: Arc<Mutex<Answers>>,
}

impl Receiver {
    /// Serves on a free loopback port; returns its base URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn answer(&self, body_contains: &'static str, status: StatusCode, delay: Duration) {
        self.answers
            .lock()
            .unwrap()
            .insert(body_contains, (status, delay));
    }

    /// The POSTs answered 2xx (not the sink's HEAD check).
    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn handle(
    State(receiver): State<Receiver>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let answer = {
        let answers = receiver.answers.lock().unwrap();
        let text = String::from_utf8_lossy(&body);
        answers
            .iter()
            .find(|(needle, _)| text.contains(**needle))
            .map(|(_, answer)| *answer)
    };
    let (status, delay) = answer.unwrap_or((StatusCode::NO_CONTENT, Duration::ZERO));
    tokio::time::sleep(delay).await;
    if status.is_success() && method == axum::http::Method::POST {
        receiver.received.lock().unwrap().push(Received {
            path: uri.path().to_string(),
            headers,
            body,
        });
    }
    (status, "the receiver says no")
}

fn settings(base: &str) -> WebhookSettings {
    let mut settings = WebhookSettings::new(format!("{base}/hooks/{{aggregatetype}}"));
    settings.secret = Some(WebhookSecret::parse(SECRET).unwrap());
    settings.timeout = Duration::from_secs(2);
    settings
}

fn message(base: &str, aggregate: &str, text: &str) -> (Uuid, Message) {
    let id = Uuid::now_v7();
    let message = Message {
        topic: format!("{base}/hooks/order"),
        key: aggregate.as_bytes().to_vec(),
        value: Some(format!("{{\"text\":\"{text}\"}}").into_bytes()),
        headers: vec![
            ("id".into(), id.to_string().into_bytes()),
            ("type".into(), b"OrderCreated".to_vec()),
            ("aggregatetype".into(), b"order".to_vec()),
            ("odd".into(), vec![0xff, b'\r', b'\n', 0, b'%']),
        ],
    };
    (id, message)
}

fn kinds(outcomes: &[DeliveryOutcome]) -> Vec<Option<ErrorKind>> {
    outcomes
        .iter()
        .map(|o| match o {
            DeliveryOutcome::Delivered => None,
            DeliveryOutcome::Failed(err) => Some(err.kind),
        })
        .collect()
}

#[tokio::test]
async fn each_event_is_posted_signed_with_its_headers_in_aggregate_order() {
    let receiver = Receiver::default();
    let base = receiver.start().await;
    let sink = WebhookSink::new(settings(&base)).unwrap();
    sink.check(Duration::from_secs(5)).await.unwrap();
    let mut messages = Vec::new();
    for n in 0..60 {
        messages.push(message(&base, &format!("agg-{}", n % 3), &format!("n{n}")));
    }
    let ids: Vec<Uuid> = messages.iter().map(|(id, _)| *id).collect();
    let outcomes = sink
        .publish(messages.iter().map(|(_, m)| m.clone()).collect())
        .await;
    assert!(
        outcomes.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "{outcomes:?}"
    );

    let received = receiver.received();
    assert_eq!(received.len(), 60);
    let secret = WebhookSecret::parse(SECRET).unwrap();
    for request in &received {
        assert_eq!(request.path, "/hooks/order");
        assert_eq!(request.header("content-type"), "application/json");
        let id = request.header("webhook-id");
        let timestamp = request.header("webhook-timestamp");
        assert_eq!(
            request.header("webhook-signature"),
            sign(&secret, id, timestamp, &request.body),
            "the signature verifies"
        );
        assert_eq!(request.header("outbox-id"), id);
        assert_eq!(request.header("outbox-type"), "OrderCreated");
        assert_eq!(request.header("outbox-aggregatetype"), "order");
        assert_eq!(request.header("outbox-odd"), "%FF%0D%0A%00%25");
        let decoded: Vec<u8> =
            percent_encoding::percent_decode_str(request.header("outbox-odd")).collect();
        assert_eq!(decoded, [0xff, b'\r', b'\n', 0, b'%']);
    }
    // Per aggregate, the receiver saw the events in the order given.
    for aggregate in ["agg-0", "agg-1", "agg-2"] {
        let seen: Vec<&str> = received
            .iter()
            .filter(|r| r.header("outbox-aggregateid") == aggregate)
            .map(|r| r.header("webhook-id"))
            .collect();
        let wanted: Vec<String> = messages
            .iter()
            .filter(|(_, m)| m.key == aggregate.as_bytes())
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(seen, wanted, "order of {aggregate}");
    }
    assert_eq!(ids.len(), 60);
}

/// 4xx but 408 and 429 dead-letter at once; 408, 429, 502-504 wait for the receiver
/// without using an attempt; 500 and redirects use attempts. A failed event holds back
/// its aggregate's later events, never sent: with the same kind, or retriable behind a
/// dead letter (which may park its aggregate).
#[tokio::test]
async fn answers_decide_between_delivered_dead_letter_and_retry() {
    let receiver = Receiver::default();
    let base = receiver.start().await;
    let sink = WebhookSink::new(settings(&base)).unwrap();
    let cases = [
        (
            "bad-request",
            StatusCode::BAD_REQUEST,
            Some(ErrorKind::Permanent),
        ),
        ("gone", StatusCode::GONE, Some(ErrorKind::Permanent)),
        (
            "slow-down",
            StatusCode::TOO_MANY_REQUESTS,
            Some(ErrorKind::Unavailable),
        ),
        (
            "req-timeout",
            StatusCode::REQUEST_TIMEOUT,
            Some(ErrorKind::Unavailable),
        ),
        (
            "maintenance",
            StatusCode::SERVICE_UNAVAILABLE,
            Some(ErrorKind::Unavailable),
        ),
        (
            "crash",
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(ErrorKind::Retriable),
        ),
        ("moved", StatusCode::FOUND, Some(ErrorKind::Retriable)),
        ("fine", StatusCode::ACCEPTED, None),
    ];
    for (needle, status, _) in cases {
        receiver.answer(needle, status, Duration::ZERO);
    }
    let mut messages = Vec::new();
    let mut wanted = Vec::new();
    for (needle, _, kind) in cases {
        messages.push(message(&base, needle, needle).1);
        wanted.push(kind);
        // The same aggregate's next event: held back after any failure.
        messages.push(message(&base, needle, "next").1);
        wanted.push(match kind {
            Some(ErrorKind::Permanent) => Some(ErrorKind::Retriable),
            other => other,
        });
    }
    let outcomes = sink.publish(messages).await;
    assert_eq!(kinds(&outcomes), wanted, "{outcomes:?}");
    let DeliveryOutcome::Failed(err) = &outcomes[0] else {
        unreachable!()
    };
    assert!(err.reason.contains("400 Bad Request"), "{}", err.reason);
    assert!(
        err.reason.contains("the receiver says no"),
        "{}",
        err.reason
    );
    let sent_next = receiver
        .received()
        .iter()
        .filter(|r| r.body.as_ref() == br#"{"text":"next"}"#)
        .count();
    assert_eq!(
        sent_next, 1,
        "only the next event after a delivery went out"
    );
}

/// A receiver that takes longer than `timeout`, and one that does not listen at all, are
/// unavailable: retried without using an attempt.
#[tokio::test]
async fn a_silent_or_absent_receiver_is_unavailable() {
    let receiver = Receiver::default();
    let base = receiver.start().await;
    receiver.answer("hang", StatusCode::OK, Duration::from_secs(5));
    let sink = WebhookSink::new(settings(&base)).unwrap();
    let started = std::time::Instant::now();
    let outcomes = sink.publish(vec![message(&base, "a", "hang").1]).await;
    assert_eq!(kinds(&outcomes), [Some(ErrorKind::Unavailable)]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 2 s timeout applied"
    );

    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let sink = WebhookSink::new(settings(&closed)).unwrap();
    let outcomes = sink.publish(vec![message(&closed, "a", "x").1]).await;
    assert_eq!(kinds(&outcomes), [Some(ErrorKind::Unavailable)]);
    let err = sink.check(Duration::from_secs(2)).await.unwrap_err();
    assert!(err.to_string().contains("does not answer"), "{err}");
}

/// Batch mode: one URL's events go as JSON arrays of at most `batch_size`, in order,
/// signed; a 400 dead-letters its whole batch and the next batch still goes; a 503
/// holds the URL's later batches back without using an attempt.
#[tokio::test]
async fn batches_carry_the_events_in_order_and_share_their_answer() {
    let receiver = Receiver::default();
    let base = receiver.start().await;
    let mut settings = settings(&base);
    settings.batch_size = 25;
    let sink = WebhookSink::new(settings).unwrap();
    let mut messages = Vec::new();
    for n in 0..60 {
        messages.push(message(&base, &format!("agg-{}", n % 3), &format!("n{n}")).1);
    }
    let outcomes = sink.publish(messages.clone()).await;
    assert!(
        outcomes.iter().all(|o| *o == DeliveryOutcome::Delivered),
        "{outcomes:?}"
    );
    let received = receiver.received();
    assert_eq!(received.len(), 3, "60 events in batches of 25");
    let secret = WebhookSecret::parse(SECRET).unwrap();
    let mut ids = Vec::new();
    for request in &received {
        let id = request.header("webhook-id");
        assert!(id.starts_with("batch_"), "{id}");
        assert_eq!(
            request.header("webhook-signature"),
            sign(
                &secret,
                id,
                request.header("webhook-timestamp"),
                &request.body
            )
        );
        let events: Vec<serde_json::Value> = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(
            request.header("outbox-batch-size"),
            events.len().to_string()
        );
        for event in events {
            assert_eq!(event["headers"]["type"], "OrderCreated");
            assert_eq!(event["headers"]["odd"], "%FF%0D%0A%00%25");
            assert!(event["payload"]["text"].is_string(), "{event}");
            ids.push(event["id"].as_str().unwrap().to_string());
        }
    }
    let wanted: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8(m.headers[0].1.clone()).unwrap())
        .collect();
    assert_eq!(ids, wanted, "every event once, in order");

    // Batch 1 of 3 holds a poison (400), batch 2 is fine; then a 503 holds the rest.
    receiver.answer("poison-in-batch", StatusCode::BAD_REQUEST, Duration::ZERO);
    receiver.answer(
        "maintenance",
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::ZERO,
    );
    let mut messages = Vec::new();
    for n in 0..75 {
        let text = match n {
            3 => "poison-in-batch".to_string(),
            55 => "maintenance".to_string(),
            _ => format!("m{n}"),
        };
        messages.push(message(&base, &format!("agg-{}", n % 3), &text).1);
    }
    let outcomes = sink.publish(messages).await;
    let kinds = kinds(&outcomes);
    assert!(
        kinds[..25].iter().all(|k| *k == Some(ErrorKind::Permanent)),
        "{kinds:?}"
    );
    assert!(kinds[25..50].iter().all(|k| k.is_none()), "{kinds:?}");
    assert!(
        kinds[50..]
            .iter()
            .all(|k| *k == Some(ErrorKind::Unavailable)),
        "{kinds:?}"
    );
}
