//! The inbox on the secured endpoints of `scripts/services`: PostgreSQL over TLS for the
//! TLS-only role, Kafka over SASL_SSL as a principal holding only the ACLs the README
//! lists; refusals that fail fast and name the setting.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::postgres::PgPoolOptions;

struct Secured {
    tls_dir: std::path::PathBuf,
    tls_url: String,
    sasl_brokers: String,
}

impl Secured {
    fn from_env() -> Secured {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set; run the tests with scripts/test (or eval \"$(scripts/services env)\")")
            })
        };
        Secured {
            tls_dir: var("OUTBOX_SERVICES_TLS_DIR").into(),
            tls_url: var("OUTBOX_TLS_DATABASE_URL"),
            sasl_brokers: var("OUTBOX_SASL_KAFKA_BROKERS"),
        }
    }

    fn file(&self, name: &str) -> String {
        self.tls_dir.join(name).display().to_string()
    }

    fn password(&self, name: &str) -> String {
        std::fs::read_to_string(self.tls_dir.join(format!("{name}.password")))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The SASL_SSL properties of user `user` with `password`.
    fn sasl(
        &self,
        builder: outbox_inbox::InboxBuilder,
        user: &str,
        password: &str,
        ca: &str,
    ) -> outbox_inbox::InboxBuilder {
        builder
            .kafka_property("security.protocol", "SASL_SSL")
            .kafka_property("sasl.mechanism", "SCRAM-SHA-512")
            .kafka_property("sasl.username", user)
            .kafka_property("sasl.password", password)
            .kafka_property("ssl.ca.location", self.file(ca))
    }
}

/// `scripts/kafka-tool acls ARGS`: Kafka's AclCommand as the super user.
fn kafka_acls(args: &[&str]) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = std::process::Command::new(root.join("scripts/kafka-tool"))
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

/// The inbox consumes over TLS (PostgreSQL, the TLS-only role) and SASL_SSL (Kafka) as
/// the principal `inbox`, which holds only: Read, Describe and DescribeConfigs on the
/// topic, Read on the group, Write and Describe on the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_consumes_over_tls_and_sasl_ssl_with_its_documented_acls() {
    let secured = Secured::from_env();
    let env = TestEnv::new().await;
    sqlx::raw_sql(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO outbox_tls;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO outbox_tls;",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut url = url::Url::parse(&secured.tls_url).unwrap();
    url.set_path(&env.db_name);
    let tls_pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(url.as_str())
        .await
        .unwrap();
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&tls_pool)
            .await
            .unwrap();
    assert!(encrypted);
    for (operations, resource) in [
        (
            &["Read", "Describe", "DescribeConfigs"][..],
            ["--topic", env.topic.as_str()],
        ),
        (&["Read"], ["--group", env.group.as_str()]),
        (
            &["Write", "Describe"],
            ["--topic", env.dead_letter_topic.as_str()],
        ),
    ] {
        let mut args = vec!["--add", "--allow-principal", "User:inbox"];
        for operation in operations {
            args.extend(["--operation", operation]);
        }
        args.extend(resource);
        kafka_acls(&args);
    }

    let messages: Vec<TestMessage> = (0..60)
        .map(|n| TestMessage::new(&format!("k{}", n % 6), n))
        .collect();
    env.produce(&messages).await;
    let builder = outbox_inbox::Inbox::builder(
        tls_pool.clone(),
        secured.sasl_brokers.clone(),
        &env.group,
        "secure",
    )
    .topics([env.topic.clone()])
    .commit_interval(Duration::from_millis(200))
    .dead_letter_topic(env.dead_letter_topic.clone());
    let inbox = secured
        .sasl(builder, "inbox", &secured.password("kafka-inbox"), "ca.crt")
        .build()
        .unwrap();
    let running = Running::start(inbox, business_handler(Duration::ZERO));
    let stats = running.stats.clone();
    wait_until(Duration::from_secs(60), "the inbox consumed", || {
        let stats = stats.clone();
        async move { stats.processed() == 60 }
    })
    .await;
    running.stop().await;
    assert_eq!(env.business_distinct().await, 60);
    tls_pool.close().await;
    env.cleanup().await;
}

/// Wrong password, wrong CA, plaintext to the SASL_SSL listener: `run` fails within
/// seconds, naming the setting, never printing the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_refusals_fail_fast_and_name_the_setting() {
    let secured = Secured::from_env();
    let env = TestEnv::new().await;
    let password = secured.password("kafka-outbox");
    type Configure<'a> = Box<dyn Fn(outbox_inbox::InboxBuilder) -> outbox_inbox::InboxBuilder + 'a>;
    let cases: Vec<(&str, &str, Configure)> = vec![
        (
            "wrong password",
            "sasl.password",
            Box::new(|b| secured.sasl(b, "outbox", "not-the-password", "ca.crt")),
        ),
        (
            "wrong CA",
            "ssl.ca.location",
            Box::new(|b| secured.sasl(b, "outbox", &password, "other-ca.crt")),
        ),
        (
            "plaintext to a SASL_SSL listener",
            "security.protocol",
            Box::new(|b: outbox_inbox::InboxBuilder| b),
        ),
    ];
    for (what, names, configure) in cases {
        let builder = outbox_inbox::Inbox::builder(
            env.pool.clone(),
            secured.sasl_brokers.clone(),
            &env.group,
            "refused",
        )
        .topics([env.topic.clone()]);
        let inbox = configure(builder).build().unwrap();
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            inbox.run(
                business_handler(Duration::ZERO),
                tokio_util::sync::CancellationToken::new(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the inbox hung"));
        let err = result.expect_err(what).to_string();
        assert!(started.elapsed() < Duration::from_secs(15), "{what}: {err}");
        assert!(err.contains(names), "{what}: {err}");
        assert!(
            !err.contains("not-the-password") && !err.contains(&password),
            "{err}"
        );
    }
    env.cleanup().await;
}
