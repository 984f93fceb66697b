//! What only CDC mode has to get right: LSN confirmation across restarts, large and
//! rolled-back transactions, the slot's position on an idle outbox, updates and deletes
//! of outbox rows, and the role it runs as. Real PostgreSQL (wal_level=logical) and Kafka.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use outbox::Event;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

fn cdc_env() -> [(&'static str, &'static str); 1] {
    [("OUTBOX_MODE", "cdc")]
}

async fn confirmed_flush_lsn(db: &TestDb) -> String {
    sqlx::query_scalar::<_, Option<String>>(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(db.cdc_names().slot)
    .fetch_one(&db.pool)
    .await
    .unwrap()
    .unwrap_or_default()
}

async fn lsn_cmp(db: &TestDb, a: &str, b: &str) -> i64 {
    sqlx::query_scalar("SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn)::int8")
        .bind(a)
        .bind(b)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Two open transactions; the later one commits first and is published; the relay is
/// killed; the earlier one commits; after a restart both are on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_transactions_across_a_restart_are_both_published() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_relay(&db, &log, &cdc_env());
    let first = event("order", "a", 1);
    let second = event("order", "b", 2);
    let mut tx_first = db.pool.begin().await.unwrap();
    outbox::write(&mut *tx_first, &first).await.unwrap();
    let mut tx_second = db.pool.begin().await.unwrap();
    outbox::write(&mut *tx_second, &second).await.unwrap();
    tx_second.commit().await.unwrap();
    consume_ids(vec![db.topic("order")], &[second.id], WAIT).await;
    sigkill(&mut relay);
    tx_first.commit().await.unwrap();
    let mut relay = spawn_relay(&db, &log, &cdc_env());
    let received = consume_ids(vec![db.topic("order")], &[first.id, second.id], WAIT).await;
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    let seen: HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
    assert!(
        seen.contains(&first.id),
        "the transaction that committed after the kill was published"
    );
    db.drop_db().await;
}

/// One transaction of 20,000 rows, all sharing one commit LSN; the relay is killed while
/// it publishes them and restarted: every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_sharing_a_commit_survive_a_restart_in_their_middle() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let env = [
        ("OUTBOX_MODE", "cdc"),
        ("OUTBOX_POLLING__BATCH_SIZE", "200"),
    ];
    let mut relay = spawn_relay(&db, &log, &env);
    let events: Vec<Event> = (0..20_000)
        .map(|n| event("order", &(n % 50).to_string(), n))
        .collect();
    db.write(&events).await;
    // Some but not all of the transaction has reached the topic.
    let some: Vec<Uuid> = events[..1000].iter().map(|e| e.id).collect();
    let partial = consume_ids_or_partial(vec![db.topic("order")], &some, WAIT).await;
    sigkill(&mut relay);
    eprintln!(
        "killed after {} messages of the transaction reached the topic",
        partial.len()
    );
    let before = confirmed_flush_lsn(&db).await;
    let mut relay = spawn_relay(&db, &log, &env);
    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(120)).await;
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    let audit = audit(&rows, &received);
    audit.assert_complete_and_ordered();
    assert!(
        audit.duplicates > 0,
        "the part published before the kill was sent again"
    );
    // The restarted relay confirmed past where the killed one had got to.
    let moved: bool = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn > $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(db.cdc_names().slot)
    .bind(&before)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(moved, "the slot's confirmed position moved past {before}");
    db.drop_db().await;
}

/// A 50,000-event transaction that rolls back publishes nothing; a committed one of the
/// same size is published whole; the relay's peak memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transactions_keep_memory_bounded_and_rollbacks_publish_nothing() {
    const EVENTS: usize = 50_000;
    const RSS_BOUND_MIB: f64 = 96.0;
    let db = TestDb::for_mode(Mode::Cdc).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_relay(&db, &log, &cdc_env());
    let payload = "x".repeat(1000);
    let make = |n: usize| {
        Event::new(
            "order",
            (n % 100).to_string(),
            "Big",
            serde_json::json!({ "n": n, "pad": payload }),
        )
    };

    let doomed: Vec<Event> = (0..EVENTS).map(make).collect();
    let mut tx = db.pool.begin().await.unwrap();
    for chunk in doomed.chunks(5000) {
        outbox::write_all(&mut *tx, chunk).await.unwrap();
    }
    tx.rollback().await.unwrap();
    let kept: Vec<Event> = (0..EVENTS).map(make).collect();
    let mut tx = db.pool.begin().await.unwrap();
    for chunk in kept.chunks(5000) {
        outbox::write_all(&mut *tx, chunk).await.unwrap();
    }
    tx.commit().await.unwrap();
    let marker = event("order", "marker", 0);
    db.write(std::slice::from_ref(&marker)).await;

    let mut ids: Vec<Uuid> = kept.iter().map(|e| e.id).collect();
    ids.push(marker.id);
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(180)).await;
    let peak = peak_rss_mib(relay.id());
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    let doomed_ids: HashSet<Uuid> = doomed.iter().map(|e| e.id).collect();
    let seen: HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
    assert!(
        ids.iter().all(|id| seen.contains(id)),
        "the committed transaction arrived whole"
    );
    assert!(
        seen.is_disjoint(&doomed_ids),
        "an event of the rolled-back transaction was published"
    );
    eprintln!("relay peak RSS with two {EVENTS}-event transactions of 1 KiB events: {peak:.1} MiB");
    assert!(
        peak < RSS_BOUND_MIB,
        "relay peak RSS {peak:.1} MiB exceeds {RSS_BOUND_MIB} MiB"
    );
    db.drop_db().await;
}

