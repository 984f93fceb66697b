//! What a run measured (written as JSON, read back by `--render`), and the per-system
//! summaries the markdown and the plots are made of.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct Report {
    /// UTC, RFC 3339.
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    pub plan: Plan,
    /// In the order they ran: round 1 of every system, then round 2, …
    pub sessions: Vec<Session>,
    /// The machine's limits, measured at the start of each round (none in reports
    /// written before they were measured).
    #[serde(default)]
    pub limits: Vec<Limits>,
}

#[derive(Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub cpu_model: String,
    pub kernel: String,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct Plan {
    pub profile: String,
    pub systems: Vec<String>,
    pub rounds: usize,
    /// Target rates of the open-loop steps, events/s.
    pub steps: Vec<u32>,
    pub step_seconds: f64,
    pub idle_seconds: f64,
    pub probes: usize,
    pub probe_seconds: f64,
    pub backlog_events: usize,
    /// The large-event backlog of our relay's sessions, MiB (0: none).
    #[serde(default)]
    pub large_backlog_mib: usize,
    /// Published rows kept in the table for polling's big-table phase (0: none).
    #[serde(default)]
    pub big_table_rows: u64,
    pub payload_bytes: usize,
    pub writers: usize,
    pub max_tx_per_sec: u32,
    /// A step is kept up with when its last event arrived at most this long after the
    /// writers' last commit.
    pub max_lag_seconds: f64,
    /// Round-trip time added between the systems and PostgreSQL, ms (0: direct).
    #[serde(default)]
    pub database_rtt_ms: u64,
}

