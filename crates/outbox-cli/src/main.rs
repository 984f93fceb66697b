//! The `outbox` command. Thin glue: parse flags, load the configuration, call the
//! libraries, map errors to exit codes (0 clean stop, 2 bad configuration, 3 CDC slot
//! lost, 4 `verify` found lost or out-of-order events, 1 anything else).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use outbox_core::{AuditPolicy, AuditReport, LostReason};
use outbox_postgres::{CreatedWindow, LeaderLock, PayloadType, PollingStore};
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
    /// Audit the broker against the database: read the topics the relay publishes to
    /// and report, for the retained rows of a window, what was published, lost, pending,
    /// dead-lettered, duplicated or out of order. Exits 4 when anything is lost or out of
    /// order, 0 otherwise (duplicates alone pass).
    Verify {
        /// How the relay runs: in polling mode rows are marked when published, in CDC
        /// mode they are not (then an unseen row older than --grace is lost).
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
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

/// `outbox verify` found lost or out-of-order events.
const AUDIT_FAILED: u8 = 4;

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| format!("{err}; write an RFC 3339 time such as 2024-05-01T12:00:00Z"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

async fn execute(cli: Cli) -> Result<ExitCode, RelayError> {
    let mut overrides = ConfigOverrides {
        database_url: cli.database_url,
        kafka_brokers: cli.kafka_brokers,
        ..ConfigOverrides::default()
    };
    let mode_arg = |m: &ModeArg| match m {
        ModeArg::Polling => Mode::Polling,
        ModeArg::Cdc => Mode::Cdc,
    };
    match &cli.command {
        Command::Relay { mode, http_listen } => {
            overrides.mode = mode.as_ref().map(mode_arg);
            overrides.http = http_listen.clone().map(|listen| HttpOverride { listen });
        }
        Command::Verify { mode, .. } => overrides.mode = mode.as_ref().map(mode_arg),
        _ => {}
    }
    for variable in outbox_relay::config::ignored_environment_variables() {
        warn!(%variable, "ignoring an OUTBOX_ variable that is not a setting (settings: OUTBOX_DATABASE_URL, OUTBOX_DATABASE_URL_FILE, OUTBOX_KAFKA_BROKERS, OUTBOX_MODE, and OUTBOX_<SECTION>__<KEY> for the sections table, polling, delivery, sink, topics, kafka, http, cdc, postgres)");
    }
    let config = Config::load(cli.config.as_deref(), &overrides)?.resolve()?;
    let done = match cli.command {
        Command::Migrate { payload_type, cdc } => migrate(&config, payload_type, cdc).await,
        Command::Relay { .. } => relay(config).await,
        Command::Status { json } => status(&config, json).await,
        Command::DeadLetters(DeadLetterCommand::List { limit, json }) => {
            list_dead_letters(&config, limit, json).await
        }
        Command::DeadLetters(DeadLetterCommand::Retry { ids, all }) => {
            retry_dead_letters(&config, (!all).then_some(ids)).await
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
            return verify(&config, window, grace, json).await;
        }
    };
    done.map(|()| ExitCode::SUCCESS)
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
        use outbox_postgres_cdc::slot::{self, SlotCreation};
        let database = slot::current_database(&mut conn)
            .await
            .map_err(|e| RelayError::Store(e.into()))?;
        let names = outbox_postgres_cdc::CdcNames::for_table(&database, &config.table);
        let objects = outbox_relay::cdc::set_up(&mut conn, &config.table, &names).await?;
        println!(
            "publication {:?}: {}",
            names.publication,
            if objects.publication_created {
                "created"
            } else {
                "exists"
            }
        );
        match objects.slot {
            SlotCreation::Existed => println!("replication slot {:?}: exists", names.slot),
            SlotCreation::Created => println!("replication slot {:?}: created", names.slot),
            SlotCreation::Recreated { last_checkpoint } => println!(
                "replication slot {:?}: created again (it had vanished); the relay publishes the rows committed after its last checkpoint ({last_checkpoint}) before it streams",
                names.slot
            ),
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
    info!(table = %config.table, sink = config.sink.type_name(), to = %config.sink.target(), database = %config.database_url, "starting relay");
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

/// [`open_store`] for commands that only read: SELECT on the table is enough.
async fn open_read_only_store(
    config: &RelayConfig,
) -> Result<(sqlx::PgConnection, PollingStore), RelayError> {
    let mut conn = outbox_relay::engine::connect(config).await?;
    let store = PollingStore::open_read_only(&mut conn, config.table.clone())
        .await
        .map_err(privilege_is_config)?;
    Ok((conn, store))
}

async fn status(config: &RelayConfig, json: bool) -> Result<(), RelayError> {
    let (mut conn, store) = open_read_only_store(config).await?;
    let stats = store.stats(&mut conn).await?;
    let holder = LeaderLock::new(&config.table).holder(&mut conn).await?;
    let database = outbox_postgres_cdc::slot::current_database(&mut conn)
        .await
        .map_err(|e| RelayError::Store(e.into()))?;
    // This table's slot and every other outbox slot of the database, used or not: a
    // slot left behind by a relay that is gone keeps its WAL until it is dropped.
    let own_slot = outbox_postgres_cdc::CdcNames::for_table(&database, &config.table).slot;
    let slots = outbox_postgres_cdc::slot::outbox_slots(&mut conn)
        .await
        .map_err(|e| RelayError::Store(e.into()))?;
    if json {
        let slot_json = |name: &String, slot: &outbox_postgres_cdc::slot::SlotStatus| {
            serde_json::json!({
                "name": name,
                "this_table": *name == own_slot,
                "active": slot.active,
                "wal_status": slot.wal_status,
                "retained_wal_bytes": slot.retained_bytes,
                "confirmed_flush_lsn": slot.confirmed_flush_lsn,
                "lag_bytes": slot.lag_bytes,
            })
        };
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
            "cdc_slot": slots.iter().find(|(name, _)| *name == own_slot).map(|(name, slot)| slot_json(name, slot)),
            "outbox_slots": slots.iter().map(|(name, slot)| slot_json(name, slot)).collect::<Vec<_>>(),
        });
        println!("{value:#}");
        return Ok(());
    }
    println!("outbox table {}", config.table);
    if slots.iter().any(|(name, _)| *name == own_slot) {
        println!("  (CDC mode never marks rows: `pending` counts the rows in the table)");
    }
    println!("  pending:       {}", stats.pending);
    if stats.pending > 0 {
        println!("  oldest:        {:.1} s", stats.oldest_pending_age_secs);
    } else {
        println!("  oldest:        - (nothing pending)");
    }
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
    if slots.is_empty() {
        println!("replication slots of outbox tables in database {database:?}: none");
        return Ok(());
    }
    println!("replication slots of outbox tables in database {database:?}:");
    for (name, slot) in &slots {
        println!(
            "  {name}{}: {}, wal_status {}, retains {} of WAL, confirmed up to {} ({} bytes behind)",
            if *name == own_slot { " (this table)" } else { "" },
            if slot.active { "streaming" } else { "not streaming" },
            slot.wal_status.as_deref().unwrap_or("?"),
            human_bytes(slot.retained_bytes.unwrap_or(0)),
            slot.confirmed_flush_lsn.as_deref().unwrap_or("?"),
            slot.lag_bytes.unwrap_or(0),
        );
        if !slot.active {
            println!(
                "    it keeps this WAL until a CDC relay reads it; if none will, drop it: SELECT pg_drop_replication_slot('{name}');"
            );
        }
    }
    Ok(())
}

/// `1536` → `1.5 KiB`.
fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit}")
}

