//! An inbox consumer for the `inbox` fault scenario, run as its own process so that
//! the scenario can SIGKILL it. It applies each event to `effects` (no unique
//! constraint: an event applied twice shows as two rows) and checks each aggregate's
//! order against `aggregate_state`, recording any event older than the last one applied
//! in `order_violations`.

use std::time::Duration;

use anyhow::{Context, Result};
use outbox_inbox::sqlx::{self, PgPool};
use outbox_inbox::{handler_fn, CancellationToken, HandlerError, Inbox};

/// The tables the consumer writes; the first consumer to start creates them.
const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(7);
CREATE TABLE IF NOT EXISTS effects (event_id uuid NOT NULL, aggregate text NOT NULL, n bigint NOT NULL);
CREATE TABLE IF NOT EXISTS aggregate_state (aggregate text PRIMARY KEY, last_n bigint NOT NULL);
CREATE TABLE IF NOT EXISTS order_violations (event_id uuid NOT NULL, aggregate text NOT NULL, n bigint NOT NULL, after_n bigint NOT NULL);
";

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .init();
    let arg = |name: &str| -> Result<String> {
        let flag = format!("--{name}");
        let mut args = std::env::args().skip_while(|a| *a != flag);
        args.next();
        args.next()
            .with_context(|| format!("{flag} VALUE is required"))
    };
    let database_url = arg("database-url")?;
    let brokers = arg("brokers")?;
    let group = arg("group")?;
    let topics: Vec<String> = arg("topics")?.split(',').map(str::to_string).collect();
    let pool = PgPool::connect(&database_url).await?;
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    tx.commit().await?;
    let inbox = Inbox::builder(pool, brokers, group, "chaos")
        .topics(topics)
        .commit_interval(Duration::from_millis(500))
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .max_attempts(1_000)
        // A killed member's partitions move on after 6 s, not the default 45 s.
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "1000")
        .build()?;
    inbox.migrate().await?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        term.recv().await;
        on_signal.cancel();
    });
    let handler = handler_fn(|tx, message| {
        Box::pin(async move {
            let payload: serde_json::Value = message.payload_json()?;
            let n = payload["n"]
                .as_i64()
                .ok_or_else(|| HandlerError::permanent("no n in the payload"))?;
            let aggregate = message.key_str().unwrap_or_default().to_string();
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT last_n FROM aggregate_state WHERE aggregate = $1 FOR UPDATE",
            )
            .bind(&aggregate)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(last) = last.filter(|&last| n <= last) {
                sqlx::query(
                    "INSERT INTO order_violations (event_id, aggregate, n, after_n) VALUES ($1, $2, $3, $4)",
                )
                .bind(message.id())
                .bind(&aggregate)
                .bind(n)
                .bind(last)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO aggregate_state (aggregate, last_n) VALUES ($1, $2)
                 ON CONFLICT (aggregate) DO UPDATE SET last_n = greatest(aggregate_state.last_n, $2)",
            )
            .bind(&aggregate)
            .bind(n)
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO effects (event_id, aggregate, n) VALUES ($1, $2, $3)")
                .bind(message.id())
                .bind(&aggregate)
                .bind(n)
                .execute(&mut *tx)
                .await?;
            Ok::<_, HandlerError>(())
        })
    });
    inbox.run(handler, shutdown).await?;
    Ok(())
}
