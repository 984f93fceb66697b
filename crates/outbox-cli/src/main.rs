//! The `outbox` command. Thin glue: parse flags, load the configuration, call the
//! libraries, map errors to exit codes (0 clean stop, 2 bad configuration, 1 anything
//! else).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use outbox_postgres::{LeaderLock, PayloadType, PollingStore};
use outbox_relay::config::HttpOverride;
use outbox_relay::{Config, ConfigOverrides, Mode, RelayConfig, RelayError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Reliable event publishing from a PostgreSQL outbox table to Kafka"
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
        #[arg(long, value_enum, default_value = "jsonb")]
        payload_type: PayloadArg,
        /// Also create the publication and the logical replication slot that
        /// `outbox relay --mode cdc` reads (needs the table's owner with REPLICATION).
        #[arg(long)]
        cdc: bool,
    },
    /// Publish the outbox until SIGINT or SIGTERM, then drain in-flight deliveries and exit 0.
    Relay {
        /// Where events are read from.
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
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
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, oldest first, with the reason of their last failure.
    List {
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Queue dead letters for delivery again (with a fresh attempt count).
    Retry {
        /// Ids of the events to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<Uuid>,
        /// Retry every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PayloadArg {
    Jsonb,
    Bytea,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Polling,
    Cdc,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            match err {
                RelayError::Config(_) => ExitCode::from(2),
                RelayError::SlotLost(_) => ExitCode::from(3),
                _ => ExitCode::from(1),
            }
        }
    }
}

async fn execute(cli: Cli) -> Result<(), RelayError> {
    let mut overrides = ConfigOverrides {
        database_url: cli.database_url,
        kafka_brokers: cli.kafka_brokers,
        ..ConfigOverrides::default()
    };
    if let Command::Relay { mode, http_listen } = &cli.command {
        overrides.mode = mode.map(|m| match m {
            ModeArg::Polling => Mode::Polling,
            ModeArg::Cdc => Mode::Cdc,
        });
        overrides.http = http_listen.clone().map(|listen| HttpOverride { listen });
    }
    let config = Config::load(cli.config.as_deref(), &overrides)?.resolve()?;
    match cli.command {
        Command::Migrate { payload_type, cdc } => migrate(&config, payload_type, cdc).await,
        Command::Relay { .. } => relay(config).await,
        Command::Status { json } => status(&config, json).await,
        Command::DeadLetters(DeadLetterCommand::List { limit, json }) => {
            list_dead_letters(&config, limit, json).await
        }
        Command::DeadLetters(DeadLetterCommand::Retry { ids, all }) => {
            retry_dead_letters(&config, (!all).then_some(ids)).await
        }
    }
}

async fn migrate(config: &RelayConfig, payload: PayloadArg, cdc: bool) -> Result<(), RelayError> {
    let mut conn = outbox_relay::engine::connect(config).await?;
    let payload = match payload {
        PayloadArg::Jsonb => PayloadType::Jsonb,
        PayloadArg::Bytea => PayloadType::Bytea,
    };
    let applied = outbox_postgres::migrate(&mut conn, &config.table, payload)
        .await
        .map_err(privilege_is_config)?;
    if applied.is_empty() {
        println!(
            "{} is up to date (schema version {})",
            config.table,
            outbox_postgres::LATEST_VERSION
        );
    } else {
        println!("{}: applied schema version(s) {:?}", config.table, applied);
    }
    if cdc {
        use outbox_postgres_cdc::slot;
        let database = slot::current_database(&mut conn)
            .await
            .map_err(|e| RelayError::Store(e.into()))?;
        let names = outbox_postgres_cdc::CdcNames::for_table(&database, &config.table);
        let cdc_error = |err: sqlx::Error| {
            RelayError::Config(format!(
                "cannot create the CDC publication and slot: {err}; run `outbox migrate --cdc` as the outbox table's owner with the REPLICATION attribute (see README, \"CDC mode\")"
            ))
        };
        let created = slot::ensure_publication(&mut conn, &config.table, &names)
            .await
            .map_err(cdc_error)?;
        println!(
            "publication {:?}: {}",
            names.publication,
            if created { "created" } else { "exists" }
        );
        match slot::slot_status(&mut conn, &names).await.map_err(cdc_error)? {
            Some(status) if status.is_lost() => {
                return Err(RelayError::SlotLost(format!(
                    "the replication slot {:?} was invalidated by PostgreSQL (wal_status = lost); it is not re-created silently. Republish retained rows with polling mode, drop the slot (SELECT pg_drop_replication_slot('{}')), then run `outbox migrate --cdc` again",
                    names.slot, names.slot
                )))
            }
            Some(_) => println!("replication slot {:?}: exists", names.slot),
            None => {
                slot::ensure_slot(&mut conn, &names).await.map_err(cdc_error)?;
                println!("replication slot {:?}: created", names.slot);
            }
        }
    }
    Ok(())
}

