//! The library's writer on the real PostgreSQL: other tables, other payload types, and
//! the errors a user meets first.

mod common;

use std::time::Duration;

use common::*;
use outbox::{Event, OutboxWriter, PayloadType, TableRef};

const WAIT: Duration = Duration::from_secs(60);

/// The README's second example: a `bytea` table in another schema, written with an
/// `OutboxWriter` and published by a relay configured with that `[table]`, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_for_a_bytea_table_in_another_schema_is_published_in_both_modes() {
    for mode in [Mode::Polling, Mode::Cdc] {
        let db = TestDb::unmigrated().await;
        let table = TableRef::new("billing", "events").unwrap();
        outbox::migrate(
            &mut db.pool.acquire().await.unwrap(),
            &table,
            PayloadType::Bytea,
        )
        .await
        .unwrap();
        let relay = InProcessRelay::start(
            db.relay_config_for(mode, "[table]\nschema = \"billing\"\nname = \"events\"\n"),
        );
        let writer = OutboxWriter::with_payload_type(table.clone(), PayloadType::Bytea);
        assert_eq!(writer.table(), &table);
        let bytes = vec![0x0a, 0x03, 0x49, 0xff, 0x00];
        let events: Vec<Event> = (0..3)
            .map(|n| {
                Event::new(
                    "invoice",
                    "INV-7",
                    format!("InvoiceIssued{n}"),
                    bytes.clone(),
                )
            })
            .collect();
        let mut tx = db.pool.begin().await.unwrap();
        writer.write(&mut *tx, &events[0]).await.unwrap();
        writer.write_all(&mut *tx, &events[1..]).await.unwrap();
        tx.commit().await.unwrap();
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let received = consume_ids(vec![db.topic("invoice")], &ids, WAIT).await;
        relay.stop().await;
        let got: Vec<_> = received.iter().map(|r| r.id()).collect();
        assert_eq!(got, ids, "{mode:?}: all three, in order");
        for message in &received {
            assert_eq!(message.value.as_deref(), Some(&bytes[..]), "{mode:?}");
        }
        db.drop_db().await;
    }
}

/// A missing table names `outbox migrate` instead of PostgreSQL's bare "relation does
/// not exist", for the default table and for another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_into_a_missing_table_says_to_run_outbox_migrate() {
    let db = TestDb::unmigrated().await;
    let event = Event::json("order", "1", "OrderCreated", &serde_json::json!({})).unwrap();

    let err = outbox::write(&db.pool, &event).await.unwrap_err();
    assert!(matches!(err, outbox::Error::TableMissing { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("public.outbox") && message.contains("outbox migrate"),
        "{message}"
    );

    let other = OutboxWriter::new(TableRef::new("billing", "events").unwrap());
    let message = other.write(&db.pool, &event).await.unwrap_err().to_string();
    assert!(
        message.contains("billing.events") && message.contains("outbox migrate"),
        "{message}"
    );
    db.drop_db().await;
}

/// A writer whose payload type is not the table's says which one the table holds,
/// both ways round, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_of_the_wrong_payload_type_names_the_right_one() {
    let event = Event::json("order", "1", "OrderCreated", &serde_json::json!({"a": 1})).unwrap();

    let bytea = TestDb::with_payload(PayloadType::Bytea).await;
    let err = outbox::write(&bytea.pool, &event).await.unwrap_err();
    assert!(
        matches!(err, outbox::Error::PayloadTypeMismatch { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("does not store jsonb payloads") && message.contains("PayloadType::Bytea"),
        "{message}"
    );
    assert_eq!(bytea.pending().await, 0);
    bytea.drop_db().await;

    let jsonb = TestDb::new().await;
    let writer = OutboxWriter::with_payload_type(TableRef::default(), PayloadType::Bytea);
    let message = writer
        .write(&jsonb.pool, &event)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("does not store bytea payloads") && message.contains("PayloadType::Jsonb"),
        "{message}"
    );
    assert_eq!(jsonb.pending().await, 0);
    jsonb.drop_db().await;
}

/// `outbox::migrate` at every start logs nothing when the table is up to date: none of
/// PostgreSQL's "already exists, skipping" notices reach the application's log.
#[tokio::test]
async fn migrating_an_up_to_date_table_logs_no_notices() {
    let db = TestDb::new().await;
    let (logs, guard) = CapturedLogs::start();
    let applied = outbox::migrate(
        &mut db.pool.acquire().await.unwrap(),
        &TableRef::default(),
        PayloadType::Jsonb,
    )
    .await
    .unwrap();
    drop(guard);
    assert!(applied.is_empty());
    let text = logs.text();
    assert!(!text.contains("already exists"), "{text}");
    db.drop_db().await;
}

/// A statement larger than one TLS record (16 KiB: here twenty 1 KiB events) goes out in
/// more than one write. Without TCP_NODELAY on the client's socket, Nagle's algorithm
/// holds the last write until the server acknowledges the first, and the server delays
/// that acknowledgement by 40 ms, waiting for the rest of the statement: every such
/// transaction took over 40 ms (sqlx 0.9.0 had dropped TCP_NODELAY; 0.9.1 sets it).
/// The relay's own statements (marking 1,000 ids) are as large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_a_tls_record_does_not_wait_for_a_delayed_ack() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let tls: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(
        tls,
        "the test database's connections are meant to use TLS (sslmode=prefer)"
    );
    let pad = "p".repeat(1000);
    let mut took = Vec::new();
    for round in 0..21 {
        let events: Vec<Event> = (0..20)
            .map(|n| {
                Event::new(
                    "order",
                    n.to_string(),
                    "Padded",
                    serde_json::json!({ "round": round, "pad": pad }),
                )
            })
            .collect();
        let started = std::time::Instant::now();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        outbox::write_all(&mut *tx, &events).await.unwrap();
        tx.commit().await.unwrap();
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    // A stall is 40 ms or more; a commit on this machine takes a few.
    assert!(
        median < Duration::from_millis(30),
        "the median transaction of twenty 1 KiB events took {median:?} (all: {took:?})"
    );
    drop(conn);
    db.drop_db().await;
}
