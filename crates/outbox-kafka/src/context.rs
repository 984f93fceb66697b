//! librdkafka callbacks: its logs and global errors go to `tracing`, without flooding.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use tracing::{debug, info, warn};

use crate::security::Redactor;

/// While the brokers are down librdkafka reports the same global error many times a
/// second; one line per kind of error per interval is enough to see what is going on.
const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Reused by clients with a context of their own (the inbox's consumer), which call
/// [`QuietLog::log`] and [`QuietLog::error`] from their callbacks.
/// Every text from librdkafka goes through the redactor first: its messages may quote
/// property values, secrets among them.
#[derive(Default)]
pub struct QuietLog {
    last_reported: Mutex<HashMap<String, Instant>>,
    redactor: Redactor,
    /// The latest client errors (redacted), to explain a failed connection check.
    recent_errors: Mutex<VecDeque<String>>,
}

/// Client errors kept for [`QuietLog::recent_errors`].
const RECENT_ERRORS: usize = 8;

impl QuietLog {
    /// A context whose logs and errors never show the secrets `redactor` knows.
    pub fn redacting(redactor: Redactor) -> Self {
        QuietLog {
            redactor,
            ..QuietLog::default()
        }
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The latest distinct client errors, oldest first.
    pub fn recent_errors(&self) -> Vec<String> {
        self.recent_errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn remember(&self, error: String) {
        let mut recent = self
            .recent_errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if recent.back() != Some(&error) {
            if recent.len() == RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(error);
        }
    }

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
        let message = self.redactor.redact(message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                self.remember(message.clone());
                if self.first_in_interval(format!("log:{facility}")) {
                    warn!(target: "librdkafka", facility, "{message}");
                }
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                // Disconnections are reported at this level; they explain a failed
                // connection check (a TLS listener spoken to in plaintext).
                if facility == "FAIL" {
                    self.remember(message.clone());
                }
                info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    pub fn error(&self, error: KafkaError, reason: &str) {
        let error = self.redactor.redact(&error.to_string());
        let reason = self.redactor.redact(reason);
        self.remember(format!("{error}: {reason}"));
        let kind = format!("error:{error}");
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

/// The sink's producer (`producer.rs`) hands each message's report to its sender; the
/// connection probe ([`crate::check_connection`]) sends nothing.
impl rdkafka::producer::ProducerContext for QuietLog {
    type DeliveryOpaque = crate::producer::DeliverySender;

    fn delivery(
        &self,
        result: &rdkafka::message::DeliveryResult<'_>,
        sender: Self::DeliveryOpaque,
    ) {
        // The receiver may be gone (a publish that gave up waiting): nothing to tell.
        let _ = sender.send(result.as_ref().map(|_| ()).map_err(|(err, _)| err.clone()));
        // Tests: the report told, its message not yet released (a slow delivery thread).
        fail::fail_point!("kafka-delivery-report-held");
    }
}

/// The audit's reader (`topic_reader.rs`) assigns partitions itself: no rebalances to
/// handle and no offsets to commit.
impl ConsumerContext for QuietLog {}
