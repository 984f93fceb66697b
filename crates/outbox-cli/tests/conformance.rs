//! The guarantees every sink must keep, written once and run for each sink (Kafka, NATS
//! JetStream, RabbitMQ, an HTTP webhook receiver) and each mode (polling and CDC)
//! against the real services. A new sink gets the whole suite with one `conformance!`
//! line.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use outbox::Event;
use outbox_test_kit::Poison;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Runs every case for one sink: `mod SINK { mod CASE { polling, cdc } }`.
macro_rules! conformance {
    ($sink:ident, $kind:expr) => {
        mod $sink {
            use super::*;
            cases!(
                $kind;
                round_trip_publishes_destination_key_value_and_headers,
                rolled_back_transaction_publishes_nothing,
                plain_sql_writers_are_published_the_same_way,
                late_committing_transaction_is_not_skipped,
                per_aggregate_order_holds_with_concurrent_writers,
                poison_event_is_dead_lettered_and_others_flow,
                illegal_destination_is_dead_lettered_without_blocking,
                dead_letters_are_listed_and_retried_from_the_command_line,
            );
        }
    };
}

macro_rules! cases {
    ($kind:expr; $($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn polling() {
                    super::super::$case(Mode::Polling, $kind).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cdc() {
                    super::super::$case(Mode::Cdc, $kind).await
                }
            }
        )*
    };
}

conformance!(kafka, SinkKind::Kafka);
conformance!(nats, SinkKind::Nats);
conformance!(rabbitmq, SinkKind::RabbitMq);
conformance!(webhook, SinkKind::Webhook);
conformance!(webhook_batches, SinkKind::WebhookBatches);

/// A database for `mode`, a sink of `kind` and a relay between them.
async fn start(mode: Mode, kind: SinkKind, extra_toml: &str) -> (TestDb, TestSink, InProcessRelay) {
    let db = TestDb::for_mode(mode).await;
    let sink = db.sink(kind).await;
    let relay = InProcessRelay::start(db.relay_config_for_sink(mode, &sink, extra_toml));
    (db, sink, relay)
}

async fn finish(db: TestDb, sink: TestSink) {
    sink.clean_up().await;
    db.drop_db().await;
}

