//! Where the engine takes events from, behind one trait: the table itself (polling) or
//! the table's replication stream (CDC, in `cdc.rs`). The engine's loop is the same for
//! both: take a batch, publish it through the sink, let the source record the outcome.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_core::{Action, DeliveryOutcome, StoredEvent};
use outbox_postgres::{Fetch, OnPublish};
use sqlx::postgres::PgListener;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::engine::{LeadEnd, Relay};
use crate::RelayError;

/// The most insert notifications read at once before a fetch (each is one committed
/// transaction); the rest wait for the next.
const MAX_NOTIFICATIONS_READ: usize = 10_000;

/// A fetch that finds rows after this many insert notifications (commits since the last
/// fetch) stops listening: the stream is busy enough that the next fetch will find rows
/// anyway, and every notification costs PostgreSQL a wake-up of the listening backend
/// (bench/README.md, "Listening only when idle").
const BUSY_AFTER_NOTIFICATIONS: usize = 4;

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

    /// Reads on while `in_flight` is being published, so that the next batch is ready
    /// when it is done; returns once there is no more room. The engine drops it when
    /// the publish is done, so it must leave the source whole at each await. Sources
    /// that do not read ahead return at once.
    async fn read_ahead(&mut self, _in_flight: &[StoredEvent]) {}
}

/// A source that can give its next batch while the last one is still being published:
/// the engine's pipeline (`pipeline.rs`).
pub(crate) trait Prefetch: Source {
    /// The next events to publish, at most `max_bytes` of them, without waiting (an
    /// empty batch when there are none now), leaving out every event given out and
    /// neither recorded nor given back.
    async fn next_batch_now(&mut self, max_bytes: u64) -> Result<Vec<StoredEvent>, LeadEnd>;

    /// The next events to publish, at most `max_bytes` of them, without waiting, if
    /// any were announced since the last look (an empty batch otherwise), leaving out
    /// every event given out and neither recorded nor given back.
    async fn next_batch_announced(&mut self, max_bytes: u64) -> Result<Vec<StoredEvent>, LeadEnd>;

    /// Events given out that will not be published now: they are given again later.
    fn give_back(&mut self, events: &[StoredEvent]);
}

/// Polling: pending rows in `seq` order, fetched on the connection that holds the
/// leadership lock (so a relay that lost it cannot mark anything); outcomes recorded in
/// one transaction. Woken by the table's insert notification, or every
/// `polling.interval`.
///
/// It listens only while the stream is quiet. Once commits arrive faster than it
/// publishes, it stops listening and fetches after each batch without being told; the
/// first fetch that finds nothing listens again and looks once more before it waits,
/// for the rows committed before listening began.
pub(crate) struct PollingSource<'r, 'c> {
    relay: &'r Relay<'r>,
    conn: &'c mut PgConnection,
    listener: PgListener,
    /// The listener is subscribed to the table's channel.
    listening: bool,
    /// Insert notifications read since the last fetch.
    announced: usize,
    /// The `seq` of every row given out and not yet recorded or given back: still
    /// pending in the table, so every fetch leaves them out.
    given_out: HashSet<i64>,
    /// The last fetch was cut short by its limit: more rows may be pending.
    maybe_more: bool,
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
            listening: true,
            announced: 0,
            given_out: HashSet::new(),
            maybe_more: false,
        })
    }

    /// One fetch of pending rows, leaving out those given out. The insert notifications
    /// received before it are read first: they are for rows it finds.
    async fn fetch(&mut self, max_bytes: u64) -> Result<Vec<StoredEvent>, LeadEnd> {
        let relay = self.relay;
        self.take_notifications().await;
        let announced = std::mem::take(&mut self.announced);
        let in_flight: Vec<i64> = self.given_out.iter().copied().collect();
        let (events, full) = relay
            .fetch_from_table(self.conn, Fetch::Pending, &in_flight, max_bytes)
            .await
            .map_err(|err| self.lost(err.into()))?;
        relay.health.database.ok(relay.health.started());
        self.given_out.extend(events.iter().map(|event| event.seq));
        self.maybe_more = full;
        if self.listening && announced >= BUSY_AFTER_NOTIFICATIONS && !events.is_empty() {
            self.set_listening(false).await?;
        } else if !self.listening && events.is_empty() {
            self.set_listening(true).await?;
        }
        Ok(events)
    }

    /// Subscribes the listener to the table's channel, or unsubscribes it.
    async fn set_listening(&mut self, listen: bool) -> Result<(), LeadEnd> {
        let channel = self.relay.config.table.notify_channel();
        let result = if listen {
            self.listener.listen(&channel).await
        } else {
            self.listener.unlisten(&channel).await
        };
        result.map_err(|err| self.lost(RelayError::Store(err.into())))?;
        debug!(listen, "insert notifications");
        self.listening = listen;
        Ok(())
    }

    /// Reads the insert notifications that have arrived, without waiting: a busy relay
    /// rarely waits on the listener, and they would pile up on the server, each one
    /// waking the idle relay later for a row already published.
    /// Returns how many were read (also added to `announced`).
    async fn take_notifications(&mut self) -> usize {
        let mut read = 0;
        while read < MAX_NOTIFICATIONS_READ {
            match tokio::time::timeout(Duration::ZERO, self.listener.recv()).await {
                Ok(Ok(_)) => read += 1,
                Ok(Err(err)) => {
                    debug!(%err, "notification listener reconnecting");
                    break;
                }
                Err(_) => break,
            }
        }
        self.announced += read;
        read
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
            let was_listening = self.listening;
            let events = self.fetch(relay.config.max_batch_bytes).await?;
            if !events.is_empty() {
                return Ok(Some(events));
            }
            if !was_listening {
                // Listening from now on: look once more, for the rows committed before.
                continue;
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
        events: Vec<StoredEvent>,
        actions: &[Action],
        _outcomes: &[DeliveryOutcome],
        _shutdown: &CancellationToken,
    ) -> Result<(), LeadEnd> {
        let relay = self.relay;
        relay
            .record_in_table(self.conn, actions, relay.config.on_publish)
            .await
            .map_err(|err| self.lost(err.into()))?;
        self.give_back(&events);
        Ok(())
    }
}

