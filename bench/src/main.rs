//! Benchmark harness: our relay (polling and CDC) side by side with Debezium's outbox
//! router, on the real PostgreSQL and Kafka of this machine (a program, not a timed test).
//!
//! For each system, one session: start it, wait for its first event, measure its idle
//! CPU, write 1 KiB events open loop at stepped rates (commit → consume latency per
//! event, CPU per million events), bisect for the highest rate it keeps up with, then
//! pause it, pile up a backlog and time the drain. Sessions alternate A B A B over the
//! rounds. Output: `report.json`, `RESULTS.md` and PNG plots in `--out-dir`.

mod arrivals;
mod big_table;
mod db;
mod limits;
mod load;
mod plot;
mod profile;
mod report;
mod results;
mod session;
mod system;
mod topics;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use crate::load::Shape;
use crate::report::{Machine, Plan, Report};
use crate::system::{Launcher, System};

#[derive(Parser)]
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
    /// A relay configuration file whose `[kafka.properties]` (TLS, SASL) the relay and the
    /// harness's consumer use, such as OUTBOX_SASL_KAFKA_CONFIG. The Debezium peer always
    /// uses the plaintext brokers.
    #[arg(long, env = "BENCH_KAFKA_CONFIG")]
    kafka_config: Option<PathBuf>,
    /// The relay binary to measure (build it with --release).
    #[arg(long, default_value = "target/release/outbox")]
    relay_bin: PathBuf,
    /// The script that runs the Debezium peer.
    #[arg(long, default_value = "bench/debezium/run-connect")]
    debezium_script: PathBuf,
    /// quick: one round of two short steps (under five minutes); full: two alternated
    /// rounds of six 20 s steps.
    #[arg(long, value_enum, default_value = "full")]
    profile: Profile,
    /// Systems to measure, in this order within each round.
    #[arg(
        long,
        alias = "modes",
        value_delimiter = ',',
        default_value = "polling,cdc,debezium,debezium-tuned"
    )]
    systems: Vec<String>,
    /// Target rates of the steps, events/s (overrides the profile).
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<u32>>,
    /// Seconds per step (overrides the profile).
    #[arg(long)]
    step_secs: Option<f64>,
    /// Rounds of alternation (overrides the profile).
    #[arg(long)]
    rounds: Option<usize>,
    /// Events of the backlog scenario (overrides the profile).
    #[arg(long)]
    backlog_events: Option<usize>,
    /// MiB of large (960 KiB) events in our relay's large-event backlog; 0 skips it
    /// (overrides the profile: 128 quick, 2048 full).
    #[arg(long)]
    large_backlog_mib: Option<usize>,
    /// Published rows kept in the table for polling's big-table phase (the step and the
    /// drain again, then a step during the purge); 0 skips it (overrides the profile: 0
    /// quick, 5,000,000 full).
    #[arg(long)]
    big_table_rows: Option<u64>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Above this many transactions per second, the writers put several events in one.
    #[arg(long, default_value_t = 1000)]
    max_tx_per_sec: u32,
    /// How long each system's idle CPU is measured (quick: 5 s, full: 30 s). CPU time
    /// is counted in 10 ms ticks: tenths of a percent need a minute or more.
    #[arg(long)]
    idle_secs: Option<f64>,
    /// A step is kept up with when its last event arrives at most this long after the
    /// writers' last commit.
    #[arg(long, default_value_t = 2.0)]
    max_lag_secs: f64,
    /// Round-trip time added between the systems under test (our relay, Debezium) and
    /// PostgreSQL, ms, as a database on another host would add: they connect through a
    /// Toxiproxy on loopback (`scripts/services start toxiproxy`); the writers and the
    /// consumer connect directly. 0: no proxy
    #[arg(long, default_value_t = 0)]
    database_rtt_ms: u64,
    /// Directory for report.json, RESULTS.md and plots/.
    #[arg(long)]
    out_dir: PathBuf,
    /// Record a CPU profile (perf) of our relay while it drains its backlog, and draw it
    /// as `<system>-round<n>.flamegraph.svg` next to the report.
    #[arg(long)]
    profile_relay: bool,
    /// Skip the machine's limits (Kafka alone, PostgreSQL alone, the replication stream
    /// alone), measured at the start of every round.
    #[arg(long, conflicts_with = "limits_only")]
    no_limits: bool,
    /// Measure the machine's limits only, no system.
    #[arg(long)]
    limits_only: bool,
    /// Re-render RESULTS.md and the plots from an earlier report.json, measuring nothing.
    #[arg(long, value_name = "REPORT_JSON")]
    render: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    Quick,
    Full,
}