/// `outbox dead-letters list` shows a dead letter with its reason; `retry` queues it
/// again and the relay tries it once more (here it fails again: the sink still refuses
/// it, so it is a dead letter again, with a later time and a fresh attempt count).
async fn dead_letters_are_listed_and_retried_from_the_command_line(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let poison = sink.poison();
    let bad = poison_event(&poison, "1");
    db.write(std::slice::from_ref(&bad)).await;
    dead_letter(&db, bad.id).await;
    let list = cli(&db, &["dead-letters", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(rows[0]["id"], bad.id.to_string());
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap()
            .contains(poison.reason),
        "{rows}"
    );
    let status: serde_json::Value = serde_json::from_str(&cli(&db, &["status", "--json"])).unwrap();
    assert_eq!(status["dead_lettered"], 1);
    assert!(
        status["active_relay"].is_object(),
        "the in-process relay holds the lock: {status}"
    );
    let first: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT dead_lettered_at FROM outbox WHERE id = $1")
            .bind(bad.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let retried = cli(&db, &["dead-letters", "retry", &bad.id.to_string()]);
    assert!(retried.contains("queued 1"), "{retried}");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let again: Option<(chrono::DateTime<chrono::Utc>, i32)> = sqlx::query_as(
            "SELECT dead_lettered_at, attempts FROM outbox WHERE id = $1 AND dead_lettered_at > $2",
        )
        .bind(bad.id)
        .bind(first)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some((_, attempts)) = again {
            assert_eq!(attempts, 1, "the retry started from a fresh attempt count");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retried event was not tried again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    finish(db, sink).await;
}

/// The event of `poison`, in aggregate `aggregate_id`.
fn poison_event(poison: &Poison, aggregate_id: &str) -> Event {
    let payload: serde_json::Value = serde_json::from_str(&poison.payload).unwrap();
    Event::new(&poison.aggregate_type, aggregate_id, "Poison", payload)
}

/// An event the sink refuses for good (for Kafka and NATS a payload larger than the
/// broker takes) is dead-lettered with its reason at once; other aggregates, and the
/// poison's own later events, keep flowing.
async fn poison_event_is_dead_lettered_and_others_flow(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let poison = sink.poison();
    let bad = poison_event(&poison, "poison");
    let mut events = vec![
        event(&poison.aggregate_type, "poison", 0),
        bad.clone(),
        event(&poison.aggregate_type, "poison", 2),
    ];
    for n in 0..200 {
        events.push(event("order", &format!("ok-{}", n % 20), n));
    }
    db.write(&events).await;
    let wanted: Vec<Uuid> = events
        .iter()
        .filter(|e| e.id != bad.id && e.aggregate_type == "order")
        .map(|e| e.id)
        .collect();
    let received = sink.read_ids(&["order"], &wanted, WAIT).await;
    let (attempts, error) = dead_letter(&db, bad.id).await;
    relay.stop().await;
    let seen: HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
    assert!(
        wanted.iter().all(|id| seen.contains(id)),
        "other events delivered"
    );
    assert!(
        !seen.contains(&bad.id),
        "the poison never reached the broker"
    );
    assert_eq!(attempts, 1, "dead-lettered at the first attempt");
    assert!(error.contains(poison.reason), "reason recorded: {error}");
    finish(db, sink).await;
}

/// An aggregatetype that yields a destination the sink refuses is dead-lettered at once,
/// even when the writer deleted the row in the same transaction (CDC keeps it as a dead
/// letter).
async fn illegal_destination_is_dead_lettered_without_blocking(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let (illegal, why) = sink.illegal_aggregate_type();
    let bad = event(&illegal, "1", 0);
    let good = event("order", "1", 1);
    db.write(&[bad.clone(), good.clone()]).await;
    sink.read_ids(&["order"], &[good.id], WAIT).await;
    let (_, error) = dead_letter(&db, bad.id).await;
    if mode == Mode::Cdc {
        // Insert and delete in one transaction: the dead letter is kept all the same.
        let gone = event(&illegal, "2", 2);
        db.write_and_delete(&gone).await;
        let (_, error) = dead_letter(&db, gone.id).await;
        assert!(error.contains(why), "{error}");
    }
    relay.stop().await;
    assert!(error.contains(why), "{error}");
    finish(db, sink).await;
}

async fn round_trip_publishes_destination_key_value_and_headers(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let order = Event::new(
        "order",
        "42",
        "OrderCreated",
        serde_json::json!({"total": 1299}),
    )
    .with_header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let user = Event::new(
        "user",
        "u-7",
        "UserRegistered",
        serde_json::json!({"email": "a@b.c"}),
    );
    db.write(&[order.clone(), user.clone()]).await;

    let received = sink
        .read_ids(&["order", "user"], &[order.id, user.id], WAIT)
        .await;
    relay.stop().await;

    let got = received
        .iter()
        .find(|r| r.id() == order.id)
        .expect("order event published");
    assert_eq!(got.topic, sink.destination("order"));
    assert_eq!(got.key, "42");
    let value: serde_json::Value = serde_json::from_slice(got.value.as_deref().unwrap()).unwrap();
    assert_eq!(value, serde_json::json!({"total": 1299}));
    assert_eq!(got.headers["type"], "OrderCreated");
    assert_eq!(got.headers["aggregatetype"], "order");
    assert_eq!(got.headers["traceparent"], order.headers["traceparent"]);
    let got = received
        .iter()
        .find(|r| r.id() == user.id)
        .expect("user event published");
    assert_eq!(got.topic, sink.destination("user"));
    assert_eq!(got.key, "u-7");

    if mode == Mode::Polling {
        // Marked, not deleted (on_publish = mark is the default).
        let published: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(published, 2);
    }
    finish(db, sink).await;
}

async fn rolled_back_transaction_publishes_nothing(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let doomed: Vec<Event> = (0..20).map(|n| event("order", "1", n)).collect();
    let mut tx = db.pool.begin().await.unwrap();
    outbox::write_all(&mut *tx, &doomed).await.unwrap();
    tx.rollback().await.unwrap();
    // A marker committed after the rollback: once it arrives, anything of the rolled-back
    // transaction would have arrived before it.
    let marker = event("order", "1", 99);
    db.write(std::slice::from_ref(&marker)).await;

    let received = sink.read_ids(&["order"], &[marker.id], WAIT).await;
    relay.stop().await;
    let doomed_ids: HashSet<Uuid> = doomed.iter().map(|e| e.id).collect();
    assert!(
        received.iter().any(|r| r.id() == marker.id),
        "marker published"
    );
    assert!(
        received.iter().all(|r| !doomed_ids.contains(&r.id())),
        "an event of a rolled-back transaction was published"
    );
    finish(db, sink).await;
}

async fn plain_sql_writers_are_published_the_same_way(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    // What a service in any language does: one INSERT in its own transaction, no library.
    let id = Uuid::new_v4();
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "BEGIN;
         INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers)
         VALUES ('{id}', 'invoice', 'inv-9', 'InvoiceIssued', '{{\"amount\": 5}}', '{{\"tenant\": \"acme\"}}');
         COMMIT;"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let received = sink.read_ids(&["invoice"], &[id], WAIT).await;
    relay.stop().await;
    let got = received
        .iter()
        .find(|r| r.id() == id)
        .expect("plain-SQL event published");
    assert_eq!(got.key, "inv-9");
    assert_eq!(got.headers["type"], "InvoiceIssued");
    assert_eq!(got.headers["tenant"], "acme");
    let value: serde_json::Value = serde_json::from_slice(got.value.as_deref().unwrap()).unwrap();
    assert_eq!(value, serde_json::json!({"amount": 5}));
    finish(db, sink).await;
}

/// DESIGN.md's first pitfall: a transaction that took a lower `seq` but commits after a
/// higher one must still be published (no `seq > last_seen` high-water mark).
async fn late_committing_transaction_is_not_skipped(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let early = event("order", "a", 1);
    let late = event("order", "b", 2);
    let mut slow = db.pool.begin().await.unwrap();
    outbox::write(&mut *slow, &early).await.unwrap(); // takes the lower seq
    db.write(std::slice::from_ref(&late)).await; // higher seq, commits first
    let first = sink.read_ids(&["order"], &[late.id], WAIT).await;
    assert!(
        first.iter().all(|r| r.id() != early.id),
        "uncommitted event published"
    );
    slow.commit().await.unwrap();
    let received = sink.read_ids(&["order"], &[early.id, late.id], WAIT).await;
    relay.stop().await;
    assert!(
        received.iter().any(|r| r.id() == early.id),
        "late commit skipped"
    );
    let rows = db.rows().await;
    assert!(
        rows[0].0 == early.id && rows[0].2 < rows[1].2,
        "early event holds the lower seq"
    );
    finish(db, sink).await;
}

/// 4 concurrent writer tasks over 50 aggregates; writers of one aggregate serialize on
/// it (as a row lock on the business entity would), as DESIGN.md requires.
async fn per_aggregate_order_holds_with_concurrent_writers(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "[polling]\nbatch_size = 137\n").await;
    let mut writers = Vec::new();
    for writer in 0..4u64 {
        let pool = db.pool.clone();
        writers.push(tokio::spawn(async move {
            let mut state = writer * 7919 + 1;
            for n in 0..250usize {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let aggregate = format!("agg-{}", (state >> 33) % 50);
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(&aggregate)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let events: Vec<Event> = (0..1 + n % 3)
                    .map(|k| event("order", &aggregate, n * 10 + k))
                    .collect();
                outbox::write_all(&mut *tx, &events).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = sink.read_ids(&["order"], &ids, WAIT).await;
    relay.stop().await;
    let audit = audit(&rows, &received);
    audit.assert_complete_and_ordered();
    assert!(audit.committed >= 1000);
    finish(db, sink).await;
}
