//! Faults, settings and rows that must not lose, reorder or wedge events: each case
//! here once broke the promise, and its test failed before the fix.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use outbox::TableRef;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

for_each_mode!(
    headers_serde_cannot_read_dead_letter_only_their_row,
    reserved_headers_are_always_the_rows_own,
    a_retried_dead_letter_is_marked_and_counted_by_verify,
    health_recovers_after_a_transient_database_error,
    maintenance_never_blocks_publishing,
    a_dead_letter_holds_back_its_aggregate_in_the_batch_fetched_behind_it,
);

/// jsonb accepts numbers and nesting that serde_json refuses. Such a row is dead-lettered
/// with the reason; the rows after it, of other aggregates and (with `on_dead_letter =
/// "skip"`) of its own, keep flowing.
async fn headers_serde_cannot_read_dead_letter_only_their_row(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let relay =
        InProcessRelay::start(db.relay_config_for(mode, "[delivery]\non_dead_letter = \"skip\"\n"));
    let table = TableRef::default();
    let huge = insert_raw(&db.pool, &table, "a", Some(r#"{"n": 1e400}"#)).await;
    let deep = format!("{{\"d\": {}1{}}}", "[".repeat(200), "]".repeat(200));
    let nested = insert_raw(&db.pool, &table, "b", Some(&deep)).await;
    let mut good = Vec::new();
    for n in 0..20 {
        let aggregate = ["a", "b", "c"][n % 3];
        good.push(insert_raw(&db.pool, &table, aggregate, Some(r#"{"ok": "yes"}"#)).await);
    }
    let received = consume_ids(vec![db.topic("order")], &good, WAIT).await;
    let (_, huge_error) = dead_letter(&db, huge).await;
    let (_, nested_error) = dead_letter(&db, nested).await;
    relay.stop().await;
    assert!(huge_error.contains("headers"), "{huge_error}");
    assert!(nested_error.contains("headers"), "{nested_error}");
    let seen: HashSet<Uuid> = received.iter().map(Received::id).collect();
    assert!(!seen.contains(&huge) && !seen.contains(&nested));
    db.drop_db().await;
}

/// A `headers` entry named `id`, `type` or `aggregatetype` never replaces the relay's
/// own: each message carries exactly one of each, the row's.
async fn reserved_headers_are_always_the_rows_own(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let relay = InProcessRelay::start(db.relay_config_for(mode, ""));
    let impostor = Uuid::now_v7();
    let headers = format!(
        r#"{{"id": "{impostor}", "type": "Forged", "aggregatetype": "user", "traceparent": "00-1-2-01"}}"#
    );
    let id = insert_raw(&db.pool, &TableRef::default(), "7", Some(&headers)).await;
    let received = consume_ids(vec![db.topic("order")], &[id], WAIT).await;
    relay.stop().await;
    let message = received.iter().find(|r| r.id() == id).unwrap();
    for (name, want) in [
        ("id", id.to_string()),
        ("type", "Tested".to_string()),
        ("aggregatetype", "order".to_string()),
    ] {
        let values: Vec<&str> = message
            .header_list
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(values, vec![want.as_str()], "header {name}: {message:?}");
    }
    assert_eq!(message.headers["traceparent"], "00-1-2-01");
    db.drop_db().await;
}

/// Every codec `kafka.compression` accepts is built in and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec_publishes() {
    let db = TestDb::new().await;
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let config = db.relay_config(&format!("[kafka]\ncompression = \"{codec}\"\n"));
        let relay = InProcessRelay::start(config);
        let event = event("order", codec, 0);
        db.write(std::slice::from_ref(&event)).await;
        consume_ids(vec![db.topic("order")], &[event.id], WAIT).await;
        relay.stop().await;
    }
    db.drop_db().await;
}

/// Two outbox tables of the same name in two schemas of one database: each relay
/// streams its own table (each table gets its own publication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schemas_in_one_database_each_publish_in_cdc_mode() {
    let db = TestDb::new().await;
    let other = TableRef::new("billing", "outbox").unwrap();
    migrate_table(&db, &other).await;
    let first = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let second = InProcessRelay::start(db.relay_config_for(
        Mode::Cdc,
        "[table]\nschema = \"billing\"\nname = \"outbox\"\n",
    ));
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(insert_raw(&db.pool, &TableRef::default(), &n.to_string(), None).await);
        ids.push(insert_raw(&db.pool, &other, &n.to_string(), None).await);
    }
    let received = consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    first.stop().await;
    second.stop().await;
    assert!(received.len() >= ids.len());
    db.drop_db().await;
}

/// A publication of the expected name that does not publish the table is refused with
/// the fix, instead of streaming nothing while the slot moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_without_the_table_is_refused() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "CREATE TABLE unrelated (x int); CREATE PUBLICATION outbox_pub FOR TABLE unrelated;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let err = relay
        .stopped_by_itself(WAIT)
        .await
        .expect_err("the relay refuses the publication")
        .to_string();
    assert!(
        err.contains("outbox_pub") && err.contains("does not publish"),
        "{err}"
    );
    db.drop_db().await;
}

