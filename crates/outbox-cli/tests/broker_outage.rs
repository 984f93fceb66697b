//! Kafka is stopped for 20 s in the middle of a stream and started again: nothing is
//! lost and each aggregate keeps its order. Alone in its test binary, because it stops
//! the broker every other test uses.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outbox::Event;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_of_20_seconds_loses_nothing_polling() {
    broker_outage(Mode::Polling).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_of_20_seconds_loses_nothing_cdc() {
    broker_outage(Mode::Cdc).await
}

/// Both cases stop the one broker: they must not overlap.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn broker_outage(mode: Mode) {
    let _broker = BROKER.lock().await;
    let db = TestDb::for_mode(mode).await;
    let relay = InProcessRelay::start(db.relay_config_for(
        mode,
        "[delivery]\ninitial_backoff = \"200ms\"\nmax_backoff = \"2s\"\n",
    ));

    // About 100 events/s for 40 s, over 20 aggregates.
    let pool = db.pool.clone();
    let writer = tokio::spawn(async move {
        for n in 0..4000usize {
            let events: Vec<Event> = vec![event("order", &(n % 20).to_string(), n)];
            let mut tx = pool.begin().await.unwrap();
            outbox::write_all(&mut *tx, &events).await.unwrap();
            tx.commit().await.unwrap();
            if n % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    tokio::time::sleep(Duration::from_secs(5)).await;
    let stopped = Instant::now();
    tokio::task::spawn_blocking(|| services(&["stop", "kafka"]))
        .await
        .unwrap();
    eprintln!("kafka stopped");
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(stopped.elapsed())).await;
    let pending_during_outage = db.pending().await;
    tokio::task::spawn_blocking(|| services(&["start", "kafka"]))
        .await
        .unwrap();
    eprintln!(
        "kafka started again after {:?}; {pending_during_outage} events pending",
        stopped.elapsed()
    );

    writer.await.unwrap();
    if mode == Mode::Polling {
        db.wait_drained(Duration::from_secs(90)).await;
    }
    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(150)).await;
    relay.stop().await;
    let audit = audit(&rows, &received);
    audit.assert_complete_and_ordered();
    if mode == Mode::Polling {
        assert!(
            pending_during_outage > 0,
            "events piled up while the broker was down"
        );
    }
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(dead, 0, "an outage dead-letters nothing");
    db.drop_db().await;
}

/// The relay is killed while the broker is down and it holds undelivered events: after
/// both come back, every event arrives. (A relay that confirmed or marked before the
/// acknowledgement would lose exactly these.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_during_an_outage_loses_nothing_polling() {
    killed_during_outage(Mode::Polling).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_during_an_outage_loses_nothing_cdc() {
    killed_during_outage(Mode::Cdc).await
}

async fn killed_during_outage(mode: Mode) {
    let _broker = BROKER.lock().await;
    let db = TestDb::for_mode(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let env = [("OUTBOX_MODE", mode_name(mode))];
    let mut relay = spawn_relay(&db, &log, &env);
    let warmup: Vec<Event> = (0..50)
        .map(|n| event("order", &(n % 5).to_string(), n))
        .collect();
    db.write(&warmup).await;
    let ids: Vec<Uuid> = warmup.iter().map(|e| e.id).collect();
    consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(60)).await;

    tokio::task::spawn_blocking(|| services(&["stop", "kafka"]))
        .await
        .unwrap();
    let stranded: Vec<Event> = (50..550)
        .map(|n| event("order", &(n % 5).to_string(), n))
        .collect();
    db.write(&stranded).await;
    // Long enough for the relay to have read them and reported any position it holds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    sigkill(&mut relay);
    tokio::task::spawn_blocking(|| services(&["start", "kafka"]))
        .await
        .unwrap();
    let mut relay = spawn_relay(&db, &log, &env);

    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(150)).await;
    sigterm(&relay);
    let _ = relay.wait();
    audit(&rows, &received).assert_complete_and_ordered();
    db.drop_db().await;
}
