//! `chaos`: fault scenarios on the real services. For each scenario and mode: a fresh
//! database and topics, a relay behind fault proxies (Toxiproxy) to PostgreSQL and
//! Kafka, writers, and a consumer that reads Kafka directly; the fault while they run;
//! then what survived, from the consumer's record against the database's rows, and
//! from `outbox verify`. Run it with `scripts/chaos`.

mod blackhole;
mod scenarios;
mod score;
mod standby;
mod world;
mod writers;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use scenarios::{Intensity, Scenario};
use score::Score;
use world::{Env, World};
use writers::{Load, Writers};

#[derive(Parser)]
#[command(about = "Fault scenarios on the real services; prints what survived")]
struct Args {
    /// The short run for CI: fewer kills, shorter faults (at most 10 minutes).
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (repeatable); `--list` shows their names.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Only this mode.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// The outbox binary under test.
    #[arg(long, default_value = "target/debug/outbox")]
    outbox_bin: PathBuf,
    /// Write the results table (Markdown) here.
    #[arg(long, value_name = "FILE")]
    results: Option<PathBuf>,
    /// Give every relay this environment variable too (repeatable), for example
    /// `OUTBOX_KAFKA__TRANSACTIONS=false` to see what a relay without fencing does.
    #[arg(long = "relay-env", value_name = "NAME=VALUE", value_parser = parse_env)]
    relay_env: Vec<(String, String)>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Polling,
    Cdc,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::Cdc => "cdc",
        }
    }
}

/// One scenario in one mode: what survived.
struct Row {
    scenario: Scenario,
    mode: Mode,
    score: Score,
    recover_s: Option<f64>,
    takeover_s: Option<f64>,
    verify_passed: bool,
    /// Something that went wrong besides the score (a relay that exited by itself).
    problem: Option<String>,
}

impl Row {
    fn failed(&self) -> bool {
        // The inbox promises each effect once: a copy applied twice is a failure there.
        let applied_twice = self.scenario == Scenario::Inbox && self.score.dup > 0;
        self.score.failed() || applied_twice || !self.verify_passed || self.problem.is_some()
    }

