//! `/metrics` (Prometheus text format), `/healthz` and, when on, the status page
//! (`status_page.rs`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics::Metrics;
use crate::status_page::StatusPage;
use crate::RelayError;

/// What `/healthz` reports: the relay's role and, per dependency, whether its last
/// round trip succeeded recently enough.
pub(crate) struct Health {
    role: AtomicU8,
    started: Instant,
    /// Probed by the monitor task every few seconds.
    pub(crate) database: Dependency,
    /// Probed by the monitor task (cluster metadata), and by every publish.
    /// The sink's broker, named as the sink names it ("kafka", "nats"...).
    pub(crate) sink: Dependency,
    sink_name: &'static str,
    /// CDC, active relay only: the replication stream, updated by the stream itself.
    pub(crate) replication: Dependency,
    cdc: bool,
    /// The last batch's delivery failures (any mode; CDC retries them in memory).
    delivery: Mutex<Option<DeliveryProblem>>,
}

/// Events of the last batch the broker did not take.
#[derive(Clone, Debug)]
pub(crate) struct DeliveryProblem {
    /// When the batches began to fail (the first of the failing run).
    pub(crate) since: std::time::SystemTime,
    pub(crate) failed: usize,
    pub(crate) sent: usize,
    /// The first failure's reason.
    pub(crate) reason: String,
}

/// How recent a dependency's last good round trip must be for `/healthz` to count it
/// healthy (the monitor probes every few seconds).
const FRESH: Duration = Duration::from_secs(30);

/// One dependency's last round trip.
#[derive(Default)]
pub(crate) struct Dependency {
    /// Milliseconds since the relay started at the last success (0: never).
    last_ok_ms: AtomicU64,
    /// The last failure, if it came after the last success.
    failure: Mutex<Option<String>>,
}

impl Dependency {
    pub(crate) fn ok(&self, health_started: Instant) {
        let ms = health_started.elapsed().as_millis().max(1) as u64;
        self.last_ok_ms.store(ms, Ordering::Relaxed);
        *self.failure.lock().expect("health lock") = None;
    }

    pub(crate) fn failed(&self, reason: impl Into<String>) {
        *self.failure.lock().expect("health lock") = Some(reason.into());
    }

    /// `None` when healthy, else why not.
    fn problem(&self, started: Instant, fresh: Option<Duration>) -> Option<String> {
        if let Some(failure) = self.failure.lock().expect("health lock").clone() {
            return Some(failure);
        }
        let last_ok = self.last_ok_ms.load(Ordering::Relaxed);
        if last_ok == 0 {
            return Some("not reached yet".into());
        }
        let since = started
            .elapsed()
            .saturating_sub(Duration::from_millis(last_ok));
        match fresh {
            Some(bound) if since > bound => {
                Some(format!("no successful round trip for {}s", since.as_secs()))
            }
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Role {
    Starting = 0,
    Standby = 1,
    Active = 2,
}

impl Health {
    pub(crate) fn new(cdc: bool, sink_name: &'static str) -> Self {
        Health {
            role: AtomicU8::new(Role::Starting as u8),
            started: Instant::now(),
            database: Dependency::default(),
            sink: Dependency::default(),
            sink_name,
            replication: Dependency::default(),
            cdc,
            delivery: Mutex::new(None),
        }
    }

    /// Notes the outcome of a batch: `failed` of `sent` events not delivered, the
    /// first failure's reason. The status page shows it while it lasts.
    pub(crate) fn record_delivery(&self, failed: usize, sent: usize, reason: Option<&str>) {
        let mut delivery = self.delivery.lock().expect("health lock");
        *delivery = match (failed, reason) {
            (0, _) | (_, None) => None,
            (failed, Some(reason)) => Some(DeliveryProblem {
                since: delivery
                    .as_ref()
                    .map(|p| p.since)
                    .unwrap_or_else(std::time::SystemTime::now),
                failed,
                sent,
                reason: reason.to_string(),
            }),
        };
    }

    /// The last batch's failures, if it had any.
    pub(crate) fn delivery_problem(&self) -> Option<DeliveryProblem> {
        self.delivery.lock().expect("health lock").clone()
    }

    pub(crate) fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// The role, and each dependency's state: `Ok` or why it is unhealthy.
    pub(crate) fn describe(&self) -> (&'static str, Vec<(&'static str, Option<String>)>) {
        let role = match self.role.load(Ordering::Relaxed) {
            1 => "standby",
            2 => "active",
            _ => "starting",
        };
        let mut checks = vec![
            ("database", self.database.problem(self.started, Some(FRESH))),
            (self.sink_name, self.sink.problem(self.started, Some(FRESH))),
        ];
        if self.cdc && role == "active" {
            // The stream is quiet while the relay waits on Kafka: judged by its last
            // event or error, not by time.
            checks.push(("replication", self.replication.problem(self.started, None)));
        }
        (role, checks)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (useful with
/// port 0).
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    status_page: Option<Arc<StatusPage>>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, RelayError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|err| {
        RelayError::Config(format!(
            "cannot listen on {addr} for /metrics and /healthz ({err}); set http.listen (OUTBOX_HTTP__LISTEN) to a free address, or to \"off\""
        ))
    })?;
    let bound = listener.local_addr().map_err(RelayError::Http)?;
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(AppState { metrics, health });
    match status_page {
        Some(page) => {
            tokio::spawn(page.clone().sample(shutdown.clone()));
            app = app.merge(crate::status_page::routes(page));
            info!(address = %bound, "serving /metrics, /healthz and the status page at /status");
        }
        None => info!(address = %bound, "serving /metrics and /healthz"),
    }
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(bound)
}

async fn metrics_handler(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn health_handler(State(state): State<AppState>) -> (StatusCode, String) {
    let (role, checks) = state.health.describe();
    let states: Vec<String> = checks
        .iter()
        .map(|(name, problem)| {
            format!(
                "{name}={}",
                if problem.is_none() { "ok" } else { "failing" }
            )
        })
        .collect();
    let problems: Vec<String> = checks
        .iter()
        .filter_map(|(name, problem)| problem.as_ref().map(|p| format!("{name}: {p}")))
        .collect();
    if problems.is_empty() {
        (
            StatusCode::OK,
            format!("ok role={role} {}\n", states.join(" ")),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "unhealthy role={role} {}\n{}\n",
                states.join(" "),
                problems.join("\n")
            ),
        )
    }
}
