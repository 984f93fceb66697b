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
//!
//! Parking: when an event fails (or, with `delivery.on_dead_letter = "park"`, is
//! dead-lettered), its aggregate is parked. Its failed event and every later row of it
//! from the stream wait in the table (`next_attempt_at` set, written before the
//! position past them is confirmed), and are published from there in `seq` order, the
//! way polling does, while every other aggregate keeps streaming. Once no row of it
//! waits, it streams again. Only an unreachable broker holds the whole stream (in
//! memory): it says nothing about any one event.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_core::{Action, DeadLetterPolicy, DeliveryOutcome, ErrorKind, StoredEvent};
use outbox_postgres::{Aggregate, Fetch, OnPublish, Waiting, WrittenBy};
use outbox_postgres_cdc::checkpoint::{self, Backfill, Checkpoint, Probe};
use outbox_postgres_cdc::slot::{
    ensure_publication, ensure_slot, slot_status, SetupError, SlotCreation,
};
use outbox_postgres_cdc::standby::{synchronous_standbys, SynchronousStandbys};
use outbox_postgres_cdc::{CdcError, CdcEvent, CdcNames, CdcStream, Lsn};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::engine::{sleep_or_shutdown, LeadEnd, Relay};
use crate::source::Source;
use crate::RelayError;

/// How long a batch waits for more rows when the stream pauses inside a transaction
/// (its rows are still coming). After a commit it waits for nothing: what is already
/// received joins the batch, and the producer's linger does the rest of the batching.
const FLUSH_AFTER: Duration = Duration::from_millis(2);
/// The longest a batch collects rows before it is published, however busy the stream:
/// bounds the latency a steady trickle of events would otherwise add.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(5);
/// How often the active relay moves its durable checkpoint (a probe, then one small
/// upsert once the relay confirmed past it). It bounds what a vanished slot republishes.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// With no synchronous standby configured, how long until the relay looks again
/// (`synchronous_standby_names` changes with a reload, not per transaction).
const STANDBYS_RECHECK: Duration = Duration::from_secs(1);
/// The longest pause between two looks at the standbys while a batch waits for them.
const STANDBY_WAIT_STEP: Duration = Duration::from_millis(20);
/// A batch held this long by the standbys is worth a warning.
const STANDBY_WARN_AFTER: Duration = Duration::from_secs(10);

/// Moves the checkpoint: a probe is taken every [`CHECKPOINT_INTERVAL`] and written
/// once the relay has confirmed a position at or past it.
struct CheckpointTracker {
    probe: Option<Probe>,
    next_probe: Instant,
}

impl CheckpointTracker {
    fn new() -> Self {
        CheckpointTracker {
            probe: None,
            next_probe: Instant::now() + CHECKPOINT_INTERVAL,
        }
    }
}

