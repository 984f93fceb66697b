//! Shared helpers of the integration tests. Every test gets its own database and its
//! own topics on the real PostgreSQL and Kafka that `scripts/services start` runs.
//!
//! OUTBOX_DATABASE_URL (an admin URL; default postgres://postgres@127.0.0.1:5432/postgres)
//! and OUTBOX_KAFKA_BROKERS (default 127.0.0.1:9092) point the tests elsewhere.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox::{Event, TableRef};
pub use outbox_relay::Mode;
use outbox_relay::{Config, ConfigOverrides, RelayConfig};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use outbox_test_kit::database::admin_url;

#[allow(unused_imports)] // each test binary uses some of them
pub use outbox_test_kit::kafka::{brokers, consume_ids, consume_ids_or_partial, consume_until};
pub use outbox_test_kit::{Received, SinkKind, TestSink};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A database of its own, migrated, plus a topic prefix of its own.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// Topic template: `t<uuid>.{aggregatetype}`.
    pub template: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::with_payload(outbox::PayloadType::Jsonb).await
    }

    /// A migrated database ready for `mode`: in CDC mode the publication and slot exist
    /// before the first write, as after `outbox migrate --cdc`.
    pub async fn for_mode(mode: Mode) -> TestDb {
        let db = TestDb::new().await;
        if mode == Mode::Cdc {
            let mut conn = db.pool.acquire().await.unwrap();
            let names = db.cdc_names();
            outbox_postgres_cdc::slot::ensure_publication(&mut conn, &TableRef::default(), &names)
                .await
                .unwrap();
            outbox_postgres_cdc::slot::ensure_slot(&mut conn, &TableRef::default(), &names)
                .await
                .unwrap();
        }
        db
    }

    pub fn cdc_names(&self) -> outbox_postgres_cdc::CdcNames {
        outbox_postgres_cdc::CdcNames::for_table(&self.name, &TableRef::default())
    }

    /// In-process relay settings for `mode`.
    pub fn relay_config_for(&self, mode: Mode, extra_toml: &str) -> RelayConfig {
        let mut config = self.relay_config(extra_toml);
        config.mode = mode;
        config
    }

    pub async fn with_payload(payload: outbox::PayloadType) -> TestDb {
        let db = TestDb::unmigrated().await;
        let mut conn = db.pool.acquire().await.unwrap();
        outbox::migrate(&mut conn, &TableRef::default(), payload)
            .await
            .unwrap();
        drop(conn);
        db
    }

    /// A fresh database without the outbox table.
    pub async fn unmigrated() -> TestDb {
        let suffix = Uuid::new_v4().simple().to_string();
        let fresh =
            outbox_test_kit::database::create(&format!("outbox_test_{}", &suffix[..16])).await;
        TestDb {
            name: fresh.name,
            url: fresh.url,
            pool: fresh.pool,
            template: format!("t{}.{{aggregatetype}}", &suffix[..12]),
        }
    }

    pub fn topic(&self, aggregate_type: &str) -> String {
        self.template.replace("{aggregatetype}", aggregate_type)
    }

    /// Relay settings for an in-process relay on this database and these topics.
    pub fn relay_config(&self, extra_toml: &str) -> RelayConfig {
        let toml = format!(
            "database_url = {:?}\nkafka_brokers = {:?}\n{extra_toml}\n",
            self.url,
            brokers(),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.toml");
        std::fs::write(&path, toml).unwrap();
        // Without the environment: the test process' OUTBOX_* point at the admin database.
        let mut config = Config::load_file_only(&path, &ConfigOverrides::default())
            .unwrap()
            .resolve()
            .unwrap();
        config.router =
            outbox_core::Router::new(outbox_core::TopicTemplate::parse(&self.template).unwrap())
                .with_rule(outbox_kafka::check_topic_name);
        config.http_listen = None;
        config
    }

    /// In-process relay settings for `mode` publishing to `sink` (Kafka: this database's
    /// topic template).
    pub fn relay_config_for_sink(
        &self,
        mode: Mode,
        sink: &TestSink,
        extra_toml: &str,
    ) -> RelayConfig {
        let mut config = match sink.kind {
            SinkKind::Kafka => self.relay_config(&format!("{extra_toml}\n{}", sink.sink_toml())),
            _ => {
                let toml = format!(
                    "database_url = {:?}\n{extra_toml}\n{}",
                    self.url,
                    sink.sink_toml(),
                );
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("outbox.toml");
                std::fs::write(&path, toml).unwrap();
                Config::load_file_only(&path, &ConfigOverrides::default())
                    .unwrap()
                    .resolve()
                    .unwrap()
            }
        };
        config.mode = mode;
        config.http_listen = None;
        config
    }

    /// A sink of `kind` for this test: on Kafka, this database's topics.
    pub async fn sink(&self, kind: SinkKind) -> TestSink {
        TestSink::start(kind, self.prefix()).await
    }

    /// The same, ready for outages (see [`TestSink::for_outages`]).
    pub async fn sink_for_outages(&self, kind: SinkKind) -> TestSink {
        TestSink::for_outages(kind, self.prefix()).await
    }

    /// What this test's destinations are named after.
    fn prefix(&self) -> &str {
        self.template.trim_end_matches(".{aggregatetype}")
    }

    pub async fn write(&self, events: &[Event]) {
        let mut tx = self.pool.begin().await.unwrap();
        outbox::write_all(&mut *tx, events).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// Writes `event` and deletes its row in the same transaction, as writers that keep
    /// the table empty do (Debezium's pattern).
    pub async fn write_and_delete(&self, event: &Event) {
        let mut tx = self.pool.begin().await.unwrap();
        outbox::write(&mut *tx, event).await.unwrap();
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(event.id)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// (id, aggregateid, seq) of every row, in seq order.
    pub async fn rows(&self) -> Vec<(Uuid, String, i64)> {
        sqlx::query_as("SELECT id, aggregateid, seq FROM outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    pub async fn pending(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_lettered_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Waits until nothing is pending, at most `timeout`.
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.pending().await;
            if pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} events still pending after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        outbox_test_kit::database::drop(&self.name).await;
    }
}

/// An in-process relay; cancel `shutdown` and await `handle` to stop it.
pub struct InProcessRelay {
    pub metrics: outbox_relay::metrics::Metrics,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), outbox_relay::RelayError>>,
}

impl InProcessRelay {
    pub fn start(config: RelayConfig) -> InProcessRelay {
        // A failing test's output shows the relay's warnings (RUST_LOG=info: everything).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("warn,librdkafka=error,outbox_kafka::context=error")
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let shutdown = CancellationToken::new();
        let metrics = outbox_relay::metrics::Metrics::new();
        let handle = tokio::spawn(outbox_relay::engine::run_with_metrics(
            config,
            metrics.clone(),
            shutdown.clone(),
        ));
        InProcessRelay {
            metrics,
            shutdown,
            handle,
        }
    }

    /// Waits for a relay that is expected to stop on its own (an error), at most
    /// `timeout`; returns how it ended.
    pub async fn stopped_by_itself(
        self,
        timeout: Duration,
    ) -> Result<(), outbox_relay::RelayError> {
        tokio::time::timeout(timeout, self.handle)
            .await
            .expect("the relay stops by itself")
            .unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("relay stops within 60 s")
            .unwrap()
            .expect("relay ends cleanly");
    }
}

/// Runs a case once per mode: `mod NAME { polling, cdc }`.
#[macro_export]
macro_rules! for_each_mode {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn polling() {
                    super::$case(Mode::Polling).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cdc() {
                    super::$case(Mode::Cdc).await
                }
            }
        )*
    };
}

