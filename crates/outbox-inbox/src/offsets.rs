//! Which offset of a partition may be committed.
//!
//! Messages of one partition finish out of order (different aggregates run
//! concurrently), but Kafka keeps a single committed offset per partition: "everything
//! before this one is done". So the committable offset is the lowest offset handed to
//! the handlers and not yet done, or one past the highest handed out when none is
//! pending. Committing it never skips an unfinished message; a crash replays the ones
//! after it, and the inbox table drops those that had committed.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// The state of one assigned partition, for as long as it stays assigned. A partition
/// assigned again after a revocation gets a fresh `PartitionState`; work still holding
/// the old one can no longer move the new one's offsets.
pub(crate) struct PartitionState {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    inner: Mutex<Inner>,
    idle: Condvar,
    /// Cancelled when the partition is revoked: queued work is dropped, retries stop,
    /// a running handler gets the revoke grace period.
    revoked: CancellationToken,
}

#[derive(Default)]
struct Inner {
    /// Offsets handed to a lane and not done yet (running, queued, or abandoned).
    pending: BTreeSet<i64>,
    /// One past the highest offset handed out.
    next: Option<i64>,
    /// Messages between `try_start` and `finish`.
    running: usize,
    revoked: bool,
    /// The offset last handed to a commit.
    committed: Option<i64>,
}