impl Relay<'_> {
    pub(crate) async fn lead_cdc(
        &self,
        conn: &mut PgConnection,
        names: &CdcNames,
        shutdown: &CancellationToken,
    ) -> LeadEnd {
        if let Err(end) = self.prepare_slot(conn, names, shutdown).await {
            return end;
        }
        let connect = match crate::engine::connect_options(self.config) {
            Ok(connect) => connect,
            Err(err) => return LeadEnd::Fatal(err),
        };
        let stream = match CdcStream::start(
            &connect,
            names,
            self.config.table.clone(),
            &self.config.postgres.replication_session_options(),
        )
        .await
        {
            Ok(stream) => stream,
            Err(err) => {
                self.health.replication.failed(err.to_string());
                return cdc_end(err);
            }
        };
        self.health.replication.ok(self.health.started());
        info!(slot = %names.slot, publication = %names.publication, "streaming outbox inserts from the replication slot");
        let parked = match self.parked_aggregates(conn).await {
            Ok(parked) => parked,
            Err(end) => {
                stream.shutdown().await;
                return end;
            }
        };
        if !parked.is_empty() {
            info!(
                aggregates = parked.len(),
                "some aggregates are parked: their events wait in the table (`outbox dead-letters list` shows dead letters to retry or skip)"
            );
        }
        let mut source = CdcSource {
            relay: self,
            parked,
            next_drain: Instant::now(),
            conn,
            names,
            stream: Some(stream),
            checkpoints: CheckpointTracker::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            confirm_after: None,
            in_transaction: false,
            batch_started: None,
            in_flight: None,
            retry: Vec::new(),
            retry_at: None,
            standbys_unconfigured_until: None,
            ended_ahead: None,
        };
        let end = self.pump(&mut source, shutdown).await;
        // A stream that still works reports its last confirmed position before it ends
        // (nothing past what was recorded: the next relay starts from there).
        if let Some(stream) = source.stream.take() {
            stream.shutdown().await;
        }
        end
    }

    /// After `lsn` was confirmed: writes the pending probe as the new checkpoint if the
    /// relay is now past it.
    async fn confirmed(
        &self,
        conn: &mut PgConnection,
        names: &CdcNames,
        checkpoints: &mut CheckpointTracker,
        lsn: Lsn,
    ) -> Result<(), LeadEnd> {
        let Some(probe) = checkpoints.probe else {
            return Ok(());
        };
        if lsn < probe.lsn {
            return Ok(());
        }
        checkpoint::write(
            conn,
            &self.config.table,
            &names.slot,
            probe.xmin_watermark,
            lsn,
        )
        .await
        .map_err(|err| LeadEnd::Lost(RelayError::Store(err.into())))?;
        checkpoints.probe = None;
        checkpoints.next_probe = Instant::now() + CHECKPOINT_INTERVAL;
        Ok(())
    }

    /// Makes sure the publication covers the table and the slot exists, and publishes
    /// from the table what the slot cannot hold (see `outbox_postgres_cdc::checkpoint`):
    ///
    /// - a new slot (made here or by `outbox migrate --cdc`): the pending rows that may
    ///   have committed before it (`outbox migrate` without `--cdc`, or a table that
    ///   moves from polling with rows still pending);
    /// - a vanished slot (a checkpoint, but no slot): every row after the checkpoint;
    /// - an invalidated slot: WAL is gone; the relay stops (exit 3) with the recovery.
    async fn prepare_slot(
        &self,
        conn: &mut PgConnection,
        names: &CdcNames,
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        let table = &self.config.table;
        let objects = set_up(conn, table, names)
            .await
            .map_err(|err| match err.kind() {
                crate::Failure::Transient => LeadEnd::Lost(err),
                _ => LeadEnd::Fatal(err),
            })?;
        if objects.publication_created {
            info!(
                publication = %names.publication,
                %table,
                "created the publication (`outbox migrate --cdc` creates it ahead of time); if CDC mode is given up, drop it: DROP PUBLICATION {}",
                outbox_core::quote_ident(&names.publication)
            );
        }
        if objects.slot == SlotCreation::Created {
            info!(
                slot = %names.slot,
                %table,
                "created the replication slot (`outbox migrate --cdc` creates it ahead of time); it keeps WAL on the server until a relay reads it, also while no relay runs: if CDC mode is given up, drop it: SELECT pg_drop_replication_slot('{}')",
                names.slot
            );
        }
        let store_err = |err: sqlx::Error| LeadEnd::Lost(RelayError::Store(err.into()));
        let written = match checkpoint::read(conn, table, &names.slot)
            .await
            .map_err(store_err)?
        {
            // A slot made before checkpoints existed (or by hand): every pending row.
            None => WrittenBy::Any,
            Some(saved) => match saved.backfill {
                Backfill::None => return Ok(()),
                Backfill::Before => WrittenBy::Below(saved.xmin_watermark),
                Backfill::After => {
                    self.metrics.slots_recreated.inc();
                    error!(
                        slot = %names.slot,
                        checkpoint = %saved.updated_at,
                        "the replication slot had vanished (dropped, or lost in a failover to a standby); a new one was made, and every row committed after the last checkpoint is published again before streaming"
                    );
                    self.check_rows_retained(names, &saved)?;
                    self.check_no_writer_deletes(conn, names).await?;
                    WrittenBy::AtOrAfter(saved.xmin_watermark)
                }
            },
        };
        self.backfill(names, written, shutdown).await
    }

    /// Writers that delete their own rows (insert and delete in one transaction, say)
    /// leave nothing in the table to republish the gap from: stop (exit 3) rather than
    /// guess.
    async fn check_no_writer_deletes(
        &self,
        conn: &mut PgConnection,
        names: &CdcNames,
    ) -> Result<(), LeadEnd> {
        let since = outbox_postgres::writer_deletes_since(conn, &self.config.table)
            .await
            .map_err(|err| LeadEnd::Lost(err.into()))?;
        let Some(since) = since else {
            return Ok(());
        };
        Err(LeadEnd::Fatal(RelayError::SlotLost(format!(
            "the replication slot {slot:?} vanished, and rows of {table} have been deleted by writers (first at {since}), so the events it did not publish may be gone from the table; nothing is republished automatically. Recovery: check the broker against your own records, publish what is missing, then set the checkpoint's backfill to 'none' (UPDATE {checkpoint} SET backfill = 'none' WHERE slot_name = '{slot}') and start the relay again (see README, \"First start, and a vanished slot\")",
            slot = names.slot,
            table = self.config.table,
            checkpoint = self.config.table.derived_qualified("cdc_checkpoint"),
        ))))
    }

    /// The rows a vanished slot did not deliver must still be in the table. Rows older
    /// than the retention may have been purged, so a checkpoint that old cannot be
    /// trusted: stop (exit 3) with the recovery rather than guess.
    fn check_rows_retained(&self, names: &CdcNames, saved: &Checkpoint) -> Result<(), LeadEnd> {
        let age = (chrono::Utc::now() - saved.updated_at)
            .to_std()
            .unwrap_or_default();
        if age < self.config.retention {
            return Ok(());
        }
        Err(LeadEnd::Fatal(RelayError::SlotLost(format!(
            "the replication slot {slot:?} vanished and the relay's last checkpoint ({at}) is older than the retention ({retention}), so rows it did not publish may have been purged from the table; nothing is republished automatically. Recovery: check the broker against the table (`outbox verify`), publish what is missing, then remove the old checkpoint (DELETE FROM {table} WHERE slot_name = '{slot}') and start the relay again (see README, \"CDC slot vanished\")",
            slot = names.slot,
            at = saved.updated_at,
            retention = humantime_serde::re::humantime::format_duration(self.config.retention),
            table = self.config.table.derived_qualified("cdc_checkpoint"),
        ))))
    }

    /// Publishes from the table the rows the slot may not hold (`written`), from
    /// one snapshot taken after the slot exists: a row committed before the snapshot is
    /// read here, one committed after it comes through the slot, so none is skipped
    /// (some arrive twice). Then writes the checkpoint for that snapshot.
    async fn backfill(
        &self,
        names: &CdcNames,
        written: WrittenBy,
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        let store_err = |err: sqlx::Error| LeadEnd::Lost(RelayError::Store(err.into()));
        let mut conn = self.pool.acquire().await.map_err(store_err)?;
        let mut tx = conn.begin().await.map_err(store_err)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(store_err)?;
        // The first query fixes the snapshot; its oldest running transaction is the
        // watermark of the checkpoint written once the snapshot's rows are published.
        let probe = checkpoint::probe(&mut tx).await.map_err(store_err)?;
        let mut parked = {
            let mut conn = self.pool.acquire().await.map_err(store_err)?;
            self.parked_aggregates(&mut conn).await?
        };
        let mut after = 0;
        let mut published = 0;
        loop {
            let page = self
                .store
                .unpublished_page(&mut tx, written, after, self.config.batch_size as i64)
                .await
                .map_err(|err| LeadEnd::Lost(err.into()))?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            published += page.len();
            let page = self.wait_if_parked(&parked, page).await?;
            self.deliver_until_done(page, &mut parked, shutdown).await?;
        }
        tx.commit().await.map_err(store_err)?;
        // Every transaction below the snapshot's watermark is now published: by the slot's
        // earlier stream, by polling, or just now. With `Below(w)`, rows at or after `w`
        // are still to come through the slot, so `w` itself is the watermark.
        let watermark = match written {
            WrittenBy::Below(xid) => xid,
            WrittenBy::Any | WrittenBy::AtOrAfter(_) => probe.xmin_watermark,
        };
        checkpoint::write(
            &mut conn,
            &self.config.table,
            &names.slot,
            watermark,
            probe.lsn,
        )
        .await
        .map_err(store_err)?;
        info!(
            published,
            ?written,
            "published from the table the rows the slot may not hold"
        );
        Ok(())
    }

    /// Publishes `events` until each one is acknowledged, dead-lettered or parked,
    /// retrying with backoff in between (the backfill's loop; streaming goes through
    /// [`CdcSource`]).
    /// Ends with `LeadEnd::Shutdown` if `shutdown` interrupted the retries, and
    /// `LeadEnd::Fatal` if a dead letter cannot be stored for a reason that retrying
    /// cannot fix (a missing privilege, say).
    async fn deliver_until_done(
        &self,
        mut events: Vec<StoredEvent>,
        parked: &mut HashSet<Aggregate>,
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        let started = std::time::Instant::now();
        while !events.is_empty() {
            let (actions, outcomes) = self.deliver(&events).await;
            if self.sink.is_fenced() {
                return Err(LeadEnd::Lost(RelayError::Fenced));
            }
            self.record(&actions, &outcomes);
            parked.extend(self.parked_by(&events, &actions));
            let (retry, wait) = self.settle(events, &actions, shutdown).await?;
            events = self.wait_if_parked(parked, retry).await?;
            if !events.is_empty() {
                sleep_or_shutdown(wait, shutdown).await;
                if shutdown.is_cancelled() {
                    return Err(LeadEnd::Shutdown);
                }
            }
        }
        self.metrics
            .batch_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Stores the dead letters of one delivery round (before any position past them is
    /// confirmed) and returns the events to try again, with the longest of their
    /// backoffs.
    async fn settle(
        &self,
        events: Vec<StoredEvent>,
        actions: &[Action],
        shutdown: &CancellationToken,
    ) -> Result<(Vec<StoredEvent>, Duration), LeadEnd> {
        let mut retry = Vec::new();
        let mut wait = Duration::ZERO;
        for (mut event, action) in events.into_iter().zip(actions) {
            match action {
                Action::Published { .. } => {}
                Action::DeadLetter {
                    attempts, error, ..
                } => loop {
                    crash_point!("relay-dead-letter-write");
                    let recorded = async {
                        let mut conn = self.pool.acquire().await?;
                        self.store
                            .record_dead_letter(&mut conn, &event, *attempts, error)
                            .await
                    }
                    .await;
                    match recorded {
                        Ok(()) => break,
                        Err(outbox_postgres::Error::Database(err)) if is_permanent(&err) => {
                            // Nothing is confirmed past it: the event comes back after
                            // the fix.
                            return Err(LeadEnd::Fatal(RelayError::Config(format!(
                                "cannot store the dead letter of event {} in {}: {err}; grant the relay's role INSERT and UPDATE on the table (see README, \"CDC mode\"), then start it again",
                                event.id, self.config.table
                            ))));
                        }
                        Err(err) => {
                            // The position is not confirmed before the dead letter is
                            // stored, so keep trying rather than drop it.
                            warn!(%err, id = %event.id, "cannot store a dead letter yet; retrying");
                            sleep_or_shutdown(Duration::from_secs(1), shutdown).await;
                            if shutdown.is_cancelled() {
                                return Err(LeadEnd::Shutdown);
                            }
                        }
                    }
                },
                Action::Retry {
                    attempts, backoff, ..
                } => {
                    event.attempts = *attempts;
                    wait = wait.max(*backoff);
                    retry.push(event);
                }
            }
        }
        Ok((retry, wait))
    }

    /// The aggregates a batch's outcome parks: those of its dead letters, when dead
    /// letters park.
    fn parked_by(&self, events: &[StoredEvent], actions: &[Action]) -> Vec<Aggregate> {
        if self.config.on_dead_letter != DeadLetterPolicy::Park {
            return Vec::new();
        }
        events
            .iter()
            .zip(actions)
            .filter(|(_, action)| matches!(action, Action::DeadLetter { .. }))
            .map(|(event, _)| aggregate_of(event))
            .collect()
    }

    /// The parked aggregates, as the table says.
    async fn parked_aggregates(
        &self,
        conn: &mut PgConnection,
    ) -> Result<HashSet<Aggregate>, LeadEnd> {
        self.store
            .parked_aggregates(conn, self.config.on_dead_letter)
            .await
            .map_err(|err| LeadEnd::Lost(err.into()))
    }

    /// Keeps the events of parked aggregates waiting in the table, and returns the
    /// others.
    async fn wait_if_parked(
        &self,
        parked: &HashSet<Aggregate>,
        events: Vec<StoredEvent>,
    ) -> Result<Vec<StoredEvent>, LeadEnd> {
        // The usual case, without a lookup per event.
        if parked.is_empty() {
            return Ok(events);
        }
        let (waiting, rest): (Vec<_>, Vec<_>) = events
            .into_iter()
            .partition(|event| parked.contains(&aggregate_of(event)));
        if !waiting.is_empty() {
            let rows: Vec<Waiting> = waiting.iter().map(behind_its_aggregate).collect();
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(|err| LeadEnd::Lost(RelayError::Store(err.into())))?;
            self.store
                .keep_waiting(&mut conn, &rows)
                .await
                .map_err(|err| LeadEnd::Lost(err.into()))?;
        }
        Ok(rest)
    }
}

fn aggregate_of(event: &StoredEvent) -> Aggregate {
    (event.aggregate_type.clone(), event.aggregate_id.clone())
}

/// An event that waits behind its aggregate's earlier ones, with no failure of its own.
fn behind_its_aggregate(event: &StoredEvent) -> Waiting<'_> {
    Waiting {
        event,
        attempts: event.attempts,
        backoff: None,
        error: None,
    }
}

