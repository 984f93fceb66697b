//! Synchronous standbys, as the primary sees them.
//!
//! A logical walsender sends a transaction once its commit is flushed on the primary,
//! without waiting for the synchronous standbys (PostgreSQL 17 added
//! `synchronized_standby_slots` for that; 15 and 16 have nothing). The writer's
//! commit does wait, so a relay that published at once could put on the broker a
//! transaction that a failover to the standby then loses. The relay therefore holds a
//! batch until [`SynchronousStandbys::flushed`] passes it.

use sqlx::PgConnection;

use crate::checkpoint::parse_lsn;
use crate::Lsn;

/// What one look at `pg_stat_replication` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SynchronousStandbys {
    /// `synchronous_standby_names` is empty: commits wait for no standby.
    NotConfigured,
    /// This role may not see the walsenders' positions (it needs `pg_read_all_stats`,
    /// which `pg_monitor` includes).
    Hidden,
    Configured {
        /// The position every synchronous standby has flushed (the lowest of theirs;
        /// with `ANY n`, every quorum member, which is stricter than the commit's
        /// wait). `None` while no synchronous standby is connected.
        flushed: Option<Lsn>,
        /// The primary's own flushed position: at or past every transaction the
        /// stream has sent so far.
        local_flush: Lsn,
    },
}

/// Looks at the synchronous standbys, leaving out the walsender of `own_slot` (a
/// subscriber can be named a synchronous standby, and the relay must not wait for
/// itself).
pub async fn synchronous_standbys(
    conn: &mut PgConnection,
    own_slot: &str,
) -> Result<SynchronousStandbys, sqlx::Error> {
    let (configured, hidden, flushed, local_flush): (bool, bool, Option<String>, String) =
        sqlx::query_as(
            "WITH senders AS (
                 SELECT sync_state, flush_lsn FROM pg_stat_replication
                 WHERE pid IS DISTINCT FROM
                       (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1)
             )
             SELECT current_setting('synchronous_standby_names') <> '',
                    EXISTS (SELECT 1 FROM senders WHERE sync_state IS NULL),
                    (SELECT min(flush_lsn)::text FROM senders
                     WHERE sync_state IN ('sync', 'quorum')),
                    pg_current_wal_flush_lsn()::text",
        )
        .bind(own_slot)
        .fetch_one(conn)
        .await?;
    if !configured {
        return Ok(SynchronousStandbys::NotConfigured);
    }
    if hidden {
        return Ok(SynchronousStandbys::Hidden);
    }
    Ok(SynchronousStandbys::Configured {
        flushed: flushed.as_deref().map(parse_lsn).transpose()?,
        local_flush: parse_lsn(&local_flush)?,
    })
}
