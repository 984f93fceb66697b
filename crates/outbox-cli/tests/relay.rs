//! The relay's guarantees, with an in-process relay on the real PostgreSQL and Kafka.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use outbox::Event;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_publishes_topic_key_value_and_headers() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(""));
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

    let received = consume_ids(
        vec![db.topic("order"), db.topic("user")],
        &[order.id, user.id],
        WAIT,
    )
    .await;
    relay.stop().await;

    let got = received
        .iter()
        .find(|r| r.id() == order.id)
        .expect("order event published");
    assert_eq!(got.topic, db.topic("order"));
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
    assert_eq!(got.topic, db.topic("user"));
    assert_eq!(got.key, "u-7");

    // Marked, not deleted (on_publish = mark is the default).
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(published, 2);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transaction_publishes_nothing() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(""));
    let doomed: Vec<Event> = (0..20).map(|n| event("order", "1", n)).collect();
    let mut tx = db.pool.begin().await.unwrap();
    outbox::write_all(&mut *tx, &doomed).await.unwrap();
    tx.rollback().await.unwrap();
    // A marker committed after the rollback: once it arrives, anything of the rolled-back
    // transaction would have arrived before it.
    let marker = event("order", "1", 99);
    db.write(std::slice::from_ref(&marker)).await;

    let received = consume_ids(vec![db.topic("order")], &[marker.id], WAIT).await;
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
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_writers_are_published_the_same_way() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(""));
    // What a service in any language does: one INSERT in its own transaction, no library.
    let id = Uuid::new_v4();
    sqlx::raw_sql(&format!(
        "BEGIN;
         INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers)
         VALUES ('{id}', 'invoice', 'inv-9', 'InvoiceIssued', '{{\"amount\": 5}}', '{{\"tenant\": \"acme\"}}');
         COMMIT;"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let received = consume_ids(vec![db.topic("invoice")], &[id], WAIT).await;
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
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytea_payloads_are_published_byte_for_byte() {
    let db = TestDb::with_payload(outbox::PayloadType::Bytea).await;
    let relay = InProcessRelay::start(db.relay_config(""));
    let bytes: Vec<u8> = vec![0, 159, 146, 150, 255, 10];
    let writer = outbox::OutboxWriter::with_payload_type(
        outbox::TableRef::default(),
        outbox::PayloadType::Bytea,
    );
    let event = Event::new("blob", "b1", "BlobStored", bytes.clone());
    let mut tx = db.pool.begin().await.unwrap();
    writer.write(&mut *tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    let received = consume_ids(vec![db.topic("blob")], &[event.id], WAIT).await;
    relay.stop().await;
    assert_eq!(received[0].value.as_deref(), Some(&bytes[..]));
    db.drop_db().await;
}

/// DESIGN.md's first pitfall: a transaction that took a lower `seq` but commits after a
/// higher one must still be published (no `seq > last_seen` high-water mark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_committing_transaction_is_not_skipped() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(""));
    let early = event("order", "a", 1);
    let late = event("order", "b", 2);
    let mut slow = db.pool.begin().await.unwrap();
    outbox::write(&mut *slow, &early).await.unwrap(); // takes the lower seq
    db.write(std::slice::from_ref(&late)).await; // higher seq, commits first
    let first = consume_ids(vec![db.topic("order")], &[late.id], WAIT).await;
    assert!(
        first.iter().all(|r| r.id() != early.id),
        "uncommitted event published"
    );
    slow.commit().await.unwrap();
    let received = consume_ids(vec![db.topic("order")], &[early.id, late.id], WAIT).await;
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
    db.drop_db().await;
}

/// 4 concurrent writer tasks over 50 aggregates; writers of one aggregate serialize on
/// it (as a row lock on the business entity would), as DESIGN.md requires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_aggregate_order_holds_with_concurrent_writers() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config("[polling]\nbatch_size = 137\n"));
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
    let received = consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    relay.stop().await;
    let audit = audit(&rows, &received);
    audit.assert_complete_and_ordered();
    assert!(audit.committed >= 1000);
    db.drop_db().await;
}