/// Where the batch given out came from.
#[derive(Debug, Clone, Copy)]
enum InFlight {
    /// The stream: the position to confirm once the batch is done.
    Stream(Option<Lsn>),
    /// Rows waiting in the table.
    Table,
}

/// CDC as a [`Source`]: rows in commit order from the table's replication slot. A batch
/// collects rows (of one or several transactions) until it is full or the stream
/// pauses; once every event of it is published, dead-lettered or waiting in the table
/// (parked), the end LSN of the last complete transaction in it is confirmed. Between
/// stream batches, the rows waiting in the table go out as batches of their own. Only
/// when the broker cannot be reached are a batch's events retried in memory, the stream
/// waiting.
pub(crate) struct CdcSource<'r, 'c> {
    relay: &'r Relay<'r>,
    /// Aggregates whose rows wait in the table: their stream rows join them there.
    parked: HashSet<Aggregate>,
    /// When to look for waiting rows that are due next.
    next_drain: Instant,
    /// The leader's connection: checkpoint probes and heartbeats.
    conn: &'c mut PgConnection,
    names: &'r CdcNames,
    /// `None` once it failed (nothing left to shut down).
    stream: Option<CdcStream>,
    checkpoints: CheckpointTracker,
    /// Rows read and not yet given out.
    batch: Vec<StoredEvent>,
    batch_bytes: u64,
    /// End LSN of the last complete transaction whose rows are all in `batch`.
    confirm_after: Option<Lsn>,
    in_transaction: bool,
    batch_started: Option<Instant>,
    /// The batch given out and not yet done.
    in_flight: Option<InFlight>,
    /// Its events to try again, and when.
    retry: Vec<StoredEvent>,
    retry_at: Option<Instant>,
    /// No synchronous standby was configured at the last look: none is awaited until.
    standbys_unconfigured_until: Option<Instant>,
    /// How the stream ended while reading ahead, given out by the next `next_batch`
    /// (after the batch being published then is recorded).
    ended_ahead: Option<StreamEnd>,
}

