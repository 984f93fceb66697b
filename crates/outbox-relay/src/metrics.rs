//! Prometheus metrics of the relay. Names follow `outbox_<name>_<unit>[_total]`; they
//! are updated per batch, never per event, and carry no per-event labels.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};

pub const PUBLISHED_TOTAL: &str = "outbox_events_published_total";
pub const DELIVERY_FAILURES_TOTAL: &str = "outbox_delivery_failures_total";
pub const DEAD_LETTERED_TOTAL: &str = "outbox_events_dead_lettered_total";
pub const PENDING: &str = "outbox_pending_events";
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
pub const RETRYING: &str = "outbox_retrying_events";
pub const DEAD_LETTERS: &str = "outbox_dead_letter_events";
pub const PARKED_AGGREGATES: &str = "outbox_parked_aggregates";
pub const BATCH_DURATION: &str = "outbox_batch_duration_seconds";
pub const ACTIVE: &str = "outbox_relay_active";
pub const REJECTED_UPDATES_TOTAL: &str = "outbox_cdc_rejected_updates_total";
pub const SLOT_LAG: &str = "outbox_cdc_slot_lag_bytes";
pub const SLOT_WAL_STATUS: &str = "outbox_cdc_slot_wal_status";
pub const SLOTS_RECREATED_TOTAL: &str = "outbox_cdc_slots_recreated_total";
pub const STANDBY_WAIT: &str = "outbox_cdc_standby_wait_seconds";

/// Every metric the relay exports (the dashboard and alert rules in `deploy/` are
/// checked against it).
pub const ALL: &[&str] = &[
    PUBLISHED_TOTAL,
    DELIVERY_FAILURES_TOTAL,
    DEAD_LETTERED_TOTAL,
    PENDING,
    OLDEST_PENDING_AGE,
    RETRYING,
    DEAD_LETTERS,
    PARKED_AGGREGATES,
    BATCH_DURATION,
    ACTIVE,
    REJECTED_UPDATES_TOTAL,
    SLOT_LAG,
    SLOT_WAL_STATUS,
    SLOTS_RECREATED_TOTAL,
    STANDBY_WAIT,
];

/// The relay's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub published: IntCounter,
    pub delivery_failures: IntCounter,
    pub dead_lettered: IntCounter,
    pub pending: IntGauge,
    pub oldest_pending_age: prometheus::Gauge,
    pub retrying: IntGauge,
    pub dead_letters: IntGauge,
    /// Aggregates whose events wait behind a retry or a dead letter.
    pub parked_aggregates: IntGauge,
    pub batch_duration: Histogram,
    pub active: IntGauge,
    pub rejected_updates: IntCounter,
    pub slot_lag: IntGauge,
    /// 1 for the slot's current `wal_status` (reserved, extended, unreserved, lost).
    pub slot_wal_status: prometheus::IntGaugeVec,
    /// CDC: times the slot had vanished (dropped, or lost in a failover) and was made
    /// again, with the rows after the last checkpoint republished.
    pub slots_recreated: IntCounter,
    /// CDC: how long batches waited for the synchronous standbys to flush them.
    pub standby_wait: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let published = counter(
            PUBLISHED_TOTAL,
            "Events acknowledged by the broker and marked published.",
        );
        let delivery_failures = counter(
            DELIVERY_FAILURES_TOTAL,
            "Failed delivery attempts (each will be retried or dead-lettered).",
        );
        let dead_lettered = counter(DEAD_LETTERED_TOTAL, "Events dead-lettered by this relay.");
        let pending = gauge(PENDING, "Rows neither published nor dead-lettered.");
        let retrying = gauge(
            RETRYING,
            "Pending rows waiting for a retry after a failed delivery.",
        );
        let dead_letters = gauge(DEAD_LETTERS, "Dead-lettered rows in the table.");
        let parked_aggregates = gauge(
            PARKED_AGGREGATES,
            "Aggregates whose events wait behind a retry or a dead letter.",
        );
        let active = gauge(
            ACTIVE,
            "1 while this relay holds the leadership lock, 0 as a standby.",
        );
        let rejected_updates = counter(
            REJECTED_UPDATES_TOTAL,
            "CDC: UPDATEs of outbox rows seen and refused.",
        );
        let slots_recreated = counter(
            SLOTS_RECREATED_TOTAL,
            "CDC: times the replication slot had vanished and was created again (rows after the last checkpoint republished).",
        );
        let slot_lag = gauge(
            SLOT_LAG,
            "CDC: WAL bytes between the current position and the slot's confirmed position.",
        );
        let slot_wal_status = prometheus::IntGaugeVec::new(
            Opts::new(
                SLOT_WAL_STATUS,
                "CDC: 1 for the replication slot's wal_status.",
            ),
            &["status"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(slot_wal_status.clone()))
            .expect("unique metric");
        let oldest_pending_age = prometheus::Gauge::with_opts(Opts::new(
            OLDEST_PENDING_AGE,
            "Age of the oldest pending row.",
        ))
        .expect("valid metric");
        registry
            .register(Box::new(oldest_pending_age.clone()))
            .expect("unique metric");
        let batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                BATCH_DURATION,
                "Time from fetching a batch to recording its outcome.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(batch_duration.clone()))
            .expect("unique metric");
        let standby_wait = Histogram::with_opts(
            HistogramOpts::new(
                STANDBY_WAIT,
                "CDC: time a batch waited for the synchronous standbys to flush its transactions (only with synchronous_standby_names set).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(standby_wait.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            published,
            delivery_failures,
            dead_lettered,
            pending,
            oldest_pending_age,
            retrying,
            dead_letters,
            parked_aggregates,
            batch_duration,
            active,
            rejected_updates,
            slot_lag,
            slot_wal_status,
            slots_recreated,
            standby_wait,
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding does not fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_by_name() {
        let metrics = Metrics::new();
        metrics.published.inc_by(3);
        // A labelled gauge has no series until a label value is set.
        metrics
            .slot_wal_status
            .with_label_values(&["reserved"])
            .set(1);
        let text = metrics.render();
        for name in ALL {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        let exported = text.matches("# TYPE ").count();
        assert_eq!(exported, ALL.len(), "metrics::ALL misses one of:\n{text}");
        assert!(text.contains("outbox_events_published_total 3"));
    }
}