/// The audit every delivery test ends with: every committed event arrived, and each
/// aggregate's events arrived in commit order once repeated ids are dropped.
#[derive(Debug)]
pub struct Audit {
    pub committed: usize,
    pub received: usize,
    pub distinct: usize,
    pub duplicates: usize,
    pub missing: Vec<Uuid>,
    pub order_violations: Vec<String>,
}

pub fn audit(rows: &[(Uuid, String, i64)], received: &[Received]) -> Audit {
    // Within a partition the consumer sees offset order; one aggregate is one key, so
    // one partition. Keep the first sighting of each id.
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut duplicates = 0;
    let mut by_aggregate: HashMap<String, Vec<Uuid>> = HashMap::new();
    let mut ordered: Vec<&Received> = received.iter().collect();
    ordered
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    for message in ordered {
        let id = message.id();
        if !seen.insert(id) {
            duplicates += 1;
            continue;
        }
        by_aggregate
            .entry(message.key.clone())
            .or_default()
            .push(id);
    }
    let missing: Vec<Uuid> = rows
        .iter()
        .filter(|(id, _, _)| !seen.contains(id))
        .map(|(id, _, _)| *id)
        .collect();
    let mut expected: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for (id, aggregate, _) in rows {
        expected.entry(aggregate.as_str()).or_default().push(*id);
    }
    let mut order_violations = Vec::new();
    for (aggregate, want) in &expected {
        let got: Vec<Uuid> = by_aggregate
            .get(*aggregate)
            .map(|ids| ids.iter().filter(|id| want.contains(id)).copied().collect())
            .unwrap_or_default();
        let want_present: Vec<Uuid> = want
            .iter()
            .filter(|id| seen.contains(id))
            .copied()
            .collect();
        if got != want_present {
            order_violations.push(format!(
                "aggregate {aggregate}: expected {} events in commit order, got them in another order",
                want_present.len()
            ));
        }
    }
    Audit {
        committed: rows.len(),
        received: received.len(),
        distinct: seen.len(),
        duplicates,
        missing,
        order_violations,
    }
}