impl Args {
    fn plan(&self) -> Result<Plan> {
        let (rounds, steps, step_seconds, idle_seconds, probes, probe_seconds, backlog, large) =
            match self.profile {
                Profile::Quick => (1, vec![1000, 5000], 8.0, 5.0, 1, 6.0, 20_000, 128),
                Profile::Full => (
                    2,
                    vec![1000, 2000, 5000, 10_000, 20_000, 50_000],
                    20.0,
                    30.0,
                    3,
                    15.0,
                    100_000,
                    2048,
                ),
            };
        let big_table = match self.profile {
            Profile::Quick => 0,
            Profile::Full => 5_000_000,
        };
        for system in &self.systems {
            System::parse(system)?;
        }
        let steps = self.steps.clone().unwrap_or(steps);
        if steps.is_empty() || steps.contains(&0) || !steps.is_sorted() {
            bail!("--steps takes rising rates above zero, such as 1000,2000,5000");
        }
        Ok(Plan {
            profile: match self.profile {
                Profile::Quick => "quick",
                Profile::Full => "full",
            }
            .to_string(),
            systems: if self.limits_only {
                Vec::new()
            } else {
                self.systems.clone()
            },
            rounds: self.rounds.unwrap_or(rounds),
            steps,
            step_seconds: self.step_secs.unwrap_or(step_seconds),
            idle_seconds: self.idle_secs.unwrap_or(idle_seconds),
            probes,
            probe_seconds,
            backlog_events: self.backlog_events.unwrap_or(backlog),
            large_backlog_mib: self.large_backlog_mib.unwrap_or(large),
            big_table_rows: self.big_table_rows.unwrap_or(big_table),
            payload_bytes: self.payload_bytes,
            writers: self.writers,
            max_tx_per_sec: self.max_tx_per_sec,
            max_lag_seconds: self.max_lag_secs,
            database_rtt_ms: self.database_rtt_ms,
        })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    if let Some(path) = &args.render {
        let json =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: Report =
            serde_json::from_str(&json).with_context(|| format!("parsing {}", path.display()))?;
        return write_outputs(&report, &args.out_dir);
    }
    if !args.relay_bin.exists() {
        bail!(
            "{} not found; build it first: cargo build --release -p outbox-cli",
            args.relay_bin.display()
        );
    }
    let plan = args.plan()?;
    let database_port = match plan.database_rtt_ms {
        0 => None,
        rtt => Some(database_proxy(&args.database_url, rtt).await?),
    };
    let kafka_properties = match &args.kafka_config {
        Some(path) => outbox_relay::config::kafka_properties_from_file(path)?,
        None => Default::default(),
    };
    let topics = topics::Topics::connect(&args.kafka_brokers, &kafka_properties)?;
    let leftovers = topics.delete_leftovers().await?;
    if leftovers > 0 {
        eprintln!("bench: deleted {leftovers} topics an earlier run left behind");
    }
    let cx = session::Context {
        admin_url: &args.database_url,
        launcher: Launcher {
            relay_bin: &args.relay_bin,
            debezium_script: &args.debezium_script,
            kafka_brokers: &args.kafka_brokers,
            kafka_config: args.kafka_config.as_deref(),
            kafka_properties,
            log_dir: &args.out_dir,
            database_port,
        },
        plan: &plan,
        profile_dir: args.profile_relay.then_some(args.out_dir.as_path()),
        topics: &topics,
        shape: Shape {
            writers: args.writers,
            payload_bytes: args.payload_bytes,
            max_tx_per_sec: args.max_tx_per_sec,
        },
    };
    let mut report = Report {
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        plan: plan.clone(),
        sessions: Vec::new(),
        limits: Vec::new(),
    };
    for round in 1..=plan.rounds {
        if !args.no_limits {
            eprintln!("bench: round {round}/{}: the machine's limits", plan.rounds);
            let limits = limits::measure(&cx, round)
                .await
                .with_context(|| format!("measuring the machine's limits (round {round})"))?;
            report.limits.push(limits);
            write_outputs(&report, &args.out_dir)?;
        }
        if args.limits_only {
            continue;
        }
        for name in &plan.systems {
            let system = System::parse(name)?;
            eprintln!("bench: round {round}/{}: {name}", plan.rounds);
            let session = session::run(&cx, system, round)
                .await
                .with_context(|| format!("measuring {name} (round {round})"))?;
            report.sessions.push(session);
            // Written after every session, so an interrupted run keeps what it measured.
            write_outputs(&report, &args.out_dir)?;
        }
    }
    if database_port.is_some() {
        outbox_test_kit::toxiproxy::Toxiproxy::new()
            .delete(DATABASE_PROXY)
            .await?;
    }
    println!("{}", results::markdown(&report));
    Ok(())
}

/// Where the systems under test reach PostgreSQL when `--database-rtt-ms` is set: away
/// from the chaos runs' proxies (25432 and up).
const DATABASE_PROXY_PORT: u16 = 26432;
/// The Toxiproxy proxy of `--database-rtt-ms`, removed at the end of the run.
const DATABASE_PROXY: &str = "bench_postgres";

/// Puts a Toxiproxy in front of PostgreSQL that adds `rtt_ms` to every round trip (half
/// each way), and returns the port the systems connect to.
async fn database_proxy(admin_url: &str, rtt_ms: u64) -> Result<u16> {
    use outbox_test_kit::toxiproxy::{Toxic, Toxiproxy};
    let url = url::Url::parse(admin_url).context("parsing --database-url")?;
    let upstream = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    );
    let toxiproxy = Toxiproxy::new();
    toxiproxy.check().await?;
    let name = DATABASE_PROXY;
    let listen = format!("127.0.0.1:{DATABASE_PROXY_PORT}");
    toxiproxy.proxy(name, &listen, &upstream).await?;
    toxiproxy
        .add(
            name,
            Toxic::Latency {
                latency_ms: rtt_ms / 2,
                jitter_ms: 0,
            },
        )
        .await?;
    eprintln!("bench: the systems reach PostgreSQL through {listen}, {rtt_ms} ms round trip added");
    Ok(DATABASE_PROXY_PORT)
}

fn write_outputs(report: &Report, dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("RESULTS.md"), results::markdown(report))?;
    plot::all(report, &dir.join("plots"))?;
    eprintln!(
        "bench: wrote {}/report.json, RESULTS.md and plots/",
        dir.display()
    );
    Ok(())
}

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn machine() -> Machine {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let mem_kib: f64 = field(&read("/proc/meminfo"), "MemTotal")
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or(0.0);
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        cpu_model: field(&read("/proc/cpuinfo"), "model name"),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
    }
}
