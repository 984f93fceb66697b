use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use uuid::Uuid;

use crate::{kafka, FaultProxy, Received};

/// The sinks the conformance suite runs for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Kafka,
    Nats,
    RabbitMq,
    Webhook,
    /// Webhooks with `batch_size = 10`: JSON arrays of events.
    WebhookBatches,
}

/// An event the sink refuses for good: written with this aggregate type and payload, it
/// must be dead-lettered at its first attempt with `reason` in its `last_error`.
#[derive(Debug, Clone)]
pub struct Poison {
    pub aggregate_type: String,
    pub payload: String,
    /// Headers the event carries.
    pub headers: Vec<(String, String)>,
    pub reason: &'static str,
}

/// Text in a payload that makes the test's webhook receiver answer 400.
const WEBHOOK_POISON: &str = "poison-pill";
/// Text in a payload that makes the test's webhook receiver answer 500 to the first
/// [`FLAKY_FAILURES`] requests that carry it.
pub const WEBHOOK_FLAKY: &str = "flaky-pill";
pub const FLAKY_FAILURES: usize = 3;

/// One test's destinations on one sink's broker, and reading back what reached them.
///
/// Reads are cumulative: each returns everything that reached the test's destinations
/// since the start, in the order the broker holds it.
pub struct TestSink {
    pub kind: SinkKind,
    prefix: String,
    proxy: Option<FaultProxy>,
    /// NATS: messages read so far (the stream is read by sequence number).
    /// RabbitMQ: messages taken from the queue so far.
    /// Webhook: the requests the receiver answered 2xx.
    seen: Arc<Mutex<Vec<Received>>>,
    webhook_base: Option<String>,
    /// Webhook: the 500s the receiver answered to flaky events.
    flaky_answers: Arc<AtomicUsize>,
    /// The relay's acknowledgement (or request) timeout for this sink.
    pub timeout: Duration,
    /// More keys for the relay's `[sink]` section (not for Kafka).
    pub sink_keys: String,
}

impl TestSink {
    /// Destinations named after `prefix` (lower-case letters and digits, unique per
    /// test). RabbitMQ: the exchange and a queue bound to everything exist before the
    /// relay starts. Webhook: a receiver of the test's own listens on loopback.
    pub async fn start(kind: SinkKind, prefix: &str) -> TestSink {
        TestSink::create(kind, prefix, false).await
    }

    /// The same, ready for [`TestSink::begin_outage`], with a 2 s timeout: the relay
    /// reaches the broker (or receiver) through a [`FaultProxy`]. Kafka's clients
    /// connect to the address the broker advertises, not the one they were given, so
    /// Kafka's outage stops the broker of `scripts/services` instead: a test binary with
    /// a Kafka outage must keep its other Kafka tests apart.
    pub async fn for_outages(kind: SinkKind, prefix: &str) -> TestSink {
        let mut sink = TestSink::create(kind, prefix, kind != SinkKind::Kafka).await;
        sink.timeout = Duration::from_secs(2);
        sink
    }

    /// The broker becomes unreachable: the proxy turns into a black hole (Kafka: the
    /// broker stops).
    pub async fn begin_outage(&self) {
        match &self.proxy {
            Some(proxy) => proxy.vanish(),
            None => services(&["stop", "kafka"]).await,
        }
    }

    /// The broker is reachable again.
    pub async fn end_outage(&self) {
        match &self.proxy {
            Some(proxy) => proxy.restore(),
            None => services(&["start", "kafka"]).await,
        }
    }