impl Audit {
    pub fn assert_complete_and_ordered(&self) {
        eprintln!(
            "audit: committed={} received={} distinct={} duplicates={} missing={} order_violations={}",
            self.committed,
            self.received,
            self.distinct,
            self.duplicates,
            self.missing.len(),
            self.order_violations.len()
        );
        assert!(
            self.missing.is_empty(),
            "{} committed events never arrived, first: {:?}",
            self.missing.len(),
            &self.missing[..self.missing.len().min(5)]
        );
        assert!(
            self.order_violations.is_empty(),
            "order violations: {:?}",
            &self.order_violations[..self.order_violations.len().min(5)]
        );
    }
}

/// The real `outbox` binary relaying `db`.
pub fn spawn_relay(db: &TestDb, log: &std::path::Path, extra_env: &[(&str, &str)]) -> Child {
    let mut command = relay_command(
        std::path::Path::new(env!("CARGO_BIN_EXE_outbox")),
        &db.url,
        &db.template,
        log,
    );
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command.spawn().expect("the outbox binary starts")
}

/// `binary relay` on `database_url`, publishing to the test Kafka under `template`,
/// without its HTTP server, its output appended to `log`.
pub fn relay_command(
    binary: &std::path::Path,
    database_url: &str,
    template: &str,
    log: &std::path::Path,
) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(binary);
    command
        .arg("relay")
        .env("OUTBOX_DATABASE_URL", database_url)
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_TOPICS__TEMPLATE", template)
        .env("OUTBOX_HTTP__LISTEN", "off")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    command
}

/// The `outbox relay` binary on this database, publishing to `sink` (its settings in a
/// config file in `dir`), its output appended to `dir/relay.log`.
pub fn spawn_relay_to(
    db: &TestDb,
    sink: &TestSink,
    dir: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> Child {
    let config = dir.join("outbox.toml");
    std::fs::write(&config, sink.sink_toml()).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("relay.log"))
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .arg("relay")
        .arg("--config")
        .arg(&config)
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env("OUTBOX_HTTP__LISTEN", "off")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if sink.kind == SinkKind::Kafka {
        command
            .env("OUTBOX_KAFKA_BROKERS", brokers())
            .env("OUTBOX_TOPICS__TEMPLATE", &db.template);
    } else {
        command.env_remove("OUTBOX_KAFKA_BROKERS");
    }
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command.spawn().expect("the outbox binary starts")
}

pub fn sigkill(child: &mut Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

pub fn sigterm(child: &Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// The value of `--mode` / OUTBOX_MODE for `mode`.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Polling => "polling",
        Mode::Cdc => "cdc",
    }
}

/// Runs `scripts/services ARGS...` and asserts it succeeded.
pub fn services(args: &[&str]) {
    let status = Command::new(repo_root().join("scripts/services"))
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/services {args:?} failed");
}

