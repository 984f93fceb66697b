//! Both databases, their tables and the topics, created afresh.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use sqlx::{Connection, PgConnection};

use crate::consumers::Service;

pub struct Databases {
    pub writers: String,
    pub consumers: String,
}

/// Where Kafka is, and its librdkafka connection properties (TLS, SASL).
pub struct Kafka {
    pub brokers: String,
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Kafka {
    /// A client configuration with the brokers and the properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (name, value) in &self.properties {
            config.set(name, value);
        }
        config
    }
}

/// The number of products in the inventory story.
pub const SKUS: usize = 100;

const WRITER_TABLES: &str = "
CREATE TABLE orders (
    id uuid PRIMARY KEY,
    customer text NOT NULL,
    amount_cents bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE users (
    id uuid PRIMARY KEY,
    email text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE inventory (sku text PRIMARY KEY, stock bigint NOT NULL);
";

// No unique constraint on payments.order_id or welcome_emails.user_id on purpose: the
// inbox alone keeps them to one per event, and the report would see a second one.
const CONSUMER_TABLES: &str = "
CREATE TABLE payments (
    id bigserial PRIMARY KEY,
    order_id uuid NOT NULL,
    amount_cents bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE welcome_emails (
    id bigserial PRIMARY KEY,
    user_id uuid NOT NULL,
    email text NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE search_index (sku text PRIMARY KEY, stock bigint NOT NULL, event_id uuid NOT NULL);
-- Each consumer process's inbox counters, saved twice a second (a process killed with
-- SIGKILL loses at most its last half second).
CREATE TABLE consumer_runs (
    service text NOT NULL,
    run uuid NOT NULL,
    processed bigint NOT NULL,
    duplicates bigint NOT NULL,
    dead_lettered bigint NOT NULL,
    PRIMARY KEY (service, run)
);
";

pub async fn run(
    dbs: &Databases,
    kafka: &Kafka,
    sink: crate::sink_consumers::Sink,
    brokers: &crate::sink_consumers::Brokers,
) -> Result<()> {
    recreate(&dbs.writers).await?;
    recreate(&dbs.consumers).await?;
    let mut writers = PgConnection::connect(&dbs.writers).await?;
    sqlx::raw_sql(WRITER_TABLES).execute(&mut writers).await?;
    sqlx::query("INSERT INTO inventory SELECT 'sku-' || g, 100 FROM generate_series(1, $1) g")
        .bind(SKUS as i32)
        .execute(&mut writers)
        .await?;
    let mut consumers = PgConnection::connect(&dbs.consumers).await?;
    sqlx::raw_sql(CONSUMER_TABLES)
        .execute(&mut consumers)
        .await?;
    outbox_inbox::migrate(&mut consumers, &outbox_inbox::default_table()).await?;
    match sink {
        crate::sink_consumers::Sink::Kafka => create_topics(kafka).await,
        other => crate::sink_consumers::setup(other, brokers).await,
    }
}

/// Drops and creates the database named in `url`, through the `postgres` database.
async fn recreate(url: &str) -> Result<()> {
    let mut parsed = url::Url::parse(url).with_context(|| format!("{url} is not a URL"))?;
    let name = parsed.path().trim_start_matches('/').to_string();
    parsed.set_path("postgres");
    let mut admin = PgConnection::connect(parsed.as_str()).await?;
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    ))))
    .execute(&mut admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE DATABASE \"{name}\""
    ))))
    .execute(&mut admin)
    .await?;
    Ok(())
}

/// The event topics (the relay would create them on first publish, but the consumers
/// subscribe first) and their dead-letter topics, with the relay's 3 partitions. Topics
/// and consumer groups of an earlier run are deleted first, so the report counts this
/// run only.
async fn create_topics(kafka: &Kafka) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let groups: Vec<&str> = Service::ALL.iter().map(|s| s.name()).collect();
    // Unknown groups and topics answer with errors here; that is the first run.
    let _ = admin.delete_groups(&groups, &options).await;
    let names: Vec<String> = Service::ALL
        .iter()
        .flat_map(|s| [s.topic().to_string(), format!("{}.dlq", s.topic())])
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&refs, &options).await;
    // Deletion completes in the background: retry each name until it is free.
    let mut remaining = names.clone();
    for _ in 0..60 {
        let topics: Vec<NewTopic> = remaining
            .iter()
            .map(|name| NewTopic::new(name, 3, TopicReplication::Fixed(1)))
            .collect();
        let mut still_taken = Vec::new();
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(_) => {}
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => still_taken.push(topic),
                Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
            }
        }
        if still_taken.is_empty() {
            return Ok(());
        }
        remaining = still_taken;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!(
        "the topics of an earlier run were not deleted within 30 s; run `shop setup` again"
    )
}
