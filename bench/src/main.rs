//! Benchmark harness for the relay (a binary, not a timed test).
//!
//! Runs the real `outbox` binary against the real PostgreSQL and Kafka and measures:
//! - throughput: writers insert 1 KiB events as fast as they can for a fixed count;
//!   end-to-end events/s from the first commit to the last Kafka acknowledgement (the
//!   relay marks a row only after its acknowledgement, so `max(published_at)` is that
//!   moment, on the database's clock like `created_at`);
//! - latency: events written at a fixed rate; a consumer records commit (as the writer
//!   saw it return) to receive, p50/p99/p99.9/max;
//! - the relay's peak RSS (VmHWM from /proc) in each scenario.
//!
//! Prints a markdown table and writes JSON (`--out`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use outbox::Event;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

#[derive(Parser, Clone)]
struct Args {
    /// Admin URL; the harness creates a database of its own next to it.
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "OUTBOX_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// The relay binary to measure (build it with --release).
    #[arg(long, default_value = "target/release/outbox")]
    relay_bin: PathBuf,
    /// Events in the throughput scenario.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Concurrent writers in the throughput scenario.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Events per writer transaction in the throughput scenario.
    #[arg(long, default_value_t = 10)]
    events_per_tx: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Target rate of the latency scenario, events/s (one event per transaction).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Duration of the latency scenario.
    #[arg(long, default_value = "20", value_name = "SECONDS")]
    latency_secs: u64,
    /// Systems to measure, side by side: polling, cdc (our relay), debezium,
    /// debezium-tuned (Kafka Connect with Debezium's outbox router).
    #[arg(long, default_value = "polling,cdc")]
    modes: String,
    /// The script that runs the Debezium peer.
    #[arg(long, default_value = "bench/debezium/run-connect")]
    debezium_script: PathBuf,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    relay_bin: String,
    runs: Vec<ModeRun>,
}

/// Every scenario for one relay mode.
#[derive(Serialize)]
struct ModeRun {
    mode: String,
    throughput: Throughput,
    backlog: Backlog,
    latency: Latency,
}

/// The relay alone: a backlog written while it was stopped, then drained.
#[derive(Serialize)]
struct Backlog {
    events: usize,
    drain_seconds: f64,
    events_per_sec: f64,
    relay_peak_rss_mib: f64,
    relay_cpu_seconds: f64,
}

#[derive(Serialize)]
struct Machine {
    cores: usize,
    memory_gib: f64,
    kernel: String,
}

#[derive(Serialize)]
struct Throughput {
    events: usize,
    payload_bytes: usize,
    writers: usize,
    events_per_tx: usize,
    write_seconds: f64,
    writer_events_per_sec: f64,
    end_to_end_seconds: f64,
    end_to_end_events_per_sec: f64,
    relay_peak_rss_mib: f64,
    relay_cpu_seconds: f64,
}

#[derive(Serialize)]
struct Latency {
    target_rate: u32,
    achieved_rate: f64,
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    relay_peak_rss_mib: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.relay_bin.exists() {
        bail!(
            "{} not found; build it first: cargo build --release -p outbox-cli",
            args.relay_bin.display()
        );
    }
    let mut runs = Vec::new();
    for mode in args.modes.split(',') {
        let mode = mode.trim();
        if !["polling", "cdc", "debezium", "debezium-tuned"].contains(&mode) {
            bail!("--modes takes polling, cdc, debezium and debezium-tuned, not {mode:?}");
        }
        eprintln!("bench: {mode}: throughput");
        let throughput = throughput(&args, mode).await?;
        eprintln!("bench: {mode}: backlog");
        let backlog = backlog(&args, mode).await?;
        eprintln!("bench: {mode}: latency");
        let latency = latency(&args, mode).await?;
        runs.push(ModeRun {
            mode: mode.to_string(),
            throughput,
            backlog,
            latency,
        });
    }
    let report = Report {
        machine: machine(),
        relay_bin: args.relay_bin.display().to_string(),
        runs,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}\n");
    println!("{}", markdown(&report));
    if let Some(out) = &args.out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// A database of its own for one scenario, migrated (and, for CDC, with its publication
/// and slot, as `outbox migrate --cdc` makes them), with a fresh topic name.
struct BenchDb {
    name: String,
    url: String,
    pool: PgPool,
    /// Our relay's topic template, or Debezium's topic prefix.
    template: String,
    topic: String,
}

impl BenchDb {
    fn topic(&self) -> String {
        self.topic.clone()
    }

