//! `outbox status`.

use outbox_postgres::LeaderLock;
use outbox_relay::{RelayConfig, RelayError};

use crate::database::open_read_only_store;

pub(crate) async fn status(config: &RelayConfig, json: bool) -> Result<(), RelayError> {
    let (mut conn, store) = open_read_only_store(config).await?;
    let stats = store.stats(&mut conn).await?;
    let parked = store
        .parked_aggregates(&mut conn, config.on_dead_letter)
        .await?
        .len();
    let lock = LeaderLock::new(&config.table);
    let holder = lock.holder(&mut conn).await?;
    let standbys: Vec<_> = lock
        .relays(&mut conn)
        .await?
        .into_iter()
        .filter(|relay| !relay.active)
        .map(|relay| relay.session)
        .collect();
    let database = outbox_postgres_cdc::slot::current_database(&mut conn)
        .await
        .map_err(|e| RelayError::Store(e.into()))?;
    // This table's slot and every other outbox slot of the database, used or not: a
    // slot left behind by a relay that is gone keeps its WAL until it is dropped.
    let own_slot = outbox_postgres_cdc::CdcNames::for_table(&database, &config.table).slot;
    let slots = outbox_postgres_cdc::slot::outbox_slots(&mut conn)
        .await
        .map_err(|e| RelayError::Store(e.into()))?;
    if json {
        let slot_json = |name: &String, slot: &outbox_postgres_cdc::slot::SlotStatus| {
            serde_json::json!({
                "name": name,
                "this_table": *name == own_slot,
                "active": slot.active,
                "wal_status": slot.wal_status,
                "retained_wal_bytes": slot.retained_bytes,
                "confirmed_flush_lsn": slot.confirmed_flush_lsn,
                "lag_bytes": slot.lag_bytes,
            })
        };
        let session_json = |h: &outbox_postgres::LockHolder| {
            serde_json::json!({
                "pid": h.pid,
                "application_name": h.application_name,
                "client_addr": h.client_addr,
                "since": h.since.map(|t| t.to_rfc3339()),
            })
        };
        let value = serde_json::json!({
            "table": config.table.to_string(),
            "pending": stats.pending,
            "oldest_pending_age_seconds": stats.oldest_pending_age_secs,
            "retrying": stats.retrying,
            "dead_lettered": stats.dead_lettered,
            "parked_aggregates": parked,
            "active_relay": holder.as_ref().map(session_json),
            "standby_relays": standbys.iter().map(session_json).collect::<Vec<_>>(),
            "cdc_slot": slots.iter().find(|(name, _)| *name == own_slot).map(|(name, slot)| slot_json(name, slot)),
            "outbox_slots": slots.iter().map(|(name, slot)| slot_json(name, slot)).collect::<Vec<_>>(),
        });
        println!("{value:#}");
        return Ok(());
    }
    println!("outbox table {}", config.table);
    if slots.iter().any(|(name, _)| *name == own_slot) {
        println!("  (CDC mode never marks rows: `pending` counts the rows in the table)");
    }
    println!("  pending:       {}", stats.pending);
    if stats.pending > 0 {
        println!("  oldest:        {:.1} s", stats.oldest_pending_age_secs);
    } else {
        println!("  oldest:        - (nothing pending)");
    }
    println!("  retrying:      {}", stats.retrying);
    println!(
        "  dead letters:  {}{}",
        stats.dead_lettered,
        if stats.dead_lettered > 0 {
            "  (outbox dead-letters list)"
        } else {
            ""
        }
    );
    if parked > 0 {
        println!("  parked:        {parked} aggregate(s): their events wait behind a retry or a dead letter");
    }
    match holder {
        Some(h) => println!(
            "  active relay:  backend pid {} ({}, {}) since {}",
            h.pid,
            h.application_name,
            h.client_addr.as_deref().unwrap_or("local socket"),
            h.since.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        None => println!("  active relay:  none"),
    }
    for h in &standbys {
        println!(
            "  standby relay: backend pid {} ({}, {}) since {}",
            h.pid,
            h.application_name,
            h.client_addr.as_deref().unwrap_or("local socket"),
            h.since.map(|t| t.to_rfc3339()).unwrap_or_default()
        );
    }
    if slots.is_empty() {
        println!("replication slots of outbox tables in database {database:?}: none");
        return Ok(());
    }
    println!("replication slots of outbox tables in database {database:?}:");
    for (name, slot) in &slots {
        println!(
            "  {name}{}: {}, wal_status {}, retains {} of WAL, confirmed up to {} ({} bytes behind)",
            if *name == own_slot { " (this table)" } else { "" },
            if slot.active { "streaming" } else { "not streaming" },
            slot.wal_status.as_deref().unwrap_or("?"),
            human_bytes(slot.retained_bytes.unwrap_or(0)),
            slot.confirmed_flush_lsn.as_deref().unwrap_or("?"),
            slot.lag_bytes.unwrap_or(0),
        );
        if !slot.active {
            println!(
                "    it keeps this WAL until a CDC relay reads it; if none will, drop it: SELECT pg_drop_replication_slot('{name}');"
            );
        }
    }
    Ok(())
}

/// `1536` → `1.5 KiB`.
fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}
