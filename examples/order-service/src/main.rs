//! An example order service built on the `outbox` library.
//!
//! `create` saves orders and their `OrderCreated` events in one transaction each, the
//! way a real service would. `check` reads the topic back and compares it with the
//! orders table: every order must have its event on the topic (duplicates are allowed
//! and counted; consumers drop them by event id).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use outbox::Event;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

#[derive(Parser)]
struct Cli {
    #[arg(long, env = "OUTBOX_DATABASE_URL")]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create orders, each with its OrderCreated event, in one transaction each.
    Create {
        #[arg(long, default_value_t = 5000)]
        orders: u32,
        /// Orders per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
    },
    /// Read the topic back and print `orders=N published=N distinct=N duplicates=D lost=L`.
    Check {
        #[arg(long, env = "OUTBOX_KAFKA_BROKERS")]
        kafka_brokers: String,
        #[arg(long, default_value = "outbox.event.order")]
        topic: String,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&cli.database_url)
        .await
        .context("connecting to PostgreSQL (OUTBOX_DATABASE_URL)")?;
    match cli.command {
        Command::Create { orders, rate } => create(&pool, orders, rate).await,
        Command::Check {
            kafka_brokers,
            topic,
            timeout_secs,
        } => {
            check(
                &pool,
                &kafka_brokers,
                &topic,
                Duration::from_secs(timeout_secs),
            )
            .await
        }
    }
}

async fn create(pool: &sqlx::PgPool, orders: u32, rate: u32) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (
             id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             customer   text   NOT NULL,
             total_cents bigint NOT NULL,
             event_id   uuid   NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .execute(pool)
    .await?;
    let started = Instant::now();
    for n in 0..orders {
        let customer = format!("customer-{}", n % 97);
        let total_cents = 500 + (n as i64 * 37) % 20_000;
        let event_id = Uuid::now_v7();
        // The business row and its event: one transaction, so both exist or neither.
        let mut tx = pool.begin().await?;
        let order_id: i64 = sqlx::query_scalar(
            "INSERT INTO orders (customer, total_cents, event_id) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(&customer)
        .bind(total_cents)
        .bind(event_id)
        .fetch_one(&mut *tx)
        .await?;
        let event = Event::json(
            "order",
            order_id.to_string(),
            "OrderCreated",
            &serde_json::json!({ "orderId": order_id, "customer": customer, "totalCents": total_cents }),
        )?
        .with_id(event_id);
        outbox::write(&mut *tx, &event).await?;
        tx.commit().await?;
        // Pace the stream: order n is due at n / rate seconds.
        let due = Duration::from_secs_f64((n + 1) as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    eprintln!(
        "order-service: created {orders} orders in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn check(pool: &sqlx::PgPool, brokers: &str, topic: &str, timeout: Duration) -> Result<()> {
    let orders: Vec<(i64, Uuid)> = sqlx::query_as("SELECT id, event_id FROM orders")
        .fetch_all(pool)
        .await?;
    let wanted: HashMap<Uuid, i64> = orders.iter().map(|(id, event)| (*event, *id)).collect();
    let (published, distinct) = tokio::task::spawn_blocking({
        let brokers = brokers.to_string();
        let topic = topic.to_string();
        let wanted: HashSet<Uuid> = wanted.keys().copied().collect();
        move || read_topic(&brokers, &topic, &wanted, timeout)
    })
    .await??;
    let lost = wanted.len() - distinct.len();
    let duplicates = published - distinct.len();
    println!(
        "orders={} published={} distinct={} duplicates={} lost={}",
        orders.len(),
        published,
        distinct.len(),
        duplicates,
        lost
    );
    if lost > 0 {
        bail!("{lost} orders have no OrderCreated event on {topic}");
    }
    Ok(())
}

/// Reads `topic` from the beginning until every wanted id was seen or `timeout`.
/// Returns how many of the wanted events arrived (repeats included) and which ids.
fn read_topic(
    brokers: &str,
    topic: &str,
    wanted: &HashSet<Uuid>,
    timeout: Duration,
) -> Result<(usize, HashSet<Uuid>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("order-check-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        bail!("topic {topic} does not exist (yet)");
    }
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut published = 0;
    let mut seen = HashSet::new();
    while seen.len() < wanted.len() && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let id = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == "id")
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<Uuid>().ok())
        });
        if let Some(id) = id.filter(|id| wanted.contains(id)) {
            published += 1;
            seen.insert(id);
        }
    }
    Ok((published, seen))
}
