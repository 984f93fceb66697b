//! Shared helpers of the inbox's integration tests. Every test gets its own database,
//! its own topics (4 partitions each) and its own consumer group, on the real
//! PostgreSQL and Kafka that `scripts/services start` runs.
//!
//! OUTBOX_DATABASE_URL (an admin URL; default postgres://postgres@127.0.0.1:5432/postgres)
//! and OUTBOX_KAFKA_BROKERS (default 127.0.0.1:9092) point the tests elsewhere.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use outbox_inbox::{
    handler_fn, Handler, HandlerError, Inbox, InboxBuilder, InboxError, InboxStats,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PARTITIONS: i32 = 4;

#[allow(unused_imports)] // each test binary uses some of them
pub use outbox_test_kit::database::admin_url;
pub use outbox_test_kit::kafka::brokers;

/// RUST_LOG=outbox_inbox=debug shows the inbox's log in a failing test's output.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A database, a topic and its dead-letter topic, and a group id of this test's own.
pub struct TestEnv {
    pub db_name: String,
    pub url: String,
    pub pool: PgPool,
    pub topic: String,
    pub dead_letter_topic: String,
    pub group: String,
}

impl TestEnv {
    /// Creates the database (with the inbox table and the `business` table the test
    /// handlers write to) and the topics.
    pub async fn new() -> TestEnv {
        init_logging();
        let suffix = Uuid::new_v4().simple().to_string();
        let fresh =
            outbox_test_kit::database::create(&format!("inbox_test_{}", &suffix[..16])).await;
        let (db_name, url, pool) = (fresh.name, fresh.url, fresh.pool);
        let mut conn = pool.acquire().await.unwrap();
        outbox_inbox::migrate(&mut conn, &outbox_inbox::default_table())
            .await
            .unwrap();
        // No unique constraint: applying an event twice shows as two rows.
        sqlx::query(
            "CREATE TABLE business (
                 n bigserial,
                 event_id uuid NOT NULL,
                 aggregate text NOT NULL,
                 seq int NOT NULL
             )",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        drop(conn);

        let topic = format!("inbox-test-{}", &suffix[..12]);
        let dead_letter_topic = format!("{topic}.dlq");
        create_topics(&[&topic, &dead_letter_topic]).await;
        TestEnv {
            db_name,
            url,
            pool,
            topic,
            dead_letter_topic,
            group: format!("inbox-test-{}", &suffix[..12]),
        }
    }

    /// An inbox on this test's topic and group, committing offsets often.
    pub fn builder(&self, consumer: &str) -> InboxBuilder {
        Inbox::builder(self.pool.clone(), brokers(), &self.group, consumer)
            .topics([self.topic.clone()])
            .commit_interval(Duration::from_millis(200))
            .backoff(Duration::from_millis(20), Duration::from_millis(100))
            // Leave the group quickly if a test process dies.
            .consumer_property("session.timeout.ms", "10000")
    }

    pub async fn produce(&self, messages: &[TestMessage]) {
        produce(&self.topic, messages).await;
    }

    pub async fn business_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM business")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn business_distinct(&self) -> i64 {
        sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM business")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// (aggregate, seq) of every business row, in the order they were inserted.
    pub async fn business_rows(&self) -> Vec<(String, i32)> {
        sqlx::query_as("SELECT aggregate, seq FROM business ORDER BY n")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    pub async fn inbox_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox_inbox")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn inbox_status(&self, id: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM outbox_inbox WHERE event_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    /// Drops the database and the topics.
    pub async fn cleanup(self) {
        self.pool.close().await;
        outbox_test_kit::database::drop(&self.db_name).await;
        delete_topics(&[&self.topic, &self.dead_letter_topic]).await;
    }
}

fn admin_client() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

pub async fn create_topics(names: &[&str]) {
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin_client()
        .create_topics(&topics, &options)
        .await
        .expect("cannot reach Kafka; start it with scripts/services start");
    for result in results {
        result.expect("topic created");
    }
}

pub async fn delete_topics(names: &[&str]) {
    let _ = admin_client()
        .delete_topics(names, &AdminOptions::new())
        .await;
}

/// A message the tests produce: payload `{"seq": n}`, key the aggregate.
#[derive(Debug, Clone)]
pub struct TestMessage {
    /// The `id` header, as raw text (None: no header).
    pub id_header: Option<String>,
    pub key: String,
    pub seq: i32,
    /// Produce to this partition instead of the key's.
    pub partition: Option<i32>,
}

impl TestMessage {
    pub fn new(key: &str, seq: i32) -> TestMessage {
        TestMessage {
            id_header: Some(Uuid::new_v4().to_string()),
            key: key.to_string(),
            seq,
            partition: None,
        }
    }

