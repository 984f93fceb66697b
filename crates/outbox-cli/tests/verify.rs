//! `outbox verify`: the audit of the broker against the database, run as the real
//! binary against the real PostgreSQL and Kafka. Each case makes the audit see one thing
//! (a clean run, a lost event, a wrong topic, a duplicate, an order violation, a young
//! CDC row) and checks the report and the exit code.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
/// The exit code of an audit that found lost or out-of-order events.
const AUDIT_FAILED: i32 = 4;

/// What `outbox verify` printed and how it exited.
struct Verified {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Verified {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| {
            panic!("not JSON ({err}): {}\nstderr: {}", self.stdout, self.stderr)
        })
    }

    fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `outbox verify ARGS...` with the relay's configuration for `db` (its database,
/// the brokers, its topic template) in the environment; `env` adds or overrides.
async fn verify(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Verified {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .arg("verify")
        .args(args)
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_TOPICS__TEMPLATE", &db.template)
        .env_remove("OUTBOX_MODE")
        .env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("outbox verify ends within a minute")
        .unwrap();
    Verified {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Events of several aggregates of two types (two topics), interleaved.
fn events(n: usize) -> Vec<outbox::Event> {
    (0..n)
        .map(|i| {
            let kind = if i % 3 == 0 { "user" } else { "order" };
            event(kind, &format!("agg-{}", i % 5), i)
        })
        .collect()
}

/// Runs an in-process relay for `mode` until every event of `written` is on its topic
/// (and, polling, marked), then stops it.
async fn relay_until_published(db: &TestDb, mode: Mode, written: &[outbox::Event]) {
    let relay = InProcessRelay::start(db.relay_config_for(mode, ""));
    let ids: Vec<Uuid> = written.iter().map(|e| e.id).collect();
    let mut topics: Vec<String> = written
        .iter()
        .map(|e| db.topic(&e.aggregate_type))
        .collect();
    topics.sort();
    topics.dedup();
    let received = consume_ids(topics, &ids, WAIT).await;
    assert!(
        ids.iter().all(|id| received.iter().any(|m| m.id() == *id)),
        "the relay published every event"
    );
    if mode == Mode::Polling {
        db.wait_drained(WAIT).await;
    }
    relay.stop().await;
}

fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {report:#}"))
}

for_each_mode!(clean_run_passes);

/// Everything the relay published is found, once, in order: exit 0.
async fn clean_run_passes(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let written = events(60);
    for chunk in written.chunks(7) {
        db.write(chunk).await;
    }
    relay_until_published(&db, mode, &written).await;

    let verified = verify(&db, &["--json", "--mode", mode_name(mode)], &[]).await;
    verified.expect_code(0);
    let report = verified.json();
    assert_eq!(report["mode"], mode_name(mode));
    assert_eq!(count(&report, "committed"), 60);
    assert_eq!(count(&report, "published"), 60);
    assert_eq!(count(&report, "lost"), 0);
    assert_eq!(count(&report, "pending"), 0);
    assert_eq!(count(&report, "dead_lettered"), 0);
    assert_eq!(count(&report, "order_violations"), 0);
    assert_eq!(report["passed"], true);
    let topics = report["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 2, "{report:#}");
    assert!(topics.iter().all(|t| t["exists"] == true));
    db.drop_db().await;
}

/// A row marked published that never reached its topic (the seed's disaster: marked
/// before the acknowledgement) is lost, named, and fails the audit with exit code 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_marked_published_but_absent_is_lost() {
    let db = TestDb::new().await;
    let published = events(6);
    db.write(&published).await;
    relay_until_published(&db, Mode::Polling, &published).await;

    // The relay is stopped: mark one more row published without publishing it.
    let never_sent = event("order", "agg-1", 99);
    db.write(std::slice::from_ref(&never_sent)).await;
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = $1")
        .bind(never_sent.id)
        .execute(&db.pool)
        .await
        .unwrap();

    let verified = verify(&db, &["--json"], &[]).await;
    verified.expect_code(AUDIT_FAILED);
    let report = verified.json();
    assert_eq!(count(&report, "committed"), 7);
    assert_eq!(count(&report, "published"), 6);
    assert_eq!(count(&report, "lost"), 1);
    assert_eq!(report["passed"], false);
    let lost = &report["lost_events"][0];
    assert_eq!(lost["id"], never_sent.id.to_string());
    assert_eq!(lost["reason"], "marked_published");
    assert_eq!(lost["topic"], db.topic("order"));
    assert_eq!(lost["aggregateid"], "agg-1");
    db.drop_db().await;
}

/// The audit looks where its configuration routes: verifying with another topic
/// template than the relay used finds nothing, so every published row is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_published_to_a_topic_the_audit_does_not_read_are_lost() {
    let db = TestDb::new().await;
    let written = events(9);
    db.write(&written).await;
    relay_until_published(&db, Mode::Polling, &written).await;

    let elsewhere = format!(
        "x{}.{{aggregatetype}}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let verified = verify(
        &db,
        &["--json"],
        &[("OUTBOX_TOPICS__TEMPLATE", elsewhere.as_str())],
    )
    .await;
    verified.expect_code(AUDIT_FAILED);
    let report = verified.json();
    assert_eq!(count(&report, "committed"), 9);
    assert_eq!(count(&report, "published"), 0);
    assert_eq!(count(&report, "lost"), 9);
    let topics = report["topics"].as_array().unwrap();
    assert!(
        topics
            .iter()
            .all(|t| t["exists"] == false
                && t["topic"].as_str().unwrap().starts_with(&elsewhere[..13])),
        "missing topics are reported, not an error: {report:#}"
    );

    // The same rows, audited where the relay published them, pass.
    verify(&db, &["--json"], &[]).await.expect_code(0);
    db.drop_db().await;
}

/// A message produced twice is a duplicate: reported, and the audit still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_reported_and_pass() {
    let db = TestDb::new().await;
    let written = events(5);
    db.write(&written).await;
    relay_until_published(&db, Mode::Polling, &written).await;

    let twice = &written[1];
    let topic = db.topic(&twice.aggregate_type);
    let original = consume_ids(vec![topic.clone()], &[twice.id], WAIT)
        .await
        .into_iter()
        .find(|m| m.id() == twice.id)
        .expect("the original message");
    // The same message again, where a redelivery lands: same partition, key and headers.
    let mut headers = OwnedHeaders::new();
    for (key, value) in &original.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut record = FutureRecord::to(&topic)
        .partition(original.partition)
        .key(&original.key)
        .headers(headers);
    if let Some(value) = &original.value {
        record = record.payload(value);
    }
    producer()
        .send(record, Duration::from_secs(30))
        .await
        .expect("produced");

    let verified = verify(&db, &["--json"], &[]).await;
    verified.expect_code(0);
    let report = verified.json();
    assert_eq!(count(&report, "published"), 5);
    assert_eq!(count(&report, "duplicated_ids"), 1);
    assert_eq!(count(&report, "duplicate_copies"), 1);
    assert_eq!(report["duplicate_examples"][0]["id"], twice.id.to_string());
    assert_eq!(report["duplicate_examples"][0]["copies"], 2);
    assert_eq!(count(&report, "lost"), 0);
    assert_eq!(count(&report, "order_violations"), 0);
    assert_eq!(report["passed"], true);
    db.drop_db().await;
}

/// One aggregate's events on the broker in the reverse of their table order: each event
/// that came before an earlier one is a violation, shown with examples; exit code 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_aggregate_out_of_order_fail_the_audit() {
    let db = TestDb::new().await;
    // The relay publishes one event, which creates the topic, and stops.
    let first = event("order", "other", 0);
    db.write(std::slice::from_ref(&first)).await;
    relay_until_published(&db, Mode::Polling, std::slice::from_ref(&first)).await;

    // Three events of aggregate "7", marked published, produced by hand newest first.
    let written: Vec<_> = (1..=3).map(|n| event("order", "7", n)).collect();
    db.write(&written).await;
    sqlx::query("UPDATE outbox SET published_at = now() WHERE aggregateid = '7'")
        .execute(&db.pool)
        .await
        .unwrap();
    let topic = db.topic("order");
    let producer = producer();
    for event in written.iter().rev() {
        let id = event.id.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(&id),
            })
            .insert(Header {
                key: "type",
                value: Some(&event.event_type),
            })
            .insert(Header {
                key: "aggregatetype",
                value: Some(&event.aggregate_type),
            });
        let payload = event.payload.to_bytes();
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("7")
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .expect("produced");
    }

    let verified = verify(&db, &["--json"], &[]).await;
    verified.expect_code(AUDIT_FAILED);
    let report = verified.json();
    assert_eq!(count(&report, "committed"), 4);
    assert_eq!(count(&report, "published"), 4);
    assert_eq!(count(&report, "lost"), 0);
    // Broker order 3, 2, 1: events 2 and 3 each came before event 1.
    assert_eq!(count(&report, "order_violations"), 2);
    let example = &report["order_violation_examples"][0];
    assert_eq!(example["aggregateid"], "7");
    assert_eq!(example["id"], written[1].id.to_string());
    assert_eq!(example["overtaken_id"], written[0].id.to_string());
    assert!(
        example["position"]["offset"].as_i64() < example["overtaken_position"]["offset"].as_i64()
    );
    assert_eq!(report["passed"], false);
    db.drop_db().await;
}