/// How the stream ended.
enum StreamEnd {
    /// The server ended it.
    Closed,
    Failed(CdcError),
}

impl CdcSource<'_, '_> {
    /// The stream failed: nothing to shut down later.
    fn failed(&mut self, err: CdcError) -> LeadEnd {
        self.relay.health.replication.failed(err.to_string());
        self.stream = None;
        cdc_end(err)
    }

    /// The server ended the stream.
    fn closed(&mut self) -> LeadEnd {
        self.relay
            .health
            .replication
            .failed("the server ended the replication stream");
        self.stream = None;
        LeadEnd::Lost(RelayError::StreamEnded)
    }

    /// Takes one event of the stream into the batch being collected. An idle position
    /// is returned, not confirmed: only the caller knows whether nothing is in flight.
    fn take(&mut self, event: CdcEvent) -> Option<Lsn> {
        let relay = self.relay;
        if matches!(event, CdcEvent::Idle { .. } | CdcEvent::Commit { .. }) {
            relay.health.replication.ok(relay.health.started());
        }
        match event {
            CdcEvent::Begin => self.in_transaction = true,
            CdcEvent::Row(row) => {
                if self.batch.is_empty() {
                    self.batch_started = Some(Instant::now());
                }
                self.batch_bytes += row.weight();
                self.batch.push(row)
            }
            CdcEvent::Commit { end_lsn } => {
                self.in_transaction = false;
                self.confirm_after = Some(end_lsn);
            }
            CdcEvent::Idle { wal_end } => return Some(wal_end),
            CdcEvent::Waiting {
                aggregate_type,
                aggregate_id,
            } => {
                // Published from the table (a retried dead letter): its
                // aggregate's later rows wait behind it.
                self.parked.insert((aggregate_type, aggregate_id));
                self.next_drain = Instant::now();
            }
            CdcEvent::RejectedUpdate { id } => {
                relay.metrics.rejected_updates.inc();
                warn!(?id, "an outbox row was UPDATEd; outbox rows are immutable events, so the update is not published (insert a new event instead)");
            }
        }
        None
    }

