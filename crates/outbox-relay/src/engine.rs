//! Leadership and the polling loop.
//!
//! One relay per outbox table is active: it holds a session advisory lock
//! ([`LeaderLock`]) on a dedicated connection and does all its reads and writes of the
//! table on that same connection, so a relay that lost its session (and with it the
//! lock) cannot mark anything. Standbys try the lock every `standby_interval` and take
//! over when the active relay's session ends.
//!
//! The active relay repeats: fetch pending rows in `seq` order, route them, publish
//! them through the sink, wait for every delivery report, then record the outcome of
//! each row (published, retry later, dead letter) in one transaction. A row is marked
//! only after its delivery report, so a crash at any point leaves it pending and it is
//! published again: duplicates, never loss.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{plan_batch, Action, DeliveryError, DeliveryOutcome, Sink, StoredEvent};
use outbox_kafka::KafkaSink;
use outbox_postgres::{LeaderLock, OnPublish, PollingStore};
use outbox_postgres_cdc::CdcNames;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Mode, RelayConfig};
use crate::http::{self, Health, Role};
use crate::metrics::Metrics;
use crate::RelayError;

/// How often pending counts and ages are refreshed for the metrics.
const STATS_INTERVAL: Duration = Duration::from_secs(5);
/// How often published rows past their retention are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Wait before reconnecting after losing the database.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Runs the relay until `shutdown` is cancelled; then stops claiming, waits for the
/// deliveries in flight, records them, and returns `Ok(())`.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<(), RelayError> {
    run_with_metrics(config, Metrics::new(), shutdown).await
}

/// [`run`] with metrics the caller keeps (tests read them).
pub async fn run_with_metrics(
    config: RelayConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let connect = connect_options(&config)?;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(connect.clone())
        .await
        .map_err(|err| unreachable_database(&config, &err))?;
    let store = {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|err| unreachable_database(&config, &err))?;
        PollingStore::open(&mut conn, config.table.clone())
            .await
            .map_err(|err| match err {
                outbox_postgres::Error::Database(_) => RelayError::Store(err),
                other => RelayError::Config(other.to_string()),
            })?
    };
    let sink =
        KafkaSink::new(config.kafka.clone()).map_err(|e| RelayError::Config(e.to_string()))?;
    sink.check_connection(Duration::from_secs(10))
        .await
        .map_err(|e| RelayError::Config(e.to_string()))?;

    let health = Arc::new(Health::default());
    health.set_database_ok(true);
    if let Some(addr) = config.http_listen {
        http::serve(addr, metrics.clone(), health.clone(), shutdown.clone()).await?;
    }

    let cdc = match config.mode {
        Mode::Polling => None,
        Mode::Cdc => {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|err| unreachable_database(&config, &err))?;
            let database = outbox_postgres_cdc::slot::current_database(&mut conn)
                .await
                .map_err(|e| RelayError::Store(e.into()))?;
            Some(CdcNames::for_table(&database, &config.table))
        }
    };
    let stats_task = tokio::spawn(refresh_stats(
        pool.clone(),
        store.clone(),
        cdc.clone(),
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let relay = Relay {
        config: &config,
        store,
        sink,
        metrics,
        health,
        pool: pool.clone(),
        cdc,
    };
    let result = relay.run(connect, &shutdown).await;
    shutdown.cancel();
    let _ = stats_task.await;
    pool.close().await;
    result
}

/// Opens one connection for the administrative commands (migrate, status, dead
/// letters), with the same messages as the relay when the database cannot be reached.
pub async fn connect(config: &RelayConfig) -> Result<PgConnection, RelayError> {
    PgConnection::connect_with(&connect_options(config)?)
        .await
        .map_err(|err| unreachable_database(config, &err))
}

fn connect_options(config: &RelayConfig) -> Result<PgConnectOptions, RelayError> {
    let options = PgConnectOptions::from_str(config.database_url.expose()).map_err(|err| {
        RelayError::Config(format!(
            "database_url {} cannot be used: {err}; write it as postgres://USER[:PASSWORD]@HOST:PORT/DATABASE",
            config.database_url
        ))
    })?;
    Ok(options
        .application_name("outbox-relay")
        .log_statements(tracing::log::LevelFilter::Trace))
}

fn unreachable_database(config: &RelayConfig, err: &sqlx::Error) -> RelayError {
    RelayError::Config(format!(
        "cannot connect to PostgreSQL at {} ({err}); check database_url (--database-url or OUTBOX_DATABASE_URL) and that the server runs (scripts/services start)",
        config.database_url
    ))
}

pub(crate) struct Relay<'a> {
    pub(crate) config: &'a RelayConfig,
    pub(crate) store: PollingStore,
    pub(crate) sink: KafkaSink,
    pub(crate) metrics: Metrics,
    pub(crate) health: Arc<Health>,
    pub(crate) pool: PgPool,
    /// Set in CDC mode: the publication and slot read from.
    pub(crate) cdc: Option<CdcNames>,
}