    /// Drops the database and its replication slots: an abandoned slot would hold WAL
    /// on the server forever.
    async fn drop(self, args: &Args) -> Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&args.database_url).await?;
        for _ in 0..50 {
            sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE database = $1 AND NOT active",
            )
            .bind(&self.name)
            .execute(&mut admin)
            .await?;
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
                    .bind(&self.name)
                    .fetch_one(&mut admin)
                    .await?;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

fn is_debezium(mode: &str) -> bool {
    mode.starts_with("debezium")
}

async fn bench_db(args: &Args, scenario: &str, mode: &str) -> Result<BenchDb> {
    let name = format!("outbox_bench_{scenario}_{}", mode.replace('-', "_"));
    let mut admin = PgConnection::connect(&args.database_url).await?;
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
    )
    .bind(&name)
    .execute(&mut admin)
    .await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let url = url_with_db(&args.database_url, &name)?;
    let mut migrate = Command::new(&args.relay_bin);
    migrate
        .arg("migrate")
        .env("OUTBOX_DATABASE_URL", &url)
        .stdout(Stdio::null());
    if mode == "cdc" {
        migrate.arg("--cdc");
    }
    // Debezium creates its own slot and publication on the same table.
    if !migrate.status()?.success() {
        bail!("outbox migrate failed on {name}");
    }
    let pool = PgPoolOptions::new()
        .max_connections(args.writers as u32 + 2)
        .connect(&url)
        .await?;
    let unique = &Uuid::now_v7().simple().to_string()[..12];
    let (template, topic) = if is_debezium(mode) {
        let prefix = format!("bench-{scenario}-{mode}-{unique}");
        let topic = format!("{prefix}.outbox.event.order");
        (prefix, topic)
    } else {
        let template = format!("bench-{scenario}-{mode}-{unique}.{{aggregatetype}}");
        let topic = template.replace("{aggregatetype}", "order");
        (template, topic)
    };
    Ok(BenchDb {
        name,
        url,
        pool,
        template,
        topic,
    })
}

fn url_with_db(url: &str, db: &str) -> Result<String> {
    let mut url = url::Url::parse(url).context("--database-url is not a URL")?;
    url.set_path(db);
    Ok(url.to_string())
}

fn spawn_relay(args: &Args, db: &BenchDb, mode: &str) -> Result<Child> {
    if is_debezium(mode) {
        // run-connect execs the JVM, so this pid is Kafka Connect's own.
        return Command::new(&args.debezium_script)
            .arg(&db.name)
            .arg(&db.template)
            .env("OUTBOX_KAFKA_BROKERS", &args.kafka_brokers)
            .env(
                "DEBEZIUM_TUNED",
                if mode == "debezium-tuned" { "1" } else { "0" },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting Kafka Connect with Debezium");
    }
    Command::new(&args.relay_bin)
        .arg("relay")
        .env("OUTBOX_MODE", mode)
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env("OUTBOX_KAFKA_BROKERS", &args.kafka_brokers)
        .env("OUTBOX_TOPICS__TEMPLATE", &db.template)
        .env("OUTBOX_HTTP__LISTEN", "off")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the relay")
}

fn payload(bytes: usize, n: usize) -> serde_json::Value {
    // JSON of about `bytes` bytes once rendered.
    let filler = "x".repeat(bytes.saturating_sub(40));
    serde_json::json!({ "n": n, "data": filler })
}

/// Inserts `args.events` events with `args.writers` concurrent writers, as fast as they go.
async fn write_events(args: &Args, db: &BenchDb) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let pool = db.pool.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let count = args.events / args.writers;
            let mut n = 0;
            while n < count {
                let events: Vec<Event> = (n..(n + args.events_per_tx).min(count))
                    .map(|k| {
                        Event::new(
                            "order",
                            format!("{}", (w * count + k) % 1000),
                            "Bench",
                            payload(args.payload_bytes, k),
                        )
                    })
                    .collect();
                n += events.len();
                let mut tx = pool.begin().await?;
                outbox::write_all(&mut *tx, &events).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Publishes one event and waits for it on the topic, so the topic exists and the relay
/// is connected before any clock starts; then removes it again.
async fn warm_up(args: &Args, db: &BenchDb) -> Result<()> {
    // A system that is still starting (Debezium creates its slot at start-up) may miss
    // the first event, so write one every few seconds until one arrives.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let warmup = Event::new("order", "warmup", "Warmup", payload(args.payload_bytes, 0));
        outbox::write(&db.pool, &warmup).await?;
        let brokers = args.kafka_brokers.clone();
        let topic = db.topic();
        let wanted = HashSet::from([warmup.id]);
        let arrived = tokio::task::spawn_blocking(move || {
            consume_all(
                &brokers,
                &topic,
                wanted,
                Offset::Beginning,
                Duration::from_secs(5),
            )
        })
        .await?;
        if arrived.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the system under test published nothing within 3 minutes");
        }
    }
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
    Ok(())
}

/// The ids of every event in the table.
async fn all_ids(db: &BenchDb) -> Result<HashSet<Uuid>> {
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_all(&db.pool)
        .await?;
    Ok(ids.into_iter().collect())
}

