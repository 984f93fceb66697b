//! The consumers when the relay publishes to NATS JetStream, RabbitMQ or webhooks. The
//! inbox library reads Kafka only for now, so these keep its table by hand, the same
//! way: one transaction per event records the event id under the service's name (an
//! id already there inserts nothing: a duplicate, dropped) and applies the event; the
//! broker is acknowledged (or the webhook answered 2xx) only after the commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::consumers::{apply, save_counters, stop_on_signal, Service};
use crate::setup::Databases;

/// The JetStream stream the demo's relay publishes to (`shop.event.>`).
const STREAM: &str = "SHOP";
/// The exchange the demo's relay publishes to.
const EXCHANGE: &str = "shop";

/// Where the demo's events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    Kafka,
    Nats,
    Rabbitmq,
    Webhook,
}

/// How to reach NATS, RabbitMQ and the webhook receiver (from `scripts/services env`).
pub struct Brokers {
    pub nats_url: String,
    pub rabbitmq_address: String,
    pub rabbitmq_user: String,
    pub rabbitmq_password_file: String,
    pub webhook_listen: String,
    pub webhook_secret_file: Option<String>,
}

/// What one service did in this process, saved for the report.
#[derive(Default)]
struct Tally {
    processed: AtomicU64,
    duplicates: AtomicU64,
}

