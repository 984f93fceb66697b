//! Leadership and the engine's loop.
//!
//! One relay per outbox table is active: it holds a session advisory lock
//! ([`LeaderLock`]) on a dedicated connection and does all its reads and writes of the
//! table on that same connection, so a relay that lost its session (and with it the
//! lock) cannot mark anything. Standbys try the lock every `standby_interval` and take
//! over when the active relay's session ends.
//!
//! The active relay runs one loop over a [`Source`] (the table, or its replication
//! stream) and the `dyn Sink`: take a batch, route and publish it, wait for every
//! acknowledgement, then let the source record the outcome of each event (published,
//! retry later, dead letter). Nothing is recorded before its acknowledgement, so a crash
//! at any point leaves it to be published again: duplicates, never loss. Maintenance
//! (the purge) runs beside the loop, as its own task.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{
    plan_batch, Action, DeadLetterPolicy, DeliveryError, DeliveryOutcome, ErrorKind, Sink,
    StoredEvent, RESERVED_HEADERS,
};
use outbox_postgres::{LeaderLock, OnPublish, PollingStore};
use outbox_postgres_cdc::CdcNames;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Mode, RelayConfig};
use crate::http::{self, Health, Role};
use crate::metrics::Metrics;
use crate::source::{PollingSource, Source};
use crate::status_page::StatusPage;
use crate::RelayError;

/// How often pending counts and ages are refreshed for the metrics.
const STATS_INTERVAL: Duration = Duration::from_secs(5);
/// How often published rows past their retention are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Rows deleted per purge statement: small enough to stay far below any sensible
/// `statement_timeout` and to hold locks only briefly.
const PURGE_BATCH: i64 = 1000;
/// The longest a health probe of the database or Kafka may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
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
    // One plain connection first: when the server cannot be reached, this says why at
    // once (refused, TLS, password), where the pool would wait out its timeout and only
    // say that it timed out.
    connect_once(&config).await?.close().await.ok();
    let pool = PgPoolOptions::new()
        // The active relay's helpers: dead letters and backfills (CDC), the monitor, and
        // maintenance; the leader's own connection is separate.
        .max_connections(4)
        .acquire_timeout(config.postgres.connect_timeout)
        .connect_with(connect.clone())
        .await
        .map_err(|err| unreachable_database(&config, &err))?;
    let store = {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|err| unreachable_database(&config, &err))?;
        log_connection_security(&mut conn, &connect).await;
        let store = PollingStore::open(&mut conn, config.table.clone())
            .await
            .map_err(store_open_error)?;
        if config.mode == Mode::Cdc {
            outbox_postgres::check_cdc_privileges(&mut conn, &config.table)
                .await
                .map_err(store_open_error)?;
        }
        store
    };
    let sink = crate::sinks::build(&config.sink).await?;
    sink.check(Duration::from_secs(10))
        .await
        .map_err(|e| RelayError::Config(e.to_string()))?;

    let health = Arc::new(Health::new(config.mode == Mode::Cdc, sink.name()));
    health.database.ok(health.started());
    health.sink.ok(health.started());
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
    if let Some(addr) = config.http_listen {
        let status_page = config.status_page.as_ref().map(|settings| {
            StatusPage::new(
                pool.clone(),
                store.clone(),
                config.database_url.clone(),
                cdc.clone(),
                config.on_dead_letter,
                settings.token.clone(),
                metrics.clone(),
                health.clone(),
            )
        });
        http::serve(
            addr,
            metrics.clone(),
            health.clone(),
            status_page,
            shutdown.clone(),
        )
        .await?;
    }
    let monitor_task = tokio::spawn(monitor(
        pool.clone(),
        store.clone(),
        config.on_dead_letter,
        sink.clone(),
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
        heaviest_fetched_row: AtomicU64::new(0),
    };
    let result = relay.run(connect, &shutdown).await;
    shutdown.cancel();
    let _ = monitor_task.await;
    pool.close().await;
    result
}

/// Opens one connection for the administrative commands (migrate, status, dead
/// letters), with the same messages as the relay when the database cannot be reached.
pub async fn connect(config: &RelayConfig) -> Result<PgConnection, RelayError> {
    connect_once(config).await
}

