//! The rows `outbox verify` audits: a read-only query, so a role with SELECT alone (on
//! the table and on its migrations table) can run the audit.

use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{AuditRow, TableRef};
use sqlx::{Acquire, PgConnection, Row};

use crate::schema::check_version;
use crate::Error;

/// Which rows to audit, by `created_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CreatedWindow {
    /// Every retained row.
    #[default]
    All,
    /// Rows written during the last `Duration`, by the database's clock.
    Since(Duration),
    /// Rows with `from <= created_at < to`; an open end is unbounded.
    Between {
        /// The earliest `created_at` included; `None` for no lower bound.
        from: Option<DateTime<Utc>>,
        /// The first `created_at` left out; `None` for no upper bound.
        to: Option<DateTime<Utc>>,
    },
}

/// The audited rows, in `seq` order, and the bounds they were selected with.
#[derive(Debug, Clone)]
pub struct AuditRows {
    /// The rows of the window, in `seq` order.
    pub rows: Vec<AuditRow>,
    /// The database's clock when the rows were read; ages are measured from it.
    pub read_at: DateTime<Utc>,
    /// The window's bounds as applied (a `Since` window resolved against `read_at`).
    pub from: Option<DateTime<Utc>>,
    /// The window's end as applied (exclusive); `None` when it has none.
    pub to: Option<DateTime<Utc>>,
}

/// Reads the rows of `window` from `table`: ids, order, aggregate and the relay's
/// bookkeeping (published, dead-lettered), with each row's age. One read-only
/// transaction, so the rows and `read_at` are one consistent snapshot.
///
/// # Errors
///
/// [`Error::TableMissing`] (or outdated) when the table is not migrated;
/// [`Error::MissingPrivilege`] when the role cannot SELECT from it.
pub async fn read_audit_rows(
    conn: &mut PgConnection,
    table: &TableRef,
    window: CreatedWindow,
) -> Result<AuditRows, Error> {
    check_version(conn, table).await?;
    let can_select: bool = sqlx::query_scalar("SELECT has_table_privilege($1, 'SELECT')")
        .bind(table.qualified())
        .fetch_one(&mut *conn)
        .await?;
    if !can_select {
        let role: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut *conn)
            .await?;
        return Err(Error::MissingPrivilege {
            role,
            privilege: "SELECT",
            table: table.clone(),
        });
    }
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // now() is the transaction's start: one clock for the window and every age.
    let read_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let (from, to) = match window {
        CreatedWindow::All => (None, None),
        CreatedWindow::Since(since) => {
            let since = chrono::Duration::from_std(since).unwrap_or(chrono::Duration::MAX);
            (read_at.checked_sub_signed(since), None)
        }
        CreatedWindow::Between { from, to } => (from, to),
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "SELECT id, seq, aggregatetype, aggregateid,
                published_at IS NOT NULL AS marked_published,
                dead_lettered_at IS NOT NULL AS dead_lettered,
                dead_letter_retried_at IS NOT NULL AS retried,
                (published_at IS NULL AND dead_lettered_at IS NULL
                 AND next_attempt_at IS NOT NULL) AS waiting,
                greatest(extract(epoch FROM now() - created_at), 0)::float8 AS age
         FROM {}
         WHERE ($1::timestamptz IS NULL OR created_at >= $1)
           AND ($2::timestamptz IS NULL OR created_at < $2)
         ORDER BY seq",
        table.qualified()
    ))))
    .bind(from)
    .bind(to)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let rows = rows
        .iter()
        .map(|row| {
            Ok(AuditRow {
                id: row.try_get("id")?,
                seq: row.try_get("seq")?,
                aggregate_type: row.try_get("aggregatetype")?,
                aggregate_id: row.try_get("aggregateid")?,
                marked_published: row.try_get("marked_published")?,
                dead_lettered: row.try_get("dead_lettered")?,
                age: Duration::from_secs_f64(row.try_get::<f64, _>("age")?),
                retried_dead_letter: row.try_get("retried")?,
                waiting: row.try_get("waiting")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(AuditRows {
        rows,
        read_at,
        from,
        to,
    })
}
