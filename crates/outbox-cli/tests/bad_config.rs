//! Bad configuration: each case exits with code 2 and one message that names the
//! setting and what to do, and no secret appears in the output.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const SECRET: &str = "pa55-w0rd-never-printed";

fn outbox(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command.args(args).env("OUTBOX_HTTP__LISTEN", "off");
    // The test environment's own OUTBOX_* must not leak into these cases.
    command
        .env_remove("OUTBOX_DATABASE_URL")
        .env_remove("OUTBOX_KAFKA_BROKERS");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn expect_config_error(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(2),
        "exit code 2 expected; stderr:\n{stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
    }
    assert!(
        !stderr.contains(SECRET) && !stdout.contains(SECRET),
        "a secret leaked:\n{stderr}"
    );
}

#[test]
fn unknown_key_in_the_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.toml");
    std::fs::write(&path, "[polling]\nbatch_sise = 10\n").unwrap();
    let output = outbox(&["--config", path.to_str().unwrap(), "relay"], &[]);
    // The file as given (absolute here), the keys of the section, the variable.
    expect_config_error(
        &output,
        &[
            &format!("config file {} at key `polling.batch_sise`", path.display()),
            "the keys here are batch_size, interval",
            "OUTBOX_POLLING__BATCH_SISE",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_environment_variables_are_named() {
    let output = outbox(&["status"], &[("OUTBOX_POLLING__BATCH_SISE", "10")]);
    expect_config_error(
        &output,
        &[
            "the environment variable OUTBOX_POLLING__BATCH_SISE",
            "batch_size, interval",
        ],
    );
    // A variable that is no setting at all is ignored, with a warning naming it.
    let db = TestDb::new().await;
    let output = outbox(
        &["status"],
        &[("OUTBOX_DATABASE_URL", &db.url), ("OUTBOX_LOG", "debug")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("ignoring an OUTBOX_ variable that is not a setting")
            && stderr.contains("OUTBOX_LOG"),
        "{stderr}"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_commands_have_no_rough_edges() {
    let db = TestDb::new().await;
    let help = outbox(&["dead-letters", "list", "--help"], &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("The most dead letters to show") && help.contains("One JSON document"),
        "{help}"
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    let output = outbox(
        &["dead-letters", "retry", &unknown],
        &[("OUTBOX_DATABASE_URL", &db.url)],
    );
    expect_config_error(&output, &[&unknown, "outbox dead-letters list"]);
    let output = outbox(&["status"], &[("OUTBOX_DATABASE_URL", &db.url)]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("oldest:        - (nothing pending)"),
        "{stdout}"
    );
    db.drop_db().await;
}

#[test]
fn missing_config_file_is_named() {
    let output = outbox(&["--config", "/nonexistent/outbox.toml", "relay"], &[]);
    expect_config_error(&output, &["/nonexistent/outbox.toml", "does not exist"]);
}

#[test]
fn missing_database_url_says_how_to_set_it() {
    let output = outbox(&["relay"], &[]);
    expect_config_error(&output, &["database_url", "OUTBOX_DATABASE_URL"]);
}

#[test]
fn malformed_database_url_is_explained() {
    let output = outbox(&["--database-url", "postgres//nohost", "status"], &[]);
    expect_config_error(&output, &["database_url", "postgres://"]);
}

#[test]
fn unreachable_database_is_explained_without_the_password() {
    let url = format!("postgres://app:{SECRET}@127.0.0.1:1/app");
    let started = std::time::Instant::now();
    let output = outbox(
        &[
            "--database-url",
            &url,
            "--kafka-brokers",
            "127.0.0.1:9092",
            "relay",
        ],
        &[],
    );
    // The cause at once, as the other commands say it: not a pool timing out after
    // connect_timeout.
    expect_config_error(
        &output,
        &[
            "cannot connect to PostgreSQL",
            "127.0.0.1:1",
            "***",
            "Connection refused",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kafka_is_explained() {
    let db = TestDb::new().await;
    let output = outbox(
        &[
            "--database-url",
            &db.url,
            "--kafka-brokers",
            "127.0.0.1:1",
            "relay",
        ],
        &[],
    );
    expect_config_error(
        &output,
        &[
            "cannot reach the Kafka brokers 127.0.0.1:1",
            "kafka_brokers",
        ],
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_table_says_run_migrate() {
    let db = TestDb::unmigrated().await;
    let output = outbox(
        &[
            "--database-url",
            &db.url,
            "--kafka-brokers",
            &brokers(),
            "relay",
        ],
        &[],
    );
    expect_config_error(&output, &["does not exist", "outbox migrate"]);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_privileges_name_the_grant() {
    let db = TestDb::new().await;
    let role = format!("reader_{}", &db.name[12..]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{SECRET}';
         GRANT SELECT ON outbox, outbox_migrations TO {role};"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some(SECRET)).unwrap();
    let output = outbox(
        &[
            "--database-url",
            url.as_str(),
            "--kafka-brokers",
            &brokers(),
            "relay",
        ],
        &[],
    );
    expect_config_error(
        &output,
        &["lacks UPDATE", "GRANT UPDATE ON \"public\".\"outbox\""],
    );
    db.drop_db().await;
    drop_role(&role).await;
}

#[test]
fn guarantee_breaking_kafka_property_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.toml");
    std::fs::write(
        &path,
        format!(
            "database_url = \"postgres://postgres:{SECRET}@127.0.0.1:5432/postgres\"\nkafka_brokers = \"127.0.0.1:9092\"\n[kafka.properties]\nacks = \"1\"\n\"sasl.password\" = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    let output = outbox(&["--config", path.to_str().unwrap(), "relay"], &[]);
    expect_config_error(&output, &["kafka.properties.acks", "remove it"]);
}

#[test]
fn bad_http_listen_address_is_named() {
    let output = outbox(
        &[
            "--database-url",
            "postgres://postgres@127.0.0.1:5432/postgres",
            "relay",
            "--http-listen",
            "nowhere",
        ],
        &[],
    );
    expect_config_error(&output, &["http.listen", "nowhere"]);
}

#[test]
fn bad_arguments_exit_2() {
    let output = outbox(&["relay", "--mode", "teleport"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("teleport"));
}

/// Durations that make no sense (a hot loop, an infinite librdkafka timeout) are refused
/// with the setting's name and its valid range, before anything connects.
#[test]
fn zero_durations_are_refused_with_their_range() {
    for (setting, toml) in [
        ("polling.interval", "[polling]\ninterval = \"0s\"\n"),
        ("cdc.heartbeat", "[cdc]\nheartbeat = \"0s\"\n"),
        (
            "delivery.initial_backoff",
            "[delivery]\ninitial_backoff = \"0s\"\n",
        ),
        ("delivery.max_backoff", "[delivery]\nmax_backoff = \"0s\"\n"),
        (
            "kafka.message_timeout",
            "[kafka]\nmessage_timeout = \"0s\"\n",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.toml");
        std::fs::write(
            &path,
            format!(
                "database_url = \"postgres://postgres:{SECRET}@127.0.0.1:5432/postgres\"\nkafka_brokers = \"127.0.0.1:9092\"\n{toml}"
            ),
        )
        .unwrap();
        let output = outbox(&["--config", path.to_str().unwrap(), "relay"], &[]);
        expect_config_error(&output, &[setting, "between"]);
    }
}

/// A backoff cap below the first backoff would never back off as configured.
#[test]
fn max_backoff_below_initial_backoff_is_refused() {
    let output = outbox(
        &["relay"],
        &[
            (
                "OUTBOX_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            ("OUTBOX_DELIVERY__INITIAL_BACKOFF", "10s"),
            ("OUTBOX_DELIVERY__MAX_BACKOFF", "1s"),
        ],
    );
    expect_config_error(
        &output,
        &["delivery.max_backoff", "delivery.initial_backoff"],
    );
}

for_each_mode!(a_missing_topic_without_creation_is_named_at_once);
/// `topics.create = false` and a topic nobody created: the relay says at once which
/// topic and what to do, holds its events (no attempt used, nothing dead-lettered),
/// stops promptly on SIGTERM, and publishes them in order once the topic exists.
async fn a_missing_topic_without_creation_is_named_at_once(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let events: Vec<_> = (0..10).map(|n| event("order", "1", n)).collect();
    db.write(&events).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_relay(
        &db,
        &log,
        &[
            ("OUTBOX_MODE", mode_name(mode)),
            ("OUTBOX_TOPICS__CREATE", "false"),
            ("OUTBOX_DELIVERY__MAX_ATTEMPTS", "2"),
        ],
    );
    let topic = db.topic("order");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!(
            "topic \\\"{topic}\\\" does not exist and topics.create = false"
        )) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay did not name the missing topic within 10 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Well past max_attempts: still waiting, nothing dead-lettered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(dead, 0);
    let stopping = std::time::Instant::now();
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        stopping.elapsed()
    );

    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap();
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                3,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    let mut relay = spawn_relay(
        &db,
        &log,
        &[
            ("OUTBOX_MODE", mode_name(mode)),
            ("OUTBOX_TOPICS__CREATE", "false"),
        ],
    );
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![topic], &ids, Duration::from_secs(60)).await;
    sigterm(&relay);
    let _ = relay.wait();
    audit(&db.rows().await, &received).assert_complete_and_ordered();
    db.drop_db().await;
}

/// The sink's keys belong in `[sink]`: Kafka's sections beside another sink, a missing
/// required key, an unknown one, or a bad secret each exit 2 naming the fix, and the
/// secret is never printed.
#[test]
fn wrong_sink_settings_exit_2_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.toml");
    let cases: [(&str, &[&str]); 5] = [
        (
            "[sink]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\n[topics]\ntemplate = \"x.{aggregatetype}\"\n",
            &["[topics] is set but sink.type = \"nats\"", "remove them"],
        ),
        (
            "[sink]\ntype = \"rabbitmq\"\n",
            &["sink.address is not set", "address = \"127.0.0.1:5672\""],
        ),
        (
            "[sink]\ntype = \"webhook\"\nurl = \"https://hooks.example/{aggregatetype}\"\nsignature = \"x\"\n",
            &["at key `sink.signature`: unknown key", "the keys here are url, secret"],
        ),
        (
            &format!("[sink]\ntype = \"webhook\"\nurl = \"https://hooks.example/x\"\nsecret = \"{SECRET}\"\n"),
            &["sink.secret", "does not start with \"whsec_\""],
        ),
        (
            "[sink]\ntype = \"redis\"\n",
            &["at key `sink.type`", "expected one of kafka, nats, rabbitmq, webhook"],
        ),
    ];
    for (toml, needles) in cases {
        std::fs::write(&path, toml).unwrap();
        let output = outbox(
            &["--config", path.to_str().unwrap(), "relay"],
            &[("OUTBOX_DATABASE_URL", "postgres://u@127.0.0.1:1/db")],
        );
        expect_config_error(&output, needles);
    }
}

/// `outbox verify` reads Kafka topics and JetStream streams: with a webhook sink it exits
/// 2 and says why it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_a_sink_it_cannot_read_exits_2() {
    let db = TestDb::new().await;
    let output = outbox(
        &["verify"],
        &[
            ("OUTBOX_DATABASE_URL", db.url.as_str()),
            ("OUTBOX_SINK__TYPE", "webhook"),
            ("OUTBOX_SINK__URL", "https://hooks.example/{aggregatetype}"),
            ("OUTBOX_KAFKA_BROKERS", "127.0.0.1:9092"),
        ],
    );
    expect_config_error(
        &output,
        &[
            "cannot read the webhook sink back",
            "a webhook leaves nothing to read",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("kafka_brokers (OUTBOX_KAFKA_BROKERS) is set but the sink is not Kafka"),
        "the ignored Kafka brokers are named: {stderr}"
    );
    db.drop_db().await;
}