/// Why leading stopped.
pub(crate) enum LeadEnd {
    Shutdown,
    /// Lost the database or the stream: reconnect and try for leadership again.
    Lost(RelayError),
    /// Cannot go on at all (an invalidated slot): stop the relay with this error.
    Fatal(RelayError),
}

impl Relay<'_> {
    async fn run(
        &self,
        connect: PgConnectOptions,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let lock = LeaderLock::new(&self.config.table);
        let mut announced_standby = false;
        while !shutdown.is_cancelled() {
            let mut conn = match PgConnection::connect_with(&connect).await {
                Ok(conn) => conn,
                Err(err) => {
                    self.health.set_database_ok(false);
                    warn!(%err, "cannot connect to PostgreSQL; retrying");
                    sleep_or_shutdown(RECONNECT_DELAY, shutdown).await;
                    continue;
                }
            };
            match lock.try_acquire(&mut conn).await {
                Ok(true) => {}
                Ok(false) => {
                    self.health.set_role(Role::Standby);
                    self.metrics.active.set(0);
                    if !announced_standby {
                        info!(table = %self.config.table, "another relay is active on this table; waiting as a standby");
                        announced_standby = true;
                    }
                    // Keep the connection: trying again on it is cheap. Without the lock
                    // (shutdown or a lost connection), start over.
                    if !self.standby(&mut conn, &lock, shutdown).await {
                        continue;
                    }
                }
                Err(err) => {
                    warn!(%err, "could not try the leadership lock; reconnecting");
                    sleep_or_shutdown(RECONNECT_DELAY, shutdown).await;
                    continue;
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            announced_standby = false;
            info!(table = %self.config.table, "this relay is now the active one");
            self.health.set_role(Role::Active);
            self.metrics.active.set(1);
            match self.lead(&mut conn, shutdown).await {
                LeadEnd::Shutdown => {
                    let _ = lock.release(&mut conn).await;
                    let _ = conn.close().await;
                    break;
                }
                LeadEnd::Fatal(err) => {
                    let _ = conn.close().await;
                    return Err(err);
                }
                LeadEnd::Lost(err) => {
                    self.metrics.active.set(0);
                    self.health.set_role(Role::Starting);
                    warn!(%err, "stopped leading after an error; reconnecting");
                    sleep_or_shutdown(RECONNECT_DELAY, shutdown).await;
                }
            }
        }
        info!("relay stopped");
        Ok(())
    }

    /// Waits as a standby until the lock is ours (true) or the connection or the run
    /// ended (false: reconnect or stop).
    async fn standby(
        &self,
        conn: &mut PgConnection,
        lock: &LeaderLock,
        shutdown: &CancellationToken,
    ) -> bool {
        loop {
            sleep_or_shutdown(self.config.standby_interval, shutdown).await;
            if shutdown.is_cancelled() {
                return false;
            }
            match lock.try_acquire(conn).await {
                Ok(true) => return true,
                Ok(false) => self.health.set_database_ok(true),
                Err(err) => {
                    self.health.set_database_ok(false);
                    warn!(%err, "lost the database connection while waiting as a standby");
                    return false;
                }
            }
        }
    }

    /// The active relay's loop, on the connection that holds the lock.
    async fn lead(&self, conn: &mut PgConnection, shutdown: &CancellationToken) -> LeadEnd {
        if let Some(names) = &self.cdc {
            return self.lead_cdc(conn, names, shutdown).await;
        }
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(listener) => listener,
            Err(err) => return LeadEnd::Lost(RelayError::Store(err.into())),
        };
        if let Err(err) = listener.listen(&self.config.table.notify_channel()).await {
            return LeadEnd::Lost(RelayError::Store(err.into()));
        }
        let mut next_purge = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return LeadEnd::Shutdown;
            }
            if self.config.on_publish == OnPublish::Mark && Instant::now() >= next_purge {
                next_purge = Instant::now() + PURGE_INTERVAL;
                match self
                    .store
                    .purge_published(conn, self.config.retention)
                    .await
                {
                    Ok(0) => {}
                    Ok(purged) => info!(purged, "purged published rows past their retention"),
                    Err(err) => return LeadEnd::Lost(err.into()),
                }
            }
            match self.relay_batch(conn).await {
                Ok(0) => {
                    // Idle: sleep until an insert is announced, the fallback interval
                    // passes, or we are asked to stop.
                    tokio::select! {
                        notification = listener.recv() => {
                            if let Err(err) = notification {
                                debug!(%err, "notification listener reconnecting");
                            }
                        }
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = shutdown.cancelled() => return LeadEnd::Shutdown,
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    self.health.set_database_ok(false);
                    return LeadEnd::Lost(err);
                }
            }
        }
    }

    /// Fetches, publishes and records one batch. Returns the number of rows fetched.
    async fn relay_batch(&self, conn: &mut PgConnection) -> Result<usize, RelayError> {
        let started = Instant::now();
        let events = self
            .store
            .fetch_pending(conn, self.config.batch_size as i64)
            .await?;
        self.health.set_database_ok(true);
        if events.is_empty() {
            return Ok(0);
        }
        let (actions, outcomes) = self.deliver(&events).await;
        self.store
            .apply(conn, &actions, self.config.on_publish)
            .await?;
        self.record(&actions, &outcomes);
        self.metrics
            .batch_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(events.len())
    }

    /// Routes and publishes `events`, and decides what becomes of each (an event that
    /// cannot be routed fails permanently without reaching the sink).
    pub(crate) async fn deliver(
        &self,
        events: &[StoredEvent],
    ) -> (Vec<Action>, Vec<DeliveryOutcome>) {
        let mut outcomes: Vec<Option<DeliveryOutcome>> = vec![None; events.len()];
        let mut messages = Vec::with_capacity(events.len());
        let mut sent = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            match self.config.router.route(event) {
                Ok(message) => {
                    messages.push(message);
                    sent.push(index);
                }
                Err(err) => {
                    outcomes[index] = Some(DeliveryOutcome::Failed(DeliveryError::permanent(
                        err.to_string(),
                    )));
                }
            }
        }
        if !messages.is_empty() {
            let delivered = self.sink.publish(messages).await;
            for (index, outcome) in sent.into_iter().zip(delivered) {
                outcomes[index] = Some(outcome);
            }
        }
        let outcomes: Vec<DeliveryOutcome> = outcomes
            .into_iter()
            .map(|o| o.expect("every event has an outcome"))
            .collect();
        let actions = plan_batch(&self.config.retry, events, &outcomes);
        (actions, outcomes)
    }

    pub(crate) fn record(&self, actions: &[Action], outcomes: &[DeliveryOutcome]) {
        let mut published = 0;
        for (action, outcome) in actions.iter().zip(outcomes) {
            if let DeliveryOutcome::Failed(err) = outcome {
                self.metrics.delivery_failures.inc();
                debug!(reason = %err.reason, "delivery failed");
            }
            match action {
                Action::Published { .. } => published += 1,
                Action::Retry {
                    id,
                    attempts,
                    backoff,
                    error,
                } => {
                    debug!(%id, attempts, ?backoff, %error, "will retry");
                }
                Action::DeadLetter {
                    id,
                    attempts,
                    error,
                } => {
                    self.metrics.dead_lettered.inc();
                    warn!(%id, attempts, %error, "event dead-lettered; see `outbox dead-letters list`");
                }
            }
        }
        self.metrics.published.inc_by(published);
        let failed = outcomes.len() as u64 - published;
        if failed > 0 {
            let first = outcomes.iter().find_map(|o| match o {
                DeliveryOutcome::Failed(err) => Some(err.reason.as_str()),
                DeliveryOutcome::Delivered => None,
            });
            warn!(
                failed,
                published,
                reason = first.unwrap_or(""),
                "some deliveries failed"
            );
        }
    }
}

