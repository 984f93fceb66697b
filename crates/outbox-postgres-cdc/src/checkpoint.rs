//! The relay's durable CDC position, kept in `<table>_cdc_checkpoint`.
//!
//! A new replication slot sees only what commits after it was made. Rows committed
//! before (pending rows of a table that moves from polling to CDC, rows written before
//! the first relay made its slot) and rows committed while a slot was missing (dropped
//! by mistake, or left behind in a failover, since PostgreSQL 15 does not copy logical
//! slots to standbys) would never be read. The checkpoint says what to publish from the
//! table instead, so that nothing committed is skipped.
//!
//! Its watermark `X` is a 64-bit transaction id: every transaction below `X` had
//! finished when it was taken. The active relay takes a [`Probe`] (`X` = the oldest
//! transaction still running, and the WAL position `P` a moment later) and records `X`
//! once it has confirmed a position at or past `P`: a transaction below `X` wrote its
//! commit record before `P`, so its rows were published. Rows are matched to the
//! watermark by the transaction that wrote them (`xmin`); sequence numbers would not
//! do, since a transaction may take a low `seq` and commit late.

use chrono::{DateTime, Utc};
use outbox_core::TableRef;
use sqlx::{PgConnection, Row};

use crate::Lsn;

/// What must be published from the table before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backfill {
    /// Nothing: the slot holds every row not yet published.
    None,
    /// A new slot: pending rows of transactions below the watermark (those that may have
    /// committed before the slot existed).
    Before,
    /// The slot vanished: every row of the transactions at or after the watermark.
    After,
}

impl Backfill {
    fn as_str(self) -> &'static str {
        match self {
            Backfill::None => "none",
            Backfill::Before => "before",
            Backfill::After => "after",
        }
    }

    fn parse(text: &str) -> Result<Self, sqlx::Error> {
        match text {
            "none" => Ok(Backfill::None),
            "before" => Ok(Backfill::Before),
            "after" => Ok(Backfill::After),
            other => Err(sqlx::Error::Protocol(format!(
                "unknown checkpoint backfill state {other:?}"
            ))),
        }
    }
}

/// The checkpoint of a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// A 64-bit transaction id (`xid8`); see the module documentation.
    pub xmin_watermark: u64,
    pub confirmed_lsn: Lsn,
    pub updated_at: DateTime<Utc>,
    pub backfill: Backfill,
}

/// A candidate watermark: valid once the relay confirmed `lsn` or later.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    pub lsn: Lsn,
    pub xmin_watermark: u64,
}

fn checkpoint_table(table: &TableRef) -> String {
    table.derived_qualified("cdc_checkpoint")
}

/// Takes a probe. The statement's snapshot (and so the oldest running transaction) is
/// taken before `pg_current_wal_lsn()` is evaluated, so every transaction below the
/// watermark wrote its commit record before `lsn`. Inside a REPEATABLE READ
/// transaction, the watermark is that of the transaction's snapshot.
pub async fn probe(conn: &mut PgConnection) -> Result<Probe, sqlx::Error> {
    let row = sqlx::query(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin,
                pg_current_wal_lsn()::text AS lsn",
    )
    .fetch_one(&mut *conn)
    .await?;
    let xmin: String = row.try_get("xmin")?;
    let lsn: String = row.try_get("lsn")?;
    Ok(Probe {
        lsn: parse_lsn(&lsn)?,
        xmin_watermark: parse_xid(&xmin)?,
    })
}

pub async fn read(
    conn: &mut PgConnection,
    table: &TableRef,
    slot: &str,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "SELECT xmin_watermark::text AS xmin, confirmed_lsn::text AS lsn, updated_at, backfill
         FROM {} WHERE slot_name = $1",
        checkpoint_table(table)
    ))))
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let xmin: String = row.try_get("xmin")?;
    let lsn: String = row.try_get("lsn")?;
    let backfill: String = row.try_get("backfill")?;
    Ok(Some(Checkpoint {
        xmin_watermark: parse_xid(&xmin)?,
        confirmed_lsn: parse_lsn(&lsn)?,
        updated_at: row.try_get("updated_at")?,
        backfill: Backfill::parse(&backfill)?,
    }))
}

/// Records that every transaction below `xmin_watermark` has been published and that
/// the relay confirmed `lsn`; nothing is left to publish from the table.
pub async fn write(
    conn: &mut PgConnection,
    table: &TableRef,
    slot: &str,
    xmin_watermark: u64,
    lsn: Lsn,
) -> Result<(), sqlx::Error> {
    upsert(conn, table, slot, xmin_watermark, lsn, Backfill::None).await
}

async fn upsert(
    conn: &mut PgConnection,
    table: &TableRef,
    slot: &str,
    xmin_watermark: u64,
    lsn: Lsn,
    backfill: Backfill,
) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "INSERT INTO {} (slot_name, xmin_watermark, confirmed_lsn, updated_at, backfill)
         VALUES ($1, $2::text::xid8, $3::text::pg_lsn, now(), $4)
         ON CONFLICT (slot_name) DO UPDATE
         SET xmin_watermark = excluded.xmin_watermark, confirmed_lsn = excluded.confirmed_lsn,
             updated_at = excluded.updated_at, backfill = excluded.backfill",
        checkpoint_table(table)
    ))))
    .bind(slot)
    .bind(xmin_watermark.to_string())
    .bind(lsn.to_string())
    .bind(backfill.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Before a slot is made: what the new slot will not hold must be published from the
/// table. Called by whoever creates the slot, before creating it.
pub(crate) async fn before_slot_creation(
    conn: &mut PgConnection,
    table: &TableRef,
    slot: &str,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let previous = read(conn, table, slot).await?;
    if let Some(previous) = &previous {
        if previous.backfill == Backfill::None {
            // The slot vanished: republish what came after the last checkpoint. Its
            // time is kept, to tell whether those rows may have been purged since.
            sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
                "UPDATE {} SET backfill = 'after' WHERE slot_name = $1",
                checkpoint_table(table)
            ))))
            .bind(slot)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(previous)
}

/// After a slot was made: with no checkpoint (or a first start that never finished),
/// the pending rows of every transaction that may have committed before the slot
/// existed are to be published from the table.
pub(crate) async fn after_slot_creation(
    conn: &mut PgConnection,
    table: &TableRef,
    slot: &str,
    previous: Option<&Checkpoint>,
) -> Result<(), sqlx::Error> {
    if previous.is_some_and(|p| p.backfill != Backfill::Before) {
        return Ok(());
    }
    let probe = probe(conn).await?;
    upsert(
        conn,
        table,
        slot,
        probe.xmin_watermark,
        probe.lsn,
        Backfill::Before,
    )
    .await
}

pub(crate) fn parse_lsn(text: &str) -> Result<Lsn, sqlx::Error> {
    Lsn::parse(text).map_err(|e| sqlx::Error::Protocol(format!("LSN {text:?}: {e}")))
}

fn parse_xid(text: &str) -> Result<u64, sqlx::Error> {
    text.parse()
        .map_err(|e| sqlx::Error::Protocol(format!("xid8 {text:?}: {e}")))
}