/// A payload larger than the broker accepts is dead-lettered with its reason at once;
/// other aggregates, and the poison's own later events, keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_is_dead_lettered_and_others_flow() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(""));
    let big = "x".repeat(1_500_000);
    let poison = Event::new(
        "order",
        "poison",
        "Huge",
        serde_json::json!({ "blob": big }),
    );
    let mut events = vec![
        event("order", "poison", 0),
        poison.clone(),
        event("order", "poison", 2),
    ];
    for n in 0..200 {
        events.push(event("order", &format!("ok-{}", n % 20), n));
    }
    db.write(&events).await;
    let wanted: Vec<Uuid> = events
        .iter()
        .filter(|e| e.id != poison.id)
        .map(|e| e.id)
        .collect();
    let received = consume_ids(vec![db.topic("order")], &wanted, WAIT).await;
    db.wait_drained(WAIT).await;
    relay.stop().await;

    let seen: HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
    assert!(
        wanted.iter().all(|id| seen.contains(id)),
        "other events delivered"
    );
    assert!(
        !seen.contains(&poison.id),
        "the poison never reached the topic"
    );
    let (attempts, error): (i32, String) = sqlx::query_as(
        "SELECT attempts, last_error FROM outbox WHERE id = $1 AND dead_lettered_at IS NOT NULL",
    )
    .bind(poison.id)
    .fetch_one(&db.pool)
    .await
    .expect("the poison is a dead letter");
    assert_eq!(attempts, 1, "dead-lettered at the first attempt");
    assert!(
        error.to_lowercase().contains("too large"),
        "reason recorded: {error}"
    );
    db.drop_db().await;
}

/// An aggregatetype that yields an illegal topic name is dead-lettered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn illegal_topic_name_is_dead_lettered_without_blocking() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(""));
    let bad = event("my order!", "1", 0);
    let good = event("order", "1", 1);
    db.write(&[bad.clone(), good.clone()]).await;
    consume_ids(vec![db.topic("order")], &[good.id], WAIT).await;
    db.wait_drained(WAIT).await;
    relay.stop().await;
    let error: String = sqlx::query_scalar(
        "SELECT last_error FROM outbox WHERE id = $1 AND dead_lettered_at IS NOT NULL",
    )
    .bind(bad.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(error.contains("not a legal Kafka topic name"), "{error}");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_publish_delete_removes_rows_after_acknowledgement() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config("[delivery]\non_publish = \"delete\"\n"));
    let events: Vec<Event> = (0..50)
        .map(|n| event("order", &format!("{}", n % 5), n))
        .collect();
    db.write(&events).await;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    relay.stop().await;
    assert_eq!(
        received
            .iter()
            .map(|r| r.id())
            .collect::<HashSet<_>>()
            .len(),
        50
    );
    // Rows go in the same transaction that would mark them; give the last batch a moment.
    let left = if left > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    } else {
        left
    };
    assert_eq!(left, 0, "published rows deleted");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_all_keeps_order_within_a_transaction() {
    let db = TestDb::new().await;
    let events: Vec<Event> = (0..500).map(|n| event("order", "same", n)).collect();
    db.write(&events).await;
    let rows = db.rows().await;
    let stored: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let written: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(stored, written, "seq follows the order of write_all");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_refuses_a_newer_schema() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let applied = outbox::migrate(
        &mut conn,
        &outbox::TableRef::default(),
        outbox::PayloadType::Jsonb,
    )
    .await
    .unwrap();
    assert!(applied.is_empty(), "second run applies nothing");
    sqlx::query("INSERT INTO outbox_migrations (version) VALUES (999)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let err = outbox::migrate(
        &mut conn,
        &outbox::TableRef::default(),
        outbox::PayloadType::Jsonb,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("newer outbox"), "{err}");
    drop(conn);
    db.drop_db().await;
}

/// Retention: published rows older than `delivery.retention` are purged by the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_past_retention_are_purged() {
    let db = TestDb::new().await;
    let old = event("order", "1", 0);
    db.write(std::slice::from_ref(&old)).await;
    sqlx::query("UPDATE outbox SET published_at = now() - interval '2 hours'")
        .execute(&db.pool)
        .await
        .unwrap();
    let fresh = event("order", "1", 1);
    db.write(std::slice::from_ref(&fresh)).await;
    let relay = InProcessRelay::start(db.relay_config("[delivery]\nretention = \"1h\"\n"));
    consume_ids(vec![db.topic("order")], &[fresh.id], WAIT).await;
    relay.stop().await;
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        ids,
        vec![fresh.id],
        "the old published row was purged, the fresh one kept"
    );
    db.drop_db().await;
}