    /// Confirms `lsn` to PostgreSQL, then moves the checkpoint if it is now behind.
    async fn confirm(&mut self, lsn: Lsn) -> Result<(), LeadEnd> {
        self.stream.as_mut().expect("a working stream").confirm(lsn);
        self.relay
            .confirmed(&mut *self.conn, self.names, &mut self.checkpoints, lsn)
            .await
    }

    fn lost_store(err: impl Into<RelayError>) -> LeadEnd {
        LeadEnd::Lost(err.into())
    }

    /// Holds a batch until every synchronous standby has flushed it (see
    /// `outbox_postgres_cdc::standby`). `through` is the end of the batch's last
    /// transaction, or `None` when the batch ends inside one: its commit position is
    /// not known yet, but the primary's flushed position is past it.
    async fn wait_for_synchronous_standbys(
        &mut self,
        through: Option<Lsn>,
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        let relay = self.relay;
        if !relay.config.cdc_wait_for_synchronous_standbys
            || self
                .standbys_unconfigured_until
                .is_some_and(|until| Instant::now() < until)
        {
            return Ok(());
        }
        let started = Instant::now();
        let mut target = through;
        let mut pause = Duration::from_millis(1);
        let mut warned = false;
        loop {
            let standbys = synchronous_standbys(self.conn, &self.names.slot)
                .await
                .map_err(|err| LeadEnd::Lost(RelayError::Store(err.into())))?;
            let (flushed, target) = match standbys {
                SynchronousStandbys::NotConfigured => {
                    self.standbys_unconfigured_until = Some(Instant::now() + STANDBYS_RECHECK);
                    return Ok(());
                }
                SynchronousStandbys::Hidden => {
                    return Err(LeadEnd::Fatal(RelayError::Config(
                        "the server has synchronous standbys (synchronous_standby_names), and the relay's role cannot see how far they are (pg_stat_replication's positions), so it cannot tell when a failover would keep a transaction; grant the role pg_monitor (GRANT pg_monitor TO <role>), or set cdc.wait_for_synchronous_standbys = false to publish without waiting for them (see README, \"Synchronous standbys\")".into(),
                    )));
                }
                SynchronousStandbys::Configured {
                    flushed,
                    local_flush,
                } => (flushed, *target.get_or_insert(local_flush)),
            };
            self.standbys_unconfigured_until = None;
            if flushed.is_some_and(|flushed| flushed >= target) {
                relay
                    .metrics
                    .standby_wait
                    .observe(started.elapsed().as_secs_f64());
                return Ok(());
            }
            if !warned && started.elapsed() >= STANDBY_WARN_AFTER {
                warned = true;
                warn!(
                    waiting_for = %target,
                    standbys_flushed = ?flushed.map(|lsn| lsn.to_string()),
                    "a batch has waited {}s for the synchronous standbys to flush it; the writers' commits wait for them too: check that the standbys named in synchronous_standby_names are connected (pg_stat_replication)",
                    STANDBY_WARN_AFTER.as_secs()
                );
            }
            sleep_or_shutdown(pause, shutdown).await;
            if shutdown.is_cancelled() {
                return Err(LeadEnd::Shutdown);
            }
            pause = (pause * 2).min(STANDBY_WAIT_STEP);
        }
    }

