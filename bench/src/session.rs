//! The protocol for one system: start it, warm it up, measure it idle, step the load up,
//! search its saturation point, drain a backlog, stop it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use outbox::Event;

use crate::arrivals::Arrivals;
use crate::db::BenchDb;
use crate::load::{self, Shape, Written};
use crate::report::{Backlog, Idle, LargeBacklog, MaxSustained, Plan, Session, Step, Verdict};
use crate::system::{
    bench_backends_cpu, cpu_spent, postgres_cpu_seconds, Launcher, Running, System,
};
use crate::topics::Topics;

pub struct Context<'a> {
    pub admin_url: &'a str,
    pub launcher: Launcher<'a>,
    pub plan: &'a Plan,
    pub shape: Shape,
    /// With `--profile-relay`: where our relay's flame graph of each backlog drain goes.
    pub profile_dir: Option<&'a std::path::Path>,
    pub topics: &'a Topics,
}

pub async fn run(cx: &Context<'_>, system: System, round: usize) -> Result<Session> {
    let db = BenchDb::create(
        cx.admin_url,
        cx.launcher.relay_bin,
        system,
        cx.shape.writers as u32 + 2,
    )
    .await?;
    let started = Instant::now();
    let mut sut = cx.launcher.start(system, &db)?;
    let result = measure(cx, system, round, &db, &mut sut, started).await;
    sut.stop();
    let prefix = db.topic_prefix.clone();
    db.drop().await?;
    cx.topics.delete_with_prefix(&prefix).await?;
    result
}

async fn measure(
    cx: &Context<'_>,
    system: System,
    round: usize,
    db: &BenchDb,
    sut: &mut Running,
    started: Instant,
) -> Result<Session> {
    let plan = cx.plan;
    let arrivals = warm_up(cx, db, sut).await?;
    let startup_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: {} round {round}: first event after {startup_seconds:.1} s",
        system.name()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let idle = idle(sut, plan.idle_seconds).await;
    eprintln!(
        "bench: {} idle: {:.2}% CPU, postgres {:.2}%",
        system.name(),
        idle.cpu_percent,
        idle.postgres_cpu_percent
    );

    let mut steps = Vec::new();
    for &rate in &plan.steps {
        let step = step(cx, db, sut, &arrivals, rate, plan.step_seconds).await?;
        report_step(system, "step", &step);
        let verdict = step.verdict;
        steps.push(step);
        if verdict != Verdict::Sustained {
            break;
        }
    }

    // Bisect between the last target kept up with and the first one fallen behind.
    let mut probes = Vec::new();
    let mut low = steps
        .iter()
        .filter(|s| s.verdict == Verdict::Sustained)
        .map(|s| s.target_rate)
        .max()
        .unwrap_or(0);
    let mut high = steps
        .iter()
        .find(|s| s.verdict == Verdict::FellBehind)
        .map(|s| s.target_rate);
    if let Some(mut high_rate) = high {
        for _ in 0..plan.probes {
            let mid = ((low + high_rate) / 2 / 100) * 100;
            if mid <= low || mid >= high_rate {
                break;
            }
            let probe = step(cx, db, sut, &arrivals, mid, plan.probe_seconds).await?;
            report_step(system, "probe", &probe);
            let verdict = probe.verdict;
            probes.push(probe);
            match verdict {
                Verdict::Sustained => low = mid,
                Verdict::FellBehind => high_rate = mid,
                Verdict::WritersShort => break,
            }
        }
        high = Some(high_rate);
    }
    let max_sustained = max_sustained(&steps, &probes, high, plan);

    let profile = match cx.profile_dir {
        Some(dir) if !system.is_debezium() => {
            Some((dir, format!("{}-round{round}", system.name())))
        }
        _ => None,
    };
    let backlog = backlog(cx, db, sut, &arrivals, plan.backlog_events, profile).await?;
    eprintln!(
        "bench: {} backlog: {:.0} events/s ({:.2} s)",
        system.name(),
        backlog.events_per_sec,
        backlog.drain_seconds
    );
    sut.check_alive()?;
    // Before the large events, which only our relay's sessions drain.
    let peak_rss_mib = sut.peak_rss_mib();
    let large_backlog = if system.is_debezium() || plan.large_backlog_mib == 0 {
        None
    } else {
        let large = large_backlog(db, sut, &arrivals, plan.large_backlog_mib).await?;
        eprintln!(
            "bench: {} large-event backlog: {:.0} MiB/s ({} events), peak RSS {:.1} MiB",
            system.name(),
            large.mib_per_sec,
            large.events,
            large.peak_rss_mib
        );
        sut.check_alive()?;
        Some(large)
    };
    let big_table = match crate::big_table::compared_rate(&steps) {
        Some(rate) if system == System::Polling && plan.big_table_rows > 0 => {
            let big = crate::big_table::measure(cx, db, sut, &arrivals, rate, plan.big_table_rows)
                .await?;
            sut.check_alive()?;
            Some(big)
        }
        _ => None,
    };
    let duplicates = arrivals.duplicates();
    arrivals.stop();
    Ok(Session {
        system: system.name().to_string(),
        round,
        startup_seconds,
        idle,
        steps,
        probes,
        max_sustained,
        backlog,
        large_backlog,
        big_table,
        peak_rss_mib,
        duplicates,
    })
}

