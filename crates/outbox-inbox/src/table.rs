//! The inbox table: one row per (consumer, event id) that was processed or
//! dead-lettered.

use std::time::Duration;

use outbox_core::TableRef;
use sqlx::{Connection, PgConnection, PgPool};

use crate::InboxError;

/// `public.outbox_inbox`, the default inbox table.
pub fn default_table() -> TableRef {
    TableRef {
        schema: "public".into(),
        name: "outbox_inbox".into(),
    }
}

/// Creates the inbox table and its index if they do not exist.
///
/// Safe to run twice and from several processes at once (it serializes on an advisory
/// lock). The table:
///
/// ```sql
/// CREATE TABLE "public"."outbox_inbox" (
///     consumer     text        NOT NULL,  -- the consumer name: one inbox per consumer
///     event_id     uuid        NOT NULL,  -- the message's `id` header
///     processed_at timestamptz NOT NULL DEFAULT now(),
///     status       text        NOT NULL DEFAULT 'processed'
///                  CHECK (status IN ('processed', 'dead_lettered')),
///     PRIMARY KEY (consumer, event_id)
/// );
/// CREATE INDEX "outbox_inbox_processed_at_idx" ON "public"."outbox_inbox" (consumer, processed_at);
/// ```
pub async fn migrate(conn: &mut PgConnection, table: &TableRef) -> Result<(), InboxError> {
    let doing = "creating the inbox table";
    let database = |source| InboxError::Database { doing, source };
    let mut tx = conn.begin().await.map_err(database)?;
    // "already exists, skipping" notices on every start would only be noise in the
    // application's log.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await
        .map_err(database)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("outbox.inbox.migrate:{table}"))
        .execute(&mut *tx)
        .await
        .map_err(database)?;
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE TABLE IF NOT EXISTS {} (
            consumer text NOT NULL,
            event_id uuid NOT NULL,
            processed_at timestamptz NOT NULL DEFAULT now(),
            status text NOT NULL DEFAULT 'processed'
                CHECK (status IN ('processed', 'dead_lettered')),
            PRIMARY KEY (consumer, event_id)
        )",
        table.qualified()
    ))))
    .execute(&mut *tx)
    .await
    .map_err(database)?;
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE INDEX IF NOT EXISTS {} ON {} (consumer, processed_at)",
        table.derived("processed_at_idx"),
        table.qualified()
    ))))
    .execute(&mut *tx)
    .await
    .map_err(database)?;
    tx.commit().await.map_err(database)?;
    Ok(())
}

/// Rows deleted per statement by the purge, so that it never holds many locks at once.
const PURGE_BATCH: i64 = 5_000;

/// Deletes `consumer`'s inbox rows older than `older_than`; returns how many.
///
/// A message whose row is gone is no longer recognised as a duplicate: keep rows
/// longer than a duplicate can arrive (the time a consumer may lag or be down, plus
/// how far back anyone may reset the group's offsets).
pub async fn purge_expired(
    pool: &PgPool,
    table: &TableRef,
    consumer: &str,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {t}
             WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2)
             LIMIT $3))",
        t = table.qualified()
    );
    let mut deleted = 0;
    loop {
        let batch = sqlx::query(sqlx::AssertSqlSafe(String::from(&sql)))
            .bind(consumer)
            .bind(older_than.as_secs_f64())
            .bind(PURGE_BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += batch;
        if batch < PURGE_BATCH as u64 {
            return Ok(deleted);
        }
    }
}

/// The statements the inbox runs, with the table name quoted once.
pub(crate) struct Statements {
    pub(crate) claim: String,
    pub(crate) dead_letter: String,
    pub(crate) probe: String,
}

impl Statements {
    pub(crate) fn new(table: &TableRef) -> Statements {
        let t = table.qualified();
        Statements {
            // Blocks while another transaction holds the same id, then inserts nothing
            // if that one committed: the same event is never applied twice, even by two
            // consumers that briefly overlap during a rebalance.
            claim: format!(
                "INSERT INTO {t} (consumer, event_id, status) VALUES ($1, $2, 'processed')
                 ON CONFLICT (consumer, event_id) DO NOTHING"
            ),
            dead_letter: format!(
                "INSERT INTO {t} (consumer, event_id, status) VALUES ($1, $2, 'dead_lettered')
                 ON CONFLICT (consumer, event_id) DO NOTHING"
            ),
            probe: format!("SELECT 1 FROM {t} LIMIT 0"),
        }
    }
}
