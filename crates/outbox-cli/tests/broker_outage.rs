//! Kafka is stopped for 20 s in the middle of a stream and started again: nothing is
//! lost and each aggregate keeps its order. The relay's message timeout (5 s) is far
//! shorter than the outage, so librdkafka gives up on messages again and again and the
//! relay's own retry path runs; with `max_attempts = 2`, an outage that used up attempts
//! would dead-letter events. Alone in its test binary, because it stops the broker every
//! other test uses.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outbox::Event;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_longer_than_the_message_timeout_loses_nothing_polling() {
    broker_outage(Mode::Polling, Duration::from_secs(20), 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_longer_than_the_message_timeout_loses_nothing_cdc() {
    broker_outage(Mode::Cdc, Duration::from_secs(20), 0).await
}

/// CDC: while Kafka is down the relay stops reading the replication stream, so the
/// server's sends stall on a full socket. An outage longer than the relay's dead-peer
/// timeout (30 s with the defaults) must neither end the stream nor wedge the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_outage_longer_than_the_dead_peer_timeout_loses_nothing() {
    broker_outage(Mode::Cdc, Duration::from_secs(50), 2048).await
}

/// Both cases stop the one broker: they must not overlap.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The server process of the CDC relay's replication stream (`None` in polling mode).
async fn walsender_pid(db: &TestDb) -> Option<i32> {
    sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
        .bind(&db.cdc_names().slot)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .flatten()
}

/// Writes about 100 events/s for 40 s (events of `pad` extra bytes) while the broker is
/// stopped for `outage`, from the fifth second.
async fn broker_outage(mode: Mode, outage: Duration, pad: usize) {
    let _broker = BROKER.lock().await;
    let db = TestDb::for_mode(mode).await;
    let relay = InProcessRelay::start(db.relay_config_for(
        mode,
        "[delivery]\ninitial_backoff = \"200ms\"\nmax_backoff = \"2s\"\nmax_attempts = 2\n[kafka]\nmessage_timeout = \"5s\"\n",
    ));

    // About 100 events/s for 40 s, over 20 aggregates.
    let pool = db.pool.clone();
    let padding = "x".repeat(pad);
    let writer = tokio::spawn(async move {
        for n in 0..4000usize {
            let events: Vec<Event> = vec![Event::new(
                "order",
                (n % 20).to_string(),
                "Tested",
                serde_json::json!({ "n": n, "aggregate": (n % 20).to_string(), "pad": padding }),
            )];
            let mut tx = pool.begin().await.unwrap();
            outbox::write_all(&mut *tx, &events).await.unwrap();
            tx.commit().await.unwrap();
            if n % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    tokio::time::sleep(Duration::from_secs(5)).await;
    let walsender = walsender_pid(&db).await;
    let stopped = Instant::now();
    tokio::task::spawn_blocking(|| services(&["stop", "kafka"]))
        .await
        .unwrap();
    eprintln!("kafka stopped");
    tokio::time::sleep(outage.saturating_sub(stopped.elapsed())).await;
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
    if mode == Mode::Cdc {
        assert_eq!(
            walsender_pid(&db).await,
            walsender,
            "the replication stream was ended during the outage"
        );
    }
    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(150)).await;
    let failures = relay.metrics.delivery_failures.get();
    relay.stop().await;
    assert!(
        failures > 0,
        "the outage outlasted the message timeout, so deliveries failed and were retried"
    );
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

/// librdkafka reports a queued message failed once `message.timeout.ms` passes, while a
/// later message of the same key, queued later, may still be delivered when the broker
/// returns: the failed one would then be retried after it. Provoked deterministically:
/// one aggregate, a batch five times the producer's queue (so the relay keeps queueing
/// as earlier messages time out), an outage of several timeouts. Order must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_timeouts_never_reorder_an_aggregate_polling() {
    message_timeouts_never_reorder(Mode::Polling).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_timeouts_never_reorder_an_aggregate_cdc() {
    message_timeouts_never_reorder(Mode::Cdc).await
}

async fn message_timeouts_never_reorder(mode: Mode) {
    let _broker = BROKER.lock().await;
    let db = TestDb::for_mode(mode).await;
    let relay = InProcessRelay::start(db.relay_config_for(
        mode,
        "[polling]\nbatch_size = 100\n\
         [delivery]\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\n\
         [kafka]\nmessage_timeout = \"2s\"\nlinger = \"1ms\"\n\
         [kafka.properties]\n\"queue.buffering.max.messages\" = \"20\"\n",
    ));
    let warmup = event("order", "1", 0);
    db.write(std::slice::from_ref(&warmup)).await;
    consume_ids(
        vec![db.topic("order")],
        &[warmup.id],
        Duration::from_secs(60),
    )
    .await;

    tokio::task::spawn_blocking(|| services(&["stop", "kafka"]))
        .await
        .unwrap();
    let stopped = Instant::now();
    for chunk in 0..10 {
        let events: Vec<Event> = (0..30)
            .map(|n| event("order", "1", 1 + chunk * 30 + n))
            .collect();
        db.write(&events).await;
    }
    // Several message timeouts pass with the broker down, while the relay queues more.
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(stopped.elapsed())).await;
    tokio::task::spawn_blocking(|| services(&["start", "kafka"]))
        .await
        .unwrap();
    eprintln!("kafka back after {:?}", stopped.elapsed());

    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(150)).await;
    relay.stop().await;
    audit(&rows, &received).assert_complete_and_ordered();
    db.drop_db().await;
}

/// CDC with large events during an outage: the relay reads ahead of its batch only a
/// bounded number of bytes (`cdc.max_batch_bytes`, and a short read-ahead), so 300
/// events of 900 KiB (270 MiB) written while Kafka is down do not pile up in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_during_an_outage_keep_cdc_memory_bounded() {
    const EVENTS: usize = 300;
    const RSS_BOUND_MIB: f64 = 160.0;
    let _broker = BROKER.lock().await;
    let db = TestDb::for_mode(Mode::Cdc).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_relay(&db, &log, &[("OUTBOX_MODE", "cdc")]);
    let warmup = event("order", "0", 0);
    db.write(std::slice::from_ref(&warmup)).await;
    consume_ids(
        vec![db.topic("order")],
        &[warmup.id],
        Duration::from_secs(60),
    )
    .await;

    tokio::task::spawn_blocking(|| services(&["stop", "kafka"]))
        .await
        .unwrap();
    let mut ids = vec![warmup.id];
    ids.extend(write_large_events(&db, EVENTS).await);
    // The relay reads the stream while the broker is down.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let peak_during_outage = peak_rss_mib(relay.id());
    tokio::task::spawn_blocking(|| services(&["start", "kafka"]))
        .await
        .unwrap();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(180)).await;
    let peak = peak_rss_mib(relay.id());
    sigterm(&relay);
    let _ = relay.wait();
    eprintln!(
        "relay peak RSS with {EVENTS} events of 900 KiB written during an outage: {peak_during_outage:.1} MiB during it, {peak:.1} MiB overall"
    );
    assert_eq!(
        received
            .iter()
            .map(Received::id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        ids.len()
    );
    assert!(
        peak < RSS_BOUND_MIB,
        "relay peak RSS {peak:.1} MiB exceeds {RSS_BOUND_MIB} MiB"
    );
    db.drop_db().await;
}