    pub fn id(&self) -> Uuid {
        self.id_header
            .as_deref()
            .and_then(|id| id.parse().ok())
            .expect("message with a valid id")
    }

    pub fn payload(&self) -> Vec<u8> {
        format!("{{\"seq\": {}}}", self.seq).into_bytes()
    }
}

/// Produces `messages` in order (one aggregate's messages keep it: idempotent producer,
/// all sends queued before any is awaited).
pub async fn produce(topic: &str, messages: &[TestMessage]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut deliveries = Vec::with_capacity(messages.len());
    for message in messages {
        let payload = message.payload();
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "type",
            value: Some("TestEvent"),
        });
        if let Some(id) = &message.id_header {
            headers = headers.insert(Header {
                key: "id",
                value: Some(id.as_str()),
            });
        }
        let mut record = FutureRecord::to(topic)
            .key(&message.key)
            .payload(&payload)
            .headers(headers);
        if let Some(partition) = message.partition {
            record = record.partition(partition);
        }
        deliveries.push(producer.send_result(record).expect("queued"));
    }
    for delivery in deliveries {
        delivery
            .await
            .expect("delivery reported")
            .expect("message delivered");
    }
}

#[derive(Deserialize)]
struct Payload {
    seq: i32,
}

/// Writes one `business` row per message, in the handler's transaction.
pub async fn apply(
    tx: &mut PgConnection,
    message: &outbox_inbox::InboxMessage,
) -> Result<(), HandlerError> {
    let payload: Payload = message.payload_json()?;
    sqlx::query("INSERT INTO business (event_id, aggregate, seq) VALUES ($1, $2, $3)")
        .bind(message.id())
        .bind(message.key_str().unwrap_or_default())
        .bind(payload.seq)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// A handler that only applies the message, after sleeping `delay`.
pub fn business_handler(delay: Duration) -> impl Handler {
    handler_fn(move |tx, message| {
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            apply(tx, message).await
        })
    })
}

/// An inbox running in this process.
pub struct Running {
    pub stats: InboxStats,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), InboxError>>,
}

impl Running {
    pub fn start(inbox: Inbox, handler: impl Handler) -> Running {
        let stats = inbox.stats();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(inbox.run(handler, shutdown.clone()));
        Running {
            stats,
            shutdown,
            handle,
        }
    }

    /// Cancels and waits for a clean stop (at most 60 s).
    pub async fn stop(self) -> InboxStats {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the inbox stops within 60 s")
            .expect("the inbox task does not panic")
            .expect("the inbox stops cleanly");
        self.stats
    }
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads `topic` from the beginning until `count` messages arrived, then `linger`
/// longer to see whether more come, at most `timeout` in all.
pub async fn read_topic(
    topic: &str,
    count: usize,
    linger: Duration,
    timeout: Duration,
) -> Vec<Received> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", format!("reader-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            assignment
                .add_partition_offset(&topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + timeout;
        let mut stop_at = deadline;
        let mut received = Vec::new();
        while Instant::now() < stop_at {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                let mut headers = HashMap::new();
                if let Some(h) = message.headers() {
                    for header in h.iter() {
                        headers.insert(
                            header.key.to_string(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                received.push(Received {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: message.payload().map(<[u8]>::to_vec),
                    headers,
                });
                if received.len() == count {
                    stop_at = (Instant::now() + linger).min(deadline);
                }
            }
        }
        received
    })
    .await
    .unwrap()
}

/// Sets topic-level configuration (such as `retention.ms`) through the admin API.
pub async fn set_topic_config(topic: &str, entries: &[(&str, &str)]) {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (key, value) in entries {
        config = config.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin_client()
        .alter_configs(&[config], &options)
        .await
        .expect("cannot reach Kafka");
    for result in results {
        result.expect("topic configuration changed");
    }
}

/// Creates one topic; false when the broker refuses (for example while a deleted topic
/// of that name is still being removed).
pub async fn try_create_topic(name: &str) -> bool {
    let topic = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    match admin_client().create_topics(&[topic], &options).await {
        Ok(results) => results.iter().all(Result::is_ok),
        Err(_) => false,
    }
}