/// Writes `count` events of about 900 KiB (type `order`, ten aggregates), one per
/// transaction; returns their ids in the order written.
pub async fn write_large_events(db: &TestDb, count: usize) -> Vec<Uuid> {
    let pad = "x".repeat(900 * 1024);
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let big = Event::new(
            "order",
            (n % 10).to_string(),
            "Big",
            serde_json::json!({ "n": n, "pad": pad }),
        );
        ids.push(big.id);
        db.write(std::slice::from_ref(&big)).await;
    }
    ids
}

/// An `OrderCreated`-like event with a JSON payload carrying its sequence number.
pub fn event(aggregate_type: &str, aggregate_id: &str, n: usize) -> Event {
    Event::new(
        aggregate_type,
        aggregate_id,
        "Tested",
        serde_json::json!({ "n": n, "aggregate": aggregate_id }),
    )
}

/// Runs the `outbox` binary on `db` and returns its standard output.
pub fn cli(db: &TestDb, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env_remove("OUTBOX_KAFKA_BROKERS")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "outbox {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Drops a role a test created (after its database is gone).
pub async fn drop_role(role: &str) {
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "DROP OWNED BY {role}; DROP ROLE IF EXISTS {role};"
    ))))
    .execute(&mut admin)
    .await
    .unwrap();
}

/// Waits until `id` is a dead letter; returns its attempts and reason.
pub async fn dead_letter(db: &TestDb, id: Uuid) -> (i32, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let row: Option<(i32, String)> = sqlx::query_as(
            "SELECT attempts, last_error FROM outbox WHERE id = $1 AND dead_lettered_at IS NOT NULL",
        )
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(row) = row {
            return row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP GET of the relay's endpoint: the whole response, status line included.
pub async fn http_get(port: u16, path: &str) -> String {
    http_request(port, "GET", path, "").await
}

/// A plain HTTP request with `headers` (each line ending in `\r\n`) and no body: the
/// whole response, status line included.
pub async fn http_request(port: u16, method: &str, path: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Peak resident memory (VmHWM) of a process, MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A role that may connect, replicate and read, with the grants the README lists for a
/// CDC relay; returns its name and URL.
pub async fn cdc_relay_role(db: &TestDb) -> (String, String) {
    role_with_grants(
        db,
        "LOGIN REPLICATION",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO {role};
         GRANT SELECT ON outbox_migrations TO {role};
         GRANT SELECT, INSERT, UPDATE ON outbox_cdc_checkpoint TO {role};
         GRANT SELECT ON outbox_writer_deletes TO {role};",
    )
    .await
}

/// A role with the grants the README lists for a polling relay; returns its name and URL.
pub async fn polling_relay_role(db: &TestDb) -> (String, String) {
    role_with_grants(
        db,
        "LOGIN",
        "GRANT SELECT, UPDATE, DELETE ON outbox TO {role};
         GRANT SELECT ON outbox_migrations TO {role};",
    )
    .await
}

/// Creates `relay_<db>` with `attributes` and password `relay-pw`, runs `grants` (with
/// `{role}` standing for its name), and returns its name and URL.
pub async fn role_with_grants(db: &TestDb, attributes: &str, grants: &str) -> (String, String) {
    let role = format!("relay_{}", &db.name[12..]);
    let sql = format!(
        "CREATE ROLE {role} {attributes} PASSWORD 'relay-pw'; {}",
        grants.replace("{role}", &role)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some("relay-pw")).unwrap();
    (role, url.to_string())
}

/// The secured endpoints `scripts/services start` runs beside the plain ones: PostgreSQL
/// over TLS for the TLS-only role `outbox_tls`, Kafka's SASL_SSL listener.
pub struct Secured {
    /// `.services/tls`: the CA, certificates and passwords.
    pub tls_dir: PathBuf,
    /// OUTBOX_TLS_DATABASE_URL: verify-full, sslrootcert, the TLS-only role.
    pub tls_url: String,
    /// OUTBOX_SASL_KAFKA_BROKERS.
    pub sasl_brokers: String,
    /// OUTBOX_SASL_KAFKA_CONFIG: the `[kafka.properties]` of the SASL_SSL listener.
    pub sasl_config: PathBuf,
}

impl Secured {
    pub fn from_env() -> Secured {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set; run the tests with scripts/test (or eval \"$(scripts/services env)\")")
            })
        };
        Secured {
            tls_dir: var("OUTBOX_SERVICES_TLS_DIR").into(),
            tls_url: var("OUTBOX_TLS_DATABASE_URL"),
            sasl_brokers: var("OUTBOX_SASL_KAFKA_BROKERS"),
            sasl_config: var("OUTBOX_SASL_KAFKA_CONFIG").into(),
        }
    }

    /// OUTBOX_TLS_DATABASE_URL with another database.
    pub fn tls_url_for(&self, database: &str) -> String {
        let mut url = url::Url::parse(&self.tls_url).unwrap();
        url.set_path(database);
        url.to_string()
    }

    /// A file of `.services/tls`.
    pub fn file(&self, name: &str) -> String {
        self.tls_dir.join(name).display().to_string()
    }

    /// A password `scripts/services` generated (`kafka-outbox`, `pg-outbox_tls`...).
    pub fn password(&self, name: &str) -> String {
        std::fs::read_to_string(self.tls_dir.join(format!("{name}.password")))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The SASL_SSL listener's properties, as the relay reads them from the config file.
    pub fn sasl_properties(&self) -> std::collections::BTreeMap<String, String> {
        let overrides = ConfigOverrides {
            database_url: Some("postgres://unused@localhost/unused".into()),
            kafka_brokers: Some(self.sasl_brokers.clone()),
            ..ConfigOverrides::default()
        };
        Config::load_file_only(&self.sasl_config, &overrides)
            .unwrap()
            .resolve()
            .unwrap()
            .kafka()
            .expect("a Kafka sink")
            .properties
            .clone()
    }
}

impl TestDb {
    /// A migrated database owned by the TLS-only role, migrated by `outbox migrate` over
    /// TLS (with `--cdc` in CDC mode), so that role may do everything a relay does.
    pub async fn owned_by_tls_role(secured: &Secured, mode: Mode) -> TestDb {
        let db = TestDb::unmigrated().await;
        sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "ALTER DATABASE {} OWNER TO outbox_tls",
            db.name
        ))))
        .execute(&db.pool)
        .await
        .unwrap();
        let mut args = vec!["migrate"];
        if mode == Mode::Cdc {
            args.push("--cdc");
        }
        let run = run_cli(
            &args,
            &[("OUTBOX_DATABASE_URL", &secured.tls_url_for(&db.name))],
        );
        assert_eq!(run.code, Some(0), "outbox migrate over TLS: {}", run.stderr);
        db
    }
}