/// The outbox is idle while another table of the database is busy: the slot's confirmed
/// position still advances (heartbeats), so WAL does not pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_outbox_next_to_a_busy_table_keeps_the_slot_moving() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let relay =
        InProcessRelay::start(db.relay_config_for(Mode::Cdc, "[cdc]\nheartbeat = \"500ms\"\n"));
    let warmup = event("order", "1", 0);
    db.write(std::slice::from_ref(&warmup)).await;
    consume_ids(vec![db.topic("order")], &[warmup.id], WAIT).await;
    sqlx::query("CREATE TABLE busy (id bigserial PRIMARY KEY, data text)")
        .execute(&db.pool)
        .await
        .unwrap();
    let before = confirmed_flush_lsn(&db).await;
    let start: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for _ in 0..50 {
        sqlx::query("INSERT INTO busy (data) SELECT repeat('y', 500) FROM generate_series(1, 200)")
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = confirmed_flush_lsn(&db).await;
    while lsn_cmp(&db, &after, &start).await <= 0 {
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn stayed at {after} (before the busy writes: {start})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = confirmed_flush_lsn(&db).await;
    }
    relay.stop().await;
    eprintln!(
        "confirmed_flush_lsn moved from {before} past {start} to {after} with an idle outbox"
    );
    db.drop_db().await;
}

/// Writers may insert and delete the row in one transaction (Debezium's pattern): the
/// event is published, the delete ignored. An UPDATE of an outbox row is refused loudly
/// (counted), not published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_then_delete_is_published_and_updates_are_refused() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let transient = event("order", "1", 0);
    db.write_and_delete(&transient).await;
    let kept = event("order", "2", 1);
    db.write(std::slice::from_ref(&kept)).await;
    sqlx::query("UPDATE outbox SET payload = '{\"tampered\": true}' WHERE id = $1")
        .bind(kept.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let marker = event("order", "3", 2);
    db.write(std::slice::from_ref(&marker)).await;
    let received = consume_ids(
        vec![db.topic("order")],
        &[transient.id, kept.id, marker.id],
        WAIT,
    )
    .await;
    let rejected = relay.metrics.rejected_updates.get();
    relay.stop().await;
    let kept_copies: Vec<_> = received.iter().filter(|r| r.id() == kept.id).collect();
    assert_eq!(
        kept_copies.len(),
        1,
        "the update was not published as another message"
    );
    let value: serde_json::Value =
        serde_json::from_slice(kept_copies[0].value.as_deref().unwrap()).unwrap();
    assert!(
        value.get("tampered").is_none(),
        "the original event was published"
    );
    assert!(
        received.iter().any(|r| r.id() == transient.id),
        "inserted-then-deleted event published"
    );
    assert_eq!(rejected, 1, "the update was counted");
    db.drop_db().await;
}

/// The relay runs as a role with REPLICATION and table privileges only (no superuser);
/// the publication and slot were created by the table's owner (`outbox migrate --cdc`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_a_non_superuser_replication_role() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let (role, url) = cdc_relay_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_relay(
        &db,
        &log,
        &[
            ("OUTBOX_MODE", "cdc"),
            ("OUTBOX_DATABASE_URL", url.as_str()),
        ],
    );
    let events: Vec<Event> = (0..100)
        .map(|n| event("order", &(n % 7).to_string(), n))
        .collect();
    db.write(&events).await;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    sigterm(&relay);
    let status = relay.wait().unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    let superuser: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
        .bind(&role)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!superuser);
    let seen: HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
    assert!(
        ids.iter().all(|id| seen.contains(id)),
        "relay log:\n{output}"
    );
    assert!(status.success(), "relay log:\n{output}");
    assert!(
        !output.contains("relay-pw"),
        "the password leaked into the log"
    );
    db.drop_db().await;
    drop_role(&role).await;
}