impl Prefetch for PollingSource<'_, '_> {
    /// Fetches only when the last fetch was full (a backlog) and a row fits in
    /// `max_bytes`. Below a backlog, a fetch beside each publish would find a few rows
    /// at a time, each costing the database a query and the broker a round trip.
    async fn next_batch_now(&mut self, max_bytes: u64) -> Result<Vec<StoredEvent>, LeadEnd> {
        // Not even a row as heavy as the last fetch's heaviest fits: wait for the publish.
        let heaviest = self.relay.heaviest_fetched_row.load(Ordering::Relaxed);
        if !self.maybe_more || max_bytes < heaviest.max(1) {
            return Ok(Vec::new());
        }
        self.fetch(max_bytes).await
    }

    /// Fetches when the last fetch was full, an insert was announced since, or the
    /// stream is busy (not listening): a quiet table costs no query.
    async fn next_batch_announced(&mut self, max_bytes: u64) -> Result<Vec<StoredEvent>, LeadEnd> {
        if self.listening && self.take_notifications().await == 0 && !self.maybe_more {
            return Ok(Vec::new());
        }
        self.fetch(max_bytes).await
    }

    fn give_back(&mut self, events: &[StoredEvent]) {
        for event in events {
            self.given_out.remove(&event.seq);
        }
    }
}

/// What both sources do with rows they take from the table: polling all of them, CDC
/// those a parked aggregate keeps waiting there.
impl Relay<'_> {
    /// The next rows of `which` to publish, at most `max_bytes` of them (the row that
    /// reaches it included), parked aggregates and the rows whose `seq` is `in_flight`
    /// left out; and whether the fetch was cut short by its limit (more rows may be
    /// there).
    pub(crate) async fn fetch_from_table(
        &self,
        conn: &mut PgConnection,
        which: Fetch,
        in_flight: &[i64],
        max_bytes: u64,
    ) -> Result<(Vec<StoredEvent>, bool), outbox_postgres::Error> {
        let limit = fetch_limit(
            self.config.batch_size,
            max_bytes,
            self.heaviest_fetched_row.load(Ordering::Relaxed),
        );
        let events = self
            .store
            .fetch_excluding(
                conn,
                which,
                self.config.on_dead_letter,
                limit,
                max_bytes,
                in_flight,
            )
            .await?;
        if let Some(heaviest) = events.iter().map(StoredEvent::weight).max() {
            self.heaviest_fetched_row.store(heaviest, Ordering::Relaxed);
        }
        let bytes: u64 = events.iter().map(StoredEvent::weight).sum();
        let full = events.len() as i64 >= limit || bytes >= max_bytes;
        Ok((events, full))
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
