//! The status page at `/status` (when `http.status_page` is on): one HTML file embedded
//! in the binary, which reads `/status/api` every two seconds. The API reads the
//! database on each request, on the relay's helper pool; the publish rate comes from
//! the relay's own counter, sampled here.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use outbox_postgres::{DatabaseUrl, LeaderLock, PollingStore};
use outbox_postgres_cdc::CdcNames;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use outbox_core::DeadLetterPolicy;

use crate::config::StatusToken;
use crate::http::Health;
use crate::metrics::Metrics;

const PAGE: &str = include_str!("status_page/index.html");

/// How often the publish rate is sampled, and how many samples are kept (ten minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const SAMPLES_KEPT: usize = 300;
/// Rows of each list the page shows (the counts are exact).
const LIST_LIMIT: i64 = 50;
/// A page request that the database does not answer in time gets an error, not a hang.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the status page reads from.
pub(crate) struct StatusPage {
    pub(crate) pool: PgPool,
    pub(crate) store: PollingStore,
    pub(crate) database_url: DatabaseUrl,
    pub(crate) cdc: Option<CdcNames>,
    pub(crate) on_dead_letter: DeadLetterPolicy,
    pub(crate) token: Option<StatusToken>,
    pub(crate) metrics: Metrics,
    pub(crate) health: Arc<Health>,
    /// (unix milliseconds, events published, events dead-lettered) every
    /// [`SAMPLE_EVERY`].
    samples: Mutex<VecDeque<(u64, u64, u64)>>,
}

impl StatusPage {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pool: PgPool,
        store: PollingStore,
        database_url: DatabaseUrl,
        cdc: Option<CdcNames>,
        on_dead_letter: DeadLetterPolicy,
        token: Option<StatusToken>,
        metrics: Metrics,
        health: Arc<Health>,
    ) -> Arc<Self> {
        Arc::new(StatusPage {
            pool,
            store,
            database_url,
            cdc,
            on_dead_letter,
            token,
            metrics,
            health,
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES_KEPT)),
        })
    }

    /// Samples the relay's counters until `shutdown`, for the page's rate chart.
    pub(crate) async fn sample(self: Arc<Self>, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let sample = (
                unix_ms(),
                self.metrics.published.get(),
                self.metrics.dead_lettered.get(),
            );
            {
                let mut samples = self.samples.lock().expect("status samples lock");
                if samples.len() == SAMPLES_KEPT {
                    samples.pop_front();
                }
                samples.push_back(sample);
            }
            crate::engine::sleep_or_shutdown(SAMPLE_EVERY, &shutdown).await;
        }
    }

    /// Events per second between consecutive samples: `[unix ms, published/s,
    /// dead-lettered/s]`.
    fn rates(&self) -> Vec<Value> {
        let samples = self.samples.lock().expect("status samples lock");
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| {
                let secs = (b.0.saturating_sub(a.0)).max(1) as f64 / 1000.0;
                json!([
                    b.0,
                    (b.1.saturating_sub(a.1)) as f64 / secs,
                    (b.2.saturating_sub(a.2)) as f64 / secs
                ])
            })
            .collect()
    }

    /// The API's answer: everything the page shows.
    async fn snapshot(&self) -> Result<Value, String> {
        let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
        let table = self.store.table();
        let relays = LeaderLock::new(table)
            .relays(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let retrying = self
            .store
            .retrying(&mut conn, LIST_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        let dead_letters = self
            .store
            .dead_letters(&mut conn, LIST_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        let parked = self
            .store
            .parked_aggregates(&mut conn, self.on_dead_letter)
            .await
            .map_err(|e| e.to_string())?
            .len();
        let backlog = match &self.cdc {
            None => {
                let stats = self
                    .store
                    .stats(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                json!({
                    "pending": stats.pending,
                    "oldest_pending_age_seconds": stats.oldest_pending_age_secs,
                    "retrying": stats.retrying,
                    "dead_letters": stats.dead_lettered,
                })
            }
            Some(names) => {
                let dead = self
                    .store
                    .dead_letter_count(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let slot = outbox_postgres_cdc::slot::slot_status(&mut conn, names)
                    .await
                    .map_err(|e| e.to_string())?;
                json!({
                    "dead_letters": dead,
                    "retrying": retrying.len(),
                    "slot": {
                        "name": names.slot,
                        "exists": slot.is_some(),
                        "active": slot.as_ref().map(|s| s.active),
                        "wal_status": slot.as_ref().and_then(|s| s.wal_status.clone()),
                        "lag_bytes": slot.as_ref().and_then(|s| s.lag_bytes),
                        "retained_wal_bytes": slot.as_ref().and_then(|s| s.retained_bytes),
                    },
                })
            }
        };
        let (role, checks) = self.health.describe();
        let delivery = self.health.delivery_problem().map(|problem| {
            json!({
                "since_ms": problem.since.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
                "failed": problem.failed,
                "batch": problem.sent,
                "reason": problem.reason,
            })
        });
        Ok(json!({
            "table": table.to_string(),
            "mode": if self.cdc.is_some() { "cdc" } else { "polling" },
            "this_relay": {
                "role": role,
                "uptime_seconds": self.health.started().elapsed().as_secs(),
                "delivery_problem": delivery,
                "checks": checks.iter().map(|(name, problem)| json!({
                    "name": name, "ok": problem.is_none(), "problem": problem,
                })).collect::<Vec<_>>(),
            },
            "relays": relays.iter().map(|r| json!({
                "active": r.active,
                "pid": r.session.pid,
                "application_name": r.session.application_name,
                "client_addr": r.session.client_addr,
                "since": r.session.since.map(|t| t.to_rfc3339()),
            })).collect::<Vec<_>>(),
            "backlog": backlog,
            "parked_aggregates": parked,
            "published_total": self.metrics.published.get(),
            "dead_lettered_total": self.metrics.dead_lettered.get(),
            "rates": self.rates(),
            "retrying": retrying.iter().map(|e| json!({
                "id": e.id,
                "aggregatetype": e.aggregate_type,
                "aggregateid": e.aggregate_id,
                "type": e.event_type,
                "attempts": e.attempts,
                "last_error": e.last_error,
                "next_attempt_at": e.next_attempt_at.to_rfc3339(),
            })).collect::<Vec<_>>(),
            "dead_letters": dead_letters.iter().map(|d| json!({
                "id": d.id,
                "aggregatetype": d.aggregate_type,
                "aggregateid": d.aggregate_id,
                "type": d.event_type,
                "attempts": d.attempts,
                "reason": d.last_error,
                "dead_lettered_at": d.dead_lettered_at.to_rfc3339(),
                "skipped": d.skipped_at.is_some(),
            })).collect::<Vec<_>>(),
            "retry_enabled": self.token.is_some(),
        }))
    }
}

/// `/status`, `/status/api` and the retry action.
pub(crate) fn routes(page: Arc<StatusPage>) -> Router {
    Router::new()
        .route("/status", get(page_handler))
        .route("/status/api", get(api_handler))
        .route("/status/api/dead-letters/{id}/retry", post(retry_handler))
        .with_state(page)
}

async fn page_handler() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page runs its own script only and is never framed.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        value.to_string(),
    )
        .into_response()
}

async fn api_handler(State(page): State<Arc<StatusPage>>) -> Response {
    match tokio::time::timeout(QUERY_TIMEOUT, page.snapshot()).await {
        Ok(Ok(value)) => json_response(StatusCode::OK, &value),
        Ok(Err(err)) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": format!("cannot read the outbox table: {}",
                outbox_postgres::redact_text(&err, &page.database_url)) }),
        ),
        Err(_) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": format!("the database did not answer within {QUERY_TIMEOUT:?}") }),
        ),
    }
}