/// One system, started once, measured through every phase, stopped.
#[derive(Serialize, Deserialize)]
pub struct Session {
    pub system: String,
    pub round: usize,
    /// Process start → first event consumed (includes topic creation).
    pub startup_seconds: f64,
    pub idle: Idle,
    pub steps: Vec<Step>,
    /// The saturation search between the last step kept up with and the first not.
    pub probes: Vec<Step>,
    pub max_sustained: MaxSustained,
    pub backlog: Backlog,
    /// Our relay only: a backlog of large events, drained with its memory watched.
    #[serde(default)]
    pub large_backlog: Option<LargeBacklog>,
    /// Polling only (`--big-table-rows`): the step and the drain again with millions of
    /// retained rows in the table, and a step during the purge.
    #[serde(default)]
    pub big_table: Option<BigTable>,
    /// VmHWM before the large-event backlog (the same phases for every system).
    pub peak_rss_mib: f64,
    pub duplicates: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Idle {
    pub seconds: f64,
    /// CPU time of the system's process over the idle window, % of one core.
    pub cpu_percent: f64,
    /// CPU time of all PostgreSQL processes over the same window, % of one core.
    pub postgres_cpu_percent: f64,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The writers kept within 10% of the target and every event arrived within the lag bound.
    Sustained,
    /// Every event arrived within the lag bound, but the writers fell short of the
    /// target: the machine (shared by everything) was saturated, not just the system.
    WritersShort,
    /// Events arrived later than the lag bound after the writers stopped, or not at all.
    FellBehind,
}

impl Verdict {
    pub fn kept_up(self) -> bool {
        self != Verdict::FellBehind
    }
}

#[derive(Serialize, Deserialize, Clone)]
pub struct Step {
    pub target_rate: u32,
    pub events_per_tx: usize,
    pub events: usize,
    /// The writers' achieved rate, events/s.
    pub achieved_rate: f64,
    pub missing: usize,
    /// Writers' last commit → last event consumed, seconds.
    pub end_lag_seconds: f64,
    pub verdict: Verdict,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// CPU time of the system's process from the step's start to its last arrival.
    pub cpu_seconds_per_million: f64,
    pub postgres_cpu_seconds_per_million: f64,
    /// The same less the backends of the harness's own connections (the writers): what
    /// the system under test costs PostgreSQL, without the writers' noise. `None` in
    /// reports from before it was measured.
    #[serde(default)]
    pub postgres_cpu_less_writers_seconds_per_million: Option<f64>,
    /// Highest VmRSS sampled (every 50 ms) during the step.
    pub peak_rss_mib: f64,
}

#[derive(Serialize, Deserialize)]
pub struct MaxSustained {
    /// The highest achieved rate of a step or probe that was kept up with, events/s.
    pub events_per_sec: f64,
    /// Why it is not higher.
    pub limited_by: String,
}

/// Polling with a table that keeps `retained_rows` published rows.
#[derive(Serialize, Deserialize)]
pub struct BigTable {
    pub retained_rows: u64,
    /// Writing them (plain SQL) and `VACUUM (ANALYZE)`, seconds.
    pub fill_seconds: f64,
    /// The session's compared step again (the same target rate).
    pub step: Step,
    /// The backlog drain again.
    pub backlog: Backlog,
    /// Rows past the retention added for the purge.
    pub purge_rows: u64,
    /// The same step while the relay purged them.
    pub purge_step: Step,
    pub purged_during_step: u64,
    /// 0 means the purge may have ended before the step did.
    pub purge_rows_left_after_step: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Backlog {
    pub events: usize,
    /// The system was paused (SIGSTOP) while the events were written, then resumed:
    /// resume → last event consumed, seconds.
    pub drain_seconds: f64,
    pub events_per_sec: f64,
    pub cpu_seconds_per_million: f64,
    pub postgres_cpu_seconds_per_million: f64,
    pub peak_rss_mib: f64,
}

/// The system paused, a backlog of large events written, the system resumed: how fast
/// it drains, and how much memory it takes meanwhile.
#[derive(Serialize, Deserialize)]
pub struct LargeBacklog {
    pub events: usize,
    /// Each event's payload, bytes.
    pub event_bytes: usize,
    pub drain_seconds: f64,
    pub events_per_sec: f64,
    pub mib_per_sec: f64,
    /// Highest VmRSS sampled (every 50 ms) from the resume to the last arrival.
    pub peak_rss_mib: f64,
}

impl Report {
    /// The systems in the order of the plan, each with its sessions (one per round).
    pub fn by_system(&self) -> Vec<(&str, Vec<&Session>)> {
        self.plan
            .systems
            .iter()
            .map(|s| {
                let sessions = self.sessions.iter().filter(|x| &x.system == s).collect();
                (s.as_str(), sessions)
            })
            .filter(|(_, sessions): &(&str, Vec<&Session>)| !sessions.is_empty())
            .collect()
    }
}

/// The mean of a figure over the rounds (NaN when no round has it).
pub fn mean(sessions: &[&Session], figure: impl Fn(&Session) -> Option<f64>) -> f64 {
    mean_of_finite(sessions.iter().filter_map(|s| figure(s)))
}

/// The mean of the finite values (NaN when there is none).
fn mean_of_finite(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

impl Session {
    pub fn step(&self, rate: u32) -> Option<&Step> {
        self.steps.iter().find(|s| s.target_rate == rate)
    }
}

/// What the parts under the systems allow, measured in the same run (`limits.rs`).
#[derive(Serialize, Deserialize)]
pub struct Limits {
    pub round: usize,
    /// The relay's producer with no database: with Kafka transactions (the relay's
    /// default), then without.
    pub kafka: Vec<KafkaAlone>,
    pub postgres: PostgresAlone,
    pub stream: StreamAlone,
}

#[derive(Serialize, Deserialize)]
pub struct KafkaAlone {
    pub transactions: bool,
    /// Messages per publish at most (the relay's batch size).
    pub batch_size: usize,
    /// Open loop at the plan's rates: handed to the producer → consumed.
    pub steps: Vec<KafkaStep>,
    /// The backlog's number of messages, all at hand, published batch after batch.
    pub drain_events: usize,
    pub drain_seconds: f64,
    pub drain_events_per_sec: f64,
}

#[derive(Serialize, Deserialize)]
pub struct KafkaStep {
    pub target_rate: u32,
    pub events: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// The writers' commit rate with no system running.
#[derive(Serialize, Deserialize)]
pub struct PostgresAlone {
    pub writers: Vec<WriterCeiling>,
}

#[derive(Serialize, Deserialize)]
pub struct WriterCeiling {
    pub events_per_tx: usize,
    pub events: usize,
    pub events_per_sec: f64,
}

/// A backlog decoded from a slot by PostgreSQL (`pgoutput`) and read by
/// `pg_recvlogical`, with nothing behind it.
#[derive(Serialize, Deserialize)]
pub struct StreamAlone {
    pub events: usize,
    pub seconds: f64,
    pub events_per_sec: f64,
}

impl Report {
    /// The mean of a limit over the rounds that measured it (NaN when none did).
    pub fn limit(&self, figure: impl Fn(&Limits) -> Option<f64>) -> f64 {
        mean_of_finite(self.limits.iter().filter_map(figure))
    }
}

impl Limits {
    pub fn kafka(&self, transactions: bool) -> Option<&KafkaAlone> {
        self.kafka.iter().find(|k| k.transactions == transactions)
    }

    /// The writers' ceiling at the largest measured shape not above `events_per_tx`
    /// (more events per transaction only write faster).
    pub fn writers_at(&self, events_per_tx: usize) -> Option<f64> {
        self.postgres
            .writers
            .iter()
            .filter(|w| w.events_per_tx <= events_per_tx)
            .max_by_key(|w| w.events_per_tx)
            .map(|w| w.events_per_sec)
    }
}

impl KafkaAlone {
    pub fn step(&self, rate: u32) -> Option<&KafkaStep> {
        self.steps.iter().find(|s| s.target_rate == rate)
    }
}

impl Session {
    /// The step or probe whose achieved rate is the highest rate kept up with.
    pub fn best_kept_up(&self) -> Option<&Step> {
        self.steps
            .iter()
            .chain(&self.probes)
            .filter(|s| s.verdict.kept_up())
            .max_by(|a, b| a.achieved_rate.total_cmp(&b.achieved_rate))
    }
}
