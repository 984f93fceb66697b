//! Embedded, versioned migrations of the outbox table. Table and schema names are
//! configurable, so the SQL is rendered from the [`TableRef`] with quoted identifiers.

use outbox_core::{quote_ident, TableRef};
use sqlx::{Acquire, PgConnection};

use crate::Error;

/// The schema version this build creates and expects.
pub const LATEST_VERSION: i32 = 3;

/// How the `payload` column stores the message value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadType {
    /// `jsonb`: JSON payloads (published as JSON text).
    #[default]
    Jsonb,
    /// `bytea`: opaque bytes, published as written.
    Bytea,
}

impl std::str::FromStr for PayloadType {
    type Err = String;

    /// `jsonb` or `bytea`, as `outbox migrate --payload-type` takes it.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "jsonb" => Ok(PayloadType::Jsonb),
            "bytea" => Ok(PayloadType::Bytea),
            other => Err(format!(
                "{other:?} is not a payload type; use jsonb or bytea"
            )),
        }
    }
}

impl PayloadType {
    /// The column's SQL type name: `jsonb` or `bytea`.
    pub fn sql_type(self) -> &'static str {
        match self {
            PayloadType::Jsonb => "jsonb",
            PayloadType::Bytea => "bytea",
        }
    }
}

fn migrations_table(table: &TableRef) -> String {
    table.derived_qualified("migrations")
}

