//! One active relay per outbox table, by a session-level advisory lock.
//!
//! The lock lives as long as the connection that took it: when a relay dies, Postgres
//! closes its session and releases the lock, and a standby polling for it takes over.

use chrono::{DateTime, Utc};
use outbox_core::TableRef;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::Error;

/// First key of the two-key advisory lock form: "outb" in ASCII, so our locks are easy to
/// tell apart in `pg_locks`.
const LOCK_CLASS: i32 = 0x6f75_7462;

/// The relay leadership lock of one outbox table.
#[derive(Debug, Clone)]
pub struct LeaderLock {
    name: String,
    /// A shared lock every relay of the table holds, active or standby, so that the
    /// standbys can be listed (they hold nothing else while they wait).
    presence: String,
}

/// A relay of the table, found by [`LeaderLock::relays`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelaySession {
    /// The session that announced the relay (its leadership connection).
    pub session: LockHolder,
    /// True for the one holding the leadership lock.
    pub active: bool,
}

/// The session that holds a leadership lock.
#[derive(Debug, Clone, PartialEq)]
pub struct LockHolder {
    /// The holding session's backend process id (what `pg_terminate_backend` takes).
    pub pid: i32,
    /// The `application_name` the holder connected with.
    pub application_name: String,
    /// The holder's client address; `None` over a Unix socket, or when this role may not
    /// see it.
    pub client_addr: Option<String>,
    /// When the holder's session started (`backend_start`): it has held the lock for at
    /// most that long. `None` when this role may not see it.
    pub since: Option<DateTime<Utc>>,
}

impl LockHolder {
    /// From a row of `pg_stat_activity`'s `pid`, `application_name`, `client_addr` (as
    /// text) and `backend_start`.
    fn from_row(row: &PgRow) -> Result<Self, Error> {
        Ok(LockHolder {
            pid: row.try_get("pid")?,
            application_name: row.try_get("application_name")?,
            client_addr: row.try_get("client_addr")?,
            since: row.try_get("backend_start")?,
        })
    }
}

impl LeaderLock {
    /// The lock of `table`'s relay. Creating it takes nothing; see
    /// [`LeaderLock::try_acquire`].
    pub fn new(table: &TableRef) -> Self {
        LeaderLock {
            name: format!("outbox.relay:{table}"),
            presence: format!("outbox.relay-present:{table}"),
        }
    }

    /// Announces the session of `conn` as a relay of the table, active or not, until
    /// it closes: a shared lock, which never waits and never makes anyone wait.
    pub async fn announce(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("SELECT pg_advisory_lock_shared($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(&self.presence)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Every relay of the table now connected: the active one first, then the
    /// standbys, oldest session first. A relay of a version that does not announce
    /// itself is listed only while it is the active one.
    pub async fn relays(&self, conn: &mut PgConnection) -> Result<Vec<RelaySession>, Error> {
        let rows = sqlx::query(
            "WITH ours AS (
                 SELECT l.pid, bool_or(l.objid = hashtext($2)::oid AND l.mode = 'ExclusiveLock') AS active
                 FROM pg_locks l
                 WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::int4::oid
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND l.objsubid = 2 AND l.objid IN (hashtext($2)::oid, hashtext($3)::oid)
                 GROUP BY l.pid
             )
             SELECT o.pid, o.active, a.application_name, host(a.client_addr) AS client_addr,
                    a.backend_start
             FROM ours o JOIN pg_stat_activity a ON a.pid = o.pid
             ORDER BY o.active DESC, a.backend_start, o.pid",
        )
        .bind(LOCK_CLASS)
        .bind(&self.name)
        .bind(&self.presence)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RelaySession {
                    session: LockHolder::from_row(row)?,
                    active: row.try_get("active")?,
                })
            })
            .collect()
    }

    /// Takes the lock on `conn` if it is free. The lock is held until `conn` closes or
    /// [`LeaderLock::release`] is called on the same connection.
    pub async fn try_acquire(&self, conn: &mut PgConnection) -> Result<bool, Error> {
        Ok(
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(LOCK_CLASS)
                .bind(&self.name)
                .fetch_one(&mut *conn)
                .await?,
        )
    }

    /// Releases the lock. Only works on the connection that took it; closing that
    /// connection releases it as well.
    pub async fn release(&self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(&self.name)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// True if the session of `conn` still holds the lock (false after the database
    /// restarted or terminated the session).
    pub async fn is_held(&self, conn: &mut PgConnection) -> Result<bool, Error> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
                   AND classid = $1::int4::oid AND objid = hashtext($2)::oid AND objsubid = 2)",
        )
        .bind(LOCK_CLASS)
        .bind(&self.name)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// Who holds the lock now, if anyone. Advisory locks belong to a database: a table
    /// of the same name in another database has a relay of its own.
    pub async fn holder(&self, conn: &mut PgConnection) -> Result<Option<LockHolder>, Error> {
        let row = sqlx::query(
            "SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr,
                    a.backend_start
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid
                   FROM pg_database WHERE datname = current_database())
               AND l.classid = $1::int4::oid AND l.objid = hashtext($2)::oid AND l.objsubid = 2",
        )
        .bind(LOCK_CLASS)
        .bind(&self.name)
        .fetch_optional(&mut *conn)
        .await?;
        row.as_ref().map(LockHolder::from_row).transpose()
    }
}