/// CDC mode marks nothing: an unseen row is pending while it is younger than the grace
/// period, and lost once older (here with `--grace 0s`). Dead letters are apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn young_unpublished_row_is_pending_until_the_grace_runs_out() {
    let db = TestDb::new().await;
    let waiting = event("order", "1", 0);
    let dead = event("order", "2", 0);
    db.write(&[waiting.clone(), dead.clone()]).await;
    sqlx::query("UPDATE outbox SET dead_lettered_at = now(), last_error = 'test' WHERE id = $1")
        .bind(dead.id)
        .execute(&db.pool)
        .await
        .unwrap();

    let verified = verify(&db, &["--json", "--mode", "cdc"], &[]).await;
    verified.expect_code(0);
    let report = verified.json();
    assert_eq!(count(&report, "committed"), 2);
    assert_eq!(count(&report, "pending"), 1);
    assert_eq!(count(&report, "dead_lettered"), 1);
    assert_eq!(count(&report, "lost"), 0);
    assert_eq!(report["grace_seconds"], 30.0);
    assert_eq!(report["topics"][0]["exists"], false, "{report:#}");

    let verified = verify(&db, &["--json", "--mode", "cdc", "--grace", "0s"], &[]).await;
    verified.expect_code(AUDIT_FAILED);
    let report = verified.json();
    assert_eq!(count(&report, "pending"), 0);
    assert_eq!(count(&report, "lost"), 1);
    assert_eq!(count(&report, "dead_lettered"), 1);
    assert_eq!(report["lost_events"][0]["id"], waiting.id.to_string());
    assert_eq!(report["lost_events"][0]["reason"], "older_than_grace");

    // Polling mode: the relay has yet to publish an unmarked row, whatever its age.
    let verified = verify(&db, &["--json", "--grace", "0s"], &[]).await;
    verified.expect_code(0);
    assert_eq!(count(&verified.json(), "pending"), 1);
    db.drop_db().await;
}

