//! Faults, for every sink and mode: the real `outbox` binary killed with SIGKILL again
//! and again while events are written, and a broker outage four times longer than the
//! sink's timeout. Afterwards every committed event has arrived, each aggregate's in
//! commit order (after dropping repeats), and the outage used up no attempt. A new sink
//! gets both with one `faults!` line.
//!
//! Kafka's outage stops the shared broker, so its Kafka tests take a lock the outage
//! holds alone.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outbox::Event;
use tokio::sync::RwLock;
use uuid::Uuid;

const EVENTS: usize = 12_000;
const AGGREGATES: usize = 100;
const WRITERS: usize = 4;
const KILLS: usize = 4;
/// How long an outage lasts, in units of the sink's timeout.
const OUTAGE_TIMEOUTS: u32 = 4;

/// Held for writing by Kafka's outage, for reading by the other Kafka tests.
static KAFKA_UP: RwLock<()> = RwLock::const_new(());

macro_rules! faults {
    ($sink:ident, $kind:expr) => {
        mod $sink {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sigkill_loop_polling() {
                super::sigkill_loop(Mode::Polling, $kind).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sigkill_loop_cdc() {
                super::sigkill_loop(Mode::Cdc, $kind).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn outage_polling() {
                super::outage_longer_than_the_sink_timeout(Mode::Polling, $kind).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn outage_cdc() {
                super::outage_longer_than_the_sink_timeout(Mode::Cdc, $kind).await
            }
        }
    };
}

faults!(kafka, SinkKind::Kafka);
faults!(nats, SinkKind::Nats);
faults!(rabbitmq, SinkKind::RabbitMq);
faults!(webhook, SinkKind::Webhook);
faults!(webhook_batches, SinkKind::WebhookBatches);

async fn sigkill_loop(mode: Mode, kind: SinkKind) {
    let _kafka = match kind {
        SinkKind::Kafka => Some(KAFKA_UP.read().await),
        _ => None,
    };
    let db = TestDb::for_mode(mode).await;
    let sink = db.sink(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let mode_name = mode_name(mode);
    let env = [
        ("OUTBOX_POLLING__BATCH_SIZE", "250"),
        ("OUTBOX_MODE", mode_name),
    ];
    let mut relay = spawn_relay_to(&db, &sink, dir.path(), &env);

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

    let mut progress = Vec::new();
    let mut written_at_kill = Vec::new();
    for kill in 1..=KILLS {
        // Long enough for a restarted relay to publish and report a position (status
        // updates go to the server every second).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        sigkill(&mut relay);
        let position = progress_of(&db, mode).await;
        written_at_kill.push(db.rows().await.len());
        eprintln!("kill {kill} at {:?}: {position}", started.elapsed());
        progress.push(position);
        relay = spawn_relay_to(&db, &sink, dir.path(), &env);
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
    let received = sink
        .read_ids(&["order"], &ids, Duration::from_secs(120))
        .await;
    sigterm(&relay);
    let status = relay.wait().unwrap();
    assert!(status.success(), "relay exits 0 on SIGTERM, got {status:?}");

    let audit = audit(&rows, &received);
    eprintln!(
        "crash test ({kind:?}, {mode_name}): {EVENTS} events written in {written_by:?} with {KILLS} SIGKILLs ({pending_at_end_of_stream} pending when writers finished); duplicates={}",
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
    sink.clean_up().await;
    db.drop_db().await;
}

/// The broker is unreachable for four times the sink's timeout while events are
/// written: nothing is dead-lettered, no attempt is used up, and once it is back every
/// event arrives in order.
async fn outage_longer_than_the_sink_timeout(mode: Mode, kind: SinkKind) {
    let _kafka = match kind {
        SinkKind::Kafka => Some(KAFKA_UP.write().await),
        _ => None,
    };
    let db = TestDb::for_mode(mode).await;
    let sink = db.sink_for_outages(kind).await;
    let relay = InProcessRelay::start(db.relay_config_for_sink(mode, &sink, ""));
    let before: Vec<Event> = (0..40)
        .map(|n| event("order", &(n % 4).to_string(), n))
        .collect();
    db.write(&before).await;
    let ids: Vec<Uuid> = before.iter().map(|e| e.id).collect();
    sink.read_ids(&["order"], &ids, Duration::from_secs(60))
        .await;

    sink.begin_outage().await;
    let outage = sink.timeout * OUTAGE_TIMEOUTS;
    let began = Instant::now();
    let mut during = Vec::new();
    for round in 0..4 {
        let events: Vec<Event> = (0..10)
            .map(|n| event("order", &(n % 4).to_string(), 100 + round * 10 + n))
            .collect();
        db.write(&events).await;
        during.extend(events.iter().map(|e| e.id));
        tokio::time::sleep(outage / 4).await;
    }
    if kind != SinkKind::Kafka {
        // The test reads the broker directly, not through the proxy: the outage was real.
        let reached = sink.read_for(&["order"], Duration::from_millis(200)).await;
        assert!(
            reached.iter().all(|r| !during.contains(&r.id())),
            "events reached the broker during the outage"
        );
    }
    let (dead_letters, attempts): (i64, Option<i32>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE dead_lettered_at IS NOT NULL), max(attempts) FROM outbox",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sink.end_outage().await;
    eprintln!("{kind:?} {mode:?}: outage of {:?}", began.elapsed());
    assert_eq!(dead_letters, 0, "an outage dead-lettered events");
    assert_eq!(attempts, Some(0), "an outage used up attempts");

    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = sink
        .read_ids(&["order"], &ids, Duration::from_secs(120))
        .await;
    relay.stop().await;
    audit(&rows, &received).assert_complete_and_ordered();
    sink.clean_up().await;
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
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            .flatten();
            format!("slot confirmed up to {lsn:?}")
        }
    }
}
