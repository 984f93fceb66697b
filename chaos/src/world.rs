//! One scenario's world: its own database and topics, the relays (each reaching
//! PostgreSQL and Kafka through its own fault proxies), the writers and an independent
//! consumer that reads Kafka directly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::score::{Arrival, CommitTime, CommittedRow};
use crate::Mode;
use outbox_test_kit::toxiproxy::Toxiproxy;

/// The aggregate types the writers use; each is a topic.
pub const AGGREGATE_TYPES: [&str; 2] = ["order", "user"];
const PARTITIONS: i32 = 3;
/// Kafka's listener behind the proxy: it advertises the proxy's port, so that every
/// connection of a client that bootstraps there stays behind the proxy.
const KAFKA_PROXIED: &str = "127.0.0.1:9097";
const KAFKA_PROXY_LISTEN: &str = "127.0.0.1:19097";
/// The relays' own PostgreSQL proxies listen from here on (one per relay).
const PG_PROXY_BASE_PORT: u16 = 25432;
const HTTP_BASE_PORT: u16 = 19464;

/// What every scenario gets from the command line and the services' environment.
#[derive(Clone)]
pub struct Env {
    pub admin_url: String,
    pub pg_address: String,
    pub brokers: String,
    pub outbox_bin: PathBuf,
    pub services_script: PathBuf,
    pub log_dir: PathBuf,
    /// The relays' `kafka.message_timeout`.
    pub message_timeout: Duration,
    /// More environment for every relay (`--relay-env`), such as
    /// `OUTBOX_KAFKA__TRANSACTIONS=false`.
    pub relay_env: Vec<(String, String)>,
    pub toxiproxy: Toxiproxy,
}

pub struct World {
    pub env: Env,
    pub name: String,
    pub mode: Mode,
    pub db_url: String,
    pub pool: PgPool,
    pub template: String,
    pub started: Instant,
    pub relays: Vec<Relay>,
    consumer: Option<ConsumerHandle>,
    /// The `inbox` scenario's consumers (processes) and their database.
    pub inbox: Option<InboxWorld>,
    /// The failover scenario's standby.
    pub standby: Option<crate::standby::Standby>,
    /// Whether the writers, the truth and `verify` reach PostgreSQL through the `vip`
    /// proxy (switched to the promoted standby in the failover scenario).
    through_vip: bool,
    /// The scenario's own relay settings (environment), after the defaults.
    pub relay_env: Vec<(String, String)>,
    /// More settings for relay 0 only (the one active first).
    pub first_relay_env: Vec<(String, String)>,
    /// Relays reach PostgreSQL straight, not through their proxies (the black-hole
    /// scenario: a proxy would answer the server's keepalive probes itself).
    pub direct_database: bool,
    /// The relay that runs as the black hole's user, `(index, uid, gid)`.
    pub relay_user: Option<(usize, u32, u32)>,
}

/// The proxy that stands for the database's DNS name or virtual IP.
const VIP_LISTEN: &str = "127.0.0.1:25499";

/// The consumers of the `inbox` scenario: one group, each a process of its own.
pub struct InboxWorld {
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub group: String,
    pub consumers: Vec<Option<Child>>,
}

/// What the inbox consumers applied: (event id, times applied), and order violations.
pub struct Applied {
    pub counts: Vec<(Uuid, i64)>,
    pub order_violations: i64,
}

/// A relay process with its proxies and HTTP port.
pub struct Relay {
    pub index: usize,
    pub child: Option<Child>,
    pub pg_proxy: String,
    pub http_port: u16,
    log: PathBuf,
}