/// The slot's lag and wal_status are exported as metrics; rows past the retention are
/// purged in CDC mode too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_metrics_and_retention() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let old = event("order", "1", 0);
    db.write(std::slice::from_ref(&old)).await;
    sqlx::query("INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, created_at) VALUES ($1, 'order', '1', 'Old', '{}', now() - interval '2 hours')")
        .bind(Uuid::now_v7())
        .execute(&db.pool)
        .await
        .unwrap();
    let relay =
        InProcessRelay::start(db.relay_config_for(Mode::Cdc, "[delivery]\nretention = \"1h\"\n"));
    consume_ids(vec![db.topic("order")], &[old.id], WAIT).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = relay.metrics.render();
        if text.contains("outbox_cdc_slot_wal_status{status=\"reserved\"} 1") {
            break text;
        }
        assert!(Instant::now() < deadline, "no slot metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status: serde_json::Value = serde_json::from_str(&cli(&db, &["status", "--json"])).unwrap();
    assert_eq!(status["cdc_slot"]["name"], db.cdc_names().slot, "{status}");
    assert_eq!(status["cdc_slot"]["wal_status"], "reserved", "{status}");
    assert_eq!(status["cdc_slot"]["active"], true, "{status}");
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    relay.stop().await;
    assert!(text.contains("outbox_cdc_slot_lag_bytes"), "{text}");
    assert_eq!(
        left,
        vec![old.id],
        "the row past its retention was purged, the fresh one kept"
    );
    db.drop_db().await;
}

/// A CDC relay started without `outbox migrate --cdc` creates the publication and the
/// slot, says so at INFO with the statements that remove them, and once it is gone
/// `outbox status` still lists that slot, and every other outbox slot of the database,
/// with the WAL each keeps and how to drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_creates_its_slot_says_how_to_remove_it_and_status_lists_every_slot() {
    let db = TestDb::new().await;
    let names = db.cdc_names();
    // A slot of another outbox table of this database that no relay reads.
    let other_slot = format!("outbox_{}_billing_events", db.name);
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&other_slot)
        .execute(&db.pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("relay.log");
    let mut relay = KillOnDrop(spawn_relay(&db, &log_path, &cdc_env()));
    let event = event("order", "1", 0);
    db.write(std::slice::from_ref(&event)).await;
    consume_ids(vec![db.topic("order")], &[event.id], WAIT).await;
    sigterm(&relay.0);
    assert!(relay.0.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let created_publication = log
        .lines()
        .find(|line| line.contains("created the publication"))
        .unwrap_or_else(|| panic!("no INFO about the publication:\n{log}"));
    assert!(
        created_publication.contains("INFO")
            && created_publication.contains("DROP PUBLICATION \"outbox_pub\""),
        "{created_publication}"
    );
    let created_slot = log
        .lines()
        .find(|line| line.contains("created the replication slot"))
        .unwrap_or_else(|| panic!("no INFO about the slot:\n{log}"));
    assert!(
        created_slot.contains("INFO")
            && created_slot.contains(&format!("pg_drop_replication_slot('{}')", names.slot)),
        "{created_slot}"
    );

    // WAL written after the slots were made is kept for both.
    sqlx::query("SELECT pg_switch_wal()")
        .execute(&db.pool)
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&cli(&db, &["status", "--json"])).unwrap();
    let slots = status["outbox_slots"].as_array().unwrap();
    let listed: Vec<&str> = slots.iter().map(|s| s["name"].as_str().unwrap()).collect();
    let mut expected = vec![other_slot.as_str(), names.slot.as_str()];
    expected.sort();
    assert_eq!(listed, expected, "{status}");
    for slot in slots {
        assert_eq!(slot["active"], false, "{status}");
        assert_eq!(slot["wal_status"], "reserved", "{status}");
        assert!(slot["retained_wal_bytes"].as_i64().unwrap() > 0, "{status}");
        assert_eq!(
            slot["this_table"],
            slot["name"] == names.slot.as_str(),
            "{status}"
        );
    }
    assert_eq!(status["cdc_slot"]["name"], names.slot, "{status}");
    let text = cli(&db, &["status"]);
    for slot in [&names.slot, &other_slot] {
        assert!(
            text.contains(&format!("SELECT pg_drop_replication_slot('{slot}');")),
            "{text}"
        );
    }
    assert!(
        text.contains(&format!("{} (this table): not streaming", names.slot)),
        "{text}"
    );
    db.drop_db().await;
}
