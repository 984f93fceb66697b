use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Live counters of one [`Inbox`](crate::Inbox); clone it before `run` and read it
/// while the inbox runs (for metrics, health checks or tests).
#[derive(Clone, Default)]
pub struct InboxStats(Arc<Counters>);

#[derive(Default)]
struct Counters {
    processed: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    handler_errors: AtomicU64,
    in_flight: AtomicU64,
    offset_commits: AtomicU64,
}

impl InboxStats {
    /// Messages whose handler ran and committed.
    pub fn processed(&self) -> u64 {
        self.0.processed.load(Ordering::Relaxed)
    }

    /// Messages dropped because their id was already in the inbox (replays after a
    /// crash or rebalance, duplicates from an at-least-once producer).
    pub fn duplicates(&self) -> u64 {
        self.0.duplicates.load(Ordering::Relaxed)
    }

    /// Messages sent to the dead-letter topic.
    pub fn dead_lettered(&self) -> u64 {
        self.0.dead_lettered.load(Ordering::Relaxed)
    }

    /// Failed handler attempts (each retry counts).
    pub fn handler_errors(&self) -> u64 {
        self.0.handler_errors.load(Ordering::Relaxed)
    }

    /// Messages received and not finished yet.
    pub fn in_flight(&self) -> u64 {
        self.0.in_flight.load(Ordering::Relaxed)
    }

    /// Offset commits sent to Kafka.
    pub fn offset_commits(&self) -> u64 {
        self.0.offset_commits.load(Ordering::Relaxed)
    }

    pub(crate) fn add_processed(&self) {
        self.0.processed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_duplicate(&self) {
        self.0.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_dead_lettered(&self) {
        self.0.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_handler_error(&self) {
        self.0.handler_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_offset_commit(&self) {
        self.0.offset_commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a received message until the returned guard is dropped.
    pub(crate) fn enter_flight(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

impl std::fmt::Debug for InboxStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxStats")
            .field("processed", &self.processed())
            .field("duplicates", &self.duplicates())
            .field("dead_lettered", &self.dead_lettered())
            .field("handler_errors", &self.handler_errors())
            .field("in_flight", &self.in_flight())
            .field("offset_commits", &self.offset_commits())
            .finish()
    }
}

/// One message in flight; see [`InboxStats::enter_flight`].
pub(crate) struct InFlight(InboxStats);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