async fn list_dead_letters(config: &RelayConfig, limit: i64, json: bool) -> Result<(), RelayError> {
    let (mut conn, store) = open_read_only_store(config).await?;
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
    let retried = store.retry_dead_letters(&mut conn, ids.as_deref()).await?;
    println!("queued {} dead letter(s) for delivery again", retried.len());
    let not_found: Vec<String> = ids
        .unwrap_or_default()
        .into_iter()
        .filter(|id| !retried.contains(id))
        .map(|id| id.to_string())
        .collect();
    if !not_found.is_empty() {
        return Err(RelayError::Config(format!(
            "not dead letters of {} (unknown ids, or events that are not dead-lettered): {}; `outbox dead-letters list` shows the dead letters",
            config.table,
            not_found.join(", ")
        )));
    }
    Ok(())
}

/// `outbox verify`: the rows of the window from the table, then their topics read up to
/// their current ends (rows first, so every row marked published before the read is
/// below the ends), then the comparison.
async fn verify(
    config: &RelayConfig,
    window: CreatedWindow,
    grace: Duration,
    json: bool,
) -> Result<ExitCode, RelayError> {
    let mut conn = outbox_relay::engine::connect(config).await?;
    let snapshot = outbox_postgres::read_audit_rows(&mut conn, &config.table, window)
        .await
        .map_err(privilege_is_config)?;
    drop(conn);
    let read =
        outbox_relay::read_back::read_back(&config.sink, &config.router, &snapshot.rows).await?;
    let policy = AuditPolicy {
        rows_are_marked: config.mode == Mode::Polling,
        grace,
    };
    let report = outbox_core::audit_report(&snapshot.rows, &read.messages, &config.router, &policy);
    let mode = match config.mode {
        Mode::Polling => "polling",
        Mode::Cdc => "cdc",
    };
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339());
    if json {
        let value = serde_json::json!({
            "table": config.table.to_string(),
            "mode": mode,
            "window": { "from": time(snapshot.from), "to": time(snapshot.to) },
            "read_at": snapshot.read_at.to_rfc3339(),
            "grace_seconds": grace.as_secs_f64(),
            "sink": config.sink.type_name(),
            "topics": read.places.iter().map(|t| serde_json::json!({
                "kind": t.kind,
                "topic": t.name,
                "exists": t.exists,
                "partitions": t.partitions,
                "messages": t.messages,
                "without_id": t.without_id,
                "trimmed": t.trimmed,
            })).collect::<Vec<_>>(),
            "committed": report.committed,
            "published": report.published,
            "lost": report.lost,
            "pending": report.pending,
            "dead_lettered": report.dead_lettered,
            "duplicated_ids": report.duplicated_ids,
            "duplicate_copies": report.duplicate_copies,
            "order_violations": report.order_violations,
            "retried_dead_letters": report.retried_dead_letters,
            "passed": report.passed(),
            "lost_events": report.lost_events,
            "duplicate_examples": report.duplicate_examples,
            "order_violation_examples": report.order_violation_examples,
        });
        println!("{value:#}");
    } else {
        print_report(config, mode, &snapshot, grace, &read.places, &report);
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(AUDIT_FAILED)
    })
}