/// CDC: an event its aggregate's dead letter parks waits in the table; the audit counts it
/// pending however old (with `--grace 0s`), not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_is_pending_not_lost_in_cdc_mode() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let relay = InProcessRelay::start(db.relay_config_for(Mode::Cdc, ""));
    let poison = outbox::Event::new(
        "order",
        "p",
        "Tested",
        serde_json::json!({ "blob": "x".repeat(1_500_000) }),
    );
    let parked = event("order", "p", 1);
    let other = event("order", "q", 0);
    db.write(&[poison.clone(), parked.clone(), other.clone()])
        .await;
    consume_ids(vec![db.topic("order")], &[other.id], WAIT).await;
    dead_letter(&db, poison.id).await;
    let deadline = std::time::Instant::now() + WAIT;
    while sqlx::query_scalar::<_, bool>("SELECT next_attempt_at IS NULL FROM outbox WHERE id = $1")
        .bind(parked.id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the parked event never waited in the table"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;

    let verified = verify(&db, &["--json", "--mode", "cdc", "--grace", "0s"], &[]).await;
    verified.expect_code(0);
    let report = verified.json();
    assert_eq!(count(&report, "committed"), 3, "{report:#}");
    assert_eq!(count(&report, "published"), 1);
    assert_eq!(count(&report, "dead_lettered"), 1);
    assert_eq!(count(&report, "pending"), 1);
    assert_eq!(count(&report, "lost"), 0);
    db.drop_db().await;
}

