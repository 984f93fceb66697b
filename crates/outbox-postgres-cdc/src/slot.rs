//! The publication and the replication slot of an outbox table.

use chrono::{DateTime, Utc};
use outbox_core::{quote_ident, TableRef};
use sqlx::{PgConnection, Row};

use crate::checkpoint::{self, Backfill};

/// Names of the publication and slot of one outbox table.
#[derive(Debug, Clone, PartialEq)]
pub struct CdcNames {
    pub publication: String,
    pub slot: String,
}

impl CdcNames {
    /// Defaults derived from the table: the publication `<table>_pub` in schema `public`,
    /// `<schema>_<table>_pub` elsewhere (publications belong to the database, so two
    /// schemas' outbox tables need two names), and the slot
    /// `outbox_<database>_<schema>_<table>` (slots belong to the whole server; slot names
    /// allow only lower-case letters, digits and underscores).
    pub fn for_table(database: &str, table: &TableRef) -> Self {
        let slot: String = format!("outbox_{}_{}_{}", database, table.schema, table.name)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(63)
            .collect();
        let publication = if table.schema == "public" {
            table.derived_name("pub")
        } else {
            let mut name = format!("{}_{}_pub", table.schema, table.name);
            while name.len() > 63 {
                name.pop();
            }
            name
        };
        CdcNames { publication, slot }
    }
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotStatus {
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the slot holds back: bytes between the current WAL position and the
    /// confirmed position.
    pub lag_bytes: Option<i64>,
    /// WAL PostgreSQL keeps on disk for the slot: bytes from the slot's restart
    /// position to the current WAL position.
    pub retained_bytes: Option<i64>,
    pub active: bool,
}

impl SlotStatus {
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// Why the publication or slot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Streaming from it would filter out every row while the slot moves on.
    #[error("the publication {publication:?} exists but does not publish {table}, so the relay would read nothing from it; add the table (ALTER PUBLICATION {quoted} ADD TABLE {qualified}) or drop the publication if nothing else uses it, then start again")]
    PublicationWithoutTable {
        publication: String,
        quoted: String,
        table: TableRef,
        qualified: String,
    },
}

/// Creates the publication (inserts and updates of the outbox table only; updates are
/// published so that the relay can refuse them loudly), or checks that the existing one
/// publishes the table. Returns true if created.
pub async fn ensure_publication(
    conn: &mut PgConnection,
    table: &TableRef,
    names: &CdcNames,
) -> Result<bool, SetupError> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(&names.publication)
            .fetch_one(&mut *conn)
            .await?;
    if exists {
        let covers: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                            WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
        )
        .bind(&names.publication)
        .bind(&table.schema)
        .bind(&table.name)
        .fetch_one(&mut *conn)
        .await?;
        if !covers {
            return Err(SetupError::PublicationWithoutTable {
                publication: names.publication.clone(),
                quoted: quote_ident(&names.publication),
                table: table.clone(),
                qualified: table.qualified(),
            });
        }
        return Ok(false);
    }
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update')",
        quote_ident(&names.publication),
        table.qualified()
    ))))
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// What [`ensure_slot`] found or did.
#[derive(Debug, Clone, PartialEq)]
pub enum SlotCreation {
    Existed,
    /// A first slot for the table: its checkpoint says to publish from the table the
    /// pending rows that may have committed before it.
    Created,
    /// The table had a checkpoint but no slot: the slot vanished, and its checkpoint
    /// says to publish again every row after `last_checkpoint`.
    Recreated {
        last_checkpoint: DateTime<Utc>,
    },
}

/// Creates the logical replication slot (pgoutput) if it does not exist, and records in
/// the table's checkpoint what the new slot cannot hold (see [`crate::checkpoint`]), so
/// that the relay publishes it from the table before it streams. A slot that Postgres
/// invalidated still exists: it is never re-created here (see [`slot_status`]).
pub async fn ensure_slot(
    conn: &mut PgConnection,
    table: &TableRef,
    names: &CdcNames,
) -> Result<SlotCreation, sqlx::Error> {
    if slot_status(conn, names).await?.is_some() {
        return Ok(SlotCreation::Existed);
    }
    let previous = checkpoint::before_slot_creation(conn, table, &names.slot).await?;
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&names.slot)
        .execute(&mut *conn)
        .await?;
    checkpoint::after_slot_creation(conn, table, &names.slot, previous.as_ref()).await?;
    Ok(match previous {
        Some(previous) if previous.backfill != Backfill::Before => SlotCreation::Recreated {
            last_checkpoint: previous.updated_at,
        },
        _ => SlotCreation::Created,
    })
}

/// The columns [`slot_from_row`] reads (a macro, so that queries stay `&'static str`).
macro_rules! slot_columns {
    () => {
        "wal_status, confirmed_flush_lsn::text AS confirmed,
         pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 AS lag,
         pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 AS retained, active"
    };
}

/// The slot of `names`, if it exists.
pub async fn slot_status(
    conn: &mut PgConnection,
    names: &CdcNames,
) -> Result<Option<SlotStatus>, sqlx::Error> {
    let row = sqlx::query(concat!(
        "SELECT ",
        slot_columns!(),
        " FROM pg_replication_slots WHERE slot_name = $1"
    ))
    .bind(&names.slot)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| slot_from_row(&row)).transpose()
}

/// Every replication slot of the current database named as the relay names its slots
/// (`outbox_...`), used or not, by name: a slot nobody reads keeps its WAL forever.
pub async fn outbox_slots(
    conn: &mut PgConnection,
) -> Result<Vec<(String, SlotStatus)>, sqlx::Error> {
    let rows = sqlx::query(concat!(
        "SELECT slot_name::text AS name, ",
        slot_columns!(),
        " FROM pg_replication_slots
         WHERE database = current_database() AND slot_type = 'logical'
           AND starts_with(slot_name::text, 'outbox_')
         ORDER BY slot_name"
    ))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("name")?, slot_from_row(row)?)))
        .collect()
}

fn slot_from_row(row: &sqlx::postgres::PgRow) -> Result<SlotStatus, sqlx::Error> {
    Ok(SlotStatus {
        wal_status: row.try_get("wal_status")?,
        confirmed_flush_lsn: row.try_get("confirmed")?,
        lag_bytes: row.try_get("lag")?,
        retained_bytes: row.try_get("retained")?,
        active: row.try_get("active")?,
    })
}

/// The database `conn` is connected to (part of the default slot name).
pub async fn current_database(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_legal_slot_and_publication_names() {
        let names = CdcNames::for_table("app", &TableRef::new("Sales-EU", "Out Box").unwrap());
        assert_eq!(names.slot, "outbox_app_sales_eu_out_box");
        assert_eq!(names.publication, "Sales-EU_Out Box_pub");
        let public = CdcNames::for_table("app", &TableRef::new("public", "outbox").unwrap());
        assert_eq!(public.publication, "outbox_pub");
        let long = CdcNames::for_table("app", &TableRef::new("s", "x".repeat(63)).unwrap());
        assert!(long.slot.len() <= 63);
    }
}