impl World {
    /// A fresh database (migrated for `mode`), its topics, and the Kafka proxy.
    pub async fn create(env: &Env, scenario: &str, mode: Mode, through_vip: bool) -> Result<World> {
        let name = format!("chaos_{}_{}", scenario.replace('-', "_"), mode.name());
        let mut admin = PgConnection::connect(&env.admin_url).await?;
        drop_database(&mut admin, &name).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        let mut db_url = with_database(&env.admin_url, &name)?;
        if through_vip {
            env.toxiproxy
                .proxy("vip", VIP_LISTEN, &env.pg_address)
                .await?;
            let mut url = url::Url::parse(&db_url)?;
            url.set_port(Some(25499)).expect("a URL with a host");
            db_url = url.to_string();
        }
        let mut migrate = Command::new(&env.outbox_bin);
        migrate
            .arg("migrate")
            .env("OUTBOX_DATABASE_URL", &db_url)
            .stdout(Stdio::null());
        if mode == Mode::Cdc {
            migrate.arg("--cdc");
        }
        if !migrate.status()?.success() {
            bail!("outbox migrate failed on {name}");
        }
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&db_url)
            .await?;
        let unique = &Uuid::now_v7().simple().to_string()[20..];
        let prefix = format!("chaos-{scenario}-{}-{unique}", mode.name());
        let template = format!("{prefix}.{{aggregatetype}}");
        create_topics(&env.brokers, &template).await?;
        env.toxiproxy
            .proxy("kafka", KAFKA_PROXY_LISTEN, KAFKA_PROXIED)
            .await?;
        std::fs::create_dir_all(&env.log_dir)?;
        Ok(World {
            env: env.clone(),
            name,
            mode,
            db_url,
            pool,
            template,
            started: Instant::now(),
            relays: Vec::new(),
            consumer: None,
            inbox: None,
            standby: None,
            through_vip,
            relay_env: Vec::new(),
            first_relay_env: Vec::new(),
            direct_database: false,
            relay_user: None,
        })
    }

    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn topics(&self) -> Vec<String> {
        AGGREGATE_TYPES
            .iter()
            .map(|t| self.template.replace("{aggregatetype}", t))
            .collect()
    }

    /// Starts relay number `index` (0 is started first and becomes the active one),
    /// through its own PostgreSQL proxy and the shared Kafka proxy.
    pub async fn start_relay(&mut self, index: usize) -> Result<()> {
        let pg_proxy = format!("pg{index}");
        let port = PG_PROXY_BASE_PORT + index as u16;
        if self.relays.iter().all(|r| r.index != index) && !self.direct_database {
            self.env
                .toxiproxy
                .proxy(
                    &pg_proxy,
                    &format!("127.0.0.1:{port}"),
                    &self.env.pg_address,
                )
                .await?;
        }
        let database_url = if self.direct_database {
            self.db_url.clone()
        } else {
            let mut url = url::Url::parse(&self.db_url)?;
            url.set_port(Some(port)).expect("a URL with a host");
            url.to_string()
        };
        let http_port = HTTP_BASE_PORT + index as u16;
        let log = self
            .env
            .log_dir
            .join(format!("{}-relay{index}.log", self.name));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = Command::new(&self.env.outbox_bin);
        if let Some((_, uid, gid)) = self.relay_user.filter(|(i, _, _)| *i == index) {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        let child = command
            .arg("relay")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("OUTBOX_DATABASE_URL", database_url)
            .env("OUTBOX_KAFKA_BROKERS", KAFKA_PROXY_LISTEN)
            .env("OUTBOX_MODE", self.mode.name())
            .env("OUTBOX_TOPICS__TEMPLATE", &self.template)
            .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
            .env(
                "OUTBOX_KAFKA__MESSAGE_TIMEOUT",
                format!("{}ms", self.env.message_timeout.as_millis()),
            )
            .env("RUST_LOG", "info")
            .envs(self.relay_env.iter().cloned())
            .envs(self.first_relay_env.iter().filter(|_| index == 0).cloned())
            .envs(self.env.relay_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting the outbox relay")?;
        match self.relays.iter_mut().find(|r| r.index == index) {
            Some(relay) => relay.child = Some(child),
            None => self.relays.push(Relay {
                index,
                child: Some(child),
                pg_proxy,
                http_port,
                log,
            }),
        }
        Ok(())
    }

    pub fn relay(&mut self, index: usize) -> &mut Relay {
        self.relays
            .iter_mut()
            .find(|r| r.index == index)
            .expect("a started relay")
    }

    /// Waits until relay `index` reports itself active (`outbox_relay_active 1`).
    pub async fn wait_active(&self, index: usize, timeout: Duration) -> Result<Duration> {
        let relay = self
            .relays
            .iter()
            .find(|r| r.index == index)
            .expect("a started relay");
        let started = Instant::now();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        while started.elapsed() < timeout {
            let url = format!("http://127.0.0.1:{}/metrics", relay.http_port);
            if let Ok(response) = http.get(&url).send().await {
                if let Ok(text) = response.text().await {
                    if text.lines().any(|l| l == "outbox_relay_active 1") {
                        return Ok(started.elapsed());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "relay {index} did not become active within {timeout:?}; see {}",
            relay.log.display()
        )
    }

    /// Starts the independent consumer: every partition of the scenario's topics from
    /// the beginning, straight from the broker (not through the proxy).
    pub fn start_consumer(&mut self) -> Result<()> {
        self.consumer = Some(ConsumerHandle::start(
            &self.env.brokers,
            self.topics(),
            self.started,
        )?);
        Ok(())
    }

    /// How many distinct committed events the consumer has read so far.
    pub fn consumed_ids(&self) -> std::collections::HashSet<Uuid> {
        self.consumer
            .as_ref()
            .map(|c| c.arrivals.lock().unwrap().iter().map(|a| a.id).collect())
            .unwrap_or_default()
    }

    /// Stops the consumer and returns everything it read.
    pub fn stop_consumer(&mut self) -> Result<Vec<Arrival>> {
        match self.consumer.take() {
            Some(consumer) => consumer.stop(),
            None => Ok(Vec::new()),
        }
    }

    /// Every message of the scenario's topics, read afresh from the beginning up to each
    /// partition's high watermark (at most 120 s). The record is scored on this read, in
    /// partition order; the live consumer only times arrivals (for `recover_s`), so a
    /// consumer that stalls after a broker fault cannot pass for a loss.
    pub fn read_topics(&self) -> Result<Vec<Arrival>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.env.brokers)
            .set("group.id", format!("chaos-read-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        // (Read committed, librdkafka's default: what consumers of a transactional
        // relay see.)
        let mut remaining = std::collections::HashMap::new();
        for topic in self.topics() {
            for partition in 0..PARTITIONS {
                let (low, high) =
                    consumer.fetch_watermarks(&topic, partition, Duration::from_secs(30))?;
                if high > low {
                    remaining.insert((topic.clone(), partition), high);
                }
                assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let mut messages = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !remaining.is_empty() {
            if Instant::now() > deadline {
                bail!("the topics could not be read to their end within 120 s");
            }
            let Some(result) = consumer.poll(Duration::from_millis(200)) else {
                // Nothing new: the position may have passed offsets that hold no message
                // (transaction markers) up to the end.
                for ((topic, partition), offset) in consumer.position()?.to_topic_map() {
                    if let (Some(&high), Offset::Offset(at)) =
                        (remaining.get(&(topic.clone(), partition)), offset)
                    {
                        if at >= high {
                            remaining.remove(&(topic, partition));
                        }
                    }
                }
                continue;
            };
            let Ok(message) = result else { continue };
            let key = (message.topic().to_string(), message.partition());
            if let Some(&high) = remaining.get(&key) {
                if message.offset() + 1 >= high {
                    remaining.remove(&key);
                }
            }
            messages.push(decode(&message, Duration::ZERO)?);
        }
        Ok(messages)
    }

    /// Every row the database holds: the truth the record is scored against.
    pub async fn committed_rows(&self) -> Result<Vec<CommittedRow>> {
        let rows = sqlx::query("SELECT id, dead_lettered_at IS NOT NULL AS dead FROM outbox")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(CommittedRow {
                    id: row.try_get("id")?,
                    dead_lettered: row.try_get("dead")?,
                })
            })
            .collect()
    }

    /// `outbox verify` on the scenario's table and topics (straight, not proxied):
    /// true when it passed.
    pub fn verify(&self) -> Result<bool> {
        let output = Command::new(&self.env.outbox_bin)
            .args(["verify", "--mode", self.mode.name(), "--grace", "5s"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("OUTBOX_DATABASE_URL", &self.db_url)
            .env("OUTBOX_KAFKA_BROKERS", &self.env.brokers)
            .env("OUTBOX_TOPICS__TEMPLATE", &self.template)
            .output()?;
        let log = self.env.log_dir.join(format!("{}-verify.log", self.name));
        std::fs::write(&log, [&output.stdout[..], &output.stderr[..]].concat())?;
        Ok(output.status.success())
    }

    /// Points the `vip` proxy and every relay's PostgreSQL proxy at `upstream`.
    pub async fn switch_database(&self, upstream: &str) -> Result<()> {
        if self.through_vip {
            self.env.toxiproxy.set_upstream("vip", upstream).await?;
        }
        for relay in &self.relays {
            self.env
                .toxiproxy
                .set_upstream(&relay.pg_proxy, upstream)
                .await?;
        }
        Ok(())
    }

    /// Creates the inbox consumers' database (the consumers create their tables).
    pub async fn create_inbox_database(&mut self) -> Result<()> {
        let db_name = format!("{}_inbox", self.name);
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        drop_database(&mut admin, &db_name).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&mut admin)
            .await?;
        let db_url = with_database(&self.env.admin_url, &db_name)?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db_url)
            .await?;
        self.inbox = Some(InboxWorld {
            db_name,
            db_url,
            pool,
            group: format!("chaos-inbox-{}", Uuid::new_v4().simple()),
            consumers: Vec::new(),
        });
        Ok(())
    }

    /// Starts inbox consumer `index` (a process; straight to PostgreSQL and Kafka).
    pub fn start_inbox_consumer(&mut self, index: usize) -> Result<()> {
        let topics = self.topics().join(",");
        let log = self
            .env
            .log_dir
            .join(format!("{}-inbox{index}.log", self.name));
        let inbox = self.inbox.as_mut().expect("create_inbox_database first");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let binary = std::env::current_exe()?.with_file_name("chaos-inbox-consumer");
        let child = Command::new(binary)
            .args(["--database-url", &inbox.db_url])
            .args(["--brokers", &self.env.brokers])
            .args(["--group", &inbox.group])
            .args(["--topics", &topics])
            .env("RUST_LOG", "info")
            .envs(self.relay_env.iter().chain(&self.env.relay_env).cloned())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting chaos-inbox-consumer")?;
        if inbox.consumers.len() <= index {
            inbox.consumers.resize_with(index + 1, || None);
        }
        inbox.consumers[index] = Some(child);
        Ok(())
    }

    /// Stops inbox consumer `index`: SIGKILL when `kill`, else SIGTERM (it leaves the
    /// group and commits what it finished).
    pub fn stop_inbox_consumer(&mut self, index: usize, kill: bool) {
        let Some(inbox) = self.inbox.as_mut() else {
            return;
        };
        if let Some(mut child) = inbox.consumers.get_mut(index).and_then(Option::take) {
            if kill {
                let _ = child.kill();
                let _ = child.wait();
            } else {
                stop_child(&mut child, Duration::from_secs(20));
            }
        }
    }

    /// What the inbox consumers applied so far.
    pub async fn applied(&self) -> Result<Applied> {
        let inbox = self.inbox.as_ref().expect("create_inbox_database first");
        let counts: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT event_id, count(*) FROM effects GROUP BY event_id")
                .fetch_all(&inbox.pool)
                .await?;
        let order_violations: i64 = sqlx::query_scalar("SELECT count(*) FROM order_violations")
            .fetch_one(&inbox.pool)
            .await?;
        Ok(Applied {
            counts,
            order_violations,
        })
    }

    /// Stops the relays (SIGTERM, then SIGKILL after 15 s), the consumer, the proxies,
    /// and drops the database and its slot; deletes the topics unless `keep_topics`
    /// (their names are unique per run).
    pub async fn tear_down(mut self, keep_topics: bool) -> Result<()> {
        for relay in &mut self.relays {
            relay.stop(Duration::from_secs(15));
            let _ = self.env.toxiproxy.delete(&relay.pg_proxy).await;
        }
        let _ = self.stop_consumer();
        let _ = self.env.toxiproxy.delete("kafka").await;
        let _ = self.env.toxiproxy.delete("vip").await;
        self.pool.close().await;
        if let Some(standby) = self.standby.take() {
            standby.remove(&self.env.services_script).await?;
        }
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        if let Some(mut inbox) = self.inbox.take() {
            for child in inbox.consumers.iter_mut().filter_map(Option::take) {
                let mut child = child;
                stop_child(&mut child, Duration::from_secs(20));
            }
            inbox.pool.close().await;
            drop_database(&mut admin, &inbox.db_name).await?;
        }
        if !keep_topics {
            delete_topics(&self.env.brokers, &self.topics()).await?;
        }
        drop_database(&mut admin, &self.name).await
    }
}

impl Relay {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL once `grace` has passed.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, grace);
        }
    }

    /// The relay has exited on its own (it should not, in any scenario).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// SIGTERM, then SIGKILL once `grace` has passed.
fn stop_child(child: &mut Child, grace: Duration) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct ConsumerHandle {
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl ConsumerHandle {
    fn start(brokers: &str, topics: Vec<String>, started: Instant) -> Result<ConsumerHandle> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("chaos-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        // (Read committed, librdkafka's default: what consumers of a transactional
        // relay see.)
        for topic in &topics {
            for partition in 0..PARTITIONS {
                assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = stop.clone();
            let arrivals = arrivals.clone();
            std::thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let Some(result) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    // Transient errors (a broker restart) are the scenario, not ours.
                    let Ok(message) = result else { continue };
                    let arrival = decode(&message, started.elapsed())?;
                    arrivals.lock().unwrap().push(arrival);
                }
                Ok(())
            })
        };
        Ok(ConsumerHandle {
            stop,
            arrivals,
            thread,
        })
    }

    fn stop(self) -> Result<Vec<Arrival>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(result) => result?,
            Err(_) => bail!("the consumer thread panicked"),
        }
        Ok(std::mem::take(&mut *self.arrivals.lock().unwrap()))
    }
}