fn print_report(
    config: &RelayConfig,
    mode: &str,
    snapshot: &outbox_postgres::AuditRows,
    grace: Duration,
    places: &[outbox_relay::read_back::PlaceRead],
    report: &AuditReport,
) {
    let window = match (snapshot.from, snapshot.to) {
        (None, None) => "every retained row".to_string(),
        (Some(from), None) => format!("rows created since {}", from.to_rfc3339()),
        (None, Some(to)) => format!("rows created before {}", to.to_rfc3339()),
        (Some(from), Some(to)) => format!(
            "rows created from {} to {}",
            from.to_rfc3339(),
            to.to_rfc3339()
        ),
    };
    println!(
        "outbox verify: {} ({mode} mode), {window}, read at {}{}",
        config.table,
        snapshot.read_at.to_rfc3339(),
        if mode == "cdc" {
            format!(", grace {}", humantime::format_duration(grace))
        } else {
            String::new()
        }
    );
    for t in places {
        if t.exists {
            println!(
                "  {} {}: {}{} message(s) read{}{}",
                t.kind,
                t.name,
                match t.kind {
                    "topic" => format!("{} partition(s), ", t.partitions),
                    _ => String::new(),
                },
                t.messages,
                if t.without_id > 0 {
                    format!(", {} without an id header", t.without_id)
                } else {
                    String::new()
                },
                if t.trimmed {
                    " (its oldest messages were removed by the broker's retention)"
                } else {
                    ""
                }
            );
        } else {
            println!("  {} {}: does not exist", t.kind, t.name);
        }
    }
    println!(
        "committed={} published={} lost={} pending={} dead_lettered={} duplicated_ids={} duplicate_copies={} order_violations={}",
        report.committed,
        report.published,
        report.lost,
        report.pending,
        report.dead_lettered,
        report.duplicated_ids,
        report.duplicate_copies,
        report.order_violations
    );
    if report.retried_dead_letters > 0 {
        println!(
            "  retried dead letters: {} event(s) queued again with `outbox dead-letters retry` reached their topic after later events of their aggregate (their messages carry the outbox.retried-dead-letter header)",
            report.retried_dead_letters
        );
    }
    for lost in &report.lost_events {
        println!(
            "  lost: {} {}/{} seq {} on {}: {}",
            lost.id,
            lost.aggregate_type,
            lost.aggregate_id,
            lost.seq,
            lost.topic.as_deref().unwrap_or("(no legal topic)"),
            match lost.reason {
                LostReason::MarkedPublished => "marked published, not on the topic",
                LostReason::OlderThanGrace => "not on the topic, older than the grace period",
            }
        );
    }
    if report.lost > report.lost_events.len() as u64 {
        println!(
            "  ... and {} more lost (--json lists the first {})",
            report.lost - report.lost_events.len() as u64,
            outbox_core::LISTED_LOST
        );
    }
    for v in &report.order_violation_examples {
        println!(
            "  out of order: {}/{} on {}: {} (seq {}) at partition {} offset {} came before {} (seq {}) at partition {} offset {}",
            v.aggregate_type,
            v.aggregate_id,
            v.topic,
            v.id,
            v.seq,
            v.position.partition,
            v.position.offset,
            v.overtaken_id,
            v.overtaken_seq,
            v.overtaken_position.partition,
            v.overtaken_position.offset
        );
    }
    for d in &report.duplicate_examples {
        println!("  duplicated: {} ({} copies)", d.id, d.copies);
    }
    if report.lost > 0 && places.iter().any(|t| t.trimmed) {
        println!("  note: a trimmed topic or stream no longer holds its oldest messages; audit a window within its retention (--since)");
    }
    if report.passed() {
        println!(
            "PASSED: nothing lost, nothing out of order{}",
            if report.duplicate_copies > 0 {
                " (duplicates are at-least-once delivery; consumers drop them by id)"
            } else {
                ""
            }
        );
    } else {
        println!(
            "FAILED: {} lost, {} out of order",
            report.lost, report.order_violations
        );
    }
}
