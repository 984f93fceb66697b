//! The writers of a scenario: several tasks, each the only writer of its aggregates
//! (so that each aggregate's commit order is its sequence number `n`), some through
//! the library and some with plain SQL, one transaction in ten rolled back, and one
//! long transaction that commits late.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::Event;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::score::CommitTime;
use crate::world::{SharedLog, AGGREGATE_TYPES};

/// How hard the writers write.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub writers: usize,
    pub aggregates_per_writer: usize,
    /// Events per second, all writers together.
    pub events_per_second: u64,
    /// How long the long transaction stays open before it commits.
    pub long_transaction: Duration,
}

pub struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    pub log: SharedLog,
}

impl Writers {
    pub fn start(pool: PgPool, load: Load, started: Instant) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let log = SharedLog::default();
        let mut tasks = Vec::new();
        for writer in 0..load.writers {
            let per_writer = (load.events_per_second / load.writers as u64).max(1);
            tasks.push(tokio::spawn(write_loop(
                pool.clone(),
                writer,
                load.aggregates_per_writer,
                per_writer,
                started,
                stop.clone(),
                log.clone(),
            )));
        }
        tasks.push(tokio::spawn(long_transaction(
            pool,
            load.long_transaction,
            started,
            log.clone(),
        )));
        Writers { stop, tasks, log }
    }

    /// Stops the writers after their current transaction (the long one commits first).
    pub async fn stop(mut self) -> SharedLog {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.log.clone()
    }
}

/// A scenario that failed midway drops its writers: they stop too.
impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One writer: transactions of 1 to 5 events over its own aggregates, paced to
/// `per_second`, through the library (even writers) or plain SQL (odd ones).
async fn write_loop(
    pool: PgPool,
    writer: usize,
    aggregates: usize,
    per_second: u64,
    started: Instant,
    stop: Arc<AtomicBool>,
    log: SharedLog,
) {
    let mut next_n = vec![0_i64; aggregates];
    let mut transaction = 0_u64;
    let mut written = 0_u64;
    let began = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        transaction += 1;
        let size = 1 + (transaction % 5) as usize;
        let rollback = transaction.is_multiple_of(10);
        let mut events = Vec::with_capacity(size);
        for k in 0..size {
            let aggregate = (transaction as usize + k) % aggregates;
            let aggregate_type = AGGREGATE_TYPES[aggregate % AGGREGATE_TYPES.len()];
            let n = next_n[aggregate];
            next_n[aggregate] += 1;
            events.push(Event::new(
                aggregate_type,
                format!("w{writer}-a{aggregate}"),
                "Changed",
                serde_json::json!({ "n": n, "writer": writer }),
            ));
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        match write_transaction(&pool, writer.is_multiple_of(2), &events, rollback).await {
            Outcome::Committed => {
                let at = started.elapsed();
                let mut log = log.lock().unwrap();
                log.commits
                    .extend(ids.iter().map(|&id| CommitTime { id, at }));
            }
            Outcome::RolledBack => {}
            Outcome::Unknown => log.lock().unwrap().uncertain += ids.len() as u64,
            // Nothing was committed; the numbers stay used, which leaves a gap in the
            // aggregate's sequence and never a reversal.
            Outcome::Failed => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        written += size as u64;
        let due = Duration::from_secs_f64(written as f64 / per_second as f64);
        if let Some(wait) = due.checked_sub(began.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

enum Outcome {
    Committed,
    RolledBack,
    /// The connection broke during COMMIT.
    Unknown,
    /// Failed before COMMIT: nothing was written.
    Failed,
}

async fn write_transaction(
    pool: &PgPool,
    library: bool,
    events: &[Event],
    rollback: bool,
) -> Outcome {
    let Ok(mut tx) = pool.begin().await else {
        return Outcome::Failed;
    };
    let written = if library {
        outbox::write_all(&mut *tx, events).await.is_ok()
    } else {
        let mut ok = true;
        for event in events {
            let payload = event.payload.to_json().expect("JSON payloads");
            let result = sqlx::query(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(event.id)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(sqlx::types::Json(payload))
            .execute(&mut *tx)
            .await;
            if result.is_err() {
                ok = false;
                break;
            }
        }
        ok
    };
    if !written {
        return Outcome::Failed;
    }
    if rollback {
        return match tx.rollback().await {
            Ok(()) => Outcome::RolledBack,
            Err(_) => Outcome::Failed,
        };
    }
    match tx.commit().await {
        Ok(()) => Outcome::Committed,
        Err(_) => Outcome::Unknown,
    }
}

/// A transaction that opens at once, writes three events of its own aggregate and
/// commits after `open_for`: its rows have low `seq` values but commit late, which a
/// relay that reads by position would skip.
async fn long_transaction(pool: PgPool, open_for: Duration, started: Instant, log: SharedLog) {
    let events: Vec<Event> = (0..3)
        .map(|n| {
            Event::new(
                "order",
                "long-1",
                "Changed",
                serde_json::json!({ "n": n, "writer": "long" }),
            )
        })
        .collect();
    let Ok(mut tx) = pool.begin().await else {
        return;
    };
    if outbox::write_all(&mut *tx, &events).await.is_err() {
        return;
    }
    tokio::time::sleep(open_for).await;
    match tx.commit().await {
        Ok(()) => {
            let at = started.elapsed();
            log.lock()
                .unwrap()
                .commits
                .extend(events.iter().map(|e| CommitTime { id: e.id, at }));
        }
        Err(_) => log.lock().unwrap().uncertain += events.len() as u64,
    }
}