impl PartitionState {
    pub(crate) fn new(topic: &str, partition: i32) -> PartitionState {
        PartitionState {
            topic: topic.to_string(),
            partition,
            inner: Mutex::new(Inner::default()),
            idle: Condvar::new(),
            revoked: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain numbers behind: keep going.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `offset` is handed to a lane. False when it must not be: the
    /// partition is revoked, or the offset is in flight already (librdkafka can deliver
    /// a message again after a pause).
    ///
    /// An offset below those handed out before is handed out again: librdkafka
    /// delivering again after a pause, or the topic deleted and re-created with its
    /// offsets starting over (new events). Skipping it would lose the new events; a
    /// message already handled is dropped by the inbox table instead. The commit
    /// position follows the partition back.
    pub(crate) fn accept(&self, offset: i64) -> bool {
        let mut inner = self.lock();
        if inner.revoked || inner.pending.contains(&offset) {
            return false;
        }
        let went_back = inner.next.is_some_and(|next| offset < next);
        if went_back {
            tracing::info!(
                topic = %self.topic,
                partition = self.partition,
                offset,
                next = inner.next,
                "the partition's offsets went back (a redelivery, or the topic was re-created); consuming from there, already handled ids are dropped"
            );
            inner.committed = None;
        }
        inner.pending.insert(offset);
        inner.next = Some(if went_back {
            offset + 1
        } else {
            inner.next.map_or(offset + 1, |next| next.max(offset + 1))
        });
        true
    }

    /// A lane is about to process a message of this partition. False once revoked: the
    /// message is abandoned and stays pending, so its offset is never committed here.
    pub(crate) fn try_start(&self) -> bool {
        let mut inner = self.lock();
        if inner.revoked {
            return false;
        }
        inner.running += 1;
        true
    }

    /// The message at `offset` stopped running: `done` when its outcome is durable
    /// (processed, duplicate or dead-lettered), false when abandoned.
    pub(crate) fn finish(&self, offset: i64, done: bool) {
        let mut inner = self.lock();
        inner.running = inner.running.saturating_sub(1);
        if done {
            inner.pending.remove(&offset);
        }
        if inner.running == 0 {
            self.idle.notify_all();
        }
    }

    /// The offset a commit may name now: the lowest pending offset, else one past the
    /// highest handed out. None before the first message.
    #[cfg(test)]
    pub(crate) fn committable(&self) -> Option<i64> {
        let inner = self.lock();
        inner.pending.first().copied().or(inner.next)
    }

    /// The offset to commit now, if it moved since the last commit (or, with `force`,
    /// whenever there is one), and remembers it as committed.
    pub(crate) fn take_commit(&self, force: bool) -> Option<i64> {
        let mut inner = self.lock();
        let offset = inner.pending.first().copied().or(inner.next)?;
        if !force && inner.committed.is_some_and(|committed| committed >= offset) {
            return None;
        }
        inner.committed = Some(offset);
        Some(offset)
    }

    /// Forgets a commit that failed, so that the next periodic commit tries again.
    pub(crate) fn commit_failed(&self, offset: i64) {
        let mut inner = self.lock();
        if inner.committed == Some(offset) {
            inner.committed = None;
        }
    }

    /// Marks the partition revoked and tells its work to stop.
    pub(crate) fn revoke(&self) {
        self.lock().revoked = true;
        self.revoked.cancel();
    }

    pub(crate) fn revoked(&self) -> &CancellationToken {
        &self.revoked
    }

    /// Blocks until no message of this partition is running, or until `deadline`.
    /// True when idle.
    pub(crate) fn wait_idle(&self, deadline: Instant) -> bool {
        let mut inner = self.lock();
        while inner.running > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = match self.idle.wait_timeout(inner, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.lock().running
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn nothing_to_commit_before_the_first_message() {
        let p = PartitionState::new("t", 0);
        assert_eq!(p.committable(), None);
        assert_eq!(p.take_commit(true), None);
    }

    #[test]
    fn commit_stops_at_the_lowest_unfinished_offset() {
        let p = PartitionState::new("t", 0);
        for offset in 10..15 {
            assert!(p.accept(offset));
        }
        // 10 is slow; 11, 12 and 14 finish first.
        for offset in [11, 12, 14] {
            assert!(p.try_start());
            p.finish(offset, true);
        }
        assert_eq!(p.committable(), Some(10));
        assert!(p.try_start());
        p.finish(10, true);
        assert_eq!(p.committable(), Some(13));
        assert!(p.try_start());
        p.finish(13, true);
        assert_eq!(p.committable(), Some(15));
    }

    #[test]
    fn an_abandoned_message_holds_the_commit_back() {
        let p = PartitionState::new("t", 0);
        assert!(p.accept(0));
        assert!(p.accept(1));
        assert!(p.try_start());
        p.finish(0, false);
        assert!(p.try_start());
        p.finish(1, true);
        assert_eq!(p.committable(), Some(0));
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave holes.
        let p = PartitionState::new("t", 0);
        assert!(p.accept(3));
        assert!(p.accept(7));
        assert!(p.try_start());
        p.finish(3, true);
        assert!(p.try_start());
        p.finish(7, true);
        assert_eq!(p.committable(), Some(8));
    }

    #[test]
    fn an_offset_in_flight_is_not_handed_out_twice() {
        let p = PartitionState::new("t", 0);
        assert!(p.accept(5));
        assert!(!p.accept(5));
        assert!(p.accept(6));
    }

    /// A topic deleted and re-created without a rebalance: its offsets start over.
    /// The new messages are consumed (not taken for old ones), and the commit position
    /// follows them back instead of naming the old topic's end.
    #[test]
    fn offsets_that_start_over_are_consumed_and_committed() {
        let p = PartitionState::new("t", 0);
        for offset in 100..110 {
            assert!(p.accept(offset));
            assert!(p.try_start());
            p.finish(offset, true);
        }
        assert_eq!(p.take_commit(false), Some(110));
        for offset in 0..3 {
            assert!(p.accept(offset), "offset {offset} of the new topic");
            assert!(p.try_start());
            p.finish(offset, true);
        }
        assert_eq!(p.take_commit(false), Some(3));
    }

    #[test]
    fn take_commit_reports_only_progress_unless_forced() {
        let p = PartitionState::new("t", 0);
        assert!(p.accept(0));
        assert_eq!(p.take_commit(false), Some(0));
        assert_eq!(p.take_commit(false), None);
        assert_eq!(p.take_commit(true), Some(0));
        assert!(p.try_start());
        p.finish(0, true);
        assert_eq!(p.take_commit(false), Some(1));
        p.commit_failed(1);
        assert_eq!(p.take_commit(false), Some(1));
    }

    #[test]
    fn revoked_partition_accepts_and_starts_nothing() {
        let p = PartitionState::new("t", 0);
        assert!(p.accept(0));
        p.revoke();
        assert!(p.revoked().is_cancelled());
        assert!(!p.try_start());
        assert!(!p.accept(1));
        assert_eq!(p.committable(), Some(0));
    }

    #[test]
    fn wait_idle_returns_when_the_last_running_message_finishes() {
        let p = Arc::new(PartitionState::new("t", 0));
        assert!(p.accept(0));
        assert!(p.try_start());
        let q = p.clone();
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            q.finish(0, true);
        });
        assert!(p.wait_idle(Instant::now() + Duration::from_secs(5)));
        finisher.join().unwrap();
        assert_eq!(p.running(), 0);
        assert!(p.try_start());
        assert!(!p.wait_idle(Instant::now() + Duration::from_millis(20)));
    }
}
