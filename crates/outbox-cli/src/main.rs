//! The `outbox` command. Thin glue: parse flags, load the configuration, call the
//! libraries, map errors to exit codes (0 clean stop, 2 bad configuration, 3 CDC slot
//! lost, 4 `verify` found lost or out-of-order events, 1 anything else).

mod database;
mod dead_letters;
mod migrate;
mod status;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{CommandFactory, Parser, Subcommand};
use outbox_postgres::{CreatedWindow, PayloadType};
use outbox_relay::config::HttpOverride;
use outbox_relay::{Config, ConfigOverrides, Mode, RelayConfig, RelayError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Reliable event publishing from a PostgreSQL outbox table to Kafka, NATS JetStream, RabbitMQ or webhooks"
)]
struct Cli {
    /// TOML configuration file. Environment variables OUTBOX_* override it; flags override both.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// PostgreSQL URL (or OUTBOX_DATABASE_URL), such as postgres://postgres@127.0.0.1:5432/app
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Kafka bootstrap servers (or OUTBOX_KAFKA_BROKERS), such as 127.0.0.1:9092
    #[arg(long, global = true, value_name = "HOST:PORT,...")]
    kafka_brokers: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the outbox table, its indexes and its trigger. Safe to run twice.
    Migrate {
        /// Payload column type of a new table: jsonb (JSON payloads) or bytea (opaque bytes).
        #[arg(long, default_value = "jsonb", value_parser = one_of::<PayloadType>(&["jsonb", "bytea"]))]
        payload_type: PayloadType,
        /// Also create the publication and the logical replication slot that
        /// `outbox relay --mode cdc` reads (needs the table's owner with REPLICATION).
        #[arg(long)]
        cdc: bool,
    },
    /// Publish the outbox until SIGINT or SIGTERM, then drain in-flight deliveries and exit 0.
    Relay {
        /// Where events are read from.
        #[arg(long, value_parser = one_of::<Mode>(MODES))]
        mode: Option<Mode>,
        /// Address for /metrics and /healthz (or "off"); overrides http.listen.
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<String>,
    },
    /// Show pending events, the oldest pending age, dead letters and the active relay.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and retry events that could not be delivered.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Audit the broker against the database: read the topics the relay publishes to
    /// and report, for the retained rows of a window, what was published, lost, pending,
    /// dead-lettered, duplicated or out of order. Exits 4 when anything is lost or out of
    /// order, 0 otherwise (duplicates alone pass).
    Verify {
        /// How the relay runs: in polling mode rows are marked when published, in CDC
        /// mode they are not (then an unseen row older than --grace is lost).
        #[arg(long, value_parser = one_of::<Mode>(MODES))]
        mode: Option<Mode>,
        /// Only rows written during this last period, such as 1h or 30m (by the
        /// database's clock). Default: every retained row.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with_all = ["from", "to"])]
        since: Option<Duration>,
        /// Only rows with created_at at or after this RFC 3339 time (2024-05-01T12:00:00Z).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        from: Option<DateTime<Utc>>,
        /// Only rows with created_at before this RFC 3339 time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        to: Option<DateTime<Utc>>,
        /// CDC mode: how old an unseen row must be to count as lost rather than pending.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
        grace: Duration,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the completion script of a shell, such as
    /// `outbox completions bash > /etc/bash_completion.d/outbox`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), such as
    /// `outbox man > /usr/local/share/man/man1/outbox.1`; with --dir, write one page per
    /// command there (outbox.1, outbox-relay.1, ...).
    Man {
        /// Write outbox.1 and a page per subcommand into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, oldest first, with the reason of their last failure.
    List {
        /// The most dead letters to show.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Queue dead letters for delivery again (with a fresh attempt count), ahead of the
    /// later events of their aggregates that wait for them.
    Retry {
        /// Ids of the events to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<Uuid>,
        /// Retry every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Give up on dead letters: they stay listed, and the later events of their
    /// aggregates, parked behind them, go on.
    Skip {
        /// Ids of the events to skip.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<Uuid>,
        /// Skip every dead letter.
        #[arg(long)]
        all: bool,
    },
}

const MODES: &[&str] = &["polling", "cdc"];

/// A flag that takes one of `values` (listed in `--help`), parsed into the library's
/// own type.
fn one_of<T>(values: &'static [&'static str]) -> impl TypedValueParser<Value = T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Debug,
{
    PossibleValuesParser::new(values).map(|value| value.parse().expect("one of the values"))
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| format!("{err}; write an RFC 3339 time such as 2024-05-01T12:00:00Z"))
}

fn main() -> ExitCode {
    return_large_blocks_to_the_system();
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "outbox",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => return man_pages(dir.as_deref()),
        _ => {}
    }
    // Crash points of the fault tests; nothing in a release build.
    let _failpoints = outbox_relay::failpoints::setup();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,sqlx=warn,rdkafka=warn,async_nats=warn,lapin=warn".into()
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Traces (the relay only): set up before the runtime, since the exporter's HTTP
    // client runs on a thread of its own.
    let telemetry = match &cli.command {
        Command::Relay { .. } => match outbox_relay::telemetry::Telemetry::from_env() {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(err.exit_code());
            }
        },
        _ => None,
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(execute(cli));
    drop(runtime);
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// The manual page of `outbox` on standard output, or one page per command in `dir`.
fn man_pages(dir: Option<&std::path::Path>) -> ExitCode {
    let written = match dir {
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout().lock()),
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: writing the manual pages: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> Result<ExitCode, RelayError> {
    let mut overrides = ConfigOverrides {
        database_url: cli.database_url,
        kafka_brokers: cli.kafka_brokers,
        ..ConfigOverrides::default()
    };
    match &cli.command {
        Command::Relay { mode, http_listen } => {
            overrides.mode = *mode;
            overrides.http = http_listen.clone().map(|listen| HttpOverride { listen });
        }
        Command::Verify { mode, .. } => overrides.mode = *mode,
        _ => {}
    }
    for variable in outbox_relay::config::ignored_environment_variables() {
        warn!(%variable, "ignoring an OUTBOX_ variable that is not a setting (settings: OUTBOX_DATABASE_URL, OUTBOX_DATABASE_URL_FILE, OUTBOX_KAFKA_BROKERS, OUTBOX_MODE, and OUTBOX_<SECTION>__<KEY> for the sections table, polling, delivery, sink, topics, kafka, http, cdc, postgres)");
    }
    let config = Config::load(cli.config.as_deref(), &overrides)?.resolve()?;
    let done = match cli.command {
        Command::Migrate { payload_type, cdc } => {
            migrate::migrate(&config, payload_type, cdc).await
        }
        Command::Relay { .. } => relay(config).await,
        Command::Completions { .. } | Command::Man { .. } => unreachable!("answered in main"),
        Command::Status { json } => status::status(&config, json).await,
        Command::DeadLetters(DeadLetterCommand::List { limit, json }) => {
            dead_letters::list(&config, limit, json).await
        }
        Command::DeadLetters(DeadLetterCommand::Skip { ids, all }) => {
            dead_letters::skip(&config, (!all).then_some(ids)).await
        }
        Command::DeadLetters(DeadLetterCommand::Retry { ids, all }) => {
            dead_letters::retry(&config, (!all).then_some(ids)).await
        }
        Command::Verify {
            since,
            from,
            to,
            grace,
            json,
            ..
        } => {
            if let (Some(from), Some(to)) = (from, to) {
                if from >= to {
                    return Err(RelayError::Config(format!(
                        "--from {} is not before --to {}; give a window that ends after it starts",
                        from.to_rfc3339(),
                        to.to_rfc3339()
                    )));
                }
            }
            let window = match since {
                Some(since) => CreatedWindow::Since(since),
                None if from.is_some() || to.is_some() => CreatedWindow::Between { from, to },
                None => CreatedWindow::All,
            };
            return verify::verify(&config, window, grace, json).await;
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

async fn relay(config: RelayConfig) -> Result<(), RelayError> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: finishing in-flight deliveries, then exiting"),
            _ = int.recv() => info!("SIGINT: finishing in-flight deliveries, then exiting"),
        }
        signals.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting at once; undelivered events stay pending and are sent by the next relay");
        std::process::exit(1);
    });
    info!(table = %config.table, sink = config.sink.type_name(), to = %config.sink.target(), database = %config.database_url, "starting relay");
    outbox_relay::run(config, shutdown).await
}

/// Gives every large allocation (a large event's payload, its message, a produce
/// request) a mapping of its own, returned to the system when freed. By default glibc
/// raises that threshold to the largest block freed so far, then serves such blocks
/// from per-thread heaps that keep what they free: draining 960 KiB events, the relay's
/// peak memory was 69 MiB in CDC mode and 50 MiB polling, against 53 and 48 MiB with
/// the threshold fixed (bench, large-event backlog); small events are not affected.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_blocks_to_the_system() {
    // SAFETY: mallopt only tunes the allocator, and runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_blocks_to_the_system() {}