async fn refresh_stats(
    pool: PgPool,
    store: PollingStore,
    cdc: Option<CdcNames>,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let stats = async {
            let mut conn = pool.acquire().await?;
            store.stats(&mut conn).await.map_err(|e| match e {
                outbox_postgres::Error::Database(e) => e,
                other => sqlx::Error::Protocol(other.to_string()),
            })
        }
        .await;
        if let Some(names) = &cdc {
            if let Ok(mut conn) = pool.acquire().await {
                if let Ok(Some(slot)) =
                    outbox_postgres_cdc::slot::slot_status(&mut conn, names).await
                {
                    metrics.slot_lag.set(slot.lag_bytes.unwrap_or(0));
                    metrics.slot_wal_status.reset();
                    if let Some(status) = &slot.wal_status {
                        metrics
                            .slot_wal_status
                            .with_label_values(&[status.as_str()])
                            .set(1);
                    }
                }
            }
        }
        match stats {
            Ok(stats) if cdc.is_some() => {
                // In CDC mode rows are never marked: only dead letters are meaningful.
                metrics.dead_letters.set(stats.dead_lettered);
            }
            Ok(stats) => {
                metrics.pending.set(stats.pending);
                metrics
                    .oldest_pending_age
                    .set(stats.oldest_pending_age_secs);
                metrics.retrying.set(stats.retrying);
                metrics.dead_letters.set(stats.dead_lettered);
            }
            Err(err) => {
                health.set_database_ok(false);
                debug!(%err, "could not refresh outbox statistics");
            }
        }
        sleep_or_shutdown(STATS_INTERVAL, &shutdown).await;
    }
}

pub(crate) async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = shutdown.cancelled() => {}
    }
}
