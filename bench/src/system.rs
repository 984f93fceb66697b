//! The systems under test, run as real processes, and what /proc says about them.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::db::BenchDb;

/// One of the four systems the harness compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// Our relay, polling the table.
    Polling,
    /// Our relay, reading the write-ahead log.
    Cdc,
    /// Kafka Connect with Debezium's PostgreSQL connector and outbox router, its defaults.
    Debezium,
    /// The same with a shorter poll interval and larger batches and queue.
    DebeziumTuned,
}

impl System {
    pub const ALL: [System; 4] = [
        System::Polling,
        System::Cdc,
        System::Debezium,
        System::DebeziumTuned,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Polling => "polling",
            System::Cdc => "cdc",
            System::Debezium => "debezium",
            System::DebeziumTuned => "debezium-tuned",
        }
    }

    pub fn parse(name: &str) -> Result<System> {
        System::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .with_context(|| {
                format!(
                    "unknown system {name:?}: choose among polling, cdc, debezium, debezium-tuned"
                )
            })
    }

    pub fn is_debezium(self) -> bool {
        matches!(self, System::Debezium | System::DebeziumTuned)
    }
}

/// A running system under test: one process whose CPU and memory /proc accounts for
/// (`run-connect` execs the JVM, so Kafka Connect's pid is the child's).
pub struct Running {
    child: Child,
    rss: RssSampler,
}

/// What starts the systems.
pub struct Launcher<'a> {
    pub relay_bin: &'a Path,
    pub debezium_script: &'a Path,
    pub kafka_brokers: &'a str,
    /// Given to the relay as `--config` (its `[kafka.properties]`).
    pub kafka_config: Option<&'a Path>,
    /// The same properties, for the harness's own consumer.
    pub kafka_properties: std::collections::BTreeMap<String, String>,
    /// Where each relay's log goes (`<database>.log`); its level is `BENCH_RELAY_LOG`
    /// (a `RUST_LOG` filter, `warn` by default).
    pub log_dir: &'a Path,
    /// The PostgreSQL port the systems connect to, when not the harness's own (the
    /// latency proxy of `--database-rtt-ms`).
    pub database_port: Option<u16>,
}