/// Queues one dead letter again, as `outbox dead-letters retry <id>` does. The request
/// must carry `Authorization: Bearer <http.status_token>`.
async fn retry_handler(
    State(page): State<Arc<StatusPage>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = &page.token else {
        return json_response(
            StatusCode::FORBIDDEN,
            &json!({ "error": "retrying from the status page is off: set http.status_token in the relay's configuration" }),
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if !token.matches(given) {
        warn!("a dead-letter retry from the status page was refused: wrong or missing token");
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({ "error": "the token is not the relay's http.status_token" }),
        );
    }
    let Ok(id) = id.parse::<Uuid>() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": format!("{id:?} is not an event id (a UUID)") }),
        );
    };
    let retried = async {
        let mut conn = page.pool.acquire().await.map_err(|e| e.to_string())?;
        page.store
            .retry_dead_letters(&mut conn, Some(&[id]))
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(QUERY_TIMEOUT, retried).await {
        Ok(Ok(retried)) if retried.is_empty() => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("{id} is not a dead letter (already retried, or never dead-lettered)") }),
        ),
        Ok(Ok(retried)) => {
            info!(%id, "dead letter queued again from the status page");
            json_response(StatusCode::OK, &json!({ "retried": retried }))
        }
        Ok(Err(err)) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": format!("cannot queue it again: {}",
                outbox_postgres::redact_text(&err, &page.database_url)) }),
        ),
        Err(_) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": format!("the database did not answer within {QUERY_TIMEOUT:?}") }),
        ),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_matches_only_itself() {
        let token = StatusToken::new("0123456789abcdef0123");
        assert!(token.matches("0123456789abcdef0123"));
        assert!(!token.matches("0123456789abcdef012"));
        assert!(!token.matches("0123456789abcdef01234"));
        assert!(!token.matches("x123456789abcdef0123"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "StatusToken(<hidden>)");
    }

    #[test]
    fn the_page_is_embedded_and_escapes_nothing_by_hand() {
        // Every value from the database goes in with textContent, never as markup.
        assert!(PAGE.contains("/status/api"));
        assert!(
            !PAGE.contains("innerHTML"),
            "the page must not build markup from data"
        );
    }
}
