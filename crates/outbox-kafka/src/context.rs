//! librdkafka callbacks: its logs and global errors go to `tracing`, without flooding.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use tracing::{debug, info, warn};

/// While the brokers are down librdkafka reports the same global error many times a
/// second; one line per kind of error per interval is enough to see what is going on.
const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Reused by clients with a context of their own (the inbox's consumer), which call
/// [`QuietLog::log`] and [`QuietLog::error`] from their callbacks.
#[derive(Default)]
pub struct QuietLog {
    last_reported: Mutex<HashMap<String, Instant>>,
}

impl QuietLog {
    /// True the first time `kind` is seen within 30 s (`REPEAT_INTERVAL`): for callers
    /// that rate-limit their own repeated warnings the same way.
    pub fn first_in_interval(&self, kind: String) -> bool {
        let mut last = self
            .last_reported
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        match last.get(&kind) {
            Some(at) if now.duration_since(*at) < REPEAT_INTERVAL => false,
            _ => {
                last.insert(kind, now);
                true
            }
        }
    }

    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                if self.first_in_interval(format!("log:{facility}")) {
                    warn!(target: "librdkafka", facility, "{message}");
                }
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    pub fn error(&self, error: KafkaError, reason: &str) {
        let kind = format!("error:{:?}", error.rdkafka_error_code());
        if self.first_in_interval(kind) {
            warn!(%error, reason, "Kafka client error (repeats within {REPEAT_INTERVAL:?} are not logged)");
        }
    }
}

impl ClientContext for QuietLog {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        QuietLog::log(self, level, facility, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        QuietLog::error(self, error, reason)
    }
}

/// The audit's reader (`topic_reader.rs`) assigns partitions itself: no rebalances to
/// handle and no offsets to commit.
impl ConsumerContext for QuietLog {}
