//! Production connectivity on the secured endpoints of `scripts/services`: PostgreSQL
//! over TLS (verify-full, a TLS-only role) and Kafka over SASL_SSL, SASL_PLAINTEXT and
//! mutual TLS; refusals that exit 2 with the setting to change, never a hang.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use uuid::Uuid;

/// A relay process with the SASL_SSL config file, on `database_url`.
fn spawn_secured_relay(
    secured: &Secured,
    db: &TestDb,
    mode: Mode,
    database_url: &str,
    log: &std::path::Path,
) -> KillOnDrop {
    let log = std::fs::File::create(log).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_") {
            command.env_remove(key);
        }
    }
    command
        .arg("--config")
        .arg(&secured.sasl_config)
        .args(["relay", "--mode", mode_name(mode)])
        .env("OUTBOX_DATABASE_URL", database_url)
        .env("OUTBOX_KAFKA_BROKERS", &secured.sasl_brokers)
        .env("OUTBOX_TOPICS__TEMPLATE", &db.template)
        .env("OUTBOX_HTTP__LISTEN", "off")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(KillOnDrop)
        .unwrap()
}

/// Which of the database's sessions with `application_name` use TLS.
async fn sessions_over_tls(db: &TestDb, application: &str) -> Vec<bool> {
    sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.application_name = $1 AND (a.datname = $2 OR a.backend_type = 'walsender')",
    )
    .bind(application)
    .bind(&db.name)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

for_each_mode!(relay_status_and_verify_work_over_tls_and_sasl_ssl);
async fn relay_status_and_verify_work_over_tls_and_sasl_ssl(mode: Mode) {
    let secured = Secured::from_env();
    let db = TestDb::owned_by_tls_role(&secured, mode).await;
    let url = secured.tls_url_for(&db.name);
    let events: Vec<_> = (0..200)
        .map(|n| event("order", &(n % 4).to_string(), n))
        .collect();
    db.write(&events).await;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = spawn_secured_relay(&secured, &db, mode, &url, &log);
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(90)).await;
    if mode == Mode::Polling {
        db.wait_drained(Duration::from_secs(30)).await;
    }

    // Every session of the relay is encrypted, the replication stream included.
    let mut applications = vec!["outbox-relay"];
    if mode == Mode::Cdc {
        applications.push("outbox-relay-cdc");
    }
    for application in applications {
        let sessions = sessions_over_tls(&db, application).await;
        assert!(
            !sessions.is_empty() && sessions.iter().all(|ssl| *ssl),
            "{application} sessions over TLS: {sessions:?}"
        );
    }
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("PostgreSQL connection is encrypted"),
        "relay log: {text}"
    );
    audit(&db.rows().await, &received).assert_complete_and_ordered();

    let env = [
        ("OUTBOX_DATABASE_URL", url.as_str()),
        ("OUTBOX_KAFKA_BROKERS", secured.sasl_brokers.as_str()),
        ("OUTBOX_TOPICS__TEMPLATE", db.template.as_str()),
    ];
    let status = run_cli(&["status"], &env);
    assert_eq!(status.code, Some(0), "status: {}", status.stderr);
    assert!(status.stdout.contains("pending"), "{}", status.stdout);
    let config = secured.sasl_config.display().to_string();
    let verify = run_cli(
        &[
            "--config",
            &config,
            "verify",
            "--json",
            "--mode",
            mode_name(mode),
        ],
        &env,
    );
    assert_eq!(verify.code, Some(0), "verify: {}", verify.output());
    let report: serde_json::Value = serde_json::from_str(&verify.stdout).unwrap();
    assert_eq!(report["published"], 200, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["passed"], true, "{report}");
    db.drop_db().await;
}