    async fn create(kind: SinkKind, prefix: &str, proxied: bool) -> TestSink {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut webhook_base = None;
        let flaky_answers = Arc::new(AtomicUsize::new(0));
        let upstream = match kind {
            SinkKind::Kafka => None,
            SinkKind::Nats => Some(host_port(&nats_url())),
            SinkKind::RabbitMq => {
                declare_rabbitmq(prefix).await;
                Some(rabbitmq_address())
            }
            SinkKind::Webhook | SinkKind::WebhookBatches => {
                let address = start_receiver(seen.clone(), flaky_answers.clone()).await;
                webhook_base = Some(format!("http://{address}"));
                Some(address)
            }
        };
        let proxy = match (proxied, upstream) {
            (true, Some(upstream)) => Some(FaultProxy::start(upstream.parse().unwrap()).await),
            _ => None,
        };
        TestSink {
            kind,
            prefix: prefix.to_string(),
            proxy,
            seen,
            webhook_base,
            flaky_answers,
            timeout: Duration::from_secs(5),
            sink_keys: String::new(),
        }
    }

    /// Webhook: how many requests of flaky events the receiver has refused (500) so far.
    pub fn flaky_failures_answered(&self) -> usize {
        self.flaky_answers
            .load(Ordering::SeqCst)
            .min(FLAKY_FAILURES)
    }

