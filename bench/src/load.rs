//! The writers: an open-loop generator that keeps to a schedule whatever the system
//! under test does, and a closed-loop one that piles up a backlog as fast as it can.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use outbox::Event;
use sqlx::PgPool;
use uuid::Uuid;

use crate::now_micros;

/// Events written by one run of the writers, each with the wall-clock time (µs) at
/// which its transaction's COMMIT returned.
pub struct Written {
    pub commits: Commits,
    /// When the schedule started, µs.
    pub started: u64,
    /// When the last COMMIT returned, µs.
    pub finished: u64,
}

impl Written {
    pub fn events(&self) -> usize {
        self.commits.len()
    }

    pub fn rate(&self) -> f64 {
        self.events() as f64 / ((self.finished - self.started) as f64 / 1e6)
    }
}

/// The shape of the load.
#[derive(Clone, Copy)]
pub struct Shape {
    pub writers: usize,
    pub payload_bytes: usize,
    /// Transactions per second above which events are grouped several per transaction.
    pub max_tx_per_sec: u32,
}

impl Shape {
    /// Events per transaction at a target rate: one up to `max_tx_per_sec`, then as many
    /// as keep the transaction rate at or under it.
    pub fn events_per_tx(&self, rate: u32) -> usize {
        rate.div_ceil(self.max_tx_per_sec).max(1) as usize
    }
}

/// Writes `rate` events/s for `seconds`, open loop: transaction `i` is due at
/// `i × events_per_tx / rate` after the start, and a writer that falls behind the
/// schedule catches up without sleeping instead of slowing the schedule down.
pub async fn open_loop(pool: &PgPool, shape: Shape, rate: u32, seconds: f64) -> Result<Written> {
    let per_tx = shape.events_per_tx(rate);
    let events = (rate as f64 * seconds).round() as usize;
    let interval = Duration::from_secs_f64(per_tx as f64 / rate as f64);
    write(pool, shape, events, per_tx, Some(interval)).await
}

/// Writes `events` events as fast as the writers go, `per_tx` per transaction.
pub async fn closed_loop(
    pool: &PgPool,
    shape: Shape,
    events: usize,
    per_tx: usize,
) -> Result<Written> {
    write(pool, shape, events, per_tx, None).await
}

type Commits = Vec<(Uuid, u64)>;

/// Events per transaction of the backlog scenario (and of the limits measured beside it).
pub const BACKLOG_EVENTS_PER_TX: usize = 10;

/// `shape.writers` connections share the transactions; with an `interval`, transaction
/// `i` waits until `i × interval` after the start.
async fn write(
    pool: &PgPool,
    shape: Shape,
    events: usize,
    per_tx: usize,
    interval: Option<Duration>,
) -> Result<Written> {
    let total_tx = events.div_ceil(per_tx);
    let next = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let started = now_micros();
    let mut tasks = Vec::new();
    for _ in 0..shape.writers {
        let (pool, next) = (pool.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut commits = Commits::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total_tx {
                    return anyhow::Ok(commits);
                }
                if let Some(interval) = interval {
                    tokio::time::sleep_until(start + interval * i as u32).await;
                }
                let count = per_tx.min(events - i * per_tx);
                write_tx(&pool, shape.payload_bytes, i * per_tx, count, &mut commits).await?;
            }
        }));
    }
    let mut commits = Commits::new();
    for task in tasks {
        commits.extend(task.await??);
    }
    let finished = commits.iter().map(|(_, t)| *t).max().unwrap_or(started);
    Ok(Written {
        commits,
        started,
        finished: finished.max(started + 1),
    })
}

/// One transaction of `count` events numbered from `first`, spread over 1,000
/// aggregates; stamps each event with the time its COMMIT returned.
async fn write_tx(
    pool: &PgPool,
    payload_bytes: usize,
    first: usize,
    count: usize,
    commits: &mut Commits,
) -> Result<()> {
    let events: Vec<Event> = (first..first + count)
        .map(|n| {
            Event::new(
                "order",
                (n % 1000).to_string(),
                "Bench",
                payload(payload_bytes, n),
            )
        })
        .collect();
    let mut tx = pool.begin().await?;
    outbox::write_all(&mut *tx, &events).await?;
    tx.commit().await?;
    let at = now_micros();
    commits.extend(events.iter().map(|e| (e.id, at)));
    Ok(())
}

/// JSON of about `bytes` bytes once rendered.
pub fn payload(bytes: usize, n: usize) -> serde_json::Value {
    let filler = "x".repeat(bytes.saturating_sub(40));
    serde_json::json!({ "n": n, "data": filler })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_events_only_above_the_transaction_rate() {
        let shape = Shape {
            writers: 1,
            payload_bytes: 1024,
            max_tx_per_sec: 1000,
        };
        assert_eq!(shape.events_per_tx(500), 1);
        assert_eq!(shape.events_per_tx(1000), 1);
        assert_eq!(shape.events_per_tx(1001), 2);
        assert_eq!(shape.events_per_tx(20_000), 20);
    }

    #[test]
    fn payload_is_about_the_asked_size() {
        let len = payload(1024, 123_456).to_string().len();
        assert!((1000..=1040).contains(&len), "{len}");
    }
}