fn report_step(system: System, what: &str, s: &Step) {
    report_step_named(system.name(), what, s)
}

pub(crate) fn report_step_named(name: &str, what: &str, s: &Step) {
    eprintln!(
        "bench: {name} {what} {}/s: wrote {:.0}/s, p50 {:.1} p99 {:.1} p99.9 {:.1} ms, lag {:.2} s, {:?}",
        s.target_rate,
        s.achieved_rate,
        s.p50_ms,
        s.p99_ms,
        s.p999_ms,
        s.end_lag_seconds,
        s.verdict
    );
}

fn max_sustained(
    steps: &[Step],
    probes: &[Step],
    fell_behind_at: Option<u32>,
    plan: &Plan,
) -> MaxSustained {
    let all: Vec<&Step> = steps.iter().chain(probes).collect();
    let best = all
        .iter()
        .filter(|s| s.verdict.kept_up())
        .map(|s| s.achieved_rate)
        .fold(0.0, f64::max);
    let limited_by = if let Some(rate) = fell_behind_at {
        format!("the system fell behind at {rate} events/s")
    } else if all.iter().any(|s| s.verdict == Verdict::WritersShort) {
        "the machine: the writers could not reach the next target".to_string()
    } else {
        format!(
            "the plan: its highest step ({} events/s) was kept up with",
            plan.steps.last().copied().unwrap_or(0)
        )
    };
    MaxSustained {
        events_per_sec: best,
        limited_by,
    }
}

