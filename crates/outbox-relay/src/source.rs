//! Where the engine takes events from, behind one trait: the table itself (polling) or
//! the table's replication stream (CDC, in `cdc.rs`). The engine's loop is the same for
//! both: take a batch, publish it through the sink, let the source record the outcome.

use std::sync::atomic::Ordering;

use outbox_core::{Action, DeliveryOutcome, StoredEvent};
use outbox_postgres::{Fetch, OnPublish};
use sqlx::postgres::PgListener;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::engine::{LeadEnd, Relay};
use crate::RelayError;

/// A source of events for the active relay.
///
/// Contract: `next_batch` gives events in the order they must be published (per
/// aggregate, commit order); `record` gets back that batch with one action (and the
/// sink's outcome) per event and makes it durable before the source moves past it: a
/// crash anywhere leaves every event not yet recorded to be given again (duplicates,
/// never loss). Retry bookkeeping and parking are the source's own: an aggregate whose
/// event waits for a retry, or (with `delivery.on_dead_letter = "park"`) has a dead
/// letter, is parked: its later events wait in the table while the others flow.
pub(crate) trait Source {
    /// The next events to publish, waiting while there are none; `None` once
    /// `shutdown` is cancelled.
    async fn next_batch(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<StoredEvent>>, LeadEnd>;

    /// Records what became of the last batch: `actions[i]` and `outcomes[i]` are for
    /// `events[i]`.
    async fn record(
        &mut self,
        events: Vec<StoredEvent>,
        actions: &[Action],
        outcomes: &[DeliveryOutcome],
        shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd>;
}

/// Polling: pending rows in `seq` order, fetched on the connection that holds the
/// leadership lock (so a relay that lost it cannot mark anything); outcomes recorded in
/// one transaction. Woken by the table's insert notification, or every
/// `polling.interval`.
pub(crate) struct PollingSource<'r, 'c> {
    relay: &'r Relay<'r>,
    conn: &'c mut PgConnection,
    listener: PgListener,
}

impl<'r, 'c> PollingSource<'r, 'c> {
    pub(crate) async fn start(
        relay: &'r Relay<'r>,
        conn: &'c mut PgConnection,
    ) -> Result<Self, LeadEnd> {
        let lost = |err: sqlx::Error| LeadEnd::Lost(RelayError::Store(err.into()));
        let mut listener = PgListener::connect_with(&relay.pool).await.map_err(lost)?;
        listener
            .listen(&relay.config.table.notify_channel())
            .await
            .map_err(lost)?;
        Ok(PollingSource {
            relay,
            conn,
            listener,
        })
    }

    fn lost(&self, err: RelayError) -> LeadEnd {
        self.relay.health.database.failed(err.to_string());
        LeadEnd::Lost(err)
    }
}

impl Source for PollingSource<'_, '_> {
    async fn next_batch(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<StoredEvent>>, LeadEnd> {
        let relay = self.relay;
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            let events = relay
                .fetch_from_table(self.conn, Fetch::Pending)
                .await
                .map_err(|err| self.lost(err.into()))?;
            relay.health.database.ok(relay.health.started());
            if !events.is_empty() {
                return Ok(Some(events));
            }
            // Idle: sleep until an insert is announced, the fallback interval passes, or
            // we are asked to stop.
            tokio::select! {
                notification = self.listener.recv() => {
                    if let Err(err) = notification {
                        debug!(%err, "notification listener reconnecting");
                    }
                }
                _ = tokio::time::sleep(relay.config.poll_interval) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
        }
    }

    async fn record(
        &mut self,
        _events: Vec<StoredEvent>,
        actions: &[Action],
        _outcomes: &[DeliveryOutcome],
        _shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        let relay = self.relay;
        relay
            .record_in_table(self.conn, actions, relay.config.on_publish)
            .await
            .map_err(|err| self.lost(err.into()))
    }
}

/// What both sources do with rows they take from the table: polling all of them, CDC
/// those a parked aggregate keeps waiting there.
impl Relay<'_> {
    /// The next rows of `which` to publish, parked aggregates left out.
    pub(crate) async fn fetch_from_table(
        &self,
        conn: &mut PgConnection,
        which: Fetch,
    ) -> Result<Vec<StoredEvent>, outbox_postgres::Error> {
        let limit = fetch_limit(
            self.config.batch_size,
            self.config.max_batch_bytes,
            self.heaviest_fetched_row.load(Ordering::Relaxed),
        );
        let events = self
            .store
            .fetch(
                conn,
                which,
                self.config.on_dead_letter,
                limit,
                self.config.max_batch_bytes,
            )
            .await?;
        if let Some(heaviest) = events.iter().map(StoredEvent::weight).max() {
            self.heaviest_fetched_row.store(heaviest, Ordering::Relaxed);
        }
        Ok(events)
    }

    /// Records the outcome of a batch of table rows, in one transaction.
    pub(crate) async fn record_in_table(
        &self,
        conn: &mut PgConnection,
        actions: &[Action],
        on_publish: OnPublish,
    ) -> Result<(), outbox_postgres::Error> {
        if actions
            .iter()
            .any(|a| matches!(a, Action::DeadLetter { .. }))
        {
            crash_point!("relay-dead-letter-write");
        }
        self.store
            .apply(conn, actions, on_publish)
            .await
            .map(|_| ())
    }
}

/// How many rows a fetch asks for: `batch_size`, or fewer when rows are heavy. A fetch
/// ends at `max_batch_bytes` whatever its limit, but the server renders every row the
/// limit lets through, and the connection reads past the bytes bound to the end of the
/// result; so the limit follows the heaviest row of the last fetch (one row more than
/// fit, to see whether they still weigh as much). Before any row was seen, rows are
/// taken to weigh a 64th of the bound.
fn fetch_limit(batch_size: u32, max_batch_bytes: u64, heaviest_row: u64) -> i64 {
    let heaviest = if heaviest_row == 0 {
        max_batch_bytes / 64
    } else {
        heaviest_row
    };
    (max_batch_bytes / heaviest.max(1) + 1).clamp(1, u64::from(batch_size)) as i64
}

#[cfg(test)]
mod tests {
    use super::fetch_limit;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn small_rows_fetch_a_whole_batch() {
        assert_eq!(fetch_limit(1000, 8 * MIB, 1024), 1000);
        assert_eq!(fetch_limit(1000, 8 * MIB, 0), 65);
    }

    #[test]
    fn heavy_rows_fetch_what_the_bytes_bound_lets_through() {
        assert_eq!(fetch_limit(1000, 8 * MIB, MIB), 9);
        assert_eq!(fetch_limit(1000, 8 * MIB, 100 * MIB), 1);
        assert_eq!(fetch_limit(5, 8 * MIB, MIB), 5);
    }
}
