//! The real `outbox` binary is killed with SIGKILL again and again while a stream of
//! events is written; a Kafka consumer then checks that every committed event arrived
//! and that each aggregate's events arrived in commit order (after dropping repeats).

mod common;

use std::time::{Duration, Instant};

use common::*;
use outbox::Event;
use uuid::Uuid;

const EVENTS: usize = 12_000;
const AGGREGATES: usize = 100;
const WRITERS: usize = 4;
const KILLS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_loses_nothing_and_keeps_order_polling() {
    sigkill_loop(Mode::Polling).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_loses_nothing_and_keeps_order_cdc() {
    sigkill_loop(Mode::Cdc).await
}

async fn sigkill_loop(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("relay.log");
    let mode_name = mode_name(mode);
    let env = [
        ("OUTBOX_POLLING__BATCH_SIZE", "250"),
        ("OUTBOX_MODE", mode_name),
    ];
    let mut relay = spawn_relay(&db, &log, &env);

    // Writers own disjoint aggregates and write at a bounded pace (at most about 1,200
    // events/s, so the stream lasts at least 10 s and outlives the kills).
    let started = Instant::now();
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let pool = db.pool.clone();
        writers.push(tokio::spawn(async move {
            let per_writer = EVENTS / WRITERS;
            let mut n = 0;
            while n < per_writer {
                let batch = 1 + n % 5;
                let events: Vec<Event> = (0..batch.min(per_writer - n))
                    .map(|k| {
                        let aggregate =
                            (writer + WRITERS * ((n + k) % (AGGREGATES / WRITERS))).to_string();
                        event("order", &aggregate, n + k)
                    })
                    .collect();
                n += events.len();
                let mut tx = pool.begin().await.unwrap();
                outbox::write_all(&mut *tx, &events).await.unwrap();
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    let mut kills = 0;
    let mut progress = Vec::new();
    let mut written_at_kill = Vec::new();
    while kills < KILLS {
        // Long enough for a restarted relay to publish and report a position (status
        // updates go to the server every second).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        sigkill(&mut relay);
        kills += 1;
        let position = progress_of(&db, mode).await;
        written_at_kill.push(db.rows().await.len());
        eprintln!("kill {kills} at {:?}: {position}", started.elapsed());
        progress.push(position);
        relay = spawn_relay(&db, &log, &env);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let written_by = started.elapsed();
    let pending_at_end_of_stream = db.pending().await;
    // Every kill hit the relay in the middle of the stream, not after it.
    assert!(
        written_at_kill.iter().all(|&n| n > 0 && n < EVENTS),
        "rows written at each kill: {written_at_kill:?} of {EVENTS}"
    );
    let rows = db.rows().await;
    assert_eq!(rows.len(), EVENTS);
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    if mode == Mode::Polling {
        db.wait_drained(Duration::from_secs(120)).await;
    }
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(120)).await;
    sigterm(&relay);
    let status = relay.wait().unwrap();
    assert!(status.success(), "relay exits 0 on SIGTERM, got {status:?}");

    let audit = audit(&rows, &received);
    eprintln!(
        "crash test ({mode_name}): {EVENTS} events written in {written_by:?} with {kills} SIGKILLs ({pending_at_end_of_stream} pending when writers finished); duplicates={}",
        audit.duplicates
    );
    audit.assert_complete_and_ordered();
    match mode {
        Mode::Polling => assert!(
            pending_at_end_of_stream < EVENTS as i64,
            "the relay published during the stream"
        ),
        Mode::Cdc => {
            progress.dedup();
            assert!(
                progress.len() >= 3,
                "the slot's confirmed position moved between kills: {progress:?}"
            );
        }
    }
    db.drop_db().await;
}

/// How far the relay got: rows marked published (polling), or the slot's confirmed
/// position (CDC, where rows are never marked).
async fn progress_of(db: &TestDb, mode: Mode) -> String {
    match mode {
        Mode::Polling => {
            let published: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            format!("{published} published so far")
        }
        Mode::Cdc => {
            let lsn: Option<String> = sqlx::query_scalar(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(db.cdc_names().slot)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            format!("slot confirmed up to {}", lsn.unwrap_or_default())
        }
    }
}