/// Records `id` for `service` and applies the event, in one transaction; a duplicate
/// changes nothing.
async fn apply_once(
    pool: &PgPool,
    service: Service,
    id: Uuid,
    payload: &[u8],
    tally: &Tally,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    let recorded = sqlx::query(
        "INSERT INTO outbox_inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(service.name())
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if recorded == 0 {
        tally.duplicates.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    apply(service, &mut tx, id, payload).await.map_err(|err| {
        anyhow::anyhow!(
            "{service:?} cannot apply {id}: {err}",
            service = service.name()
        )
    })?;
    tx.commit().await?;
    tally.processed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Creates the sink's destinations afresh: the stream, or the exchange and one queue
/// per service.
pub async fn setup(sink: Sink, brokers: &Brokers) -> Result<()> {
    match sink {
        Sink::Kafka | Sink::Webhook => Ok(()),
        Sink::Nats => {
            let jetstream = nats(brokers).await?;
            let _ = jetstream.delete_stream(STREAM).await;
            jetstream
                .create_stream(stream::Config {
                    name: STREAM.into(),
                    subjects: vec!["shop.event.>".into()],
                    storage: stream::StorageType::File,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .context("creating the JetStream stream SHOP")?;
            Ok(())
        }
        Sink::Rabbitmq => {
            let (_connection, channel) = rabbitmq(brokers).await?;
            // The relay declares the audit stream again at start.
            let queues = Service::ALL.map(queue);
            for name in queues.iter().map(String::as_str).chain(["shop.audit"]) {
                channel
                    .queue_delete(name, QueueDeleteOptions::default())
                    .await?;
            }
            channel
                .exchange_delete(EXCHANGE, ExchangeDeleteOptions::default())
                .await?;
            channel
                .exchange_declare(
                    EXCHANGE,
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            for service in Service::ALL {
                channel
                    .queue_declare(
                        &queue(service),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        &queue(service),
                        EXCHANGE,
                        service.topic(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            Ok(())
        }
    }
}

fn queue(service: Service) -> String {
    format!("shop.{}", service.name())
}

async fn nats(brokers: &Brokers) -> Result<jetstream::Context> {
    let client = async_nats::connect(brokers.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", brokers.nats_url))?;
    Ok(jetstream::new(client))
}

async fn rabbitmq(brokers: &Brokers) -> Result<(Connection, Channel)> {
    let password = std::fs::read_to_string(&brokers.rabbitmq_password_file)
        .with_context(|| format!("reading {}", brokers.rabbitmq_password_file))?;
    let encode =
        |text: &str| url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
    let uri = format!(
        "amqp://{}:{}@{}/%2f",
        encode(&brokers.rabbitmq_user),
        encode(password.trim()),
        brokers.rabbitmq_address
    );
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connection = Connection::connect(&uri, properties)
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", brokers.rabbitmq_address))?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// Consumes `service`'s events from the sink until SIGTERM or SIGINT.
pub async fn run(service: Service, sink: Sink, dbs: &Databases, brokers: &Brokers) -> Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&dbs.consumers)
        .await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let tally = Arc::new(Tally::default());
    let stop_saving = CancellationToken::new();
    let counted = tally.clone();
    let saver = tokio::spawn(save_counters(
        pool.clone(),
        service.name(),
        Uuid::now_v7(),
        move || {
            (
                counted.processed.load(Ordering::Relaxed),
                counted.duplicates.load(Ordering::Relaxed),
                0,
            )
        },
        stop_saving.clone(),
    ));
    info!(service = service.name(), ?sink, "consuming");
    let result = match sink {
        Sink::Nats => consume_nats(service, &pool, brokers, &tally, &shutdown).await,
        Sink::Rabbitmq => consume_rabbitmq(service, &pool, brokers, &tally, &shutdown).await,
        Sink::Kafka | Sink::Webhook => bail!("{sink:?} has its own consumer"),
    };
    stop_saving.cancel();
    saver.await??;
    result
}

/// A durable pull consumer per service: messages handled one at a time in stream order,
/// each acknowledged after its commit.
async fn consume_nats(
    service: Service,
    pool: &PgPool,
    brokers: &Brokers,
    tally: &Tally,
    shutdown: &CancellationToken,
) -> Result<()> {
    let jetstream = nats(brokers).await?;
    let stream = jetstream.get_stream(STREAM).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            service.name(),
            pull::Config {
                durable_name: Some(service.name().into()),
                filter_subject: service.topic().into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                // A message a killed consumer took comes back soon.
                ack_wait: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .await
        .context("creating the JetStream consumer")?;
    while !shutdown.is_cancelled() {
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|err| anyhow::anyhow!("{err}"))?;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("id"))
                .and_then(|id| id.as_str().parse::<Uuid>().ok())
                .context("a message without an id header")?;
            apply_once(pool, service, id, &message.payload, tally).await?;
            message
                .ack()
                .await
                .map_err(|err| anyhow::anyhow!("{err}"))?;
        }
    }
    Ok(())
}

/// One consumer per service queue: deliveries handled one at a time in queue order,
/// each acknowledged after its commit.
async fn consume_rabbitmq(
    service: Service,
    pool: &PgPool,
    brokers: &Brokers,
    tally: &Tally,
    shutdown: &CancellationToken,
) -> Result<()> {
    let (_connection, channel) = rabbitmq(brokers).await?;
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            &queue(service),
            service.name(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = deliveries.next() => next,
        };
        let Some(delivery) = delivery else {
            bail!("RabbitMQ closed the consumer");
        };
        let delivery = delivery?;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| id.as_str().parse::<Uuid>().ok())
            .context("a message without a message_id")?;
        apply_once(pool, service, id, &delivery.data, tally).await?;
        delivery.ack(BasicAckOptions::default()).await?;
    }
}

/// The webhook receiver of all three services (`POST /order`, `/user`, `/inventory`),
/// checking each request's Standard Webhooks signature, until SIGTERM or SIGINT.
pub async fn receive_webhooks(dbs: &Databases, brokers: &Brokers) -> Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&dbs.consumers)
        .await?;
    let secret = match &brokers.webhook_secret_file {
        Some(path) => Some(outbox_webhook::WebhookSecret::parse(
            &std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        )?),
        None => None,
    };
    let tallies: Arc<[Tally; 3]> = Arc::new(Default::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let stop_saving = CancellationToken::new();
    let mut savers = Vec::new();
    for (index, service) in Service::ALL.into_iter().enumerate() {
        let counted = tallies.clone();
        savers.push(tokio::spawn(save_counters(
            pool.clone(),
            service.name(),
            Uuid::now_v7(),
            move || {
                (
                    counted[index].processed.load(Ordering::Relaxed),
                    counted[index].duplicates.load(Ordering::Relaxed),
                    0,
                )
            },
            stop_saving.clone(),
        )));
    }
    let listener = tokio::net::TcpListener::bind(&brokers.webhook_listen)
        .await
        .with_context(|| format!("listening on {}", brokers.webhook_listen))?;
    info!(listen = %brokers.webhook_listen, "receiving webhooks");
    let app = axum::Router::new()
        .route("/{aggregatetype}", axum::routing::post(receive))
        .with_state(Receiver {
            pool,
            secret,
            tallies,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    stop_saving.cancel();
    for saver in savers {
        saver.await??;
    }
    Ok(())
}

#[derive(Clone)]
struct Receiver {
    pool: PgPool,
    secret: Option<outbox_webhook::WebhookSecret>,
    tallies: Arc<[Tally; 3]>,
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(aggregate_type): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let Ok(id) = header("webhook-id").parse::<Uuid>() else {
        return StatusCode::BAD_REQUEST;
    };
    if let Some(secret) = &receiver.secret {
        let expected =
            outbox_webhook::sign(secret, &id.to_string(), header("webhook-timestamp"), &body);
        // The header may hold several space-separated signatures (key rotation).
        if !header("webhook-signature")
            .split(' ')
            .any(|s| s == expected)
        {
            warn!(%id, "a webhook with a bad signature");
            return StatusCode::UNAUTHORIZED;
        }
    }
    let Some(index) = Service::ALL
        .iter()
        .position(|s| s.topic().strip_prefix("shop.event.") == Some(aggregate_type.as_str()))
    else {
        return StatusCode::NOT_FOUND;
    };
    let service = Service::ALL[index];
    match apply_once(&receiver.pool, service, id, &body, &receiver.tallies[index]).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(err) => {
            warn!(%id, error = %err, "applying a webhook failed; the relay sends it again");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}