/// Each SASL mechanism the issue names, SASL_PLAINTEXT, and mutual TLS, end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_security_protocol_and_mechanism_publishes() {
    let secured = Secured::from_env();
    let ca = secured.file("ca.crt");
    let password = secured.password("kafka-outbox");
    let sasl = |protocol: &str, mechanism: &str| {
        format!(
            "\"security.protocol\" = \"{protocol}\"\n\"sasl.mechanism\" = \"{mechanism}\"\n\"sasl.username\" = \"outbox\"\n\"sasl.password\" = \"{password}\"\n\"ssl.ca.location\" = \"{ca}\"\n"
        )
    };
    let cases = [
        ("SASL_SSL SCRAM-SHA-512", "localhost:9094", sasl("SASL_SSL", "SCRAM-SHA-512")),
        ("SASL_SSL SCRAM-SHA-256", "localhost:9094", sasl("SASL_SSL", "SCRAM-SHA-256")),
        ("SASL_SSL PLAIN", "localhost:9094", sasl("SASL_SSL", "PLAIN")),
        (
            "SASL_SSL OAUTHBEARER",
            "localhost:9094",
            format!(
                "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"enable.sasl.oauthbearer.unsecure.jwt\" = \"true\"\n\"sasl.oauthbearer.config\" = \"principal=outbox\"\n\"ssl.ca.location\" = \"{ca}\"\n"
            ),
        ),
        (
            "SASL_PLAINTEXT SCRAM-SHA-256",
            "127.0.0.1:9096",
            sasl("SASL_PLAINTEXT", "SCRAM-SHA-256"),
        ),
        (
            "SSL with a client certificate",
            "localhost:9095",
            format!(
                "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{ca}\"\n\"ssl.certificate.location\" = \"{}\"\n\"ssl.key.location\" = \"{}\"\n",
                secured.file("kafka-client.crt"),
                secured.file("kafka-client.key")
            ),
        ),
    ];
    let db = TestDb::new().await;
    for (n, (name, brokers, properties)) in cases.iter().enumerate() {
        let mut config = db.relay_config(&format!("[kafka.properties]\n{properties}"));
        config.kafka_mut().unwrap().brokers = brokers.to_string();
        let events: Vec<_> = (0..20)
            .map(|i| event(&format!("case{n}"), "1", i))
            .collect();
        db.write(&events).await;
        let relay = InProcessRelay::start(config);
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let received = consume_ids_or_partial(
            vec![db.topic(&format!("case{n}"))],
            &ids,
            Duration::from_secs(60),
        )
        .await;
        relay.stop().await;
        assert_eq!(received.len(), ids.len(), "{name}: {received:?}");
        let order: Vec<Uuid> = received.iter().map(Received::id).collect();
        assert_eq!(order, ids, "{name}: out of order");
    }
    db.drop_db().await;
}

/// A database refusal: exit 2, quickly, naming the setting to change.
fn assert_refused(run: &CliRun, what: &str, names: &str) {
    assert_eq!(run.code, Some(2), "{what}: {}", run.output());
    assert!(
        run.elapsed < Duration::from_secs(20),
        "{what} took {:?}",
        run.elapsed
    );
    assert!(
        run.stderr.contains(names),
        "{what}: the message does not name {names}: {}",
        run.stderr
    );
}