    /// The proxy between the relay and the broker (see [`TestSink::behind_proxy`]).
    pub fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("started behind_proxy")
    }

    /// The routing template of the test's destinations.
    pub fn template(&self) -> String {
        match self.kind {
            SinkKind::Webhook | SinkKind::WebhookBatches => format!(
                "{}/{}/{{aggregatetype}}",
                self.webhook_base.as_ref().unwrap(),
                self.prefix
            ),
            _ => format!("{}.{{aggregatetype}}", self.prefix),
        }
    }

    /// Where events of `aggregate_type` go.
    pub fn destination(&self, aggregate_type: &str) -> String {
        self.template().replace("{aggregatetype}", aggregate_type)
    }

    /// The address the relay connects to: the proxy's, or the broker's.
    fn relay_address(&self, direct: String) -> String {
        match &self.proxy {
            Some(proxy) => proxy.address(),
            None => direct,
        }
    }

    /// The relay's settings for this sink: the `[sink]` section, with [`TestSink::timeout`]
    /// as its acknowledgement (or request) timeout. For Kafka only `[kafka]`'s message
    /// timeout: its brokers and topic template are set apart (`kafka_brokers`,
    /// `[topics]`).
    pub fn sink_toml(&self) -> String {
        let timeout = format!("{}ms", self.timeout.as_millis());
        let toml = match self.kind {
            SinkKind::Kafka => format!("[kafka]\nmessage_timeout = {timeout:?}\n"),
            SinkKind::Nats => format!(
                "[sink]\ntype = \"nats\"\nurl = \"nats://{}\"\nsubject = {:?}\nstream = {:?}\nack_timeout = {timeout:?}\nconnect_timeout = \"2s\"\n",
                self.relay_address(host_port(&nats_url())),
                self.template(),
                self.stream_name(),
            ),
            SinkKind::RabbitMq => format!(
                "[sink]\ntype = \"rabbitmq\"\naddress = {:?}\nuser = {:?}\npassword = {{ file = {:?} }}\nexchange = {:?}\nrouting_key = {:?}\nconfirm_timeout = {timeout:?}\nconnect_timeout = \"2s\"\n",
                self.relay_address(rabbitmq_address()),
                rabbitmq_user(),
                rabbitmq_password_file(),
                self.prefix,
                self.template(),
            ),
            SinkKind::Webhook | SinkKind::WebhookBatches => {
                let mut template = self.template();
                if let Some(proxy) = &self.proxy {
                    let direct = self.webhook_base.as_ref().unwrap();
                    template = template.replace(direct, &format!("http://{}", proxy.address()));
                }
                let batch = match self.kind {
                    SinkKind::WebhookBatches => "batch_size = 10\n",
                    _ => "",
                };
                format!(
                    "[sink]\ntype = \"webhook\"\nurl = {template:?}\ntimeout = {timeout:?}\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n{batch}"
                )
            }
        };
        format!("{toml}{}", self.sink_keys)
    }

    fn stream_name(&self) -> String {
        self.prefix.to_uppercase()
    }

    /// An event this sink refuses for good.
    pub fn poison(&self) -> Poison {
        let huge = || format!("{{\"blob\": \"{}\"}}", "x".repeat(1_500_000));
        match self.kind {
            SinkKind::Kafka => Poison {
                aggregate_type: "order".into(),
                payload: huge(),
                headers: Vec::new(),
                reason: "too large",
            },
            SinkKind::Nats => Poison {
                aggregate_type: "order".into(),
                payload: huge(),
                headers: Vec::new(),
                reason: "max_payload",
            },
            SinkKind::RabbitMq => Poison {
                aggregate_type: "order".into(),
                payload: "{\"n\": 1}".into(),
                headers: vec![("h".repeat(300), "x".into())],
                reason: "at most 255 bytes",
            },
            // A 400 answers for the whole batch: the poison gets a URL of its own.
            SinkKind::WebhookBatches => Poison {
                aggregate_type: "poison".into(),
                payload: format!("{{\"{WEBHOOK_POISON}\": true}}"),
                headers: Vec::new(),
                reason: "400 Bad Request",
            },
            SinkKind::Webhook => Poison {
                aggregate_type: "order".into(),
                payload: format!("{{\"{WEBHOOK_POISON}\": true}}"),
                headers: Vec::new(),
                reason: "400 Bad Request",
            },
        }
    }

    /// An aggregate type whose destination the sink's rule refuses, and the words of
    /// the refusal.
    pub fn illegal_aggregate_type(&self) -> (String, &'static str) {
        match self.kind {
            SinkKind::Kafka => ("my order!".into(), "not a legal Kafka topic name"),
            SinkKind::Nats => ("my order".into(), "not a valid NATS subject"),
            SinkKind::RabbitMq => ("o".repeat(300), "longer than 255 bytes"),
            SinkKind::Webhook | SinkKind::WebhookBatches => {
                ("my order".into(), "is not a valid URL")
            }
        }
    }

    /// Reads until every id in `ids` has arrived; fails the test if some never do within
    /// `timeout`.
    pub async fn read_ids(
        &self,
        aggregate_types: &[&str],
        ids: &[Uuid],
        timeout: Duration,
    ) -> Vec<Received> {
        let received = self
            .read_ids_or_partial(aggregate_types, ids, timeout)
            .await;
        let seen: std::collections::HashSet<Uuid> = received.iter().map(Received::id).collect();
        let missing = ids.iter().filter(|id| !seen.contains(id)).count();
        assert!(
            missing == 0,
            "{missing} of {} events never reached the {:?} sink within {timeout:?}",
            ids.len(),
            self.kind
        );
        received
    }

    /// Reads until every id in `ids` has arrived or `timeout` passes; returns everything
    /// that arrived at the destinations of `aggregate_types` (Kafka reads only those
    /// topics; the other sinks have all the test's destinations in one place).
    pub async fn read_ids_or_partial(
        &self,
        aggregate_types: &[&str],
        ids: &[Uuid],
        timeout: Duration,
    ) -> Vec<Received> {
        if self.kind == SinkKind::Kafka {
            let topics = aggregate_types
                .iter()
                .map(|t| self.destination(t))
                .collect();
            return kafka::consume_ids_or_partial(topics, ids, timeout).await;
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.fetch().await;
            let seen = self.seen.lock().unwrap().clone();
            let ids_seen: std::collections::HashSet<Uuid> = seen.iter().map(Received::id).collect();
            if ids.iter().all(|id| ids_seen.contains(id)) || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything that arrived within `wait` (for checks that something never arrives).
    pub async fn read_for(&self, aggregate_types: &[&str], wait: Duration) -> Vec<Received> {
        let never = [Uuid::nil()];
        self.read_ids_or_partial(aggregate_types, &never, wait)
            .await
    }

    /// Takes what the broker holds beyond what was read already.
    async fn fetch(&self) {
        match self.kind {
            SinkKind::Kafka | SinkKind::Webhook | SinkKind::WebhookBatches => {}
            SinkKind::Nats => {
                let client = async_nats::connect(nats_url()).await.unwrap();
                let jetstream = async_nats::jetstream::new(client);
                // The relay creates the stream at start.
                let Ok(stream) = jetstream.get_stream(self.stream_name()).await else {
                    return;
                };
                let mut seen = self.seen.lock().unwrap().len() as u64;
                while let Ok(message) = stream.get_raw_message(seen + 1).await {
                    seen += 1;
                    let mut headers = Vec::new();
                    for (name, values) in message.headers.iter() {
                        for value in values {
                            headers.push((name.to_string(), value.to_string()));
                        }
                    }
                    self.seen.lock().unwrap().push(Received::new(
                        message.subject.to_string(),
                        message.sequence as i64,
                        Some(message.payload.to_vec()),
                        headers,
                    ));
                }
            }
            SinkKind::RabbitMq => {
                let (_connection, channel) = rabbitmq_channel().await;
                while let Some(message) = channel
                    .basic_get(&self.prefix, BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                {
                    let mut headers = Vec::new();
                    if let Some(table) = message.delivery.properties.headers() {
                        for (name, value) in table.inner() {
                            let text = match value {
                                AMQPValue::ByteArray(bytes) => {
                                    String::from_utf8_lossy(bytes.as_slice()).into_owned()
                                }
                                AMQPValue::LongString(text) => {
                                    String::from_utf8_lossy(text.as_bytes()).into_owned()
                                }
                                other => format!("{other:?}"),
                            };
                            headers.push((name.to_string(), text));
                        }
                    }
                    let mut seen = self.seen.lock().unwrap();
                    let offset = seen.len() as i64;
                    seen.push(Received::new(
                        message.delivery.routing_key.to_string(),
                        offset,
                        Some(message.delivery.data.clone()),
                        headers,
                    ));
                }
            }
        }
    }

    /// Deletes the message of event `id` from the broker, as a loss would (NATS only:
    /// the other brokers keep nothing to delete from).
    pub async fn delete_message(&self, id: Uuid) {
        assert_eq!(
            self.kind,
            SinkKind::Nats,
            "only a JetStream stream keeps messages to delete"
        );
        self.fetch().await;
        let sequence = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.id() == id)
            .map(|r| r.offset as u64)
            .expect("the message was delivered");
        let client = async_nats::connect(nats_url()).await.unwrap();
        let stream = async_nats::jetstream::new(client)
            .get_stream(self.stream_name())
            .await
            .unwrap();
        stream.delete_message(sequence).await.unwrap();
    }

    /// Removes what the test created on the broker.
    pub async fn clean_up(self) {
        match self.kind {
            SinkKind::Kafka | SinkKind::Webhook | SinkKind::WebhookBatches => {}
            SinkKind::Nats => {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(self.stream_name())
                        .await;
                }
            }
            SinkKind::RabbitMq => {
                let (_connection, channel) = rabbitmq_channel().await;
                for queue in [self.prefix.clone(), format!("{}.audit", self.prefix)] {
                    let _ = channel
                        .queue_delete(&queue, QueueDeleteOptions::default())
                        .await;
                }
                let _ = channel
                    .exchange_delete(&self.prefix, ExchangeDeleteOptions::default())
                    .await;
            }
        }
    }
}

