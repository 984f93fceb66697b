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
use outbox_core::{RetryPolicy, Router, TableRef, TopicTemplate};
use outbox_kafka::{KafkaSettings, TopicSettings};
pub use outbox_postgres::DatabaseUrl;
use outbox_postgres::OnPublish;
use serde::{Deserialize, Serialize};

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
    #[serde(default)]
    pub topics: TopicsSection,
    #[serde(default)]
    pub kafka: KafkaSection,
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
}

impl Default for CdcSection {
    fn default() -> Self {
        CdcSection {
            heartbeat: Duration::from_secs(10),
            max_batch_bytes: 8 * 1024 * 1024,
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
}

impl Default for PollingSection {
    fn default() -> Self {
        PollingSection {
            batch_size: 1000,
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// `mark` (set published_at, purge after `retention`) or `delete`.
    pub on_publish: OnPublishSetting,
    /// How long published rows are kept when `on_publish = "mark"`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
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
            on_publish: OnPublishSetting::Mark,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: retry.max_attempts,
            initial_backoff: retry.initial_backoff,
            max_backoff: retry.max_backoff,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPublishSetting {
    #[default]
    Mark,
    Delete,
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
        .map(|(name, value)| value.resolve(&name).map(|value| (name, value)))
        .collect()
}

/// A `kafka.properties` value: given as is, or read from a file or the environment.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    File { file: std::path::PathBuf },
    Env { env: String },
}

impl PropertyValue {
    fn resolve(self, name: &str) -> Result<String, RelayError> {
        match self {
            PropertyValue::Text(text) => Ok(text),
            PropertyValue::File { file } => std::fs::read_to_string(&file)
                .map(|text| text.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|err| {
                    RelayError::Config(format!(
                        "kafka.properties.\"{name}\" is read from {}: {err}; point `file` at a readable file",
                        file.display()
                    ))
                }),
            PropertyValue::Env { env } => std::env::var(&env).map_err(|_| {
                RelayError::Config(format!(
                    "kafka.properties.\"{name}\" is read from the environment variable {env}, which is not set; set it or change `env`"
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
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "127.0.0.1:9464".into(),
        }
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
        let transactional_id = match (self.kafka.transactions, self.kafka.transactional_id) {
            (false, Some(_)) => return Err(RelayError::Config(
                "kafka.transactional_id is set but kafka.transactions = false; remove one of them".into(),
            )),
            (false, None) => None,
            (true, Some(id)) if id.trim().is_empty() => return Err(RelayError::Config(
                "kafka.transactional_id is empty; remove it to use the default (outbox-relay/<database>/<schema>.<table>) or give it a name".into(),
            )),
            (true, Some(id)) => Some(id),
            (true, None) => Some(format!(
                "outbox-relay/{}/{}",
                connect
                    .get_database()
                    .unwrap_or_else(|| connect.get_username()),
                table
            )),
        };
        let template = TopicTemplate::parse(&self.topics.template)
            .map_err(|err| RelayError::Config(format!("topics.template: {err}")))?;
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
        // (setting, value, lowest, highest, default). kafka.message_timeout must not be
        // 0: librdkafka reads it as "wait forever", and a relay stopped during an outage
        // would never drain.
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
                "kafka.message_timeout",
                self.kafka.message_timeout,
                secs(1),
                secs(3600),
                "30s",
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
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&self.cdc.max_batch_bytes) {
            return Err(RelayError::Config(format!(
                "cdc.max_batch_bytes is {}; set it between 65536 (64 KiB) and 1073741824 (1 GiB) (8388608 is the default)",
                self.cdc.max_batch_bytes
            )));
        }
        if !(1..=100).contains(&self.postgres.keepalive_count) {
            return Err(RelayError::Config(format!(
                "postgres.keepalive_count is {}; set it between 1 and 100 (3 is the default)",
                self.postgres.keepalive_count
            )));
        }
        if self.topics.partitions < 1 || self.topics.replication_factor < 1 {
            return Err(RelayError::Config(
                "topics.partitions and topics.replication_factor must be at least 1".into(),
            ));
        }
        let http_listen = match self.http.listen.as_str() {
            "off" | "" => None,
            addr => Some(addr.parse::<SocketAddr>().map_err(|_| {
                RelayError::Config(format!(
                    "http.listen {addr:?} is not an address such as 127.0.0.1:9464 (or \"off\"); set it in the config file or OUTBOX_HTTP__LISTEN"
                ))
            })?),
        };
        let kafka = KafkaSettings {
            brokers: self.kafka_brokers.unwrap_or_default(),
            linger: self.kafka.linger,
            batch_bytes: self.kafka.batch_bytes,
            message_timeout: self.kafka.message_timeout,
            compression: self.kafka.compression,
            properties: self
                .kafka
                .properties
                .into_iter()
                .map(|(name, value)| value.resolve(&name).map(|value| (name, value)))
                .collect::<Result<_, _>>()?,
            topics: TopicSettings {
                create: self.topics.create,
                partitions: self.topics.partitions,
                replication_factor: self.topics.replication_factor,
            },
            transactional_id,
        };
        kafka
            .validate()
            .map_err(|err| RelayError::Config(err.to_string()))?;
        Ok(RelayConfig {
            database_url,
            mode: self.mode,
            table,
            batch_size: self.polling.batch_size,
            poll_interval: self.polling.interval,
            on_publish: match self.delivery.on_publish {
                OnPublishSetting::Mark => OnPublish::Mark,
                OnPublishSetting::Delete => OnPublish::Delete,
            },
            retention: self.delivery.retention,
            retry: RetryPolicy {
                max_attempts: self.delivery.max_attempts,
                initial_backoff: self.delivery.initial_backoff,
                max_backoff: self.delivery.max_backoff,
            },
            router: Router::new(template),
            kafka,
            http_listen,
            standby_interval: Duration::from_secs(1),
            cdc_heartbeat: self.cdc.heartbeat,
            cdc_max_batch_bytes: self.cdc.max_batch_bytes,
            postgres: PostgresSettings {
                connect_timeout: self.postgres.connect_timeout,
                keepalive_idle: self.postgres.keepalive_idle,
                keepalive_interval: self.postgres.keepalive_interval,
                keepalive_count: self.postgres.keepalive_count,
            },
        })
    }
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
        let key = err.path.join(".");
        let variable = format!("OUTBOX_{}", err.path.join("__").to_uppercase());
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
                format!(
                    "unknown key; the keys here are {}; {hint}",
                    expected.join(", ")
                )
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
    pub poll_interval: Duration,
    pub on_publish: OnPublish,
    pub retention: Duration,
    pub retry: RetryPolicy,
    pub router: Router,
    pub kafka: KafkaSettings,
    pub http_listen: Option<SocketAddr>,
    /// How often a standby tries to take the leadership lock.
    pub standby_interval: Duration,
    /// CDC: heartbeat interval of an idle relay.
    pub cdc_heartbeat: Duration,
    /// CDC: bytes of events after which a batch is published.
    pub cdc_max_batch_bytes: u64,
    pub postgres: PostgresSettings,
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
            assert_eq!(config.kafka.brokers, "env:9092");
            assert_eq!(config.retry.max_attempts, 7);
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
                config.kafka.transactional_id.as_deref(),
                Some("outbox-relay/shop/billing.events")
            );
            jail.set_env("OUTBOX_KAFKA__TRANSACTIONS", "false");
            let config = load(jail, Some("outbox.toml"), &ConfigOverrides::default())
                .unwrap()
                .resolve()
                .unwrap();
            assert_eq!(config.kafka.transactional_id, None);
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
                    "bad configuration in config file {} at key `polling.batch_sise`: unknown key; the keys here are batch_size, interval; remove or correct it (in the environment the same key is OUTBOX_POLLING__BATCH_SISE)",
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
                "bad configuration in the environment variable OUTBOX_POLLING__BATCHSIZE at key `polling.batchsize`: unknown key; the keys here are batch_size, interval; unset or rename OUTBOX_POLLING__BATCHSIZE"
            );
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
}