/// Table names that need quoting (capitals, spaces) stream in CDC mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_that_need_quoting_stream_in_cdc_mode() {
    let db = TestDb::unmigrated().await;
    for name in ["OutboxEvents", "Out Box"] {
        let table = TableRef::new("public", name).unwrap();
        migrate_table(&db, &table).await;
        let relay = InProcessRelay::start(
            db.relay_config_for(Mode::Cdc, &format!("[table]\nname = {name:?}\n")),
        );
        let ids = vec![
            insert_raw(&db.pool, &table, "1", None).await,
            insert_raw(&db.pool, &table, "2", None).await,
        ];
        consume_ids(vec![db.topic("order")], &ids, WAIT).await;
        relay.stop().await;
    }
    db.drop_db().await;
}

async fn migrate_table(db: &TestDb, table: &TableRef) {
    let mut conn = db.pool.acquire().await.unwrap();
    outbox::migrate(&mut conn, table, outbox::PayloadType::Jsonb)
        .await
        .unwrap();
}

/// Writers that keep committing events (each writer owns its aggregates, so commit order
/// is each aggregate's order) until stopped; returns the ids they committed.
struct Writers {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    committed: Arc<Mutex<Vec<Uuid>>>,
}

impl Writers {
    fn start(db: &TestDb, writers: usize) -> Writers {
        let stop = CancellationToken::new();
        let committed = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..writers)
            .map(|w| {
                let pool = db.pool.clone();
                let stop = stop.clone();
                let committed = committed.clone();
                tokio::spawn(async move {
                    // Bounded: at most 3,000 transactions per writer.
                    for n in 0..3_000 {
                        if stop.is_cancelled() {
                            break;
                        }
                        let events = [
                            event("order", &format!("w{w}-{}", n % 5), n),
                            event("order", &format!("w{w}-{}", (n + 1) % 5), n),
                        ];
                        let mut tx = pool.begin().await.unwrap();
                        outbox::write_all(&mut *tx, &events).await.unwrap();
                        tx.commit().await.unwrap();
                        committed
                            .lock()
                            .unwrap()
                            .extend(events.iter().map(|e| e.id));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Writers {
            stop,
            tasks,
            committed,
        }
    }

    async fn stop(self) -> Vec<Uuid> {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
        let ids = self.committed.lock().unwrap().clone();
        ids
    }
}

/// `outbox migrate` without `--cdc` (no slot), writers already running, then a CDC
/// relay: the rows committed before the relay made its slot are published too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_relay_without_a_slot_publishes_rows_written_before_it() {
    let db = TestDb::new().await;
    let writers = Writers::start(&db, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let committed = writers.stop().await;
    let received = consume_ids(vec![db.topic("order")], &committed, WAIT).await;
    relay.stop().await;
    let rows = db.rows().await;
    assert_eq!(rows.len(), committed.len());
    audit(&rows, &received).assert_complete_and_ordered();
    db.drop_db().await;
}

/// The slot vanishes under a running relay (walsender terminated, slot dropped, as after
/// an operator's mistake or a failover): the relay says so loudly, makes a new slot, and
/// republishes from its last durable position, so nothing committed in between is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_mid_stream_loses_nothing() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let writers = Writers::start(&db, 4);
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop_slot(&db).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let committed = writers.stop().await;
    let received = consume_ids(vec![db.topic("order")], &committed, WAIT).await;
    assert!(
        relay.metrics.slots_recreated.get() >= 1,
        "the vanished slot is counted"
    );
    relay.stop().await;
    let rows = db.rows().await;
    assert_eq!(rows.len(), committed.len());
    audit(&rows, &received).assert_complete_and_ordered();
    db.drop_db().await;
}

/// Where the rows that a vanished slot did not deliver may be gone from the table (older
/// than the retention, so possibly purged), the relay stops with the recovery instead of
/// guessing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_slot_whose_rows_may_be_purged_stops_the_relay() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let first = event("order", "1", 0);
    db.write(std::slice::from_ref(&first)).await;
    consume_ids(vec![db.topic("order")], &[first.id], WAIT).await;
    relay.stop().await;
    // The relay's last durable position is older than the retention.
    let updated =
        sqlx::query("UPDATE outbox_cdc_checkpoint SET updated_at = now() - interval '30 days'")
            .execute(&db.pool)
            .await
            .unwrap()
            .rows_affected();
    assert_eq!(updated, 1, "the relay keeps a checkpoint");
    drop_slot(&db).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let err = relay
        .stopped_by_itself(WAIT)
        .await
        .expect_err("the relay refuses to guess");
    assert!(
        matches!(err, outbox_relay::RelayError::SlotLost(_)),
        "exit 3: {err}"
    );
    assert!(err.to_string().contains("retention"), "{err}");
    db.drop_db().await;
}

/// Terminates the slot's walsender and drops the slot (the relay reconnects within a
/// second, so this is tried until the drop wins).
async fn drop_slot(db: &TestDb) {
    let slot = db.cdc_names().slot;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(&slot)
        .execute(&db.pool)
        .await;
        if sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&db.pool)
            .await
            .is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "could not drop the slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A dead letter that cannot be stored for a reason retrying cannot fix (the role lost
/// its INSERT and UPDATE grants) stops the relay with the fix, instead of retrying every
/// second forever; nothing is confirmed past the event, so it comes back after the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_stored_stops_the_cdc_relay() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let (role, url) = cdc_relay_role(&db).await;
    let mut config = db.relay_config_for(Mode::Cdc, "");
    config.database_url = outbox_relay::DatabaseUrl::new(url);
    let relay = InProcessRelay::start(config);
    let first = event("order", "1", 0);
    db.write(std::slice::from_ref(&first)).await;
    consume_ids(vec![db.topic("order")], &[first.id], WAIT).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "REVOKE INSERT, UPDATE ON outbox FROM {role}"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let poison = event("bad topic", "1", 1);
    db.write(std::slice::from_ref(&poison)).await;
    let err = relay
        .stopped_by_itself(WAIT)
        .await
        .expect_err("the relay stops with an error");
    assert!(
        matches!(err, outbox_relay::RelayError::Config(_)),
        "exit 2: {err}"
    );
    assert!(
        err.to_string().contains("cannot store the dead letter")
            && err.to_string().contains("INSERT and UPDATE"),
        "{err}"
    );
    db.drop_db().await;
    drop_role(&role).await;
}

/// The start-up check covers what CDC mode needs: without INSERT on the outbox table
/// (dead letters of deleted rows) the relay refuses to start, naming the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_relay_without_insert_is_refused_at_start() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let (role, url) = cdc_relay_role(&db).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "REVOKE INSERT ON outbox FROM {role}"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut config = db.relay_config_for(Mode::Cdc, "");
    config.database_url = outbox_relay::DatabaseUrl::new(url);
    let relay = InProcessRelay::start(config);
    let err = relay
        .stopped_by_itself(WAIT)
        .await
        .expect_err("the relay refuses to start")
        .to_string();
    assert!(
        err.contains("lacks INSERT") && err.contains("GRANT INSERT"),
        "{err}"
    );
    db.drop_db().await;
    drop_role(&role).await;
}