/// What one run of the `outbox` binary printed, and how it ended.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CliRun {
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `outbox ARGS` with `env` on top of a clean OUTBOX_* environment (at most 120 s).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_") {
            command.env_remove(key);
        }
    }
    command.env("OUTBOX_HTTP__LISTEN", "off");
    for (key, value) in env {
        command.env(key, value);
    }
    let started = Instant::now();
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    });
    let output = child.wait_with_output().unwrap();
    let _ = watchdog.join();
    CliRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// A child process that is killed (SIGKILL) when dropped, so that a failing test leaves
/// no relay running behind it.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            sigkill(&mut self.0);
        }
    }
}

/// Everything logged through `tracing` on this thread while the guard lives, at every
/// level, as a library user's `tracing_subscriber::fmt()` would print it. Use in a
/// current-thread test so that the tasks that log run on this thread.
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn start() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Inserts one event with plain SQL (as a writer in any language would) into `table`,
/// with `headers` as jsonb text, on a pool or in a transaction.
pub async fn insert_raw<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    table: &TableRef,
    aggregate_id: &str,
    headers: Option<&str>,
) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
        "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload, headers)
         VALUES ($1, 'order', $2, 'Tested', '{{\"n\": 1}}', $3::jsonb)",
        table.qualified()
    ))))
    .bind(id)
    .bind(aggregate_id)
    .bind(headers)
    .execute(executor)
    .await
    .unwrap();
    id
}

/// Creates a Kafka topic of three partitions.
pub async fn create_topic(topic: &str) {
    create_topic_with(topic, &[]).await
}

/// Creates a Kafka topic of three partitions with topic-level `config`.
pub async fn create_topic_with(topic: &str, config: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[config.iter().fold(
                NewTopic::new(topic, 3, TopicReplication::Fixed(1)),
                |topic, (key, value)| topic.set(key, value),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    results[0].as_ref().unwrap();
}
