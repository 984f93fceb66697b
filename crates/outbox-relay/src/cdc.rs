//! CDC mode: the active relay reads outbox inserts from the table's logical replication
//! slot and publishes them through the same sink, routing and retry policy as polling.
//!
//! Positions: rows arrive in commit order. A batch collects rows (of one or several
//! transactions) until it is full or the stream pauses; it is published, every event is
//! acknowledged (or dead-lettered), and only then is the end LSN of the last complete
//! transaction in the batch confirmed to Postgres. After a crash, Postgres resends
//! everything after the confirmed position: duplicates, never loss. A transaction that
//! rolled back is never sent by pgoutput (protocol version 1 sends a transaction at
//! commit), so it publishes nothing, however large.

use std::time::Duration;

use outbox_core::{Action, StoredEvent};
use outbox_postgres_cdc::slot::{ensure_publication, ensure_slot, slot_status};
use outbox_postgres_cdc::{CdcError, CdcEvent, CdcNames, CdcStream, Lsn};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::{sleep_or_shutdown, LeadEnd, Relay};
use crate::RelayError;

/// How long a batch waits for more rows when the stream pauses inside a transaction
/// (its rows are still coming). After a commit it waits for nothing: what is already
/// received joins the batch, and the producer's linger does the rest of the batching.
const FLUSH_AFTER: Duration = Duration::from_millis(2);
/// The longest a batch collects rows before it is published, however busy the stream:
/// bounds the latency a steady trickle of events would otherwise add.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(5);

