//! The writing side: each change and the event that describes it, in one transaction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::future::BoxFuture;
use outbox::Event;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use crate::setup::SKUS;

#[derive(clap::Args)]
pub struct Load {
    /// How many changes to make.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Changes per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    writers: usize,
}

pub async fn orders(url: &str, load: Load) -> Result<()> {
    paced(url, &load, |pool, n| {
        Box::pin(async move {
            let id = Uuid::now_v7();
            let customer = format!("customer-{}", n % 97);
            let amount_cents = 500 + (n as i64 * 37) % 20_000;
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO orders (id, customer, amount_cents) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(&customer)
                .bind(amount_cents)
                .execute(&mut *tx)
                .await?;
            let event = Event::new(
                "order",
                id.to_string(),
                "OrderCreated",
                json!({ "order_id": id, "customer": customer, "amount_cents": amount_cents }),
            );
            outbox::write(&mut *tx, &event).await?;
            tx.commit().await?;
            Ok(())
        })
    })
    .await
}

pub async fn registrations(url: &str, load: Load) -> Result<()> {
    paced(url, &load, |pool, _| {
        Box::pin(async move {
            let id = Uuid::now_v7();
            let email = format!("user-{}@example.com", id.simple());
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO users (id, email) VALUES ($1, $2)")
                .bind(id)
                .bind(&email)
                .execute(&mut *tx)
                .await?;
            let event = Event::new(
                "user",
                id.to_string(),
                "UserRegistered",
                json!({ "user_id": id, "email": email }),
            );
            outbox::write(&mut *tx, &event).await?;
            tx.commit().await?;
            Ok(())
        })
    })
    .await
}

/// Stock changes on few products from concurrent connections: transactions on one
/// product serialize on its row lock, so its events are written in commit order, and
/// a consumer that applies them in order ends with the same stock.
pub async fn inventory(url: &str, load: Load) -> Result<()> {
    paced(url, &load, |pool, n| {
        Box::pin(async move {
            // A spread-out walk over the products and deltas in -5..=10.
            let sku = format!("sku-{}", (n * 7919) % SKUS + 1);
            let delta = ((n * 31) % 16) as i64 - 5;
            let mut tx = pool.begin().await?;
            let stock: i64 = sqlx::query_scalar(
                "UPDATE inventory SET stock = greatest(stock + $2, 0) WHERE sku = $1 RETURNING stock",
            )
            .bind(&sku)
            .bind(delta)
            .fetch_one(&mut *tx)
            .await?;
            let event = Event::new(
                "inventory",
                sku.clone(),
                "InventoryUpdated",
                json!({ "sku": sku, "stock": stock }),
            );
            outbox::write(&mut *tx, &event).await?;
            tx.commit().await?;
            Ok(())
        })
    })
    .await
}

/// Runs `change(pool, n)` for n in 0..count at `rate` per second over `writers`
/// connections.
async fn paced<F>(url: &str, load: &Load, change: F) -> Result<()>
where
    F: Fn(PgPool, usize) -> BoxFuture<'static, Result<()>> + Send + Sync + 'static,
{
    let pool = PgPoolOptions::new()
        .max_connections(load.writers as u32)
        .connect(url)
        .await?;
    let change = Arc::new(change);
    let next = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / load.rate.max(1) as f64);
    let mut tasks = Vec::new();
    for _ in 0..load.writers {
        let (pool, change, next, count) = (pool.clone(), change.clone(), next.clone(), load.count);
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return anyhow::Ok(());
                }
                tokio::time::sleep_until(start + interval * n as u32).await;
                change(pool.clone(), n).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