for_each_mode!(database_refusals_exit_2_and_name_the_setting);
async fn database_refusals_exit_2_and_name_the_setting(mode: Mode) {
    let secured = Secured::from_env();
    let db = TestDb::owned_by_tls_role(&secured, mode).await;
    let good = url::Url::parse(&secured.tls_url_for(&db.name)).unwrap();
    let with = |change: &dyn Fn(&mut url::Url)| {
        let mut url = good.clone();
        change(&mut url);
        url.to_string()
    };
    let wrong_ca = with(&|url| {
        let query = url.query().unwrap().replace("ca.crt", "other-ca.crt");
        url.set_query(Some(&query));
    });
    let wrong_password = with(&|url| {
        url.set_password(Some("not-the-password")).unwrap();
    });
    let plaintext = with(&|url| url.set_query(Some("sslmode=disable")));
    let cases = [
        ("wrong CA", wrong_ca, "sslrootcert"),
        ("wrong password", wrong_password, "password"),
        ("plaintext to a TLS-only role", plaintext, "sslmode"),
    ];
    let mode_arg = mode_name(mode);
    for (what, url, names) in &cases {
        let env = [
            ("OUTBOX_DATABASE_URL", url.as_str()),
            ("OUTBOX_KAFKA_BROKERS", secured.sasl_brokers.as_str()),
        ];
        let config = secured.sasl_config.display().to_string();
        for args in [
            vec!["--config", &config, "relay", "--mode", mode_arg],
            vec!["migrate"],
            vec!["status"],
            vec!["--config", &config, "verify"],
        ] {
            let run = run_cli(&args, &env);
            assert_refused(&run, &format!("{what}, outbox {args:?}"), names);
            assert!(
                !run.output().contains("not-the-password"),
                "the password was printed: {}",
                run.output()
            );
        }
    }
    db.drop_db().await;
}

for_each_mode!(kafka_refusals_exit_2_and_name_the_setting);
async fn kafka_refusals_exit_2_and_name_the_setting(mode: Mode) {
    let secured = Secured::from_env();
    let db = TestDb::owned_by_tls_role(&secured, mode).await;
    let url = secured.tls_url_for(&db.name);
    let dir = tempfile::tempdir().unwrap();
    let sasl = std::fs::read_to_string(&secured.sasl_config).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let wrong_password = write(
        "password.toml",
        sasl.lines()
            .map(|line| {
                if line.starts_with("\"sasl.password\"") {
                    "\"sasl.password\" = \"not-the-password\"".to_string()
                } else {
                    line.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let wrong_ca = write("ca.toml", sasl.replace("/ca.crt", "/other-ca.crt"));
    let plaintext = write(
        "plaintext.toml",
        "[kafka.properties]\n\"security.protocol\" = \"PLAINTEXT\"\n".into(),
    );
    let cases = [
        ("wrong password", wrong_password, "sasl.password"),
        ("wrong CA", wrong_ca, "ssl.ca.location"),
        (
            "plaintext to the SASL_SSL listener",
            plaintext,
            "security.protocol",
        ),
    ];
    for (what, config, names) in &cases {
        let env = [
            ("OUTBOX_DATABASE_URL", url.as_str()),
            ("OUTBOX_KAFKA_BROKERS", secured.sasl_brokers.as_str()),
        ];
        for args in [
            vec!["--config", config, "relay", "--mode", mode_name(mode)],
            vec!["--config", config, "verify"],
        ] {
            let run = run_cli(&args, &env);
            assert_refused(&run, &format!("{what}, outbox {args:?}"), names);
            assert!(
                !run.output().contains("not-the-password"),
                "the password was printed: {}",
                run.output()
            );
        }
    }
    db.drop_db().await;
}

for_each_mode!(special_characters_and_query_hosts_work_in_every_connection);
/// One URL means the same to the polling connections and the replication stream: a
/// password with URL metacharacters, and `host=`/`port=` given as parameters.
async fn special_characters_and_query_hosts_work_in_every_connection(mode: Mode) {
    let secured = Secured::from_env();
    let db = TestDb::for_mode(mode).await;
    let role = format!("special_{}", &db.name[12..]);
    let password = "p&ss=w@rd/%?#:x";
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}';
         ALTER DATABASE {} OWNER TO {role};
         ALTER TABLE outbox OWNER TO {role};
         ALTER TABLE outbox_migrations OWNER TO {role};
         ALTER TABLE outbox_cdc_checkpoint OWNER TO {role};
         ALTER TABLE outbox_writer_deletes OWNER TO {role};",
        db.name
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let encoded: String = url::form_urlencoded::byte_serialize(password.as_bytes()).collect();
    let url = format!(
        "postgres://{role}:{encoded}@ignored.invalid/{}?host=localhost&port=5432&sslmode=verify-full&sslrootcert={}",
        db.name,
        secured.file("ca.crt")
    );
    let mut config = db.relay_config_for(mode, "");
    config.database_url = outbox_relay::DatabaseUrl::new(url);
    let events: Vec<_> = (0..30).map(|n| event("order", "1", n)).collect();
    db.write(&events).await;
    let relay = InProcessRelay::start(config);
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(60)).await;
    relay.stop().await;
    audit(&db.rows().await, &received).assert_complete_and_ordered();
    db.drop_db().await;
    drop_role(&role).await;
}

for_each_mode!(a_client_certificate_logs_in_to_postgres);
/// A client certificate instead of a password (`sslcert`, `sslkey`), both modes.
async fn a_client_certificate_logs_in_to_postgres(mode: Mode) {
    let secured = Secured::from_env();
    let db = TestDb::unmigrated().await;
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "ALTER DATABASE {} OWNER TO outbox_cert",
        db.name
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let url = format!(
        "postgres://outbox_cert@localhost:5432/{}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        db.name,
        secured.file("ca.crt"),
        secured.file("pg-client.crt"),
        secured.file("pg-client.key"),
    );
    let mut args = vec!["migrate"];
    if mode == Mode::Cdc {
        args.push("--cdc");
    }
    let run = run_cli(&args, &[("OUTBOX_DATABASE_URL", &url)]);
    assert_eq!(run.code, Some(0), "migrate: {}", run.output());
    let events: Vec<_> = (0..30).map(|n| event("order", "1", n)).collect();
    db.write(&events).await;
    let mut config = db.relay_config_for(mode, "");
    config.database_url = outbox_relay::DatabaseUrl::new(url);
    let relay = InProcessRelay::start(config);
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(60)).await;
    relay.stop().await;
    audit(&db.rows().await, &received).assert_complete_and_ordered();
    db.drop_db().await;
}

/// The URL may come from a file (a mounted secret) instead of the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_url_file_is_read() {
    let secured = Secured::from_env();
    let db = TestDb::owned_by_tls_role(&secured, Mode::Polling).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("database_url");
    std::fs::write(&file, format!("{}\n", secured.tls_url_for(&db.name))).unwrap();
    let file = file.display().to_string();
    let run = run_cli(&["status"], &[("OUTBOX_DATABASE_URL_FILE", &file)]);
    assert_eq!(run.code, Some(0), "{}", run.output());
    let both = run_cli(
        &["status"],
        &[
            ("OUTBOX_DATABASE_URL_FILE", &file),
            ("OUTBOX_DATABASE_URL", &secured.tls_url_for(&db.name)),
        ],
    );
    assert_eq!(both.code, Some(2), "{}", both.output());
    assert!(both.stderr.contains("database_url_file"), "{}", both.stderr);
    db.drop_db().await;
}