/// Without --json: a summary line with every count and a verdict line; a lost event is
/// named with its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_output_has_the_summary_and_the_verdict() {
    let db = TestDb::new().await;
    let written = events(4);
    db.write(&written).await;
    relay_until_published(&db, Mode::Polling, &written).await;

    let verified = verify(&db, &[], &[]).await;
    verified.expect_code(0);
    let text = &verified.stdout;
    assert!(
        text.contains("committed=4 published=4 lost=0 pending=0 dead_lettered=0 duplicated_ids=0 duplicate_copies=0 order_violations=0"),
        "{text}"
    );
    assert!(text.contains("PASSED"), "{text}");
    assert!(text.contains(&db.topic("order")), "{text}");

    let never_sent = event("user", "9", 0);
    db.write(std::slice::from_ref(&never_sent)).await;
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = $1")
        .bind(never_sent.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let verified = verify(&db, &[], &[]).await;
    verified.expect_code(AUDIT_FAILED);
    let text = &verified.stdout;
    assert!(text.contains("committed=5 published=4 lost=1"), "{text}");
    assert!(text.contains(&format!("lost: {}", never_sent.id)), "{text}");
    assert!(text.contains("FAILED: 1 lost, 0 out of order"), "{text}");
    db.drop_db().await;
}

/// `--since` and `--from`/`--to` select rows by `created_at`: an old lost row fails a
/// full audit, not one of the last hour, and fails again when its time is selected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_selects_rows_by_creation_time() {
    let db = TestDb::new().await;
    let recent = events(3);
    db.write(&recent).await;
    relay_until_published(&db, Mode::Polling, &recent).await;
    let old = event("order", "old", 0);
    db.write(std::slice::from_ref(&old)).await;
    sqlx::query(
        "UPDATE outbox SET created_at = '2020-01-01T12:00:00Z', published_at = now() WHERE id = $1",
    )
    .bind(old.id)
    .execute(&db.pool)
    .await
    .unwrap();

    let all = verify(&db, &["--json"], &[]).await;
    all.expect_code(AUDIT_FAILED);
    assert_eq!(count(&all.json(), "committed"), 4);

    let last_hour = verify(&db, &["--json", "--since", "1h"], &[]).await;
    last_hour.expect_code(0);
    let report = last_hour.json();
    assert_eq!(count(&report, "committed"), 3);
    assert!(report["window"]["from"].is_string(), "{report:#}");

    let then = verify(
        &db,
        &[
            "--json",
            "--from",
            "2020-01-01T00:00:00Z",
            "--to",
            "2020-01-02T00:00:00+01:00",
        ],
        &[],
    )
    .await;
    then.expect_code(AUDIT_FAILED);
    let report = then.json();
    assert_eq!(count(&report, "committed"), 1);
    assert_eq!(report["lost_events"][0]["id"], old.id.to_string());

    // A malformed time is a usage error (exit 2) that says how to write it.
    let bad = verify(&db, &["--from", "yesterday"], &[]).await;
    bad.expect_code(2);
    assert!(bad.stderr.contains("RFC 3339"), "{}", bad.stderr);
    let backwards = verify(
        &db,
        &[
            "--from",
            "2020-01-02T00:00:00Z",
            "--to",
            "2020-01-01T00:00:00Z",
        ],
        &[],
    )
    .await;
    backwards.expect_code(2);
    assert!(
        backwards.stderr.contains("is not before --to"),
        "{}",
        backwards.stderr
    );
    db.drop_db().await;
}