/// Quotes a string literal for SQL (only used for names we render into DDL).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The SQL of migration `version`, or `None` past the latest.
fn migration_sql(version: i32, table: &TableRef, payload: PayloadType) -> Option<String> {
    let t = table.qualified();
    let pending = "published_at IS NULL AND dead_lettered_at IS NULL";
    match version {
        1 => Some(format!(
            r#"
CREATE TABLE {t} (
    -- The contract: any writer, in any language, inserts these columns.
    id              uuid        PRIMARY KEY,
    aggregatetype   text        NOT NULL,
    aggregateid     text        NOT NULL,
    type            text        NOT NULL,
    payload         {payload_type},
    headers         jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The relay's bookkeeping: writers leave these to their defaults.
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    published_at    timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    dead_lettered_at timestamptz
);
CREATE INDEX {pending_idx} ON {t} (seq) WHERE {pending};
CREATE INDEX {backoff_idx} ON {t} (next_attempt_at) WHERE {pending} AND next_attempt_at IS NOT NULL;
CREATE INDEX {published_idx} ON {t} (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX {dead_idx} ON {t} (dead_lettered_at) WHERE dead_lettered_at IS NOT NULL;
CREATE FUNCTION {notify_fn}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One notification per statement; Postgres folds repeats within a transaction
    -- and delivers them at commit, which is exactly when the rows become visible.
    PERFORM pg_notify({channel}, '');
    RETURN NULL;
END
$$;
CREATE TRIGGER {notify_trigger} AFTER INSERT ON {t}
    FOR EACH STATEMENT EXECUTE FUNCTION {notify_fn}();
"#,
            payload_type = payload.sql_type(),
            pending_idx = table.derived("pending_idx"),
            backoff_idx = table.derived("backoff_idx"),
            published_idx = table.derived("published_idx"),
            dead_idx = table.derived("dead_letter_idx"),
            notify_fn = table.derived_qualified("notify"),
            notify_trigger = table.derived("notify"),
            channel = quote_literal(&table.notify_channel()),
        )),
        2 => Some(format!(
            r#"
-- CDC: the active relay's durable position. When the replication slot vanishes
-- (dropped, or lost in a failover), the rows of every transaction at or after
-- `xmin_watermark` are published again from the table, so nothing is skipped.
CREATE TABLE {checkpoint} (
    slot_name      text        PRIMARY KEY,
    xmin_watermark xid8        NOT NULL,
    confirmed_lsn  pg_lsn      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- What the relay must publish from the table before it streams: 'before' (a new
    -- slot: pending rows of transactions below the watermark, which the slot may not
    -- hold), 'after' (the slot vanished: every row of the transactions at or after the
    -- watermark), or 'none'. A relay stopped in the middle starts it over.
    backfill       text        NOT NULL DEFAULT 'none'
                   CHECK (backfill IN ('none', 'before', 'after'))
);
-- Set on a row that `outbox dead-letters retry` queued again: its event is published
-- after later events of its aggregate, and its message says so.
ALTER TABLE {t} ADD COLUMN dead_letter_retried_at timestamptz;
-- When rows were first deleted by someone other than the relay (writers that insert
-- and delete in one transaction, say). A CDC slot that vanishes cannot then be
-- recovered from the table, and the relay says so instead of guessing.
CREATE TABLE {writer_deletes} (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    first_at   timestamptz
);
INSERT INTO {writer_deletes} (first_at) VALUES (NULL);
CREATE FUNCTION {writer_deletes_fn}() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    -- The relay marks its own deletes (retention, delete-on-publish, dead-letter retry).
    -- Once set, the UPDATE matches nothing: no lock, no write.
    IF coalesce(current_setting('outbox.relay_delete', true), '') <> 'on' THEN
        UPDATE {writer_deletes} SET first_at = now() WHERE first_at IS NULL;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER {writer_deletes_trigger} AFTER DELETE ON {t}
    FOR EACH STATEMENT EXECUTE FUNCTION {writer_deletes_fn}();
"#,
            checkpoint = table.derived_qualified("cdc_checkpoint"),
            t = table.qualified(),
            writer_deletes = table.derived_qualified("writer_deletes"),
            writer_deletes_fn = table.derived_qualified("note_writer_delete"),
            writer_deletes_trigger = table.derived("writer_delete"),
        )),
        3 => Some(format!(
            r#"
-- Parking: a dead letter holds its aggregate's later events back until an operator
-- retries it or skips it (`outbox dead-letters skip`), which sets this column.
ALTER TABLE {t} ADD COLUMN dead_letter_skipped_at timestamptz;
-- Dead letters from before parking existed had already let their aggregates move on.
UPDATE {t} SET dead_letter_skipped_at = dead_lettered_at WHERE dead_lettered_at IS NOT NULL;
-- The aggregates a dead letter parks, looked up on every fetch.
CREATE INDEX {parking_idx} ON {t} (aggregatetype, aggregateid)
    WHERE dead_lettered_at IS NOT NULL AND dead_letter_skipped_at IS NULL;
-- CDC: rows waiting in the table (a parked aggregate's events, retried dead letters),
-- published from here in `seq` order instead of from the replication stream.
CREATE INDEX {waiting_idx} ON {t} (seq)
    WHERE {pending} AND next_attempt_at IS NOT NULL;
"#,
            t = table.qualified(),
            parking_idx = table.derived("parking_idx"),
            waiting_idx = table.derived("waiting_idx"),
        )),
        _ => None,
    }
}

/// Creates or upgrades the outbox table, its indexes and its notification trigger.
/// Safe to run twice and from several processes at once (it serializes on an advisory
/// lock). `payload` only matters when the table is created.
///
/// Returns the versions applied by this call (empty when already up to date).
///
/// # Errors
/// [`Error::SchemaTooNew`] when a newer outbox already migrated the table;
/// [`Error::Database`] for anything the database refuses, such as a role that may not
/// create the schema or the table.
///
/// # Example
/// ```rust,no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_postgres::{migrate, PayloadType, TableRef};
///
/// let mut conn = pool.acquire().await?;
/// let table = TableRef::new("public", "outbox")?;
/// let applied = migrate(&mut conn, &table, PayloadType::Jsonb).await?;
/// println!("applied schema versions {applied:?}");
/// # Ok(())
/// # }
/// ```
pub async fn migrate(
    conn: &mut PgConnection,
    table: &TableRef,
    payload: PayloadType,
) -> Result<Vec<i32>, Error> {
    let mut tx = conn.begin().await?;
    // "already exists, skipping" notices on every start would only be noise in the
    // application's log.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("outbox.migrate:{table}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE SCHEMA IF NOT EXISTS {}",
        quote_ident(&table.schema)
    ))))
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE TABLE IF NOT EXISTS {} (
            version    integer     PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
        migrations_table(table)
    ))))
    .execute(&mut *tx)
    .await?;
    let current: i32 = sqlx::query_scalar(sqlx::AssertSqlSafe(String::from(&format!(
        "SELECT coalesce(max(version), 0) FROM {}",
        migrations_table(table)
    ))))
    .fetch_one(&mut *tx)
    .await?;
    if current > LATEST_VERSION {
        return Err(Error::SchemaTooNew {
            table: table.clone(),
            found: current,
            known: LATEST_VERSION,
        });
    }
    let mut applied = Vec::new();
    for version in current + 1..=LATEST_VERSION {
        let sql = migration_sql(version, table, payload).expect("versions up to LATEST exist");
        sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&sql)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "INSERT INTO {} (version) VALUES ($1)",
            migrations_table(table)
        ))))
        .bind(version)
        .execute(&mut *tx)
        .await?;
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// The schema version of `table`: `None` when the table was never migrated.
pub async fn schema_version(
    conn: &mut PgConnection,
    table: &TableRef,
) -> Result<Option<i32>, Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table.derived_qualified("migrations"))
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(None);
    }
    let version: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(String::from(&format!(
        "SELECT max(version) FROM {}",
        migrations_table(table)
    ))))
    .fetch_one(&mut *conn)
    .await?;
    Ok(version)
}

/// Checks that `table` exists at the version this build expects.
pub(crate) async fn check_version(conn: &mut PgConnection, table: &TableRef) -> Result<(), Error> {
    match schema_version(conn, table).await? {
        None => Err(Error::TableMissing {
            table: table.clone(),
        }),
        Some(found) if found < LATEST_VERSION => Err(Error::SchemaOutdated {
            table: table.clone(),
            found,
            needed: LATEST_VERSION,
        }),
        Some(found) if found > LATEST_VERSION => Err(Error::SchemaTooNew {
            table: table.clone(),
            found,
            known: LATEST_VERSION,
        }),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_sql_quotes_every_name() {
        let table = TableRef::new("app's", "out\"box").unwrap();
        let sql = migration_sql(1, &table, PayloadType::Bytea).unwrap();
        assert!(sql.contains(r#"CREATE TABLE "app's"."out""box""#), "{sql}");
        assert!(sql.contains("payload         bytea"));
        assert!(
            sql.contains(r#"pg_notify('outbox:app''s.out"box', '')"#),
            "{sql}"
        );
        assert!(migration_sql(LATEST_VERSION + 1, &table, PayloadType::Jsonb).is_none());
    }
}