    /// Re-reads the parked aggregates from the table: one whose rows have all gone out
    /// (and, when dead letters park, whose dead letters were retried or skipped)
    /// streams again.
    async fn refresh_parked(&mut self) -> Result<(), LeadEnd> {
        self.parked = self.relay.parked_aggregates(self.conn).await?;
        Ok(())
    }

    /// Records the outcome of a batch from the stream: dead letters stored, failed
    /// events and their aggregates' later ones parked in the table, then the position
    /// confirmed. When the broker could not be reached, the failed events are retried
    /// in memory instead and the stream waits.
    async fn record_streamed(
        &mut self,
        lsn: Option<Lsn>,
        events: Vec<StoredEvent>,
        actions: &[Action],
        outcomes: &[DeliveryOutcome],
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        let relay = self.relay;
        self.parked.extend(relay.parked_by(&events, actions));
        let unreachable = outcomes
            .iter()
            .any(|o| matches!(o, DeliveryOutcome::Failed(e) if e.kind == ErrorKind::Unavailable));
        let retry_of: std::collections::HashMap<uuid::Uuid, (Duration, String)> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Retry {
                    id, backoff, error, ..
                } => Some((*id, (*backoff, error.clone()))),
                _ => None,
            })
            .collect();
        let (retry, wait) = relay.settle(events, actions, shutdown).await?;
        let (in_memory, to_park): (Vec<_>, Vec<_>) = retry
            .into_iter()
            .partition(|event| unreachable && !self.parked.contains(&aggregate_of(event)));
        if !to_park.is_empty() {
            let rows: Vec<Waiting> = to_park
                .iter()
                .map(|event| {
                    let (backoff, error) = &retry_of[&event.id];
                    Waiting {
                        event,
                        attempts: event.attempts,
                        backoff: Some(*backoff),
                        error: Some(error.as_str()),
                    }
                })
                .collect();
            relay
                .store
                .keep_waiting(self.conn, &rows)
                .await
                .map_err(Self::lost_store)?;
            let soonest = rows.iter().filter_map(|w| w.backoff).min();
            self.parked.extend(to_park.iter().map(aggregate_of));
            if let Some(soonest) = soonest {
                self.next_drain = self.next_drain.min(Instant::now() + soonest);
            }
        }
        if in_memory.is_empty() {
            if let Some(lsn) = lsn {
                self.confirm(lsn).await?;
            }
        } else {
            self.in_flight = Some(InFlight::Stream(lsn));
            self.retry = in_memory;
            self.retry_at = Some(Instant::now() + wait);
        }
        Ok(())
    }
}