/// Writes an event every few seconds until one arrives: the topic exists, the system is
/// connected and its slot (Debezium creates one at start-up) is in place. Then the
/// session's consumer starts.
async fn warm_up(cx: &Context<'_>, db: &BenchDb, sut: &mut Running) -> Result<Arrivals> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut written = HashSet::new();
    let mut arrivals: Option<Arrivals> = None;
    let mut last_write = Instant::now() - Duration::from_secs(60);
    loop {
        sut.check_alive()?;
        if last_write.elapsed() > Duration::from_secs(3) {
            let event = Event::new(
                "order",
                "warmup",
                "Warmup",
                load::payload(cx.shape.payload_bytes, 0),
            );
            outbox::write(&db.pool, &event).await?;
            written.insert(event.id);
            last_write = Instant::now();
        }
        if arrivals.is_none() {
            arrivals = Arrivals::start(
                cx.launcher.kafka_brokers,
                &cx.launcher.kafka_properties,
                &db.topic,
            )
            .ok();
        }
        if let Some(a) = &arrivals {
            if written.iter().any(|id| a.contains(id)) {
                return Ok(arrivals.unwrap());
            }
        }
        if Instant::now() > deadline {
            bail!("the system under test published nothing within 3 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn idle(sut: &Running, seconds: f64) -> Idle {
    let (cpu, pg) = (sut.cpu_seconds(), postgres_cpu_seconds());
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    Idle {
        seconds,
        cpu_percent: (sut.cpu_seconds() - cpu) / seconds * 100.0,
        postgres_cpu_percent: (postgres_cpu_seconds() - pg) / seconds * 100.0,
    }
}

/// How long to wait for the events of a step after the writers stopped: long enough to
/// drain what a system that fell far behind piled up, bounded.
fn settle_timeout(written: &Written) -> Duration {
    Duration::from_secs_f64(
        ((written.finished - written.started) as f64 / 1e6 * 10.0).clamp(60.0, 300.0),
    )
}

pub(crate) async fn step(
    cx: &Context<'_>,
    db: &BenchDb,
    sut: &mut Running,
    arrivals: &Arrivals,
    rate: u32,
    seconds: f64,
) -> Result<Step> {
    sut.take_sampled_peak_rss_mib();
    let writers = bench_backends_cpu(db).await?;
    let (cpu, pg) = (sut.cpu_seconds(), postgres_cpu_seconds());
    let written = load::open_loop(&db.pool, cx.shape, rate, seconds).await?;
    let settled = arrivals
        .settle(&written.commits, settle_timeout(&written))
        .await;
    let (cpu, pg) = (sut.cpu_seconds() - cpu, postgres_cpu_seconds() - pg);
    let writers = cpu_spent(&writers, &bench_backends_cpu(db).await?);
    sut.check_alive()?;
    let events = written.events();
    let end_lag_seconds = settled.last_arrival.saturating_sub(written.finished) as f64 / 1e6;
    let achieved_rate = written.rate();
    let verdict = if settled.missing > 0 || end_lag_seconds > cx.plan.max_lag_seconds {
        Verdict::FellBehind
    } else if achieved_rate < 0.9 * rate as f64 {
        Verdict::WritersShort
    } else {
        Verdict::Sustained
    };
    let ms = |q: f64| settled.latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(Step {
        target_rate: rate,
        events_per_tx: cx.shape.events_per_tx(rate),
        events,
        achieved_rate,
        missing: settled.missing,
        end_lag_seconds,
        verdict,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: settled.latency.max() as f64 / 1000.0,
        cpu_seconds_per_million: cpu / events as f64 * 1e6,
        postgres_cpu_seconds_per_million: pg / events as f64 * 1e6,
        postgres_cpu_less_writers_seconds_per_million: Some((pg - writers) / events as f64 * 1e6),
        peak_rss_mib: sut.take_sampled_peak_rss_mib(),
    })
}

/// Pauses the system, writes a backlog as fast as the writers go, resumes it and times
/// the drain: the system's own ceiling, without its start-up.
pub(crate) async fn backlog(
    cx: &Context<'_>,
    db: &BenchDb,
    sut: &mut Running,
    arrivals: &Arrivals,
    events: usize,
    profile: Option<(&std::path::Path, String)>,
) -> Result<Backlog> {
    sut.pause();
    let written = load::closed_loop(&db.pool, cx.shape, events, load::BACKLOG_EVENTS_PER_TX).await;
    let (cpu, pg) = (sut.cpu_seconds(), postgres_cpu_seconds());
    sut.take_sampled_peak_rss_mib();
    let recording = match &profile {
        Some((dir, name)) => Some(crate::profile::start(sut.pid(), dir, name)?),
        None => None,
    };
    let resumed = crate::now_micros();
    sut.resume();
    let written = written?;
    let settled = arrivals
        .settle(&written.commits, Duration::from_secs(600))
        .await;
    if let Some(recording) = recording {
        let svg = tokio::task::spawn_blocking(move || recording.finish()).await??;
        eprintln!("bench: flame graph of the drain in {}", svg.display());
    }
    let (cpu, pg) = (sut.cpu_seconds() - cpu, postgres_cpu_seconds() - pg);
    settled.drained("backlog")?;
    let drain_seconds = settled.seconds_since(resumed);
    Ok(Backlog {
        events,
        drain_seconds,
        events_per_sec: events as f64 / drain_seconds,
        cpu_seconds_per_million: cpu / events as f64 * 1e6,
        postgres_cpu_seconds_per_million: pg / events as f64 * 1e6,
        peak_rss_mib: sut.take_sampled_peak_rss_mib(),
    })
}

/// Payload of the large-event backlog: under librdkafka's default `message.max.bytes`
/// (1,000,000) with its JSON and headers, so it needs no setting changed.
const LARGE_EVENT_BYTES: usize = 960 * 1024;

/// Pauses the system, writes `mib` MiB of events of [`LARGE_EVENT_BYTES`] (random hex,
/// which PostgreSQL cannot compress much), resumes it and times the drain, sampling its
/// memory meanwhile.
async fn large_backlog(
    db: &BenchDb,
    sut: &mut Running,
    arrivals: &Arrivals,
    mib: usize,
) -> Result<LargeBacklog> {
    let events = (mib * 1024 * 1024).div_ceil(LARGE_EVENT_BYTES);
    let data: String = {
        use std::fmt::Write;
        let mut hex = String::with_capacity(LARGE_EVENT_BYTES);
        while hex.len() < LARGE_EVENT_BYTES - 64 {
            let _ = write!(hex, "{:032x}", uuid::Uuid::new_v4().as_u128());
        }
        hex
    };
    sut.pause();
    let mut commits = Vec::with_capacity(events);
    let per_tx = load::BACKLOG_EVENTS_PER_TX;
    for first in (0..events).step_by(per_tx) {
        let last = (first + per_tx).min(events) - 1;
        // Plain SQL, as a writer in any language would; one payload sent per transaction.
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
             SELECT gen_random_uuid(), 'order', (n % 1000)::text, 'BenchLarge',
                    jsonb_build_object('n', n, 'data', $1::text)
             FROM generate_series($2::int, $3::int) AS n
             RETURNING id",
        )
        .bind(&data)
        .bind(first as i32)
        .bind(last as i32)
        .fetch_all(&db.pool)
        .await?;
        let at = crate::now_micros();
        commits.extend(ids.into_iter().map(|id| (id, at)));
    }
    sut.take_sampled_peak_rss_mib();
    let resumed = crate::now_micros();
    sut.resume();
    let settled = arrivals.settle(&commits, Duration::from_secs(600)).await;
    let peak_rss_mib = sut.take_sampled_peak_rss_mib();
    settled.drained("large-event backlog")?;
    let drain_seconds = settled.seconds_since(resumed);
    Ok(LargeBacklog {
        events,
        event_bytes: LARGE_EVENT_BYTES,
        drain_seconds,
        events_per_sec: events as f64 / drain_seconds,
        mib_per_sec: (events * LARGE_EVENT_BYTES) as f64 / 1024.0 / 1024.0 / drain_seconds,
        peak_rss_mib,
    })
}