/// With `on_dead_letter = "skip"`, `outbox dead-letters retry` publishes the event after
/// later events of its aggregate. That is visible: the message carries
/// `outbox.retried-dead-letter`, and `outbox verify` counts it (and passes: it is the
/// operator's choice, not a lost order).
async fn a_retried_dead_letter_is_marked_and_counted_by_verify(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let relay =
        InProcessRelay::start(db.relay_config_for(mode, "[delivery]\non_dead_letter = \"skip\"\n"));
    let table = TableRef::default();
    let broken = insert_raw(&db.pool, &table, "9", Some(r#"{"n": 1e400}"#)).await;
    let later = insert_raw(&db.pool, &table, "9", None).await;
    consume_ids(vec![db.topic("order")], &[later], WAIT).await;
    dead_letter(&db, broken).await;
    // The operator fixes the row, then queues it again.
    sqlx::query("UPDATE outbox SET headers = '{\"n\": 1}' WHERE id = $1")
        .bind(broken)
        .execute(&db.pool)
        .await
        .unwrap();
    let retried = cli(&db, &["dead-letters", "retry", &broken.to_string()]);
    assert!(retried.contains("queued 1"), "{retried}");
    let received = consume_ids(vec![db.topic("order")], &[broken, later], WAIT).await;
    relay.stop().await;
    let message = received.iter().find(|r| r.id() == broken).unwrap();
    assert_eq!(
        message
            .headers
            .get("outbox.retried-dead-letter")
            .map(String::as_str),
        Some("true"),
        "{message:?}"
    );
    let other = received.iter().find(|r| r.id() == later).unwrap();
    assert!(!other.headers.contains_key("outbox.retried-dead-letter"));

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["verify", "--json", "--mode", mode_name(mode)])
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_TOPICS__TEMPLATE", &db.template)
        .env_remove("OUTBOX_MODE")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(report["retried_dead_letters"], 1, "{report}");
    assert_eq!(
        writer_deletes(&db).await,
        None,
        "a retry's delete is the relay's own"
    );
    assert_eq!(report["passed"], true, "{report}");
    db.drop_db().await;
}

/// A relay with `/healthz` on a free port.
fn with_health(db: &TestDb, mode: Mode, extra_toml: &str) -> (InProcessRelay, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = db.relay_config_for(mode, extra_toml);
    config.http_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    (InProcessRelay::start(config), port)
}

/// Waits until `/healthz` answers 200 (returns its body), at most `timeout`.
async fn wait_healthy(port: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let response = tokio::time::timeout(Duration::from_secs(5), http_get(port, "/healthz"))
            .await
            .unwrap_or_default();
        if response.starts_with("HTTP/1.1 200") {
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz not healthy within {timeout:?}: {response}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Transient errors (the table unreachable for a few seconds, then every connection of
/// the relay terminated, the replication stream among them) must not leave `/healthz`
/// failing: a liveness probe would kill a relay that works. It reports each dependency,
/// fails while one fails, and recovers once they answer again.
async fn health_recovers_after_a_transient_database_error(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let (relay, port) = with_health(&db, mode, "");
    let first = event("order", "1", 0);
    db.write(std::slice::from_ref(&first)).await;
    consume_ids(vec![db.topic("order")], &[first.id], WAIT).await;
    let body = wait_healthy(port, Duration::from_secs(30)).await;
    assert!(
        body.contains("database=ok") && body.contains("kafka=ok"),
        "{body}"
    );
    if mode == Mode::Cdc {
        assert!(body.contains("replication=ok"), "{body}");
    }
    // The relay's queries of the table fail for a while (longer than its probe interval).
    sqlx::raw_sql("ALTER TABLE outbox RENAME TO outbox_away")
        .execute(&db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let during = http_get(port, "/healthz").await;
    sqlx::raw_sql("ALTER TABLE outbox_away RENAME TO outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(during.starts_with("HTTP/1.1 503"), "{during}");
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND application_name LIKE 'outbox-relay%') t",
    )
    .bind(&db.name)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(terminated > 0, "the relay's connections were found");
    let second = event("order", "1", 1);
    db.write(std::slice::from_ref(&second)).await;
    consume_ids(vec![db.topic("order")], &[second.id], WAIT).await;
    let body = wait_healthy(port, Duration::from_secs(30)).await;
    // And it stays healthy.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = http_get(port, "/healthz").await;
    relay.stop().await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert!(body.contains("role=active"), "{body}");
    db.drop_db().await;
}

/// Purging rows past their retention runs beside publishing, in small statements: a role
/// whose `statement_timeout` one big DELETE would exceed still purges everything, and
/// events keep flowing meanwhile.
async fn maintenance_never_blocks_publishing(mode: Mode) {
    let db = TestDb::new().await;
    // 200,000 old rows, published long ago (not pending: no CDC first-start backfill).
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, created_at, published_at)
         SELECT gen_random_uuid(), 'old', (n % 100)::text, 'Old', '{}'::jsonb,
                now() - interval '30 days', now() - interval '30 days'
         FROM generate_series(1, 200000) n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "ALTER DATABASE {} SET statement_timeout = '250ms'",
        db.name
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let relay = InProcessRelay::start(db.relay_config_for(mode, ""));
    let events: Vec<_> = (0..50)
        .map(|n| event("order", &(n % 5).to_string(), n))
        .collect();
    db.write(&events).await;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let old: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregatetype = 'old'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if old == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{old} rows past their retention are still there"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    relay.stop().await;
    assert_eq!(
        writer_deletes(&db).await,
        None,
        "the relay's purge is its own"
    );
    db.drop_db().await;
}

/// When rows were first deleted by someone other than the relay.
async fn writer_deletes(db: &TestDb) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT first_at FROM outbox_writer_deletes")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Every session of the relay asks the server for TCP keepalives and a user timeout, so a
/// relay that died without closing its connection (host crash, partition) loses its
/// session, and with it the leadership lock, within keepalive_idle + interval × count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_sessions_ask_the_server_for_keepalives() {
    let db = TestDb::new().await;
    let config = db.relay_config(
        "[postgres]\nkeepalive_idle = \"7s\"\nkeepalive_interval = \"2s\"\nkeepalive_count = 4\n",
    );
    assert_eq!(config.postgres.dead_peer_timeout(), Duration::from_secs(15));
    let mut conn = outbox_relay::engine::connect(&config).await.unwrap();
    let settings: (String, String, String, String) = sqlx::query_as(
        "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'),
                current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        settings,
        ("7".into(), "2".into(), "4".into(), "15000".into()),
        "the session's keepalive settings"
    );
    drop(conn);
    db.drop_db().await;
}

/// A loopback TCP proxy in front of PostgreSQL that can turn into a black hole: it then
/// drops the connections it forwards and accepts new ones without ever answering, as a
/// host that vanished from the network would.
struct BlackHoleProxy {
    port: u16,
    black_hole: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<bool>,
}

impl BlackHoleProxy {
    async fn start(upstream: std::net::SocketAddr) -> BlackHoleProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let black_hole = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let hole = black_hole.clone();
        tokio::spawn(async move {
            // Bounded: the test makes a handful of connections.
            for _ in 0..500 {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if hole.load(Ordering::SeqCst) {
                    tokio::spawn(async move {
                        // Hold the socket, answer nothing, for at most a minute.
                        let mut sink = [0u8; 1024];
                        let _ = tokio::time::timeout(Duration::from_secs(60), async {
                            use tokio::io::AsyncReadExt;
                            while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                        })
                        .await;
                    });
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        BlackHoleProxy {
            port,
            black_hole,
            cut,
        }
    }

    fn vanish(&self) {
        self.black_hole
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.cut.send(true);
    }
}

/// SIGTERM while the relay tries to reconnect to a database host that does not answer:
/// the connect attempt is bounded and abandoned on shutdown, so the relay stops at once
/// instead of waiting on the network for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_database_does_not_answer_stops_the_relay() {
    let db = TestDb::new().await;
    let upstream: std::net::SocketAddr = {
        let url = url::Url::parse(&db.url).unwrap();
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
            .parse()
            .unwrap()
    };
    let proxy = BlackHoleProxy::start(upstream).await;
    let mut via_proxy = url::Url::parse(&db.url).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_relay(&db, &log, &[("OUTBOX_DATABASE_URL", via_proxy.as_str())]);
    let first = event("order", "1", 0);
    db.write(std::slice::from_ref(&first)).await;
    consume_ids(vec![db.topic("order")], &[first.id], WAIT).await;

    proxy.vanish();
    // The relay notices, and tries to connect again into the black hole.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sigterm(&relay);
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = relay.try_wait().unwrap() {
            break Some(status);
        }
        if stopping.elapsed() > Duration::from_secs(20) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        sigkill(&mut relay);
    }
    let status = status
        .unwrap_or_else(|| panic!("the relay did not stop within 20 s of SIGTERM:\n{log_text}"));
    eprintln!("stopped {:?} after SIGTERM: {status:?}", stopping.elapsed());
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "took {:?}",
        stopping.elapsed()
    );
    db.drop_db().await;
}

/// Writers that insert and delete their rows in one transaction leave nothing in the
/// table to republish a vanished slot's gap from: the relay stops (exit 3) with the
/// recovery instead of streaming on as if nothing was missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_slot_with_deleting_writers_stops_the_relay() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let gone = event("order", "1", 0);
    db.write_and_delete(&gone).await;
    consume_ids(vec![db.topic("order")], &[gone.id], WAIT).await;
    // Let the relay write a checkpoint past it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.stop().await;
    assert!(
        writer_deletes(&db).await.is_some(),
        "the writer's delete is noted"
    );
    drop_slot(&db).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let err = relay
        .stopped_by_itself(WAIT)
        .await
        .expect_err("the relay refuses to guess");
    assert!(
        matches!(err, outbox_relay::RelayError::SlotLost(_)),
        "exit 3: {err}"
    );
    assert!(err.to_string().contains("deleted by writers"), "{err}");
    db.drop_db().await;
}

/// Below a backlog, polling fetches the rows committed while a batch was published
/// before it records that batch, and publishes them beside the record. A dead letter
/// of that batch is not in the table yet when they are fetched: its aggregate's rows
/// among them must still wait. The real binary, its Kafka delivery thread slowed by a
/// fault point (each report held 400 ms, so a batch's transaction takes that long to
/// commit), so the second transaction commits while the first batch is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_holds_back_its_aggregate_in_rows_committed_while_it_was_published() {
    let db = TestDb::new().await;
    let table = TableRef::default();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_relay(
        &db,
        &log,
        &[("FAILPOINTS", "kafka-delivery-report-held=sleep(400)")],
    );
    // The topic exists and the relay is idle before the batch under test.
    let warmup = insert_raw(&db.pool, &table, "w", None).await;
    consume_ids(vec![db.topic("order")], &[warmup], WAIT).await;

    let mut tx = db.pool.begin().await.unwrap();
    let first = insert_raw(&mut *tx, &table, "a", None).await;
    let poison = insert_raw(&mut *tx, &table, "x", Some(r#"{"n": 1e400}"#)).await;
    tx.commit().await.unwrap();
    // The relay wakes on the insert's notification within milliseconds; its batch then
    // takes at least 400 ms to publish.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut tx = db.pool.begin().await.unwrap();
    let held = insert_raw(&mut *tx, &table, "x", None).await;
    let flowing = insert_raw(&mut *tx, &table, "b", None).await;
    tx.commit().await.unwrap();

    consume_ids(vec![db.topic("order")], &[first, flowing], WAIT).await;
    let (_, error) = dead_letter(&db, poison).await;
    assert!(error.contains("headers"), "{error}");
    // The whole topic, a while after the others arrived: the broker, not the log.
    let everything =
        consume_until(vec![db.topic("order")], Duration::from_secs(5), |_| false).await;
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    let published: HashSet<Uuid> = everything.iter().map(Received::id).collect();
    assert!(
        !published.contains(&held),
        "the parked aggregate's later event was published past its dead letter:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let pending: bool = sqlx::query_scalar(
        "SELECT published_at IS NULL AND dead_lettered_at IS NULL FROM outbox WHERE id = $1",
    )
    .bind(held)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(pending, "the held event waits in the table");
    db.drop_db().await;
}

/// Polling fetches the next batch while one is being published (the pipeline). When an
/// event of that batch is dead-lettered, the next batch, already fetched, holds its
/// aggregate's later events: with `on_dead_letter = "park"` (the default) none of them
/// may reach the broker. Batches of 10; the dead letter is the last row of the first
/// batch, and its aggregate's next rows are the first of the second.
async fn a_dead_letter_holds_back_its_aggregate_in_the_batch_fetched_behind_it(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let table = TableRef::default();
    let mut tx = db.pool.begin().await.unwrap();
    let (mut flowing, mut held) = (Vec::new(), Vec::new());
    let mut poison = None;
    for n in 0..40 {
        let (aggregate, headers) = match n {
            9 => ("x", r#"{"n": 1e400}"#),
            10 | 11 | 25 => ("x", r#"{"ok": "yes"}"#),
            _ => (["a", "b", "c"][n % 3], r#"{"ok": "yes"}"#),
        };
        let id = insert_raw(&mut *tx, &table, aggregate, Some(headers)).await;
        match (n, aggregate) {
            (9, _) => poison = Some(id),
            (_, "x") => held.push(id),
            _ => flowing.push(id),
        }
    }
    tx.commit().await.unwrap();
    let relay = InProcessRelay::start(db.relay_config_for(mode, "[polling]\nbatch_size = 10\n"));
    consume_ids(vec![db.topic("order")], &flowing, WAIT).await;
    let (_, error) = dead_letter(&db, poison.unwrap()).await;
    assert!(error.contains("headers"), "{error}");
    // The whole topic, a while after the others arrived: the broker, not the log.
    let everything =
        consume_until(vec![db.topic("order")], Duration::from_secs(5), |_| false).await;
    relay.stop().await;
    let published: HashSet<Uuid> = everything.iter().map(Received::id).collect();
    let overtook: Vec<&Uuid> = held.iter().filter(|id| published.contains(id)).collect();
    assert!(
        overtook.is_empty(),
        "{} of the parked aggregate's later events were published past its dead letter",
        overtook.len()
    );
    let pending: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(String::from(&format!(
        "SELECT count(*) FROM {} WHERE id = ANY($1) AND published_at IS NULL AND dead_lettered_at IS NULL",
        table.qualified()
    ))))
    .bind(&held)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        pending,
        held.len() as i64,
        "the held events wait in the table"
    );
    db.drop_db().await;
}