/// Runs `scripts/services` (for Kafka's outages).
async fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/services");
    let status = tokio::process::Command::new(script)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "scripts/services {args:?}");
}

fn nats_url() -> String {
    std::env::var("OUTBOX_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn host_port(url: &str) -> String {
    url.split("://").last().unwrap_or(url).to_string()
}

fn rabbitmq_address() -> String {
    std::env::var("OUTBOX_RABBITMQ_ADDRESS").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

fn rabbitmq_user() -> String {
    std::env::var("OUTBOX_RABBITMQ_USER").unwrap_or_else(|_| "outbox".into())
}

fn rabbitmq_password_file() -> String {
    std::env::var("OUTBOX_RABBITMQ_PASSWORD_FILE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../.services/tls/rabbitmq-outbox.password"
        )
        .into()
    })
}

async fn rabbitmq_channel() -> (Connection, Channel) {
    let file = rabbitmq_password_file();
    let password = std::fs::read_to_string(&file)
        .unwrap_or_else(|err| panic!("{file}: {err}; run scripts/services start rabbitmq"));
    let encoded: String =
        percent_encoding::utf8_percent_encode(password.trim(), percent_encoding::NON_ALPHANUMERIC)
            .collect();
    let uri = format!(
        "amqp://{}:{encoded}@{}/%2f",
        rabbitmq_user(),
        rabbitmq_address()
    );
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connection = Connection::connect(&uri, properties)
        .await
        .expect("cannot reach RabbitMQ; start it with scripts/services start rabbitmq");
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// The exchange the relay publishes to (declared as the relay declares it) and a durable
/// queue bound to all of it.
async fn declare_rabbitmq(prefix: &str) {
    let (_connection, channel) = rabbitmq_channel().await;
    channel
        .exchange_declare(
            prefix,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            prefix,
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
            prefix,
            prefix,
            "#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Serves the webhook receiver on a free loopback port; returns `127.0.0.1:<port>`.
async fn start_receiver(
    seen: Arc<Mutex<Vec<Received>>>,
    flaky_answers: Arc<AtomicUsize>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new().fallback(receive).with_state(Receiver {
        seen,
        address: address.clone(),
        flaky_answers,
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

#[derive(Clone)]
struct Receiver {
    seen: Arc<Mutex<Vec<Received>>>,
    address: String,
    /// 500s answered to flaky requests so far.
    flaky_answers: Arc<AtomicUsize>,
}

/// Records a POST (its `outbox-*` headers decoded back to the message's headers) and
/// answers 204; 400 to a poison; 500 to the first [`FLAKY_FAILURES`] flaky requests.
async fn receive(
    State(Receiver {
        seen,
        address,
        flaky_answers,
    }): State<Receiver>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if method != Method::POST {
        return StatusCode::OK;
    }
    let text = String::from_utf8_lossy(&body);
    if text.contains(WEBHOOK_POISON) {
        return StatusCode::BAD_REQUEST;
    }
    if text.contains(WEBHOOK_FLAKY) && flaky_answers.fetch_add(1, Ordering::SeqCst) < FLAKY_FAILURES
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let url = format!("http://{address}{}", uri.path());
    let mut seen = seen.lock().unwrap();
    if headers.contains_key("outbox-batch-size") {
        // A batch: one JSON object per event, its headers encoded as in the single mode.
        let events: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        for event in events {
            let mut header_list: Vec<(String, String)> = event["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(name, value)| (name.clone(), decode(value.as_str().unwrap())))
                .collect();
            header_list.push((
                "aggregateid".into(),
                event["aggregateid"].as_str().unwrap().to_string(),
            ));
            let value = match event.get("payload_base64").and_then(|v| v.as_str()) {
                Some(encoded) => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .unwrap()
                }
                None => serde_json::to_vec(&event["payload"]).unwrap(),
            };
            let offset = seen.len() as i64;
            seen.push(Received::new(url.clone(), offset, Some(value), header_list));
        }
        return StatusCode::NO_CONTENT;
    }
    let mut header_list = Vec::new();
    for (name, value) in &headers {
        if let Some(name) = name.as_str().strip_prefix("outbox-") {
            header_list.push((decode(name), decode(value.to_str().unwrap_or_default())));
        }
    }
    let offset = seen.len() as i64;
    seen.push(Received::new(url, offset, Some(body.to_vec()), header_list));
    StatusCode::NO_CONTENT
}