async fn throughput(args: &Args, mode: &str) -> Result<Throughput> {
    let db = bench_db(args, "throughput", mode).await?;
    let mut relay = spawn_relay(args, &db, mode)?;
    warm_up(args, &db).await?;
    let first_commit = now_micros();
    let write_seconds = write_events(args, &db).await?;
    let wanted = all_ids(&db).await?;
    let brokers = args.kafka_brokers.clone();
    let topic = db.topic();
    let last_received = tokio::task::spawn_blocking(move || {
        consume_all(
            &brokers,
            &topic,
            wanted,
            Offset::Beginning,
            Duration::from_secs(600),
        )
    })
    .await??;
    let end_to_end = (last_received - first_commit) as f64 / 1e6;
    let rss = peak_rss_mib(relay.id());
    let cpu = cpu_seconds(relay.id());
    stop(&mut relay);
    db.drop(args).await?;
    let events = (args.events / args.writers) * args.writers;
    Ok(Throughput {
        events,
        payload_bytes: args.payload_bytes,
        writers: args.writers,
        events_per_tx: args.events_per_tx,
        write_seconds,
        writer_events_per_sec: events as f64 / write_seconds,
        end_to_end_seconds: end_to_end,
        end_to_end_events_per_sec: events as f64 / end_to_end,
        relay_peak_rss_mib: rss,
        relay_cpu_seconds: cpu,
    })
}

async fn backlog(args: &Args, mode: &str) -> Result<Backlog> {
    let db = bench_db(args, "backlog", mode).await?;
    let mut relay = spawn_relay(args, &db, mode)?;
    warm_up(args, &db).await?;
    stop(&mut relay);
    write_events(args, &db).await?;
    let wanted = all_ids(&db).await?;
    let started = now_micros();
    let mut relay = spawn_relay(args, &db, mode)?;
    let brokers = args.kafka_brokers.clone();
    let topic = db.topic();
    let last_received = tokio::task::spawn_blocking(move || {
        consume_all(
            &brokers,
            &topic,
            wanted,
            Offset::Beginning,
            Duration::from_secs(600),
        )
    })
    .await??;
    let rss = peak_rss_mib(relay.id());
    let cpu = cpu_seconds(relay.id());
    stop(&mut relay);
    db.drop(args).await?;
    let events = (args.events / args.writers) * args.writers;
    let drain_seconds = (last_received - started) as f64 / 1e6;
    Ok(Backlog {
        events,
        drain_seconds,
        events_per_sec: events as f64 / drain_seconds,
        relay_peak_rss_mib: rss,
        relay_cpu_seconds: cpu,
    })
}

/// Reads `topic` from `from` until every id in `wanted` arrived (at most 10 minutes).
/// Returns the wall-clock time, in microseconds, at which the last one arrived.
fn consume_all(
    brokers: &str,
    topic: &str,
    mut wanted: HashSet<Uuid>,
    from: Offset,
    timeout: Duration,
) -> Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let n = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if n > 0 {
            break n;
        }
        if Instant::now() > deadline {
            bail!("topic {topic} never appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, from)?;
    }
    consumer.assign(&assignment)?;
    let mut last = now_micros();
    while !wanted.is_empty() {
        if Instant::now() > deadline {
            bail!("{} events never arrived on {topic}", wanted.len());
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            if let Some(id) = message_id(&message) {
                if wanted.remove(&id) {
                    last = now_micros();
                }
            }
        }
    }
    Ok(last)
}

fn message_id(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Uuid> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == "id")
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<Uuid>().ok())
    })
}

