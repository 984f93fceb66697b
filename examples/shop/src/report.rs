//! After the run: did every change get applied exactly once on the other side?

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::setup::Databases;

struct Counts {
    orders: Vec<Uuid>,
    payments: Vec<Uuid>,
    users: Vec<Uuid>,
    emails: Vec<Uuid>,
    /// InventoryUpdated events written (the outbox keeps published rows).
    inventory_events: i64,
    /// InventoryUpdated events the search index applied (its inbox rows).
    indexed_events: i64,
    stock: HashMap<String, i64>,
    index: HashMap<String, i64>,
}

impl Counts {
    async fn read(writers: &mut PgConnection, consumers: &mut PgConnection) -> Result<Counts> {
        let ids = |sql: &'static str| {
            sqlx::query_scalar::<_, Uuid>(sqlx::AssertSqlSafe(String::from(sql)))
        };
        let levels = |sql: &'static str| sqlx::query_as::<_, (String, i64)>(sql);
        Ok(Counts {
            orders: ids("SELECT id FROM orders").fetch_all(&mut *writers).await?,
            payments: ids("SELECT order_id FROM payments").fetch_all(&mut *consumers).await?,
            users: ids("SELECT id FROM users").fetch_all(&mut *writers).await?,
            emails: ids("SELECT user_id FROM welcome_emails").fetch_all(&mut *consumers).await?,
            inventory_events: sqlx::query_scalar(
                "SELECT count(*) FROM outbox WHERE aggregatetype = 'inventory'",
            )
            .fetch_one(&mut *writers)
            .await?,
            indexed_events: sqlx::query_scalar(
                "SELECT count(*) FROM outbox_inbox WHERE consumer = 'search-index' AND status = 'processed'",
            )
            .fetch_one(&mut *consumers)
            .await?,
            stock: levels("SELECT sku, stock FROM inventory")
                .fetch_all(&mut *writers)
                .await?
                .into_iter()
                .collect(),
            index: levels("SELECT sku, stock FROM search_index")
                .fetch_all(&mut *consumers)
                .await?
                .into_iter()
                .collect(),
        })
    }

    fn caught_up(&self) -> bool {
        distinct(&self.payments) >= self.orders.len()
            && distinct(&self.emails) >= self.users.len()
            && self.indexed_events >= self.inventory_events
    }
}

fn distinct(ids: &[Uuid]) -> usize {
    ids.iter().collect::<HashSet<_>>().len()
}

/// Ids written on one side and absent on the other.
fn missing(written: &[Uuid], applied: &[Uuid]) -> usize {
    let applied: HashSet<&Uuid> = applied.iter().collect();
    written.iter().filter(|id| !applied.contains(id)).count()
}

pub async fn run(dbs: &Databases, wait: Duration) -> Result<()> {
    let mut writers = PgConnection::connect(&dbs.writers).await?;
    let mut consumers = PgConnection::connect(&dbs.consumers).await?;
    let deadline = Instant::now() + wait;
    let counts = loop {
        let counts = Counts::read(&mut writers, &mut consumers).await?;
        if counts.caught_up() || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let dropped: HashMap<String, i64> = sqlx::query_as(
        "SELECT service, sum(duplicates)::bigint FROM consumer_runs GROUP BY service",
    )
    .fetch_all(&mut consumers)
    .await?
    .into_iter()
    .collect();
    let dropped = |service: &str| dropped.get(service).copied().unwrap_or(0);

    let mut failures = Vec::new();
    let payments_lost = missing(&counts.orders, &counts.payments);
    let payments_twice = counts.payments.len() - distinct(&counts.payments);
    println!(
        "orders={} payments={} duplicates_dropped={} lost={}",
        counts.orders.len(),
        counts.payments.len(),
        dropped("payments"),
        payments_lost
    );
    if payments_lost > 0 || payments_twice > 0 {
        failures.push(format!(
            "payments: {payments_lost} orders without a payment, {payments_twice} paid twice"
        ));
    }
    let emails_lost = missing(&counts.users, &counts.emails);
    let emails_twice = counts.emails.len() - distinct(&counts.emails);
    println!(
        "users={} welcome_emails={} duplicates_dropped={} lost={}",
        counts.users.len(),
        counts.emails.len(),
        dropped("notifications"),
        emails_lost
    );
    if emails_lost > 0 || emails_twice > 0 {
        failures.push(format!(
            "notifications: {emails_lost} users without a welcome e-mail, {emails_twice} welcomed twice"
        ));
    }
    let differ: Vec<&String> = counts
        .stock
        .iter()
        .filter(|(sku, stock)| counts.index.get(*sku) != Some(stock))
        .map(|(sku, _)| sku)
        .collect();
    let index_lost = (counts.inventory_events - counts.indexed_events).max(0);
    println!(
        "inventory_updates={} indexed={} duplicates_dropped={} lost={} stock_check: {}/{} products indexed with the inventory's stock",
        counts.inventory_events,
        counts.indexed_events,
        dropped("search-index"),
        index_lost,
        counts.stock.len() - differ.len(),
        counts.stock.len()
    );
    if index_lost > 0 || !differ.is_empty() {
        let mut examples: Vec<String> = differ
            .iter()
            .take(5)
            .map(|sku| {
                format!(
                    "{sku}: stock {} indexed {:?}",
                    counts.stock[*sku],
                    counts.index.get(*sku)
                )
            })
            .collect();
        examples.sort();
        failures.push(format!(
            "search index: {index_lost} events not applied, {} products differ ({})",
            differ.len(),
            examples.join(", ")
        ));
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}