/// The audit only reads: a role with SELECT on the table (and its migrations table)
/// and nothing else can run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_only_role_can_audit() {
    let db = TestDb::new().await;
    let written = events(3);
    db.write(&written).await;
    relay_until_published(&db, Mode::Polling, &written).await;
    let role = format!("auditor_{}", &db.name[12..]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'audit-pw';
         GRANT SELECT ON outbox, outbox_migrations TO {role};"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some("audit-pw")).unwrap();

    let verified = verify(&db, &["--json"], &[("OUTBOX_DATABASE_URL", url.as_str())]).await;
    verified.expect_code(0);
    assert_eq!(count(&verified.json(), "published"), 3);
    assert!(!verified.stderr.contains("audit-pw"));

    // Without SELECT it is a configuration error that names the grant.
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "REVOKE SELECT ON outbox FROM {role}"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let refused = verify(&db, &["--json"], &[("OUTBOX_DATABASE_URL", url.as_str())]).await;
    refused.expect_code(2);
    assert!(
        refused.stderr.contains("GRANT SELECT"),
        "{}",
        refused.stderr
    );
    db.drop_db().await;
    drop_role(&role).await;
}

/// The audit reads each partition up to its end as of the start, so it ends while the
/// relay keeps publishing; rows the relay has not marked yet are pending, not lost, and
/// every marked row is found (the rows are read before the topics' ends are taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_ends_and_passes_while_the_relay_keeps_publishing() {
    let db = TestDb::new().await;
    let relay = InProcessRelay::start(db.relay_config(""));
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let events = [event("order", &format!("{}", i % 4), i)];
                let mut tx = pool.begin().await.unwrap();
                outbox::write_all(&mut *tx, &events).await.unwrap();
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let verified = verify(&db, &["--json"], &[]).await;
        verified.expect_code(0);
        let report = verified.json();
        assert_eq!(
            count(&report, "committed"),
            count(&report, "published") + count(&report, "pending"),
            "{report:#}"
        );
        assert_eq!(count(&report, "order_violations"), 0);
    }
    writer.await.unwrap();
    db.wait_drained(WAIT).await;
    relay.stop().await;
    let report = verify(&db, &["--json"], &[]).await.expect_code(0).json();
    assert_eq!(count(&report, "published"), 150);
    db.drop_db().await;
}

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer")
}

