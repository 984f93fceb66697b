//! The relay's guarantees, with an in-process relay on the real PostgreSQL and Kafka.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use outbox::Event;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

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
    // The purge runs beside publishing, on a connection of its own: wait for it (it
    // starts as the relay takes the lead), boundedly.
    let deadline = std::time::Instant::now() + WAIT;
    let ids = loop {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        if ids.len() == 1 || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    relay.stop().await;
    assert_eq!(
        ids,
        vec![fresh.id],
        "the old published row was purged, the fresh one kept"
    );
    db.drop_db().await;
}

/// One aggregate whose events cannot be sent (its topic does not exist and
/// `topics.create = false`) holds back only itself: the other aggregates flow, its
/// events wait in order (past `max_attempts`, never dead-lettered, as for an outage),
/// and reach their topic once it exists. (Retriable failures that do dead-letter after
/// `max_attempts` are `plan_batch`'s unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_aggregate_never_stops_the_others() {
    let db = TestDb::new().await;
    create_topic(&db.topic("order")).await;
    let relay = InProcessRelay::start(db.relay_config(
        "[delivery]\nmax_attempts = 3\ninitial_backoff = \"100ms\"\nmax_backoff = \"200ms\"\n\
         [topics]\ncreate = false\n",
    ));
    let stuck = [event("missing", "m", 0), event("missing", "m", 1)];
    let flowing: Vec<Event> = (0..50)
        .map(|n| event("order", &format!("{}", n % 5), n))
        .collect();
    db.write(&stuck).await;
    db.write(&flowing).await;
    let ids: Vec<Uuid> = flowing.iter().map(|e| e.id).collect();
    consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (pending, dead): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE dead_lettered_at IS NULL AND published_at IS NULL),
                count(*) FILTER (WHERE dead_lettered_at IS NOT NULL)
         FROM outbox WHERE aggregatetype = 'missing'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (pending, dead),
        (2, 0),
        "the held-back aggregate waits, never dead-lettered"
    );
    create_topic(&db.topic("missing")).await;
    let stuck_ids: Vec<Uuid> = stuck.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("missing")], &stuck_ids, WAIT).await;
    assert_eq!(
        received.iter().map(Received::id).collect::<Vec<_>>(),
        stuck_ids
    );
    db.wait_drained(Duration::from_secs(60)).await;
    relay.stop().await;
    db.drop_db().await;
}

/// `/metrics` and `/healthz` of a running relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints_report_the_relay() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = db.relay_config("");
    config.http_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let relay = InProcessRelay::start(config);
    let events: Vec<Event> = (0..25).map(|n| event("order", "1", n)).collect();
    db.write(&events).await;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    db.wait_drained(WAIT).await;
    let metrics = http_get(port, "/metrics").await;
    let health = http_get(port, "/healthz").await;
    relay.stop().await;
    assert!(
        metrics.contains("outbox_events_published_total 25"),
        "{metrics}"
    );
    assert!(metrics.contains("outbox_relay_active 1"), "{metrics}");
    assert!(
        metrics.contains("outbox_batch_duration_seconds_count"),
        "{metrics}"
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("ok role=active"), "{health}");
    db.drop_db().await;
}

/// A topic deleted while the relay runs is created again, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_topic_is_recreated() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(
        "[delivery]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n[kafka]\nmessage_timeout = \"5s\"\n[kafka.properties]\n\"topic.metadata.propagation.max.ms\" = \"2000\"\n",
    ));
    let first = event("order", "1", 0);
    db.write(std::slice::from_ref(&first)).await;
    consume_ids(vec![db.topic("order")], &[first.id], WAIT).await;
    db.wait_drained(WAIT).await;

    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    admin
        .delete_topics(&[&db.topic("order")], &AdminOptions::new())
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    // Deletion completes asynchronously in the broker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later: Vec<Event> = (1..20).map(|n| event("order", "1", n)).collect();
    db.write(&later).await;
    let ids: Vec<Uuid> = later.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(90)).await;
    db.wait_drained(WAIT).await;
    relay.stop().await;
    let seen: HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
    assert!(
        ids.iter().all(|id| seen.contains(id)),
        "events after the deletion were published"
    );
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(dead, 0);
    db.drop_db().await;
}

/// `outbox status` and `outbox dead-letters list` only read: a monitoring role with
/// nothing but SELECT (on the table and its migrations table) runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_dead_letter_list_need_only_select() {
    let db = TestDb::new().await;
    db.write(&[event("order", "1", 0)]).await;
    let (role, url) = role_with_grants(
        &db,
        "LOGIN",
        "GRANT SELECT ON outbox, outbox_migrations TO {role};",
    )
    .await;
    let status = run_cli(&["status", "--json"], &[("OUTBOX_DATABASE_URL", &url)]);
    assert_eq!(status.code, Some(0), "{}", status.output());
    let value: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(value["pending"], 1, "{value}");
    let list = run_cli(&["dead-letters", "list"], &[("OUTBOX_DATABASE_URL", &url)]);
    assert_eq!(list.code, Some(0), "{}", list.output());
    // Writing still needs the relay's privileges, and says which.
    let retry = run_cli(
        &["dead-letters", "retry", "--all"],
        &[("OUTBOX_DATABASE_URL", &url)],
    );
    assert_eq!(retry.code, Some(2), "{}", retry.output());
    assert!(retry.stderr.contains("GRANT UPDATE"), "{}", retry.output());
    db.drop_db().await;
    drop_role(&role).await;
}

