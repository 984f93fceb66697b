//! `/metrics` (Prometheus text format) and `/healthz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics::Metrics;
use crate::RelayError;

/// What `/healthz` reports: the relay's role and whether its last database round trip
/// succeeded.
#[derive(Default)]
pub(crate) struct Health {
    role: AtomicU8,
    database_ok: AtomicBool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Role {
    Starting = 0,
    Standby = 1,
    Active = 2,
}

impl Health {
    pub(crate) fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    pub(crate) fn set_database_ok(&self, ok: bool) {
        self.database_ok.store(ok, Ordering::Relaxed);
    }

    fn describe(&self) -> (bool, &'static str) {
        let role = match self.role.load(Ordering::Relaxed) {
            1 => "standby",
            2 => "active",
            _ => "starting",
        };
        (self.database_ok.load(Ordering::Relaxed), role)
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
    shutdown: CancellationToken,
) -> Result<SocketAddr, RelayError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|err| {
        RelayError::Config(format!(
            "cannot listen on {addr} for /metrics and /healthz ({err}); set http.listen (OUTBOX_HTTP__LISTEN) to a free address, or to \"off\""
        ))
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| RelayError::Other(e.to_string()))?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(AppState { metrics, health });
    info!(address = %bound, "serving /metrics and /healthz");
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
    let (database_ok, role) = state.health.describe();
    if database_ok {
        (StatusCode::OK, format!("ok role={role}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy role={role}: the database is unreachable\n"),
        )
    }
}