/// With the NATS sink, `outbox verify` reads the JetStream stream back as it reads
/// Kafka topics: a clean run passes; a message deleted from the stream is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_stream_is_audited_and_a_deleted_message_is_lost() {
    let db = TestDb::for_mode(Mode::Polling).await;
    let sink = db.sink(SinkKind::Nats).await;
    let relay = InProcessRelay::start(db.relay_config_for_sink(Mode::Polling, &sink, ""));
    let written = events(30);
    db.write(&written).await;
    let ids: Vec<Uuid> = written.iter().map(|e| e.id).collect();
    sink.read_ids(&["order", "user"], &ids, WAIT).await;
    db.wait_drained(WAIT).await;
    relay.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outbox.toml");
    std::fs::write(&config, sink.sink_toml()).unwrap();
    let run = || async {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["--config", config.to_str().unwrap(), "verify", "--json"])
            .env("OUTBOX_DATABASE_URL", &db.url)
            .env_remove("OUTBOX_KAFKA_BROKERS")
            .env_remove("OUTBOX_MODE")
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap();
        Verified {
            code: output.status.code().unwrap(),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    };
    let clean = run().await;
    clean.expect_code(0);
    let report = clean.json();
    assert_eq!(report["sink"], "nats");
    assert_eq!(report["published"], 30, "{report:#}");
    assert_eq!(report["lost"], 0, "{report:#}");
    assert_eq!(report["topics"][0]["kind"], "stream", "{report:#}");
    assert_eq!(report["topics"][0]["messages"], 30, "{report:#}");

    let gone = written[7].id;
    sink.delete_message(gone).await;
    let lossy = run().await;
    lossy.expect_code(AUDIT_FAILED);
    let report = lossy.json();
    assert_eq!(report["lost"], 1, "{report:#}");
    assert_eq!(
        report["lost_events"][0]["id"],
        gone.to_string(),
        "{report:#}"
    );
    sink.clean_up().await;
    db.drop_db().await;
}

/// With the RabbitMQ sink and `sink.audit_stream`, the relay binds a stream queue to its
/// exchange and `outbox verify` reads it back: a clean run passes; a row marked
/// published that never reached the broker is lost. Without the stream, verify exits 2
/// and says how to get one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_audit_stream_is_audited_and_an_unsent_row_is_lost() {
    let db = TestDb::for_mode(Mode::Polling).await;
    let mut sink = db.sink(SinkKind::RabbitMq).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outbox.toml");
    let run = |config: std::path::PathBuf| {
        let url = db.url.clone();
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
                .args(["--config", config.to_str().unwrap(), "verify", "--json"])
                .env("OUTBOX_DATABASE_URL", &url)
                .env_remove("OUTBOX_KAFKA_BROKERS")
                .env_remove("OUTBOX_MODE")
                .env("RUST_LOG", "warn")
                .output()
                .await
                .unwrap();
            Verified {
                code: output.status.code().unwrap(),
                stdout: String::from_utf8(output.stdout).unwrap(),
                stderr: String::from_utf8(output.stderr).unwrap(),
            }
        }
    };
    std::fs::write(&config, sink.sink_toml()).unwrap();
    let without = run(config.clone()).await;
    without.expect_code(2);
    assert!(
        without.stderr.contains("set sink.audit_stream"),
        "{}",
        without.stderr
    );

    sink.sink_keys = format!(
        "audit_stream = \"{}.audit\"\n",
        db.template.trim_end_matches(".{aggregatetype}")
    );
    std::fs::write(&config, sink.sink_toml()).unwrap();
    let relay = InProcessRelay::start(db.relay_config_for_sink(Mode::Polling, &sink, ""));
    let written = events(30);
    db.write(&written).await;
    let ids: Vec<Uuid> = written.iter().map(|e| e.id).collect();
    sink.read_ids(&["order", "user"], &ids, WAIT).await;
    db.wait_drained(WAIT).await;
    relay.stop().await;

    let clean = run(config.clone()).await;
    clean.expect_code(0);
    let report = clean.json();
    assert_eq!(report["sink"], "rabbitmq");
    assert_eq!(report["published"], 30, "{report:#}");
    assert_eq!(report["topics"][0]["kind"], "stream", "{report:#}");
    assert_eq!(report["topics"][0]["messages"], 30, "{report:#}");

    // A row the relay never sent, marked as if it had been.
    let unsent = event("order", "agg-9", 99);
    db.write(std::slice::from_ref(&unsent)).await;
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = $1")
        .bind(unsent.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let lossy = run(config.clone()).await;
    lossy.expect_code(AUDIT_FAILED);
    let report = lossy.json();
    assert_eq!(report["lost"], 1, "{report:#}");
    assert_eq!(
        report["lost_events"][0]["id"],
        unsent.id.to_string(),
        "{report:#}"
    );
    sink.clean_up().await;
    db.drop_db().await;
}