async fn connect_once(config: &RelayConfig) -> Result<PgConnection, RelayError> {
    let options = connect_options(config)?;
    tokio::time::timeout(
        config.postgres.connect_timeout,
        PgConnection::connect_with(&options),
    )
    .await
    .unwrap_or_else(|_| Err(connect_timed_out(config)))
    .map_err(|err| unreachable_database(config, &err))
}

fn connect_timed_out(config: &RelayConfig) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no answer within postgres.connect_timeout ({:?})",
            config.postgres.connect_timeout
        ),
    ))
}

pub(crate) fn connect_options(config: &RelayConfig) -> Result<PgConnectOptions, RelayError> {
    let options = config
        .database_url
        .connect_options()
        .map_err(|err| RelayError::Config(err.to_string()))?;
    Ok(options
        .application_name("outbox-relay")
        .options(config.postgres.session_options())
        .log_statements(tracing::log::LevelFilter::Trace))
}

/// Says at start whether the database connection is encrypted: `sslmode=prefer` (the
/// default) falls back to plaintext silently otherwise.
async fn log_connection_security(conn: &mut PgConnection, connect: &PgConnectOptions) {
    let mode = outbox_postgres::describe_ssl_mode(connect.get_ssl_mode());
    match outbox_postgres::connection_tls(conn).await {
        Ok(Some(version)) => info!(tls = %version, sslmode = mode, "PostgreSQL connection is encrypted"),
        Ok(None) if connect.get_socket().is_some() || is_loopback(connect.get_host()) => {
            info!(sslmode = mode, "PostgreSQL connection is not encrypted (local)")
        }
        Ok(None) => warn!(
            sslmode = mode,
            "PostgreSQL connection is NOT encrypted; set sslmode=verify-full and sslrootcert in database_url to require TLS"
        ),
        Err(err) => warn!(%err, "cannot tell whether the PostgreSQL connection is encrypted"),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A table that is missing, outdated or not ours to write is a configuration problem.
fn store_open_error(err: outbox_postgres::Error) -> RelayError {
    match err {
        outbox_postgres::Error::Database(_) => RelayError::Store(err),
        other => RelayError::Config(other.to_string()),
    }
}

fn unreachable_database(config: &RelayConfig, err: &sqlx::Error) -> RelayError {
    let detail = outbox_postgres::redact_text(&error_chain(err), &config.database_url);
    let advice = match outbox_postgres::refused_connection_hint(&detail) {
        Some(hint) => hint.to_string(),
        None => "check database_url (--database-url or OUTBOX_DATABASE_URL) and that the server runs (scripts/services start)".into(),
    };
    RelayError::Config(format!(
        "cannot connect to PostgreSQL at {} ({detail}); {advice}",
        config.database_url
    ))
}

/// The error and its causes, one after the other: TLS failures keep the useful part
/// (an unknown issuer, a name mismatch) in the source.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

pub(crate) struct Relay<'a> {
    pub(crate) config: &'a RelayConfig,
    pub(crate) store: PollingStore,
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) metrics: Metrics,
    pub(crate) health: Arc<Health>,
    pub(crate) pool: PgPool,
    /// Set in CDC mode: the publication and slot read from.
    pub(crate) cdc: Option<CdcNames>,
    /// The weight of the heaviest row of the last fetch from the table that returned
    /// any (0 before the first): how many rows the next fetch asks for.
    pub(crate) heaviest_fetched_row: AtomicU64,
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
            // Bounded, and abandoned on shutdown: a host that does not answer must not
            // hold a stopping relay.
            let attempt = tokio::select! {
                attempt = tokio::time::timeout(
                    self.config.postgres.connect_timeout,
                    PgConnection::connect_with(&connect),
                ) => attempt,
                _ = shutdown.cancelled() => break,
            };
            let attempt = attempt.unwrap_or_else(|_| Err(connect_timed_out(self.config)));
            let mut conn = match attempt {
                Ok(conn) => conn,
                Err(err) => {
                    self.health
                        .database
                        .failed(format!("cannot connect: {err}"));
                    warn!(%err, "cannot connect to PostgreSQL; retrying");
                    sleep_or_shutdown(RECONNECT_DELAY, shutdown).await;
                    continue;
                }
            };
            // Listed as a relay of the table (active or standby) for as long as this
            // connection lives: the status page shows the standbys.
            let acquired = match lock.announce(&mut conn).await {
                Ok(()) => lock.try_acquire(&mut conn).await,
                Err(err) => Err(err),
            };
            match acquired {
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
            self.sink.lead();
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
                Ok(false) => self.health.database.ok(self.health.started()),
                Err(err) => {
                    self.health
                        .database
                        .failed(format!("lost the connection: {err}"));
                    warn!(%err, "lost the database connection while waiting as a standby");
                    return false;
                }
            }
        }
    }

    /// Leads, with the maintenance task running beside the publishing loop for as long
    /// as this relay is the active one.
    async fn lead(&self, conn: &mut PgConnection, shutdown: &CancellationToken) -> LeadEnd {
        let leading = shutdown.child_token();
        let maintenance = tokio::spawn(maintain(
            self.pool.clone(),
            self.store.clone(),
            self.config.mode,
            self.config.on_publish,
            self.config.retention,
            leading.clone(),
        ));
        let end = match &self.cdc {
            Some(names) => self.lead_cdc(conn, names, shutdown).await,
            None => match PollingSource::start(self, conn).await {
                Ok(mut source) => self.pump_pipelined(&mut source, shutdown).await,
                Err(end) => end,
            },
        };
        leading.cancel();
        let _ = maintenance.await;
        end
    }

    /// The engine's loop, the same for every source: take a batch, publish it (the
    /// source reading ahead meanwhile), let the source record what became of each event.
    pub(crate) async fn pump<S: Source>(
        &self,
        source: &mut S,
        shutdown: &CancellationToken,
    ) -> LeadEnd {
        loop {
            let asked = Instant::now();
            let events = match source.next_batch(shutdown).await {
                Ok(Some(events)) => events,
                Ok(None) => return LeadEnd::Shutdown,
                Err(end) => return end,
            };
            let started = Instant::now();
            let (actions, outcomes) = {
                let delivering = self.deliver(&events);
                tokio::pin!(delivering);
                tokio::select! {
                    biased;
                    delivered = &mut delivering => delivered,
                    () = source.read_ahead(&events) => delivering.await,
                }
            };
            if self.sink.is_fenced() {
                return LeadEnd::Lost(RelayError::Fenced);
            }
            let published = Instant::now();
            crash_point!("relay-published-not-recorded");
            let count = events.len();
            if let Err(end) = source.record(events, &actions, &outcomes, shutdown).await {
                return end;
            }
            crash_point!("relay-recorded");
            self.record(&actions, &outcomes);
            self.metrics
                .batch_duration
                .observe(started.elapsed().as_secs_f64());
            // Where a batch's time goes (bench/README.md, "Where the time goes").
            debug!(
                events = count,
                take_ms = (started - asked).as_secs_f64() * 1e3,
                publish_ms = (published - started).as_secs_f64() * 1e3,
                record_ms = published.elapsed().as_secs_f64() * 1e3,
                "batch"
            );
        }
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
            if let Some((name, _)) = event
                .headers
                .iter()
                .find(|(name, _)| RESERVED_HEADERS.contains(&name.as_str()))
            {
                warn!(id = %event.id, header = %name, "the headers column sets a header the relay owns; it is left out (id, type and aggregatetype always come from the row)");
            }
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
            let trace =
                crate::telemetry::start_publish(events, &sent, &mut messages, self.sink.name());
            let delivered = self.sink.publish(messages).await;
            if let Some(trace) = trace {
                trace.end(&delivered);
            }
            if delivered.contains(&DeliveryOutcome::Delivered) {
                self.health.sink.ok(self.health.started());
            } else if let Some(DeliveryOutcome::Failed(err)) = delivered.iter().find(
                |o| matches!(o, DeliveryOutcome::Failed(e) if e.kind == ErrorKind::Unavailable),
            ) {
                self.health.sink.failed(err.reason.clone());
            }
            for (index, outcome) in sent.into_iter().zip(delivered) {
                outcomes[index] = Some(outcome);
            }
        }
        let outcomes: Vec<DeliveryOutcome> = outcomes
            .into_iter()
            .map(|o| o.expect("every event has an outcome"))
            .collect();
        let mut failures = outcomes.iter().filter_map(|outcome| match outcome {
            DeliveryOutcome::Failed(err) => Some(err.reason.as_str()),
            DeliveryOutcome::Delivered => None,
        });
        let first = failures.next();
        let failed = first.map_or(0, |_| 1 + failures.count());
        self.health.record_delivery(failed, outcomes.len(), first);
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