/// Secrets planted in every place one can go (the URL's user part, its `password=`
/// parameter, a URL file, SASL and TLS key passwords, a PEM key, a JAAS string, an OAuth
/// client secret, misplaced in the configuration) never appear in what any command
/// prints, with good settings and bad ones, at debug level (librdkafka's too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output() {
    let secured = Secured::from_env();
    let tag = Uuid::new_v4().simple().to_string()[..10].to_string();
    let canary = |place: &str| format!("CANARY{place}{tag}");
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };

    // A role whose password is a canary owns the database.
    let db = TestDb::unmigrated().await;
    let role = format!("canary_{}", &db.name[12..]);
    let pg_password = canary("pgpassword");
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{pg_password}';
         ALTER DATABASE {} OWNER TO {role};",
        db.name
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let ca = secured.file("ca.crt");
    let url = format!(
        "postgres://{role}:{pg_password}@localhost:5432/{}?sslmode=verify-full&sslrootcert={ca}",
        db.name
    );
    let url_file = file(
        "database_url",
        &format!(
            "postgres://{role}@localhost:5432/{}?sslmode=verify-full&sslrootcert={ca}&password={pg_password}",
            db.name
        ),
    );
    let wrong_url = url.replace(&pg_password, &canary("pgwrong"));

    let sasl = std::fs::read_to_string(&secured.sasl_config).unwrap();
    let good_kafka = file(
        "good.toml",
        &format!(
            "{sasl}\"ssl.key.password\" = \"{}\"\n\"debug\" = \"security,broker,conf\"\n",
            canary("sslkeypassword")
        ),
    );
    let with_sasl_password = |password: &str| {
        sasl.lines()
            .map(|line| {
                if line.starts_with("\"sasl.password\"") {
                    format!("\"sasl.password\" = \"{password}\"")
                } else {
                    line.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    let wrong_kafka = file("wrong.toml", &with_sasl_password(&canary("kafkawrong")));
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\\nMIIE{}AAAAAAAAAAAAAAAAAAAA\\n-----END PRIVATE KEY-----",
        canary("pem")
    );
    let bad_key = file(
        "badkey.toml",
        &format!(
            "{sasl}\"ssl.key.pem\" = \"{pem}\"\n\"ssl.key.password\" = \"{}\"\n",
            canary("keypemPassword")
        ),
    );
    let jaas = file(
        "jaas.toml",
        &format!(
            "[kafka.properties]\n\"sasl.jaas.config\" = \"org.apache.kafka.common.security.scram.ScramLoginModule required username=\\\"outbox\\\" password=\\\"{}\\\";\"\n",
            canary("jaas")
        ),
    );
    let oauth = file(
        "oauth.toml",
        &format!(
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"OAUTHBEARER\"\n\"sasl.oauthbearer.method\" = \"oidc\"\n\"sasl.oauthbearer.client.id\" = \"outbox\"\n\"sasl.oauthbearer.client.secret\" = \"{}\"\n\"sasl.oauthbearer.token.endpoint.url\" = \"https://127.0.0.1:1/token\"\n",
            canary("oauthsecret")
        ),
    );
    let misplaced = file(
        "misplaced.toml",
        &format!("[postgres]\npassword = \"{}\"\n", canary("misplaced")),
    );
    let wrong_type = file(
        "wrongtype.toml",
        "[kafka.properties]\n\"sasl.password\" = 73914628215\n[kafka]\nlinger = 4815162342\n",
    );
    let unparseable = format!(
        "postgres://{role}:{}@localhost:notaport/db",
        canary("badurl")
    );
    let unknown_parameter = format!("{url}&passwd={}", canary("parameter"));

    let base: Vec<(&str, &str)> = vec![
        ("OUTBOX_KAFKA_BROKERS", secured.sasl_brokers.as_str()),
        ("OUTBOX_TOPICS__TEMPLATE", db.template.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let env = |extra: &[(&'static str, &str)]| -> Vec<(String, String)> {
        base.iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut outputs: Vec<(String, String)> = Vec::new();
    let run = |what: &str, args: &[&str], env: Vec<(String, String)>, code: i32| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let run = run_cli(args, &env);
        assert_eq!(run.code, Some(code), "{what}: {}", run.output());
        (what.to_string(), run.output())
    };

    // Good settings.
    outputs.push(run(
        "migrate",
        &["migrate"],
        env(&[("OUTBOX_DATABASE_URL", &url)]),
        0,
    ));
    db.write(&[event("order", "1", 0), event("order", "2", 1)])
        .await;
    let relay_log = dir.path().join("relay.log");
    let log = std::fs::File::create(&relay_log).unwrap();
    let mut relay = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_") {
            relay.env_remove(key);
        }
    }
    for (key, value) in env(&[
        ("OUTBOX_DATABASE_URL", &url),
        ("OUTBOX_HTTP__LISTEN", "127.0.0.1:19464"),
    ]) {
        relay.env(key, value);
    }
    let mut relay = relay
        .args(["--config", &good_kafka, "relay"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let received = consume_ids(
        vec![db.topic("order")],
        &db.rows().await.iter().map(|r| r.0).collect::<Vec<_>>(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(received.len(), 2);
    let health = http_get(19464, "/healthz").await;
    let metrics = http_get(19464, "/metrics").await;
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    outputs.push((
        "relay (good settings)".into(),
        std::fs::read_to_string(&relay_log).unwrap() + &health + &metrics,
    ));
    outputs.push(run(
        "status from a URL file",
        &["status"],
        env(&[("OUTBOX_DATABASE_URL_FILE", &url_file)]),
        0,
    ));
    outputs.push(run(
        "verify --json",
        &["--config", &good_kafka, "verify", "--json"],
        env(&[("OUTBOX_DATABASE_URL", &url)]),
        0,
    ));
    outputs.push(run(
        "dead-letters list",
        &["dead-letters", "list", "--json"],
        env(&[("OUTBOX_DATABASE_URL", &url)]),
        0,
    ));

    // Bad settings.
    for args in [&["relay"][..], &["status"], &["migrate"]] {
        outputs.push(run(
            &format!("{args:?} with a wrong database password"),
            args,
            env(&[("OUTBOX_DATABASE_URL", &wrong_url)]),
            2,
        ));
    }
    for (what, config) in [
        ("a wrong SASL password", &wrong_kafka),
        ("a bad PEM key", &bad_key),
        ("a JAAS string", &jaas),
        ("an OAuth client secret", &oauth),
        ("a misplaced password", &misplaced),
        ("secrets of the wrong type", &wrong_type),
    ] {
        for args in [
            &["--config", config, "relay"][..],
            &["--config", config, "verify"],
        ] {
            outputs.push(run(
                &format!("{args:?} with {what}"),
                args,
                env(&[("OUTBOX_DATABASE_URL", &url)]),
                2,
            ));
        }
    }
    for (what, bad_url) in [
        ("an unparseable URL", &unparseable),
        ("an unknown URL parameter", &unknown_parameter),
    ] {
        outputs.push(run(
            &format!("relay with {what}"),
            &["relay"],
            env(&[("OUTBOX_DATABASE_URL", bad_url)]),
            2,
        ));
    }

    // Every canary carries the tag.
    let secrets = [
        secured.password("kafka-outbox"),
        tag.clone(),
        "73914628215".to_string(),
        "4815162342".to_string(),
    ];
    for (what, output) in &outputs {
        for secret in &secrets {
            assert!(
                !output.contains(secret.as_str()),
                "{what} printed a secret ({secret}):\n{output}"
            );
        }
    }
    assert!(outputs.len() >= 20, "{} runs", outputs.len());
    db.drop_db().await;
    drop_role(&role).await;
}

/// `scripts/kafka-tool acls ARGS`: Kafka's AclCommand as the super user.
fn kafka_acls(args: &[&str]) {
    let output = Command::new(repo_root().join("scripts/kafka-tool"))
        .arg("acls")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kafka-tool acls {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The README's ACL for the relay's transactional ids (`kafka.transactions = true`).
fn grant_relay_transactional_ids() {
    kafka_acls(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--operation",
        "Describe",
        "--transactional-id",
        "outbox-relay/",
        "--resource-pattern-type",
        "prefixed",
    ]);
}

for_each_mode!(the_documented_acls_are_enough_and_a_missing_one_loses_nothing);
/// The relay's principal with only the ACLs the README lists (Write, Describe and Create
/// on its topics) publishes everything. Events for a topic it may not write wait, in
/// order, using up no attempt and never dead-lettered, until the ACL is granted.
async fn the_documented_acls_are_enough_and_a_missing_one_loses_nothing(mode: Mode) {
    let secured = Secured::from_env();
    let db = TestDb::owned_by_tls_role(&secured, mode).await;
    let prefix = db.topic("");
    let properties = format!(
        "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"relay\"\n\"sasl.password\" = {{ file = \"{}\" }}\n\"ssl.ca.location\" = \"{}\"\n[delivery]\nmax_attempts = 2\ninitial_backoff = \"100ms\"\nmax_backoff = \"200ms\"\n",
        secured.file("kafka-relay.password"),
        secured.file("ca.crt"),
    );
    let mut config = db.relay_config_for(mode, &properties);
    config.kafka_mut().unwrap().brokers = secured.sasl_brokers.clone();
    config.database_url = outbox_relay::DatabaseUrl::new(secured.tls_url_for(&db.name));
    kafka_acls(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--operation",
        "Describe",
        "--operation",
        "Create",
        "--topic",
        &format!("{prefix}order"),
        "--resource-pattern-type",
        "prefixed",
    ]);
    grant_relay_transactional_ids();
    let allowed: Vec<_> = (0..40)
        .map(|n| event("order", &(n % 4).to_string(), n))
        .collect();
    let refused: Vec<_> = (0..10).map(|n| event("denied", "d1", n)).collect();
    db.write(&allowed).await;
    db.write(&refused).await;
    let relay = InProcessRelay::start(config);
    let allowed_ids: Vec<Uuid> = allowed.iter().map(|e| e.id).collect();
    let received = consume_ids(
        vec![db.topic("order")],
        &allowed_ids,
        Duration::from_secs(60),
    )
    .await;
    // Far beyond max_attempts (2) at 100-200 ms backoff: not one is dead-lettered.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(dead, 0, "a missing ACL dead-lettered events");
    kafka_acls(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--operation",
        "Describe",
        "--operation",
        "Create",
        "--topic",
        &format!("{prefix}denied"),
    ]);
    let refused_ids: Vec<Uuid> = refused.iter().map(|e| e.id).collect();
    let late = consume_ids(
        vec![db.topic("denied")],
        &refused_ids,
        Duration::from_secs(60),
    )
    .await;
    relay.stop().await;
    let all: Vec<Received> = received.into_iter().chain(late).collect();
    audit(&db.rows().await, &all).assert_complete_and_ordered();
    db.drop_db().await;
}

/// The README's TLS and SASL_SSL example, copied from the README and run as written from
/// the repository's root: migrate, relay, status and verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_secure_example_runs_as_written() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("```toml\n# outbox.toml\n")
        .expect("the README's secure example");
    let block = &readme[start + "```toml\n".len()..];
    let example = &block[..block.find("```").unwrap()];
    assert!(example.contains("sslmode=verify-full") && example.contains("SASL_SSL"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outbox.toml");
    std::fs::write(&config, example).unwrap();
    let config = config.display().to_string();

    let run = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
        for (key, _) in std::env::vars() {
            if key.starts_with("OUTBOX_") {
                command.env_remove(key);
            }
        }
        let output = command
            .current_dir(repo_root())
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("OUTBOX_HTTP__LISTEN", "off")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "outbox {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    run(&["migrate"]);
    // The example's database is shared: an aggregate type of this run's own.
    let aggregate_type = format!("readme{}", &Uuid::new_v4().simple().to_string()[..10]);
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut admin_url = url::Url::parse(&admin_url()).unwrap();
    admin_url.set_path("outbox_tls");
    let admin = sqlx::PgPool::connect(admin_url.as_str()).await.unwrap();
    for (n, id) in ids.iter().enumerate() {
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1, $2, '1', 'T', $3)",
        )
        .bind(id)
        .bind(&aggregate_type)
        .bind(serde_json::json!({ "n": n }))
        .execute(&admin)
        .await
        .unwrap();
    }
    let mut relay = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_") {
            relay.env_remove(key);
        }
    }
    let mut relay = relay
        .current_dir(repo_root())
        .args(["--config", &config, "relay"])
        .env("OUTBOX_HTTP__LISTEN", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let topic = format!("outbox.event.{aggregate_type}");
    let received = consume_ids(vec![topic], &ids, Duration::from_secs(60)).await;
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());
    assert_eq!(
        received.iter().map(Received::id).collect::<Vec<_>>(),
        ids,
        "in order"
    );
    assert!(run(&["status"]).contains("pending"));
    run(&["verify", "--since", "10m"]);
    admin.close().await;
}

for_each_mode!(the_documented_database_grants_are_enough);
/// A role with only the grants the README lists for the mode relays everything over TLS,
/// and a role with only SELECT runs `outbox verify`.
async fn the_documented_database_grants_are_enough(mode: Mode) {
    let secured = Secured::from_env();
    let db = TestDb::for_mode(mode).await;
    let (role, url) = match mode {
        Mode::Cdc => cdc_relay_role(&db).await,
        Mode::Polling => polling_relay_role(&db).await,
    };
    let mut url = url::Url::parse(&url).unwrap();
    url.set_host(Some("localhost")).unwrap();
    url.set_query(Some(&format!(
        "sslmode=verify-full&sslrootcert={}",
        secured.file("ca.crt")
    )));
    let events: Vec<_> = (0..30)
        .map(|n| event("order", &(n % 3).to_string(), n))
        .collect();
    db.write(&events).await;
    let mut config = db.relay_config_for(mode, "");
    config.database_url = outbox_relay::DatabaseUrl::new(url.to_string());
    let relay = InProcessRelay::start(config);
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(60)).await;
    if mode == Mode::Polling {
        db.wait_drained(Duration::from_secs(30)).await;
    }
    relay.stop().await;
    audit(&db.rows().await, &received).assert_complete_and_ordered();

    let reader = format!("reader_{}", &db.name[12..]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "CREATE ROLE {reader} LOGIN PASSWORD 'reader-pw';
         GRANT SELECT ON outbox, outbox_migrations TO {reader};"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    url.set_username(&reader).unwrap();
    url.set_password(Some("reader-pw")).unwrap();
    let verify = run_cli(
        &["verify", "--json", "--mode", mode_name(mode)],
        &[
            ("OUTBOX_DATABASE_URL", url.as_str()),
            ("OUTBOX_KAFKA_BROKERS", &brokers()),
            ("OUTBOX_TOPICS__TEMPLATE", &db.template),
        ],
    );
    assert_eq!(
        verify.code,
        Some(0),
        "verify as {reader}: {}",
        verify.output()
    );
    db.drop_db().await;
    drop_role(&role).await;
    drop_role(&reader).await;
}

/// With `topics.create = false` the relay's principal needs no `Create`: Write and
/// Describe on an existing topic are enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_topic_creation_write_and_describe_are_enough() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let secured = Secured::from_env();
    let db = TestDb::new().await;
    let topic = db.topic("order");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    kafka_acls(&[
        "--add",
        "--allow-principal",
        "User:relay",
        "--operation",
        "Write",
        "--operation",
        "Describe",
        "--topic",
        &topic,
    ]);
    grant_relay_transactional_ids();
    let properties = format!(
        "[topics]\ncreate = false\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-256\"\n\"sasl.username\" = \"relay\"\n\"sasl.password\" = {{ file = \"{}\" }}\n\"ssl.ca.location\" = \"{}\"\n",
        secured.file("kafka-relay.password"),
        secured.file("ca.crt"),
    );
    let mut config = db.relay_config(&properties);
    config.kafka_mut().unwrap().brokers = secured.sasl_brokers.clone();
    let events: Vec<_> = (0..20)
        .map(|n| event("order", &(n % 2).to_string(), n))
        .collect();
    db.write(&events).await;
    let relay = InProcessRelay::start(config);
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let received = consume_ids(vec![topic], &ids, Duration::from_secs(60)).await;
    db.wait_drained(Duration::from_secs(30)).await;
    relay.stop().await;
    audit(&db.rows().await, &received).assert_complete_and_ordered();
    db.drop_db().await;
}