/// A database that refuses for lack of rights is a configuration problem (exit 2).
fn privilege_is_config(err: outbox_postgres::Error) -> RelayError {
    if let outbox_postgres::Error::Database(sqlx::Error::Database(db)) = &err {
        if db.code().as_deref() == Some("42501") {
            return RelayError::Config(format!(
                "the database role lacks a privilege: {}; grant it, or run this command as the table's owner",
                db.message()
            ));
        }
    }
    match err {
        outbox_postgres::Error::Database(_) => RelayError::Store(err),
        other => RelayError::Config(other.to_string()),
    }
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
    info!(table = %config.table, brokers = %config.kafka.brokers, database = %config.database_url, "starting relay");
    outbox_relay::run(config, shutdown).await
}

async fn open_store(
    config: &RelayConfig,
) -> Result<(sqlx::PgConnection, PollingStore), RelayError> {
    let mut conn = outbox_relay::engine::connect(config).await?;
    let store = PollingStore::open(&mut conn, config.table.clone())
        .await
        .map_err(privilege_is_config)?;
    Ok((conn, store))
}

async fn status(config: &RelayConfig, json: bool) -> Result<(), RelayError> {
    let (mut conn, store) = open_store(config).await?;
    let stats = store.stats(&mut conn).await?;
    let holder = LeaderLock::new(&config.table).holder(&mut conn).await?;
    // The CDC slot of this table, if one was created (`outbox migrate --cdc`).
    let database = outbox_postgres_cdc::slot::current_database(&mut conn)
        .await
        .map_err(|e| RelayError::Store(e.into()))?;
    let names = outbox_postgres_cdc::CdcNames::for_table(&database, &config.table);
    let slot = outbox_postgres_cdc::slot::slot_status(&mut conn, &names)
        .await
        .map_err(|e| RelayError::Store(e.into()))?;
    if json {
        let value = serde_json::json!({
            "table": config.table.to_string(),
            "pending": stats.pending,
            "oldest_pending_age_seconds": stats.oldest_pending_age_secs,
            "retrying": stats.retrying,
            "dead_lettered": stats.dead_lettered,
            "active_relay": holder.as_ref().map(|h| serde_json::json!({
                "pid": h.pid,
                "application_name": h.application_name,
                "client_addr": h.client_addr,
                "since": h.since.map(|t| t.to_rfc3339()),
            })),
            "cdc_slot": slot.as_ref().map(|slot| serde_json::json!({
                "name": names.slot,
                "wal_status": slot.wal_status,
                "confirmed_flush_lsn": slot.confirmed_flush_lsn,
                "lag_bytes": slot.lag_bytes,
                "active": slot.active,
            })),
        });
        println!("{value:#}");
        return Ok(());
    }
    println!("outbox table {}", config.table);
    if let Some(slot) = &slot {
        println!(
            "  cdc slot:      {} (wal_status {}, {} bytes behind, confirmed up to {}{})",
            names.slot,
            slot.wal_status.as_deref().unwrap_or("?"),
            slot.lag_bytes.unwrap_or(0),
            slot.confirmed_flush_lsn.as_deref().unwrap_or("?"),
            if slot.active {
                ", streaming"
            } else {
                ", not streaming"
            }
        );
        println!("  (in CDC mode rows are never marked: `pending` below counts rows in the table)");
    }
    println!("  pending:       {}", stats.pending);
    println!("  oldest:        {:.1} s", stats.oldest_pending_age_secs);
    println!("  retrying:      {}", stats.retrying);
    println!(
        "  dead letters:  {}{}",
        stats.dead_lettered,
        if stats.dead_lettered > 0 {
            "  (outbox dead-letters list)"
        } else {
            ""
        }
    );
    match holder {
        Some(h) => println!(
            "  active relay:  backend pid {} ({}, {}) since {}",
            h.pid,
            h.application_name,
            h.client_addr.as_deref().unwrap_or("local socket"),
            h.since.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        None => println!("  active relay:  none"),
    }
    Ok(())
}

async fn list_dead_letters(config: &RelayConfig, limit: i64, json: bool) -> Result<(), RelayError> {
    let (mut conn, store) = open_store(config).await?;
    let letters = store.dead_letters(&mut conn, limit).await?;
    if json {
        let rows: Vec<_> = letters
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.id,
                    "aggregatetype": d.aggregate_type,
                    "aggregateid": d.aggregate_id,
                    "type": d.event_type,
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    "created_at": d.created_at.to_rfc3339(),
                    "dead_lettered_at": d.dead_lettered_at.to_rfc3339(),
                })
            })
            .collect();
        println!("{:#}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters in {}", config.table);
        return Ok(());
    }
    for d in &letters {
        println!(
            "{}  {}/{}  {}  attempts={}  at {}\n    {}",
            d.id,
            d.aggregate_type,
            d.aggregate_id,
            d.event_type,
            d.attempts,
            d.dead_lettered_at.to_rfc3339(),
            d.last_error.as_deref().unwrap_or("(no reason recorded)")
        );
    }
    println!(
        "{} dead letter(s); `outbox dead-letters retry ID...` or `--all` queues them again",
        letters.len()
    );
    Ok(())
}

async fn retry_dead_letters(
    config: &RelayConfig,
    ids: Option<Vec<Uuid>>,
) -> Result<(), RelayError> {
    let (mut conn, store) = open_store(config).await?;
    let count = store.retry_dead_letters(&mut conn, ids.as_deref()).await?;
    println!("queued {count} dead letter(s) for delivery again");
    Ok(())
}