/// Sequential scans of the outbox table counted by PostgreSQL, read after this session's
/// statistics are flushed.
async fn outbox_seq_scans(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'outbox'::regclass")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

/// A batch's fetch and its marking must find their rows through an index: with a
/// thousand ids, `id = ANY($1)` was planned as a scan of the whole table (the planner
/// prices a thousand index probes above reading a table of small rows), so each batch
/// read every row ever written, and a polling relay at 5,000 events/s spent 300–500 ms
/// marking each batch and fell further behind with every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_statements_never_scan_the_whole_table() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
         SELECT gen_random_uuid(), 'order', (n % 500)::text, 'OrderCreated',
                jsonb_build_object('n', n)
         FROM generate_series(1, 40000) AS n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let store = outbox_postgres::PollingStore::open(&mut conn, outbox_core::TableRef::default())
        .await
        .unwrap();
    for on_publish in [
        outbox_postgres::OnPublish::Mark,
        outbox_postgres::OnPublish::Delete,
    ] {
        let before = outbox_seq_scans(&mut conn).await;
        let events = store
            .fetch(
                &mut conn,
                outbox_postgres::Fetch::Pending,
                outbox_core::DeadLetterPolicy::Park,
                1000,
                u64::MAX,
            )
            .await
            .unwrap();
        assert_eq!(events.len(), 1000);
        let fetched = outbox_seq_scans(&mut conn).await;
        assert_eq!(fetched, before, "fetching a batch scanned the whole table");
        let actions: Vec<outbox_core::Action> = events
            .iter()
            .map(|e| outbox_core::Action::Published { id: e.id })
            .collect();
        let done = store.apply(&mut conn, &actions, on_publish).await.unwrap();
        assert_eq!(done, 1000);
        let marked = outbox_seq_scans(&mut conn).await;
        assert_eq!(
            marked, fetched,
            "recording a batch ({on_publish:?}) scanned the whole table"
        );
    }
    drop(conn);
    db.drop_db().await;
}

/// A backlog of large events is fetched a bounded number of bytes at a time
/// (`polling.max_batch_bytes`, 8 MiB by default), not `polling.batch_size` rows at once:
/// 150 events of 900 KiB (132 MiB) waiting when the relay starts must not all be in its
/// memory together. (Before the bound: 394 MiB. With it, this debug build peaks near
/// 60 MiB: the batch, its messages and the producer's copy, beside the binary's own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_keep_polling_memory_bounded() {
    const EVENTS: usize = 150;
    const RSS_BOUND_MIB: f64 = 96.0;
    let db = TestDb::new().await;
    let ids = write_large_events(&db, EVENTS).await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = spawn_relay(&db, &dir.path().join("relay.log"), &[]);
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(180)).await;
    let peak = peak_rss_mib(relay.id());
    sigterm(&relay);
    let _ = relay.wait();
    eprintln!("relay peak RSS draining {EVENTS} events of 900 KiB: {peak:.1} MiB");
    assert_eq!(
        received
            .iter()
            .map(Received::id)
            .collect::<HashSet<_>>()
            .len(),
        EVENTS
    );
    assert!(
        peak < RSS_BOUND_MIB,
        "relay peak RSS {peak:.1} MiB exceeds {RSS_BOUND_MIB} MiB while draining {EVENTS} events of 900 KiB"
    );
    db.drop_db().await;
}

/// The last statement of the relay's notification listener, as PostgreSQL shows it:
/// `LISTEN …` while it is subscribed, `UNLISTEN …` while not.
async fn listener_statement(db: &TestDb) -> Option<String> {
    sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'outbox-relay'
           AND query ~ '^(UN)?LISTEN '",
    )
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// Waits until the listener's last statement starts with `prefix`, at most `timeout`.
async fn wait_for_listener(db: &TestDb, prefix: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let statement = listener_statement(db).await;
        if statement.as_deref().is_some_and(|s| s.starts_with(prefix)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the listener's last statement was {statement:?}, not {prefix}… within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every insert notification wakes PostgreSQL's listening backend: at 1,000 commits a
/// second that cost the database as much CPU as the relay's fetches and records
/// together. So a relay kept busy by its stream stops listening and fetches after each
/// batch; once the stream is quiet it listens again, and an event written then is
/// published at once, not a `polling.interval` (here a minute) later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_stream_is_fetched_without_notifications_and_a_quiet_one_wakes_the_relay() {
    const WRITERS: usize = 8;
    const COMMITS_EACH: usize = 300;
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config("[polling]\ninterval = \"60s\"\n"));
    wait_for_listener(&db, "LISTEN", WAIT).await;

    // Busy: one event per transaction from several connections, as fast as they go.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                for n in 0..COMMITS_EACH {
                    let event = event("order", &format!("{w}-{}", n % 10), n);
                    let mut tx = pool.begin().await.unwrap();
                    outbox::write(&mut *tx, &event).await.unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    let mut unlistened = false;
    while !writers.iter().all(|w| w.is_finished()) {
        unlistened |= listener_statement(&db)
            .await
            .is_some_and(|s| s.starts_with("UNLISTEN"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    audit(&rows, &received).assert_complete_and_ordered();
    assert!(
        unlistened,
        "the relay kept listening through {} commits",
        WRITERS * COMMITS_EACH
    );

    // Quiet again: the relay listens, and the next event wakes it.
    wait_for_listener(&db, "LISTEN", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = event("order", "late", 0);
    let written = std::time::Instant::now();
    db.write(std::slice::from_ref(&late)).await;
    consume_ids(vec![db.topic("order")], &[late.id], Duration::from_secs(30)).await;
    let waited = written.elapsed();
    relay.stop().await;
    assert!(
        waited < Duration::from_secs(5),
        "an event written once the stream was quiet took {waited:?} (polling.interval 60s)"
    );
    db.drop_db().await;
}
