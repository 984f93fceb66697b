//! `shop`: the services of the demo, one subcommand each.
//!
//! Three stories of the outbox pattern. On the writing side (database `OUTBOX_DATABASE_URL`),
//! each service changes its business rows and writes the event that describes the change
//! in the same transaction; the relay publishes the outbox. On the reading side (database
//! `SHOP_CONSUMER_DATABASE_URL`), each service applies the events through the inbox,
//! which drops the duplicates that at-least-once delivery brings.
//!
//! | story | writer | event | consumer | effect, exactly once |
//! | --- | --- | --- | --- | --- |
//! | orders | `orders` | OrderCreated | `payments` | one payment per order |
//! | registration | `registrations` | UserRegistered | `notifications` | one welcome e-mail per user |
//! | inventory | `inventory` | InventoryUpdated | `search-index` | indexed stock = stock |

mod consumers;
mod report;
mod setup;
mod sink_consumers;
mod writers;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shop", about = "The outbox demo's services")]
struct Cli {
    /// The writing services' database (with the outbox table).
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL",
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/shop"
    )]
    database_url: String,
    /// The consuming services' database (with the inbox table).
    #[arg(
        long,
        env = "SHOP_CONSUMER_DATABASE_URL",
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/shop_consumers"
    )]
    consumer_database_url: String,
    #[arg(
        long,
        env = "OUTBOX_KAFKA_BROKERS",
        global = true,
        default_value = "127.0.0.1:9092"
    )]
    kafka_brokers: String,
    /// A relay configuration file whose `[kafka.properties]` (TLS, SASL) the services use
    /// too, such as the one `scripts/services` writes for the SASL_SSL listener.
    #[arg(long, env = "SHOP_KAFKA_CONFIG", global = true)]
    kafka_config: Option<std::path::PathBuf>,
    /// Where the relay publishes, so where the consumers read.
    #[arg(
        long,
        env = "SHOP_SINK",
        global = true,
        value_enum,
        default_value = "kafka"
    )]
    sink: sink_consumers::Sink,
    #[arg(
        long,
        env = "OUTBOX_NATS_URL",
        global = true,
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[arg(
        long,
        env = "OUTBOX_RABBITMQ_ADDRESS",
        global = true,
        default_value = "127.0.0.1:5672"
    )]
    rabbitmq_address: String,
    #[arg(
        long,
        env = "OUTBOX_RABBITMQ_USER",
        global = true,
        default_value = "outbox"
    )]
    rabbitmq_user: String,
    #[arg(
        long,
        env = "OUTBOX_RABBITMQ_PASSWORD_FILE",
        global = true,
        default_value = ".services/tls/rabbitmq-outbox.password"
    )]
    rabbitmq_password_file: String,
    /// Where `shop webhooks` listens.
    #[arg(
        long,
        env = "SHOP_WEBHOOK_LISTEN",
        global = true,
        default_value = "127.0.0.1:9470"
    )]
    webhook_listen: String,
    /// The Standard Webhooks secret (whsec_...) the receiver checks signatures with.
    #[arg(long, env = "SHOP_WEBHOOK_SECRET_FILE", global = true)]
    webhook_secret_file: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create both databases afresh (business tables, the inbox table) and the topics.
    /// The outbox table itself comes from `outbox migrate`.
    Setup,
    /// Create orders, each with its OrderCreated event.
    Orders(writers::Load),
    /// Register users, each with its UserRegistered event.
    Registrations(writers::Load),
    /// Change stock levels, each change with an InventoryUpdated event carrying the new level.
    Inventory(writers::Load),
    /// Consume OrderCreated: one payment per order.
    Payments,
    /// Consume UserRegistered: one welcome e-mail per user.
    Notifications,
    /// Consume InventoryUpdated: keep the search index's stock equal to the inventory's.
    SearchIndex,
    /// The three services' webhook receiver (with `--sink webhook`): `POST /order`,
    /// `/user`, `/inventory`, signatures checked.
    Webhooks,
    /// Wait until the consumers caught up, then print one line per story; exits 1 when
    /// anything was lost, applied twice, or the index differs from the inventory.
    Report {
        /// How long to wait for the consumers to catch up.
        #[arg(long, default_value = "120")]
        wait_secs: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,rdkafka=warn,sqlx=warn,async_nats=warn,lapin=warn".into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let dbs = setup::Databases {
        writers: cli.database_url,
        consumers: cli.consumer_database_url,
    };
    let kafka = setup::Kafka {
        brokers: cli.kafka_brokers,
        properties: match &cli.kafka_config {
            Some(path) => outbox_relay::config::kafka_properties_from_file(path)?,
            None => Default::default(),
        },
    };
    let brokers = sink_consumers::Brokers {
        nats_url: cli.nats_url,
        rabbitmq_address: cli.rabbitmq_address,
        rabbitmq_user: cli.rabbitmq_user,
        rabbitmq_password_file: cli.rabbitmq_password_file,
        webhook_listen: cli.webhook_listen,
        webhook_secret_file: cli.webhook_secret_file,
    };
    let sink = cli.sink;
    let (dbs, kafka, brokers) = (&dbs, &kafka, &brokers);
    let consume = |service| async move {
        match sink {
            sink_consumers::Sink::Kafka => consumers::run(service, dbs, kafka).await,
            _ => sink_consumers::run(service, sink, dbs, brokers).await,
        }
    };
    match cli.command {
        Command::Setup => setup::run(dbs, kafka, sink, brokers).await,
        Command::Orders(load) => writers::orders(&dbs.writers, load).await,
        Command::Registrations(load) => writers::registrations(&dbs.writers, load).await,
        Command::Inventory(load) => writers::inventory(&dbs.writers, load).await,
        Command::Payments => consume(consumers::Service::Payments).await,
        Command::Notifications => consume(consumers::Service::Notifications).await,
        Command::SearchIndex => consume(consumers::Service::SearchIndex).await,
        Command::Webhooks => sink_consumers::receive_webhooks(dbs, brokers).await,
        Command::Report { wait_secs } => report::run(dbs, Duration::from_secs(wait_secs)).await,
    }
}