impl Source for CdcSource<'_, '_> {
    async fn next_batch(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<StoredEvent>>, LeadEnd> {
        let relay = self.relay;
        match self.ended_ahead.take() {
            Some(StreamEnd::Closed) => return Err(self.closed()),
            Some(StreamEnd::Failed(err)) => return Err(self.failed(err)),
            None => {}
        }
        if !self.retry.is_empty() {
            let wait = self
                .retry_at
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or_default();
            sleep_or_shutdown(wait, shutdown).await;
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            return Ok(Some(std::mem::take(&mut self.retry)));
        }
        loop {
            if self.checkpoints.probe.is_none() && Instant::now() >= self.checkpoints.next_probe {
                match checkpoint::probe(self.conn).await {
                    Ok(probe) => self.checkpoints.probe = Some(probe),
                    Err(err) => return Err(LeadEnd::Lost(RelayError::Store(err.into()))),
                }
            }
            let idle = self.batch.is_empty() && self.confirm_after.is_none();
            if idle && !self.parked.is_empty() && Instant::now() >= self.next_drain {
                let (waiting, _) = relay
                    .fetch_from_table(self.conn, Fetch::Waiting, &[], relay.config.max_batch_bytes)
                    .await
                    .map_err(Self::lost_store)?;
                if !waiting.is_empty() {
                    self.in_flight = Some(InFlight::Table);
                    return Ok(Some(waiting));
                }
                // Nothing due: the parked set may have emptied (an operator skipped a
                // dead letter, say); look again after the polling interval.
                self.refresh_parked().await?;
                self.next_drain = Instant::now() + relay.config.poll_interval;
            }
            let drain_at = self.next_drain;
            let draining = !self.parked.is_empty();
            let next = if idle {
                tokio::select! {
                    next = self.stream.as_mut().expect("a working stream").next() => Some(next),
                    _ = tokio::time::sleep_until(drain_at.into()), if draining => continue,
                    _ = tokio::time::sleep(relay.config.cdc_heartbeat) => {
                        // A non-transactional logical message comes back through the slot
                        // as a position we may confirm, even when the database's traffic
                        // is all in other tables (which the slot skips, holding WAL).
                        if let Err(err) = sqlx::query("SELECT pg_logical_emit_message(false, 'outbox-heartbeat', '')")
                            .execute(&mut *self.conn)
                            .await
                        {
                            return Err(LeadEnd::Lost(RelayError::Store(err.into())));
                        }
                        continue;
                    }
                    _ = shutdown.cancelled() => return Ok(None),
                }
            } else {
                let waited = self.batch_started.map(|t| t.elapsed()).unwrap_or_default();
                let pause = if self.in_transaction {
                    FLUSH_AFTER
                } else {
                    Duration::ZERO
                };
                match MAX_BATCH_WAIT.checked_sub(waited) {
                    // A zero timeout still polls the stream once: rows already
                    // received are taken, and only then does the batch go.
                    Some(left) if !left.is_zero() => {
                        let stream = self.stream.as_mut().expect("a working stream");
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
                Some(Ok(Some(event))) => {
                    if let Some(wal_end) = self.take(event) {
                        // Nothing in flight: the slot may move on, so an idle outbox next
                        // to a busy database does not hold WAL back.
                        if idle && !self.in_transaction {
                            self.confirm(wal_end).await?;
                        }
                    }
                }
                Some(Ok(None)) => return Err(self.closed()),
                Some(Err(err)) => return Err(self.failed(err)),
            }
            if self.batch.len() >= relay.config.batch_size as usize
                || self.batch_bytes >= relay.config.cdc_max_batch_bytes
            {
                flush = true;
            }
            if flush && (!self.batch.is_empty() || self.confirm_after.is_some()) {
                let events = std::mem::take(&mut self.batch);
                self.batch_bytes = 0;
                self.batch_started = None;
                let lsn = self.confirm_after.take();
                let events = relay.wait_if_parked(&self.parked, events).await?;
                if events.is_empty() {
                    // Transactions without rows of ours: only a position to confirm.
                    if let Some(lsn) = lsn {
                        self.confirm(lsn).await?;
                    }
                    continue;
                }
                let through = if self.in_transaction { None } else { lsn };
                self.wait_for_synchronous_standbys(through, shutdown)
                    .await?;
                self.in_flight = Some(InFlight::Stream(lsn));
                return Ok(Some(events));
            }
        }
    }

    async fn record(
        &mut self,
        events: Vec<StoredEvent>,
        actions: &[Action],
        outcomes: &[DeliveryOutcome],
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        match self.in_flight.take() {
            Some(InFlight::Table) => {
                // The stream never marks rows; these were kept in the table, so they
                // are marked published there (and purged with the rest).
                self.relay
                    .record_in_table(self.conn, actions, OnPublish::Mark)
                    .await
                    .map_err(Self::lost_store)?;
                self.refresh_parked().await?;
                self.next_drain = Instant::now();
                Ok(())
            }
            Some(InFlight::Stream(lsn)) => {
                self.record_streamed(lsn, events, actions, outcomes, shutdown)
                    .await
            }
            None => unreachable!("record follows next_batch"),
        }
    }

    /// Under a backlog (a batch in flight of at least a quarter of the batch size, rows
    /// or bytes), reads the stream into the next batch while `in_flight` is published,
    /// until it is full: `batch_size` rows, or its bytes and the in-flight batch's
    /// together at `cdc.max_batch_bytes`. Without it the next batch would only begin to
    /// be read once the broker has acknowledged this one. Nothing is confirmed here,
    /// not even an idle position: the batch in flight is before it. Parked aggregates
    /// are left to the flush, after that batch is recorded. `CdcStream::next` is safe to
    /// drop at its await, as `next_batch`'s timeouts already rely on.
    async fn read_ahead(&mut self, in_flight: &[StoredEvent]) {
        let limit = self.relay.config.batch_size as usize;
        let max_bytes = self.relay.config.cdc_max_batch_bytes;
        let in_flight_bytes: u64 = in_flight.iter().map(StoredEvent::weight).sum();
        // Below a backlog the rows that come during a publish are few, and already
        // received when it ends: reading them meanwhile would only cost wake-ups
        // (bench/README.md, "Reading the stream beside the publish").
        if in_flight.len() * 4 < limit && in_flight_bytes * 4 < max_bytes {
            return;
        }
        let room = max_bytes.saturating_sub(in_flight_bytes);
        while self.ended_ahead.is_none() && self.batch.len() < limit && self.batch_bytes < room {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.next().await {
                Ok(Some(event)) => {
                    let _ = self.take(event);
                }
                Ok(None) => self.ended_ahead = Some(StreamEnd::Closed),
                Err(err) => self.ended_ahead = Some(StreamEnd::Failed(err)),
            }
        }
    }
}

/// The CDC objects of an outbox table after [`set_up`].
#[derive(Debug, Clone, PartialEq)]
pub struct CdcObjects {
    pub names: CdcNames,
    /// The publication was made just now.
    pub publication_created: bool,
    /// What became of the replication slot.
    pub slot: SlotCreation,
}

/// Makes sure the publication covers `table` and its replication slot exists: for
/// `outbox migrate --cdc` and for a CDC relay at start. A slot PostgreSQL invalidated
/// is not re-created (`SlotLost`); a role that may not create them is a configuration
/// problem that names the fix.
pub async fn set_up(
    conn: &mut PgConnection,
    table: &outbox_core::TableRef,
    names: &CdcNames,
) -> Result<CdcObjects, RelayError> {
    let database_error = |err: sqlx::Error| {
        if is_permanent(&err) {
            RelayError::Config(format!(
                "the publication {:?} or the replication slot {:?} does not exist and this role cannot create it ({err}); run `outbox migrate --cdc` as the outbox table's owner with the REPLICATION attribute (see README, \"CDC mode\")",
                names.publication, names.slot
            ))
        } else {
            RelayError::Store(err.into())
        }
    };
    let publication_created = match ensure_publication(conn, table, names).await {
        Ok(created) => created,
        Err(err @ SetupError::PublicationWithoutTable { .. }) => {
            return Err(RelayError::Config(err.to_string()))
        }
        Err(SetupError::Database(err)) => return Err(database_error(err)),
    };
    let status = slot_status(conn, names).await.map_err(database_error)?;
    if status.as_ref().is_some_and(|s| s.is_lost()) {
        return Err(RelayError::SlotLost(
            CdcError::SlotLost {
                slot: names.slot.clone(),
                detail: "pg_replication_slots.wal_status = 'lost'".into(),
            }
            .to_string(),
        ));
    }
    let slot = ensure_slot(conn, table, names)
        .await
        .map_err(database_error)?;
    Ok(CdcObjects {
        names: names.clone(),
        publication_created,
        slot,
    })
}

/// Errors that retrying cannot fix (missing privileges, objects, bad SQL): SQLSTATE
/// classes 42 (syntax or access rule) and 28 (authorization).
pub(crate) fn is_permanent(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("42") || code.starts_with("28"))
}

fn cdc_end(err: CdcError) -> LeadEnd {
    match err {
        CdcError::SlotLost { .. } => LeadEnd::Fatal(RelayError::SlotLost(err.to_string())),
        CdcError::Refused { .. } | CdcError::Url(_) => LeadEnd::Fatal(RelayError::Replication(err)),
        other => LeadEnd::Lost(RelayError::Replication(other)),
    }
}