async fn latency(args: &Args, mode: &str) -> Result<Latency> {
    let db = bench_db(args, "latency", mode).await?;
    let mut relay = spawn_relay(args, &db, mode)?;
    let topic = db.topic();
    warm_up(args, &db).await?;

    let total = args.rate as usize * args.latency_secs as usize;
    let committed: Arc<Mutex<HashMap<Uuid, u64>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(total)));
    let consumer = {
        let committed = committed.clone();
        let brokers = args.kafka_brokers.clone();
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || consume_latencies(&brokers, &topic, total, committed))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    for n in 0..total {
        let event = Event::new(
            "order",
            format!("{}", n % 1000),
            "Bench",
            payload(args.payload_bytes, n),
        );
        let id = event.id;
        let mut tx = db.pool.begin().await?;
        outbox::write(&mut *tx, &event).await?;
        tx.commit().await?;
        committed.lock().unwrap().insert(id, now_micros());
        let due = Duration::from_secs_f64((n + 1) as f64 / args.rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let achieved_rate = total as f64 / started.elapsed().as_secs_f64();
    let histogram = consumer.await??;
    let rss = peak_rss_mib(relay.id());
    stop(&mut relay);
    db.drop(args).await?;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(Latency {
        target_rate: args.rate,
        achieved_rate,
        events: histogram.len() as usize,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
        relay_peak_rss_mib: rss,
    })
}

fn consume_latencies(
    brokers: &str,
    topic: &str,
    total: usize,
    committed: Arc<Mutex<HashMap<Uuid, u64>>>,
) -> Result<Histogram<u64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics()[0].partitions().len();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, Offset::End)?;
    }
    consumer.assign(&assignment)?;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(total as u64 / 100 + 120);
    // Messages can arrive before the writer recorded its commit time (the writer stamps
    // after COMMIT returns): those wait here until the stamp exists.
    let mut early: Vec<(Uuid, u64)> = Vec::new();
    while seen.len() < total && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let received = now_micros();
            let message = message?;
            let id = message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "id")
                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<Uuid>().ok())
            });
            if let Some(id) = id {
                early.push((id, received));
            }
        }
        let stamps = committed.lock().unwrap();
        early.retain(|(id, received)| match stamps.get(id) {
            Some(sent) => {
                if seen.insert(*id) {
                    histogram.record(received.saturating_sub(*sent).max(1)).ok();
                }
                false
            }
            None => true,
        });
    }
    if seen.len() < total {
        bail!("only {} of {total} events arrived", seen.len());
    }
    Ok(histogram)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn stop(relay: &mut Child) {
    // SIGTERM: the relay drains and exits 0.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(relay.id().to_string())
        .status();
    let _ = relay.wait();
}

/// Peak resident memory of a process (VmHWM), MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// User + system CPU time of a process so far, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the ")".
    (ticks(11) + ticks(12)) / 100.0
}

fn machine() -> Machine {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory_gib: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn markdown(report: &Report) -> String {
    let mut out = String::from("| figure |");
    for run in &report.runs {
        out.push_str(&format!(" {} |", run.mode));
    }
    out.push_str("\n| --- |");
    for _ in &report.runs {
        out.push_str(" --- |");
    }
    out.push('\n');
    let mut row = |name: &str, value: &dyn Fn(&ModeRun) -> String| {
        out.push_str(&format!("| {name} |"));
        for run in &report.runs {
            out.push_str(&format!(" {} |", value(run)));
        }
        out.push('\n');
    };
    row("throughput: writers' insert rate (events/s)", &|r| {
        format!("{:.0}", r.throughput.writer_events_per_sec)
    });
    row(
        "throughput: first commit → last event consumed (events/s)",
        &|r| {
            format!(
                "{:.0} ({:.2} s)",
                r.throughput.end_to_end_events_per_sec, r.throughput.end_to_end_seconds
            )
        },
    );
    row("throughput: relay peak RSS (MiB)", &|r| {
        format!("{:.1}", r.throughput.relay_peak_rss_mib)
    });
    row("throughput: relay CPU (µs/event)", &|r| {
        format!(
            "{:.1}",
            r.throughput.relay_cpu_seconds * 1e6 / r.throughput.events as f64
        )
    });
    row(
        "backlog drain, relay start → last event consumed (events/s)",
        &|r| {
            format!(
                "{:.0} ({:.2} s)",
                r.backlog.events_per_sec, r.backlog.drain_seconds
            )
        },
    );
    row("backlog: relay peak RSS (MiB)", &|r| {
        format!("{:.1}", r.backlog.relay_peak_rss_mib)
    });
    row("backlog: relay CPU (µs/event)", &|r| {
        format!(
            "{:.1}",
            r.backlog.relay_cpu_seconds * 1e6 / r.backlog.events as f64
        )
    });
    row("latency: target / achieved rate (events/s)", &|r| {
        format!("{} / {:.0}", r.latency.target_rate, r.latency.achieved_rate)
    });
    row("latency: commit → consume p50 (ms)", &|r| {
        format!("{:.1}", r.latency.p50_ms)
    });
    row("latency: p99 (ms)", &|r| format!("{:.1}", r.latency.p99_ms));
    row("latency: p99.9 (ms)", &|r| {
        format!("{:.1}", r.latency.p999_ms)
    });
    row("latency: max (ms)", &|r| format!("{:.1}", r.latency.max_ms));
    row("latency: relay peak RSS (MiB)", &|r| {
        format!("{:.1}", r.latency.relay_peak_rss_mib)
    });
    let t = &report.runs[0].throughput;
    out.push_str(&format!(
        "\n{} events of {} B, {} writers, {} events per transaction; latency: one event per transaction.\n\
         Machine: {} cores, {} GiB, Linux {}; PostgreSQL, Kafka, writers, consumer and relay on the same machine.",
        t.events, t.payload_bytes, t.writers, t.events_per_tx,
        report.machine.cores, report.machine.memory_gib, report.machine.kernel,
    ));
    out
}
