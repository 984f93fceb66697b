//! Configuration: defaults, then the TOML file (`--config`), then `OUTBOX_*` environment
//! variables (nested keys with `__`: `OUTBOX_DELIVERY__MAX_ATTEMPTS=5`), then flags.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use outbox_core::{DeadLetterPolicy, RetryPolicy, Router, TableRef, TopicTemplate};
use outbox_kafka::{KafkaSettings, TopicSettings};
pub use outbox_postgres::DatabaseUrl;
use outbox_postgres::OnPublish;
use serde::{Deserialize, Serialize};

use crate::sinks::{SinkSection, SinkSettings};
use crate::RelayError;

/// The configuration as written by the user (file, environment, flags).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL URL, such as `postgres://outbox@127.0.0.1:5432/app`.
    pub database_url: Option<DatabaseUrl>,
    /// A file holding the URL instead (a mounted secret), so the password stays out
    /// of the configuration and the environment.
    pub database_url_file: Option<std::path::PathBuf>,
    /// Kafka bootstrap servers, such as `127.0.0.1:9092`.
    pub kafka_brokers: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub table: TableSection,
    #[serde(default)]
    pub polling: PollingSection,
    #[serde(default)]
    pub delivery: DeliverySection,
    /// The broker: `type` and that sink's settings (Kafka's are `kafka_brokers`,
    /// `[kafka]` and `[topics]`).
    #[serde(default)]
    pub sink: SinkSection,
    pub topics: Option<TopicsSection>,
    pub kafka: Option<KafkaSection>,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub cdc: CdcSection,
    #[serde(default)]
    pub postgres: PostgresSection,
}

/// How the relay's connections to PostgreSQL notice a dead peer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSection {
    /// The longest a connection attempt may take (and a wait for a pooled connection).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TCP keepalive of the server's end of each connection: after this much silence
    /// the server probes the relay...
    #[serde(with = "humantime_serde")]
    pub keepalive_idle: Duration,
    /// ...every `keepalive_interval`...
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// ...and ends the session (freeing the leadership lock) after this many unanswered
    /// probes.
    pub keepalive_count: u32,
}