impl Launcher<'_> {
    /// `url`, on the systems' port.
    fn database_url(&self, url: &str) -> Result<String> {
        let Some(port) = self.database_port else {
            return Ok(url.to_string());
        };
        let mut url = url::Url::parse(url).context("parsing the database URL")?;
        url.set_port(Some(port))
            .map_err(|()| anyhow::anyhow!("cannot set the port of the database URL"))?;
        Ok(url.to_string())
    }

    pub fn start(&self, system: System, db: &BenchDb) -> Result<Running> {
        let child = if system.is_debezium() {
            let mut connect = Command::new(self.debezium_script);
            if let Some(port) = self.database_port {
                connect.env("BENCH_PG_PORT", port.to_string());
            }
            connect
                .arg(&db.name)
                .arg(&db.template)
                .env("OUTBOX_KAFKA_BROKERS", self.kafka_brokers)
                .env(
                    "DEBEZIUM_TUNED",
                    if system == System::DebeziumTuned {
                        "1"
                    } else {
                        "0"
                    },
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting Kafka Connect with Debezium")?
        } else {
            let log_path = self.log_dir.join(format!("{}.log", db.name));
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let mut relay = Command::new(self.relay_bin);
            if let Some(config) = self.kafka_config {
                relay.arg("--config").arg(config);
            }
            relay
                .arg("relay")
                .env("OUTBOX_MODE", system.name())
                .env("OUTBOX_DATABASE_URL", self.database_url(&db.url)?)
                .env("OUTBOX_KAFKA_BROKERS", self.kafka_brokers)
                .env("OUTBOX_TOPICS__TEMPLATE", &db.template)
                .env("OUTBOX_HTTP__LISTEN", "off")
                .env(
                    "RUST_LOG",
                    std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting the relay")?
        };
        let rss = RssSampler::start(child.id());
        Ok(Running { child, rss })
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process already exited (a system that died must not be measured).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the system under test exited early with {status}");
        }
        Ok(())
    }

    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Peak resident memory over the process's life (VmHWM), MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        status_kib(self.pid(), "VmHWM:") / 1024.0
    }

    /// Highest resident memory sampled since the last call, MiB.
    pub fn take_sampled_peak_rss_mib(&self) -> f64 {
        self.rss.take_peak_mib()
    }

    /// SIGSTOP: the process keeps its connections and state but does no work, so a
    /// backlog can pile up without a restart (and without the JVM's start-up in the
    /// figure).
    pub fn pause(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    pub fn resume(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// SIGTERM, then waits (SIGKILL after 60 s).
    pub fn stop(mut self) {
        self.rss.stop();
        signal(self.pid(), libc::SIGCONT);
        signal(self.pid(), libc::SIGTERM);
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on our own child's pid; no memory is touched.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Samples VmRSS every 50 ms and keeps the highest value until taken.
struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (peak, halt) = (peak_kib.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let kib = status_kib(pid, "VmRSS:");
                if kib.is_finite() {
                    peak.fetch_max(kib as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler { peak_kib, stop }
    }

    fn take_peak_mib(&self) -> f64 {
        self.peak_kib.swap(0, Ordering::Relaxed) as f64 / 1024.0
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User + system CPU time of a process (all its threads) so far, seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
        .map(|(_, ticks)| ticks / clock_ticks_per_sec())
        .unwrap_or(f64::NAN)
}

/// CPU time of every PostgreSQL process on the machine (server, background workers,
/// backends and WAL senders), seconds: the load a system puts on the database. It
/// includes the processes that have exited (autovacuum workers come and go within a
/// step), counted in the postmaster's time for its reaped children.
pub fn postgres_cpu_seconds() -> f64 {
    let mut ticks = 0.0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let (Some((comm, t)), Some(reaped)) = (stat_cpu(&stat), reaped_children_cpu(&stat)) {
            if comm == "postgres" {
                ticks += t + reaped;
            }
        }
    }
    ticks / clock_ticks_per_sec()
}

/// The command name and utime + stime (in clock ticks) of a /proc/PID/stat line.
fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12th and 13th after the ")".
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// The application name of the harness's own connections to the session's database
/// (the writers).
pub const BENCH_APPLICATION_NAME: &str = "outbox-bench";

/// CPU seconds so far of each PostgreSQL backend serving the harness's own connections
/// to the session's database, by pid.
pub async fn bench_backends_cpu(db: &BenchDb) -> Result<HashMap<i32, f64>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(BENCH_APPLICATION_NAME)
    .fetch_all(&db.pool)
    .await?;
    Ok(pids
        .into_iter()
        .map(|pid| (pid, cpu_seconds(pid as u32)))
        .filter(|(_, seconds)| seconds.is_finite())
        .collect())
}

/// CPU seconds spent between two readings of [`bench_backends_cpu`]: a backend that
/// started in between counts whole.
pub fn cpu_spent(before: &HashMap<i32, f64>, after: &HashMap<i32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, seconds)| seconds - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

/// cutime + cstime (in clock ticks) of a /proc/PID/stat line: the CPU time of the
/// process's children that have exited and been waited for.
fn reaped_children_cpu(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 of the line, 14th and 15th after the ")".
    let cutime: f64 = fields.get(13)?.parse().ok()?;
    let cstime: f64 = fields.get(14)?.parse().ok()?;
    Some(cutime + cstime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_a_command_with_spaces() {
        let line = "42 (post gres) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(stat_cpu(line), Some(("post gres", 300.0)));
        assert_eq!(reaped_children_cpu(line), Some(0.0));
        let postmaster = "7 (postgres) S 1 7 7 0 -1 4194560 100 0 0 0 250 50 4000 600 20 0 1 0";
        assert_eq!(reaped_children_cpu(postmaster), Some(4600.0));
    }
}