/// Probes the database and Kafka for `/healthz` and refreshes the gauges, every
/// [`STATS_INTERVAL`], off the publishing path. The gauges are mode-aware: polling counts
/// pending rows (an index scan); CDC reads the slot's lag instead, since it never marks
/// rows, and counts dead letters only (their index).
#[allow(clippy::too_many_arguments)]
async fn monitor(
    pool: PgPool,
    store: PollingStore,
    on_dead_letter: DeadLetterPolicy,
    sink: Arc<dyn Sink>,
    cdc: Option<CdcNames>,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let database = tokio::time::timeout(PROBE_TIMEOUT, async {
            let mut conn = pool.acquire().await?;
            let parked = store
                .parked_aggregates(&mut conn, on_dead_letter)
                .await
                .map_err(store_error)?;
            metrics.parked_aggregates.set(parked.len() as i64);
            match &cdc {
                None => {
                    let stats = store.stats(&mut conn).await.map_err(store_error)?;
                    metrics.pending.set(stats.pending);
                    metrics
                        .oldest_pending_age
                        .set(stats.oldest_pending_age_secs);
                    metrics.retrying.set(stats.retrying);
                    metrics.dead_letters.set(stats.dead_lettered);
                }
                Some(names) => {
                    let dead = store
                        .dead_letter_count(&mut conn)
                        .await
                        .map_err(store_error)?;
                    metrics.dead_letters.set(dead);
                    if let Some(slot) =
                        outbox_postgres_cdc::slot::slot_status(&mut conn, names).await?
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
            Ok::<_, sqlx::Error>(())
        })
        .await;
        match database {
            Ok(Ok(())) => health.database.ok(health.started()),
            Ok(Err(err)) => {
                debug!(%err, "database probe failed");
                health.database.failed(err.to_string());
            }
            Err(_) => health
                .database
                .failed(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
        match sink.check(PROBE_TIMEOUT).await {
            Ok(()) => health.sink.ok(health.started()),
            Err(err) => {
                debug!(%err, sink = sink.name(), "broker probe failed");
                health.sink.failed(err.to_string());
            }
        }
        sleep_or_shutdown(STATS_INTERVAL, &shutdown).await;
    }
}

fn store_error(err: outbox_postgres::Error) -> sqlx::Error {
    match err {
        outbox_postgres::Error::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// The active relay's maintenance, beside its publishing loop: rows past their retention
/// are purged every [`PURGE_INTERVAL`], in small batches (each its own short statement,
/// so a `statement_timeout` or a busy table never stops it, and publishing never waits
/// for it). Polling mode with `on_publish = "mark"` purges published rows; CDC mode,
/// where the log is the source, rows older than the retention (dead letters kept).
async fn maintain(
    pool: PgPool,
    store: PollingStore,
    mode: Mode,
    on_publish: OnPublish,
    retention: Duration,
    leading: CancellationToken,
) {
    if mode == Mode::Polling && on_publish == OnPublish::Delete {
        return;
    }
    while !leading.is_cancelled() {
        let purged = async {
            let mut conn = pool.acquire().await.map_err(outbox_postgres::Error::from)?;
            let mut total = 0;
            while !leading.is_cancelled() {
                let deleted = match mode {
                    Mode::Cdc => {
                        store
                            .purge_older_than(&mut conn, retention, PURGE_BATCH)
                            .await?
                    }
                    Mode::Polling => {
                        store
                            .purge_published(&mut conn, retention, PURGE_BATCH)
                            .await?
                    }
                };
                total += deleted;
                if deleted < PURGE_BATCH as u64 {
                    break;
                }
            }
            Ok::<_, outbox_postgres::Error>(total)
        }
        .await;
        match purged {
            Ok(0) => {}
            Ok(purged) => info!(purged, "purged outbox rows past their retention"),
            Err(err) => warn!(%err, "purging rows past their retention failed; trying again later"),
        }
        sleep_or_shutdown(PURGE_INTERVAL, &leading).await;
    }
}

pub(crate) async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = shutdown.cancelled() => {}
    }
}