impl Default for PostgresSection {
    fn default() -> Self {
        PostgresSection {
            connect_timeout: Duration::from_secs(10),
            keepalive_idle: Duration::from_secs(15),
            keepalive_interval: Duration::from_secs(5),
            keepalive_count: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdcSection {
    /// How often an idle CDC relay writes a heartbeat into the WAL so the slot's
    /// confirmed position keeps moving when the outbox is quiet.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A batch read from the stream is published once its events add up to this many
    /// bytes (payload and headers), even before `polling.batch_size` events: with large
    /// events, memory stays bounded by bytes, during a broker outage too.
    pub max_batch_bytes: u64,
    /// With synchronous standbys configured on the server, a batch is published only
    /// once they have flushed its transactions, so a failover to one of them cannot
    /// lose what the broker already has (PostgreSQL's logical walsender does not wait
    /// for them before version 17's `synchronized_standby_slots`).
    pub wait_for_synchronous_standbys: bool,
}

impl Default for CdcSection {
    fn default() -> Self {
        CdcSection {
            heartbeat: Duration::from_secs(10),
            max_batch_bytes: 8 * 1024 * 1024,
            wait_for_synchronous_standbys: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Polling,
    Cdc,
}

impl std::str::FromStr for Mode {
    type Err = String;

    /// `polling` or `cdc`, as `--mode` and `mode` take it.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "polling" => Ok(Mode::Polling),
            "cdc" => Ok(Mode::Cdc),
            other => Err(format!("{other:?} is not a mode; use polling or cdc")),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableSection {
    pub schema: String,
    pub name: String,
}

impl Default for TableSection {
    fn default() -> Self {
        let table = TableRef::default();
        TableSection {
            schema: table.schema,
            name: table.name,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollingSection {
    /// Rows fetched and published per batch.
    pub batch_size: u32,
    /// Fallback poll interval when no insert notification arrives.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A fetch ends once its rows add up to this many bytes (payload and headers), even
    /// before `batch_size` rows: with large events, memory stays bounded by bytes.
    pub max_batch_bytes: u64,
}

impl Default for PollingSection {
    fn default() -> Self {
        PollingSection {
            batch_size: 1000,
            interval: Duration::from_secs(1),
            max_batch_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// `mark` (set published_at, purge after `retention`) or `delete`.
    pub on_publish: OnPublish,
    /// How long published rows are kept when `on_publish = "mark"`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// `park` (a dead letter holds its aggregate's later events back until it is retried
    /// or skipped) or `skip`.
    pub on_dead_letter: DeadLetterPolicy,
    /// Attempts before an event is dead-lettered.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for DeliverySection {
    fn default() -> Self {
        let retry = RetryPolicy::default();
        DeliverySection {
            on_publish: OnPublish::Mark,
            retention: Duration::from_secs(7 * 24 * 3600),
            on_dead_letter: DeadLetterPolicy::Park,
            max_attempts: retry.max_attempts,
            initial_backoff: retry.initial_backoff,
            max_backoff: retry.max_backoff,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsSection {
    /// Topic name; `{aggregatetype}` is replaced by the event's aggregate type.
    pub template: String,
    /// Create missing topics through the admin API.
    pub create: bool,
    pub partitions: i32,
    pub replication_factor: i32,
}

impl Default for TopicsSection {
    fn default() -> Self {
        let topics = TopicSettings::default();
        TopicsSection {
            template: TopicTemplate::DEFAULT.into(),
            create: topics.create,
            partitions: topics.partitions,
            replication_factor: topics.replication_factor,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    pub batch_bytes: u32,
    #[serde(with = "humantime_serde")]
    pub message_timeout: Duration,
    pub compression: String,
    /// Extra librdkafka properties (security, SASL, TLS...). A value is a string, or
    /// `{ file = "/run/secrets/x" }` / `{ env = "VAR" }` to read a secret from a file or
    /// an environment variable instead of the configuration.
    pub properties: BTreeMap<String, PropertyValue>,
    /// Publish each batch in a Kafka transaction, which fences a relay that lost its
    /// leadership (ARCHITECTURE.md, "Fencing"). Off only for brokers without
    /// transactions.
    pub transactions: bool,
    /// The transactional id; the same for every relay of one outbox table, different
    /// between tables. Default: `outbox-relay/<database>/<schema>.<table>`.
    pub transactional_id: Option<String>,
}

/// The `[kafka.properties]` of a relay configuration file, their values read from files
/// and the environment where they say so: for programs beside the relay (the demo, the
/// benchmark) that connect to the same brokers.
pub fn kafka_properties_from_file(path: &Path) -> Result<BTreeMap<String, String>, RelayError> {
    let properties: Option<BTreeMap<String, PropertyValue>> = Figment::new()
        .merge(Toml::file_exact(path))
        .extract_inner::<BTreeMap<String, PropertyValue>>("kafka.properties")
        .map(Some)
        .or_else(|err| match err.kind {
            figment::error::Kind::MissingField(_) => Ok(None),
            _ => Err(RelayError::Config(describe(err, Some(path)))),
        })?;
    properties
        .unwrap_or_default()
        .into_iter()
        .map(|(name, value)| {
            value
                .resolve(&format!("kafka.properties.\"{name}\""))
                .map(|value| (name, value))
        })
        .collect()
}

/// A secret-bearing value (`kafka.properties`, `sink.password`, `sink.secret`): given as
/// is, or read from a file or the environment.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    File { file: std::path::PathBuf },
    Env { env: String },
}

impl PropertyValue {
    /// The value; `key` names the setting in errors.
    pub(crate) fn resolve(self, key: &str) -> Result<String, RelayError> {
        match self {
            PropertyValue::Text(text) => Ok(text),
            PropertyValue::File { file } => std::fs::read_to_string(&file)
                .map(|text| text.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|err| {
                    RelayError::Config(format!(
                        "{key} is read from {}: {err}; point `file` at a readable file",
                        file.display()
                    ))
                }),
            PropertyValue::Env { env } => std::env::var(&env).map_err(|_| {
                RelayError::Config(format!(
                    "{key} is read from the environment variable {env}, which is not set; set it or change `env`"
                ))
            }),
        }
    }
}

/// Only where the value comes from, never the value.
impl fmt::Debug for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Text(_) => f.write_str("Text(<hidden>)"),
            PropertyValue::File { file } => write!(f, "File({})", file.display()),
            PropertyValue::Env { env } => write!(f, "Env({env})"),
        }
    }
}

impl Default for KafkaSection {
    fn default() -> Self {
        let kafka = KafkaSettings::default();
        KafkaSection {
            linger: kafka.linger,
            batch_bytes: kafka.batch_bytes,
            message_timeout: kafka.message_timeout,
            compression: kafka.compression,
            properties: BTreeMap::new(),
            transactions: true,
            transactional_id: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Address of `/metrics` and `/healthz`, or `off`. Port 0 picks a free port.
    pub listen: String,
    /// Serve the status page at `/status` on the same address. Off by default: it
    /// shows event ids, aggregates and delivery errors to whoever reaches the address.
    pub status_page: bool,
    /// The token the status page's "retry" button must send for a dead letter to be
    /// queued again (a string, `{ file = "..." }` or `{ env = "VAR" }`). Without it the
    /// page is read-only.
    pub status_token: Option<PropertyValue>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "127.0.0.1:9464".into(),
            status_page: false,
            status_token: None,
        }
    }
}

/// The status page's settings, when it is on.
#[derive(Debug, Clone)]
pub struct StatusPageSettings {
    /// Retrying dead letters from the page takes this token; `None`: read-only page.
    pub token: Option<StatusToken>,
}

/// The status page's token, never shown (its `Debug` hides it).
#[derive(Clone)]
pub struct StatusToken(String);

impl StatusToken {
    /// A token to check requests against.
    pub fn new(token: impl Into<String>) -> Self {
        StatusToken(token.into())
    }

    /// True when `given` is the token. Takes the same time wherever the two differ, so
    /// that timing tells an attacker nothing about the token.
    pub fn matches(&self, given: &str) -> bool {
        let (ours, theirs) = (self.0.as_bytes(), given.as_bytes());
        let differences = ours
            .iter()
            .zip(theirs)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        differences == 0 && ours.len() == theirs.len()
    }
}

impl fmt::Debug for StatusToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StatusToken(<hidden>)")
    }
}

/// Refuses a duration outside `min..=max`, naming the setting, its range and default.
fn check_duration(
    setting: &str,
    value: Duration,
    min: Duration,
    max: Duration,
    default: &str,
) -> Result<(), RelayError> {
    if value < min || value > max {
        return Err(RelayError::Config(format!(
            "{setting} is {}; set it between {} and {} ({default} is the default)",
            humantime_serde::re::humantime::format_duration(value),
            humantime_serde::re::humantime::format_duration(min),
            humantime_serde::re::humantime::format_duration(max),
        )));
    }
    Ok(())
}

/// Settings given as command-line flags; they override the file and the environment.
#[derive(Debug, Default, Serialize)]
pub struct ConfigOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_brokers: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpOverride>,
}

#[derive(Debug, Serialize)]
pub struct HttpOverride {
    pub listen: String,
}

/// The top-level settings: an `OUTBOX_*` variable is read as a setting only when its
/// name starts with one of these (`OUTBOX_POLLING__BATCH_SIZE`); any other
/// (`OUTBOX_LOG`, the variables `scripts/services env` exports) is left alone.
const SETTINGS: &[&str] = &[
    "database_url",
    "database_url_file",
    "kafka_brokers",
    "mode",
    "table",
    "polling",
    "delivery",
    "sink",
    "topics",
    "kafka",
    "http",
    "cdc",
    "postgres",
];

/// Variables that `scripts/services env` exports for the tests and the examples (the
/// secured endpoints); they are not settings, and not worth a warning either.
const SERVICE_VARIABLES: &[&str] = &[
    "OUTBOX_TLS_DATABASE_URL",
    "OUTBOX_SASL_KAFKA_BROKERS",
    "OUTBOX_SASL_KAFKA_CONFIG",
    "OUTBOX_SERVICES_TLS_DIR",
    "OUTBOX_NATS_URL",
    "OUTBOX_RABBITMQ_ADDRESS",
    "OUTBOX_RABBITMQ_USER",
    "OUTBOX_RABBITMQ_PASSWORD_FILE",
];

/// Whether the variable `OUTBOX_<key>` names a setting.
fn is_setting(key: &str) -> bool {
    let top = key.split("__").next().unwrap_or_default();
    SETTINGS
        .iter()
        .any(|setting| setting.eq_ignore_ascii_case(top))
}

/// `OUTBOX_*` variables of the environment that are not read as settings, but for those
/// of `scripts/services`: the relay warns about them (a typo such as
/// `OUTBOX_DATABSE_URL` would otherwise go unnoticed).
pub fn ignored_environment_variables() -> Vec<String> {
    std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| {
            name.strip_prefix("OUTBOX_")
                .is_some_and(|key| !is_setting(key))
                && !SERVICE_VARIABLES.contains(&name.as_str())
        })
        .collect()
}

impl Config {
    /// Reads the file (if any), then the environment, then the flags.
    pub fn load(file: Option<&Path>, overrides: &ConfigOverrides) -> Result<Config, RelayError> {
        Config::load_from(file, Some(Config::environment()), overrides)
    }

    /// The `OUTBOX_*` variables, nested keys split at `__`.
    fn environment() -> Env {
        Env::prefixed("OUTBOX_")
            .filter(|key| is_setting(key.as_str()))
            .split("__")
    }

    /// Reads the file and the flags only, ignoring the environment (for programs that
    /// embed the relay and for tests).
    pub fn load_file_only(file: &Path, overrides: &ConfigOverrides) -> Result<Config, RelayError> {
        Config::load_from(Some(file), None, overrides)
    }

    fn load_from(
        file: Option<&Path>,
        env: Option<Env>,
        overrides: &ConfigOverrides,
    ) -> Result<Config, RelayError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(RelayError::Config(format!(
                    "config file {} does not exist; pass the path of a TOML file to --config",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        if let Some(env) = env {
            figment = figment.merge(env);
        }
        figment = figment.merge(Serialized::globals(overrides));
        figment
            .extract()
            .map_err(|err| RelayError::Config(describe(err, file)))
    }

    /// Validates the settings and turns them into what the relay runs with.
    pub fn resolve(self) -> Result<RelayConfig, RelayError> {
        let database_url = match (self.database_url, self.database_url_file) {
            (Some(_), Some(_)) => return Err(RelayError::Config(
                "both database_url and database_url_file are set; keep one of them".into(),
            )),
            (Some(url), None) => url,
            (None, Some(path)) => DatabaseUrl::from_file(&path)
                .map_err(|err| RelayError::Config(err.to_string()))?,
            (None, None) => return Err(RelayError::Config(
                "database_url is not set; pass --database-url, set OUTBOX_DATABASE_URL (or OUTBOX_DATABASE_URL_FILE, a file holding it), or put database_url in the config file".into(),
            )),
        };
        let connect = database_url
            .connect_options()
            .map_err(|err| RelayError::Config(err.to_string()))?;
        let table = TableRef::new(&self.table.schema, &self.table.name)
            .map_err(|err| RelayError::Config(format!("table: {err}")))?;
        if self.polling.batch_size == 0 {
            return Err(RelayError::Config(
                "polling.batch_size is 0; set it to at least 1 (1000 is a good start)".into(),
            ));
        }
        if self.delivery.max_attempts == 0 {
            return Err(RelayError::Config(
                "delivery.max_attempts is 0; set it to at least 1".into(),
            ));
        }
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        // (setting, value, lowest, highest, default)
        let durations = [
            (
                "polling.interval",
                self.polling.interval,
                ms(10),
                secs(3600),
                "1s",
            ),
            (
                "cdc.heartbeat",
                self.cdc.heartbeat,
                ms(100),
                secs(3600),
                "10s",
            ),
            (
                "delivery.initial_backoff",
                self.delivery.initial_backoff,
                ms(1),
                secs(3600),
                "500ms",
            ),
            (
                "delivery.max_backoff",
                self.delivery.max_backoff,
                ms(1),
                secs(24 * 3600),
                "60s",
            ),
            (
                "postgres.connect_timeout",
                self.postgres.connect_timeout,
                secs(1),
                secs(300),
                "10s",
            ),
            (
                "postgres.keepalive_idle",
                self.postgres.keepalive_idle,
                secs(1),
                secs(7200),
                "15s",
            ),
            (
                "postgres.keepalive_interval",
                self.postgres.keepalive_interval,
                secs(1),
                secs(600),
                "5s",
            ),
        ];
        for (setting, value, min, max, default) in durations {
            check_duration(setting, value, min, max, default)?;
        }
        if self.delivery.max_backoff < self.delivery.initial_backoff {
            return Err(RelayError::Config(format!(
                "delivery.max_backoff ({}) is below delivery.initial_backoff ({}); set max_backoff to at least initial_backoff",
                humantime_serde::re::humantime::format_duration(self.delivery.max_backoff),
                humantime_serde::re::humantime::format_duration(self.delivery.initial_backoff),
            )));
        }
        for (setting, value) in [
            ("polling.max_batch_bytes", self.polling.max_batch_bytes),
            ("cdc.max_batch_bytes", self.cdc.max_batch_bytes),
        ] {
            if !(64 * 1024..=1024 * 1024 * 1024).contains(&value) {
                return Err(RelayError::Config(format!(
                    "{setting} is {value}; set it between 65536 (64 KiB) and 1073741824 (1 GiB) (8388608 is the default)",
                )));
            }
        }
        if !(1..=100).contains(&self.postgres.keepalive_count) {
            return Err(RelayError::Config(format!(
                "postgres.keepalive_count is {}; set it between 1 and 100 (3 is the default)",
                self.postgres.keepalive_count
            )));
        }
        let http_listen = match self.http.listen.as_str() {
            "off" | "" => None,
            addr => Some(addr.parse::<SocketAddr>().map_err(|_| {
                RelayError::Config(format!(
                    "http.listen {addr:?} is not an address such as 127.0.0.1:9464 (or \"off\"); set it in the config file or OUTBOX_HTTP__LISTEN"
                ))
            })?),
        };
        let status_page = match (self.http.status_page, self.http.status_token) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(RelayError::Config(
                    "http.status_token is set but http.status_page is off; set http.status_page = true (OUTBOX_HTTP__STATUS_PAGE=true), or remove the token".into(),
                ))
            }
            (true, token) => {
                if http_listen.is_none() {
                    return Err(RelayError::Config(
                        "http.status_page is on but http.listen is \"off\"; the page is served on http.listen, so set an address such as 127.0.0.1:9464".into(),
                    ));
                }
                let token = token
                    .map(|value| value.resolve("http.status_token"))
                    .transpose()?;
                if let Some(token) = &token {
                    if token.len() < 16 {
                        return Err(RelayError::Config(
                            "http.status_token is shorter than 16 characters; use a long random one, such as the output of `openssl rand -hex 24`".into(),
                        ));
                    }
                }
                Some(StatusPageSettings {
                    token: token.map(StatusToken),
                })
            }
        };
        let sink_type = self.sink.type_name();
        if sink_type != "kafka" {
            for (given, what) in [
                (self.kafka.is_some(), "[kafka]"),
                (self.topics.is_some(), "[topics]"),
            ] {
                if given {
                    return Err(RelayError::Config(format!(
                        "{what} is set but sink.type = {sink_type:?}: those are the Kafka sink's settings; remove them, or set the {sink_type} sink's own keys in [sink]"
                    )));
                }
            }
            if self.kafka_brokers.is_some() {
                tracing::warn!(sink = sink_type, "kafka_brokers (OUTBOX_KAFKA_BROKERS) is set but the sink is not Kafka; it is ignored");
            }
        }
        let default_transactional_id = format!(
            "outbox-relay/{}/{}",
            connect
                .get_database()
                .unwrap_or_else(|| connect.get_username()),
            table
        );
        let (kafka_brokers, kafka, topics) = (self.kafka_brokers, self.kafka, self.topics);
        let (sink, template, rule) = crate::sinks::resolve(self.sink, || {
            kafka_settings(
                kafka_brokers,
                kafka.unwrap_or_default(),
                topics.unwrap_or_default(),
                default_transactional_id,
            )
        })?;
        let template = TopicTemplate::parse(&template)
            .map_err(|err| RelayError::Config(format!("the routing template: {err}")))?;
        Ok(RelayConfig {
            database_url,
            mode: self.mode,
            table,
            batch_size: self.polling.batch_size,
            max_batch_bytes: self.polling.max_batch_bytes,
            poll_interval: self.polling.interval,
            on_publish: self.delivery.on_publish,
            retention: self.delivery.retention,
            on_dead_letter: self.delivery.on_dead_letter,
            retry: RetryPolicy {
                max_attempts: self.delivery.max_attempts,
                initial_backoff: self.delivery.initial_backoff,
                max_backoff: self.delivery.max_backoff,
            },
            router: Router::new(template).with_rule(rule),
            sink,
            http_listen,
            status_page,
            standby_interval: Duration::from_secs(1),
            cdc_heartbeat: self.cdc.heartbeat,
            cdc_max_batch_bytes: self.cdc.max_batch_bytes,
            cdc_wait_for_synchronous_standbys: self.cdc.wait_for_synchronous_standbys,
            postgres: PostgresSettings {
                connect_timeout: self.postgres.connect_timeout,
                keepalive_idle: self.postgres.keepalive_idle,
                keepalive_interval: self.postgres.keepalive_interval,
                keepalive_count: self.postgres.keepalive_count,
            },
        })
    }
}

/// The Kafka sink's settings (`kafka_brokers`, `[kafka]`, `[topics]`) checked, with the
/// topic template.
fn kafka_settings(
    brokers: Option<String>,
    kafka: KafkaSection,
    topics: TopicsSection,
    default_transactional_id: String,
) -> Result<(KafkaSettings, String), RelayError> {
    let transactional_id = match (kafka.transactions, kafka.transactional_id) {
        (false, Some(_)) => return Err(RelayError::Config(
            "kafka.transactional_id is set but kafka.transactions = false; remove one of them".into(),
        )),
        (false, None) => None,
        (true, Some(id)) if id.trim().is_empty() => return Err(RelayError::Config(
            "kafka.transactional_id is empty; remove it to use the default (outbox-relay/<database>/<schema>.<table>) or give it a name".into(),
        )),
        (true, Some(id)) => Some(id),
        (true, None) => Some(default_transactional_id),
    };
    TopicTemplate::parse(&topics.template)
        .map_err(|err| RelayError::Config(format!("topics.template: {err}")))?;
    // kafka.message_timeout must not be 0: librdkafka reads it as "wait forever", and a
    // relay stopped during an outage would never drain.
    check_duration(
        "kafka.message_timeout",
        kafka.message_timeout,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        "30s",
    )?;
    if topics.partitions < 1 || topics.replication_factor < 1 {
        return Err(RelayError::Config(
            "topics.partitions and topics.replication_factor must be at least 1".into(),
        ));
    }
    let settings = KafkaSettings {
        brokers: brokers.unwrap_or_default(),
        linger: kafka.linger,
        batch_bytes: kafka.batch_bytes,
        message_timeout: kafka.message_timeout,
        compression: kafka.compression,
        properties: kafka
            .properties
            .into_iter()
            .map(|(name, value)| {
                value
                    .resolve(&format!("kafka.properties.\"{name}\""))
                    .map(|value| (name, value))
            })
            .collect::<Result<_, _>>()?,
        topics: TopicSettings {
            create: topics.create,
            partitions: topics.partitions,
            replication_factor: topics.replication_factor,
        },
        transactional_id,
    };
    settings
        .validate()
        .map_err(|err| RelayError::Config(err.to_string()))?;
    Ok((settings, topics.template))
}

/// Renders a figment error as one line per problem that names the key, where it came
/// from (the config file as given, or the variable) and how to fix it.
fn describe(err: figment::Error, file: Option<&Path>) -> String {
    use figment::error::Kind;
    let mut lines = Vec::new();
    for err in err {
        let from_env = err
            .metadata
            .as_ref()
            .is_some_and(|m| m.name.contains("environment"));
        // Inside `[sink]` (an enum) the path stops at the section: add the key.
        let mut path = err.path.clone();
        if let Kind::UnknownField(name, _) = &err.kind {
            if path.last() != Some(name) {
                path.push(name.clone());
            }
        }
        let key = path.join(".");
        let variable = format!("OUTBOX_{}", path.join("__").to_uppercase());
        let source = match (&err.metadata, file) {
            _ if from_env => format!("the environment variable {variable}"),
            (Some(m), Some(file)) if m.name.contains("TOML") => {
                format!("config file {}", file.display())
            }
            (Some(m), _) => m.name.to_string(),
            (None, _) => "the configuration".into(),
        };
        let at = if key.is_empty() {
            String::new()
        } else {
            format!(" at key `{key}`")
        };
        let problem = match &err.kind {
            Kind::UnknownField(_, expected) => {
                let hint = if from_env {
                    format!("unset or rename {variable}")
                } else {
                    format!("remove or correct it (in the environment the same key is {variable})")
                };
                match expected.is_empty() {
                    true if path.first().is_some_and(|p| p == "sink") => format!(
                        "unknown key; the Kafka sink takes no keys in [sink]: its settings are kafka_brokers, [kafka] and [topics]; {hint}"
                    ),
                    true => format!("unknown key; this section takes no keys; {hint}"),
                    false => format!(
                        "unknown key; the keys here are {}; {hint}",
                        expected.join(", ")
                    ),
                }
            }
            other => {
                let mut text = describe_kind(other);
                if text.contains("a duration") {
                    text.push_str(
                        " such as \"500ms\", \"30s\", \"5m\", \"2h\" or \"7d\" (a number with a unit)",
                    );
                }
                text
            }
        };
        lines.push(format!("bad configuration in {source}{at}: {problem}"));
    }
    lines.join("\n")
}

/// The error without the text that was found: a misplaced password must not be printed
/// back.
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    let found = |actual: &Actual| match actual {
        Actual::Bool(_) => "a boolean".to_string(),
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer".to_string(),
        Actual::Float(_) => "a number".to_string(),
        Actual::Char(_) | Actual::Str(_) => "a string".to_string(),
        Actual::Bytes(_) => "bytes".to_string(),
        Actual::Other(_) => "a value".to_string(),
        other => other.to_string(),
    };
    match kind {
        Kind::InvalidType(actual, expected) => {
            format!("invalid type: found {}, expected {expected}", found(actual))
        }
        Kind::InvalidValue(actual, expected) => {
            format!(
                "invalid value: found {}, expected {expected}",
                found(actual)
            )
        }
        Kind::UnknownVariant(_, expected) => {
            format!("unknown variant, expected one of {}", expected.join(", "))
        }
        other => other.to_string(),
    }
}

/// How connections to PostgreSQL notice a dead peer (see [`PostgresSection`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresSettings {
    pub connect_timeout: Duration,
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
}

impl PostgresSettings {
    /// How long a silent, dead relay keeps its session (and the leadership lock) at most:
    /// the server's keepalive probes run out, or unacknowledged data times out.
    pub fn dead_peer_timeout(&self) -> Duration {
        self.keepalive_idle + self.keepalive_interval * self.keepalive_count
    }

    /// The session settings (sent at connection start) that make the server end a dead
    /// relay's session: keepalives while idle, `tcp_user_timeout` while data is unacknowledged.
    pub fn session_options(&self) -> Vec<(&'static str, String)> {
        let mut options = self.replication_session_options();
        options.push((
            "tcp_user_timeout",
            self.dead_peer_timeout().as_millis().to_string(),
        ));
        options
    }

    /// The same for the replication stream, without `tcp_user_timeout`: while Kafka is
    /// down the relay stops reading the stream, the server's sends wait on a full socket,
    /// and Linux applies `tcp_user_timeout` to that wait too, which would end the stream
    /// of a relay that is alive. The server's `wal_sender_timeout` ends a dead one's.
    pub fn replication_session_options(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "tcp_keepalives_idle",
                self.keepalive_idle.as_secs().to_string(),
            ),
            (
                "tcp_keepalives_interval",
                self.keepalive_interval.as_secs().to_string(),
            ),
            ("tcp_keepalives_count", self.keepalive_count.to_string()),
        ]
    }
}

/// Validated settings of a relay run.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub database_url: DatabaseUrl,
    pub mode: Mode,
    pub table: TableRef,
    pub batch_size: u32,
    /// Polling (and CDC's rows waiting in the table): bytes after which a fetch ends.
    pub max_batch_bytes: u64,
    pub poll_interval: Duration,
    pub on_publish: OnPublish,
    pub retention: Duration,
    /// What a dead letter does to its aggregate's later events.
    pub on_dead_letter: DeadLetterPolicy,
    pub retry: RetryPolicy,
    pub router: Router,
    /// The broker and its settings.
    pub sink: SinkSettings,
    pub http_listen: Option<SocketAddr>,
    /// The status page at `/status`, when on.
    pub status_page: Option<StatusPageSettings>,
    /// How often a standby tries to take the leadership lock.
    pub standby_interval: Duration,
    /// CDC: heartbeat interval of an idle relay.
    pub cdc_heartbeat: Duration,
    /// CDC: bytes of events after which a batch is published.
    pub cdc_max_batch_bytes: u64,
    /// CDC: hold a batch until the synchronous standbys have flushed it.
    pub cdc_wait_for_synchronous_standbys: bool,
    pub postgres: PostgresSettings,
}

impl RelayConfig {
    /// The Kafka sink's settings, when the sink is Kafka.
    pub fn kafka(&self) -> Option<&KafkaSettings> {
        match &self.sink {
            SinkSettings::Kafka(kafka) => Some(kafka),
            _ => None,
        }
    }

    /// The same, to change (tests, programs that embed the relay).
    pub fn kafka_mut(&mut self) -> Option<&mut KafkaSettings> {
        match &mut self.sink {
            SinkSettings::Kafka(kafka) => Some(kafka),
            _ => None,
        }
    }
}

#[cfg(test)]
// figment's Jail closures return figment::Error, which is large; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load(
        jail: &Jail,
        file: Option<&str>,
        overrides: &ConfigOverrides,
    ) -> Result<Config, RelayError> {
        let path = file.map(|f| jail.directory().join(f));
        Config::load_from(path.as_deref(), Some(Config::environment()), overrides)
    }

    #[test]
    fn the_variables_of_scripts_services_are_not_settings() {
        Jail::expect_with(|jail| {
            jail.set_env("OUTBOX_DATABASE_URL", "postgres://env@localhost/db");
            jail.set_env("OUTBOX_TLS_DATABASE_URL", "postgres://tls@localhost/db");
            jail.set_env("OUTBOX_SASL_KAFKA_BROKERS", "localhost:9094");
            jail.set_env("OUTBOX_SASL_KAFKA_CONFIG", "/tmp/kafka-sasl.toml");
            jail.set_env("OUTBOX_SERVICES_TLS_DIR", "/tmp/tls");
            let config = load(jail, None, &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(config.database_url.expose(), "postgres://env@localhost/db");
            jail.set_env("OUTBOX_LOG", "debug");
            assert!(load(jail, None, &ConfigOverrides::default()).is_ok());
            let ignored = ignored_environment_variables();
            assert!(ignored.contains(&"OUTBOX_LOG".to_string()), "{ignored:?}");
            assert!(!ignored.iter().any(|v| v.contains("SASL")), "{ignored:?}");
            Ok(())
        });
    }

    #[test]
    fn flags_override_environment_which_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "outbox.toml",
                r#"
                database_url = "postgres://file@localhost/db"
                kafka_brokers = "file:9092"
                [delivery]
                max_attempts = 3
                "#,
            )?;
            jail.set_env("OUTBOX_KAFKA_BROKERS", "env:9092");
            jail.set_env("OUTBOX_DELIVERY__MAX_ATTEMPTS", "7");
            let overrides = ConfigOverrides {
                database_url: Some("postgres://flag@localhost/db".into()),
                ..ConfigOverrides::default()
            };
            let config = load(jail, Some("outbox.toml"), &overrides)
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(config.database_url.expose(), "postgres://flag@localhost/db");
            assert_eq!(config.kafka().unwrap().brokers, "env:9092");
            assert_eq!(config.retry.max_attempts, 7);
            assert_eq!(config.on_dead_letter, DeadLetterPolicy::Park);
            Ok(())
        });
    }

    #[test]
    fn one_transactional_id_per_outbox_table_by_default() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "outbox.toml",
                "database_url = \"postgres://u@localhost/shop\"\n[table]\nschema = \"billing\"\nname = \"events\"\n",
            )?;
            // (The services' environment names another database.)
            jail.set_env("OUTBOX_DATABASE_URL", "postgres://u@localhost/shop");
            let config = load(jail, Some("outbox.toml"), &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(
                config.kafka().unwrap().transactional_id.as_deref(),
                Some("outbox-relay/shop/billing.events")
            );
            jail.set_env("OUTBOX_KAFKA__TRANSACTIONS", "false");
            let config = load(jail, Some("outbox.toml"), &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(config.kafka().unwrap().transactional_id, None);
            jail.set_env("OUTBOX_KAFKA__TRANSACTIONAL_ID", "orders");
            let err = load(jail, Some("outbox.toml"), &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap_err();
            assert!(
                err.to_string().contains("kafka.transactions = false"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        Jail::expect_with(|jail| {
            jail.create_file("outbox.toml", "[polling]\nbatch_sise = 10\n")?;
            let path = jail.directory().join("outbox.toml");
            let err =
                Config::load_from(Some(&path), None, &ConfigOverrides::default()).unwrap_err();
            let text = err.to_string();
            assert!(err.is_config());
            assert_eq!(
                text,
                format!(
                    "bad configuration in config file {} at key `polling.batch_sise`: unknown key; the keys here are batch_size, interval, max_batch_bytes; remove or correct it (in the environment the same key is OUTBOX_POLLING__BATCH_SISE)",
                    path.display()
                )
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("OUTBOX_POLLING__BATCHSIZE", "10");
            let err = load(jail, None, &ConfigOverrides::default()).unwrap_err();
            assert_eq!(
                err.to_string(),
                "bad configuration in the environment variable OUTBOX_POLLING__BATCHSIZE at key `polling.batchsize`: unknown key; the keys here are batch_size, interval, max_batch_bytes; unset or rename OUTBOX_POLLING__BATCHSIZE"
            );
            Ok(())
        });
    }

    #[test]
    fn dead_letters_park_unless_told_to_skip() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "outbox.toml",
                "database_url = \"postgres://localhost/db\"\n[delivery]\non_dead_letter = \"skip\"\n",
            )?;
            let config = load(jail, Some("outbox.toml"), &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(config.on_dead_letter, DeadLetterPolicy::Skip);
            jail.create_file(
                "outbox.toml",
                "database_url = \"postgres://localhost/db\"\n[delivery]\non_dead_letter = \"drop\"\n",
            )?;
            let err = load(jail, Some("outbox.toml"), &ConfigOverrides::default()).unwrap_err();
            let text = err.to_string();
            assert!(err.is_config());
            assert!(text.contains("at key `delivery.on_dead_letter`"), "{text}");
            assert!(text.contains("expected one of park, skip"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_duration_shows_the_format() {
        Jail::expect_with(|jail| {
            jail.create_file("outbox.toml", "[polling]\ninterval = \"fast\"\n")?;
            let err = load(jail, Some("outbox.toml"), &ConfigOverrides::default()).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("at key `polling.interval`"), "{text}");
            assert!(text.contains("\"500ms\", \"30s\""), "{text}");
            assert!(!text.contains("fast"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn durations_are_human_readable() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "outbox.toml",
                "database_url = \"postgres://localhost/db\"\n[polling]\ninterval = \"250ms\"\n[delivery]\nretention = \"3d\"\n",
            )?;
            let config = load(jail, Some("outbox.toml"), &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(config.poll_interval, Duration::from_millis(250));
            assert_eq!(config.retention, Duration::from_secs(3 * 24 * 3600));
            Ok(())
        });
    }

    #[test]
    fn malformed_url_is_explained_without_the_password() {
        let config = Config {
            database_url: Some(DatabaseUrl::new("mysql://u:s3cret@host/db")),
            ..Config::default()
        };
        let err = config.resolve().unwrap_err().to_string();
        assert!(err.contains("database_url"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let url = DatabaseUrl::new("postgres://u:s3cret@host/db");
        assert_eq!(url.to_string(), "postgres://u:***@host/db");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn missing_database_url_says_how_to_set_it() {
        let err = Config::default().resolve().unwrap_err().to_string();
        assert!(err.contains("OUTBOX_DATABASE_URL"), "{err}");
    }

    /// Each file of `cases` is refused with a configuration error that says the text
    /// given beside it, and never shows the secret `hunter2`.
    fn assert_config_errors(jail: &mut Jail, cases: &[(&str, &str)]) {
        for (toml, wanted) in cases {
            let err = resolve_file(jail, toml).unwrap_err();
            assert!(err.is_config(), "{toml}: {err}");
            assert!(err.to_string().contains(wanted), "{toml}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    fn resolve_file(jail: &mut Jail, toml: &str) -> Result<RelayConfig, RelayError> {
        jail.create_file(
            "outbox.toml",
            &format!("database_url = \"postgres://localhost/db\"\n{toml}"),
        )
        .unwrap();
        let path = jail.directory().join("outbox.toml");
        Config::load_from(Some(&path), None, &ConfigOverrides::default())?.resolve()
    }

    #[test]
    fn the_sink_is_kafka_unless_the_sink_section_says_otherwise() {
        Jail::expect_with(|jail| {
            let config = resolve_file(jail, "kafka_brokers = \"k:9092\"\n").unwrap();
            assert_eq!(config.sink.type_name(), "kafka");
            let message = config.router.route(&event("order")).unwrap();
            assert_eq!(message.topic, "outbox.event.order");
            let err = config.router.route(&event("my order")).unwrap_err();
            assert!(
                err.to_string().contains("not a legal Kafka topic name"),
                "{err}"
            );
            let config = resolve_file(jail, "[sink]\ntype = \"kafka\"\n").unwrap();
            assert_eq!(config.sink.type_name(), "kafka");
            Ok(())
        });
    }

    fn event(aggregate_type: &str) -> outbox_core::StoredEvent {
        outbox_core::StoredEvent {
            seq: 1,
            id: uuid::Uuid::nil(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: "1".into(),
            event_type: "T".into(),
            payload: None,
            headers: Vec::new(),
            attempts: 0,
            unreadable: None,
            retried_dead_letter: false,
        }
    }

    #[test]
    fn each_sink_reads_its_own_keys_and_routing_template() {
        Jail::expect_with(|jail| {
            jail.create_file("rabbit.password", "s3cret\n")?;
            let config = resolve_file(
                jail,
                "[sink]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"events.{aggregatetype}\"\nstream = \"EVENTS\"\nack_timeout = \"2s\"\n",
            )
            .unwrap();
            let SinkSettings::Nats(nats) = &config.sink else {
                panic!("{:?}", config.sink)
            };
            assert_eq!(nats.ack_timeout, Duration::from_secs(2));
            let stream = nats.stream.as_ref().unwrap();
            assert_eq!(
                (stream.name.as_str(), stream.subjects.as_slice()),
                ("EVENTS", &["events.>".to_string()][..])
            );
            assert_eq!(
                config.router.route(&event("order")).unwrap().topic,
                "events.order"
            );
            let err = config.router.route(&event("my order")).unwrap_err();
            assert!(
                err.to_string().contains("not a valid NATS subject"),
                "{err}"
            );

            let config = resolve_file(
                jail,
                "[sink]\ntype = \"rabbitmq\"\naddress = \"127.0.0.1:5672\"\nuser = \"outbox\"\npassword = { file = \"rabbit.password\" }\nexchange = \"events\"\nrouting_key = \"{aggregatetype}.changed\"\n",
            )
            .unwrap();
            let SinkSettings::RabbitMq(rabbitmq) = &config.sink else {
                panic!("{:?}", config.sink)
            };
            assert_eq!(
                (rabbitmq.password.as_str(), rabbitmq.exchange.as_str()),
                ("s3cret", "events")
            );
            assert!(
                !format!("{config:?}").contains("s3cret"),
                "the password stays hidden"
            );
            assert_eq!(
                config.router.route(&event("order")).unwrap().topic,
                "order.changed"
            );

            jail.set_env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
            let config = resolve_file(
                jail,
                "[sink]\ntype = \"webhook\"\nurl = \"https://hooks.example/in/{aggregatetype}\"\nsecret = { env = \"HOOK_SECRET\" }\n",
            )
            .unwrap();
            assert_eq!(config.sink.type_name(), "webhook");
            assert!(
                !format!("{config:?}").contains("MfKQ9r8"),
                "the secret stays hidden"
            );
            assert_eq!(
                config.router.route(&event("order")).unwrap().topic,
                "https://hooks.example/in/order"
            );
            Ok(())
        });
    }

    #[test]
    fn the_sink_can_be_chosen_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.set_env("OUTBOX_DATABASE_URL", "postgres://localhost/db");
            jail.set_env("OUTBOX_SINK__TYPE", "nats");
            jail.set_env("OUTBOX_SINK__URL", "nats://127.0.0.1:4222");
            jail.set_env("OUTBOX_NATS_URL", "nats://127.0.0.1:4222");
            let config = load(jail, None, &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(config.sink.type_name(), "nats");
            assert!(
                ignored_environment_variables().is_empty(),
                "{:?}",
                ignored_environment_variables()
            );
            Ok(())
        });
    }

    #[test]
    fn wrong_sink_settings_name_the_fix() {
        Jail::expect_with(|jail| {
            let cases = [
                ("[sink]\nurl = \"nats://x\"\n", "missing field `type`"),
                ("[sink]\ntype = \"redis\"\n", "expected one of kafka, nats, rabbitmq, webhook"),
                ("[sink]\ntype = \"nats\"\nurl = \"nats://x\"\ntopic = \"x\"\n", "at key `sink.topic`: unknown key; the keys here are url, subject"),
                ("[sink]\ntype = \"kafka\"\nbrokers = \"x\"\n", "its settings are kafka_brokers, [kafka] and [topics]"),
                ("[sink]\ntype = \"nats\"\n", "sink.url is not set; the nats sink needs it"),
                ("[sink]\ntype = \"rabbitmq\"\n", "sink.address is not set"),
                ("[sink]\ntype = \"rabbitmq\"\naddress = \"h:5672\"\nexchange = \"my {aggregatetype}\"\n", "not a valid AMQP exchange name"),
                ("[sink]\ntype = \"nats\"\nurl = \"nats://x\"\n[topics]\ntemplate = \"x\"\n", "[topics] is set but sink.type = \"nats\""),
                ("[sink]\ntype = \"webhook\"\nurl = \"https://h/x\"\n[kafka]\nlinger = \"1ms\"\n", "[kafka] is set but sink.type = \"webhook\""),
                ("[sink]\ntype = \"webhook\"\nurl = \"ftp://h/x\"\n", "is not an http:// or https:// URL"),
                ("[sink]\ntype = \"webhook\"\nurl = \"https://h/{aggregateid}\"\n", "unknown placeholder"),
                ("[sink]\ntype = \"webhook\"\nurl = \"https://h/x\"\nsecret = \"hunter2\"\n", "does not start with \"whsec_\""),
                ("[sink]\ntype = \"nats\"\nurl = \"nats://x\"\nack_timeout = \"0s\"\n", "sink.ack_timeout is 0s"),
                ("[sink]\ntype = \"nats\"\nurl = \"nats://x\"\nstream_subjects = [\"a.>\"]\n", "without sink.stream"),
            ];
            assert_config_errors(jail, &cases);
            Ok(())
        });
    }

    #[test]
    fn the_status_page_is_off_unless_asked_and_its_token_stays_hidden() {
        Jail::expect_with(|jail| {
            assert!(resolve_file(jail, "").unwrap().status_page.is_none());
            jail.set_env("PAGE_TOKEN", "a-long-enough-token-0123456789");
            let config = resolve_file(
                jail,
                "[http]\nstatus_page = true\nstatus_token = { env = \"PAGE_TOKEN\" }\n",
            )
            .unwrap();
            let page = config.status_page.as_ref().expect("on");
            assert!(page
                .token
                .as_ref()
                .unwrap()
                .matches("a-long-enough-token-0123456789"));
            assert!(
                !format!("{config:?}").contains("a-long-enough"),
                "hidden in Debug"
            );
            jail.set_env("OUTBOX_DATABASE_URL", "postgres://localhost/db");
            jail.set_env("OUTBOX_HTTP__STATUS_PAGE", "true");
            let read_only = Config::load(None, &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert!(read_only.status_page.unwrap().token.is_none());
            jail.clear_env();
            let cases = [
                (
                    "[http]\nstatus_token = \"0123456789abcdef-hunter2\"\n",
                    "http.status_page is off",
                ),
                (
                    "[http]\nstatus_page = true\nstatus_token = \"hunter2\"\n",
                    "shorter than 16 characters",
                ),
                (
                    "[http]\nlisten = \"off\"\nstatus_page = true\n",
                    "http.listen is \"off\"",
                ),
            ];
            assert_config_errors(jail, &cases);
            Ok(())
        });
    }
}