impl Relay<'_> {
    pub(crate) async fn lead_cdc(
        &self,
        conn: &mut PgConnection,
        names: &CdcNames,
        shutdown: &CancellationToken,
    ) -> LeadEnd {
        if let Err(end) = self.check_slot(conn, names).await {
            return end;
        }
        let mut stream = match CdcStream::start(
            self.config.database_url.expose(),
            names,
            self.config.table.clone(),
        )
        .await
        {
            Ok(stream) => stream,
            Err(err) => return cdc_end(err),
        };
        info!(slot = %names.slot, publication = %names.publication, "streaming outbox inserts from the replication slot");
        let mut batch: Vec<StoredEvent> = Vec::new();
        // End LSN of the last complete transaction whose rows are all in `batch`.
        let mut confirm_after: Option<Lsn> = None;
        let mut in_transaction = false;
        let mut batch_started: Option<std::time::Instant> = None;
        let mut next_purge = std::time::Instant::now();
        loop {
            if std::time::Instant::now() >= next_purge {
                next_purge = std::time::Instant::now() + Duration::from_secs(60);
                match self
                    .store
                    .purge_older_than(conn, self.config.retention)
                    .await
                {
                    Ok(0) => {}
                    Ok(purged) => info!(purged, "purged outbox rows past their retention"),
                    Err(err) => return LeadEnd::Lost(err.into()),
                }
            }
            let idle = batch.is_empty() && confirm_after.is_none();
            let next = if idle {
                tokio::select! {
                    next = stream.next() => Some(next),
                    _ = tokio::time::sleep(self.config.cdc_heartbeat) => {
                        // A non-transactional logical message comes back through the slot
                        // as a position we may confirm, even when the database's traffic
                        // is all in other tables (which the slot skips, holding WAL).
                        if let Err(err) = sqlx::query("SELECT pg_logical_emit_message(false, 'outbox-heartbeat', '')")
                            .execute(&mut *conn)
                            .await
                        {
                            return LeadEnd::Lost(RelayError::Store(err.into()));
                        }
                        continue;
                    }
                    _ = shutdown.cancelled() => {
                        stream.shutdown().await;
                        return LeadEnd::Shutdown;
                    }
                }
            } else {
                let waited = batch_started.map(|t| t.elapsed()).unwrap_or_default();
                let pause = if in_transaction {
                    FLUSH_AFTER
                } else {
                    Duration::ZERO
                };
                match MAX_BATCH_WAIT.checked_sub(waited) {
                    // A zero timeout still polls the stream once: rows already
                    // received are taken, and only then does the batch go.
                    Some(left) if !left.is_zero() => {
                        tokio::time::timeout(pause.min(left), stream.next())
                            .await
                            .ok()
                    }
                    _ => None,
                }
            };
            let mut flush = next.is_none();
            match next {
                None => {}
                Some(Ok(Some(event))) => match event {
                    CdcEvent::Begin => in_transaction = true,
                    CdcEvent::Row(row) => {
                        if batch.is_empty() {
                            batch_started = Some(std::time::Instant::now());
                        }
                        batch.push(row)
                    }
                    CdcEvent::Commit { end_lsn } => {
                        in_transaction = false;
                        confirm_after = Some(end_lsn);
                    }
                    CdcEvent::Idle { wal_end } => {
                        // Nothing in flight: the slot may move on, so an idle outbox next
                        // to a busy database does not hold WAL back.
                        if idle && !in_transaction {
                            stream.confirm(wal_end);
                        }
                    }
                    CdcEvent::RejectedUpdate { id } => {
                        self.metrics.rejected_updates.inc();
                        warn!(?id, "an outbox row was UPDATEd; outbox rows are immutable events, so the update is not published (insert a new event instead)");
                    }
                },
                Some(Ok(None)) => {
                    return LeadEnd::Lost(RelayError::Other(
                        "the server ended the replication stream".into(),
                    ))
                }
                Some(Err(err)) => return cdc_end(err),
            }
            if batch.len() >= self.config.batch_size as usize {
                flush = true;
            }
            if flush && (!batch.is_empty() || confirm_after.is_some()) {
                let events = std::mem::take(&mut batch);
                batch_started = None;
                if !self.deliver_until_done(events, shutdown).await {
                    // Stopped while retrying: nothing more is confirmed; the next relay
                    // starts from the last confirmed position.
                    stream.shutdown().await;
                    return LeadEnd::Shutdown;
                }
                if let Some(lsn) = confirm_after.take() {
                    stream.confirm(lsn);
                }
            }
        }
    }

    /// Refuses an invalidated slot; creates a missing publication or slot when the role
    /// may (otherwise `outbox migrate --cdc` must be run by one that may).
    async fn check_slot(&self, conn: &mut PgConnection, names: &CdcNames) -> Result<(), LeadEnd> {
        let status = slot_status(conn, names)
            .await
            .map_err(|e| LeadEnd::Lost(RelayError::Store(e.into())))?;
        match status {
            Some(status) if status.is_lost() => Err(LeadEnd::Fatal(RelayError::SlotLost(
                CdcError::SlotLost {
                    slot: names.slot.clone(),
                    detail: "pg_replication_slots.wal_status = 'lost'".into(),
                }
                .to_string(),
            ))),
            Some(_) => Ok(()),
            None => {
                let created = async {
                    ensure_publication(conn, &self.config.table, names).await?;
                    ensure_slot(conn, names).await
                }
                .await;
                match created {
                    Ok(_) => {
                        info!(slot = %names.slot, "created the replication slot");
                        Ok(())
                    }
                    Err(err) => Err(LeadEnd::Fatal(RelayError::Config(format!(
                        "the replication slot {:?} does not exist and this role cannot create it ({err}); run `outbox migrate --cdc` as the outbox table's owner with the REPLICATION attribute",
                        names.slot
                    )))),
                }
            }
        }
    }

    /// Publishes `events` until each one is acknowledged or dead-lettered, retrying with
    /// backoff in between. Returns false if `shutdown` interrupted the retries.
    async fn deliver_until_done(
        &self,
        mut events: Vec<StoredEvent>,
        shutdown: &CancellationToken,
    ) -> bool {
        let started = std::time::Instant::now();
        while !events.is_empty() {
            let (actions, outcomes) = self.deliver(&events).await;
            self.record(&actions, &outcomes);
            let mut retry = Vec::new();
            let mut wait = Duration::ZERO;
            for (mut event, action) in events.into_iter().zip(actions) {
                match action {
                    Action::Published { .. } => {}
                    Action::DeadLetter {
                        attempts, error, ..
                    } => loop {
                        let recorded = async {
                            let mut conn = self.pool.acquire().await?;
                            self.store
                                .record_dead_letter(&mut conn, &event, attempts, &error)
                                .await
                        }
                        .await;
                        match recorded {
                            Ok(()) => break,
                            Err(err) => {
                                // The position is not confirmed before the dead letter is
                                // stored, so keep trying rather than drop it.
                                warn!(%err, id = %event.id, "cannot store a dead letter yet; retrying");
                                sleep_or_shutdown(Duration::from_secs(1), shutdown).await;
                                if shutdown.is_cancelled() {
                                    return false;
                                }
                            }
                        }
                    },
                    Action::Retry {
                        attempts, backoff, ..
                    } => {
                        event.attempts = attempts;
                        wait = wait.max(backoff);
                        retry.push(event);
                    }
                }
            }
            events = retry;
            if !events.is_empty() {
                sleep_or_shutdown(wait, shutdown).await;
                if shutdown.is_cancelled() {
                    return false;
                }
            }
        }
        self.metrics
            .batch_duration
            .observe(started.elapsed().as_secs_f64());
        true
    }
}

fn cdc_end(err: CdcError) -> LeadEnd {
    match err {
        CdcError::SlotLost { .. } => LeadEnd::Fatal(RelayError::SlotLost(err.to_string())),
        other => LeadEnd::Lost(RelayError::Other(other.to_string())),
    }
}