    fn line(&self) -> String {
        let seconds = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.1}"));
        format!(
            "chaos: scenario={} mode={} events={} lost={} reorder={} stale={} dup={} recover_s={} takeover_s={} phantom={} zombie={} dead_lettered={} verify={}{}",
            self.scenario.name(),
            self.mode.name(),
            self.score.events,
            self.score.lost,
            self.score.reorder,
            self.score.stale,
            self.score.dup,
            seconds(self.recover_s),
            seconds(self.takeover_s),
            self.score.phantom,
            self.score.zombie,
            self.score.dead_lettered,
            if self.verify_passed { "passed" } else { "FAILED" },
            self.problem
                .as_ref()
                .map(|p| format!(" problem={p:?}"))
                .unwrap_or_default(),
        )
    }
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode> {
    let args = Args::parse();
    let intensity = Intensity { quick: args.quick };
    if args.list {
        for scenario in Scenario::ALL {
            println!("{:22} {}", scenario.name(), scenario.describe(intensity));
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut scenarios = Vec::new();
    for name in &args.scenarios {
        scenarios.push(Scenario::from_name(name).with_context(|| {
            format!("unknown scenario {name:?}; `scripts/chaos --list` shows them")
        })?);
    }
    if scenarios.is_empty() {
        scenarios = Scenario::ALL.to_vec();
    }
    let modes = match args.mode {
        Some(mode) => vec![mode],
        None => vec![Mode::Polling, Mode::Cdc],
    };
    let env = environment(&args, intensity).await?;
    let started = Instant::now();
    if args.scenarios.is_empty() {
        self_check(&env, intensity).await?;
    }
    let mut rows = Vec::new();
    for &scenario in &scenarios {
        for &mode in &modes {
            if !scenario.applies(mode) {
                continue;
            }
            if intensity.quick && args.scenarios.is_empty() {
                if let Some(why) = scenarios::left_to_full_run(scenario) {
                    println!(
                        "chaos: scenario={} mode={} left to the full run ({why})",
                        scenario.name(),
                        mode.name()
                    );
                    continue;
                }
            }
            let row = match run(&env, scenario, mode, intensity).await {
                Ok(row) => row,
                Err(err) => Row {
                    scenario,
                    mode,
                    score: Score::default(),
                    recover_s: None,
                    takeover_s: None,
                    verify_passed: false,
                    problem: Some(format!("{err:#}")),
                },
            };
            println!("{}", row.line());
            rows.push(row);
        }
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.failed()).collect();
    let events: u64 = rows.iter().map(|r| r.score.events).sum();
    println!(
        "chaos: {} runs, {} events, {} failed, in {:.0} s",
        rows.len(),
        events,
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.results {
        std::fs::write(path, results_markdown(&rows, intensity, &args))?;
        println!("chaos: results written to {}", path.display());
    }
    Ok(if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Runs the control scenario, whose rows are marked published without being sent, and
/// fails unless the harness counts them lost: a harness that cannot see a loss proves
/// nothing.
async fn self_check(env: &Env, intensity: Intensity) -> Result<()> {
    let control = Scenario::ControlMarkedUnsent;
    let row = run(env, control, Mode::Polling, intensity).await?;
    let seen = row.score.lost > 0 && !row.verify_passed;
    println!(
        "chaos: self-check scenario={} lost={} verify={} ({})",
        control.name(),
        row.score.lost,
        if row.verify_passed {
            "passed"
        } else {
            "FAILED"
        },
        if seen {
            "as expected: the harness and `outbox verify` see a loss"
        } else {
            "NOT SEEN"
        }
    );
    if !seen {
        anyhow::bail!("the self-check's marked-but-unsent rows were not counted lost: the harness cannot be trusted");
    }
    Ok(())
}

async fn environment(args: &Args, intensity: Intensity) -> Result<Env> {
    let admin_url = std::env::var("OUTBOX_DATABASE_URL").context(
        "OUTBOX_DATABASE_URL is not set; run through scripts/chaos, which starts the services",
    )?;
    let brokers = std::env::var("OUTBOX_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let parsed = url::Url::parse(&admin_url)?;
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_string();
    if host != "127.0.0.1" || !brokers.starts_with("127.0.0.1:") {
        anyhow::bail!("fault scenarios only run against services on 127.0.0.1");
    }
    let pg_address = format!("{host}:{}", parsed.port().unwrap_or(5432));
    let root = std::env::current_dir()?;
    let toxiproxy = outbox_test_kit::toxiproxy::Toxiproxy::new();
    toxiproxy.check().await?;
    Ok(Env {
        admin_url,
        pg_address,
        brokers,
        outbox_bin: args.outbox_bin.clone(),
        services_script: root.join("scripts/services"),
        log_dir: root.join(".services/chaos"),
        message_timeout: intensity.message_timeout(),
        relay_env: args.relay_env.clone(),
        toxiproxy,
    })
}

/// The writers' pace and the time around the fault.
fn load(scenario: Scenario, intensity: Intensity) -> Load {
    let events_per_second = match (scenario, intensity.quick) {
        // The full run of relay kills writes at least 100,000 events.
        (Scenario::RelayKill, false) => 1_500,
        (_, false) => 800,
        // The inbox consumers (debug builds) apply more slowly than the relay publishes.
        (Scenario::Inbox, true) => 200,
        (_, true) => 400,
    };
    Load {
        writers: 4,
        aggregates_per_writer: 6,
        events_per_second,
        // Open across the fault's start; the writers' stop waits for its commit.
        long_transaction: Duration::from_secs(if intensity.quick { 3 } else { 6 }),
    }
}

async fn run(env: &Env, scenario: Scenario, mode: Mode, intensity: Intensity) -> Result<Row> {
    let through_vip = scenario == Scenario::PostgresFailover;
    let mut world = World::create(env, scenario.name(), mode, through_vip).await?;
    scenarios::prepare(scenario, &mut world);
    let result = exercise(&mut world, scenario, intensity).await;
    let verify_passed = world.verify().unwrap_or(false);
    let mut problem = None;
    for relay in &mut world.relays {
        if let Some(status) = relay.exited() {
            problem = Some(format!(
                "relay {} exited by itself ({status}); see {}",
                relay.index,
                relay.log().display()
            ));
        }
    }
    let row = result.map(|(score, recover_s, takeover_s, broken)| Row {
        scenario,
        mode,
        score,
        recover_s,
        takeover_s,
        verify_passed,
        problem: problem.or(broken),
    });
    // A failed run's topics stay for inspection; a passed run's go, so that the broker
    // does not carry thousands of partitions into the next restart.
    let keep_topics = row.as_ref().map_or(true, Row::failed);
    world.tear_down(keep_topics).await?;
    row
}

type Measured = (Score, Option<f64>, Option<f64>, Option<String>);

async fn exercise(world: &mut World, scenario: Scenario, intensity: Intensity) -> Result<Measured> {
    world.start_consumer()?;
    world.start_relay(0).await?;
    world.wait_active(0, Duration::from_secs(30)).await?;
    let writers = Writers::start(world.pool.clone(), load(scenario, intensity), world.started);
    tokio::time::sleep(intensity.settle()).await;
    let fault = scenario.inject(world, intensity).await?;
    tokio::time::sleep(intensity.settle()).await;
    let log = writers.stop().await;
    let rows = world.committed_rows().await?;
    // Until every committed row (dead letters aside) has been read.
    let expected: HashSet<_> = rows
        .iter()
        .filter(|r| !r.dead_lettered)
        .map(|r| r.id)
        .collect();
    // The control's lost rows never come: no need to wait long for them.
    let drain = if scenario == Scenario::ControlMarkedUnsent {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(120)
    };
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline {
        let consumed = world.consumed_ids();
        if expected.iter().all(|id| consumed.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A little longer, for late duplicates (the score reads the topics afresh anyway).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let observed_until = world.now();
    let arrivals = world.stop_consumer()?;
    // Rows dead-lettered while draining count as such, not as lost.
    let rows = world.committed_rows().await?;
    let score = if scenario == Scenario::Inbox {
        inbox_score(world, &rows).await?
    } else {
        score::score(&rows, &world.read_topics()?)
    };
    let commits = log.lock().unwrap().commits.clone();
    let recover = score::recovery(fault.end, observed_until, &commits, &arrivals);
    Ok((
        score,
        recover,
        fault.takeover.map(|t| t.as_secs_f64()),
        fault.problem,
    ))
}

/// How long the inbox consumers may go without applying anything before what they have
/// not applied counts as lost.
const INBOX_STALL: Duration = Duration::from_secs(30);
/// How long they may take to catch up at most.
const INBOX_DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// The `inbox` scenario's score, from what its consumers applied once they caught up
/// (or stopped making progress for [`INBOX_STALL`]): lost = committed and never applied, dup = applied more than once,
/// reorder = applied after a newer event of its aggregate, phantom = applied but never
/// committed.
async fn inbox_score(world: &World, rows: &[score::CommittedRow]) -> Result<Score> {
    let expected: HashSet<_> = rows
        .iter()
        .filter(|r| !r.dead_lettered)
        .map(|r| r.id)
        .collect();
    // Lost means never applied, not applied slowly: the consumers (debug builds, on two
    // cores shared with everything else) may still be catching up on the backlog of a
    // broker restart. Wait while they make progress; stop once they stall.
    let deadline = Instant::now() + INBOX_DRAIN_LIMIT;
    let mut progress = (0, Instant::now());
    let applied = loop {
        let applied = world.applied().await?;
        let ids: HashSet<_> = applied.counts.iter().map(|(id, _)| *id).collect();
        if ids.len() > progress.0 {
            progress = (ids.len(), Instant::now());
        }
        let stalled = progress.1.elapsed() > INBOX_STALL;
        if expected.is_subset(&ids) || stalled || Instant::now() > deadline {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ids: HashSet<_> = applied.counts.iter().map(|(id, _)| *id).collect();
    let committed: HashSet<_> = rows.iter().map(|r| r.id).collect();
    Ok(Score {
        events: rows.len() as u64,
        lost: expected.difference(&ids).count() as u64,
        dead_lettered: rows.iter().filter(|r| r.dead_lettered).count() as u64,
        reorder: applied.order_violations as u64,
        stale: 0,
        dup: applied
            .counts
            .iter()
            .map(|(_, n)| (*n - 1).max(0) as u64)
            .sum(),
        phantom: ids.difference(&committed).count() as u64,
        zombie: 0,
    })
}

fn results_markdown(rows: &[Row], intensity: Intensity, args: &Args) -> String {
    let mut text = String::from(
        "# Fault scenarios: what survived\n\n\
         Written by `scripts/chaos` (the full run) on the real services of `scripts/services`: \
         PostgreSQL 15, a single-node Kafka, and Toxiproxy between the relay and each of them. \
         Every scenario runs in both modes with four writers (half through the library, half \
         with plain SQL; one transaction in ten rolled back; a transaction held open 6 s), a \
         relay, and a consumer reading Kafka directly (it times the recovery). Scored on a \
         fresh read of the topics, in partition order, against the database's rows at \
         the end: *lost* committed events never read, *reorder* first copies that arrived \
         after a newer event of their aggregate, *stale* repeated copies that arrived after a \
         newer event, *dup* copies beyond the first, *phantom* messages of rolled-back \
         transactions, *zombie* writes that landed after a message of their partition \
         produced more than a second later (an old relay's write after its successor's), \
         *takeover* seconds until a standby was active, *recover* seconds from the fault's end until no event committed more \
         than 1 s earlier was unread; `outbox verify` must pass too.\n\n",
    );
    let stamp = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    text.push_str(&format!(
        "Command: `scripts/chaos{}`, at commit `{}`, finished {} on a 2-core machine.\n\n",
        if args.quick { " --quick" } else { "" },
        stamp("git", &["rev-parse", "--short", "HEAD"]),
        stamp("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    ));
    text.push_str("| scenario | what happens | mode | events | lost | reorder | stale | dup | phantom | zombie | takeover (s) | recover (s) | verify |\n");
    text.push_str("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for row in rows {
        text.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.scenario.name(),
            row.scenario.describe(intensity),
            row.mode.name(),
            row.score.events,
            row.score.lost,
            row.score.reorder,
            row.score.stale,
            row.score.dup,
            row.score.phantom,
            row.score.zombie,
            row.takeover_s.map_or("-".into(), |s| format!("{s:.1}")),
            row.recover_s.map_or("-".into(), |s| format!("{s:.1}")),
            match (&row.problem, row.verify_passed) {
                (Some(problem), _) => format!("**{problem}**"),
                (None, true) => "passed".into(),
                (None, false) => "**FAILED**".into(),
            },
        ));
    }
    text
}
