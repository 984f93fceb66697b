//! The publication and the replication slot of an outbox table.

use outbox_core::{quote_ident, TableRef};
use sqlx::{PgConnection, Row};

/// Names of the publication and slot of one outbox table.
#[derive(Debug, Clone, PartialEq)]
pub struct CdcNames {
    pub publication: String,
    pub slot: String,
}

impl CdcNames {
    /// Defaults derived from the table: `<table>_pub` and `outbox_<database>_<schema>_<table>`
    /// (slots belong to the whole server, so the database is part of the name; slot names
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
        CdcNames {
            publication: table.derived_name("pub"),
            slot,
        }
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
    pub active: bool,
}

impl SlotStatus {
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// Creates the publication (inserts and updates of the outbox table only; updates are
/// published so that the relay can refuse them loudly). Returns true if created.
pub async fn ensure_publication(
    conn: &mut PgConnection,
    table: &TableRef,
    names: &CdcNames,
) -> Result<bool, sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(&names.publication)
            .fetch_one(&mut *conn)
            .await?;
    if exists {
        return Ok(false);
    }
    sqlx::query(&format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update')",
        quote_ident(&names.publication),
        table.qualified()
    ))
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// Creates the logical replication slot (pgoutput) if it does not exist. Returns true
/// if created. A slot is never re-created by the relay after Postgres invalidated it:
/// see [`slot_status`].
pub async fn ensure_slot(conn: &mut PgConnection, names: &CdcNames) -> Result<bool, sqlx::Error> {
    if slot_status(conn, names).await?.is_some() {
        return Ok(false);
    }
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&names.slot)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

pub async fn slot_status(
    conn: &mut PgConnection,
    names: &CdcNames,
) -> Result<Option<SlotStatus>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT wal_status, confirmed_flush_lsn::text AS confirmed,
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 AS lag, active
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&names.slot)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| {
        Ok(SlotStatus {
            wal_status: row.try_get("wal_status")?,
            confirmed_flush_lsn: row.try_get("confirmed")?,
            lag_bytes: row.try_get("lag")?,
            active: row.try_get("active")?,
        })
    })
    .transpose()
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
        assert_eq!(names.publication, "Out Box_pub");
        let long = CdcNames::for_table("app", &TableRef::new("s", "x".repeat(63)).unwrap());
        assert!(long.slot.len() <= 63);
    }
}