fn decode(message: &rdkafka::message::BorrowedMessage<'_>, at: Duration) -> Result<Arrival> {
    let id = message
        .headers()
        .and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == "id")
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| Uuid::parse_str(v).ok())
        })
        .context("a message without an id header")?;
    let aggregate = message
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default();
    let payload: serde_json::Value =
        serde_json::from_slice(message.payload().unwrap_or_default()).unwrap_or_default();
    Ok(Arrival {
        id,
        aggregate,
        n: payload["n"].as_i64().unwrap_or(-1),
        topic: message.topic().to_string(),
        partition: message.partition(),
        offset: message.offset(),
        produced_ms: message.timestamp().to_millis().unwrap_or(0),
        at,
    })
}

async fn create_topics(brokers: &str, template: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let names: Vec<String> = AGGREGATE_TYPES
        .iter()
        .map(|t| template.replace("{aggregatetype}", t))
        .collect();
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|name| NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((topic, code)) = result {
            bail!("creating topic {topic}: {code}");
        }
    }
    Ok(())
}

async fn delete_topics(brokers: &str, topics: &[String]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    for result in admin.delete_topics(&names, &AdminOptions::new()).await? {
        if let Err((topic, code)) = result {
            bail!("deleting topic {topic}: {code}");
        }
    }
    Ok(())
}

async fn drop_database(admin: &mut PgConnection, name: &str) -> Result<()> {
    // A slot keeps its database: end the sessions that use it, then drop it.
    for _ in 0..50 {
        sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE database = $1 AND active_pid IS NOT NULL",
        )
        .bind(name)
        .execute(&mut *admin)
        .await?;
        let _ = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE database = $1 AND NOT active",
        )
        .bind(name)
        .execute(&mut *admin)
        .await;
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
                .bind(name)
                .fetch_one(&mut *admin)
                .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut *admin)
    .await?;
    Ok(())
}

fn with_database(admin_url: &str, name: &str) -> Result<String> {
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(name);
    Ok(url.to_string())
}

/// The writers' record: what they committed for certain, and when (rolled-back events
/// need no record: the database's rows are the truth, so one that is published counts
/// as a phantom).
#[derive(Default)]
pub struct WriterLog {
    pub commits: Vec<CommitTime>,
    /// Commits whose outcome is unknown (the connection broke during COMMIT): the
    /// database's rows at the end decide.
    pub uncertain: u64,
}

pub type SharedLog = Arc<Mutex<WriterLog>>;
