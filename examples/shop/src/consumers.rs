//! The reading side: each service applies its events through the inbox, in the
//! transaction that records the event id, so a duplicate changes nothing.

use std::time::Duration;

use anyhow::Result;
use futures::future::BoxFuture;
use outbox_inbox::{Handler, HandlerError, Inbox, InboxMessage};
use serde::Deserialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::info;
use uuid::Uuid;

use crate::setup::{Databases, Kafka};

#[derive(Clone, Copy)]
pub enum Service {
    Payments,
    Notifications,
    SearchIndex,
}

impl Service {
    pub const ALL: [Service; 3] = [
        Service::Payments,
        Service::Notifications,
        Service::SearchIndex,
    ];

    /// The consumer group and inbox consumer name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Payments => "payments",
            Service::Notifications => "notifications",
            Service::SearchIndex => "search-index",
        }
    }

    /// The demo's routing, `shop.event.<aggregatetype>` (scripts/demo sets the relay's
    /// `topics.template`): the demo stays off the default `outbox.event.*` topics that
    /// a newcomer's own relay and consumers use.
    pub fn topic(self) -> &'static str {
        match self {
            Service::Payments => "shop.event.order",
            Service::Notifications => "shop.event.user",
            Service::SearchIndex => "shop.event.inventory",
        }
    }
}

#[derive(Deserialize)]
struct OrderCreated {
    order_id: Uuid,
    amount_cents: i64,
}

#[derive(Deserialize)]
struct UserRegistered {
    user_id: Uuid,
    email: String,
}

#[derive(Deserialize)]
struct InventoryUpdated {
    sku: String,
    stock: i64,
}

/// Consumes until SIGTERM or SIGINT.
pub async fn run(service: Service, dbs: &Databases, kafka: &Kafka) -> Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&dbs.consumers)
        .await?;
    let mut builder = Inbox::builder(pool.clone(), &kafka.brokers, service.name(), service.name())
        .topics([service.topic()])
        .max_attempts(5)
        // One member per service: restarted after a crash, it resumes at once.
        .static_member(service.name());
    for (name, value) in &kafka.properties {
        builder = builder.kafka_property(name, value);
    }
    let inbox = builder.build()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let run = Uuid::now_v7();
    // Saved until the inbox returned, so the last save counts its final drain.
    let stop_saving = CancellationToken::new();
    let stats = inbox.stats();
    let saver = tokio::spawn(save_counters(
        pool.clone(),
        service.name(),
        run,
        move || (stats.processed(), stats.duplicates(), stats.dead_lettered()),
        stop_saving.clone(),
    ));
    info!(
        service = service.name(),
        topic = service.topic(),
        "consuming"
    );
    let result = inbox.run(Apply(service), shutdown).await;
    stop_saving.cancel();
    saver.await??;
    Ok(result?)
}

/// Applies one event of the service's topic inside the inbox's transaction.
struct Apply(Service);

impl Handler for Apply {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            apply(
                self.0,
                tx,
                message.id(),
                message.payload().unwrap_or_default(),
            )
            .await
        })
    }
}

/// What `service` does with event `id`, in the transaction `tx` that records the id.
pub async fn apply(
    service: Service,
    tx: &mut PgConnection,
    id: Uuid,
    payload: &[u8],
) -> Result<(), HandlerError> {
    match service {
        Service::Payments => {
            let order: OrderCreated = json(payload)?;
            sqlx::query("INSERT INTO payments (order_id, amount_cents) VALUES ($1, $2)")
                .bind(order.order_id)
                .bind(order.amount_cents)
                .execute(&mut *tx)
                .await?;
        }
        Service::Notifications => {
            let user: UserRegistered = json(payload)?;
            sqlx::query("INSERT INTO welcome_emails (user_id, email) VALUES ($1, $2)")
                .bind(user.user_id)
                .bind(&user.email)
                .execute(&mut *tx)
                .await?;
        }
        Service::SearchIndex => {
            // The event carries the new level: applied in order, the last one wins and
            // equals the inventory.
            let update: InventoryUpdated = json(payload)?;
            sqlx::query(
                "INSERT INTO search_index (sku, stock, event_id) VALUES ($1, $2, $3)
                 ON CONFLICT (sku) DO UPDATE SET stock = excluded.stock, event_id = excluded.event_id",
            )
            .bind(&update.sku)
            .bind(update.stock)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

/// The payload as `T`; a payload that is not is a poison (never retried).
fn json<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(payload).map_err(HandlerError::permanent)
}

pub async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
}

/// Saves this process's inbox counters twice a second and once at the end, so the demo
/// can say how many duplicates the inbox dropped even for a process it killed.
pub async fn save_counters(
    pool: PgPool,
    service: &'static str,
    run: Uuid,
    counters: impl Fn() -> (u64, u64, u64),
    stop: CancellationToken,
) -> Result<()> {
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
        };
        sqlx::query(
            "INSERT INTO consumer_runs (service, run, processed, duplicates, dead_lettered)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (service, run) DO UPDATE SET processed = excluded.processed,
                 duplicates = excluded.duplicates, dead_lettered = excluded.dead_lettered",
        )
        .bind(service)
        .bind(run)
        .bind(counters().0 as i64)
        .bind(counters().1 as i64)
        .bind(counters().2 as i64)
        .execute(&pool)
        .await?;
        if stopping {
            return Ok(());
        }
    }
}
